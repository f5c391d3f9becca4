"""What the model gets wrong, shown: the largest false detections and misses on validation slices.

    python docs/known_limits_figure.py --model xmdl_ref --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5 \
        --out docs/known_limits.jpg

Every val slice is analysed with the model's own inference settings; a
predicted object that overlaps no true mitochondrion at IoU >= 0.5 is a false
detection, a true one that no prediction matches is a miss. The figure shows
crops around the largest of each, per set (prediction outlined red, truth
green), so the model card can name the structures the model confuses with
mitochondria and the ones it misses. Validation slices only: test slices
never inform the model card's choices.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def worst(pred: np.ndarray, truth: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Ids of the k largest false detections and the k largest misses."""
    from xmdl_tf.postprocess import matched_objects

    fp = [i + 1 for i, m in enumerate(matched_objects(pred, truth)) if not m]
    fn = [i + 1 for i, m in enumerate(matched_objects(truth, pred)) if not m]
    area_p, area_t = np.bincount(pred.ravel()), np.bincount(truth.ravel())
    return (sorted(fp, key=lambda i: -area_p[i])[:k], sorted(fn, key=lambda i: -area_t[i])[:k])


def crop_box(mask: np.ndarray, size: int) -> tuple[slice, slice]:
    ys, xs = np.nonzero(mask)
    cy, cx = int(ys.mean()), int(xs.mean())
    h, w = mask.shape
    y0, x0 = min(max(cy - size // 2, 0), max(h - size, 0)), min(max(cx - size // 2, 0), max(w - size, 0))
    return slice(y0, y0 + size), slice(x0, x0 + size)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None)
    p.add_argument("--per-set", type=int, default=3, help="false detections and misses shown per set")
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--out", default="docs/known_limits.jpg")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from xmdl_tf.calibrate import collect_val
    from xmdl_tf.predict import load_model
    from xmdl_tf.train import parse_pixel_sizes

    pred = load_model(args.model)
    sizes = parse_pixel_sizes(args.pixel_size, len(args.data))
    slices = collect_val(pred, args.data, sizes, "val", verbose=False)
    panels = []  # (set, kind, image crop, pred crop, truth crop)
    for name, rows in slices.items():
        cands = {"false detection": [], "missed": []}
        for r in rows:
            fp, fn = worst(r["instances"], r["truth"], args.per_set)
            area_p, area_t = np.bincount(r["instances"].ravel()), np.bincount(r["truth"].ravel())
            cands["false detection"] += [(area_p[i], r, r["instances"] == i) for i in fp]
            cands["missed"] += [(area_t[i], r, r["truth"] == i) for i in fn]
        for kind, found in cands.items():
            for _, r, obj in sorted(found, key=lambda c: -c[0])[:args.per_set]:
                box = crop_box(obj, args.crop)
                panels.append((name, kind, r["image"][box], r["instances"][box] > 0, r["truth"][box] > 0))
    if not panels:
        print("no errors found on the val slices")
        return 0
    cols = 2 * args.per_set
    rows_n = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(2.6 * cols, 2.8 * rows_n), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, (name, kind, img, pm, tm) in zip(axes.ravel(), panels):
        lo, hi = np.percentile(img, [1, 99.8])
        ax.imshow(np.clip((img - lo) / max(hi - lo, 1), 0, 1), cmap="gray")
        ax.contour(pm.astype(float), levels=[0.5], colors="red", linewidths=1)
        ax.contour(tm.astype(float), levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(f"{name.split('_')[0]}: {kind}", fontsize=8)
    fig.suptitle(f"{Path(args.model).name}: largest errors on val slices (red: predicted, green: true)", fontsize=10)
    fig.tight_layout()
    jpeg = str(args.out).lower().endswith((".jpg", ".jpeg"))  # the README picture: a third of the PNG
    fig.savefig(args.out, dpi=90, **({"pil_kwargs": {"quality": 75}} if jpeg else {}))
    print(f"wrote {args.out} ({len(panels)} crops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
