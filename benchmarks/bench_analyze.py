"""The full `analyze` on one large slice, broken down by step, with peak memory.

    python benchmarks/bench_analyze.py [--model runs/ref] [--size 4096]

Steps: inference alone (for reference), inference + Grad-CAM in one pass (what
analyze runs), instances, morphometry + shape classes, figure, and the
scikit-image vs OpenCV choice for the distance transform. Peak RSS is read in
a fresh subprocess that runs only `analyze` on the slice.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine, peak_rss_mb  # noqa: E402


def breakdown(model: str | None, size: int, base: int) -> dict:
    import numpy as np

    from data_prep.synthetic import generate_slice
    from xmdl_tf.analyze import Settings
    from xmdl_tf.figure import unified_figure
    from xmdl_tf.instances import mask_to_instances
    from xmdl_tf.morphometry import ShapeRules, classify, measure
    from bench_inference import predictor

    pred = predictor(model, base, True)
    s = Settings()
    image, _, _ = generate_slice(size=size, seed=0, pixel_size_nm=5.0)
    pred.predict_slice(image[:1024, :1024], s.tile, s.overlap, s.batch_size)  # compile
    pred.explain_slice(image[:1024, :1024], None, None, s.tile, s.overlap, s.batch_size)
    t = {}
    t0 = time.perf_counter()
    pred.predict_slice(image, s.tile, s.overlap, s.batch_size)
    t["inference only"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    prob, cam = pred.explain_slice(image, None, None, s.tile, s.overlap, s.batch_size)
    t["inference + Grad-CAM (one pass)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inst = mask_to_instances(prob, min_size_px=200)
    t["instances"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = measure(inst, image=image, pixel_size_nm=5.0, heatmap=cam)
    table["shape_class"] = classify(table, ShapeRules(), 5.0)
    t["morphometry + shape classes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        unified_figure(image, inst, table, cam, Path(d) / "f.png", "bench", None, {"pixel_size_nm": 5.0})
    t["figure"] = time.perf_counter() - t0
    t["objects"] = len(table)
    return t


def rss_of_analyze(model: str | None, size: int) -> float:
    """Peak RSS (MB) of a fresh process analysing one SIZE x SIZE slice end to end."""
    import cv2

    from data_prep.synthetic import generate_slice

    with tempfile.TemporaryDirectory() as d:
        img, _, _ = generate_slice(size=size, seed=0, pixel_size_nm=5.0)
        cv2.imwrite(str(Path(d) / "slice.png"), img)
        code = (
            "import sys, json; sys.path.insert(0, %r)\n"
            "from _util import peak_rss_mb\n"
            "from bench_inference import predictor\n"
            "from xmdl_tf.analyze import analyze\n"
            "pred = predictor(%r, 8, True)\n"
            "analyze([%r], pred, %r, verbose=False)\n"
            "print(json.dumps(peak_rss_mb()))\n"
        ) % (str(Path(__file__).resolve().parent), model, str(Path(d) / "slice.png"), str(Path(d) / "out"))
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--base-filters", type=int, default=8)
    args = p.parse_args(argv)
    print(machine())
    t = breakdown(args.model, args.size, args.base_filters)
    n = t.pop("objects")
    print(f"\nanalyze on a {args.size} x {args.size} slice ({n} objects):")
    for k, v in t.items():
        print(f"  {k:<34} {v:7.2f} s")
    gc = t["inference + Grad-CAM (one pass)"] - t["inference only"]
    print(f"  Grad-CAM cost over inference: {gc:+.2f} s ({t['inference + Grad-CAM (one pass)'] / t['inference only']:.2f}x "
          "the inference it explains, both together)")
    total = t["inference + Grad-CAM (one pass)"] + t["instances"] + t["morphometry + shape classes"] + t["figure"]
    print(f"  total analyze (one pass + post-processing + figure): {total:.1f} s")
    print(f"\npeak RSS of `analyze` on one {args.size} x {args.size} slice in a fresh process: "
          f"{rss_of_analyze(args.model, args.size):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
