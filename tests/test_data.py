import numpy as np
import pytest

from xmdl_tf.config import DataConfig
from xmdl_tf.data import IGNORE, SliceRegion, holdout_split, normalize_np, target_from_label, training_dataset, validation_dataset
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


def test_normalize_numpy_equals_tensorflow():
    from xmdl_tf.data import normalize

    rng = np.random.default_rng(1)
    for img in (blob_image(96, seed=3)[0], (rng.gamma(2.0, 3000.0, (50, 70))).clip(0, 65535).astype(np.uint16),
                rng.normal(100, 30, (40, 40)).clip(0, 255)):  # float input: rounded first
        np.testing.assert_allclose(normalize_np(img), normalize(img).numpy(), atol=1e-6)


def test_training_tiles_shapes_ranges_and_foreground_sampling(blob_dataset):
    regions = [SliceRegion(p) for p in split_pairs(blob_dataset, "train")]
    cfg = DataConfig(tile_size=32, tiles_per_slice=4, shuffle_buffer=16)
    x, y = next(iter(training_dataset(regions, cfg, batch_size=8, seed=1)))
    assert x.shape == (8, 32, 32, 1) and y.shape == (8, 32, 32, 1)
    assert x.dtype.name == "float32" and y.dtype.name == "float32"
    assert 0.0 <= float(x.numpy().min()) and float(x.numpy().max()) <= 1.0
    assert set(np.unique(y.numpy())) <= {-1.0, 0.0, 1.0}

    def fg_share(fraction):
        ds = training_dataset(regions, DataConfig(tile_size=16, tiles_per_slice=8, foreground_fraction=fraction,
                                                  augment=False), batch_size=16, seed=0)
        ys = np.concatenate([b[1].numpy() for b in ds.take(10)])
        return float(np.mean(ys.reshape(len(ys), -1).max(axis=1) > 0))

    uniform, focused = fg_share(0.0), fg_share(0.9)
    assert focused >= 0.85 and focused > uniform


def test_plain_tiles_are_exact_crops(blob_dataset):
    """Without augmentation, at the native pixel size, tiles are crops of the normalised slice."""
    from xmdl_tf.sampling import TileSampler, TrainingSet, load_region

    regions = [SliceRegion(p) for p in split_pairs(blob_dataset, "train")]
    slices = [load_region(r) for r in regions]
    sampler = TileSampler([TrainingSet("b", regions)], DataConfig(tile_size=32, tiles_per_slice=4, augment=False), None, 3)
    x, y = sampler.group(0)
    for xt, yt in zip(x[..., 0], y[..., 0]):
        found = False
        for img, tgt in slices:
            hits = np.argwhere(np.all(np.lib.stride_tricks.sliding_window_view(img, (32, 32)) == xt, axis=(2, 3)))
            if len(hits):
                r, c = hits[0]
                np.testing.assert_array_equal(tgt[r:r + 32, c:c + 32], yt)
                found = True
                break
        assert found


def test_balanced_sampling_follows_set_weights(tmp_path):
    """Tiles come from each set in proportion to its weight, not to its number of slices."""
    import cv2
    import tifffile
    from conftest import write_split
    from xmdl_tf.sampling import TileSampler, TrainingSet

    write_split(tmp_path / "big", "train", 12, size=64)
    for d in ("train/x", "train/y"):
        (tmp_path / "small" / d).mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "small/train/x/im0000.png"), blob_image(64, seed=9)[0])
    tifffile.imwrite(tmp_path / "small/train/y/seg0000.tif", np.ones((64, 64), np.uint8))  # all foreground: recognisable
    big = [SliceRegion(p) for p in split_pairs(tmp_path / "big", "train")]
    small = [SliceRegion(p) for p in split_pairs(tmp_path / "small", "train")]
    cfg = DataConfig(tile_size=32, tiles_per_slice=1, shuffle_buffer=8, augment=False)
    for w_small, expected in ((1.0, 0.5), (3.0, 0.75)):
        sampler = TileSampler([TrainingSet("big", big, weight=1.0), TrainingSet("small", small, weight=w_small)], cfg, None)
        y = np.concatenate([sampler.group(g)[1] for g in range(40)])  # 320 tiles
        share = np.mean(y.reshape(len(y), -1).min(axis=1) == 1.0)
        assert abs(share - expected) < 0.08, (w_small, share)


def test_resampling_to_model_pixel_size_scales_objects(tmp_path):
    """A set at 2x the model's pixel size is enlarged 2x in training tiles and validation tiles."""
    from xmdl_tf.sampling import TileSampler, TrainingSet, validation_tiles

    import cv2
    import tifffile

    img = np.full((96, 96), 200, np.uint8)
    msk = np.zeros((96, 96), np.uint8)
    msk[40:56, 40:56] = 1  # a 16 x 16 square
    img[msk > 0] = 60
    for d in ("train/x", "train/y"):
        (tmp_path / d).mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(tmp_path / "train/x/im0000.png"), img)
    tifffile.imwrite(tmp_path / "train/y/seg0000.tif", msk)
    region = SliceRegion(split_pairs(tmp_path, "train")[0])
    _, vy = validation_tiles(region, 64, factor=2.0)
    assert vy.shape == (9, 64, 64, 1) and int((vy > 0.5).sum()) == 32 * 32
    sampler = TileSampler([TrainingSet("s", [region], factor=2.0)],
                          DataConfig(tile_size=64, tiles_per_slice=4, foreground_fraction=1.0, augment=False), None)
    _, y = sampler.group(0)
    areas = [(t > 0.5).sum() for t in y[..., 0]]
    assert max(areas) == 32 * 32


def test_em_augmentation_keeps_image_and_label_aligned():
    """Any rotation, zoom and elastic field move image and label together."""
    from xmdl_tf.augment import warp_tile, elastic_field
    from xmdl_tf.config import AugmentConfig
    from xmdl_tf.sampling import sample_tiles

    img, msk = blob_image(128, seed=4, n=10)
    x, y = normalize_np(img), msk.astype(np.float32)
    rng = np.random.default_rng(0)
    xs, ys = sample_tiles(x, y, rng, 16, 64, 1.0, 0.0, AugmentConfig(blur=0, contrast=0, brightness=0, gamma=0,
                                                                      noise=0, poisson=0, stripes=0, illumination=0))
    valid = ys >= 0
    assert valid.mean() > 0.95
    dark = xs < 0.45  # discs are dark, background bright
    assert np.mean(dark[valid] == (ys[valid] > 0.5)) > 0.95
    assert set(np.unique(ys)) <= {-1.0, 0.0, 1.0}
    # An identity warp is an exact crop; a quarter turn is np.rot90 of it.
    a, _ = warp_tile(x, y, (63.5, 63.5), 64)
    np.testing.assert_array_equal(a, x[32:96, 32:96])
    b, _ = warp_tile(x, y, (63.5, 63.5), 64, angle=np.pi / 2)
    np.testing.assert_allclose(b, np.rot90(x[32:96, 32:96], -1), atol=1e-5)
    f = elastic_field(rng, 64, 5.0)
    assert f.shape == (2, 64, 64) and 1.0 < f.std() < 10.0


@pytest.mark.parametrize("part", ["blur", "sharpen", "texture", "contrast", "noise", "poisson", "stripes", "illumination"])
def test_each_intensity_augmentation_changes_the_image_in_range(part):
    from dataclasses import replace

    from xmdl_tf.augment import augment_intensity
    from xmdl_tf.config import AugmentConfig

    x = normalize_np(blob_image(64, seed=2)[0])
    only = replace(AugmentConfig(), sharpen=1.0, texture=0.5).without(*[c for c in AugmentConfig.COMPONENTS if c != part])
    changed = 0
    for seed in range(40):
        out = augment_intensity(x.copy(), np.random.default_rng(seed), only)
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
        changed += not np.allclose(out, x, atol=1e-4)
    assert changed >= 2  # the probabilistic ones fire on some tiles
    none = AugmentConfig().without(*AugmentConfig.COMPONENTS)
    np.testing.assert_allclose(augment_intensity(x.copy(), np.random.default_rng(0), none), x, atol=1e-6)


def test_random_texture_changes_the_grain_and_keeps_the_tissue():
    """The random network's image keeps the tile's mean, spread and polarity (membranes stay
    dark), changes its fine texture, and is mixed in at the weight asked for."""
    from xmdl_tf.augment import random_texture

    x = normalize_np(blob_image(96, seed=5)[0])
    np.testing.assert_allclose(random_texture(x, np.random.default_rng(0), 0.0), x, atol=1e-6)
    flat = np.full((32, 32), 0.4, np.float32)
    np.testing.assert_array_equal(random_texture(flat, np.random.default_rng(0), 1.0), flat)
    differs = 0
    for seed in range(12):
        y = random_texture(x, np.random.default_rng(seed), 1.0)
        assert y.dtype == np.float32 and y.shape == x.shape and 0 <= y.min() and y.max() <= 1
        assert abs(float(y.mean()) - float(x.mean())) < 0.1
        assert np.corrcoef(x.ravel(), y.ravel())[0, 1] > 0  # never inverted
        differs += np.corrcoef(x.ravel(), y.ravel())[0, 1] < 0.99
        half = random_texture(x, np.random.default_rng(seed), 0.5)
        # mixing is linear before the clip: half way between the tile and the full texture
        inside = (y > 0) & (y < 1)
        np.testing.assert_allclose(half[inside], (0.5 * (x + y))[inside], atol=1e-5)
    assert differs >= 6


def test_sharpen_and_defocus_move_fine_detail_in_opposite_directions():
    """Defocus takes high-frequency energy away, sharpening adds it."""
    from dataclasses import replace

    from xmdl_tf.augment import augment_intensity, defocus, sharpen
    from xmdl_tf.config import AugmentConfig

    x = normalize_np(blob_image(96, seed=4)[0])

    def detail(img):
        return float(np.mean(np.diff(img, axis=0) ** 2) + np.mean(np.diff(img, axis=1) ** 2))

    assert detail(sharpen(x, 1.0, 1.5)) > 1.3 * detail(x) > 1.3 * detail(defocus(x, 1.5))
    # Sharpening takes the tiles defocus leaves alone (about half) and nothing else: the
    # defocused tiles, and every later part's random draw on them, are as without it.
    off, on = AugmentConfig(), replace(AugmentConfig(), sharpen=1.0)
    same = [np.array_equal(augment_intensity(x.copy(), np.random.default_rng(s), off),
                           augment_intensity(x.copy(), np.random.default_rng(s), on)) for s in range(16)]
    assert 3 <= sum(same) <= 13


def test_pydataset_gives_the_same_batches_as_tf_data(tmp_path):
    """The backend-neutral PyDataset and tf.data cut the same tile stream, batch for batch."""
    from conftest import write_split
    from xmdl_tf.pydata import TrainingTiles
    from xmdl_tf.sampling import TrainingSet

    write_split(tmp_path / "a", "train", 3, size=96)
    write_split(tmp_path / "b", "train", 2, size=80, seed=30)
    sets = [TrainingSet("a", [SliceRegion(p) for p in split_pairs(tmp_path / "a", "train")], factor=1.0, weight=2),
            TrainingSet("b", [SliceRegion(p) for p in split_pairs(tmp_path / "b", "train")], factor=1.3, weight=1)]
    cfg = DataConfig(tile_size=32, tiles_per_slice=3, shuffle_buffer=12, foreground_fraction=0.5)
    # 12 tiles a group; start mid-group, as a resumed run does: 30 tiles span 4 groups.
    tfd = list(training_dataset(sets, cfg, batch_size=5, seed=7, start_tile=29).take(6))
    pyd = TrainingTiles(sets, cfg, batch_size=5, seed=7, start_tile=29)
    for i, (x, y) in enumerate(tfd):
        px, py = pyd[i]
        np.testing.assert_array_equal(px, x.numpy())
        np.testing.assert_array_equal(py, y.numpy())
    assert not np.array_equal(pyd[0][0], pyd[1][0])
    # Resuming at tile 29 continues the stream that started at tile 0.
    whole = np.concatenate([b[0].numpy() for b in training_dataset(sets, cfg, batch_size=1, seed=7).take(34)])
    np.testing.assert_array_equal(whole[29:34], tfd[0][0].numpy())


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
    from xmdl_tf.sampling import grid_tiles_np

    rng = np.random.default_rng(0)
    x, y = rng.random((64, 96)).astype(np.float32), rng.random((64, 96)).astype(np.float32)
    tx, ty = grid_tiles_np(x, y, 32)
    assert tx.shape == ty.shape == (6, 32, 32, 1)
    np.testing.assert_array_equal(tx[4, ..., 0], x[32:64, 32:64])
    np.testing.assert_array_equal(ty[5, ..., 0], y[32:64, 64:96])


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


def test_zoomed_out_tiles_are_as_smooth_as_inference_resampling():
    """Training's blur-then-sample matches cv2.INTER_AREA (what inference uses) in noise level,
    and validation labels stay centred on their image when a set is shrunk."""
    import cv2
    from xmdl_tf.augment import warp_tile
    from xmdl_tf.sampling import resample_pair

    noise = np.random.default_rng(0).random((600, 600)).astype(np.float32)
    for step in (1.5, 2.0, 3.0):
        train, _ = warp_tile(noise, np.zeros_like(noise), (299.5, 299.5), 128, step=step)
        infer = cv2.resize(noise, None, fx=1 / step, fy=1 / step, interpolation=cv2.INTER_AREA)
        assert train.std() == pytest.approx(infer.std(), rel=0.25), step
    cols = np.tile(np.arange(64, dtype=np.float32), (64, 1))
    x, y = resample_pair(cols, cols.copy(), 0.25)  # plain INTER_NEAREST would be 1.5 px off
    np.testing.assert_allclose(y[0], x[0], atol=0.51)  # nearest label within half a source pixel of the image


def test_loader_threads_build_each_group_once_and_agree(tmp_path):
    """Many loader threads asking for batches of the same groups at once (a GPU machine's
    PyDataset) get the same tiles as one thread, and each group is built once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from conftest import write_split
    from xmdl_tf.sampling import TileSampler, TrainingSet

    write_split(tmp_path / "a", "train", 3, size=96)
    sets = [TrainingSet("a", [SliceRegion(p) for p in split_pairs(tmp_path / "a", "train")], factor=1.0, weight=1)]
    cfg = DataConfig(tile_size=32, tiles_per_slice=3, shuffle_buffer=12)
    ref = TileSampler(sets, cfg, None, seed=3)
    expected = [ref.batch(i, 4) for i in range(12)]  # 3 batches a group, 4 groups
    sampler = TileSampler(sets, cfg, None, seed=3)
    sampler.cache_groups = 8
    built, lock, plain = [], threading.Lock(), sampler.group

    def counted(g):
        with lock:
            built.append(g)
        return plain(g)

    sampler.group = counted
    with ThreadPoolExecutor(8) as ex:
        got = list(ex.map(lambda i: sampler.batch(i, 4), [i for i in range(12) for _ in range(3)]))
    for k, (x, y) in enumerate(got):
        np.testing.assert_array_equal(x, expected[k // 3][0])
        np.testing.assert_array_equal(y, expected[k // 3][1])
    assert sorted(built) == [0, 1, 2, 3]


def test_loader_processes_build_the_same_tiles(tmp_path, monkeypatch):
    """Groups built by worker processes (spawned, one slice per job) equal those built in the
    calling thread, augmentation included; the PyDataset takes the count from the environment."""
    from conftest import write_split
    from xmdl_tf.config import AugmentConfig
    from xmdl_tf.pydata import TrainingTiles, loader_processes
    from xmdl_tf.sampling import TileSampler, TrainingSet

    for name in ("a", "b"):
        write_split(tmp_path / name, "train", 2, size=96)
    sets = [TrainingSet(n, [SliceRegion(p) for p in split_pairs(tmp_path / n, "train")], factor=f, weight=1)
            for n, f in (("a", 1.0), ("b", 1.25))]
    cfg = DataConfig(tile_size=32, tiles_per_slice=3, shuffle_buffer=12)
    aug = AugmentConfig.preset("em")
    ref = TileSampler(sets, cfg, aug, seed=5)
    par = TileSampler(sets, cfg, aug, seed=5, processes=2)
    try:
        for g in (0, 1, 7):
            for a, b in zip(ref.group(g), par.group(g)):
                np.testing.assert_array_equal(a, b)
        assert par._pool is not None
    finally:
        par.close()
    assert par._pool is None
    np.testing.assert_array_equal(par.group(2)[0], ref.group(2)[0])  # closed: built in this thread again
    monkeypatch.setenv("XMDL_LOADER_PROCESSES", "3")
    assert loader_processes() == 3
    tiles = TrainingTiles(sets, cfg, 4, seed=5, augment=aug)
    assert tiles.sampler.processes == 3 and tiles.sampler._pool is None  # started on first use only
    monkeypatch.setenv("XMDL_LOADER_PROCESSES", "many")
    with pytest.raises(ValueError, match="XMDL_LOADER_PROCESSES"):
        loader_processes()


def test_equalize_numpy_equals_tensorflow_and_is_blind_to_monotone_contrast():
    from xmdl_tf.data import normalize

    img = blob_image(96, seed=3)[0]
    rng = np.random.default_rng(2)
    for x in (img, rng.gamma(2.0, 3000.0, (50, 70)).clip(0, 65535).astype(np.uint16),
              rng.normal(100, 30, (40, 40)).clip(0, 255)):  # float input: rounded first
        np.testing.assert_allclose(normalize_np(x, method="equalize"), normalize(x, method="equalize").numpy(),
                                   atol=1e-6)
    eq = normalize_np(img, method="equalize")
    assert eq.dtype == np.float32 and 0 < eq.min() and eq.max() < 1
    # The mid-rank of each grey value: pixels below it plus half of those equal to it.
    v = int(np.median(img))
    assert eq[img == v][0] == pytest.approx(((img < v).sum() + 0.5 * (img == v).sum()) / img.size)
    # Any strictly increasing change of grey values (16-bit, gamma 0.5, an offset) gives the same
    # input to the network; inverted contrast gives its mirror. Percentile normalisation differs.
    gamma = np.round(60000 * (img / 255.0) ** 0.5 + 3000).astype(np.uint16)
    np.testing.assert_allclose(normalize_np(gamma, method="equalize"), eq, atol=1e-6)
    np.testing.assert_allclose(normalize_np(255 - img, method="equalize"), 1 - eq, atol=1e-6)
    assert np.abs(normalize_np(gamma) - normalize_np(img)).max() > 0.05


@pytest.mark.parametrize("method", ["percentile", "equalize"])
def test_a_piece_is_normalised_as_its_whole_slice(method):
    from xmdl_tf.sampling import grey_counts, normalize_as

    img = blob_image(96, seed=5)[0]
    norm = {"method": method, "low": 1.0, "high": 99.8, "clip": True}
    piece = img[10:50, 30:90]
    whole = normalize_as(img, norm)[10:50, 30:90]
    np.testing.assert_array_equal(normalize_as(piece, norm, grey_counts(img)), whole)
    assert np.abs(normalize_as(piece, norm) - whole).max() > 1e-3  # its own histogram differs
    # A 16-bit slice's histogram, cut at its highest grey value, normalises the same.
    wide = img.astype(np.uint16) * 200
    np.testing.assert_allclose(normalize_as(wide[10:50], norm, grey_counts(wide)[:wide.max() + 1]),
                               normalize_as(wide, norm)[10:50], atol=1e-6)


def test_normalization_settings_are_checked_and_name_the_file(tmp_path):
    import json

    from xmdl_tf.config import Config

    good = Config(normalization={"method": "equalize", "low": 1.0, "high": 99.8, "clip": True})
    assert Config.from_dict(json.loads(json.dumps(good.to_dict()))).normalization["method"] == "equalize"
    for bad, msg in (({"method": "clahe"}, "'clahe' is not one of"), ({"low": 99.0, "high": 1.0}, "low < high"),
                     ({"gamma": 1}, "unknown key"), ("percentile", "expected an object")):
        (tmp_path / "config.json").write_text(json.dumps({**good.to_dict(), "normalization": bad}))
        with pytest.raises(ValueError, match=msg) as err:
            Config.load(tmp_path / "config.json")
        assert f"{tmp_path / 'config.json'}['normalization']" in str(err.value)


def test_the_trainer_validates_with_at_least_256_px_of_context(tmp_path):
    """Small training tiles (the napari dock picks them for small crops) are not what epochs are chosen
    on: validation tiles reach 256 px, or cover the region when it is smaller, and stay multiples of the
    training tile (so of the network's size divisor)."""
    from conftest import write_split

    from xmdl_tf.sampling import selection_tiles, validation_tile

    assert validation_tile(64, (1024, 1024)) == 256 and validation_tile(96, (1024, 768)) == 288
    assert validation_tile(256, (1024, 1024)) == 256 and validation_tile(512, (2048, 2048)) == 512
    assert validation_tile(64, (100, 120)) == 128  # the region is smaller: one tile covers it
    write_split(tmp_path, "val", 1, size=300)
    region = SliceRegion(split_pairs(tmp_path, "val")[0])
    x, y = selection_tiles(region, 64)
    assert x.shape == y.shape == (4, 256, 256, 1)
    assert int((y >= 0).sum()) == 300 * 300  # every pixel once; padding ignored
