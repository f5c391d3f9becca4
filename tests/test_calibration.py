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
