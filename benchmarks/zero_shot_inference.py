"""Inference-time remedies for an unseen microscope, measured on the leave-one-set-out models.

    python benchmarks/zero_shot_inference.py runs/loso/em --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5

For each `without_<set>` model of a `benchmarks/loso.py` folder, the left-out
set's val slices (every `--every`-th) are predicted zero-shot, and foreground
F1 pooled over all their pixels (at the model's own threshold) is printed for:
- `plain`: one pass, as `evaluate` without TTA;
- `tta8`: mean of the 8 flips/rotations;
- `scales`: mean of the predictions at zoom 0.71, 1 and 1.41 (objects shown
  smaller and larger than the pixel size says);
- `adabn`: batch-norm statistics re-estimated on the scored slices' own
  images (no labels; Li et al. 2016, "Revisiting batch normalization for
  practical domain adaptation"), then one pass;
- `zoom Z` for each `--zooms` value: one pass with the slice resampled Z times
  more than its pixel size asks (how far off the unknown or stated scale is);
- `blur S` for each `--blurs` value: one pass on the slice blurred with a
  Gaussian of sigma S (slice pixels) first, same size (is the set sharper than
  what the model learned on, rather than larger or smaller?).
`--remedies` picks which of plain, tta8, scales and adabn to compute (default all;
TTA and the scale ensemble cost 8 and 3 passes).
Also printed: the median width of the left-out set's labelled mitochondria
at the model's pixel size (`median_width`: twice the largest inscribed
radius, in px), which says how large its objects look to the model.
Writes `zero_shot_inference.json` and `.md` (`--stem`) into the folder. None of these
touches a label before scoring; the table decides whether any becomes a
default (models/README.md).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)

SCALES = (0.71, 1.0, 1.41)


def adapt_batchnorm(model, tiles: np.ndarray, batch_size: int = 8) -> int:
    """Replace every BatchNormalization layer's moving mean and variance by the average of
    its batch statistics over `tiles` (n, h, w, 1) float32; returns the batches used.

    Each batch runs in training mode (normalised by its own statistics, as the
    layers after it see during training) with the momentum set so that the
    moving statistics become the running average of all batches so far.
    """
    import keras

    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    old = [layer.momentum for layer in bns]
    n = len(tiles) // batch_size
    try:
        for k in range(n):
            for layer in bns:
                layer.momentum = k / (k + 1)  # batch k gets weight 1 / (k + 1)
            model(tiles[k * batch_size:(k + 1) * batch_size], training=True)
    finally:
        for layer, m in zip(bns, old):
            layer.momentum = m
    return n


def sample_tiles(predictor, images: list[np.ndarray], pixel_size_nm: float | None, tile: int = 256,
                 n: int = 256, seed: int = 0) -> np.ndarray:
    """`n` random (tile, tile) crops, float32 (n, tile, tile, 1), of `images` normalised and
    resampled to the model's pixel size as `predict_slice` does."""
    from xmdl_tf.sampling import normalize_as, resample_image

    rng = np.random.default_rng(seed)
    factor = predictor.scale_factor(pixel_size_nm)
    out = []
    for k, img in enumerate(images):
        x = normalize_as(resample_image(img, factor), predictor.config.normalization)
        size = min(tile, *x.shape) // predictor.size_divisor * predictor.size_divisor
        for _ in range(n // len(images) + (k < n % len(images))):
            i, j = rng.integers(0, x.shape[0] - size + 1), rng.integers(0, x.shape[1] - size + 1)
            out.append(x[i:i + size, j:j + size])
    return np.stack(out)[rng.permutation(len(out)), ..., None].astype(np.float32)


def median_width(labels: list[np.ndarray], factor: float = 1.0, min_px: int = 30) -> float:
    """Median over the objects (connected components >= min_px) of `labels` (H, W), resampled
    by `factor` (nearest), of twice the largest inscribed radius: their width in px."""
    import cv2
    from scipy import ndimage as ndi
    from skimage.measure import label as cc_label

    widths = []
    for lab in labels:
        mask = np.asarray(lab > 0, np.uint8)
        if factor != 1.0:
            mask = cv2.resize(mask, (round(mask.shape[1] * factor), round(mask.shape[0] * factor)),
                              interpolation=cv2.INTER_NEAREST_EXACT)
        comp = cc_label(mask)
        if comp.max() == 0:
            continue
        idx = np.arange(1, comp.max() + 1)
        big = ndi.sum_labels(np.ones_like(comp), comp, idx) >= min_px
        widths.append(2 * ndi.maximum(ndi.distance_transform_edt(mask), comp, idx)[big])
    return float(np.median(np.concatenate(widths))) if widths else float("nan")


def blurred(image: np.ndarray, sigma: float) -> np.ndarray:
    """The raw slice under a Gaussian of `sigma` px, in its own dtype (rounded)."""
    import cv2

    out = cv2.GaussianBlur(image.astype(np.float32), (0, 0), sigma)
    return np.clip(np.rint(out), 0, np.iinfo(image.dtype).max).astype(image.dtype)


def pooled_f1(pairs: list[tuple[np.ndarray, np.ndarray]], threshold: float) -> float:
    """Foreground F1 pooled over all pixels of (probability, label) pairs."""
    tp = fp = fn = 0
    for prob, label in pairs:
        m, t = prob >= threshold, label > 0
        tp += int((m & t).sum())
        fp += int((m & ~t).sum())
        fn += int((~m & t).sum())
    return 2 * tp / max(2 * tp + fp + fn, 1)


REMEDIES = ("plain", "tta8", "scales", "adabn")


def score_run(run: Path, data: str, pixel_size_nm: float | None, every: int, zooms: list[float],
              blurs: list[float] = (), remedies: tuple[str, ...] = REMEDIES) -> dict:
    from xmdl_tf.io import find_pairs, read_pair
    from xmdl_tf.predict import load_model

    slices = [read_pair(p) for p in find_pairs(data, "val")[::every]]
    pred = load_model(run)
    th = pred.config.inference.threshold

    def f1(**kw) -> float:
        return pooled_f1([(pred.predict_slice(img, pixel_size_nm=pixel_size_nm, **kw), lab)
                          for img, lab in slices], th)

    row = {"slices": len(slices), "median width (px)": median_width([lab for _, lab in slices],
                                                                    pred.scale_factor(pixel_size_nm))}
    if "plain" in remedies:
        row["plain"] = f1(tta=False)
    if "tta8" in remedies:
        row["tta8"] = f1(tta=True)
    if "scales" in remedies:
        row["scales"] = pooled_f1([(np.mean([pred.predict_slice(img, pixel_size_nm=pixel_size_nm, tta=False, zoom=z)
                                             for z in SCALES], 0), lab) for img, lab in slices], th)
    for z in zooms:
        row[f"zoom {z:g}"] = f1(tta=False, zoom=z)
    for sigma in blurs:
        row[f"blur {sigma:g}"] = pooled_f1([(pred.predict_slice(blurred(img, sigma), pixel_size_nm=pixel_size_nm,
                                                                tta=False), lab) for img, lab in slices], th)
    if "adabn" in remedies:  # last: it changes the model
        adapt_batchnorm(pred.model, sample_tiles(pred, [img for img, _ in slices], pixel_size_nm))
        row["adabn"] = f1(tta=False)
    return row


def main(argv: list[str] | None = None) -> int:
    from xmdl_tf import cli

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loso", help="a benchmarks/loso.py output folder (without_<set>/ runs)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed)")
    p.add_argument("--every", type=cli.positive_int, default=1, help="score every N-th val slice (Lucchi++ has 25)")
    p.add_argument("--zooms", nargs="*", type=cli.positive_float, default=[0.71, 1.41, 2.0])
    p.add_argument("--blurs", nargs="*", type=cli.positive_float, default=[], metavar="SIGMA")
    p.add_argument("--remedies", nargs="*", choices=REMEDIES, default=list(REMEDIES))
    p.add_argument("--stem", default="zero_shot_inference", help="output file names: LOSO/STEM.json and .md")
    args = p.parse_args(argv)
    px = _util.pixel_sizes(p, args)
    out = Path(args.loso)
    rows = {}
    for data, size in zip(args.data, px):
        name = Path(data).resolve().name
        run = out / f"without_{name}"
        if not (run / "model.keras").is_file():
            print(f"{run}: no model.keras, skipped", file=sys.stderr)
            continue
        rows[name] = score_run(run, data, size, args.every, args.zooms, args.blurs, tuple(args.remedies))
        print(name, json.dumps({k: round(v, 4) for k, v in rows[name].items()}), flush=True)
    if not rows:
        p.error(f"{out}: no without_<set> runs for these --data sets")
    cols = [k for k in next(iter(rows.values())) if k != "slices"]
    md = ["| left out (zero-shot val F1) | slices | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    md += [f"| {n} | {r['slices']} | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |" for n, r in rows.items()]
    md.append("| mean | | " + " | ".join(f"{np.mean([r[c] for r in rows.values()]):.3f}" for c in cols) + " |")
    _util.write_results(out, args.stem, rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
