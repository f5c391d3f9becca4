"""Grad-CAM and the unified analysis pipeline, with a tiny model trained briefly on synthetic blobs."""

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from xmdl_tf.analyze import OUTPUT_FILES, main as analyze_main
from xmdl_tf.gradcam import GradCamError, energy_inside
from xmdl_tf.predict import load_model

from conftest import blob_image



@pytest.fixture
def tiny_run(blob_run):
    return blob_run[1]


def test_gradcam_shape_range_and_focus(tiny_run):
    pred = load_model(tiny_run, jit_compile=False)
    img, msk = blob_image(160, seed=7, n=8)
    prob, cam = pred.explain_slice(img, tile=64, overlap=16)
    assert prob.shape == cam.shape == img.shape and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(prob, pred.predict_slice(img, tile=64, overlap=16), atol=1e-5)
    mask = prob >= 0.5
    inside = energy_inside(cam, mask)
    rng = np.random.default_rng(0)
    random_mask = np.zeros(mask.size, bool)
    random_mask[rng.choice(mask.size, mask.sum(), replace=False)] = True
    assert inside > energy_inside(cam, random_mask.reshape(mask.shape)) + 0.2
    # Explaining one region concentrates the map there; the bottleneck layer can be chosen by name.
    _, cam_region = pred.explain_slice(img, region=msk.astype(bool) & (np.arange(160)[None, :] < 80), tile=64,
                                       overlap=16)
    assert cam_region[:, :80].sum() > cam_region[:, 80:].sum()
    _, cam_b = pred.explain_slice(img, layer="bottleneck_conv2", tile=64, overlap=16)
    assert cam_b.shape == img.shape and 0 <= cam_b.min() and cam_b.max() <= 1
    with pytest.raises(GradCamError, match="not in the model.*dec1_conv2"):
        pred.explain_slice(img, layer="no_such_layer")


def test_analyze_cli_end_to_end(tiny_run, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(2):
        img, msk = blob_image(128, seed=20 + i)
        cv2.imwrite(str(inp / f"slice{i}.png"), img)
        tifffile.imwrite(labels / f"slice{i}.tif", msk)
    stack = np.stack([blob_image(96, seed=30 + z)[0] for z in range(2)])
    # An ImageJ stack with a 5 nm pixel size in its metadata.
    tifffile.imwrite(inp / "stack.tif", stack, imagej=True, resolution=(200.0, 200.0), metadata={"unit": "um"})
    tifffile.imwrite(labels / "stack.tif", np.stack([blob_image(96, seed=30 + z)[1] for z in range(2)]))
    (inp / "broken.png").write_bytes(b"not a png")
    tifffile.imwrite(labels / "broken.tif", np.zeros((8, 8), np.uint8))
    out = tmp_path / "out"
    rc = analyze_main([str(inp), "--model", str(tiny_run), "--labels", str(labels), "--out", str(out),
                       "--tile", "64", "--overlap", "16", "--faithfulness"])
    assert rc == 1  # broken.png failed, the others were analysed
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["image"]) == ["slice0", "slice1", "stack_z0000", "stack_z0001"]
    objects = pd.read_csv(out / "objects.csv")
    for name in summary["image"]:
        for f in OUTPUT_FILES:
            assert (out / name / f).is_file(), (name, f)
        inst = tifffile.imread(out / name / "instances.tif")
        mask = tifffile.imread(out / name / "mask.tif")
        heat = tifffile.imread(out / name / "gradcam.tif")
        prob = tifffile.imread(out / name / "probability.tif")
        assert inst.dtype in (np.uint16, np.uint32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert heat.dtype == prob.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
        rows = objects[objects["image"] == name]
        count = int(summary.loc[summary["image"] == name, "count"].iloc[0])
        assert count == len(rows) == len(np.unique(inst)) - 1
        assert set(rows["shape_class"]) <= {"round", "elongated", "tubular", "fragmented", "irregular"}
        assert len(pd.read_csv(out / name / "morphometry.csv")) == count
    s0 = summary.set_index("image").loc["slice0"]
    assert 0.7 < s0["f1"] <= 1 and s0["gt_count"] >= 1 and np.isfinite(s0["deletion_ratio"])
    assert np.isnan(s0["pixel_size_nm"])  # PNG without --pixel-size: pixels only
    z0 = summary.set_index("image").loc["stack_z0000"]
    assert z0["pixel_size_nm"] == pytest.approx(5.0)
    zrows = objects[objects["image"] == "stack_z0000"]
    np.testing.assert_allclose(zrows["area_nm2"], zrows["area_px2"] * 25.0)
    # Nothing is overwritten without --overwrite.
    before = (out / "summary.csv").read_bytes()
    assert analyze_main([str(inp / "slice0.png"), "--model", str(tiny_run), "--out", str(out)]) == 2
    assert (out / "summary.csv").read_bytes() == before
    assert analyze_main([str(inp / "slice0.png"), "--model", str(tiny_run), "--out", str(out), "--overwrite",
                         "--tile", "64", "--no-figure", "--rule", "round_max_aspect=2.0"]) == 0


def test_analyze_errors(tiny_run, tmp_path, monkeypatch, capsys):
    import xmdl_tf.analyze as an

    img, _ = blob_image(64)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    monkeypatch.setattr(an, "default_model_path", lambda: None)
    assert analyze_main([str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "no default model is installed" in capsys.readouterr().err
    assert analyze_main([str(tmp_path / "missing.png"), "--model", str(tiny_run), "--out", str(tmp_path / "o2")]) == 1
    assert "missing.png" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        analyze_main([str(tmp_path / "a.png"), "--model", str(tiny_run), "--rule", "bogus=1"])
    # An array handed over directly (napari, the Python API): a constant one is refused as a file is,
    # not segmented into one image-sized "mitochondrion".
    from xmdl_tf.io import DataError
    from xmdl_tf.volume import analyze_volume

    predictor = load_model(tiny_run)
    with pytest.raises(DataError, match="blank: constant image"):
        an.analyze_image(predictor, np.zeros((64, 64), np.uint16), "blank")
    with pytest.raises(DataError, match="blank: constant volume"):
        analyze_volume(predictor, np.full((3, 64, 64), 9, np.uint8), "blank")


def test_analyze_real_slice(tiny_run, shared_data, tmp_path):
    x = shared_data / "drosophila_vnc_sstem" / "test" / "x" / "im0015.png"
    y = shared_data / "drosophila_vnc_sstem" / "test" / "y" / "seg0015.tif"
    out = tmp_path / "real"
    assert analyze_main([str(x), "--labels", str(y), "--model", str(tiny_run), "--pixel-size", "4.6",
                         "--out", str(out)]) == 0
    s = pd.read_csv(out / "summary.csv").iloc[0]
    assert s["pixel_size_nm"] == 4.6 and s["gt_count"] > 5
    assert (out / "im0015" / "figure.png").stat().st_size > 10_000


def test_analyze_says_once_when_it_assumes_the_models_pixel_size(tiny_run, tmp_path, capsys):
    """Images without a pixel size, for a model that has one: one note per run, naming the first
    such image; none once --pixel-size is given."""
    from dataclasses import replace

    from xmdl_tf.analyze import Settings, analyze
    from xmdl_tf.predict import load_model

    for i in range(2):
        cv2.imwrite(str(tmp_path / f"s{i}.png"), blob_image(64, seed=40 + i)[0])
    pred = load_model(tiny_run)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0))
    inputs = [str(tmp_path / "s0.png"), str(tmp_path / "s1.png")]
    fast = {"tile": 64, "overlap": 16}
    res = analyze(inputs, pred, tmp_path / "o1", settings=Settings(inference=fast, figure=False))
    assert len(res["analysed"]) == 2
    err = capsys.readouterr().err
    assert err.count("states no pixel size") == 1 and "s0.png states no pixel size" in err and "5 nm" in err
    analyze(inputs, pred, tmp_path / "o2", settings=Settings(inference=fast, figure=False, pixel_size_nm=5.0))
    assert "states no pixel size" not in capsys.readouterr().err


def test_a_users_folder_named_like_a_result_is_never_replaced_and_a_killed_swap_keeps_the_old_result(
        tiny_run, tmp_path, capsys):
    # data/a.png analysed into data/: data/a/ is the user's own folder. --resume and --overwrite
    # replace OUT/<name> whole; they would have deleted it.
    img, _ = blob_image(64)
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    cv2.imwrite(str(data / "a.png"), img)
    (data / "a" / "notes.txt").write_text("mine")
    base = [str(data / "a.png"), "--model", str(tiny_run), "--no-figure", "--no-tta"]
    for flags in ([], ["--resume"], ["--overwrite"]):
        assert analyze_main(base + ["--out", str(data)] + flags) == 2
        err = capsys.readouterr().err
        assert "data/a: exists and is not a result of analyze (holds notes.txt)" in err and "Traceback" not in err
    assert sorted(p.name for p in data.iterdir()) == ["a", "a.png"] and (data / "a" / "notes.txt").is_file()
    # A kill between the two renames of the result swap leaves the old result aside only: the next
    # run puts it back (and --resume skips the image) instead of deleting it.
    out = tmp_path / "out"
    assert analyze_main(base + ["--out", str(out)]) == 0
    before = (out / "a" / "morphometry.csv").read_bytes()
    (out / "a").rename(out / ".a.replaced")
    assert analyze_main(base + ["--out", str(out), "--resume"]) == 0
    assert "1 image(s) already done" in capsys.readouterr().out
    assert (out / "a" / "morphometry.csv").read_bytes() == before and not (out / ".a.replaced").exists()
    (out / "a" / ".DS_Store").write_bytes(b"")  # what a file browser adds is no reason to keep the folder
    assert analyze_main(base + ["--out", str(out), "--overwrite"]) == 0
