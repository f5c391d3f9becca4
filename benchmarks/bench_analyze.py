"""The full `analyze` on one large slice, broken down by step, with peak memory.

    python benchmarks/bench_analyze.py [--model runs/ref] [--size 4096]

Steps: inference alone (for reference), inference + Grad-CAM in one pass (what
analyze runs), instances, morphometry + shape classes, figure, all with the
defaults `analyze` uses (tile, overlap, XLA only on GPUs). Then, in the same
run, the OpenCV functions the pipeline uses against their scikit-image/SciPy
equivalents on the same slice (time and agreement). Peak RSS is read in a
fresh subprocess that runs only `analyze` on the slice.
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
from _util import machine, table  # noqa: E402


def breakdown(model: str | None, size: int, base: int) -> dict:
    from data_prep.synthetic import generate_slice
    from xmdl_tf.figure import unified_figure
    from xmdl_tf.instances import mask_to_instances
    from xmdl_tf.morphometry import ShapeRules, classify, measure
    from bench_inference import predictor

    pred = predictor(model, base)
    s = pred.config.inference
    image, _, _ = generate_slice(size=size, seed=0, pixel_size_nm=5.0)
    pred.predict_slice(image, s.tile, s.overlap, s.batch_size)  # trace every tile shape once
    pred.explain_slice(image, None, None, s.tile, s.overlap, s.batch_size)
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
    df = measure(inst, image=image, pixel_size_nm=5.0, heatmap=cam)
    df["shape_class"] = classify(df, ShapeRules(), 5.0)
    t["morphometry + shape classes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        unified_figure(image, inst, df, cam, Path(d) / "f.png", "bench", None, {"pixel_size_nm": 5.0})
    t["figure"] = time.perf_counter() - t0
    t["objects"] = len(df)
    return t, image, prob


def _best_of(fn, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def opencv_vs_skimage(image, prob) -> list[dict]:
    """The OpenCV calls of the pipeline against scikit-image/SciPy on the same data: seconds and agreement."""
    import cv2
    import numpy as np
    from scipy import ndimage as ndi
    from skimage.measure import label
    from skimage.transform import resize

    mask = (prob >= 0.5).astype(np.uint8)
    rows = []

    def row(step, cv_fn, sk_fn, agree):
        a, b = cv_fn(), sk_fn()
        rows.append({"step": step, "OpenCV s": _best_of(cv_fn), "scikit-image/SciPy s": _best_of(sk_fn),
                     "agreement": agree(a, b)})
        rows[-1]["speed-up"] = rows[-1]["scikit-image/SciPy s"] / rows[-1]["OpenCV s"]

    row("connected components + areas (instances)",
        lambda: cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)[:3],
        lambda: (lambda lab: (lab.max(), lab, np.bincount(lab.ravel())))(label(mask, connectivity=2)),
        lambda a, b: f"{a[0] - 1} vs {b[0]} components, same areas: "
                     f"{np.array_equal(np.sort(a[2][1:, cv2.CC_STAT_AREA]), np.sort(b[2][1:]))}")
    row("Euclidean distance transform (splitting, widths)",
        lambda: cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE),
        lambda: ndi.distance_transform_edt(mask),
        lambda a, b: f"max |diff| {np.abs(a - b).max():.3f} px")
    dist = cv2.distanceTransform(mask, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    row("Gaussian smoothing, sigma 2 (splitting)",
        lambda: cv2.GaussianBlur(dist, (0, 0), 2.0),
        lambda: ndi.gaussian_filter(dist, 2.0, truncate=3.0, mode="reflect"),
        lambda a, b: f"max |diff| {np.abs(a - b).max():.3f} px")
    half = (image.shape[1] // 2, image.shape[0] // 2)
    row("resample to half size (pixel-size matching)",
        lambda: cv2.resize(image, half, interpolation=cv2.INTER_AREA),
        lambda: resize(image, half[::-1], order=1, anti_aliasing=True, preserve_range=True),
        lambda a, b: f"mean |diff| {np.abs(a.astype(np.float32) - b).mean():.2f} grey levels")
    return rows


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
            "pred = predictor(%r, 8)\n"
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
    t, image, prob = breakdown(args.model, args.size, args.base_filters)
    n = t.pop("objects")
    print(f"\nanalyze on a {args.size} x {args.size} slice ({n} objects):")
    for k, v in t.items():
        print(f"  {k:<34} {v:7.2f} s")
    gc = t["inference + Grad-CAM (one pass)"] - t["inference only"]
    print(f"  Grad-CAM cost over inference: {gc:+.2f} s ({t['inference + Grad-CAM (one pass)'] / t['inference only']:.2f}x "
          "the inference it explains, both together)")
    total = t["inference + Grad-CAM (one pass)"] + t["instances"] + t["morphometry + shape classes"] + t["figure"]
    print(f"  total analyze (one pass + post-processing + figure): {total:.1f} s")
    print(f"\nOpenCV (used) vs scikit-image/SciPy on the same {args.size} x {args.size} slice (best of 3):")
    print(table(rows := opencv_vs_skimage(image, prob), list(rows[0])))
    del image, prob
    print(f"\npeak RSS of `analyze` on one {args.size} x {args.size} slice in a fresh process: "
          f"{rss_of_analyze(args.model, args.size):.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
