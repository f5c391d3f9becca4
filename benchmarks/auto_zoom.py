"""Auto zoom for slices of unknown pixel size, measured on sets the models never saw.

    python benchmarks/auto_zoom.py runs/loso/em_scale_0.5_2 --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5
    python benchmarks/auto_zoom.py --model xmdl_ref --data <the same> --pixel-size unknown 4.6 5 --out runs/auto_zoom_ref

For each `without_<set>` model of a `benchmarks/loso.py` folder (or the one
`--model`, on every set): its reference widths are measured as `python -m
xmdl_tf.tune` measures them, on its own training sets' val slices (or read
from the model's config.json with `--model` when it has them). Then each
scored set's val slices are brought to the model's pixel size (their known
pixel size; the SBEM set's own grid) and *presented* at zooms P (default
x0.5, 0.71, 1, 1.41, 2: as from a microscope with a pixel size 1/P times the
model's), with the pixel size withheld, and foreground F1 pooled over all
their pixels is scored for:
- `own grid`: one pass on the slice as it is (what `analyze` did before auto zoom);
- `auto`: `xmdl_tf.autoscale` chooses the zoom from the objects' widths, then one pass;
- `known`: one pass with the true pixel size given (the best a user can do).
The left-out set (zero shot) is presented at every P; the models' training
sets at `--seen-presented` (default P = 1 only: does auto zoom leave data the
model knows alone?). No test split and no label is read before scoring; the
table decides whether auto zoom is on by default (models/README.md).
Writes `auto_zoom.json` and `.md` into the folder (`--out` with `--model`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)
from zero_shot_inference import pooled_f1  # noqa: E402

PRESENTED = (0.5, 0.71, 1.0, 1.41, 2.0)
METHODS = ("own grid", "auto", "known")


def val_pairs(data: str, most: int | None, split: str = "val"):
    """The set's `split` (val) slice pairs, at most `most` of them, evenly spread."""
    from xmdl_tf.io import find_pairs

    pairs = find_pairs(data, split)
    if most is None or len(pairs) <= most:
        return pairs
    return [pairs[i] for i in np.linspace(0, len(pairs) - 1, most).round().astype(int)]


def model_grid_slices(predictor, data: str, pixel_size_nm: float | None, most: int | None, split: str = "val"
                      ) -> list[tuple[np.ndarray, np.ndarray]]:
    """The set's `split` (val) slices (image uint, label bool) resampled to the model's pixel size."""
    from xmdl_tf.io import read_pair, read_pixel_size_nm

    out = []
    for pair in val_pairs(data, most, split):
        image, label = read_pair(pair)
        out.append(present(image, label, predictor.scale_factor(read_pixel_size_nm(pair.image) or pixel_size_nm)))
    return out


def present(image: np.ndarray, label: np.ndarray, zoom: float) -> tuple[np.ndarray, np.ndarray]:
    """(image resampled by `zoom` in its own dtype, label > 0 resampled nearest to the same shape)."""
    import cv2

    from xmdl_tf.sampling import resample_image

    if zoom == 1.0:
        return image, label > 0
    img = resample_image(image.astype(np.float32), zoom)
    img = np.clip(np.rint(img), 0, np.iinfo(image.dtype).max).astype(image.dtype)
    lab = cv2.resize((label > 0).astype(np.uint8), (img.shape[1], img.shape[0]), interpolation=cv2.INTER_NEAREST_EXACT)
    return img, lab > 0


def reference(predictor, data: list[str], pixel_sizes: list[float | None], most: int | None) -> dict[str, float]:
    """Median predicted object width (model px) per set, as `xmdl_tf.tune` measures it (one pass, val)."""
    from xmdl_tf.autoscale import predicted_width
    from xmdl_tf.io import read_pair, read_pixel_size_nm

    ic = predictor.config.inference
    out = {}
    for d, px_given in zip(data, pixel_sizes):
        preds = []
        for pair in val_pairs(d, most):
            image, _ = read_pair(pair)
            px = read_pixel_size_nm(pair.image) or px_given
            preds.append((predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=False,
                                                  pixel_size_nm=px, rescale=ic.rescale),
                          predictor.scale_factor(px, ic.rescale)))
        out[Path(d).resolve().name] = predicted_width(preds, ic.threshold, ic.min_size_px)
    return out


def score_presented(predictor, ic, slices: list[tuple[np.ndarray, np.ndarray]], zooms) -> dict:
    """{P: {method: F1, "zoom chosen": median auto zoom, "1 / P": the right zoom}} for slices at the model's grid."""
    from xmdl_tf.autoscale import prediction_grid

    model_px = predictor.pixel_size_nm
    if not model_px:
        raise SystemExit(f"{predictor.path}: the model states no pixel size; auto zoom needs one")
    rows = {}
    for p in zooms:
        shown = [present(img, lab, p) for img, lab in slices]
        run = dict(tile=ic.tile, overlap=ic.overlap, batch_size=ic.batch_size, tta=False)
        pairs = {m: [] for m in METHODS}
        chosen = []
        for img, lab in shown:
            pairs["own grid"].append((predictor.predict_slice(img, pixel_size_nm=None, **run), lab))
            grid, est = prediction_grid(predictor, img, ic, None)
            chosen.append(est.zoom if est is not None else 1.0)
            pairs["auto"].append((predictor.predict_slice(img, pixel_size_nm=grid, **run), lab))
            pairs["known"].append((predictor.predict_slice(img, pixel_size_nm=model_px / p, **run), lab))
        rows[f"{p:g}"] = {**{m: pooled_f1(v, ic.threshold) for m, v in pairs.items()},
                          "zoom chosen": float(np.median(chosen)), "right zoom": round(1 / p, 3)}
    return rows


def markdown(results: dict) -> list[str]:
    md = ["| model | scored set | presented at | F1 own grid | F1 auto zoom | F1 pixel size known | zoom chosen (median) | right zoom |",
          "|---|---|---|---|---|---|---|---|"]
    for model, r in results.items():
        for scored, by_p in r["scored"].items():
            for p, row in by_p.items():
                md.append(f"| {model} | {scored} | x{p} | {row['own grid']:.3f} | {row['auto']:.3f} | {row['known']:.3f} "
                          f"| {row['zoom chosen']:.3g} | {row['right zoom']:.3g} |")
    for kind in ("zero shot", "seen"):
        cells = [row for r in results.values() for s, by_p in r["scored"].items() if r["kind"][s] == kind
                 for row in by_p.values()]
        if cells:
            md.append(f"\nmean over {len(cells)} {kind} (set, zoom) cells: " +
                      ", ".join(f"{m} {np.mean([c[m] for c in cells]):.3f}" for m in METHODS))
    return md


def main(argv: list[str] | None = None) -> int:
    from xmdl_tf import cli
    from xmdl_tf.autoscale import width_range
    from xmdl_tf.predict import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loso", nargs="?", help="a benchmarks/loso.py output folder (without_<set>/ runs)")
    p.add_argument("--model", default=None, help="instead: one model, scored on every set as seen data")
    p.add_argument("--out", default=None, help="output folder with --model")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed)")
    p.add_argument("--max-slices", type=cli.positive_int, default=None,
                   help="at most this many val slices per set, evenly spread (Lucchi++ has 25)")
    p.add_argument("--presented", nargs="+", type=cli.positive_float, default=list(PRESENTED))
    p.add_argument("--seen-presented", nargs="+", type=cli.positive_float, default=[1.0])
    args = p.parse_args(argv)
    if (args.loso is None) == (args.model is None):
        p.error("give a leave-one-set-out folder or --model (with --out), not both")
    if args.model and not args.out:
        p.error("--model needs --out")
    px = _util.pixel_sizes(p, args)
    names = [Path(d).resolve().name for d in args.data]
    if args.model:
        runs = {Path(args.model).name: (args.model, None)}
        out = Path(args.out)
    else:
        out = Path(args.loso)
        runs = {f"without_{n}": (out / f"without_{n}", n) for n in names if (out / f"without_{n}" / "model.keras").is_file()}
        if not runs:
            p.error(f"{out}: no without_<set> runs for these --data sets")
    results = {}
    for label, (path, left_out) in runs.items():
        pred = load_model(path)
        seen = [i for i, n in enumerate(names) if n != left_out]
        ic = pred.config.inference
        widths = None
        if not (args.model and ic.object_width_px):
            widths = reference(pred, [args.data[i] for i in seen], [px[i] for i in seen], args.max_slices)
            ic = dataclasses.replace(ic, object_width_px=width_range(widths))
        ic = dataclasses.replace(ic, auto_zoom=True)
        scored, kind = {}, {}
        for i, n in enumerate(names):
            kind[n] = "zero shot" if n == left_out else "seen"
            zooms = args.presented if kind[n] == "zero shot" or args.model else args.seen_presented
            scored[n] = score_presented(pred, ic, model_grid_slices(pred, args.data[i], px[i], args.max_slices), zooms)
            print(label, n, json.dumps(scored[n]), flush=True)
        results[label] = {"reference_widths_px": widths, "object_width_px": ic.object_width_px,
                          "scored": scored, "kind": kind}
    out.mkdir(parents=True, exist_ok=True)
    _util.write_results(out, "auto_zoom", results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
