"""Scoring and data preparation, checked against brute force and the files users bring."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from data_prep import generic
from xmdl_tf.instances import average_precision, match_instances
from xmdl_tf.metrics import confusion, scores


# ---------------------------------------------------------------------------
# Brute force: COCO's greedy matching (pycocotools evaluateImg / accumulate), as the MitoEM challenge's
# mAP_3Dvolume runs it with every prediction ranked by its size.


def _iou_table(pred, true):
    p_ids = [i for i in np.unique(pred) if i]
    t_ids = [i for i in np.unique(true) if i]
    table = np.zeros((len(p_ids), len(t_ids)))
    for a, i in enumerate(p_ids):
        for b, j in enumerate(t_ids):
            table[a, b] = np.sum((pred == i) & (true == j)) / np.sum((pred == i) | (true == j))
    return p_ids, t_ids, table


def _coco_ap(pred, true, t):
    p_ids, t_ids, table = _iou_table(pred, true)
    if not t_ids:
        return float("nan")
    order = np.argsort([-np.sum(pred == i) for i in p_ids], kind="stable")
    taken, hits = [False] * len(t_ids), []
    for d in order:
        best, m = min(t, 1 - 1e-10), -1
        for g in range(len(t_ids)):
            if not taken[g] and table[d, g] >= best:
                best, m = table[d, g], g
        if m >= 0:
            taken[m] = True
        hits.append(m >= 0)
    hits = np.array(hits, bool)
    tp, fp = np.cumsum(hits), np.cumsum(~hits)
    recall, precision = tp / len(t_ids), list(tp / np.maximum(tp + fp, np.spacing(1)))
    for i in range(len(precision) - 1, 0, -1):
        precision[i - 1] = max(precision[i - 1], precision[i])
    q = np.zeros(101)
    for r, k in enumerate(np.searchsorted(recall, np.linspace(0, 1, 101), side="left")):
        if k < len(precision):
            q[r] = precision[k]
    return float(q.mean())


def _random_labels(rng, shape, n):
    lab = np.zeros(shape, np.int64)
    for _ in range(n):
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(1, 6, 2)
        lab[y:y + h, x:x + w] = rng.integers(1, 10)  # ids repeat and skip: non-contiguous
    return lab


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.uint64, "uint64 beyond int64"])
def test_pixel_scores_matching_and_ap_agree_with_brute_force(dtype):
    rng = np.random.default_rng(7)
    for _ in range(60):
        shape = tuple(rng.integers(4, 14, 2))
        pred, true = _random_labels(rng, shape, rng.integers(0, 6)), _random_labels(rng, shape, rng.integers(0, 6))
        if dtype == "uint64 beyond int64":
            big = np.uint64(2**63 + 5)
            p = np.where(pred > 0, pred.astype(np.uint64) * np.uint64(1000) + big, 0).astype(np.uint64)
            t = np.where(true > 0, true.astype(np.uint64) + big, 0).astype(np.uint64)
        else:
            p, t = pred.astype(dtype), true.astype(dtype)
        p_ids, t_ids, table = _iou_table(pred, true)
        for th in (0.5, 0.75):
            m = match_instances(p, t, th)
            # Above IoU 0.5 a prediction meets at most one true object: matches are the pairs above th.
            assert m["tp"] == int(np.sum(table >= th)) and (m["n_pred"], m["n_true"]) == (len(p_ids), len(t_ids))
            got, want = average_precision(p, t, (th,))[f"ap{round(100 * th)}"], _coco_ap(pred, true, th)
            assert (np.isnan(got) and np.isnan(want)) or got == pytest.approx(want, abs=1e-12)
        valid = rng.random(shape) > 0.2
        c = confusion(pred > 0, true > 0, valid)
        P, T = (pred > 0)[valid], (true > 0)[valid]
        assert c == {"tp": np.sum(P & T), "fp": np.sum(P & ~T), "fn": np.sum(~P & T), "tn": np.sum(~P & ~T)}


def test_empty_truth_and_empty_prediction():
    empty, one = np.zeros((8, 8), np.uint16), np.zeros((8, 8), np.uint16)
    one[2:5, 2:5] = 9
    assert scores(confusion(empty, empty))["f1"] == 1.0 and scores(confusion(one, empty))["f1"] == 0.0
    assert match_instances(empty, empty)["f1"] == 1.0 and match_instances(one, empty)["f1"] == 0.0
    assert np.isnan(average_precision(one, empty)["ap50"])  # the challenge's -1: no true object
    assert average_precision(empty, one) == {"ap50": 0.0, "ap75": 0.0}


# ---------------------------------------------------------------------------
# evaluate --volume


def _volume_set(root: Path, labels: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    for d in ("x", "y"):
        (root / "test" / d).mkdir(parents=True)
    for z, lab in enumerate(labels):
        image = np.where(lab == 1, 60, 180) + rng.integers(0, 30, lab.shape)
        cv2.imwrite(str(root / "test" / "x" / f"im{z:04d}.png"), image.astype(np.uint8))
        tifffile.imwrite(root / "test" / "y" / f"seg{z:04d}.tif", lab.astype(np.uint8))
    return root


def test_evaluate_volume_reads_the_sets_unlabelled_value_as_the_2d_scores_do(untrained_model, tmp_path):
    from xmdl_tf.evaluate import evaluate_volume

    labels = np.zeros((4, 32, 32), np.uint8)
    labels[:, 4:12, 4:12] = 1
    labels[:, :, 24:] = 255  # unlabelled
    root = _volume_set(tmp_path / "set", labels)
    (root / "dataset.json").write_text(json.dumps({"ignore_value": 255}))
    kw = dict(tile=32, overlap=0, tta=False, auto_zoom=False, zoom_search="off")
    declared = evaluate_volume(untrained_model, str(root), "test", tmp_path / "ev", **kw)
    given = evaluate_volume(untrained_model, str(root), "test", None, ignore_value=255, **kw)
    assert sum(declared[k] for k in ("tp", "fp", "fn", "tn")) == int(np.sum(labels != 255))
    for k in ("tp", "fp", "fn", "tn", "f1", "iou"):
        assert declared[k] == given[k], k
    assert declared["ignore_value"] == given["ignore_value"] == 255
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["ignore_value"] == 255


def test_evaluate_volume_writes_strict_json_when_the_truth_has_no_object(untrained_model, tmp_path):
    from xmdl_tf.evaluate import evaluate_volume

    root = _volume_set(tmp_path / "set", np.zeros((3, 32, 32), np.uint8))
    r = evaluate_volume(untrained_model, str(root), "test", tmp_path / "ev", tile=32, overlap=0, tta=False,
                        auto_zoom=False, zoom_search="off")
    assert np.isnan(r["ap50"])

    def refuse(token):
        raise AssertionError(f"metrics.json holds {token}, which is not JSON")

    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text(), parse_constant=refuse)
    assert saved["ap50"] is None and saved["ap75"] is None and saved["gt_count"] == 0


# ---------------------------------------------------------------------------
# data_prep


def test_generic_reads_a_label_drawn_in_the_alpha_channel_as_training_does(tmp_path):
    from xmdl_tf.io import read_label

    (tmp_path / "im").mkdir()
    (tmp_path / "lab").mkdir()
    rng = np.random.default_rng(0)
    for z in range(3):
        cv2.imwrite(str(tmp_path / "im" / f"im{z:04d}.png"), rng.integers(0, 255, (32, 32)).astype(np.uint8))
        rgba = np.zeros((32, 32, 4), np.uint8)  # black everywhere, the mitochondria opaque
        rgba[5:15, 5 + z:15 + z, 3] = 255
        cv2.imwrite(str(tmp_path / "lab" / f"seg{z:04d}.png"), rgba)
    with pytest.warns(UserWarning, match="alpha channel only"):
        generic.main(["--images", str(tmp_path / "im"), "--labels", str(tmp_path / "lab"), "--out",
                      str(tmp_path / "o"), "--splits", "1,0,0"])
    for z in range(3):
        with pytest.warns(UserWarning, match="alpha channel only"):
            want = read_label(tmp_path / "lab" / f"seg{z:04d}.png") > 0
        got = tifffile.imread(tmp_path / "o" / "train" / "y" / f"seg{z:04d}.tif")
        assert got.sum() == 100
        np.testing.assert_array_equal(got, want.astype(np.uint8))


def test_generic_refuses_folders_whose_numbers_disagree_and_keeps_a_shifted_numbering(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for d in ("im", "lab", "lab1"):
        (tmp_path / d).mkdir()
    for z in range(4):
        cv2.imwrite(str(tmp_path / "im" / f"im{z:04d}.png"), rng.integers(0, 255, (16, 16)).astype(np.uint8))
    for z in (0, 1, 3, 4):  # seg0002 missing, seg0004 extra: by order im0002 would get seg0003
        tifffile.imwrite(tmp_path / "lab" / f"seg{z:04d}.tif", np.full((16, 16), 10 + z, np.uint16))
    for z in range(1, 5):  # numbered from 1: one shift, paired by order
        tifffile.imwrite(tmp_path / "lab1" / f"seg{z:04d}.tif", np.full((16, 16), 10 + z, np.uint16))
    args = ["--images", str(tmp_path / "im"), "--splits", "1,0,0", "--labels-kind", "instance"]
    assert generic.main([*args, "--labels", str(tmp_path / "lab"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "im0002.png would be paired with seg0003.tif" in err[0]
    assert not (tmp_path / "o").exists()
    generic.main([*args, "--labels", str(tmp_path / "lab1"), "--out", str(tmp_path / "o1")])
    for z in range(4):
        assert tifffile.imread(tmp_path / "o1" / "train" / "y" / f"seg{z:04d}.tif")[0, 0] == 11 + z


def test_evaluate_never_leaves_a_new_table_beside_old_pooled_scores(untrained_model, tmp_path, monkeypatch):
    import xmdl_tf.runlock
    from conftest import write_split
    from xmdl_tf.evaluate import evaluate

    write_split(tmp_path / "set", "test", 2, size=64)
    kw = dict(tile=64, overlap=0, tta=False, auto_zoom=False, zoom_search="off")
    evaluate(untrained_model, str(tmp_path / "set"), "test", tmp_path / "ev", **kw)
    real = xmdl_tf.runlock.atomic_write_text

    def stopped_before_metrics(path, text):
        if Path(path).name == "metrics.json":
            raise KeyboardInterrupt
        real(path, text)

    monkeypatch.setattr(xmdl_tf.runlock, "atomic_write_text", stopped_before_metrics)
    with pytest.raises(KeyboardInterrupt):
        evaluate(untrained_model, str(tmp_path / "set"), "test", tmp_path / "ev", overwrite=True, threshold=0.9, **kw)
    assert not (tmp_path / "ev" / "metrics.json").exists()


def test_tune_names_the_layout_it_reads(tmp_path, capsys):
    from xmdl_tf.tune import main

    (tmp_path / "slices").mkdir()
    assert main(["--model", "xmdl_ref_f8", "--data", str(tmp_path / "slices")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "tune reads data sets in the split layout" in err[0] and "labels explicitly" not in err[0]


def test_evaluate_warns_when_a_set_the_model_was_trained_on_at_a_known_pixel_size_has_none(tmp_path):
    """A run trained with --pixel-size 4.6 on a set without metadata records it; scoring that set
    without it is not scoring it as trained: said in one warning naming the value to pass."""
    import types
    import warnings

    from xmdl_tf.evaluate import warn_trained_pixel_size

    data = tmp_path / "setA"
    data.mkdir()
    info = {"data": [{"path": str(data.resolve()), "pixel_size_nm": 4.6}]}
    pred = types.SimpleNamespace(config=types.SimpleNamespace(info=info))
    with pytest.warns(UserWarning, match=r"trained on this set at 4.6 nm.*--pixel-size 4.6"):
        warn_trained_pixel_size(pred, str(data))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_trained_pixel_size(pred, str(tmp_path / "other"))  # another set: nothing to say
        warn_trained_pixel_size(types.SimpleNamespace(config=types.SimpleNamespace(info={})), str(data))
