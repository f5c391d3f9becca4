"""Speed of one model call against the tile size: where large tiles stop paying.

    python benchmarks/bench_tile_sizes.py --model xmdl_ref --sizes 1408 1792 1888
    python benchmarks/bench_tile_sizes.py --base-filters 8 --sizes 2048 2816

For each size, one tile of SIZE x SIZE goes through the model (after a call
on a small tile, so the graph is traced): the first call at that size (which
includes oneDNN choosing its kernels) and, unless `--calls 1`, a second one
are timed, and the throughput of the last is printed in megapixels per
second (`--calls 1` saves minutes on sizes past the slow-down, where both
calls take the same). An untrained
model of `--base-filters` serves as well as a trained one (speed does not
depend on the weights). This measured the cap `tiling.max_tile` puts on the
inference tile (model card, "Speed and memory"); run it with
`TF_ENABLE_ONEDNN_OPTS=0` to compare with TensorFlow's own kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, table  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)


def time_sizes(pred, sizes: list[int], calls: int = 2) -> list[dict]:
    """[{size, first s, second s, Mpx/s}] of one or two model calls per tile size."""
    rows = []
    for size in sizes:
        x = np.random.default_rng(0).random((1, size, size, 1)).astype(np.float32)
        pred._fn(x[:, :64, :64])
        times = []
        for _ in range(calls):
            t0 = time.perf_counter()
            pred._fn(x).numpy()
            times.append(time.perf_counter() - t0)
        rows.append({"tile (px)": size, "first call (s)": round(times[0], 2),
                     "second call (s)": round(times[1], 2) if calls > 1 else None,
                     "Mpx/s": round(size * size / times[-1] / 1e6, 3)})
        print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    from bench_inference import predictor
    from xmdl_tf import cli
    from xmdl_tf.predict import ModelError

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="trained model (default: untrained six-level model)")
    p.add_argument("--base-filters", type=cli.positive_int, default=8)
    p.add_argument("--sizes", nargs="+", type=cli.positive_int, required=True,
                   help="tile sizes in px (multiples of 32)")
    p.add_argument("--calls", type=int, choices=(1, 2), default=2, help="timed calls per size")
    args = p.parse_args(argv)
    if bad := [s for s in args.sizes if s % 32]:
        p.error(f"tile sizes must be multiples of 32 (the six-level model's size divisor): {bad}")
    try:
        pred = predictor(args.model, args.base_filters)
    except ModelError as err:
        p.error(str(err))
    print(machine())
    print(f"model: {args.model or 'untrained'}, {pred.config.model.base_filters} base filters; "
          f"TF_ENABLE_ONEDNN_OPTS={os.environ.get('TF_ENABLE_ONEDNN_OPTS')}")
    rows = time_sizes(pred, args.sizes, args.calls)
    print(table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
