"""Score a trained model on whole slices: `python -m xmdl_tf.evaluate`.

    python -m xmdl_tf.evaluate --model models/xmdl_ref --data ../shared/data/cdeep3m_sbem_mouse \
        --split test --out eval/cdeep3m

Every slice of the split is predicted whole (overlapping tiles, blended),
thresholded at 0.5 and compared with its label. Writes `metrics.json`
(foreground precision, recall, F1 = Dice, IoU and accuracy pooled over all
pixels of all slices, plus counts) and `per_image.csv`, and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from . import cli

DEFAULT_THRESHOLD = 0.5


def ground_truth_instances(label):
    """Instances of a label image: its ids if it has several, else connected components of label > 0."""
    import numpy as np
    from skimage.measure import label as cc_label

    return label if len(np.unique(label)) > 2 else cc_label(label > 0, connectivity=1)


def instance_counts(pred_instances, label) -> dict:
    """tp/fp/fn at IoU >= 0.5 and the signed count error of one image."""
    from .instances import match_instances

    m = match_instances(pred_instances, ground_truth_instances(label), 0.5)
    return {"inst_tp": int(m["tp"]), "inst_fp": int(m["fp"]), "inst_fn": int(m["fn"]),
            "count": int(m["n_pred"]), "gt_count": int(m["n_true"]), "count_error": int(m["count_error"])}


def pooled_instance_scores(rows: list[dict]) -> dict:
    """Instance F1 at IoU 0.5 pooled over images, and the mean absolute count error per image."""
    tp, fp, fn = (sum(r[k] for r in rows) for k in ("inst_tp", "inst_fp", "inst_fn"))
    return {"instance_f1_iou50": 2 * tp / max(2 * tp + fp + fn, 1),
            "instance_precision_iou50": tp / max(tp + fp, 1), "instance_recall_iou50": tp / max(tp + fn, 1),
            "mean_abs_count_error": sum(abs(r["count_error"]) for r in rows) / max(len(rows), 1)}


def held_out_split(data: str | Path) -> str:
    """The split to score by default: `test` where the data set has one, else `val`
    (e.g. Lucchi++, whose test volume is kept apart), else `test` (for the error message)."""
    p = Path(data)
    if not (p / "test" / "x").is_dir() and (p / "val" / "x").is_dir():
        return "val"
    return "test"


def evaluate(model, data: str, split: str = "auto", out: str | Path | None = None, threshold: float = DEFAULT_THRESHOLD,
             tile: int | None = None, overlap: int | None = None, batch_size: int | None = None, labels: str | None = None,
             overwrite: bool = False, tta: bool = False, pixel_size_nm: float | None = None,
             rescale: bool = True, min_size_px: int = 30) -> dict:
    """Whole-slice evaluation of `model` (a Predictor or a path) on a split.

    pixel_size_nm: the data's pixel size (else read from TIFF metadata); with
    `rescale`, slices are resampled to the model's pixel size when both are known.
    Instance figures: predicted instances (`mask_to_instances`, objects under
    `min_size_px` dropped) matched at IoU >= 0.5 to the true instances.
    split: "auto" = `held_out_split(data)`.
    Returns the metrics dict written to `out/metrics.json`.
    """
    import numpy as np
    import pandas as pd

    from .instances import mask_to_instances
    from .io import find_pairs, read_pair, read_pixel_size_nm
    from .metrics import add_counts, confusion, scores
    from .predict import DEFAULT_OVERLAP, DEFAULT_TILE, load_model

    if out is not None:
        out = Path(out)
        existing = [out / n for n in ("metrics.json", "per_image.csv") if (out / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists; use --overwrite or another --out")
    if split == "auto":
        split = held_out_split(data)
    pairs = find_pairs(data, split, labels=labels)
    predictor = load_model(model, tta=tta) if isinstance(model, (str, Path)) else model
    total: dict[str, int] = {}
    rows = []
    t0 = time.time()
    for pair in pairs:
        image, label = read_pair(pair)
        px = read_pixel_size_nm(pair.image) or pixel_size_nm
        prob = predictor.predict_slice(image, tile or DEFAULT_TILE, overlap or DEFAULT_OVERLAP, batch_size,
                                       pixel_size_nm=px, rescale=rescale)
        c = confusion(prob >= threshold, label > 0)
        total = add_counts(total, c)
        inst = instance_counts(mask_to_instances(prob, threshold, min_size_px=min_size_px), label)
        rows.append({"image": pair.name, **scores(c), **c, "pixels": int(label.size), **inst})
    result = {
        **scores(total),
        **total,
        **pooled_instance_scores(rows),
        "n_images": len(rows),
        "n_pixels": int(sum(r["pixels"] for r in rows)),
        "threshold": threshold,
        "pooling": "all pixels of all slices",
        "model": str(predictor.path),
        "data": str(Path(data).resolve()),
        "split": split,
        "tta": bool(getattr(predictor, "tta", False)),
        "seconds": round(time.time() - t0, 1),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
        pd.DataFrame(rows).to_csv(out / "per_image.csv", index=False)
    return result


def format_table(result: dict) -> str:
    cols = {"precision": "precision", "recall": "recall", "f1": "F1", "iou": "IoU", "accuracy": "accuracy",
            "instance_f1_iou50": "inst F1@0.5", "mean_abs_count_error": "|count err|"}
    head = f"{'images':>7} " + " ".join(f"{label:>12}" for label in cols.values())
    row = f"{result['n_images']:>7} " + " ".join(f"{result[k]:>12.4f}" for k in cols)
    return head + "\n" + row


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    from .predict import DEFAULT_OVERLAP, DEFAULT_TILE

    p = cli.parser("python -m xmdl_tf.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder, .keras file or exported SavedModel folder")
    p.add_argument("--data", required=True, help="data set folder (split layout), image folder or stack")
    p.add_argument("--labels", default=None, help="label folder/glob/stack when --data is not in the split layout")
    p.add_argument("--split", default="auto", help="split to score; auto: test, or val for a set without one")
    p.add_argument("--out", default=None, help="folder for metrics.json and per_image.csv")
    p.add_argument("--threshold", type=cli.probability, default=DEFAULT_THRESHOLD)
    p.add_argument("--tile", type=cli.positive_int, default=DEFAULT_TILE, help="largest inference tile, px")
    p.add_argument("--overlap", type=cli.nonnegative_int, default=DEFAULT_OVERLAP, help="least tile overlap, px")
    p.add_argument("--batch-size", type=cli.positive_int, default=None, help="tiles per call (None: by tile size)")
    p.add_argument("--pixel-size", type=cli.pixel_size, default=None, help="nm per pixel of the data (else TIFF metadata)")
    p.add_argument("--no-rescale", action="store_true", help="do not resample to the model's pixel size")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: average the 8 flips/rotations")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    result = evaluate(args.model, args.data, args.split, args.out, args.threshold, args.tile, args.overlap,
                      args.batch_size, args.labels, args.overwrite, args.tta, args.pixel_size, not args.no_rescale)
    print(f"{args.data} [{result['split']}]  pooled over {result['n_pixels']:,} pixels")
    print(format_table(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'metrics.json'} and per_image.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
