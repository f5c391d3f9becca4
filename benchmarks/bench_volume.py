"""`analyze --volume` on a 165 x 768 x 1024 EM volume: time and peak memory, step by step.

    python benchmarks/bench_volume.py [--model xmdl_ref] [--data ../shared/data/lucchipp_fibsem_mouse]

The volume is the whole Lucchi++ training volume (its train and val slices in
order: 165 x 768 x 1024 voxels of 5 nm FIB-SEM) when ../shared is beside the
repo, else a synthetic volume of that size (data_prep.synthetic3d). Steps:
reading, prediction + Grad-CAM of every slice, 3-D instances, 3-D
morphometry and shape classes, writing the outputs (TIFF stacks, tables,
figure). Peak RSS (the process's high-water mark after each step) and the
NumPy memory each step allocated at its peak (tracemalloc) are reported.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, peak_rss_mb  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_volume(data: Path | None, shape: tuple[int, int, int]):
    """(uint8 volume (Z, Y, X), voxel size nm, description)."""
    import numpy as np

    from xmdl_tf.io import find_pairs, read_image

    if data is not None and (data / "train" / "x").is_dir():
        pairs = find_pairs(data, "train", require_labels=False) + find_pairs(data, "val", require_labels=False)
        vol = np.stack([read_image(p.image) for p in pairs])
        return vol, (5.0, 5.0, 5.0), f"{data.name} train+val slices in order (real FIB-SEM)"
    from data_prep.synthetic3d import generate_volume

    g = generate_volume(shape=shape, seed=0, voxel_size_nm=(5.0, 5.0, 5.0))
    return g["image"], (5.0, 5.0, 5.0), "synthetic (data_prep.synthetic3d)"


def step(name: str, fn, rows: list):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t0
    numpy_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    rows.append({"step": name, "seconds": round(seconds, 1), "numpy_peak_mb": round(numpy_peak),
                 "process_peak_rss_mb": round(peak_rss_mb())})
    print(f"  {name:<34} {seconds:8.1f} s   step peak (NumPy) {numpy_peak:8.0f} MB   "
          f"process peak RSS {peak_rss_mb():8.0f} MB", flush=True)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="xmdl_ref")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "lucchipp_fibsem_mouse"))
    p.add_argument("--shape", type=int, nargs=3, default=(165, 768, 1024))
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)

    from xmdl_tf.config import resolve_inference
    from xmdl_tf.instances3d import volume_instances
    from xmdl_tf.morphometry3d import ShapeRules3D, classify3d, measure3d, summarize3d
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import VolumeAnalysis, predict_volume, write_volume_outputs

    print(machine())
    rows: list = []
    print(f"baseline after imports: peak RSS {peak_rss_mb():.0f} MB")
    image, voxel, what = step("read volume", lambda: load_volume(Path(args.data), tuple(args.shape)), rows)
    print(f"volume: {what}, {' x '.join(map(str, image.shape))} voxels, {image.nbytes / 2**20:.0f} MB as {image.dtype}")
    pred = step("load model", lambda: load_model(args.model), rows)
    ic = resolve_inference(pred)
    pred.explain_slice(image[0], None, None, ic.tile, ic.overlap, ic.batch_size, pixel_size_nm=voxel[2])  # trace once
    prob, cam = step("predict + Grad-CAM, every slice",
                     lambda: predict_volume(pred, image, ic, voxel), rows)
    inst = step("3-D instances", lambda: volume_instances(prob, voxel, ic.threshold, ic.min_volume(voxel)), rows)

    def morph():
        t = measure3d(inst, voxel, image=image, heatmap=cam)
        t["shape_class"] = classify3d(t, ShapeRules3D())
        return t

    table = step("3-D morphometry + shape classes", morph, rows)
    a = VolumeAnalysis("bench", image, prob, inst, cam, table, summarize3d(table, image.shape, voxel), voxel)
    with tempfile.TemporaryDirectory() as d:
        step("write outputs + figure", lambda: write_volume_outputs(a, Path(d) / "bench", True, None), rows)
    total = sum(r["seconds"] for r in rows)
    print(f"total {total:.0f} s ({total / image.shape[0]:.2f} s per slice); {len(table)} mitochondria; "
          f"peak RSS {peak_rss_mb():.0f} MB ({peak_rss_mb() / 1024:.2f} GB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "volume": what, "shape": list(image.shape),
                                               "steps": rows, "objects": len(table),
                                               "peak_rss_mb": round(peak_rss_mb())}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
