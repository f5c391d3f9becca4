"""Does what the network computes inside an object tell a true mitochondrion from a false one on an unseen set?

    python benchmarks/object_features.py runs/loso/em --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5

For each `without_<set>` model of a `benchmarks/loso.py` folder: every val
slice of the seen sets (the *fit* part, what `calibrate` fits on) and of the
left-out set (*zero-shot*) is predicted at the model's pixel size; its objects
(`postprocess.instances`, the model's defaults) are matched to the truth
(true = IoU >= 0.5). Each object gets the mean of every channel of a few
layers' activations over its pixels (`pooled_features`). A ridge logistic
model fitted on the fit part's objects (features standardised on them) then
scores the zero-shot objects; printed is the AUROC of true against false
detections per layer and ridge strength, beside the mean probability's.
`nested` picks layer and ridge strength without the scored set: fitted on
one seen set, scored on the other, both ways; the best mean wins and is refit
on both. `density` needs no false examples: the Mahalanobis distance of an
object's pooled activations from the seen sets' *true* val objects (a
Gaussian, channels standardised, correlations shrunk by `SHRINK`),
lower = more like a mitochondrion the model knows (feature-space density, as
in deterministic uncertainty methods). Writes `object_features.json` and
`.md` into the folder.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)

# Layer -> stride (input pixels per activation pixel) in the six-level U-Net.
LAYERS = {"dec1_relu2": 1, "dec2_relu2": 2, "dec3_relu2": 4, "dec4_relu2": 8, "bottleneck_relu2": 32}
RIDGE = (1.0, 30.0, 300.0)
SHRINK = 0.1  # fixed, not tuned: share of the (standardised) covariance replaced by the identity


def pooled_features(instances: np.ndarray, fmap: np.ndarray, stride: int) -> np.ndarray:
    """Mean of each channel of `fmap` (h, w, C) over each object 1..N of `instances` (H, W),
    every object pixel reading the activation pixel it falls in (H ~ h * stride). (N, C) float64."""
    n = int(instances.max())
    rr, cc = np.nonzero(instances)
    ids = instances[rr, cc].astype(np.int64) - 1
    v = fmap[np.minimum(rr // stride, fmap.shape[0] - 1), np.minimum(cc // stride, fmap.shape[1] - 1)]
    count = np.maximum(np.bincount(ids, minlength=n), 1)
    return np.stack([np.bincount(ids, v[:, k], minlength=n) for k in range(fmap.shape[-1])], 1) / count[:, None]


def ridge_logistic(x: np.ndarray, y: np.ndarray, ridge: float, iters: int = 30):
    """Logistic regression with an L2 penalty on the weights (Newton steps); returns a scorer."""
    xb = np.column_stack([x, np.ones(len(x))])
    penalty = ridge * np.diag(np.r_[np.ones(x.shape[1]), 0.0])
    w = np.zeros(xb.shape[1])
    for _ in range(iters):
        p = 1 / (1 + np.exp(-np.clip(xb @ w, -30, 30)))
        hess = (xb * (p * (1 - p))[:, None]).T @ xb + penalty + 1e-9 * np.eye(len(w))
        w -= np.linalg.solve(hess, xb.T @ (p - y) + penalty @ w)
    return lambda z: np.column_stack([z, np.ones(len(z))]) @ w


def density_scorer(x: np.ndarray, shrink: float = SHRINK):
    """Scorer of rows z (M, C): minus their Mahalanobis distance from the Gaussian of x (N, C), each
    channel standardised on x and the correlation matrix shrunk towards I by `shrink`: higher =
    more like x."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    corr = np.cov((x - mu) / sd, rowvar=False).reshape(x.shape[1], x.shape[1])
    prec = np.linalg.pinv((1 - shrink) * corr + shrink * np.eye(len(corr)))

    def score(z: np.ndarray) -> np.ndarray:
        d = (z - mu) / sd
        return -np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, prec, d), 0))

    return score


def slice_objects(pred, sub, image: np.ndarray, label: np.ndarray, pixel_size_nm: float | None):
    """(per-object features {layer: (N, C)}, mean probability (N,), true (N,) bool) or None."""
    from xmdl_tf.postprocess import best_iou, ground_truth_instances, instances
    from xmdl_tf.sampling import normalize_as, resample_pair

    image, label = resample_pair(image, np.asarray(label, np.uint8), pred.scale_factor(pixel_size_nm))
    x = normalize_as(image, pred.config.normalization)
    d = pred.size_divisor
    h, w = x.shape
    xp = np.pad(x, ((0, -h % d), (0, -w % d)), mode="reflect")[None, ..., None]
    outs = [np.asarray(o)[0] for o in sub(xp, training=False)]
    prob = outs[0][:h, :w, 1]
    inst = instances(prob, pred.config.inference, pred.pixel_size_nm if pixel_size_nm else None)
    if inst.max() == 0:
        return None
    feats = {name: pooled_features(inst, o, LAYERS[name]) for name, o in zip(LAYERS, outs[1:])}
    mean_p = pooled_features(inst, prob[..., None], 1)[:, 0]
    return feats, mean_p, best_iou(inst, ground_truth_instances(label)) >= 0.5


def collect(run: Path, sets: list[tuple[str, str, float | None]]) -> dict:
    """{set name: {"x": {layer: (N, C)}, "p": (N,), "y": (N,)}} over each set's val slices."""
    import keras

    from xmdl_tf.io import find_pairs, read_pair
    from xmdl_tf.predict import load_model

    pred = load_model(run)
    m = pred.model
    sub = keras.Model(m.input, [m.output] + [m.get_layer(n).output for n in LAYERS])
    out = {}
    for name, data, px in sets:
        rows = [r for p in find_pairs(data, "val") if (r := slice_objects(pred, sub, *read_pair(p), px)) is not None]
        out[name] = {"x": {k: np.concatenate([r[0][k] for r in rows]) for k in LAYERS},
                     "p": np.concatenate([r[1] for r in rows]), "y": np.concatenate([r[2] for r in rows])}
    return out


def fit_score(train: list[dict], test: dict, layer: str, ridge: float) -> float:
    from xmdl_tf.confidence import auroc

    x = np.concatenate([t["x"][layer] for t in train])
    y = np.concatenate([t["y"] for t in train]).astype(float)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    return auroc(ridge_logistic((x - mu) / sd, y, ridge)((test["x"][layer] - mu) / sd), test["y"])


def main(argv: list[str] | None = None) -> int:
    from xmdl_tf.confidence import auroc

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loso", help="a benchmarks/loso.py output folder (without_<set>/ runs)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed)")
    args = p.parse_args(argv)
    px = _util.pixel_sizes(p, args)
    sets = [(Path(d).resolve().name, d, s) for d, s in zip(args.data, px)]
    out = Path(args.loso)
    rows = {}
    for left, _, _ in sets:
        run = out / f"without_{left}"
        if not (run / "model.keras").is_file():
            print(f"{run}: no model.keras, skipped", file=sys.stderr)
            continue
        objs = collect(run, sets)
        seen = [objs[n] for n, _, _ in sets if n != left]
        zs = objs[left]
        row = {"true/false zero-shot": f"{int(zs['y'].sum())}/{int((~zs['y']).sum())}",
               "mean_probability": auroc(zs["p"], zs["y"])}
        for layer in LAYERS:
            for r in RIDGE:
                row[f"{layer} ridge {r:g}"] = fit_score(seen, zs, layer, r)
            true_seen = np.concatenate([t["x"][layer][t["y"]] for t in seen])
            row[f"{layer} density"] = auroc(density_scorer(true_seen)(zs["x"][layer]), zs["y"])
        inner = {(layer, r): np.mean([fit_score([a], b, layer, r) for a, b in ((seen[0], seen[1]), (seen[1], seen[0]))])
                 for layer in LAYERS for r in RIDGE} if len(seen) == 2 else {}
        if inner:
            layer, r = max(inner, key=inner.get)
            row["nested choice"] = f"{layer} ridge {r:g}"
            row["nested"] = fit_score(seen, zs, layer, r)
        rows[left] = row
        print(left, json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    if not rows:
        p.error(f"{out}: no without_<set> runs for these --data sets")
    names = list(rows)
    keys = [k for k in rows[names[0]] if k not in ("true/false zero-shot", "nested choice")]
    md = ["| zero-shot AUROC (true vs false detections) | " + " | ".join(names) + " | mean |",
          "|---|" + "---|" * (len(names) + 1),
          "| detections true/false | " + " | ".join(rows[n]["true/false zero-shot"] for n in names) + " | |"]
    for k in keys:
        v = [rows[n].get(k, float("nan")) for n in names]
        md.append(f"| {k} | " + " | ".join(f"{x:.3f}" for x in v) + f" | {np.mean(v):.3f} |")
    if "nested choice" in rows[names[0]]:
        md.append("| nested choice | " + " | ".join(rows[n]["nested choice"] for n in names) + " | |")
    _util.write_results(out, "object_features", rows, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
