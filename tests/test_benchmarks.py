"""The benchmark scripts' own logic (no training): tables built from their result files."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loso_table_marks_zero_shot_on_the_diagonal_and_averages_it():
    loso = _load("loso")
    names = ["a", "b", "c"]
    cells = {l: {s: {"val": {"f1": 0.9 if l != s else 0.5 + 0.1 * i}} for s in names} for i, l in enumerate(names)}
    del cells["c"]["a"]["val"]  # a missing score is shown as '-'
    md = loso.table_md(cells, names, "val")
    lines = md.splitlines()
    assert lines[2] == "| a | **0.500** | 0.900 | 0.900 |"
    assert lines[4] == "| c | - | 0.900 | **0.700** |"
    assert "mean zero-shot f1 (val): 0.600 over 3 sets" in md
    assert "over 0 sets" not in loso.table_md({}, names, "test") and "mean" not in loso.table_md({}, names, "test")


def test_loso_arms_summarises_zero_shot_held_out_instance_and_seen_cells(tmp_path, capsys):
    arms = _load("loso_arms")
    names = ["a", "b", "c"]
    cells = {}
    for i, l in enumerate(names):
        for s in names:
            v = {"f1": 0.5 + 0.1 * i if l == s else 0.8 + 0.05 * i, "instance_f1_iou50": 0.3 + 0.1 * i}
            cells.setdefault(l, {})[s] = {"val": v, "held_out": {"f1": v["f1"] - 0.1}}
    r = arms.arm_row(cells, names)
    assert r["zero_shot"] == pytest.approx([0.5, 0.6, 0.7]) and r["mean"] == pytest.approx(0.6)
    assert r["held_out_mean"] == pytest.approx(0.5) and r["instance_mean"] == pytest.approx(0.4)
    assert r["in_distribution_mean"] == pytest.approx((0.8 * 2 + 0.85 * 2 + 0.9 * 2) / 6)
    del cells["b"]["b"]["val"]  # an unfinished left-out model: no mean over the other two
    assert arms.arm_row(cells, names)["mean"] is None
    import json
    (tmp_path / "arm1").mkdir()
    (tmp_path / "arm1" / "loso.json").write_text(json.dumps({"sets": names, "cells": cells}))
    assert arms.main([str(tmp_path / "arm1"), str(tmp_path / "missing")]) == 0
    out, err = capsys.readouterr()
    assert "| arm1 | - | 0.500 | - | 0.700 | **-** |" in out and "missing" in err and "loso.json" in err
    assert arms.main([str(tmp_path / "missing")]) == 1
    runs = {"a": {"augment": {"scale": [0.5, 2.0]}, "train": {"loss": "dice"}, "model": {"base_filters": 16},
                  "tiles_seen": 4800}}
    assert arms.recipe(runs) == "zoom x0.5-2, dice, f16, 4800 tiles" and arms.recipe({}) == "-"
    runs["a"]["model"]["input_blur"] = 2.0
    assert arms.recipe(runs) == "zoom x0.5-2, dice, f16, input blur 2, 4800 tiles"
    runs["a"]["augment"]["strength"] = 1.5
    assert arms.recipe(runs) == "zoom x0.5-2, intensity x1.5, dice, f16, input blur 2, 4800 tiles"
    runs["a"]["model"].update(input_blur=0, dropout=0.2)
    assert arms.recipe(runs) == "zoom x0.5-2, intensity x1.5, dice, f16, dropout 0.2, 4800 tiles"
    runs["a"].update(train={"loss": "dice", "lr_schedule": "cosine"}, tiles_seen=14400)
    assert arms.recipe(runs) == "zoom x0.5-2, intensity x1.5, dice, f16, dropout 0.2, 14400 tiles, cosine learning rate"
    runs["a"]["normalization"] = {"method": "equalize"}
    assert arms.recipe(runs) == ("zoom x0.5-2, intensity x1.5, dice, f16, dropout 0.2, equalize normalisation, "
                                 "14400 tiles, cosine learning rate")
    runs["a"].update(augment={"scale": [0.5, 2.0], "texture": 0.5, "sharpen": 0.0}, normalization={},
                     model={"base_filters": 8, "mixstyle": 0.5}, train={"loss": "dice"}, tiles_seen=4800)
    assert arms.recipe(runs) == "zoom x0.5-2, texture 0.5, dice, f8, mixstyle 0.5, 4800 tiles"
    runs["a"]["train"]["weight_average"] = 0.995
    assert arms.recipe(runs) == "zoom x0.5-2, texture 0.5, dice, f8, mixstyle 0.5, 4800 tiles, weight average 0.995"


def test_trust_features_fits_on_other_sets_zero_shot_errors_without_the_scored_set(tmp_path):
    """A cue that matters only under domain shift is learnt from the other folds' zero-shot
    detections, and the scored set's own zero-shot detections never enter its fit."""
    import numpy as np

    tf_ = _load("trust_features")
    from xmdl_tf.confidence import ALL_FEATURES

    rng = np.random.default_rng(0)
    i_prob, i_edge, i_cam = (ALL_FEATURES.index(f) for f in ("mean_probability", "edge_contrast", "mean_gradcam"))

    def part(n, cue):  # y follows feature `cue`; every other feature is noise
        y = rng.random(n) < 0.5
        x = rng.normal(size=(n, len(ALL_FEATURES)))
        x[:, cue] += 2.5 * np.where(y, 1, -1)
        return x, y

    tables = {"features": np.array(ALL_FEATURES), "slice_columns": np.array(["mean_entropy"])}
    for fold in ("a", "b", "c"):
        # seen data: the probability tells; an unseen microscope: only the edge contrast does
        # (for a, the Grad-CAM heat: had a's own zero-shot detections entered its fit, it would score high)
        for p, cue in (("fit", i_prob), ("in_distribution", i_prob), ("zero_shot", i_cam if fold == "a" else i_edge)):
            x, y = part(300, cue)
            tables.update({f"{fold}/{p}/x": x, f"{fold}/{p}/y": y, f"{fold}/{p}/n_true": np.array(int(y.sum())),
                           f"{fold}/{p}/slices": rng.normal(size=(4, 1))})
    np.savez(tmp_path / "t.npz", **tables)
    out = tf_.study(np.load(tmp_path / "t.npz"))
    name = "probability_gradcam"
    for fold in ("a", "b", "c"):
        plain, shifted = out[fold]["candidate"][name], out[fold]["candidate"][name + tf_.SHIFTED]
        assert plain["fit"] > 0.9 and plain["zero_shot"] < 0.75  # the seen-data cue is noise here
        if fold == "a":  # learnt from b and c (edge contrast), never from a's own detections
            assert shifted["zero_shot"] < 0.75
        else:
            assert shifted["zero_shot"] > 0.9 and shifted["in_distribution"] > 0.9


def test_trust_features_reads_tables_without_the_newer_features(tmp_path):
    """Tables of an older trust.py (no agreement features): the candidates needing them are left
    out, the rest is studied; with them, the agreement candidates and selection rows appear."""
    import numpy as np

    tf_ = _load("trust_features")
    from xmdl_tf.confidence import ALL_FEATURES

    rng = np.random.default_rng(1)

    def tables(names):
        t = {"features": np.array(names), "slice_columns": np.array(["mean_entropy"])}
        for fold in ("a", "b"):
            for p in ("fit", "in_distribution", "zero_shot"):
                y = rng.random(120) < 0.5
                x = rng.normal(size=(120, len(names))) + y[:, None]
                t.update({f"{fold}/{p}/x": x, f"{fold}/{p}/y": y, f"{fold}/{p}/n_true": np.array(int(y.sum())),
                          f"{fold}/{p}/slices": rng.normal(size=(3, 1)),
                          f"{fold}/{p}/groups": np.repeat(["s", "t"], 60)})
                if "tta_agreement" in names:  # newer tables say which slice each object lies in
                    t[f"{fold}/{p}/slice_of"] = np.repeat(np.arange(12), 10)
        return t

    old = [f for f in ALL_FEATURES if not f.endswith("_agreement")]
    np.savez(tmp_path / "old.npz", **tables(old))
    np.savez(tmp_path / "new.npz", **tables(list(ALL_FEATURES) + list(tf_.SECOND_FEATURES)))  # trust.py --second
    before, after = tf_.study(np.load(tmp_path / "old.npz")), tf_.study(np.load(tmp_path / "new.npz"))
    assert "shipped" in before["a"]["candidate"] and "agreement" not in before["a"]["candidate"]
    assert not any(c.startswith(("selected+all_agreement", "selected+second")) for c in before["a"]["candidate"])
    assert "second" not in before["a"]["candidate"]
    assert after["a"]["candidate"]["agreement"]["zero_shot"] > 0.6  # every feature carries the truth here
    assert "selected+all_agreement@0.6" in after["a"]["candidate"] and "selected@0.6 (equal)" in after["a"]["candidate"]
    assert after["a"]["candidate"]["second (equal)"]["zero_shot"] > 0.6
    assert "selected+second@0.6" in after["a"]["candidate"]
    assert set(after["a"]["feature"]) >= set(tf_.SECOND_FEATURES)
    # The shipped rule's AUROC with its slice-bootstrap interval, with or without slice ids.
    for out in (before, after):
        point, lo, hi = out["a"]["interval"]["zero_shot"]
        assert point == out["a"]["candidate"]["selected@0.6 (equal)"]["zero_shot"] and lo < point < hi


def test_trust_detections_give_the_confidence_auroc_with_its_interval_over_slices():
    """`detections`: the object confidence's AUROC, and its 95% interval from resampling slices
    (NaN without slice ids); the flagged objects and instance F1 before and after review."""
    import numpy as np

    from xmdl_tf.confidence import ALL_FEATURES, ObjectConfidence, auroc

    trust = _load("trust")
    rng = np.random.default_rng(4)
    y = rng.random(200) < 0.5
    x = rng.normal(size=(200, len(ALL_FEATURES)))
    x[:, 0] += 1.5 * y  # mean_probability tells true from false
    conf = ObjectConfidence(("mean_probability",)).fit(x[:, :1], y)
    r = trust.detections(x, y, int(y.sum()) + 10, conf, ALL_FEATURES, np.repeat(np.arange(20), 10))
    lo, hi = r["auroc_confidence_95"]
    assert r["auroc_confidence"] == auroc(conf.predict(x[:, :1]), y) and lo < r["auroc_confidence"] < hi
    assert r["objects"] == 200 and r["true"] == int(y.sum()) and r["flagged"] > 0
    assert r["instance_f1_after_review"] > r["instance_f1"]
    assert np.isnan(trust.detections(x, y, int(y.sum()), conf, ALL_FEATURES)["auroc_confidence_95"][0])


def test_trust_second_opinion_agrees_with_the_objects_of_its_own_model_and_not_with_foreign_ones(blob_run):
    """The second opinion of the very model that made the objects is full agreement (IoU 1 with
    its own objects, its probability high inside them); an object drawn where it sees nothing gets none."""
    import numpy as np

    from conftest import blob_image
    from xmdl_tf.postprocess import instances
    from xmdl_tf.predict import load_model

    trust = _load("trust")
    pred = load_model(blob_run[1])
    ic = pred.config.inference
    image, _ = blob_image(128, seed=5)
    prob = pred.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=ic.tta, rescale=ic.rescale)
    inst = instances(prob, ic, None)
    n = int(inst.max())
    assert n >= 2
    # A foreign object: the 12 x 12 window of lowest probability.
    windows = np.lib.stride_tricks.sliding_window_view(prob, (12, 12)).max(axis=(2, 3))
    r, c = np.unravel_index(np.argmin(windows), windows.shape)
    assert windows[r, c] < 0.2 and not inst[r:r + 12, c:c + 12].any()
    inst[r:r + 12, c:c + 12] = n + 1
    x = trust.second_opinion(pred, [{"image": image, "pixel_size_nm": None, "instances": inst}])
    assert x.shape == (n + 1, len(trust.SECOND_FEATURES))
    np.testing.assert_allclose(x[:n, 1], 1.0)
    assert x[:n, 0].min() > 0.5
    assert x[n, 1] == 0.0 and x[n, 0] < 0.2


def test_trust_refuses_an_inherited_calibration_it_cannot_use_before_predicting(blob_run, tmp_path, capsys):
    """--calibration-from: the inherited calibration must exist and hold an object confidence, and
    it brings no OOD model (so --objects-only); each is one line, before any model runs."""
    import shutil

    trust = _load("trust")
    data, run = blob_run
    loso = tmp_path / "loso"
    shutil.copytree(run, loso / f"without_{data.name}")
    parents = tmp_path / "parents"
    shutil.copytree(run, parents / f"without_{data.name}")  # the suite's tiny model: not calibrated
    base = ["--loso", str(loso), "--data", str(data), "--calibration-from", str(parents)]
    for argv, message in ((base, "needs --objects-only"),
                          ([*base, "--objects-only"], "holds no object confidence"),
                          ([*base[:-1], str(tmp_path / "nowhere"), "--objects-only"], "config.json not found")):
        with pytest.raises(SystemExit) as err:
            trust.main(argv)
        assert err.value.code == 2 and message in capsys.readouterr().err
    assert not (loso / "trust.json").exists()


def test_self_training_refuses_what_it_cannot_run_before_adapting(blob_run, tmp_path, capsys):
    """A folder that is no loso.py output, and `--zoom-search ood` for a model without its OOD model
    (ood.npz, from calibrate): one line each, before any adaptation is written."""
    import json
    import shutil

    st = _load("self_training")
    data, run = blob_run
    loso = tmp_path / "loso"
    shutil.copytree(run, loso / f"without_{data.name}")  # the suite's tiny model: not calibrated
    for argv, message in (([str(loso), "--data", str(data)], "no loso.json"),
                          ([str(loso), "--data", str(data), "--zoom-search", "ood"], "ood.npz is missing")):
        with pytest.raises(SystemExit) as err:
            st.main(argv)
        assert err.value.code == 2 and message in capsys.readouterr().err
        (loso / "loso.json").write_text(json.dumps({"cells": {}}))
    assert not any(loso.glob("self_training*"))


def test_gpu_training_budget_stops_training_and_decays_the_rate_over_the_time_left(tmp_path, monkeypatch):
    import itertools
    import types

    import keras
    import numpy as np

    gt = _load("gpu_training")
    # The callback's clock advances 0.05 s each time it is read: the same run whatever the machine's load.
    ticks = itertools.count(0.0, 0.05)
    monkeypatch.setattr(gt, "time", types.SimpleNamespace(time=lambda: next(ticks)))
    x = np.zeros((64, 4), np.float32)
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    cb = gt.budget_callback(3.0, lr0=0.1, start=0.0, log_every=1000)
    m.fit(x, x[:, :1], batch_size=8, epochs=1000, verbose=0, callbacks=[cb])
    epochs = [e for e, _, _ in cb.lr_log]
    assert 3 <= len(epochs) < 20 and next(ticks) < 3.0 + 1.0  # stopped by the budget, within an epoch of it
    lrs = [lr for _, _, lr in cb.lr_log]
    assert lrs[0] == 0.1 and all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 0.1
    assert abs(float(m.optimizer.learning_rate.numpy()) - lrs[-1]) < 1e-7


def test_gpu_training_export_splits_the_model_into_parts_that_reassemble(tmp_path, monkeypatch):
    gt = _load("gpu_training")
    run = tmp_path / "run"
    run.mkdir()
    data = bytes(range(256)) * 1000
    (run / "model.keras").write_bytes(data)
    (run / "config.json").write_text("{}")
    monkeypatch.setattr(gt, "PART", 100_000)
    files = gt.export_run(run, tmp_path / "out")
    parts = sorted(f for f in files if ".part-" in f.name)
    assert len(parts) == 3 and all(f.stat().st_size <= 100_000 for f in parts)
    assert b"".join(f.read_bytes() for f in parts) == data
    assert (tmp_path / "out" / "config.json").read_text() == "{}"


def test_gpu_training_bad_input_is_one_line(tmp_path, capsys):
    """A data root without the three sets, or a negative number of loader processes: one line, exit 2."""
    gt = _load("gpu_training")
    assert gt.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--budget-s", "60"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1 and "cdeep3m_sbem_mouse" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(SystemExit) as e:
        gt.main(["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--budget-s", "60",
                 "--loader-processes", "-2"])
    assert e.value.code == 2 and "--loader-processes" in capsys.readouterr().err


def test_adapt_batchnorm_sets_moving_statistics_to_the_new_data_and_restores_momentum():
    import keras
    import numpy as np
    from xmdl_tf.model import build_model

    zs = _load("zero_shot_inference")
    model = build_model(depth=2, base_filters=4)
    rng = np.random.default_rng(0)
    tiles = (rng.random((32, 32, 32, 1)) * 0.5 + 3.0).astype(np.float32)  # far from the init statistics
    bn = model.get_layer("enc1_bn1")
    momentum = bn.momentum
    assert zs.adapt_batchnorm(model, tiles, batch_size=8) == 4
    # The first BN layer's input is the first convolution's output: its mean over all tiles is known.
    conv = keras.Model(model.input, model.get_layer("enc1_conv1").output)
    feats = conv.predict(tiles, verbose=0)
    np.testing.assert_allclose(bn.moving_mean.numpy(), feats.mean((0, 1, 2)), rtol=1e-3, atol=1e-4)
    per_batch_var = np.mean([feats[k:k + 8].var((0, 1, 2)) for k in range(0, 32, 8)], 0)
    np.testing.assert_allclose(bn.moving_variance.numpy(), per_batch_var, rtol=1e-3, atol=1e-4)
    assert bn.momentum == momentum
    assert zs.pooled_f1([(np.array([0.9, 0.2, 0.8]), np.array([1, 1, 0]))], 0.5) == pytest.approx(0.5)


def test_object_features_pools_each_object_at_its_layer_stride_and_ridge_separates():
    import numpy as np

    of = _load("object_features")
    inst = np.zeros((8, 8), np.int32)
    inst[0:4, 0:4] = 1   # reads activation pixel (0, 0) at stride 4
    inst[4:8, 0:8] = 2   # reads (1, 0) and (1, 1)
    fmap = np.arange(2 * 2 * 3, dtype=np.float32).reshape(2, 2, 3)
    got = of.pooled_features(inst, fmap, 4)
    np.testing.assert_allclose(got, [fmap[0, 0], (fmap[1, 0] + fmap[1, 1]) / 2])
    np.testing.assert_allclose(of.pooled_features(inst, inst[..., None].astype(float), 1)[:, 0], [1, 2])
    rng = np.random.default_rng(0)
    y = rng.random(400) < 0.5
    x = rng.normal(size=(400, 5)) + 1.5 * y[:, None] * np.array([1, 0, 0, 0, -1])
    strong, weak = of.ridge_logistic(x, y.astype(float), 1.0), of.ridge_logistic(x, y.astype(float), 1e6)
    s = strong(x)
    assert s[y].mean() > s[~y].mean() + 2  # the informative directions are learned
    assert np.ptp(weak(x)) < 0.1 * np.ptp(s)  # a huge ridge shrinks the weights to ~0


def test_median_width_is_the_inscribed_diameter_at_the_model_scale():
    import numpy as np

    zs = _load("zero_shot_inference")
    lab = np.zeros((100, 100), np.uint8)
    lab[10:20, 10:90] = 1   # a bar 10 px wide
    lab[40:60, 10:90] = 1   # 20 px
    lab[80:110, 10:90] = 1  # 20 px (cut by the edge)
    lab[95, 95] = 1         # speck: left out
    w = zs.median_width([lab])
    assert 18 <= w <= 21
    assert 2 * 18 <= zs.median_width([lab], factor=2.0) <= 2 * 21


def test_blurred_keeps_the_dtype_and_smooths():
    import numpy as np

    zs = _load("zero_shot_inference")
    img = np.zeros((32, 32), np.uint16)
    img[::2] = 60000  # stripes one pixel wide: what a blur removes first
    out = zs.blurred(img, 2.0)
    assert out.dtype == np.uint16 and out.shape == img.shape
    assert np.ptp(out[8:24, 8:24]) < 0.05 * np.ptp(img) and abs(float(out.mean()) - float(img.mean())) < 600


def test_write_results_writes_json_and_markdown(tmp_path, capsys):
    import json

    _load("_util").write_results(tmp_path, "t", {"a": {"f1": 0.5}}, ["| x |", "|---|"])
    assert json.loads((tmp_path / "t.json").read_text()) == {"a": {"f1": 0.5}}
    assert (tmp_path / "t.md").read_text() == "| x |\n|---|\n" and "| x |" in capsys.readouterr().out


def test_object_features_density_ranks_objects_like_the_true_ones_above_strangers():
    """Rows drawn from the fitted Gaussian score higher than rows off it, even along a direction
    of small variance that a plain Euclidean distance would barely see."""
    import numpy as np

    of = _load("object_features")
    rng = np.random.default_rng(0)
    cov = np.diag([25.0, 25.0, 0.04])
    x = rng.multivariate_normal([1, 2, 3], cov, size=500)
    score = of.density_scorer(x)
    like = rng.multivariate_normal([1, 2, 3], cov, size=200)
    off = like + np.array([0, 0, 1.5])  # 7.5 sd along the thin axis, 0.3 sd in Euclidean terms of the wide ones
    from xmdl_tf.confidence import auroc
    assert auroc(np.r_[score(like), score(off)], np.r_[np.ones(200, bool), np.zeros(200, bool)]) > 0.95
    assert score(x[:1]).shape == (1,) and np.all(score(like) <= 0)


def test_trust_features_error_kinds_split_false_detections_by_overlap():
    """False detections that touch no true object and those that overlap one are counted and
    scored apart: a score that only knows partial overlaps separates those and not the others."""
    import numpy as np

    tf_ = _load("trust_features")
    is_true = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0], bool)
    iou = np.array([0.9, 0.8, 0.7, 0.6, 0.0, 0.0, 0.0, 0.0, 0.3, 0.1])
    score = np.array([0.9, 0.8, 0.7, 0.6, 0.95, 0.85, 0.75, 0.65, 0.1, 0.2])
    e = tf_.error_kinds(score, is_true, iou)
    assert e["false"] == 6 and e["other_share"] == round(4 / 6, 3) and e["partial_share"] == round(2 / 6, 3)
    assert e["auroc_partial"] == 1.0 and e["auroc_other"] < 0.5


def test_auto_zoom_benchmark_scores_each_presented_scale_three_ways(blob_run, tmp_path):
    """With the pixel size given ("known") the slice shown at x2 is predicted as at x1; the table has a
    row per presented scale; a model without a pixel size is refused in one line."""
    import json
    import shutil
    from dataclasses import replace

    from xmdl_tf.config import Config

    bench = _load("auto_zoom")
    data, run = blob_run
    model = tmp_path / "model"
    shutil.copytree(run, model)
    with pytest.raises(SystemExit, match="states no pixel size"):
        bench.main(["--model", str(model), "--out", str(tmp_path / "r0"), "--data", str(data), "--presented", "1"])
    cfg = Config.load(model / "config.json")
    replace(cfg, data=replace(cfg.data, pixel_size_nm=5.0)).save(model / "config.json")
    assert bench.main(["--model", str(model), "--out", str(tmp_path / "r"), "--data", str(data),
                       "--presented", "1", "2", "--max-slices", "1"]) == 0
    r = json.loads((tmp_path / "r" / "auto_zoom.json").read_text())["model"]
    lo, hi = r["object_width_px"]
    assert 10 < lo == hi < 30  # measured on the blobs' val slice, as tune measures it
    x1, x2 = r["scored"]["blobs"]["1"], r["scored"]["blobs"]["2"]
    assert x1["own grid"] == x1["known"] == x1["auto"] and x1["zoom chosen"] == 1.0
    assert x2["right zoom"] == 0.5 and 0 < x2["known"] <= 1 and 0.3 < x2["zoom chosen"] < 0.8
    md = (tmp_path / "r" / "auto_zoom.md").read_text()
    assert md.count("| model | blobs |") == 2 and "mean over 2 seen" in md


def test_loso_tuned_tunes_a_copy_on_the_other_sets_and_scores_the_left_out_one(blob_run, tmp_path, capsys):
    """Each left-out model is tuned on the other sets' val splits only (a copy; the run stays as it
    was), and its zero-shot cells are scored with what was chosen; a rerun reuses every step."""
    import json
    import shutil

    from conftest import write_split
    from xmdl_tf.config import Config
    from xmdl_tf.evaluate import evaluate

    bench = _load("loso_tuned")
    _, trained = blob_run
    names = ["a", "b", "c"]
    for k, name in enumerate(names):
        write_split(tmp_path / name, "val", 1, size=96, seed=10 * k)
        if name != "c":  # a set with val only, as Lucchi++
            write_split(tmp_path / name, "test", 1, size=96, seed=10 * k + 5)
    run = tmp_path / "loso"
    for name in names[:2]:
        shutil.copytree(trained, run / f"without_{name}", ignore=shutil.ignore_patterns("checkpoint"))
    (run / "loso.json").write_text(json.dumps({"sets": names, "cells": {"a": {"a": {"val": {"f1": 0.1}}}}}))
    before = (run / "without_a" / "config.json").read_text()
    data = [str(tmp_path / n) for n in names]
    assert bench.main([str(run), "--data", *data, "--tta", "off"]) == 0
    assert "without_c: no model.keras" in capsys.readouterr().err
    assert (run / "without_a" / "config.json").read_text() == before
    r = json.loads((run / "tuned" / "loso_tuned.json").read_text())["rows"]
    assert set(r) == {"a", "b"}
    tuned = Config.load(run / "tuned" / "without_a" / "config.json")
    assert [Path(s).name for s in tuned.info["inference_tuning"]["sets"]] == ["b", "c"]  # never the left-out set
    assert r["a"]["chosen"]["threshold"] == tuned.inference.threshold and r["a"]["chosen"]["tta"] is False
    ref = evaluate(str(run / "tuned" / "without_a"), data[0], "val")
    assert r["a"]["tuned"]["val"]["f1"] == pytest.approx(ref["f1"])
    assert r["a"]["untuned"]["val"]["f1"] == 0.1 and set(r["a"]["tuned"]) == {"val", "test", "held_out"}
    md = (run / "tuned" / "loso_tuned.md").read_text()
    assert "| a | off, " in md and "0.100 -> **" in md and "mean zero-shot F1 over 2 sets" in md
    stamp = (run / "tuned" / "without_a" / "tune.json").stat().st_mtime_ns
    assert bench.main([str(run), "--data", *data, "--tta", "off"]) == 0
    assert (run / "tuned" / "without_a" / "tune.json").stat().st_mtime_ns == stamp



def test_zoom_search_statistics_separate_the_objects_cores_from_their_rims():
    import numpy as np

    zs = _load("zoom_search")
    prob = np.full((64, 64), 0.02, np.float32)
    yy, xx = np.mgrid[:64, :64]
    r = np.hypot(yy - 32, xx - 32)
    prob[r <= 12] = 0.6  # an unsure rim ...
    prob[r <= 9] = 0.99  # ... around a sure core (wider than the core CORE_PX inside the object)
    s = zs.statistics(prob, 0.5, min_px=30)
    fg = int((r <= 12).sum())
    assert s["fg"] == fg and s["objects"] == 1 and s["band"] == fg - int((r <= 9).sum())
    assert s["fg_p_sum"] / s["fg"] < 0.9 < s["core_p_sum"] / s["core"] == pytest.approx(0.99)
    assert 0 < s["core"] < int((r <= 9).sum())  # only pixels CORE_PX inside the object
    # the product's score leaves out specks under the minimum size; the plain mean counts them
    prob[2:5, 2:5] = 0.55
    s = zs.statistics(prob, 0.5, min_px=30)
    assert s["fg_p_mean_kept"] == pytest.approx(prob[r <= 12].mean(), rel=1e-5)
    assert s["fg_p_sum"] / s["fg"] < s["fg_p_mean_kept"]
    # no object smaller than the minimum counts; an empty map scores lowest, not NaN
    assert zs.statistics(prob, 0.5, min_px=1000)["objects"] == 0
    empty = zs.statistics(np.zeros((16, 16), np.float32), 0.5)
    assert all(np.isfinite(f(empty | {"zoom": 1.0})) or f(empty | {"zoom": 1.0}) == -np.inf
               for f in zs.SCORES.values())


def test_zoom_search_chooses_each_slices_zoom_by_a_label_free_score_and_pools_f1():
    zs = _load("zoom_search")

    def rec(i, z, tp, fp, fn, p):
        return {"slice": i, "zoom": z, "tp": tp, "fp": fp, "fn": fn, "fg": 100, "fg_p_sum": 100 * p,
                "fg_logit_sum": 0.0, "core": 0, "core_p_sum": 0.0, "core_logit_sum": 0.0, "sure_fg": 0,
                "band": 0, "entropy": 0.0, "pixels": 1000, "objects": 1, "object_mean_p": p}

    # slice 0: zoom 2 is right and surest; slice 1: zoom 1 is right and surest
    recs = [rec(0, 1.0, 10, 10, 10, 0.90), rec(0, 2.0, 30, 0, 0, 0.95),
            rec(1, 1.0, 20, 0, 0, 0.97), rec(1, 2.0, 0, 20, 20, 0.91)]
    picked = zs.choose(recs, lambda rs: max(rs, key=lambda r: zs.SCORES["mean fg probability"](r)))
    assert [r["zoom"] for r in picked] == [2.0, 1.0]
    assert zs.f1(picked) == pytest.approx(1.0)
    assert zs.f1([r for r in recs if r["zoom"] == 1.0]) == pytest.approx(2 * 30 / (60 + 20))
    md = "\n".join(zs.analyse({"without_a": {"kind": {"a": "zero shot"}, "records": {"a": recs}}}))
    row = next(line for line in md.splitlines() if line.startswith("| without_a | a | zero shot"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "0.750 (x1)" and cells[4] == "1.000 (x1.5)"  # zoom 1; the per-slice oracle
    assert "mean fg probability 1.000" in md and "zero shot cells" in md
    assert cells[-1] == "-" and "OOD-warned" not in md.splitlines()[-1]  # no OOD flags recorded: no such rule
    # With the flags: `--zoom-search ood` searches only the warned slice (slice 1 here), zoom 1 elsewhere.
    for r in recs:
        r["ood_warning"] = r["slice"] == 1
    md = "\n".join(zs.analyse({"without_a": {"kind": {"a": "zero shot"}, "records": {"a": recs}}}))
    row = next(line for line in md.splitlines() if line.startswith("| without_a | a | zero shot"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[-1] == "1 / 2" and "surest where OOD-warned 0.750" in md
    # With the product's own pick recorded, that is the search: here it keeps slice 1 at zoom 1.
    for r in recs:
        r["product_zoom"] = 2.0 if r["slice"] == 0 else 1.0
    md = "\n".join(zs.analyse({"without_a": {"kind": {"a": "zero shot"}, "records": {"a": recs}}}))
    assert "product search 1.000" in md and "surest where OOD-warned 0.750" in md
    for r in recs:
        r["ood_warning"] = r["slice"] == 0
    md = "\n".join(zs.analyse({"without_a": {"kind": {"a": "zero shot"}, "records": {"a": recs}}}))
    assert "surest where OOD-warned 1.000" in md


def test_loso_ensemble_of_one_model_twice_scores_as_that_model_and_refuses_missing_draws(blob_run, tmp_path, capsys):
    """Two copies of one model average to itself: every ensemble cell equals its members'. A draw
    without the model, or a single draw, is one line before anything is written."""
    import json
    import shutil

    ens = _load("loso_ensemble")
    data, run = blob_run
    draws = [tmp_path / f"draw{i}" for i in range(2)]
    for d in draws:
        shutil.copytree(run, d / f"without_{data.name}")
    out = tmp_path / "out"
    for argv, message in (([str(draws[0])], "at least two draws"),
                          ([str(draws[0]), str(tmp_path / "nothing")], "no model.keras")):
        with pytest.raises(SystemExit) as err:
            ens.main([*argv, "--data", str(data), "--out", str(out)])
        assert err.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()
    assert ens.main([*map(str, draws), "--data", str(data), "--out", str(out)]) == 0
    rows = json.loads((out / "loso_ensemble.json").read_text())["rows"]
    assert [(r["kind"], r["split"]) for r in rows] == [("zero shot", "val"), ("zero shot", "held-out")]
    for r in rows:
        assert r["members"][0] == r["members"][1] == r["member mean"] == r["ensemble of 2"]
        assert 0.5 < r["ensemble of 2"] <= 1.0  # the suite's tiny model finds its blobs
    assert "mean over 2 zero shot cells" not in (out / "loso_ensemble.md").read_text()
    assert "mean over 1 zero shot cells (val)" in (out / "loso_ensemble.md").read_text()


def test_pixel_counts_pool_and_f1_follows():
    import numpy as np

    ens = _load("_util")
    prob = np.array([[0.9, 0.6], [0.2, 0.4]])
    label = np.array([[1, 0], [1, 0]])
    c = ens.pixel_counts(prob, label, 0.5)
    assert c.tolist() == [1, 1, 1]  # tp, fp, fn
    assert ens.f1_of(c) == pytest.approx(0.5) and ens.f1_of(np.zeros(3)) == 0.0


def test_trust_features_relative_area_is_each_objects_size_against_its_slices_median(tmp_path):
    """The derived size feature is scale-free: two slices with the same objects on grids x2 apart
    give the same values; it enters the tables' features only where slices are known."""
    import numpy as np

    tf_ = _load("trust_features")
    from xmdl_tf.confidence import ALL_FEATURES

    log_area = np.log10([100.0, 400, 1600, 400, 1600, 6400])  # slice 1 is slice 0 at twice the scale
    rel = tf_.relative_to_slice(log_area, np.array([0, 0, 0, 1, 1, 1]))
    assert np.allclose(rel[:3], rel[3:]) and np.allclose(rel[:3], np.log10([0.25, 1, 4]))

    rng = np.random.default_rng(1)
    i_area = ALL_FEATURES.index("log_area")
    tables = {"features": np.array(ALL_FEATURES), "slice_columns": np.array(["mean_entropy"])}
    for fold in ("a", "b"):
        for p in ("fit", "in_distribution", "zero_shot"):
            y = np.tile([True, False], 50)
            x = rng.normal(size=(100, len(ALL_FEATURES)))
            # true objects are the larger ones of their slice; the zero-shot slices are on another grid
            x[:, i_area] = np.where(y, 3.0, 2.0) + (1.5 if p == "zero_shot" else 0.0) + np.arange(100) // 10 * 0.3
            tables.update({f"{fold}/{p}/x": x, f"{fold}/{p}/y": y, f"{fold}/{p}/n_true": np.array(50),
                           f"{fold}/{p}/slices": rng.normal(size=(10, 1)),
                           f"{fold}/{p}/slice_of": np.arange(100) // 10,
                           f"{fold}/{p}/groups": np.repeat(["s", "t"], 50)})
    np.savez(tmp_path / "t.npz", **tables)
    out = tf_.study(np.load(tmp_path / "t.npz"))
    for fold in ("a", "b"):
        assert out[fold]["feature"][tf_.RELATIVE_AREA]["zero_shot"] == 1.0
        assert out[fold]["feature"]["log_area"]["zero_shot"] < 0.9  # the slices' grids differ
        assert tf_.RELATIVE_AREA in out[fold]["selected"]["selected+relative_area@0.6"]
    for p in ("fit", "in_distribution", "zero_shot"):
        del tables[f"a/{p}/slice_of"]
    np.savez(tmp_path / "t.npz", **tables)
    assert tf_.RELATIVE_AREA not in tf_.study(np.load(tmp_path / "t.npz"))["a"]["feature"]


def test_input_search_rules_pick_each_slices_input_without_labels(tmp_path, capsys):
    """The lowest-OOD rule takes the input whose score is lowest, the surest rule the one whose marked
    pixels are surest, the oracle the best per slice; a model without ood.npz is refused up front."""
    import json

    search = _load("input_search")

    def rec(blur, zoom, ood, sure, counts):
        return {"blur": blur, "zoom": zoom, "ood": ood, "sure": sure, "counts": counts}

    # one slice: as it is, F1 0.5; blurred, lowest OOD score and F1 1; zoomed x2, surest and F1 0
    slice_ = [rec(0.0, 1.0, 3.0, 0.8, [1, 1, 1]), rec(3.0, 1.0, 1.0, 0.7, [2, 0, 0]),
              rec(0.0, 2.0, 2.0, 0.9, [0, 2, 2]), rec(3.0, 2.0, 4.0, 0.6, [0, 0, 2])]
    rows, md = search.analyse({"records": {"d/s/val/a.png": slice_}})
    (row,) = rows
    assert row["as it is"] == 0.5 and row["lowest OOD, every input"] == 1.0
    assert row["lowest OOD blur, zoom 1"] == 1.0 and row["surest zoom"] == 0.0
    assert row["surest zoom, then lowest OOD blur"] == 0.0  # at x2 the blurred input scores worse
    assert row["blur 3, zoom 1"] == 1.0 and row["best input (blur, zoom)"] == "3, x1"
    assert row["per-slice oracle"] == 1.0 and "mean over 1 zero-shot cells (val)" in md[-1]
    path = tmp_path / "input_search.json"
    path.write_text(json.dumps({"records": {"d/s/val/a.png": slice_}}))
    assert search.main(["--analyse", str(path)]) == 0 and "| d | s | val |" in capsys.readouterr().out


def test_input_search_refuses_models_without_their_ood_model_before_any_work(blob_run, tmp_path, capsys):
    import shutil

    search = _load("input_search")
    data, run = blob_run
    shutil.copytree(run, tmp_path / "draw" / f"without_{data.name}")  # the suite's tiny model: not calibrated
    with pytest.raises(SystemExit) as err:
        search.main([str(tmp_path / "draw"), "--data", str(data), "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "ood.npz" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_adaptation_fine_tunes_each_left_out_model_on_its_first_slices_alone(blob_run, tmp_path, capsys):
    """--loso: zero shot, then fine-tuned on a folder holding only the first n training slices of the
    left-out set (no val split: a user's few annotated slices), each scored on the held-out split."""
    import json
    import shutil

    ad = _load("adaptation")
    data, run = blob_run
    loso = tmp_path / "loso"
    with pytest.raises(SystemExit) as err:  # no model for the set: one line, nothing written
        ad.main(["--loso", str(loso), "--data", str(data), "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and f"without_{data.name}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    shutil.copytree(run, loso / f"without_{data.name}")
    seen = {"f1": 0.8, "iou": 0.7, "precision": 0.9, "recall": 0.7, "instance_f1_iou50": 0.6, "n_images": 2}
    (loso / "loso.json").write_text(json.dumps({"cells": {
        "a": {data.name: {"held_out": seen, "val": {**seen, "f1": 0.5}}},
        "b": {data.name: {"held_out": {**seen, "f1": 0.6}, "val": seen}},
        data.name: {data.name: {"held_out": {**seen, "f1": 0.1}, "val": seen}}}}))  # its own zero shot: no reference
    out = tmp_path / "out"
    argv = ["--loso", str(loso), "--data", str(data), "--out", str(out), "--slices", "1",
            "--finetune-epochs", "1", "--steps-per-epoch", "2"]
    assert ad.main(argv) == 0
    few = out / "data" / f"{data.name}_1"
    assert sorted(p.name for p in few.iterdir()) == ["train"]
    assert [p.name for p in (few / "train" / "x").iterdir()] == [sorted((data / "train" / "x").iterdir())[0].name]
    rows = json.loads((out / "adaptation.json").read_text())
    assert [r["slices"] for r in rows] == [0, 1, "all (mean of the 2 models that trained on it)"]
    assert all(0 <= r["f1"] <= 1 for r in rows) and rows[2]["f1"] == pytest.approx(0.7)
    assert rows[2]["instance_f1"] == pytest.approx(0.6) and rows[2]["val_f1"] == pytest.approx(0.65)
    # held out = the test split; val scored apart (what a choice may be made on)
    assert (out / f"{data.name}_1slices" / f"val_{data.name}" / "metrics.json").is_file()
    assert json.loads((out / f"{data.name}_0slices" / f"held_out_{data.name}" / "metrics.json").read_text())[
        "split"] == "test"
    assert rows[0]["target"] == data.name  # scored on its test split, not val
    tuned = json.loads((out / f"{data.name}_1slices" / "config.json").read_text())
    assert tuned["train"]["epochs"] == 1
    assert (out / "adaptation.png").is_file()
    first = (out / f"{data.name}_1slices" / "model.keras").stat().st_mtime
    assert ad.main(argv) == 0  # a second call reuses what is done
    assert (out / f"{data.name}_1slices" / "model.keras").stat().st_mtime == first


def test_adaptation_combine_averages_draws_row_by_row(tmp_path, capsys):
    import json

    ad = _load("adaptation")
    rows = [[{"target": "a", "slices": 0, "f1": f, "instance_f1": 0.5, "val_f1": v},
             {"target": "a", "slices": "all (mean of the 2 models that trained on it)", "f1": 0.9, "instance_f1": 0.8,
              "val_f1": 0.9}] for f, v in ((0.4, 0.3), (0.6, 0.5))]
    files = []
    for i, r in enumerate(rows):
        files.append(tmp_path / f"{i}.json")
        files[-1].write_text(json.dumps(r))
    assert ad.main(["--combine", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert "| a | 0 | 0.500 (0.400-0.600) | 0.500 | 0.400 |" in out and "| a | all | 0.900 (0.900-0.900) |" in out
    with pytest.raises(SystemExit) as err:
        ad.main(["--combine", str(tmp_path / "missing.json")])
    assert err.value.code == 2 and "missing.json" in capsys.readouterr().err
