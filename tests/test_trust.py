"""Knowing when not to trust the model: calibrate a trained tiny model, then analyze with it."""
import shutil

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import blob_image
from xmdl_tf.config import Config



def distractor_image(size: int, seed: int):
    """Blob image plus unlabelled fainter discs (look-alikes, as secretory granules are): (image, label)."""
    image, mask = blob_image(size, seed=seed, n=6)
    rng = np.random.default_rng(seed + 1000)
    yy, xx = np.mgrid[:size, :size]
    image = image.astype(np.float32)
    for _ in range(5):
        r = rng.integers(6, 11)
        cy, cx = rng.integers(r, size - r, 2)
        d = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (mask == 0)
        image[d] = 115 + rng.normal(0, 12, d.sum())
    return np.clip(image, 0, 255).astype(np.uint8), mask


@pytest.fixture(scope="module")
def calibrated(blob_run, tmp_path_factory):
    """The suite's tiny model calibrated on val slices that hold unlabelled look-alikes (false detections)."""
    from xmdl_tf.calibrate import main

    data, run = blob_run
    root = tmp_path_factory.mktemp("calibrated")
    model = root / "model"
    shutil.copytree(run, model)
    cal = root / "blobs"
    shutil.copytree(data / "train", cal / "train")
    (cal / "val" / "x").mkdir(parents=True)
    (cal / "val" / "y").mkdir(parents=True)
    for i in range(4):
        image, mask = distractor_image(192, 700 + i)
        tifffile.imwrite(cal / "val" / "x" / f"im{i:04d}.tif", image)
        tifffile.imwrite(cal / "val" / "y" / f"seg{i:04d}.tif", mask)
    assert main(["--model", str(model), "--data", str(cal), "--ood-tile", "32", "--figure",
                 str(root / "reliability.png")]) == 0
    return cal, model


def test_calibration_is_stored_with_the_model(calibrated):
    _, model = calibrated
    cal = Config.load(model / "config.json").calibration
    assert 0.05 < cal["temperature"] < 20 and cal["fitted_on"]["split"] == "val"
    assert cal["nll"]["after"] <= cal["nll"]["before"]  # fitted to minimise it on these pixels
    assert set(cal["ece"]["blobs"]) == {"before", "after"}
    assert cal["objects"] > 3 and cal["object_confidence"]["coef"]
    assert (model / "ood.npz").is_file() and np.isfinite(cal["ood_threshold"])
    figure = model.parent / "reliability.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 10_000


def test_analyze_reports_uncertainty_confidence_and_ood(calibrated, tmp_path, capsys):
    from xmdl_tf.analyze import main

    _, model = calibrated
    inp = tmp_path / "in"
    inp.mkdir()
    clean = blob_image(160, seed=500, n=10)[0]
    tifffile.imwrite(inp / "clean.tif", clean)
    tifffile.imwrite(inp / "inverted.tif", (255 - blob_image(160, seed=501, n=10)[0]).astype(np.uint8))
    out = tmp_path / "out"
    assert main([str(inp), "--model", str(model), "--out", str(out), "--tile", "64", "--overlap", "16"]) == 0
    summary = pd.read_csv(out / "summary.csv").set_index("image")
    objects = pd.read_csv(out / "objects.csv")
    assert {"confidence", "needs_review"} <= set(objects.columns)
    assert objects["confidence"].between(0, 1).all()
    assert (objects["needs_review"] == (objects["confidence"] < 0.5)).all()
    for name in ("clean", "inverted"):
        n_review = int(objects[(objects["image"] == name)]["needs_review"].sum())
        assert summary.loc[name, "n_needs_review"] == n_review
        u = tifffile.imread(out / name / "uncertainty.tif")
        assert u.dtype == np.float32 and u.shape == (160, 160) and 0 <= u.min() and u.max() <= 1
    assert summary.loc["inverted", "ood_score"] > summary.loc["clean", "ood_score"]
    assert bool(summary.loc["inverted", "ood_warning"]) and not bool(summary.loc["clean", "ood_warning"])
    err = capsys.readouterr().err
    assert "inverted is unlike the model's training data" in err and "xmdl_tf.adapt" in err


def test_confidence_is_lower_on_a_deliberately_corrupted_region(calibrated):
    from xmdl_tf.analyze import Settings, analyze_image
    from xmdl_tf.predict import load_model

    _, model = calibrated
    pred = load_model(model, jit_compile=False)
    image = blob_image(256, seed=600, n=30)[0].astype(np.float32)
    rng = np.random.default_rng(0)
    image[:, 128:] = image[:, 128:] * 0.6 + 68 + rng.normal(0, 20, (256, 128))  # lower contrast, more noise
    a = analyze_image(pred, np.clip(image, 0, 255).astype(np.uint8), "half", Settings(inference={"tile": 64, "overlap": 16}))
    t = a.table
    clean, corrupted = t[t["centroid_x_px"] < 120], t[t["centroid_x_px"] > 136]
    assert len(clean) >= 3 and len(corrupted) >= 1
    assert corrupted["confidence"].mean() < clean["confidence"].mean()
    assert a.uncertainty[:, 140:].mean() > a.uncertainty[:, :116].mean()


def test_tta_spread_is_the_standard_deviation_of_the_eight_predictions(blob_run):
    from xmdl_tf.predict import load_model
    from xmdl_tf.sampling import normalize_as

    _, run = blob_run
    pred = load_model(run, jit_compile=False)
    image = blob_image(64, seed=610, n=4)[0]
    p, sd = pred.predict_slice(image, tile=64, overlap=16, tta=True, spread=True)
    np.testing.assert_allclose(p, pred.predict_slice(image, tile=64, overlap=16, tta=True), atol=1e-5)
    x = normalize_as(image, pred.config.normalization)[None, :, :, None]
    members = []  # by hand: each flip / rotation predicted and turned back
    for flip in (False, True):
        xf = x[:, :, ::-1] if flip else x
        for k in range(4):
            y = np.rot90(pred.predict_batch(np.ascontiguousarray(np.rot90(xf, k, axes=(1, 2))), tta=False)[..., 1],
                         -k, axes=(1, 2))
            members.append(y[:, :, ::-1] if flip else y)
    np.testing.assert_allclose(sd, np.std(members, axis=0)[0], atol=2e-3)
    assert sd.max() > 0.01  # the tiny model is not rotation-invariant
    assert not pred.predict_slice(image, tile=64, overlap=16, tta=False, spread=True)[1].any()


def test_tta_members_are_the_eight_predictions_behind_the_mean_and_spread(blob_run):
    from xmdl_tf.predict import load_model

    _, run = blob_run
    pred = load_model(run, jit_compile=False)
    image = blob_image(96, seed=611, n=5)[0]
    p, sd = pred.predict_slice(image, tile=64, overlap=16, tta=True, spread=True)
    p2, sd2, members = pred.predict_slice(image, tile=64, overlap=16, tta=True, spread=True, members=True)
    assert members.shape == (96, 96, 8) and members.dtype == np.float32
    np.testing.assert_allclose(p2, p, atol=1e-5)
    np.testing.assert_allclose(sd2, members.std(-1), atol=1e-6)
    # The moments path blends E[p] and E[p^2] across tiles, so where tiles overlap it also counts the
    # tiles' disagreement; elsewhere both spreads are the same.
    assert np.mean(np.abs(sd2 - sd) < 2e-3) > 0.99
    np.testing.assert_allclose(members.mean(-1), p, atol=1e-5)
    assert np.ptp(members, axis=-1).max() > 0.02  # the members differ (the tiny model is not invariant)
    # zoom: predicted on a grid 20% coarser, returned on the slice's own
    z = pred.predict_slice(image, tile=64, overlap=16, tta=False, zoom=0.8)
    assert z.shape == (96, 96) and 0.005 < np.abs(z - pred.predict_slice(image, tile=64, overlap=16)).mean() < 0.2
    q, one = pred.predict_slice(image, tile=64, overlap=16, tta=False, members=True)
    assert one.shape == (96, 96, 1)
    np.testing.assert_allclose(q, pred.predict_slice(image, tile=64, overlap=16, tta=False), atol=1e-6)


def test_analyze_fills_confidence_from_agreement_features(calibrated, tmp_path):
    """A model whose confidence reads the agreement features: analyze computes them (with TTA, from
    the members; without TTA it falls back to the fit without them)."""
    import dataclasses

    from xmdl_tf.analyze import Settings, analyze_image
    from xmdl_tf.calibrate import collect_val, object_table
    from xmdl_tf.confidence import ALL_FEATURES, ObjectConfidence
    from xmdl_tf.predict import load_model

    data, model = calibrated
    pred = load_model(model, jit_compile=False)
    pred.config = dataclasses.replace(pred.config, inference=dataclasses.replace(
        pred.config.inference, tta=True, tile=64, overlap=16))
    rows = collect_val(pred, [str(data)], [None], verbose=False)["blobs"]
    alt = rows[0]["alternatives"]
    assert (len(alt["threshold"]), len(alt["tta"]), len(alt["scale"])) == (2, 8, 2)
    cal = pred.config.calibration
    x, y = object_table(rows, cal["temperature"], ALL_FEATURES)
    names = ("mean_probability", "threshold_agreement", "scale_agreement", "tta_agreement")
    cols = x[:, [ALL_FEATURES.index(n) for n in names]]
    assert (cols[:, 1:] <= 1).all() and (cols[:, 1:].mean(0) > 0.3).all()
    conf = ObjectConfidence(names).fit(cols, y)
    pred.config = dataclasses.replace(pred.config, calibration={
        **cal, "object_confidence": conf.to_dict(),
        "object_confidence_without_tta": ObjectConfidence(names[:3]).fit(cols[:, :3], y).to_dict()})
    image = rows[0]["image"]
    for tta in (True, False):
        a = analyze_image(pred, image, "val0", Settings(inference={"tile": 64, "overlap": 16, "tta": tta}))
        assert len(a.table) and a.table["confidence"].between(0, 1).all()
    # With TTA, the table's confidence is the fitted model on the same slice's features.
    a = analyze_image(pred, image, "val0", Settings(inference={"tile": 64, "overlap": 16, "tta": True}))
    n0 = int(rows[0]["instances"].max())
    np.testing.assert_allclose(np.sort(a.table["confidence"]), np.sort(conf.predict(cols[:n0])), atol=2e-3)


def test_an_adapted_model_keeps_its_parents_object_confidence_but_not_its_ood_model(calibrated, tmp_path):
    """`adapt` passes the parent's temperature and object confidence on (measured to rank the adapted
    model's objects on unseen microscopes as a refit does), so `analyze` with the adapted model fills
    `confidence`; the OOD model described the parent's features, and stays behind."""
    from xmdl_tf.adapt import inherited_calibration, main as adapt_main
    from xmdl_tf.analyze import main as analyze_main

    data, parent = calibrated
    out = tmp_path / "adapted"
    assert adapt_main([str(data / "val" / "x"), "--out", str(out), "--model", str(parent), "--slices", "2",
                       "--rounds", "1", "--epochs", "1", "--steps-per-epoch", "2", "--tile-size", "32"]) == 0
    before = Config.load(parent / "config.json").calibration
    after = Config.load(out / "model" / "config.json").calibration
    assert after["inherited_from"] == str((parent / "model.keras").resolve())
    assert after["temperature"] == before["temperature"] and after["object_confidence"] == before["object_confidence"]
    assert after["ood_file"] is None and not (out / "model" / "ood.npz").exists()
    res = tmp_path / "res"
    assert analyze_main([str(data / "val" / "x" / "im0000.tif"), "--model", str(out / "model"), "--out", str(res),
                         "--tile", "64", "--overlap", "16"]) == 0
    objects = pd.read_csv(res / "objects.csv")
    assert len(objects) and objects["confidence"].between(0, 1).all()
    assert pd.read_csv(res / "summary.csv")["ood_warning"].isna().all()  # not checked: neither warned nor fine
    # A calibrated model whose ood.npz is gone: said, not silently unchecked.
    import shutil

    lost = tmp_path / "lost"
    shutil.copytree(parent, lost)
    (lost / "ood.npz").unlink()
    with pytest.warns(UserWarning, match="names the out-of-distribution model ood.npz, which is not beside"):
        assert analyze_main([str(data / "val" / "x" / "im0000.tif"), "--model", str(lost), "--out",
                             str(tmp_path / "res2"), "--tile", "64", "--overlap", "16"]) == 0
    # Nothing to pass on: a parent without object confidence gives an uncalibrated child.
    assert inherited_calibration({}, "p") == {} and inherited_calibration({"temperature": 2.0}, "p") == {}


def test_zoom_search_ood_searches_only_the_slices_the_ood_score_warns_about(calibrated, tmp_path, capsys):
    from dataclasses import replace

    from xmdl_tf.autoscale import SEARCH_ZOOMS, prediction_grid, unlike_training
    from xmdl_tf.predict import load_model

    _, model = calibrated
    pred = load_model(model, jit_compile=False)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0))
    ic = replace(pred.config.inference, zoom_search="ood", tile=64, overlap=16)
    clean = blob_image(160, seed=500, n=10)[0]
    inverted = 255 - clean
    assert not unlike_training(pred, clean, None) and unlike_training(pred, inverted, None)
    assert prediction_grid(pred, clean, ic, None) == (None, None)  # like its training data: left alone
    grid, est = prediction_grid(pred, inverted, ic, None)
    assert est is not None and est.zoom in SEARCH_ZOOMS and est.reason.startswith(("surest", "nothing"))
    # analyze (the default mode): the warned slice is searched and the warning says at which zoom.
    from xmdl_tf.analyze import Settings, analyze

    for name, im in (("clean", clean), ("inverted", inverted)):
        tifffile.imwrite(tmp_path / f"{name}.tif", im)
    pred.config = replace(pred.config, inference=replace(ic, zoom_search="ood"))
    analyze([str(tmp_path / "clean.tif"), str(tmp_path / "inverted.tif")], pred, tmp_path / "out",
            settings=Settings(figure=False))
    summary = pd.read_csv(tmp_path / "out" / "summary.csv").set_index("image")
    assert bool(summary.loc["inverted", "ood_warning"]) and not bool(summary.loc["clean", "ood_warning"])
    assert summary.loc["inverted", "auto_zoom"] == pytest.approx(est.zoom)
    err = capsys.readouterr().err
    assert f"predicted at the zoom the model is surest at, x{est.zoom:.3g}" in err


def test_collect_val_on_analyzes_grid_gives_analyzes_objects(calibrated, tmp_path):
    """The trust study's rows with `grid=True` are what `analyze` makes of the slice with zoom
    search: same zoom, same probabilities, same objects; without it, the pixel size's grid (x1)."""
    from dataclasses import replace

    from xmdl_tf.analyze import Settings, analyze_image
    from xmdl_tf.calibrate import collect_val
    from xmdl_tf.predict import load_model

    _, model = calibrated
    pred = load_model(model, jit_compile=False)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0),
                          inference=replace(pred.config.inference, zoom_search="ood", tile=64, overlap=16, tta=False))
    image, mask = blob_image(160, seed=501, n=10)
    inverted = 255 - image  # warned by the OOD score, so searched
    for sub in ("x", "y"):
        (tmp_path / "inv" / "val" / sub).mkdir(parents=True)
    tifffile.imwrite(tmp_path / "inv" / "val" / "x" / "im0000.tif", inverted)
    tifffile.imwrite(tmp_path / "inv" / "val" / "y" / "seg0000.tif", mask)
    row = collect_val(pred, [str(tmp_path / "inv")], [None], verbose=False, agreement=(), grid=True)["inv"][0]
    a = analyze_image(pred, inverted, "inv", Settings(figure=False), label=mask)
    assert a.summary["auto_zoom"] not in (None, 1.0) and row["zoom"] == pytest.approx(a.summary["auto_zoom"])
    np.testing.assert_allclose(row["probability"], a.probability, atol=1e-5)
    np.testing.assert_array_equal(row["instances"], a.instances)
    plain = collect_val(pred, [str(tmp_path / "inv")], [None], verbose=False, agreement=())["inv"][0]
    assert plain["zoom"] == 1.0
    assert not np.allclose(plain["probability"], row["probability"], atol=1e-3)


def test_adapts_teacher_labels_a_warned_slice_at_the_zoom_analyze_would_search(calibrated, tmp_path):
    """`adapt --zoom-search ood`: the teacher predicts the slice its OOD score warns about at the
    zoom analyze would choose, and the one like its training data at the pixel size's grid; the
    labels stay on each slice's own grid and the zooms are recorded. "off" predicts every slice
    on the pixel size's grid, as before."""
    import json
    from dataclasses import replace

    from xmdl_tf.adapt import label_shares, pseudo_label, write_pseudo_set
    from xmdl_tf.analyze import expand_inputs
    from xmdl_tf.autoscale import prediction_grid
    from xmdl_tf.predict import load_model

    _, model = calibrated
    pred = load_model(model, jit_compile=False)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0))
    clean = blob_image(160, seed=500, n=10)[0]
    images = {"clean": clean, "inverted": 255 - clean}
    for name, im in images.items():
        tifffile.imwrite(tmp_path / f"{name}.tif", im)
    pairs, failed = expand_inputs([str(tmp_path / "clean.tif"), str(tmp_path / "inverted.tif")])
    assert not failed and len(pairs) == 2
    _, est = prediction_grid(pred, images["inverted"], replace(pred.config.inference, zoom_search="ood"), None)
    assert est is not None and est.zoom != 1  # the warned slice is searched, and moved
    for mode, zooms in (("ood", {"clean": 1.0, "inverted": est.zoom}), ("off", {"clean": 1.0, "inverted": 1.0})):
        out = tmp_path / mode
        shares = write_pseudo_set(pred, pairs, out, zoom_search=mode)
        assert json.loads((out / "zooms.json").read_text()) == zooms and shares == label_shares(out)
        assert shares["zooms"] == zooms
        for name, im in images.items():
            grid = None if zooms[name] == 1 else 5.0 * zooms[name]  # the model's 5 nm times the zoom
            want = pseudo_label(pred.predict_slice(im, tta=True, pixel_size_nm=grid), 0.1, 0.9, 100)
            got = tifffile.imread(out / "train" / "y" / f"{name}.tif")
            assert got.shape == im.shape and np.array_equal(got, want)


def test_a_damaged_stored_calibration_is_one_line_naming_the_file_before_any_image(calibrated, tmp_path, capsys):
    """A hand-edited config.json (a negative temperature would swap foreground and background; a
    confidence model with a missing value) or a cut-off ood.npz is one line naming the file (and
    key), before any image."""
    import json

    from xmdl_tf.analyze import main

    _, model = calibrated
    image = tmp_path / "a.tif"
    tifffile.imwrite(image, blob_image(96, seed=7, n=5)[0])
    for key, value, says in (("temperature", -2.0, "['calibration']['temperature']: "),
                             ("object_confidence", {"features": ["mean_prob"], "mean": [0.5]},
                              "['calibration']['object_confidence']: missing or damaged value")):
        bad = tmp_path / f"bad_{key}"
        shutil.copytree(model, bad)
        cfg = json.loads((bad / "config.json").read_text())
        cfg["calibration"][key] = value
        (bad / "config.json").write_text(json.dumps(cfg))
        assert main([str(image), "--model", str(bad), "--out", str(tmp_path / f"o_{key}"), "--tile", "64",
                     "--no-tta"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{bad / 'config.json'}{says}" in err[0], err
        assert not (tmp_path / f"o_{key}").exists()
    bad = tmp_path / "bad_ood"  # an interrupted calibrate: ood.npz cut short
    shutil.copytree(model, bad)
    (bad / "ood.npz").write_bytes((bad / "ood.npz").read_bytes()[:100])
    assert main([str(image), "--model", str(bad), "--out", str(tmp_path / "o_ood"), "--tile", "64", "--no-tta"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{bad / 'ood.npz'}: cannot read this out-of-distribution model" in err[0], err
    assert "run calibrate again" in err[0] and not (tmp_path / "o_ood").exists()


def test_recalibrating_with_too_few_detections_keeps_the_object_confidence(calibrated, tmp_path, monkeypatch,
                                                                          capsys):
    """Too few true or false detections to refit: the object confidence config.json had stays (said),
    rather than objects silently losing confidence and needs_review."""
    import xmdl_tf.calibrate as cal
    from xmdl_tf.config import Config

    data, model = calibrated
    again = tmp_path / "model"
    shutil.copytree(model, again)
    before = Config.load(again / "config.json").calibration["object_confidence"]
    monkeypatch.setattr(cal, "MIN_EACH", 10**6)
    assert cal.main(["--model", str(again), "--data", str(data), "--ood-tile", "32"]) == 0
    out, err = capsys.readouterr()
    assert "the object confidence config.json had is kept" in err and "the earlier one is kept" in out
    after = Config.load(again / "config.json").calibration
    assert after["object_confidence"] == before and after["object_confidence_kept"]
