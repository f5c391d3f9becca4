"""Per-pixel uncertainty and per-object confidence on synthetic probability maps (NumPy only)."""
import numpy as np
import pytest

from xmdl_tf.confidence import (ALL_FEATURES, FEATURES, ObjectConfidence, auroc, auroc_interval, entropy,
                                 feature_matrix, object_features)


def disc(shape, cy, cx, r):
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_entropy_is_one_at_half_and_zero_when_sure():
    e = entropy(np.array([0.0, 0.5, 1.0, np.nan]))
    assert e[1] == pytest.approx(1.0) and e[0] < 1e-5 and e[2] < 1e-5 and e[3] == pytest.approx(1.0)


def test_features_tell_a_sharp_confident_object_from_a_faint_blurry_one():
    from scipy.ndimage import gaussian_filter

    shape = (64, 128)
    sure, faint = disc(shape, 32, 32, 10), disc(shape, 32, 96, 10)
    p = np.where(sure, 0.98, 0.02)
    p = np.where(faint, 0.6, p)
    p[:, 64:] = gaussian_filter(p[:, 64:], 3)  # the faint one also has a soft edge
    inst = (sure * 1 + faint * 2).astype(np.uint16)
    heat = np.where(sure, 0.9, 0.1)
    f = object_features(inst, p, heat)
    assert list(f["label"]) == [1, 2]
    assert f["mean_probability"][0] > f["mean_probability"][1]
    assert f["low_probability"][0] > f["low_probability"][1]
    assert f["mean_uncertainty"][0] < f["mean_uncertainty"][1]
    assert f["edge_contrast"][0] > f["edge_contrast"][1] + 0.3
    assert f["log_area"][0] == pytest.approx(np.log10(sure.sum()))
    assert f["mean_gradcam"][0] == pytest.approx(0.9) and f["mean_gradcam"][1] == pytest.approx(0.1)
    assert feature_matrix(f).shape == (2, len(FEATURES))
    empty = object_features(np.zeros(shape, np.uint16), p)
    assert feature_matrix(empty).shape == (0, len(FEATURES))
    assert feature_matrix(empty, ALL_FEATURES).shape == (0, len(ALL_FEATURES))


def test_shape_border_and_spread_features():
    shape = (60, 80)
    inst = np.zeros(shape, np.uint16)
    inst[disc(shape, 20, 20, 12)] = 1  # a disc: solid, round
    inst[40:44, 0:60] = 2  # a bar cut by the left edge: elongated
    inst[5:25, 50:70] = 3
    inst[5:15, 60:70] = 0  # an L: a quarter of its hull missing
    heat = np.where(inst == 1, 0.8, 0.0) + np.where(disc(shape, 20, 20, 15) & (inst == 0), 0.5, 0.0)
    spread = np.where(inst == 3, 0.2, 0.01)
    f = object_features(inst, np.where(inst > 0, 0.9, 0.1), heat, spread=spread)
    assert f["solidity"][0] > 0.9 and f["solidity"][2] == pytest.approx(300 / 350, abs=0.01)
    assert f["elongation"][0] < 0.05 and f["elongation"][1] > 0.9
    assert list(f["touches_border"]) == [0.0, 1.0, 0.0]
    assert f["gradcam_contrast"][0] == pytest.approx(0.8 - 0.5)  # the 3-px ring lies inside the 0.5 halo
    assert f["tta_spread"][2] == pytest.approx(0.2) and f["tta_spread"][0] == pytest.approx(0.01)
    assert set(ALL_FEATURES) <= set(f)


def test_logistic_confidence_separates_and_is_calibrated_on_its_data():
    rng = np.random.default_rng(0)
    n = 20000
    real = rng.random(n) < 0.6
    # Real objects: higher mean probability and edge contrast, on average; overlapping distributions.
    x = np.column_stack([rng.normal(np.where(real, 0.85, 0.65), 0.08), rng.normal(np.where(real, 0.6, 0.3), 0.2),
                         rng.normal(0, 1, n), rng.normal(0, 1, n)])
    names = ("mean_probability", "edge_contrast", "solidity", "mean_gradcam")
    model = ObjectConfidence(names).fit(x, real)
    c = model.predict(x)
    assert auroc(c, real) > 0.9
    for lo in (0.1, 0.3, 0.5, 0.7):  # 0.8 means right about 80% of the time
        sel = (c >= lo) & (c < lo + 0.2)
        assert real[sel].mean() == pytest.approx(c[sel].mean(), abs=0.05)
    again = ObjectConfidence.from_dict(model.to_dict())
    np.testing.assert_allclose(again.predict(x[:10]), c[:10])
    assert again.features == names
    with pytest.raises(ValueError, match="true and false"):
        ObjectConfidence(names).fit(x[:10], np.ones(10, bool))
    with pytest.raises(ValueError, match="got x of shape"):
        ObjectConfidence(names).fit(x[:, :3], real)


def test_auroc_matches_the_pairwise_definition():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, 60).astype(float)  # with ties
    pos = rng.random(60) < 0.4
    pairs = [(a > b) + 0.5 * (a == b) for a in s[pos] for b in s[~pos]]
    assert auroc(s, pos) == pytest.approx(np.mean(pairs))
    assert np.isnan(auroc(s, np.ones(60, bool)))


def test_auroc_interval_resamples_slices_and_widens_when_they_differ():
    """Objects in 40 slices; each slice shifts all its scores by its own offset (contrast), so
    objects of one slice are not independent. The slice bootstrap's interval holds the point
    estimate, is reproducible, and is wider than a bootstrap that treats every object as its own
    slice; with the offsets removed, the two are about as wide."""
    rng = np.random.default_rng(3)
    slices = np.repeat(np.arange(40), 15)
    pos = rng.random(len(slices)) < 0.4
    shared = rng.normal(0, 1, 40)[slices]
    score = 2 * pos + rng.normal(0, 1, len(slices)) + shared
    width = lambda lo_hi: lo_hi[1] - lo_hi[0]  # noqa: E731
    lo, hi = auroc_interval(score, pos, slices)
    assert lo < auroc(score, pos) < hi and 0.5 < lo and hi < 1
    assert (lo, hi) == auroc_interval(score, pos, slices)  # seeded
    assert width((lo, hi)) > 1.25 * width(auroc_interval(score, pos, np.arange(len(slices))))
    plain = score - shared
    assert 0.8 < width(auroc_interval(plain, pos, slices)) / width(auroc_interval(plain, pos, np.arange(len(slices)))) < 1.2
    assert np.isnan(auroc_interval(score, pos, np.zeros(len(slices)))[0])  # one slice: no interval
    with pytest.raises(ValueError, match="length"):
        auroc_interval(score, pos, slices[:-1])


def test_a_confidence_fitted_on_the_tta_spread_is_not_used_without_tta(caplog):
    from xmdl_tf.analyze import confidence_model

    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(40, 2)), rng.random(40) < 0.5
    with_spread = ObjectConfidence(("mean_probability", "tta_spread")).fit(x, y).to_dict()
    without = ObjectConfidence(("mean_probability",)).fit(x[:, :1], y).to_dict()
    assert confidence_model({}, tta=True) is None
    assert confidence_model({"object_confidence": with_spread}, tta=True).features == ("mean_probability", "tta_spread")
    both = {"object_confidence": with_spread, "object_confidence_without_tta": without}
    assert confidence_model(both, tta=False).features == ("mean_probability",)
    with caplog.at_level("WARNING"):
        assert confidence_model({"object_confidence": with_spread}, tta=False) is None
    assert "test-time augmentation" in caplog.text
    plain = ObjectConfidence(("mean_probability",)).fit(x[:, :1], y).to_dict()
    assert confidence_model({"object_confidence": plain}, tta=False).features == ("mean_probability",)


def test_best_iou_per_object():
    from xmdl_tf.postprocess import best_iou, matched_objects

    a = np.zeros((20, 20), np.uint16)
    a[0:10, 0:10] = 1  # 100 px
    a[12:16, 12:16] = 2  # 16 px, nothing there in b
    b = np.zeros_like(a)
    b[0:10, 0:5] = 3  # half of object 1
    b[0:10, 5:10] = 7  # the other half
    np.testing.assert_allclose(best_iou(a, b), [0.5, 0.0])
    assert list(matched_objects(a, b)) == [True, False]
    np.testing.assert_allclose(best_iou(a, a), [1.0, 1.0])
    assert best_iou(np.zeros_like(a), b).shape == (0,)


def test_agreement_features_tell_a_crisp_object_from_a_soft_one():
    from xmdl_tf.config import InferenceConfig
    from xmdl_tf.postprocess import alternative_instances, instances

    shape = (64, 128)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    crisp = np.where(disc(shape, 32, 32, 14), 0.98, 0.02)
    # A blob whose probability falls off slowly: higher and lower thresholds give other shapes.
    soft = np.clip(1.0 - np.hypot(yy - 32, xx - 96) / 22, 0, 1)
    prob = np.maximum(crisp, soft).astype(np.float32)
    ic = InferenceConfig(threshold=0.5, min_size_px=5, separate=False)
    inst = instances(prob, ic)
    assert inst.max() == 2
    # TTA members: the crisp object in all 8, the soft one only in half of them.
    members = np.repeat(prob[..., None], 8, axis=-1)
    members[..., ::2] = np.where(xx[..., None] > 64, 0.0, members[..., ::2])
    # Predicted at other scales: the soft blob vanishes at one of the two.
    zoomed = [prob, np.where(xx > 64, 0.0, prob)]
    alt = alternative_instances(prob, ic, None, members, zoomed)
    assert len(alt["threshold"]) == 2 and len(alt["tta"]) == 8 and len(alt["scale"]) == 2
    f = object_features(inst, prob, alternatives=alt)
    assert f["threshold_agreement"][0] > 0.95 and f["threshold_agreement"][1] < 0.7
    assert f["tta_agreement"][0] == pytest.approx(1.0) and f["tta_agreement"][1] == pytest.approx(0.5)
    assert list(f["scale_agreement"]) == pytest.approx([1.0, 0.5])
    assert "scale" not in alternative_instances(prob, ic, None, members)
    # Without the alternatives (or without TTA members) the features are 0: not evidence of agreement.
    assert not object_features(inst, prob)["threshold_agreement"].any()
    assert not object_features(inst, prob, alternatives={"threshold": alt["threshold"]})["tta_agreement"].any()


def test_a_confidence_fitted_on_tta_agreement_needs_tta_too():
    from xmdl_tf.analyze import confidence_model

    x, y = np.random.default_rng(1).normal(size=(40, 2)), np.arange(40) % 2 == 0
    agree = ObjectConfidence(("mean_probability", "tta_agreement")).fit(x, y).to_dict()
    plain = ObjectConfidence(("mean_probability",)).fit(x[:, :1], y).to_dict()
    cal = {"object_confidence": agree, "object_confidence_without_tta": plain}
    assert confidence_model(cal, tta=True).features == ("mean_probability", "tta_agreement")
    assert confidence_model(cal, tta=False).features == ("mean_probability",)


def test_image_features_are_in_units_of_the_slice_contrast():
    shape = (64, 128)
    rng = np.random.default_rng(0)
    inst = (disc(shape, 32, 32, 10) * 1 + disc(shape, 32, 96, 10) * 2).astype(np.uint16)
    image = 150 + rng.normal(0, 5, shape)
    image[inst == 1] = 80 + rng.normal(0, 20, (inst == 1).sum())  # dark and textured, as a mitochondrion
    image[inst == 2] = 60 + rng.normal(0, 2, (inst == 2).sum())  # darker still, flat
    f = object_features(inst, np.where(inst > 0, 0.9, 0.1), image=image)
    assert f["image_contrast"][0] < 0 and f["image_contrast"][1] < f["image_contrast"][0]
    assert f["image_texture"][0] > 3 * f["image_texture"][1]
    g = object_features(inst, np.where(inst > 0, 0.9, 0.1), image=3 * image + 1000)  # another gain and offset
    np.testing.assert_allclose(g["image_contrast"], f["image_contrast"])
    np.testing.assert_allclose(g["image_texture"], f["image_texture"])
    assert not object_features(inst, np.where(inst > 0, 0.9, 0.1))["image_texture"].any()


def test_equal_weights_carry_the_ranking_over_when_one_cue_fails():
    """Fitted where one feature separates strongly and another weakly, then scored where the strong
    one is noise (a new microscope): equal weights keep the weak cue's ranking, a full logistic fit
    (nearly all weight on the strong cue) loses it. Both stay calibrated on the fit data."""
    rng = np.random.default_rng(3)
    y = rng.random(2000) < 0.5
    s = np.where(y, 1.0, -1.0)
    fit = np.stack([3 * s + rng.normal(0, 1, 2000), -0.8 * s + rng.normal(0, 1, 2000)], 1)  # 2nd: lower = real
    shifted = np.stack([rng.normal(0, 1, 2000), -0.8 * s + rng.normal(0, 1, 2000)], 1)
    names = ("mean_probability", "mean_uncertainty")
    full = ObjectConfidence(names).fit(fit, y)
    equal = ObjectConfidence(names).fit(fit, y, combine="equal")
    assert equal.coef[0] == pytest.approx(-equal.coef[1]) and equal.coef[0] > 0  # same size, signed
    assert abs(full.coef[0]) > 2 * abs(full.coef[1])
    assert auroc(equal.predict(shifted), y) > auroc(full.predict(shifted), y) + 0.05
    for m in (full, equal):
        assert m.predict(fit).mean() == pytest.approx(y.mean(), abs=0.02)  # calibrated where fitted
        assert ObjectConfidence.from_dict(m.to_dict()).predict(fit[:5]) == pytest.approx(m.predict(fit[:5]))
    with pytest.raises(ValueError, match="combine"):
        ObjectConfidence(names).fit(fit, y, combine="median")


def test_object_features_and_entropy_need_no_whole_slice_float64_copies():
    """On a large slice the features read only the objects and their rings: NumPy's peak
    allocation follows the objects' pixels (9% of the slice here), where one float64 copy of
    the slice per feature once made this step `analyze`'s memory peak (26 float32 slices here;
    3.7 now)."""
    import tracemalloc

    n = 1536
    inst = np.zeros((n, n), np.int32)
    for k, (y, x) in enumerate(((y, x) for y in range(40, n - 80, 120) for x in range(40, n - 80, 120)), 1):
        inst[y:y + 30, x:x + 50] = k
    rng = np.random.default_rng(0)
    p, heat = rng.random((2, n, n), dtype=np.float32)
    slice_bytes = 4 * n * n
    tracemalloc.start()
    try:
        f = object_features(inst, p, heat, spread=heat)
        features_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        u = entropy(p)
        entropy_peak = tracemalloc.get_traced_memory()[1] - u.nbytes
    finally:
        tracemalloc.stop()
    assert len(f["label"]) == inst.max() and np.allclose(f["mean_probability"][0], p[40:70, 40:90].mean())
    assert features_peak < 6 * slice_bytes
    assert u.dtype == np.float32 and entropy_peak < 2 * slice_bytes


def test_rings_per_object_equal_one_distance_transform_of_the_whole_slice():
    """Each object's ring from its own widened box equals the ring and nearest-object map of
    one whole-slice transform, also for touching objects (split mitochondria) and at ties."""
    from scipy import ndimage

    from xmdl_tf.confidence import _rings

    rng = np.random.default_rng(1)
    for _ in range(10):
        h, w = rng.integers(40, 160, 2)
        blobs = ndimage.gaussian_filter(rng.random((h, w)), 3) > 0.5
        seeds = np.zeros((h, w), int)
        seeds[rng.integers(0, h, 20), rng.integers(0, w, 20)] = np.arange(1, 21)
        _, (iy, ix) = ndimage.distance_transform_edt(seeds == 0, return_indices=True)
        inst = np.unique(np.where(blobs, seeds[iy, ix], 0), return_inverse=True)[1].reshape(h, w).astype(np.int32)
        for ring in (1, 3):
            dist, (iy, ix) = ndimage.distance_transform_edt(inst == 0, return_indices=True)
            expect = np.flatnonzero((dist <= ring) & (inst == 0))
            got, labels = _rings(inst, int(inst.max()), ring)
            np.testing.assert_array_equal(got, expect)
            np.testing.assert_array_equal(labels, inst[iy.ravel()[expect], ix.ravel()[expect]])


def test_the_logistic_fit_is_the_minimum_of_the_penalised_log_loss():
    """IRLS against a general-purpose minimiser of the same objective (summed log-loss + l2 / 2 * |w|^2,
    intercept free), on noisy and on perfectly separable data."""
    from scipy.optimize import minimize

    from xmdl_tf.confidence import _logistic

    rng = np.random.default_rng(7)
    z = rng.normal(size=(400, 3))

    def loss(w, y, l2):
        u = w[0] + z @ w[1:]
        return np.sum(np.logaddexp(0, u) - y * u) + 0.5 * l2 * np.sum(w[1:] ** 2)

    for noise, l2 in ((rng.logistic(size=400), 1.0), (0.0, 1.0), (rng.logistic(size=400), 10.0)):
        y = ((z @ [2.0, -1.0, 0.5] + noise) > 0.3).astype(float)
        b, w = _logistic(z, y, l2, 50)
        ref = minimize(loss, np.zeros(4), args=(y, l2), method="BFGS", options={"gtol": 1e-9})
        assert loss(np.r_[b, w], y, l2) <= ref.fun + 1e-7
        np.testing.assert_allclose(np.r_[b, w], ref.x, atol=1e-4)


def test_equal_weights_recover_a_known_model_and_are_calibrated():
    """Data drawn from P(true) = sigmoid(0.4 + 1.2 * mean of the signed standardised features): the
    equal-weights fit finds that model, and its 0.8 means about 80% true on fresh data from it."""
    rng = np.random.default_rng(8)
    mu, sd = np.array([5.0, 0.0, 1.0]), np.array([1.0, 2.0, 0.5])

    def draw(n):
        x = rng.normal(size=(n, 3)) * sd + mu
        score = ((x - mu) / sd) @ [1.0, -1.0, 1.0] / 3
        return x, rng.random(n) < 1 / (1 + np.exp(-(0.4 + 1.2 * score)))

    x, y = draw(60_000)
    m = ObjectConfidence(("a", "b", "c")).fit(x, y, combine="equal")
    np.testing.assert_allclose(m.coef, [0.4, -0.4, 0.4], atol=0.03)
    assert m.intercept == pytest.approx(0.4, abs=0.03)
    np.testing.assert_allclose(m.mean, x.mean(0)) and np.testing.assert_allclose(m.scale, x.std(0))
    fresh, truth = draw(60_000)
    c = m.predict(fresh)
    assert 0 <= c.min() and c.max() <= 1
    for lo in (0.2, 0.4, 0.6, 0.8):
        sel = (c >= lo) & (c < lo + 0.1)
        assert truth[sel].mean() == pytest.approx(c[sel].mean(), abs=0.03)


def test_a_feature_constant_on_the_fit_data_gets_no_weight_with_equal_weights():
    """A constant column separates nothing, but was signed +1 (its AUROC 0.5) and kept a weight
    slope / F per raw unit (its scale falls back to 1): on new data where it varies it moved
    every confidence."""
    rng = np.random.default_rng(9)
    y = rng.random(400) < 0.5
    x = np.column_stack([rng.normal(y * 1.0, 1.0), np.full(400, 3.0), rng.normal(y * 0.5, 1.0)])
    m = ObjectConfidence(("a", "b", "c")).fit(x, y, combine="equal")
    assert m.coef[1] == 0.0 and m.coef[0] > 0 and m.coef[2] > 0
    moved = x.copy()
    moved[:, 1] = 10.0
    np.testing.assert_allclose(m.predict(moved), m.predict(x))
    assert ObjectConfidence(("a", "b", "c")).fit(x, y).coef[1] == 0.0  # as the full logistic fit has it


def test_a_nan_feature_is_refused_not_fitted_into_nan_weights():
    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(50, 2)), np.arange(50) % 2 == 0
    x[3, 1] = np.nan
    for combine in ("equal", "logistic"):
        with pytest.raises(ValueError, match=r"\['b'\] hold NaN"):
            ObjectConfidence(("a", "b")).fit(x, y, combine=combine)


def test_stored_confidence_round_trips_exactly_and_damage_is_named():
    import json

    rng = np.random.default_rng(11)
    x, y = rng.normal(size=(80, 2)), rng.random(80) < 0.5
    m = ObjectConfidence(("a", "b")).fit(x, y, combine="equal")
    again = ObjectConfidence.from_dict(json.loads(json.dumps(m.to_dict())))
    assert again == m and again.predict(x).tolist() == m.predict(x).tolist()
    good = m.to_dict()
    for damage in ({"coef": good["coef"][:1]}, {"scale": [1.0, 0.0]}, {"mean": [float("nan"), 0.0]},
                   {"intercept": "x"}, {"coef": None}):
        with pytest.raises(ValueError, match=r"^run/config.json\['calibration'\]: "):
            ObjectConfidence.from_dict({**good, **damage}, source="run/config.json['calibration']")
    with pytest.raises(ValueError, match="missing"):
        ObjectConfidence.from_dict({k: v for k, v in good.items() if k != "mean"})


def test_auroc_interval_is_the_percentile_bootstrap_over_whole_slices():
    """A hand-written replica: draw len(slices) slices with replacement, pool their objects, AUROC;
    resamples with one kind only dropped; percentiles of the rest."""
    rng = np.random.default_rng(12)
    g = np.repeat(np.array([7, 3, 11, 5]), [6, 9, 4, 8])
    pos = rng.random(len(g)) < 0.4
    s = pos + rng.normal(size=len(g))
    lo, hi = auroc_interval(s, pos, g, level=0.9, n_boot=300, seed=4)
    ids, r, values = np.unique(g), np.random.default_rng(4), []
    for _ in range(300):
        idx = np.concatenate([np.flatnonzero(g == ids[i]) for i in r.integers(0, len(ids), len(ids))])
        values.append(auroc(s[idx], pos[idx]))
    values = np.array(values)
    assert (lo, hi) == tuple(np.quantile(values[np.isfinite(values)], [0.05, 0.95]))
    assert auroc_interval(s, pos, g, seed=5) != auroc_interval(s, pos, g, seed=6)
    # two slices still give an interval; a single-class sample gives NaN, not 0.5
    assert np.isfinite(auroc_interval(s, pos, np.arange(len(g)) % 2)).all()
    assert np.isnan(auroc_interval(s, np.zeros(len(g), bool), g)).all()
