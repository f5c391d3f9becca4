from pathlib import Path

import numpy as np
import pytest

from xmdl_tf.tiling import auto_batch_size, fit_tile, plan_tiles, predict_tiled, seam_overlap, tile_starts, window_1d


def test_tile_starts_cover():
    for length, tile, ov in [(100, 32, 8), (32, 32, 8), (20, 32, 8), (1000, 256, 64)]:
        starts = tile_starts(length, tile, ov)
        covered = np.zeros(max(length, tile), bool)
        for s in starts:
            covered[s: s + tile] = True
        assert covered[:length].all()
        assert all(b - a <= tile - ov for a, b in zip(starts, starts[1:]))
    with pytest.raises(ValueError):
        tile_starts(100, 32, 32)


def test_tile_starts_aligned_and_evenly_spread():
    for length, tile, ov, align in [(4096, 1440, 96, 32), (1000, 384, 64, 32), (1024, 480, 192, 32), (777, 64, 8, 8)]:
        starts = tile_starts(length, tile, ov, align)
        assert all(s % align == 0 for s in starts[:-1]) and starts[-1] == length - tile
        steps = np.diff(starts)
        assert steps.max() <= tile - ov and steps.max() - steps.min() <= 2 * align  # even, up to snapping
        assert seam_overlap(starts, tile) >= ov
    assert seam_overlap([0], 64) == 0
    assert auto_batch_size((512, 512)) == 4 and auto_batch_size((1440, 1440)) == 1


def test_windows_complement():
    left = window_1d(64, 16, 4, left=False, right=True)
    right = window_1d(64, 16, 4, left=True, right=False)
    overlap = left[-16:] + right[:16]
    np.testing.assert_allclose(overlap[4:-4], 1.0, atol=1e-6)  # Hann ramps hand over exactly
    assert left[0] == 1 and left[-1] == 0 and right[0] == 0


def test_plan_small_indivisible_and_evened_out():
    (th, tw), (ph, pw), origins = plan_tiles((20, 70), 64, 16, 8)
    assert (th, tw) == (24, 48) and (ph, pw) == (24, 70) and len(origins) == 2
    (th, tw), _, origins = plan_tiles((4096, 4096), 1024, 64, 32)
    assert th == tw == 896 and len(origins) == 25  # 5 x 5 evenly spread tiles instead of 5 x 5 of 1024
    (th, tw), _, origins = plan_tiles((4096, 4096), 2048, 64, 32)
    assert th == 1408 and len(origins) == 9  # the default: 6% of the pixels computed twice
    assert fit_tile(1000, 512, 32, 32) == 384 and fit_tile(100, 256, 32, 32) == 128
    with pytest.raises(ValueError, match="divisible"):
        plan_tiles((100, 100), 60, 8, 16)


def identity_channels(x):
    return np.concatenate([1 - x, x], -1)


@pytest.mark.parametrize("shape", [(37, 53), (200, 130), (128, 128)])
def test_pointwise_model_stitches_exactly(shape):
    img = np.random.default_rng(0).random(shape).astype(np.float32)
    out = predict_tiled(identity_channels, img, tile=64, overlap=16, divisor=8, batch_size=3)
    assert out.shape == (*shape, 2)
    np.testing.assert_allclose(out[..., 1], img, atol=1e-6)


def test_stitched_equals_whole_image_prediction_of_a_conv_net():
    """Tiled == untiled away from the border for a fully convolutional U-Net."""
    from xmdl_tf.model import build_model
    from xmdl_tf.predict import receptive_field

    model = build_model(depth=2, base_filters=4)
    fn = lambda x: model(x, training=False).numpy()  # noqa: E731
    rf = receptive_field(fn, size=64)
    assert 5 < rf < 64
    img = np.random.default_rng(1).random((300, 340)).astype(np.float32)
    overlap = 2 * rf + 8
    whole = fn(img[None, ..., None])[0]
    tile = 2 * overlap + 32  # several tiles per axis, each overlap discarding rf pixels per side
    assert len(plan_tiles(img.shape, tile, overlap, 2)[2]) >= 4
    tiled = predict_tiled(fn, img, tile=tile, overlap=overlap, divisor=2, batch_size=4, margin=rf)
    inner = (slice(rf, -rf), slice(rf, -rf))
    np.testing.assert_allclose(tiled[inner], whole[inner], atol=1e-4)


def test_dihedral_mean_is_exact_for_equivariant_and_restores_orientation():
    from xmdl_tf.predict import dihedral_mean

    x = np.random.default_rng(0).random((2, 16, 16, 1)).astype(np.float32)
    np.testing.assert_allclose(dihedral_mean(lambda t: t * 2, x), x * 2, atol=1e-6)
    # A position-dependent function: its TTA is the mean over the symmetry group, still aligned with x.
    ramp = np.arange(16, dtype=np.float32)[None, :, None, None]
    out = dihedral_mean(lambda t: t + ramp, x)
    np.testing.assert_allclose(out, x + 7.5, atol=1e-5)


def test_wide_models_are_run_on_tiles_under_the_measured_speed_cliff():
    """16 base filters: tiles of at most 1792 px (1888 px ran 30x slower under oneDNN); 8 keep the
    2048-px default; wider models get smaller tiles; always a multiple of the size divisor. The
    predictor applies the cap to the tile it is asked for, and an image that once went through in
    one 2048-px tile now goes through in several."""
    from xmdl_tf.config import Config, ModelConfig
    from xmdl_tf.model import build_model
    from xmdl_tf.predict import Predictor
    from xmdl_tf.tiling import max_tile

    assert max_tile(16) == 1792 and max_tile(8) >= 2048 and max_tile(32) < 1792
    assert all(max_tile(f) % 32 == 0 and max_tile(f, 64) % 64 == 0 for f in (4, 8, 12, 16, 24, 32, 64, 1000))
    assert max_tile(10 ** 9) == 32  # never below one divisor
    model = build_model(depth=2, base_filters=2)
    wide = Predictor(model, Config(model=ModelConfig(depth=2, base_filters=16)), Path("m"))
    narrow = Predictor(model, Config(model=ModelConfig(depth=2, base_filters=8)), Path("m"))
    assert wide.tile_for(2048) == 1792 and wide.tile_for(1024) == 1024 and narrow.tile_for(2048) == 2048
    seen = []
    real = wide._fn
    wide._fn = lambda x: (seen.append(x.shape[1:3]), real(x))[1]  # the real model; records each call's tile
    wide.predict_slice(np.zeros((2048, 2048), np.uint8), tile=2048)
    assert len(seen) > 1 and max(max(s) for s in seen) <= 1792


def test_check_width_judges_the_strip_on_the_models_grid():
    from xmdl_tf.io import DataError
    from xmdl_tf.tiling import check_width

    check_width((500, 32), 1.0, 32)  # exactly one divisor wide
    check_width((500, 8), 4.0, 32)  # 8 px of 20 nm are 32 px of a 5-nm model
    with pytest.raises(DataError, match=r"image of 3 x 500 px: narrower than 32 px"):
        check_width((3, 500), 1.0, 32)
    with pytest.raises(DataError, match=r"slices of 64 x 16 px \(x0.5 on the model's grid\): narrower"):
        check_width((64, 16), 0.5, 32, "slices")
