"""Inference speed: raw model calls on tiles vs whole-slice stitched inference, and the knobs.

    python benchmarks/bench_inference.py [--model runs/ref] [--size 4096]

Measured in one run on the same model: raw compiled calls on batches of
tiles (tiles/s and the implied seconds for the slice's area), whole-slice
stitched inference of a SIZE x SIZE slice (seconds per slice), the stitching
overhead (stitched time / raw time for the same number of pixels - 1), XLA on
and off, tile and batch sizes, and how close stitched is to a single
full-image prediction on a 1024 x 1024 slice.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table  # noqa: E402


def predictor(model: str | None, base: int, jit: bool):
    from xmdl_tf.config import Config, ModelConfig
    from xmdl_tf.model import build_model
    from xmdl_tf.predict import Predictor, load_model

    if model:
        return load_model(model, jit_compile=jit)
    return Predictor(build_model(6, base), Config(model=ModelConfig(base_filters=base)), Path("untrained"), jit)


def raw_rate(pred, tile: int, batch: int, reps: int = 3) -> float:
    import numpy as np

    x = np.random.default_rng(0).random((batch, tile, tile, 1)).astype(np.float32)
    pred.predict_batch(x)
    t = time.perf_counter()
    for _ in range(reps):
        pred.predict_batch(x)
    return reps * batch / (time.perf_counter() - t)


def slice_seconds(pred, image, tile: int, overlap: int, batch: int) -> float:
    pred.predict_slice(image[:tile, :tile], tile, overlap, batch)  # compile for this tile shape
    t = time.perf_counter()
    pred.predict_slice(image, tile, overlap, batch)
    return time.perf_counter() - t


def main(argv=None) -> int:
    import numpy as np

    from data_prep.synthetic import generate_slice
    from xmdl_tf.tiling import plan_tiles

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="trained model (default: untrained 8-filter six-level model)")
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--overlap", type=int, default=64)
    args = p.parse_args(argv)
    print(machine())
    image, _, _ = generate_slice(size=args.size, seed=0, pixel_size_nm=5.0)
    rows = []
    for jit, tile, batch in ((True, 512, 4), (True, 1024, 1), (True, 1024, 2), (False, 1024, 2), (True, 2048, 1)):
        pred = predictor(args.model, args.base_filters, jit)
        rate = raw_rate(pred, tile, batch)
        secs = slice_seconds(pred, image, tile, args.overlap, batch)
        (th, tw), _, origins = plan_tiles(image.shape, tile, args.overlap, pred.size_divisor)
        raw_equiv = image.size / tile**2 / rate  # raw seconds for the slice's pixels
        rows.append({"XLA": jit, "tile": tile, "batch": batch, "raw tiles/s": rate, "tiles in slice": len(origins),
                     "tile used": f"{th}x{tw}", "slice s": secs, "raw s (same px)": raw_equiv,
                     "overhead %": 100 * (secs / raw_equiv - 1)})
        print(table(rows, list(rows[0])).splitlines()[-1], flush=True)
    print()
    print(table(rows, list(rows[0])))
    pred = predictor(args.model, args.base_filters, True)
    small = image[:1024, :1024]
    from xmdl_tf.data import normalize_np

    whole = pred.predict_batch(normalize_np(small)[None, ..., None])[0, ..., 1]
    stitched = pred.predict_slice(small, 512, args.overlap, 4)
    diff = np.abs(whole - stitched)
    inner = diff[64:-64, 64:-64]
    print(f"\nstitched (512-px tiles, overlap {args.overlap}) vs one full 1024 x 1024 prediction: "
          f"max |diff| {diff.max():.2e} (interior {inner.max():.2e}), mean {diff.mean():.2e}; "
          f"mask disagreement {np.mean((whole >= 0.5) != (stitched >= 0.5)) * 100:.3f}% of pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
