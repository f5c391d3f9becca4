"""Temperature scaling, reliability and ECE on synthetic cases with known probabilities (NumPy only)."""
import numpy as np
import pytest

from xmdl_tf.calibration import (apply_temperature, expected_calibration_error, fit_temperature, logit, nll,
                                 reliability, sample_pixels)


def known_case(n: int = 200_000, true_temperature: float = 3.0, seed: int = 0):
    """Truths drawn from known probabilities q, and an over-confident model p = sigmoid(logit(q) * T)."""
    rng = np.random.default_rng(seed)
    q = rng.beta(0.6, 0.6, n)  # mostly near 0 and 1, as segmentation probabilities are
    y = rng.random(n) < q
    p = apply_temperature(q, 1.0 / true_temperature)
    return q, p, y


def test_fit_recovers_a_known_temperature_and_removes_the_miscalibration():
    q, p, y = known_case()
    t = fit_temperature(p, y)
    assert t == pytest.approx(3.0, rel=0.05)
    calibrated = apply_temperature(p, t)
    np.testing.assert_allclose(calibrated, q, atol=0.02)
    before, after = expected_calibration_error(p, y), expected_calibration_error(calibrated, y)
    assert before > 0.05 and after < 0.01 and after < expected_calibration_error(q, y) + 0.005
    assert nll(calibrated, y) < nll(p, y)
    assert ((calibrated >= 0.5) == (p >= 0.5)).all()  # masks at 0.5 never change


def test_a_calibrated_model_keeps_temperature_one_and_sharpening_works_too():
    q, _, y = known_case(seed=1)
    assert fit_temperature(q, y) == pytest.approx(1.0, abs=0.05)
    under = apply_temperature(q, 2.0)  # under-confident: the fit sharpens (T < 1)
    assert fit_temperature(under, y) == pytest.approx(0.5, rel=0.05)


def test_reliability_bins_and_edge_cases():
    p = np.array([0.05, 0.05, 0.95, 0.95, 0.5])
    y = np.array([0, 1, 1, 1, 1], bool)
    r = reliability(p, y, bins=10)
    assert r["count"].sum() == 5 and r["count"][0] == 2 and r["count"][9] == 2
    assert r["frequency"][0] == 0.5 and r["frequency"][9] == 1.0 and np.isnan(r["frequency"][3])
    assert expected_calibration_error(p, y, bins=10) == pytest.approx((2 * 0.45 + 2 * 0.05 + 0.5) / 5)
    with pytest.raises(ValueError, match="both foreground and background"):
        fit_temperature(p, np.ones(5, bool))
    assert np.isfinite(logit(np.array([0.0, 1.0]))).all()
    nan = apply_temperature(np.array([np.nan, 0.9], np.float32), 2.0)
    assert np.isnan(nan[0]) and 0.5 < nan[1] < 0.9


def test_sample_pixels_leaves_ignored_and_nan_pixels_out():
    p = np.linspace(0, 1, 100).reshape(10, 10).astype(np.float32)
    p[0, 0] = np.nan
    y = p > 0.5
    valid = np.ones((10, 10), bool)
    valid[5:] = False
    ps, ys = sample_pixels(p, y, valid, 1000, np.random.default_rng(0))
    assert len(ps) == 49 and not np.isnan(ps).any() and ps.max() < p[5, 0]
    ps, _ = sample_pixels(p, y, None, 10, np.random.default_rng(0))
    assert len(ps) == 10


def brute_reliability(p, y, bins):
    """Bin i = [i / bins, (i + 1) / bins), the last one closed, by a loop over pixels."""
    count, sum_p, sum_y = np.zeros(bins, int), np.zeros(bins), np.zeros(bins)
    for q, t in zip(p, y):
        i = next(i for i in range(bins - 1, -1, -1) if q >= i / bins)
        count[i], sum_p[i], sum_y[i] = count[i] + 1, sum_p[i] + q, sum_y[i] + t
    return count, sum_p, sum_y


def test_reliability_and_ece_match_a_brute_force_loop_over_bins():
    rng = np.random.default_rng(5)
    p = rng.random(3000).astype(np.float32).astype(np.float64)
    p[:40], p[40:60] = 1.0, 0.0  # both ends; 1.0 lies in the last bin
    p[60:200] = rng.integers(0, 15, 140) / 16  # edges of other grids
    y = rng.random(3000) < p ** 1.5  # miscalibrated
    for bins in (15, 10, 4):
        count, sum_p, sum_y = brute_reliability(p, y, bins)
        r = reliability(p, y, bins)
        np.testing.assert_array_equal(r["count"], count)
        used = count > 0
        np.testing.assert_allclose(r["mean_probability"][used], sum_p[used] / count[used])
        np.testing.assert_allclose(r["frequency"][used], sum_y[used] / count[used])
        assert np.isnan(r["frequency"][~used]).all() and r["count"][-1] >= 40
        ece = np.sum(np.abs(sum_p[used] - sum_y[used])) / len(p)  # count-weighted |mean p - frequency|
        assert expected_calibration_error(p, y, bins) == pytest.approx(ece, rel=1e-12)


def test_temperature_at_the_bounds_when_every_pixel_is_right_or_wrong():
    p, y = np.array([0.9, 0.8, 0.1, 0.3]), np.array([1, 1, 0, 0], bool)
    assert fit_temperature(p, y) == pytest.approx(0.05)  # all right: sharpen as far as allowed
    assert fit_temperature(p, ~y) == pytest.approx(20.0)  # all wrong: soften as far as allowed
    assert fit_temperature(np.array([0.7, 0.4]), np.array([1, 0], bool)) == pytest.approx(0.05)
    with pytest.raises(ValueError, match="no pixels"):
        fit_temperature(np.zeros(0), np.zeros(0, bool))


def test_nan_probabilities_are_left_out_of_the_fit_and_the_measures():
    """A NaN probability (no prediction) used to turn the golden-section search's comparisons
    False, so the fit returned the upper bound 20, and made the ECE NaN."""
    _, p, y = known_case(n=20_000, seed=2)
    holes = p.copy()
    holes[::7] = np.nan
    keep = ~np.isnan(holes)
    assert fit_temperature(holes, y) == pytest.approx(fit_temperature(p[keep], y[keep]), rel=1e-9)
    assert 2.5 < fit_temperature(holes, y) < 3.5
    assert expected_calibration_error(holes, y) == pytest.approx(expected_calibration_error(p[keep], y[keep]))
    np.testing.assert_array_equal(reliability(holes, y)["count"], reliability(p[keep], y[keep])["count"])
    assert nll(holes, y) == pytest.approx(nll(p[keep], y[keep]))


@pytest.mark.parametrize("temperature", [0.0, -2.0, float("nan"), float("inf"), None])
def test_a_damaged_stored_temperature_is_refused_not_applied(temperature):
    """T = -2 used to swap foreground and background silently, T = 0 to make every pixel 0 or 1."""
    with pytest.raises(ValueError, match="temperature"):
        apply_temperature(np.array([0.2, 0.9]), temperature)
