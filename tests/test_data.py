import numpy as np
import pytest

from xmdl_tf.config import DataConfig
from xmdl_tf.data import IGNORE, SliceRegion, augment, grid_tiles, holdout_split, normalize_np, target_from_label, training_dataset, validation_dataset
from xmdl_tf.io import split_pairs

from conftest import blob_image


@pytest.mark.parametrize("dtype,scale", [(np.uint8, 1), (np.uint16, 250)])
def test_normalize_matches_numpy_percentiles(dtype, scale):
    img = (blob_image(96, seed=3)[0].astype(np.int64) * scale).astype(dtype)
    out = normalize_np(img)
    lo, hi = np.percentile(img, [1.0, 99.8], method="inverted_cdf")
    ref = np.clip((img.astype(np.float64) - lo) / (hi - lo), 0, 1)
    assert out.dtype == np.float32 and out.shape == img.shape
    np.testing.assert_allclose(out, ref, atol=1e-6)


def test_normalize_is_scale_invariant_between_8_and_16_bit():
    img = blob_image(64)[0]
    np.testing.assert_allclose(normalize_np(img), normalize_np(img.astype(np.uint16) * 256), atol=1e-6)


def test_target_from_label_ignore():
    lbl = np.array([[0, 1, 5], [255, 0, 2]], np.uint8)
    np.testing.assert_array_equal(target_from_label(lbl), [[0, 1, 1], [1, 0, 1]])
    np.testing.assert_array_equal(target_from_label(lbl, 255), [[0, 1, 1], [IGNORE, 0, 1]])


def test_training_tiles_shapes_ranges_and_foreground_sampling(blob_dataset):
    regions = [SliceRegion(p) for p in split_pairs(blob_dataset, "train")]
    cfg = DataConfig(tile_size=32, tiles_per_slice=4, shuffle_buffer=16)
    x, y = next(iter(training_dataset(regions, cfg, batch_size=8, seed=1)))
    assert x.shape == (8, 32, 32, 1) and y.shape == (8, 32, 32, 1)
    assert x.dtype.name == "float32" and y.dtype.name == "float32"
    assert 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 1.0
    assert set(np.unique(y.numpy())) <= {0.0, 1.0}

    def fg_share(fraction):
        ds = training_dataset(regions, DataConfig(tile_size=16, tiles_per_slice=8, foreground_fraction=fraction,
                                                  augment=False), batch_size=16, seed=0)
        ys = np.concatenate([b[1].numpy() for b in ds.take(10)])
        return float(np.mean(ys.reshape(len(ys), -1).max(axis=1) > 0))

    uniform, focused = fg_share(0.0), fg_share(0.9)
    assert focused >= 0.85 and focused > uniform


def test_augment_keeps_image_and_label_aligned():
    import tensorflow as tf

    img, msk = blob_image(32)
    xy = tf.constant(np.stack([normalize_np(img), msk.astype(np.float32)], -1))
    for s in range(6):
        out = augment(xy, tf.constant([s, 7], tf.int64), strength=0.0).numpy()
        # Geometric only: the label must be the same rotation/flip of the image's dark discs.
        dark = out[..., 0] < 0.45
        assert np.mean(dark == (out[..., 1] > 0.5)) > 0.97
    out = augment(xy, tf.constant([1, 2], tf.int64), strength=2.0).numpy()
    assert out[..., 0].min() >= 0 and out[..., 0].max() <= 1
    assert set(np.unique(out[..., 1])) <= {0.0, 1.0}


def test_validation_grid_is_deterministic_and_covers_each_pixel_once(tmp_path):
    from conftest import write_split

    write_split(tmp_path, "val", 2, size=100)  # 100 is not a multiple of 32: edges padded
    regions = [SliceRegion(p) for p in split_pairs(tmp_path, "val")]
    ds = validation_dataset(regions, DataConfig(tile_size=32), batch_size=5)
    a = np.concatenate([y.numpy() for _, y in ds])
    b = np.concatenate([y.numpy() for _, y in ds])
    np.testing.assert_array_equal(a, b)
    assert len(a) == 2 * 16  # ceil(100/32)**2 tiles per slice
    assert int((a >= 0).sum()) == 2 * 100 * 100  # every real pixel once; padding ignored


def test_grid_tiles_reassemble():
    import tensorflow as tf

    xy = np.random.default_rng(0).random((64, 96, 2)).astype(np.float32)
    t = grid_tiles(tf.constant(xy), 32).numpy()
    assert t.shape == (6, 32, 32, 2)
    np.testing.assert_array_equal(t[4], xy[32:64, 32:64])


def test_holdout_split_bands(blob_dataset):
    pairs = split_pairs(blob_dataset, "train")
    tr, va = holdout_split(pairs, 0.25)
    assert tr[0].row_to == va[0].row_from == 0.75 and len(tr) == len(va) == 4
    ds = validation_dataset(va, DataConfig(tile_size=32), batch_size=64)
    y = np.concatenate([b[1].numpy() for b in ds])
    assert int((y >= 0).sum()) == 4 * 32 * 128  # bottom 25% of rows of each 128 x 128 slice
    with pytest.raises(ValueError):
        holdout_split(pairs, 1.0)


def test_validation_cardinality_declared(tmp_path):
    from conftest import write_split

    write_split(tmp_path, "val", 2, size=100)
    pairs = split_pairs(tmp_path, "val")
    tr, va = holdout_split(pairs, 0.3)
    ds = validation_dataset(va, DataConfig(tile_size=32), batch_size=3, shapes=[(100, 100)] * 2)
    assert int(ds.cardinality()) == len(list(ds)) == 3  # 2 slices x (1 x 4) tiles of the 30-row band, in 3s
