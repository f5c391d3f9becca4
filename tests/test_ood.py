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
