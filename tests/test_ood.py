"""Out-of-distribution scores: the NumPy feature model, and a trained tiny model's features."""
from pathlib import Path

import numpy as np
import pytest

from xmdl_tf.confidence import auroc
from xmdl_tf.ood import FeatureDistribution, tile_origins



def test_feature_distribution_scores_shifted_data_high():
    rng = np.random.default_rng(0)
    d = 64
    basis = rng.normal(size=(d, d))
    train = rng.normal(size=(2000, d)) @ basis * 0.1 + 3.0
    held = rng.normal(size=(200, d)) @ basis * 0.1 + 3.0
    shifted = rng.normal(size=(200, d)) @ basis * 0.1 + 3.0 + rng.normal(size=d)  # another microscope: shifted features
    dist = FeatureDistribution.fit(train, k=8)
    s_in, s_out = dist.tile_scores(held), dist.tile_scores(shifted)
    assert np.median(s_in) == pytest.approx(1.0, rel=0.25)
    assert auroc(np.concatenate([s_out, s_in]), np.r_[np.ones(200, bool), np.zeros(200, bool)]) > 0.99
    dist.calibrate(list(s_in), 0.99)
    assert (s_out > dist.threshold).mean() > 0.95 and (s_in > dist.threshold).mean() <= 0.02


def test_save_and_load_round_trip(tmp_path):
    x = np.random.default_rng(1).normal(size=(50, 10))
    dist = FeatureDistribution.fit(x, k=4).calibrate([1.0, 2.0, 3.0], 0.5)
    dist.save(tmp_path / "ood.npz")
    again = FeatureDistribution.load(tmp_path / "ood.npz")
    np.testing.assert_allclose(again.tile_scores(x), dist.tile_scores(x))
    assert again.threshold == 2.0


def test_scores_match_a_brute_force_probabilistic_pca_distance():
    """sqrt((Mahalanobis distance in the k leading eigenvectors of the covariance + squared residual
    / mean variance of the other D - k eigenvalues) / D), from numpy.linalg.eigh of np.cov."""
    rng = np.random.default_rng(4)
    d, k = 12, 4
    x = rng.normal(size=(500, d)) @ rng.normal(size=(d, d))
    dist = FeatureDistribution.fit(x, k=k)
    ev, vec = np.linalg.eigh(np.cov(x.T))
    ev, vec = ev[::-1], vec[:, ::-1]
    y = rng.normal(size=(9, d)) * 3
    off = y - x.mean(0)
    proj = off @ vec[:, :k]
    brute = np.sqrt((np.sum(proj ** 2 / ev[:k], 1) + (np.sum(off ** 2, 1) - np.sum(proj ** 2, 1)) / ev[k:].mean()) / d)
    np.testing.assert_allclose(dist.tile_scores(y), brute, rtol=1e-9)
    assert dist.score(y) == pytest.approx(np.median(brute))


def test_the_threshold_is_the_linearly_interpolated_quantile_and_refuses_nan_scores():
    dist = FeatureDistribution.fit(np.random.default_rng(5).normal(size=(20, 4)), k=2)
    scores = [3.0, 1.0, 10.0, 2.0, 4.0]
    # 99th percentile of 5 scores: 4 + 0.96 * (10 - 4), between the two highest
    assert dist.calibrate(scores).threshold == pytest.approx(4 + 0.96 * (10 - 4))
    assert dist.calibrate([2.5]).threshold == 2.5
    for bad in ([1.0, float("nan"), 2.0], [], [1.0, float("inf")]):  # a NaN threshold would never warn
        with pytest.raises(ValueError, match="threshold"):
            dist.calibrate(bad)


def test_nan_or_constant_features():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(40, 5))
    x[:, 2] = 7.0  # a constant feature: in-distribution tiles still score about 1
    dist = FeatureDistribution.fit(x, k=2)
    fresh = rng.normal(size=(400, 5))
    fresh[:, 2] = 7.0
    assert 0.7 < np.median(dist.tile_scores(fresh)) < 1.3 and np.isfinite(dist.tile_scores(fresh)).all()
    x[3, 1] = np.nan  # was numpy's "SVD did not converge"
    with pytest.raises(ValueError, match="1 of 40 feature vectors hold NaN"):
        FeatureDistribution.fit(x)


def test_save_and_load_round_trip_every_field_exactly(tmp_path):
    x = np.random.default_rng(7).normal(size=(60, 10)).astype(np.float32)
    dist = FeatureDistribution.fit(x, k=3, tile=128, layers=("enc1_relu2", "enc2_relu2"), stats="mean_std")
    dist.calibrate([1.0, 1.5, 2.0])
    dist.save(tmp_path / "ood.npz")
    again = FeatureDistribution.load(tmp_path / "ood.npz")
    for name in ("mean", "components", "variances"):
        a, b = getattr(dist, name), getattr(again, name)
        assert a.dtype == b.dtype == np.float64 and a.shape == b.shape and np.array_equal(a, b)
    for name in ("residual_variance", "threshold", "tile", "layers", "stats"):
        assert getattr(again, name) == getattr(dist, name) and type(getattr(again, name)) is type(getattr(dist, name))
    FeatureDistribution.fit(x, k=3).save(tmp_path / "uncalibrated.npz")
    assert FeatureDistribution.load(tmp_path / "uncalibrated.npz").threshold == float("inf")


def test_a_damaged_ood_file_gives_one_error_naming_it(tmp_path):
    """Garbage, a cut-off file, a missing value, shapes that do not fit together, NaN: each one
    ValueError naming the file (np.load's own errors name neither it nor its role)."""
    dist = FeatureDistribution.fit(np.random.default_rng(8).normal(size=(30, 6)), k=2).calibrate([1.0, 2.0])
    dist.save(tmp_path / "good.npz")
    raw = (tmp_path / "good.npz").read_bytes()
    fields = dict(mean=dist.mean, components=dist.components, variances=dist.variances,
                  residual_variance=dist.residual_variance, threshold=dist.threshold)
    (tmp_path / "garbage.npz").write_bytes(b"not an archive")
    (tmp_path / "cut.npz").write_bytes(raw[: len(raw) // 2])
    np.savez(tmp_path / "missing.npz", **{k: v for k, v in fields.items() if k != "variances"})
    np.savez(tmp_path / "shapes.npz", **{**fields, "mean": dist.mean[:4]})
    np.savez(tmp_path / "nan.npz", **{**fields, "threshold": np.nan})
    np.savez(tmp_path / "zero.npz", **{**fields, "variances": np.zeros(2)})
    for name in ("garbage", "cut", "missing", "shapes", "nan", "zero"):
        path = tmp_path / f"{name}.npz"
        with pytest.raises(ValueError) as err:
            FeatureDistribution.load(path)
        assert str(err.value).startswith(f"{path}: ") and "out-of-distribution" in str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="absent.npz"):
        FeatureDistribution.load(tmp_path / "absent.npz")


def test_tile_origins_cover_and_cap():
    assert tile_origins((100, 100), 256) == [(0, 0)]
    grid = tile_origins((1024, 768), 256, k=100)
    assert len(grid) == 12 and grid[0] == (0, 0) and grid[-1] == (768, 512)
    assert len(tile_origins((4096, 4096), 256, k=16)) == 16


def test_a_trained_models_features_flag_inverted_contrast_and_another_texture(blob_run):
    """OOD score higher on an inverted-contrast image and on a different texture than on a test slice."""
    from conftest import blob_image
    from xmdl_tf.io import find_pairs, read_image
    from xmdl_tf.ood import image_features
    from xmdl_tf.predict import load_model

    data, run = blob_run
    pred = load_model(run, jit_compile=False)
    feats = np.concatenate([image_features(pred, read_image(p.image), tile=32)
                            for p in find_pairs(data, "train")])
    dist = FeatureDistribution.fit(feats, k=8)
    dist.calibrate([dist.score(image_features(pred, read_image(p.image), tile=32)) for p in find_pairs(data, "val")])
    test = read_image(find_pairs(data, "test")[0].image)
    inverted = 255 - blob_image(128, seed=300)[0]
    rng = np.random.default_rng(0)
    stripes = (128 + 100 * np.sin(np.arange(128) / 1.5)[None, :] + rng.normal(0, 5, (128, 128))).clip(0, 255)
    s_test = dist.score(image_features(pred, test, tile=32))
    s_inv = dist.score(image_features(pred, inverted.astype(np.uint8), tile=32))
    s_tex = dist.score(image_features(pred, stripes.astype(np.uint8), tile=32))
    assert s_inv > s_test and s_tex > s_test
    assert s_inv > dist.threshold and s_tex > dist.threshold
    # `zoom` resamples the slice as predict_slice's does: 128 px at x0.5 hold 2 x 2 tiles of 32, not 4 x 4
    assert image_features(pred, test, tile=32, zoom=0.5).shape[0] == 4
    assert image_features(pred, test, tile=32, zoom=1.0).shape[0] == 16


def test_the_shipped_models_ood_score_warns_on_inverted_and_foreign_texture_not_on_a_real_test_slice():
    """The built-in model's OOD model (ood.npz) against the packaged sample: section 15 of the Drosophila
    ssTEM *test* split, a slice it never trained on. It stays under the warning threshold; the same
    slice in inverted contrast, and a striped texture no microscope here makes, score above it."""
    from xmdl_tf.io import read_image
    from xmdl_tf.ood import model_distribution
    from xmdl_tf.predict import load_model

    pred = load_model("xmdl_ref_f8", jit_compile=False)
    dist = model_distribution(pred)
    assert dist is not None and np.isfinite(dist.threshold)
    image = read_image(Path(__file__).resolve().parents[1] / "xmdl_tf" / "sample" / "x" / "im0015.png")
    rng = np.random.default_rng(0)
    stripes = (128 + 90 * np.sin(np.arange(image.shape[1]) / 1.5)[None, :]
               + rng.normal(0, 5, image.shape)).clip(0, 255).astype(np.uint8)
    real = dist.image_score(pred, image, 4.6)
    inverted = dist.image_score(pred, (255 - image).astype(np.uint8), 4.6)
    texture = dist.image_score(pred, stripes, 4.6)
    assert real < dist.threshold
    assert inverted > dist.threshold and texture > dist.threshold
    assert min(inverted, texture) > real
