import json

import keras
import numpy as np
import pandas as pd
import pytest
import tifffile

from xmdl_tf.config import Config
from xmdl_tf.io import DataError
from xmdl_tf.train import main as train_main


ARGS = ["--tile-size", "32", "--depth", "3", "--base-filters", "8", "--batch-size", "8", "--tiles-per-slice", "8",
        "--no-jit"]


def test_short_training_learns_blobs(blob_run, tmp_path):
    blob_dataset, out = blob_run  # trained by the session fixture with conftest.BLOB_RUN_ARGS
    for name in ("model.keras", "config.json", "history.csv", "training_curves.png"):
        assert (out / name).is_file(), name
    h = pd.read_csv(out / "history.csv")
    assert {"loss", "val_loss", "f1", "val_f1", "val_iou", "val_precision", "val_recall"} <= set(h.columns)
    assert h["val_f1"].max() > 0.9
    cfg = Config.load(out / "config.json")
    assert cfg.model.depth == 3 and cfg.train.learning_rate == 3e-3 and cfg.data.tile_size == 32
    assert cfg.info["versions"]["tensorflow"] and cfg.info["data"][0]["train_slices"] == ["im0000", "im0001", "im0002", "im0003"]

    # EarlyStopping kept the best weights: model.keras scores the best validation loss.
    from xmdl_tf.train import _validation_counts, resolve_data, validation_scores

    model = keras.models.load_model(out / "model.keras", compile=False)
    _, val_sets, _, _ = resolve_data([str(blob_dataset)])
    res = validation_scores(_validation_counts(model, val_sets, cfg.data, 8))
    best = h["val_loss"].idxmin()
    assert res["val_loss"] == pytest.approx(h["val_loss"][best], abs=2e-3)
    assert res["val_f1"] == pytest.approx(h["val_f1"][best], abs=2e-3)
    assert h["tiles_seen"].iloc[-1] == len(h) * 12 * 8

    # Evaluate whole test slices with the trained model.
    from xmdl_tf.evaluate import main as eval_main

    assert eval_main(["--model", str(out), "--data", str(blob_dataset), "--split", "test", "--out", str(tmp_path / "ev"),
                      "--tile", "64", "--overlap", "16"]) == 0
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["n_pixels"] == 2 * 128 * 128
    assert metrics["f1"] > 0.85 and 0 <= metrics["iou"] <= metrics["f1"] <= 1
    per = pd.read_csv(tmp_path / "ev" / "per_image.csv")
    assert list(per["image"]) == ["im0006", "im0007"] and int(per["tp"].sum()) == metrics["tp"]
    assert eval_main(["--model", str(out), "--data", str(blob_dataset), "--out", str(tmp_path / "ev")]) == 2


class Interrupt(Exception):
    pass


def test_resume_after_interruption(blob_dataset, tmp_path, capsys):
    from xmdl_tf.train import build_parser, config_from_args, train

    out = tmp_path / "run"
    argv = ["--data", str(blob_dataset), "--out", str(out), *ARGS, "--epochs", "4", "--steps-per-epoch", "3",
            "--patience", "10"]
    cfg = config_from_args(build_parser().parse_args(argv))

    class KillMidEpoch(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if self._epoch == 2 and batch == 1:
                raise Interrupt()

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

    with pytest.raises(Interrupt):
        train([str(blob_dataset)], out, cfg, callbacks=[KillMidEpoch()], verbose=0)
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and not state["finished"]  # epochs 1 and 2 done, the third lost
    weights_before = keras.models.load_model(out / "checkpoint" / state["last"]).get_weights()

    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

        def on_train_begin(self, logs=None):
            # Resumed from the checkpoint, not from scratch.
            np.testing.assert_allclose(self.model.get_weights()[0], weights_before[0])

    train([str(blob_dataset)], out, cfg, callbacks=[Record()], verbose=0)
    assert seen == [2, 3]
    h = pd.read_csv(out / "history.csv")
    assert list(h["epoch"]) == [1, 2, 3, 4]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["finished"]
    # A different configuration in the same folder is refused, nothing is overwritten.
    assert train_main([*argv[:4], *ARGS, "--epochs", "9"]) == 2
    assert "different configuration (differs in train.epochs" in capsys.readouterr().err
    # So is other data with the same settings (a copy elsewhere, fewer slices): once said "already finished".
    import shutil
    other = tmp_path / "copy" / blob_dataset.name
    shutil.copytree(blob_dataset, other)
    for data in (["--data", str(other)], [*argv[:2], "--max-slices", "2"]):
        assert train_main([*data, *argv[2:]]) == 2
        assert "differs in learns_from.data" in capsys.readouterr().err
    assert train_main(argv) == 0 and "already finished" in capsys.readouterr().out


def _floats(model) -> list:
    return [w.astype(np.float64) for w in model.get_weights() if np.issubdtype(w.dtype, np.floating)]


def _ema(avg: list, raws: list, steps: int, decay: float) -> tuple[list, int]:
    """The average `WeightAverage` should hold after the weights `raws` (one list per step)."""
    for raw in raws:
        d = min(decay, (1 + steps) / (10 + steps))
        avg = [d * a + (1 - d) * r for a, r in zip(avg, raw)]
        steps += 1
    return avg, steps


def test_weight_average_is_validated_kept_and_resumed_exactly(blob_dataset, tmp_path):
    """--weight-average: at every epoch's end the model holds the moving average of the weights
    of every step (what validation and the checkpoints see), the next epoch trains on from the
    optimiser's own weights, and a run killed mid-epoch resumes both where the last epoch left them."""
    from xmdl_tf.train import build_parser, config_from_args, train

    out = tmp_path / "run"
    decay = 0.8
    cfg = config_from_args(build_parser().parse_args(
        ["--data", str(blob_dataset), "--out", str(out), *ARGS, "--epochs", "3", "--steps-per-epoch", "3",
         "--patience", "10", "--weight-average", str(decay)]))
    assert cfg.train.weight_average == decay
    log = {"begin": {}, "end": {}, "steps": {}}

    class Record(keras.callbacks.Callback):  # runs after the training's own callbacks
        def __init__(self, kill_at=None):
            super().__init__()
            self.kill_at = kill_at

        def on_train_begin(self, logs=None):
            log.setdefault("initial", _floats(self.model))

        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch
            log["begin"][epoch] = _floats(self.model)
            log["steps"][epoch] = []

        def on_train_batch_begin(self, batch, logs=None):
            if (self._epoch, batch) == self.kill_at:
                raise Interrupt()

        def on_train_batch_end(self, batch, logs=None):
            log["steps"][self._epoch].append(_floats(self.model))

        def on_epoch_end(self, epoch, logs=None):
            log["end"][epoch] = _floats(self.model)

    with pytest.raises(Interrupt):
        train([str(blob_dataset)], out, cfg, callbacks=[Record(kill_at=(2, 1))], verbose=0)
    avg, steps = _ema(log["initial"], log["steps"][0] + log["steps"][1], 0, decay)
    for a, b in zip(log["end"][1], avg):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # The epoch after trains on from the last step's weights, not from the average.
    for a, b in zip(log["begin"][1], log["steps"][0][-1]):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(log["end"][0][0], log["steps"][0][-1][0])
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    for a, b in zip(_floats(keras.models.load_model(out / "checkpoint" / state["last"])), avg):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)  # checkpoints hold the average

    last_raw = log["steps"][1][-1]
    train([str(blob_dataset)], out, cfg, callbacks=[Record()], verbose=0)
    for a, b in zip(log["begin"][2], last_raw):
        np.testing.assert_array_equal(a, b)  # resumed from the training weights, not the average
    avg, steps = _ema(avg, log["steps"][2], steps, decay)
    for a, b in zip(log["end"][2], avg):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    final = json.loads((out / "checkpoint" / "state.json").read_text())
    assert final["finished"] and Config.load(out / "config.json").train.weight_average == decay
    # model.keras is the best epoch's average.
    best = _floats(keras.models.load_model(out / "model.keras", compile=False))
    for a, b in zip(best, log["end"][final["best_epoch"]]):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    assert not (out / "checkpoint" / "average.npz").exists()  # nothing resumes a finished run


def test_errors(blob_dataset, tmp_path, capsys):
    def fails(argv, message):
        assert train_main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err

    fails(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *ARGS], "missing: not found")
    with pytest.raises(SystemExit):  # argparse: usage + one line
        train_main(["--data", str(blob_dataset), "--out", str(tmp_path / "r"), *ARGS[2:], "--tile-size", "30"])
    assert "multiple of 2**(depth-1)" in capsys.readouterr().err
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    fails(["--data", str(blob_dataset), "--out", str(tmp_path / "busy"), *ARGS], "is not a training run")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "r").exists()
    # A constant or NaN slice is refused before the run folder exists (it used to fail inside
    # tf.data after config.json was written, as a traceback or a hang).
    import shutil

    import cv2
    bad = tmp_path / "bad"
    shutil.copytree(blob_dataset, bad)
    cv2.imwrite(str(bad / "val" / "x" / "im0005.png"), np.zeros((128, 128), np.uint8))
    fails(["--data", str(bad), "--out", str(tmp_path / "r"), *ARGS], "im0005.png: constant image")
    shutil.copy(blob_dataset / "val" / "x" / "im0005.png", bad / "val" / "x" / "im0005.png")
    nan = np.random.default_rng(0).random((128, 128)).astype(np.float32)
    nan[5, 5] = np.nan
    (bad / "train" / "x" / "im0001.png").unlink()
    tifffile.imwrite(bad / "train" / "x" / "im0001.tif", nan)
    fails(["--data", str(bad), "--out", str(tmp_path / "r"), *ARGS], "im0001.tif: float image with NaN")
    assert not (tmp_path / "r").exists()
    # --overwrite replaces only a training run: not a folder of other files, not the data it trains on.
    fails(["--data", str(blob_dataset), "--out", str(tmp_path / "busy"), *ARGS, "--overwrite"], "not a training run")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    fails(["--data", str(blob_dataset), "--out", str(blob_dataset.parent), *ARGS, "--overwrite"],
          "would replace the input")
    assert (blob_dataset / "train" / "x" / "im0000.png").is_file()
    # A val split that is there but broken is an error, not a silent fallback to held-back rows.
    broken = tmp_path / "broken"
    shutil.copytree(blob_dataset, broken)
    (broken / "val" / "y" / "seg0005.tif").unlink()
    fails(["--data", str(broken), "--out", str(tmp_path / "r"), *ARGS], "val")
    shutil.rmtree(broken / "val" / "y")
    fails(["--data", str(broken), "--out", str(tmp_path / "r"), *ARGS], "val/y")
    # Sparse labels whose validation rows are all unlabelled: nothing to validate on, refused.
    sparse = tmp_path / "sparse"
    shutil.copytree(blob_dataset, sparse)
    for f in (sparse / "val" / "y").iterdir():
        tifffile.imwrite(f, np.full((128, 128), 255, np.uint8))
    fails(["--data", str(sparse), "--out", str(tmp_path / "r"), *ARGS, "--ignore-value", "255"],
          "holds no labelled pixel")
    # A val split without a single mitochondrion: no epoch could be told from another.
    for f in (sparse / "val" / "y").iterdir():
        tifffile.imwrite(f, np.zeros((128, 128), np.uint8))
    fails(["--data", str(sparse), "--out", str(tmp_path / "r"), *ARGS], "the val split holds no mitochondrion pixel")
    # A pixel size no EM has, in dataset.json (a micrometre value): refused, naming the file.
    shutil.copytree(blob_dataset, tmp_path / "um")
    (tmp_path / "um" / "dataset.json").write_text('{"pixel_size_nm": 0.005}')
    fails(["--data", str(tmp_path / "um"), "--out", str(tmp_path / "r"), *ARGS], "dataset.json: pixel_size_nm 0.005")
    assert not (tmp_path / "r").exists()
    with pytest.raises(DataError):  # --debug: the exception itself, for a traceback
        train_main(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r"), *ARGS, "--debug"])


def test_pixel_sizes_weights_and_resampling_factors_are_resolved_and_recorded(tmp_path):
    from conftest import write_split
    from xmdl_tf.train import choose_model_pixel_size, parse_pixel_sizes, resolve_data

    for name in ("a", "b", "c"):
        write_split(tmp_path / name, "train", 2, size=64)
        write_split(tmp_path / name, "val", 1, size=64, seed=5)
    (tmp_path / "b" / "dataset.json").write_text('{"pixel_size_nm": 10}')  # the file wins over --pixel-size
    dirs = [str(tmp_path / n) for n in ("a", "b", "c")]
    px = parse_pixel_sizes(["unknown", "3", "4.6"], 3)
    assert px == [None, 3.0, 4.6]
    train_sets, val_sets, model_px, info = resolve_data(dirs, pixel_sizes=px, model_pixel_size=5.0, weights=[2, 1, 1])
    assert model_px == 5.0
    assert [s.factor for s in train_sets] == pytest.approx([1.0, 2.0, 0.92])
    assert [s.factor for s in val_sets] == [s.factor for s in train_sets]
    assert [s.weight for s in train_sets] == [0.5, 0.25, 0.25]
    assert [i["pixel_size_nm"] for i in info] == [None, 10.0, 4.6]
    assert [i["sampling_weight"] for i in info] == [0.5, 0.25, 0.25] and info[0]["name"] == "a"
    # Without --model-pixel-size: the median of the known ones; agreeing sets keep their grid.
    assert choose_model_pixel_size([10.0, 4.6]) == 10.0 and choose_model_pixel_size([4.6, 4.65]) == 4.6
    assert choose_model_pixel_size([]) is None
    for bad in (["1", "2"], ["-3"], ["abc"]):
        with pytest.raises(ValueError):
            parse_pixel_sizes(bad, 3)


def test_cli_refuses_bad_pixel_sizes_and_weights_in_one_line(blob_dataset, tmp_path, capsys):
    for extra, msg in ((["--pixel-size", "0"], "outside the plausible range"),
                       (["--set-weights", "1", "2"], "--set-weights"),
                       (["--augment-off", "sparkle"], "invalid choice"),
                       (["--augment-scale", "2", "0.5"], "--augment-scale 2 0.5"),
                       (["--augment-scale", "0.1", "2"], "MIN <= MAX"),
                       (["--augment-scale", "0", "2"], "--augment-scale"),
                       (["--input-blur", "9"], "--input-blur 9: at most 8"),
                       (["--input-blur", "6", "--depth", "2", "--tile-size", "16"], "reaches 18 px"),
                       (["--input-blur", "1", "--init-from", "m.keras"], "architecture comes from the parent"),
                       (["--mixstyle", "0.5", "--init-from", "m.keras"], "--mixstyle with --init-from"),
                       (["--mixstyle", "2"], "--mixstyle"),
                       (["--weight-average", "1"], "--weight-average 1: a decay per step, below 1")):
        with pytest.raises(SystemExit) as err:
            train_main(["--data", str(blob_dataset), "--out", str(tmp_path / "x"), *ARGS, *extra])
        assert err.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing created before the arguments were checked


def test_augment_scale_and_parts_reach_the_config(tmp_path):
    from xmdl_tf.train import build_parser, config_from_args

    args = build_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--augment-scale", "0.7", "1.4", "--augment-off", "elastic"])
    aug = config_from_args(args).augment
    assert aug.scale == (0.7, 1.4) and aug.elastic == 0.0 and aug.blur > 0
    # Switching the zoom off wins over a range, as for any other part.
    args = build_parser().parse_args(["--data", str(tmp_path), "--out", str(tmp_path / "o"),
                                      "--augment-scale", "0.5", "2", "--augment-off", "scale"])
    assert config_from_args(args).augment.scale == (1.0, 1.0)
    assert config_from_args(build_parser().parse_args(["--data", "d", "--out", "o"])).augment.scale == (0.5, 2.0)
    # Sharpening is off in the preset until measured; the flag sets its amount.
    args = build_parser().parse_args(["--data", "d", "--out", "o", "--augment-sharpen", "0.8"])
    assert config_from_args(args).augment.sharpen == 0.8
    assert config_from_args(build_parser().parse_args(["--data", "d", "--out", "o"])).augment.sharpen == 0.0
    args = build_parser().parse_args(["--data", "d", "--out", "o", "--mixstyle", "0.5"])
    assert config_from_args(args).model.mixstyle == 0.5
    # So is the random texture; the flag sets the share of tiles that get one.
    args = build_parser().parse_args(["--data", "d", "--out", "o", "--augment-texture", "0.5"])
    assert config_from_args(args).augment.texture == 0.5
    assert config_from_args(build_parser().parse_args(["--data", "d", "--out", "o"])).augment.texture == 0.0
    # The input low-pass is part of the architecture.
    args = build_parser().parse_args(["--data", "d", "--out", "o", "--input-blur", "1.5"])
    assert config_from_args(args).model.input_blur == 1.5
    assert config_from_args(build_parser().parse_args(["--data", "d", "--out", "o"])).model.input_blur == 0.0


def test_cosine_schedule_and_validation_carved_when_no_val_split(tmp_path):
    """One short run checks both: the cosine learning rate per epoch, and validation rows
    held back from the only training slice of a set without a val split."""
    from conftest import write_split
    from xmdl_tf.config import TrainConfig
    from xmdl_tf.train import lr_at

    cfg = TrainConfig(learning_rate=1e-3, epochs=4, lr_schedule="cosine")
    assert [round(lr_at(e, cfg), 7) for e in range(4)] == [1e-3, 8.536e-4, 5e-4, 1.464e-4]
    assert lr_at(3, TrainConfig(learning_rate=2e-3)) == 2e-3
    write_split(tmp_path / "one", "train", 1, size=96)
    out = tmp_path / "cos"
    assert train_main(["--data", str(tmp_path / "one"), "--out", str(out), *ARGS, "--epochs", "2",
                       "--steps-per-epoch", "2", "--lr-schedule", "cosine", "--lr", "1e-3"]) == 0
    h = pd.read_csv(out / "history.csv")
    assert h["learning_rate"].tolist() == pytest.approx([1e-3, 5e-4])
    cfg = Config.load(out / "config.json")
    assert cfg.train.lr_schedule == "cosine"
    assert "held-back" in cfg.info["data"][0]["validation"]


def test_histogram_equalisation_is_trained_stored_and_kept_on_resume(tmp_path, capsys):
    """--normalization equalize reaches the tiles the network is trained and validated on, is
    stored with the model, and a run cannot be resumed under the other normalisation."""
    from conftest import write_split
    from xmdl_tf.config import DataConfig
    from xmdl_tf.sampling import SliceRegion, TileSampler, TrainingSet, normalize_np, validation_tiles
    from xmdl_tf.io import find_pairs
    from xmdl_tf.io import read_pair

    write_split(tmp_path / "d", "train", 2, size=64)
    write_split(tmp_path / "d", "val", 1, size=64, start=2)
    pair = find_pairs(tmp_path / "d", "val")[0]
    img = read_pair(pair)[0]
    eq = {"method": "equalize"}
    x, _ = validation_tiles(SliceRegion(pair), 64, normalization=eq)
    np.testing.assert_allclose(x[0, ..., 0], normalize_np(img, method="equalize"), atol=1e-6)
    # Training tiles, no augmentation: crops of the equalised slice (values are its mid-ranks).
    sampler = TileSampler([TrainingSet("d", [SliceRegion(pair)])], DataConfig(tile_size=32, augment=False), None,
                          normalization=eq)
    tiles = sampler.group(0)[0]
    assert set(np.unique(tiles)) <= set(np.unique(normalize_np(img, method="equalize")))
    out = tmp_path / "run"
    assert train_main(["--data", str(tmp_path / "d"), "--out", str(out), *ARGS, "--epochs", "1",
                       "--steps-per-epoch", "2", "--normalization", "equalize"]) == 0
    assert Config.load(out / "config.json").normalization["method"] == "equalize"
    assert train_main(["--data", str(tmp_path / "d"), "--out", str(out), *ARGS, "--epochs", "2",
                       "--steps-per-epoch", "2"]) == 2
    assert "different configuration" in capsys.readouterr().err


# ----------------------------------------------------------------------------
# Labels: the unlabelled value from dataset.json, and labels that train silently wrong


def _relabel(folder, fn) -> None:
    for f in sorted(folder.iterdir()):
        tifffile.imwrite(f, fn(tifffile.imread(f)).astype(np.uint8), compression="zlib")


def _checked(data_dirs, ignore_value):
    """Run the pre-training label checks on `data_dirs`; returns the warnings' messages."""
    import warnings

    from xmdl_tf.train import check_training_labels, resolve_data, resolve_ignore_value, with_shapes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = resolve_ignore_value([str(d) for d in data_dirs], ignore_value)
        t, v, _, _ = resolve_data([str(d) for d in data_dirs])
        check_training_labels(with_shapes(t), with_shapes(v), value, verbose=False)
    return value, [str(w.message) for w in caught if issubclass(w.category, UserWarning)]


def test_unlabelled_value_comes_from_dataset_json_and_suspicious_labels_are_warned(blob_dataset, tmp_path, capsys):
    import shutil

    # Sparse labels as napari's corrections write them: 1 mitochondrion, 0 background, 255 unlabelled.
    sparse = tmp_path / "sparse"
    shutil.copytree(blob_dataset, sparse)
    for split in ("train", "val"):
        _relabel(sparse / split / "y", lambda m: np.where(np.arange(m.shape[0])[:, None] % 4 == 0, 255, m))
    # Without a word from dataset.json: one warning naming a file and the flag to give.
    value, said = _checked([sparse], None)
    assert value is None and len(said) == 1, said
    assert "sparse/train/y/seg0000.tif" in said[0] and "0, 1 and 255" in said[0] and "--ignore-value 255" in said[0]

    (sparse / "dataset.json").write_text('{"pixel_size_nm": 4.6, "ignore_value": 255}')
    value, said = _checked([sparse], None)
    assert value == 255 and said == []
    # A given --ignore-value wins over the file, as in evaluate, and says so.
    value, said = _checked([sparse], 7)
    assert value == 7 and len(said) == 1 and "dataset.json marks unlabelled pixels 255; --ignore-value 7" in said[0]
    # Two sets saying different things: training has one value for all, so it asks.
    other = tmp_path / "other"
    shutil.copytree(sparse, other)
    (other / "dataset.json").write_text('{"ignore_value": 254}')
    with pytest.raises(DataError, match="different values .*255.*254.*give --ignore-value"):
        _checked([sparse, other], None)

    # The run learns with, and records, the file's value: the unlabelled rows are not learnt as mitochondria.
    out = tmp_path / "run"
    assert train_main(["--data", str(sparse), "--out", str(out), *ARGS, "--epochs", "1", "--steps-per-epoch", "1"]) == 0
    assert Config.load(out / "config.json").data.ignore_value == 255
    # 0/255 masks whose dataset.json says 255 is unlabelled: refused, saying where the value came from.
    masks = tmp_path / "masks"
    shutil.copytree(blob_dataset, masks)
    for split in ("train", "val"):
        _relabel(masks / split / "y", lambda m: m * 255)
    (masks / "dataset.json").write_text('{"ignore_value": 255}')
    assert train_main(["--data", str(masks), "--out", str(tmp_path / "r2"), *ARGS]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no pixel is a mitochondrion" in err and "dataset.json" in err, err
    assert not (tmp_path / "r2").exists()

    # Inverted masks (mitochondria black on white): a warning naming the set and a file.
    inverted = tmp_path / "inverted"
    shutil.copytree(blob_dataset, inverted)
    _relabel(inverted / "train" / "y", lambda m: 1 - m)
    value, said = _checked([inverted], None)
    assert len(said) == 1 and said[0].startswith("inverted: mitochondria cover") and "may be inverted" in said[0]
    assert "inverted/train/y/seg000" in said[0]
    # Ordinary labels, instance ids and 0/255 masks: nothing to say.
    ids = tmp_path / "ids"
    shutil.copytree(blob_dataset, ids)
    from skimage.measure import label as components

    # Instance ids may hold 1 and 255 too, but then many other ids as well.
    _relabel(ids / "train" / "y", lambda m: np.where(components(m) == components(m).max(), 255, components(m)))
    masks255 = tmp_path / "masks255"
    shutil.copytree(masks, masks255)
    (masks255 / "dataset.json").unlink()
    for data in (blob_dataset, ids, masks255):
        assert _checked([data], None)[1] == [], data


# ----------------------------------------------------------------------------
# Fine-tuning must beat its parent on the same validation data


FT_ARGS = ["--tile-size", "32", "--batch-size", "8", "--tiles-per-slice", "8", "--no-jit"]


def test_finetuning_that_makes_the_model_worse_keeps_the_parent_and_says_so(blob_run, tmp_path, capsys):
    import shutil

    from xmdl_tf.finetune import main as finetune_main
    from xmdl_tf.train import build_parser, config_from_args, train

    blobs, parent = blob_run
    # Inverted training labels, untouched val labels, a huge learning rate: every epoch is worse.
    bad = tmp_path / "bad"
    shutil.copytree(blobs, bad)
    _relabel(bad / "train" / "y", lambda m: 1 - m)
    out = tmp_path / "ft"
    argv = ["--model", str(parent), "--data", str(bad), "--out", str(out), *FT_ARGS, "--epochs", "2",
            "--steps-per-epoch", "4", "--lr", "0.05"]

    # Killed during the first epoch, after the parent was validated: the resume must not validate it again.
    class Kill(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 2:
                raise Interrupt()

    args = build_parser(finetune=True).parse_args(argv)
    with pytest.raises(Interrupt):
        train(args.data, out, config_from_args(args), init_from=str(parent), augment_strength=args.augment_strength,
              callbacks=[Kill()], verbose=0, parent_baseline=True)
    first = capsys.readouterr().out
    assert first.count("parent model: val_loss") == 1
    stored = json.loads((out / "checkpoint" / "state.json").read_text())["parent"]
    assert stored["val_f1"] > 0.9  # the suite's model segments these blobs

    with pytest.warns(UserWarning, match="may be inverted"):
        assert finetune_main(argv) == 0
    said = capsys.readouterr().out
    assert "parent model: val_loss" not in said  # validated once, kept through the kill
    assert (f"no epoch beat the parent model (val_loss {stored['val_loss']:.3f}, F1 {stored['val_f1']:.3f}): "
            "the run keeps the parent's weights") in said
    assert f"parent {stored['val_f1']:.3f} -> best {stored['val_f1']:.3f} (the parent)" in said
    h = pd.read_csv(out / "history.csv")
    assert len(h) == 2 and (h["val_loss"] > stored["val_loss"]).all()  # the epochs were worse
    # The run's model is the parent's weights, and the config says why.
    kept = keras.models.load_model(out / "model.keras", compile=False).get_weights()
    for a, b in zip(kept, keras.models.load_model(parent / "model.keras", compile=False).get_weights()):
        np.testing.assert_array_equal(a, b)
    info = Config.load(out / "config.json").info
    assert info["kept_parent"] and info["best_epoch"] == 0 and info["parent_validation"] == {
        k: stored[k] for k in ("val_loss", "val_f1", "val_iou", "val_precision", "val_recall")}
    assert info["best_validation"] == info["parent_validation"]


def test_finetuning_that_helps_keeps_its_best_epoch(blob_dataset, tmp_path, capsys):
    from xmdl_tf.finetune import main as finetune_main

    # A parent that has barely trained (one step at a tiny learning rate): fine-tuning must beat it.
    parent = tmp_path / "parent"
    assert train_main(["--data", str(blob_dataset), "--out", str(parent), *ARGS, "--epochs", "1",
                       "--steps-per-epoch", "1", "--lr", "1e-6"]) == 0
    out = tmp_path / "ft"
    assert finetune_main(["--model", str(parent), "--data", str(blob_dataset), "--out", str(out), *FT_ARGS,
                          "--epochs", "2", "--steps-per-epoch", "8", "--lr", "3e-3"]) == 0
    said = capsys.readouterr().out
    info = Config.load(out / "config.json").info
    h = pd.read_csv(out / "history.csv")
    best = int(h["val_loss"].idxmin())
    assert not info["kept_parent"] and info["best_epoch"] == best + 1
    assert h["val_loss"][best] < info["parent_validation"]["val_loss"]
    assert info["best_validation"]["val_f1"] == pytest.approx(h["val_f1"][best])
    assert "no epoch beat the parent" not in said
    assert (f"validation F1: parent {info['parent_validation']['val_f1']:.3f} -> best {h['val_f1'][best]:.3f} "
            f"(epoch {best + 1})") in said
    # model.keras is that epoch's weights, not the parent's.
    from xmdl_tf.train import _validation_counts, resolve_data, validation_scores

    cfg = Config.load(out / "config.json")
    _, val_sets, _, _ = resolve_data([str(blob_dataset)])
    model = keras.models.load_model(out / "model.keras", compile=False)
    assert validation_scores(_validation_counts(model, val_sets, cfg.data, 8))["val_loss"] == pytest.approx(
        h["val_loss"][best], abs=2e-3)


def test_a_split_given_as_the_set_is_warned_about(blob_dataset):
    """--data SET/train trains without SET/val and SET/dataset.json: said, naming the set to give."""
    from xmdl_tf.train import resolve_data

    with pytest.warns(UserWarning, match=r"train is the 'train' split of .*: .* give the set folder"):
        train_sets, val_sets, *_ = resolve_data([str(blob_dataset / "train")])
    assert train_sets[0].name == "train"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolve_data([str(blob_dataset)])
