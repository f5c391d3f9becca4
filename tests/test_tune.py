"""Inference defaults chosen on validation data (`python -m xmdl_tf.tune`)."""
import json
import shutil

import numpy as np
import pytest

from xmdl_tf.config import Config



def test_tune_picks_the_best_validation_setting_and_stores_it(blob_run, tmp_path, capsys):
    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.tune import main

    data, run = blob_run
    model = tmp_path / "model"
    shutil.copytree(run, model)
    argv = ["--model", str(model), "--data", str(data), "--thresholds", "0.2", "0.5", "0.8",
            "--min-areas", "0", "2500", "--json", str(tmp_path / "tune.json")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "tune.json").read_text())
    rows = result["rows"]
    assert len(rows) == 2 * 3 * 2  # TTA off/on x thresholds x minimum areas
    best = max(r["mean_f1"] for r in rows)
    assert result["chosen_row"]["mean_f1"] == best and result["split"] == "val"
    assert Config.load(model / "config.json").inference.threshold == 0.5  # nothing written without --write

    assert main([*argv, "--write"]) == 2  # an existing --json is never overwritten, checked before any work
    assert "tune.json: exists" in capsys.readouterr().err
    assert main([*argv[:-1], str(tmp_path / "tune2.json"), "--write"]) == 0
    cfg = Config.load(model / "config.json")
    chosen = result["chosen_row"]
    assert (cfg.inference.tta, cfg.inference.threshold, cfg.inference.min_area_nm2) == (
        chosen["tta"], chosen["threshold"], chosen["min_area_nm2"])
    assert cfg.info["inference_tuning"]["split"] == "val"
    # ... with the widths auto zoom aims at: the blobs' objects, 2 x radius 6-12 px, in model px.
    widths = cfg.info["inference_tuning"]["object_widths_px"]
    assert cfg.inference.object_width_px == (widths["blobs"],) * 2 and 12 <= widths["blobs"] <= 26
    assert "auto zoom range" in capsys.readouterr().out
    # evaluate now applies the tuned settings by default, and reproduces the tuned score on val.
    m = evaluate(model, str(data), "val")
    assert m["inference"]["threshold"] == chosen["threshold"] and m["tta"] == chosen["tta"]
    assert m["f1"] == pytest.approx(chosen["blobs_f1"], abs=1e-4)

    with pytest.raises(SystemExit):
        main(["--model", str(model), "--data", str(data), "--split", "test"])
    assert "never on test data" in capsys.readouterr().err


def test_tune_and_calibrate_refuse_test_splits_and_shipped_models_up_front(tmp_path, capsys):
    """However the test split is spelled, and whatever would be rewritten inside the installed
    package, the refusal comes first: nothing is predicted, nothing written."""
    from conftest import write_split
    from xmdl_tf.calibrate import main as calibrate_main
    from xmdl_tf.pretrained import builtin_model
    from xmdl_tf.tune import main as tune_main

    data = tmp_path / "D"
    write_split(data, "val", 1, size=64)
    write_split(data, "test", 1, size=64)
    nowhere = str(tmp_path / "no_model")

    def refused(main, argv, needle):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err

    for argv in (["--data", str(data), "--split", "./test"], ["--data", str(data / "test")]):
        refused(tune_main, ["--model", nowhere, *argv], "a test split")
        refused(calibrate_main, ["--model", nowhere, *argv], "a test split")
    if builtin_model("xmdl_ref_f8") is not None:
        before = (builtin_model("xmdl_ref_f8") / "config.json").read_bytes()
        refused(tune_main, ["--model", "xmdl_ref_f8", "--data", str(data), "--write"], "shipped with xmdl_tf")
        refused(calibrate_main, ["--model", "xmdl_ref_f8", "--data", str(data)], "shipped with xmdl_tf")
        assert (builtin_model("xmdl_ref_f8") / "config.json").read_bytes() == before
    (tmp_path / "alt").mkdir()
    shutil.copytree(data, tmp_path / "alt" / "D")
    for main in (tune_main, calibrate_main):
        refused(main, ["--model", nowhere, "--data", str(data), str(tmp_path / "alt" / "D")], "share the folder name")
    empty = tmp_path / "E"
    shutil.copytree(data, empty)
    import tifffile
    for f in (empty / "val" / "y").iterdir():  # val labels without a mitochondrion
        tifffile.imwrite(f, np.zeros((64, 64), np.uint8))
    for main in (tune_main, calibrate_main):
        refused(main, ["--model", nowhere, "--data", str(empty)], "no mitochondrion in any of its 1 labels")
    (tmp_path / "t.json").write_text("mine")
    refused(tune_main, ["--model", nowhere, "--data", str(data), "--json", str(tmp_path / "t.json")], "exists")
    assert (tmp_path / "t.json").read_text() == "mine"


def test_calibrate_refuses_a_train_split_too_small_for_the_ood_model_before_predicting(blob_run, tmp_path, capsys):
    """Two 64-px training slices make two tiles, too few to fit a feature distribution on: said in
    seconds, naming the sets, before the val split is predicted, and the model is left as it was."""
    from conftest import write_split
    from xmdl_tf.calibrate import main as calibrate_main

    _, run = blob_run
    model = tmp_path / "model"
    shutil.copytree(run, model)
    before = (model / "config.json").read_bytes()
    data = tmp_path / "D"
    write_split(data, "train", 2, size=64)
    write_split(data, "val", 1, size=64)
    assert calibrate_main(["--model", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr()
    assert "give 2 tile(s) of 256 px" in err.err and "at least 3" in err.err and "Traceback" not in err.err
    assert "[val]" not in err.out  # no val slice was predicted
    assert (model / "config.json").read_bytes() == before and not (model / "ood.npz").exists()


def test_tune_reads_the_sets_pixel_size_and_unlabelled_value_as_evaluate_does(blob_run, tmp_path, capsys):
    """A set's dataset.json says its pixel size and which label value is unlabelled (napari's
    corrections write both): tune scores on the grid and pixels evaluate scores on."""
    import tifffile

    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.tune import tune

    data, run = blob_run
    setd = tmp_path / "blobs"
    shutil.copytree(data, setd)
    for f in (setd / "val" / "y").iterdir():  # the top rows unlabelled
        y = tifffile.imread(f)
        y[:40] = 255
        tifffile.imwrite(f, y)
    (setd / "dataset.json").write_text(json.dumps({"pixel_size_nm": 7.5, "ignore_value": 255}))
    kw = dict(thresholds=[0.5], min_areas=[0.0], tta=False, verbose=False)
    row = tune(run, [str(setd)], **kw)["rows"][0]
    explicit = tune(run, [str(setd)], pixel_sizes=[7.5], ignore_value=255, **kw)["rows"][0]
    assert row == explicit
    m = evaluate(run, str(setd), "val", threshold=0.5, min_area_nm2=0.0, tta=False)
    assert row["blobs_f1"] == pytest.approx(m["f1"], abs=1e-4)
    assert tune(run, [str(setd)], pixel_sizes=[7.5], ignore_value=0, **kw)["rows"][0]["blobs_f1"] != row["blobs_f1"]
    # An unlabelled value that swallows every mitochondrion pixel is refused before any prediction.
    from xmdl_tf.io import DataError

    with pytest.raises(DataError, match="every non-zero label pixel has this value"):
        tune(run, [str(data)], ignore_value=1, **kw)
    # An implausible pixel size in dataset.json (a micrometre value) is refused, naming the file.
    from xmdl_tf.tune import main

    (setd / "dataset.json").write_text(json.dumps({"pixel_size_nm": 0.005}))
    assert main(["--model", str(run), "--data", str(setd), "--tta", "off"]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: pixel_size_nm 0.005 is outside the plausible range" in err and "Traceback" not in err


def test_tune_write_and_outputs_are_checked_before_the_grid(blob_run, tmp_path, capsys):
    from xmdl_tf.calibrate import main as calibrate_main
    from xmdl_tf.tune import main

    data, run = blob_run
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "model.keras", bare / "model.keras")
    for argv, needle in (
            (["--model", str(bare), "--write"], "no config.json beside the model"),
            (["--model", str(run), "--json", str(tmp_path / "nowhere" / "t.json")], "does not exist")):
        assert main([*argv, "--data", str(data)]) == 2
        captured = capsys.readouterr()
        assert needle in captured.err and "predicted" not in captured.out, captured
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"\x89PNG mine")
    with pytest.raises(SystemExit):  # an existing file is never overwritten, refused before any work
        calibrate_main(["--model", str(run), "--data", str(data), "--figure", str(mine)])
    assert "exists; give a new file" in capsys.readouterr().err and mine.read_bytes() == b"\x89PNG mine"
