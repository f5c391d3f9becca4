"""Auto zoom for slices of unknown pixel size (`xmdl_tf.autoscale`): NumPy logic, then with the tiny model."""
from dataclasses import replace

import cv2
import numpy as np
import pytest

from xmdl_tf.autoscale import (MAX_ZOOM, SEARCH_ZOOMS, TOLERANCE, ZoomEstimate, estimate_zoom, followed, for_objects,
                               grid_of, mean_foreground_probability, object_widths, predicted_width, search_zoom,
                               width_range, zoom_towards)
from xmdl_tf.config import InferenceConfig

from conftest import blob_image


def discs(size: int, radii: list[int], seed: int = 0) -> np.ndarray:
    """bool (size, size) with non-touching discs of the given radii."""
    rng = np.random.default_rng(seed)
    m = np.zeros((size, size), np.uint8)
    for r in radii:
        for _ in range(200):
            c = rng.integers(r + 2, size - r - 2, 2)
            trial = np.zeros_like(m)
            cv2.circle(trial, (int(c[1]), int(c[0])), r, 1, -1)
            if not (cv2.dilate(m, np.ones((5, 5), np.uint8)) & trial).any():
                m |= trial
                break
    return m.astype(bool)


def test_object_widths_are_twice_the_inscribed_radius():
    m = np.zeros((60, 80), np.uint8)
    m[10:21, 5:60] = 1  # a band 11 px wide and 55 long: its width, not its length
    cv2.circle(m, (40, 45), 8, 1, -1)  # a raster disc of radius 8
    # Centre to the nearest background pixel's centre: W + 1 for the band, about 2 r for the disc.
    assert sorted(object_widths(m.astype(bool), min_px=1)) == pytest.approx([12.0, 16.0], abs=0.2)
    # Cut by the border, a band is measured as cut (not as if it went on past the edge).
    edge = np.zeros((40, 40), bool)
    edge[0:11, :] = True
    assert object_widths(edge, 1)[0] == pytest.approx(12.0)
    # Objects under min_px are not counted; an empty mask has none.
    speck = np.zeros((20, 20), bool)
    speck[5, 5] = True
    assert object_widths(speck, min_px=2).size == 0 and object_widths(np.zeros((8, 8), bool)).size == 0
    with pytest.raises(ValueError, match="2-D"):
        object_widths(np.zeros((2, 8, 8), bool))


def test_zoom_towards_leaves_the_range_alone_and_reaches_its_nearest_end():
    ref = (40.0, 50.0)
    assert zoom_towards(45, ref) == 1.0
    assert zoom_towards(40 / TOLERANCE + 0.1, ref) == 1.0 and zoom_towards(50 * TOLERANCE - 0.1, ref) == 1.0
    assert zoom_towards(20, ref) == pytest.approx(2.0)  # small objects: enlarge to the range's lower end
    assert zoom_towards(100, ref) == pytest.approx(0.5)  # large ones: shrink to its upper end
    assert zoom_towards(float("nan"), ref) == 1.0
    with pytest.raises(ValueError):
        zoom_towards(30, (50.0, 40.0))
    assert width_range({"a": 44.0, "b": 28.04, "c": float("nan")}) == (28.0, 44.0)
    assert width_range({"a": float("nan")}) is None


def ideal_model(true: np.ndarray, sees: tuple[float, float] = (0.0, np.inf)):
    """predict(zoom) of a model that finds exactly the true objects whose width, in model px at
    that zoom, lies in `sees` (a model that misses objects far from the sizes it learned)."""
    from skimage.measure import label

    comps = label(true)
    widths = object_widths(true, 1)  # in the order of the component ids

    def predict(zoom: float) -> np.ndarray:
        ok = np.flatnonzero((widths * zoom >= sees[0]) & (widths * zoom <= sees[1])) + 1
        return np.isin(comps, ok).astype(np.float32)

    return predict


def test_estimate_zoom_brings_small_objects_to_the_models_widths():
    true = discs(400, [9, 10, 11, 10, 9, 10, 11, 10], seed=1)  # ~20 px wide
    est = estimate_zoom(ideal_model(true), 0.5, (40.0, 50.0), min_px=10)
    assert est.zoom == pytest.approx(2.0, rel=0.1) and est.reason == "refined"
    assert len(est.widths) == 2 and 40 / TOLERANCE <= est.widths[-1] <= 50 * TOLERANCE
    # Already in range: one pass, no zoom.
    assert estimate_zoom(ideal_model(true), 0.5, (16.0, 30.0), min_px=10) == ZoomEstimate(
        1.0, est.widths[:1], est.objects, "in range")
    # Objects far too large: shrunk, never past MAX_ZOOM either way.
    big = estimate_zoom(ideal_model(true), 0.5, (150.0, 200.0), min_px=10)
    assert big.zoom == MAX_ZOOM and big.reason == f"capped at x{MAX_ZOOM:g}"


def fragment_model(size: int = 400, width_model_px: float = 12.0, n: int = 10):
    """predict(zoom) of a model that does not recognise the slice's objects and finds, wherever
    they are, blobs of the width it prefers: the same width in model px at every zoom."""
    def predict(zoom: float) -> np.ndarray:
        m = np.zeros((size, size), np.uint8)
        r = max(1, int(round(width_model_px / zoom / 2)))
        for k in range(n):
            cv2.circle(m, (20 + 36 * k, 200), r, 1, -1)
        return m.astype(np.float32)

    return predict


def test_estimate_zoom_falls_back_when_the_objects_do_not_follow_it():
    est = estimate_zoom(fragment_model(), 0.5, (24.0, 30.0), min_px=4)
    assert est.zoom == 1.0 and est.reason == "objects did not follow the zoom"
    assert est.widths[0] < 24 / TOLERANCE and abs(est.widths[1] - est.widths[0]) < 3  # fragments stay ~12 px
    assert followed(20.0, 40.0, 2.0) and followed(20.0, 30.0, 2.0) and not followed(20.0, 22.0, 2.0)
    assert followed(40.0, 20.0, 0.5) and not followed(40.0, 44.0, 0.5) and followed(30.0, 30.0, 1.0)
    # Objects that vanish at the zoom: back to 1 too.
    gone = estimate_zoom(lambda z: fragment_model()(1.0) if z == 1.0 else np.zeros((400, 400), np.float32),
                         0.5, (24.0, 30.0), min_px=4)
    assert gone.zoom == 1.0 and gone.reason == "objects lost at the zoom"


def test_estimate_zoom_needs_enough_objects():
    true = discs(200, [10, 10], seed=3)
    assert estimate_zoom(ideal_model(true), 0.5, (40.0, 50.0)) == ZoomEstimate(1.0, (), 0, "too few objects")


def test_for_objects_scales_pixel_minimums_by_the_zoom_area():
    ic = InferenceConfig(min_size_px=400, min_volume_vox=100)
    assert for_objects(ic, None) is ic and for_objects(ic, ZoomEstimate(1.0, (), 9, "in range")) is ic
    z = for_objects(ic, ZoomEstimate(2.0, (20.0, 40.0), 9, "refined"))
    assert (z.min_size_px, z.min_volume_vox, z.min_area_nm2) == (100, 25, ic.min_area_nm2)
    assert grid_of(5.0, 1.0) is None and grid_of(5.0, 2.0) == 10.0
    for bad in ((50.0, 40.0), 30.0, (0.0, 40.0), ("a", "b"), (10.0, 20.0, 30.0)):
        with pytest.raises(ValueError, match="object_width_px"):
            InferenceConfig(object_width_px=bad)
    assert InferenceConfig(object_width_px=[28, 50.9]).object_width_px == [28, 50.9]
    from xmdl_tf.config import Config

    with pytest.raises(ValueError, match=r"^my/config.json\['inference'\]: .*object_width_px"):
        Config.from_dict({"inference": {"object_width_px": [50, 20]}}, source="my/config.json")


def test_predicted_width_is_in_model_pixels():
    true = discs(300, [10] * 6, seed=4).astype(np.float32)
    w1 = predicted_width([(true, 1.0)], 0.5, 10)
    # The same objects on a slice of half the model's pixel size... measured where the model sees them.
    half = cv2.resize(true, (150, 150), interpolation=cv2.INTER_AREA)
    assert predicted_width([(half, 2.0)], 0.5, 10) == pytest.approx(w1, rel=0.1)


# ----------------------------------------------------------------------------
# With the suite's tiny model (trained on blobs 12-24 px wide)


def test_auto_zoom_with_a_real_model_finds_the_scale_of_enlarged_slices(blob_run, tmp_path, capsys):
    from xmdl_tf.analyze import Settings, analyze
    from xmdl_tf.autoscale import prediction_grid
    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.io import find_pairs, read_pair
    from xmdl_tf.predict import load_model
    from xmdl_tf.tune import tune

    data, run = blob_run
    pred = load_model(run, jit_compile=False)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0))
    fast = dict(tile=64, overlap=16)
    result = tune(pred, [str(data)], thresholds=(0.5,), min_areas=(0.0,), tta=False, verbose=False)
    lo, hi = result["best"]["object_width_px"]
    assert lo == hi == pytest.approx(result["object_widths_px"]["blobs"], abs=0.1) and 10 < lo < 30
    ic = replace(pred.config.inference, object_width_px=(lo, hi), threshold=0.5, min_size_px=10, **fast)
    image, label = read_pair(find_pairs(str(data), "val")[0])
    big = cv2.resize(image, None, fx=2.5, fy=2.5, interpolation=cv2.INTER_LINEAR)
    assert ic.auto_zoom  # on by default, but without the widths the model knows there is nothing to aim at
    assert prediction_grid(pred, big, replace(ic, object_width_px=None), None) == (None, None)
    pred.config = replace(pred.config, inference=ic)
    grid, est = prediction_grid(pred, big, ic, None, keep_probability=True)
    assert 0.3 < est.zoom < 0.55 and grid == pytest.approx(5.0 * est.zoom)  # right: 1 / 2.5 = 0.4
    # A pass made at the chosen zoom is kept for reuse: here the slice at its own size, in range at once.
    assert prediction_grid(pred, image, ic, None)[1].probability is None  # only when asked for
    grid1, est1 = prediction_grid(pred, image, ic, None, keep_probability=True)
    assert grid1 is None and est1.zoom == 1.0 and est1.reason == "in range"
    np.testing.assert_array_equal(est1.probability, pred.predict_slice(image, ic.tile, ic.overlap, ic.batch_size,
                                                                       tta=False))
    # A known pixel size, --no-auto-zoom or --no-rescale: no estimate, nothing changed.
    assert prediction_grid(pred, big, ic, 2.0) == (2.0, None)
    assert prediction_grid(pred, big, replace(ic, auto_zoom=False), None) == (None, None)
    assert prediction_grid(pred, big, replace(ic, rescale=False), None) == (None, None)

    # evaluate and analyze apply it (the blobs are plain enough for this model to segment at any
    # zoom, so the benefit is measured on real EM: benchmarks/auto_zoom.py).
    for sub in ("x", "y"):
        (tmp_path / "big" / "val" / sub).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "big" / "val" / "x" / "a.png"), big)
    cv2.imwrite(str(tmp_path / "big" / "val" / "y" / "a.png"),
                cv2.resize((label > 0).astype(np.uint8), big.shape[::-1], interpolation=cv2.INTER_NEAREST))
    calls = []
    predict_slice = pred.predict_slice
    pred.predict_slice = lambda *a, **k: calls.append(k.get("tta")) or predict_slice(*a, **k)
    on = evaluate(pred, str(tmp_path / "big"), "val", out=tmp_path / "ev")
    assert on["f1"] > 0.9 and on["inference"]["auto_zoom"] is True
    # Two passes for the estimate; without TTA a pass at the chosen zoom is the scored prediction.
    assert calls == [False, False] + ([] if est.probability is not None else [False])
    calls.clear()
    evaluate(pred, str(data), "val", out=tmp_path / "ev1")  # in range at zoom 1: one pass a slice
    assert calls == [False] * len(find_pairs(str(data), "val"))
    calls.clear()
    evaluate(pred, str(tmp_path / "big"), "val", tta=True)
    assert calls == [False, False, True]
    del pred.predict_slice
    import pandas as pd

    assert pd.read_csv(tmp_path / "ev" / "per_image.csv")["auto_zoom"].iloc[0] == pytest.approx(est.zoom)
    off = evaluate(pred, str(tmp_path / "big"), "val", out=tmp_path / "ev_off", auto_zoom=False)
    assert off["inference"]["auto_zoom"] is False
    assert pd.read_csv(tmp_path / "ev_off" / "per_image.csv")["auto_zoom"].isna().all()
    cv2.imwrite(str(tmp_path / "big.png"), big)
    analyze([str(tmp_path / "big.png")], pred, tmp_path / "out", settings=Settings(figure=False))

    s = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]
    assert s["auto_zoom"] == pytest.approx(est.zoom) and s["rescaled_by"] == pytest.approx(est.zoom)
    assert np.isnan(s["pixel_size_nm"])  # measurements stay in the slice's pixels
    assert "auto zoom" in capsys.readouterr().err


def test_auto_zoom_in_a_volume_of_unknown_voxel_size_is_read_off_its_middle_slice(blob_run):
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import VolumeSettings, analyze_volume

    _, run = blob_run
    pred = load_model(run, jit_compile=False)
    image, _ = blob_image(128, seed=3, n=10)
    big = cv2.resize(image, None, fx=2.5, fy=2.5, interpolation=cv2.INTER_LINEAR)
    volume = np.repeat(big[None], 5, axis=0)  # tubes through 5 slices
    ic = replace(pred.config.inference, tile=128, overlap=16, threshold=0.5, min_size_px=10, min_volume_vox=400,
                 object_width_px=(18.0, 18.0), auto_zoom=True)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0), inference=ic)
    a = analyze_volume(pred, volume, "v", VolumeSettings())
    assert 0.3 < a.summary["auto_zoom"] < 0.6 and a.summary["count"] >= 5
    # The minimum volume, in model voxels, is counted in the stack's own: 400 / zoom^2 of them.
    sizes = np.bincount(a.instances.ravel())[1:]
    assert a.instances.max() == a.summary["count"] and sizes[sizes > 0].min() >= 400 / a.summary["auto_zoom"] ** 2
    off = analyze_volume(pred, volume, "v", VolumeSettings(inference={"auto_zoom": False}))
    assert off.summary["auto_zoom"] is None


def test_mean_foreground_probability_reads_objects_only_and_is_zero_without_any():
    prob = np.zeros((64, 64), np.float32)
    prob[10:30, 10:30] = 0.9
    prob[12:28, 12:28] = 1.0  # a sure core in an unsure rim
    prob[50, 50] = 0.6  # a speck under the minimum size
    inside = prob[10:30, 10:30]
    assert mean_foreground_probability(prob, 0.5, 30) == pytest.approx(inside.mean())
    assert mean_foreground_probability(prob, 0.5, 1) < inside.mean()  # the speck counts now
    assert mean_foreground_probability(np.full((8, 8), 0.2, np.float32), 0.5) == 0.0


def test_search_zoom_keeps_the_zoom_the_model_is_surest_at():
    def at(rim: dict[float, float]):
        """predict(zoom): a square object whose rim probability depends on the zoom."""
        def predict(zoom: float) -> np.ndarray:
            p = np.zeros((64, 64), np.float32)
            p[8:40, 8:40] = rim.get(zoom, 0.6)
            p[12:36, 12:36] = 0.99
            return p
        return predict

    est = search_zoom(at({1.41: 0.9, 2.0: 0.8}), 0.5)
    assert est.zoom == 1.41 and len(est.scores) == len(SEARCH_ZOOMS) and "surest at x1.41" in est.reason
    assert est.scores[SEARCH_ZOOMS.index(1.41)] == max(est.scores) and est.widths == ()
    assert search_zoom(at({}), 0.5).zoom == 1.0  # a tie keeps the slice's grid
    nothing = search_zoom(lambda z: np.zeros((16, 16), np.float32), 0.5)
    assert nothing.zoom == 1.0 and nothing.reason == "nothing found at any zoom"
    with pytest.raises(ValueError, match="positive"):
        search_zoom(at({}), 0.5, zooms=(0.0, 1.0))


def test_zoom_search_with_a_real_model_predicts_a_crop_on_the_model_grid(blob_run, tmp_path, capsys):
    from xmdl_tf.autoscale import SEARCH_SIDE, prediction_grid
    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.io import find_pairs, read_pair
    from xmdl_tf.predict import load_model

    data, run = blob_run
    pred = load_model(run, jit_compile=False)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0))
    ic = replace(pred.config.inference, zoom_search="always", threshold=0.5, min_size_px=10, tile=64, overlap=16)
    image, _ = read_pair(find_pairs(str(data), "val")[0])
    shapes = []
    predict_slice = pred.predict_slice
    pred.predict_slice = lambda img, *a, **k: shapes.append((img.shape, k["tta"], k["pixel_size_nm"])) \
        or predict_slice(img, *a, **k)
    grid, est = prediction_grid(pred, image, ic, None)
    # Five passes without TTA, each on the grid the model predicts on (the slice resampled by the zoom).
    assert [s[1:] for s in shapes] == [(False, None)] * len(SEARCH_ZOOMS)
    side = min(image.shape[0], SEARCH_SIDE)
    assert [s[0][0] for s in shapes] == [max(1, round(side * z)) for z in SEARCH_ZOOMS]
    assert est.zoom in SEARCH_ZOOMS and len(est.scores) == len(SEARCH_ZOOMS) and max(est.scores) > 0.5
    assert grid == (None if est.zoom == 1.0 else pytest.approx(5.0 * est.zoom))
    # A known pixel size is searched around: the grid it asks for, times the zoom chosen.
    shapes.clear()
    grid_known, est_known = prediction_grid(pred, image, ic, 2.5)
    assert shapes[SEARCH_ZOOMS.index(1.0)][0][0] == round(image.shape[0] * 0.5)  # 2.5 nm -> 5 nm: x0.5
    assert grid_known == (2.5 if est_known.zoom == 1.0 else pytest.approx(2.5 * est_known.zoom))
    del pred.predict_slice
    # Off, or with --no-rescale: what it was (auto zoom needs widths this model lacks: none).
    assert prediction_grid(pred, image, replace(ic, zoom_search="off"), None) == (None, None)
    # "ood" searches only where the model's out-of-distribution score warns: this model has none,
    # so it is auto zoom's turn (unknown pixel size; no widths here: nothing) or the pixel size's.
    assert prediction_grid(pred, image, replace(ic, zoom_search="ood"), 2.5) == (2.5, None)
    assert prediction_grid(pred, image, replace(ic, zoom_search="ood"), None) == (None, None)
    assert prediction_grid(pred, image, replace(ic, rescale=False), 2.5) == (2.5, None)
    # evaluate applies it and reports the zoom per slice.
    r = evaluate(pred, str(data), "val", out=tmp_path / "ev", zoom_search=True, tile=64, overlap=16)
    assert r["inference"]["zoom_search"] == "always" and r["f1"] > 0.8
    import pandas as pd

    assert pd.read_csv(tmp_path / "ev" / "per_image.csv")["auto_zoom"].isin(SEARCH_ZOOMS).all()
    # analyze says so once and records the zoom; measurements stay in the given pixel size's nm.
    from xmdl_tf.analyze import Settings, analyze

    cv2.imwrite(str(tmp_path / "a.png"), image)
    pred.config = replace(pred.config, inference=ic)
    analyze([str(tmp_path / "a.png")], pred, tmp_path / "out", settings=Settings(figure=False, pixel_size_nm=2.5))
    row = pd.read_csv(tmp_path / "out" / "summary.csv").iloc[0]
    assert row["auto_zoom"] in SEARCH_ZOOMS and row["pixel_size_nm"] == 2.5
    assert row["rescaled_by"] == pytest.approx(0.5 * row["auto_zoom"])
    assert "--zoom-search" in capsys.readouterr().err


def test_zoom_search_setting_is_one_of_its_modes_and_a_bare_switch_reads_as_always_or_off():
    assert InferenceConfig(zoom_search=True).zoom_search == "always"
    assert InferenceConfig(zoom_search=False).zoom_search == "off"
    assert InferenceConfig().zoom_search == "ood"  # the default: search only what the OOD score warns about
    with pytest.raises(ValueError, match="zoom_search 'sometimes' must be one of"):
        InferenceConfig(zoom_search="sometimes")
