"""How much the chunked path's result depends on the chunk size (`python -m xmdl_tf.volume --chunks`).

    python benchmarks/bench_chunk_seams.py [--data ../shared/data/lucchipp_fibsem_mouse]
        [--model xmdl_ref_f8] [--slices 12] [--size 256] [--chunks 4,128,128 4,130,130]

A real volume: the first --slices val slices of a set (consecutive sections),
cropped to --size x --size from the top left, is processed once as a single
chunk and once per --chunks. Printed per chunking: voxels whose foreground
(probability >= the model's threshold) differs from the single chunk, the
largest probability difference, and the object counts. What remains is the
context a chunk's halo gives at its edges, as between tiles in 2-D.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/lucchipp_fibsem_mouse"))
    p.add_argument("--model", default="xmdl_ref_f8")
    p.add_argument("--slices", type=int, default=12)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--chunks", nargs="+", default=["4,128,128", "4,130,130"])
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)

    import zarr

    from xmdl_tf.distributed import process_volume
    from xmdl_tf.io import find_pairs, read_image

    pairs = find_pairs(args.data, "val")[: args.slices]
    vol = np.stack([read_image(q.image, q.page)[: args.size, : args.size] for q in pairs])
    print(machine())
    print(f"{args.data} val, {len(vol)} slices cropped to {vol.shape[1]} x {vol.shape[2]}; model {args.model}")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "v.zarr"
        zarr.open_array(str(src), mode="w", shape=vol.shape, chunks=vol.shape, dtype=vol.dtype)[:] = vol

        def run(chunks):
            out = Path(tmp) / f"o_{'_'.join(map(str, chunks))}.zarr"
            s = process_volume(str(src), out, args.model, workers=args.workers, chunks=chunks, verbose=False)
            return (zarr.open_array(str(out / "0"))[:], int(s["count"]))

        from xmdl_tf.config import Config
        from xmdl_tf.predict import resolve_model_path

        threshold = Config.load(resolve_model_path(args.model)[1]).inference.threshold
        ref, n_ref = run(vol.shape)
        print(f"one chunk: {n_ref} objects (threshold {threshold:g})")
        print("| chunks | voxels on the other side of the threshold | largest probability difference | objects |")
        print("|---|---|---|---|")
        for spec in args.chunks:
            chunks = tuple(int(c) for c in spec.split(","))
            prob, n = run(chunks)
            flipped = int(((prob >= threshold) != (ref >= threshold)).sum())
            print(f"| {' x '.join(map(str, chunks))} | {flipped:,} of {ref.size:,} | "
                  f"{float(np.abs(prob - ref).max()):.2f} | {n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
