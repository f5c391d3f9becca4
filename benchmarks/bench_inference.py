"""Inference speed: raw model calls on tiles vs whole-slice stitched inference, and the seams.

    python benchmarks/bench_inference.py [--model xmdl_ref] [--size 4096] [--data ../shared/data/SET]

Measured in one run on the same model, for several tile sizes, overlaps and
XLA on/off:
- raw: compiled calls on batches of tiles of the shape the slice plan uses
  (tiles/s, and the seconds those calls would need for the slice's pixels),
  and Keras' `model.predict` on the same tiles;
- stitched: `Predictor.predict_slice` on a SIZE x SIZE slice (seconds per
  slice, normalisation and blending included);
- overhead = stitched / raw - 1 (against `model.predict` and against the
  bare calls), beside the part that recomputes the overlaps (tile pixels /
  slice pixels - 1); the rest is normalising, copying, blending.
With --data (a set with test/x) and a trained --model, the context section
then measures how far from a cut tile edge predictions still differ from a
one-pass prediction of the whole slice (this sets the blending margin), and
how many mask pixels a stitched slice differs in, per overlap: with small
tiles (many seams) and at the default tile size on a SIZE x SIZE mosaic of
the test slices.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table  # noqa: E402


def predictor(model: str | None, base: int, jit: bool | str = "auto"):
    from xmdl_tf.config import Config, ModelConfig
    from xmdl_tf.model import build_model
    from xmdl_tf.predict import Predictor, load_model

    if model:
        return load_model(model, jit_compile=jit)
    return Predictor(build_model(6, base), Config(model=ModelConfig(base_filters=base)), Path("untrained"), jit)


def timings(pred, image, tile: int, overlap: int, tile_shape: tuple[int, int], n_tiles: int, batch: int,
            rounds: int = 3) -> tuple[float, float, float]:
    """(raw tiles/s, `model.predict` tiles/s, stitched seconds per slice), each the best of
    `rounds` interleaved measurements.

    Raw: bare compiled model calls on batches of random tiles of the shape
    and batch size the slice plan uses (`tile_shape`, `batch`), as many tiles
    as the slice needs (`n_tiles`); `model.predict`: Keras' own loop on the
    same tiles. Stitched: `predict_slice` on the whole slice. A first stitched
    call traces every shape; interleaving in alternating order and best-of
    keep other load on the machine from favouring either side.
    """
    import numpy as np

    x = np.random.default_rng(0).random((batch, *tile_shape, 1)).astype(np.float32)
    calls = -(-n_tiles // batch)
    pred.predict_slice(image, tile, overlap)
    tiles = np.concatenate([x] * calls)
    pred.model.predict(tiles, batch_size=batch, verbose=0)
    rate, keras_rate, secs = 0.0, 0.0, float("inf")
    for r in range(rounds):
        for side in ("raw", "keras", "stitched")[:: 1 if r % 2 == 0 else -1]:  # alternate: no order bias
            t = time.perf_counter()
            if side == "raw":
                for _ in range(calls):
                    pred.predict_batch(x)
                rate = max(rate, calls * batch / (time.perf_counter() - t))
            elif side == "keras":
                pred.model.predict(tiles, batch_size=batch, verbose=0)
                keras_rate = max(keras_rate, len(tiles) / (time.perf_counter() - t))
            else:
                pred.predict_slice(image, tile, overlap)
                secs = min(secs, time.perf_counter() - t)
    return rate, keras_rate, secs


def speed_rows(model: str | None, base: int, size: int) -> list[dict]:
    from data_prep.synthetic import generate_slice
    from xmdl_tf.predict import DEFAULT_OVERLAP, DEFAULT_TILE
    from xmdl_tf.tiling import auto_batch_size, plan_tiles

    image, _, _ = generate_slice(size=size, seed=0, pixel_size_nm=5.0)
    configs = [(False, 512, 64), (False, 1024, 128), (False, DEFAULT_TILE, DEFAULT_OVERLAP),
               (False, 2048, 96), (False, 4096, 64), (True, DEFAULT_TILE, DEFAULT_OVERLAP)]
    preds = {jit: predictor(model, base, jit) for jit in (False, True)}
    rows = []
    for jit, tile, overlap in configs:
        pred = preds[jit]
        (th, tw), _, origins = plan_tiles(image.shape, tile, overlap, pred.size_divisor)
        batch = auto_batch_size((th, tw))
        rate, keras_rate, secs = timings(pred, image, tile, overlap, (th, tw), len(origins), batch)
        raw_s = image.size / (th * tw) / rate  # raw seconds for the slice's own pixels
        keras_s = image.size / (th * tw) / keras_rate
        recompute = len(origins) * th * tw / image.size - 1
        rows.append({"XLA": jit, "tile": tile, "overlap": overlap, "tile used": f"{th}x{tw}",
                     "tiles": len(origins), "batch": batch, "raw tiles/s": rate, "raw s": raw_s,
                     "model.predict s": keras_s, "stitched s": secs,
                     "overhead vs model.predict %": 100 * (secs / keras_s - 1),
                     "overhead vs raw %": 100 * (secs / raw_s - 1),
                     "overlap recompute %": 100 * recompute,
                     "default": "yes" if (tile, overlap) == (DEFAULT_TILE, DEFAULT_OVERLAP) else ""})
        print(table(rows, list(rows[0])).splitlines()[-1], flush=True)
    return rows


def one_pass(pred, image):
    """Mitochondria probability float32 (H, W) of a whole slice in a single model call (no tiles)."""
    from xmdl_tf.data import normalize_np

    return pred.predict_batch(normalize_np(image)[None, ..., None])[0, ..., 1]


def context_profile(pred, images, crop: int = 512) -> list[dict]:
    """Mask disagreement between a crop's own prediction and the one-pass whole-slice prediction,
    by distance (px) from the crop's cut edges."""
    import numpy as np

    from xmdl_tf.data import normalize_np

    bins = [0, 16, 32, 48, 64, 96, 128, 192]
    diff, total = np.zeros(len(bins)), np.zeros(len(bins))
    for img in images:
        x = normalize_np(img)
        h, w = x.shape
        whole = one_pass(pred, img)
        for y0, x0 in ((h // 2 - crop // 2, w // 2 - crop // 2), (0, w - crop), (h - crop, 0)):
            part = pred.predict_batch(x[y0: y0 + crop, x0: x0 + crop][None, ..., None])[0, ..., 1]
            ref = whole[y0: y0 + crop, x0: x0 + crop]
            yy, xx = np.mgrid[:crop, :crop]
            d = np.full((crop, crop), 10**6)
            for cut, dist in ((y0 > 0, yy), (y0 + crop < h, crop - 1 - yy), (x0 > 0, xx), (x0 + crop < w, crop - 1 - xx)):
                if cut:
                    d = np.minimum(d, dist)
            k = np.digitize(d, bins) - 1
            dis = (part >= 0.5) != (ref >= 0.5)
            diff += np.bincount(k.ravel(), dis.ravel(), len(bins))
            total += np.bincount(k.ravel(), minlength=len(bins))
    edges = bins[1:] + [None]
    return [{"px from cut edge": f"{a}-{b}" if b else f">={a}", "pixels": int(n),
             "mask differs %": 100 * dd / max(n, 1)} for a, b, dd, n in zip(bins, edges, diff, total)]


def seam_rows(pred, images, tile: int = 512) -> list[dict]:
    """Stitched (TILE-px tiles, forcing seams) vs one-pass prediction of whole test slices, per overlap."""
    import numpy as np

    from xmdl_tf.tiling import default_margin, plan_tiles

    rows = []
    for overlap in (64, 96, 128, 192):
        dis = n = 0
        for img in images:
            whole = one_pass(pred, img)
            stitched = pred.predict_slice(img, tile, overlap)
            dis += np.sum((whole >= 0.5) != (stitched >= 0.5))
            n += whole.size
        (th, _), _, origins = plan_tiles(images[0].shape, tile, overlap, pred.size_divisor)
        rows.append({"overlap": overlap, "margin": default_margin(overlap), "tile used": th, "tiles": len(origins),
                     "mask differs %": 100 * dis / n})
    return rows


def mosaic_rows(pred, images, size: int = 4096) -> list[dict]:
    """Stitched vs one-pass prediction of a SIZE x SIZE mosaic of real test slices, per overlap.

    The slices are laid out in a grid (cycled and mirrored to fill it), so the
    stitched slice has as many seams as a real slice of that size.
    """
    import numpy as np

    from xmdl_tf.predict import DEFAULT_TILE
    from xmdl_tf.tiling import plan_tiles

    h, w = images[0].shape
    mosaic = np.zeros((size, size), images[0].dtype)
    k = 0
    for y in range(0, size, h):
        for x in range(0, size, w):
            im = images[k % len(images)]
            im = im[:, ::-1] if (k // len(images)) % 2 else im
            mosaic[y: y + h, x: x + w] = im[: size - y, : size - x]
            k += 1
    whole = one_pass(pred, mosaic) >= 0.5
    rows = []
    for overlap in (64, 96, 128):
        stitched = pred.predict_slice(mosaic, DEFAULT_TILE, overlap) >= 0.5
        (th, _), _, origins = plan_tiles(mosaic.shape, DEFAULT_TILE, overlap, pred.size_divisor)
        rows.append({"overlap": overlap, "tile used": th, "tiles": len(origins),
                     "mask pixels": int(whole.sum()), "pixels that differ": int((whole != stitched).sum()),
                     "% of mask": 100 * (whole != stitched).sum() / max(whole.sum(), 1)})
    return rows


def main(argv=None) -> int:
    from xmdl_tf.evaluate import held_out_split
    from xmdl_tf.io import find_pairs, read_pair

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="trained model (default: untrained 8-filter six-level model)")
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--data", default=None, help="data set with test/x for the context and seam section")
    args = p.parse_args(argv)
    print(machine())
    print(f"\nstitched inference of a {args.size} x {args.size} slice vs raw model calls:")
    rows = speed_rows(args.model, args.base_filters, args.size)
    print()
    print(table(rows, list(rows[0])))
    if args.data and args.model:
        pred = predictor(args.model, args.base_filters)
        images = [read_pair(pair)[0] for pair in find_pairs(args.data, split=held_out_split(args.data))]
        print(f"\ncontext: crops vs one-pass prediction of {len(images)} whole test slices of {args.data}")
        print(table(rows := context_profile(pred, images), list(rows[0])))
        print("\nseams, worst case: stitched 512-px tiles vs one-pass prediction of the same slices")
        print(table(rows := seam_rows(pred, images), list(rows[0])))
        print(f"\nseams at the default tile size: a {args.size} x {args.size} mosaic of those slices, "
              "stitched vs one pass")
        print(table(rows := mosaic_rows(pred, images, args.size), list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
