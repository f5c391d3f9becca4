"""Which zoom does a slice of unknown pixel size want? Label-free scores against F1, per slice.

    python benchmarks/zoom_search.py runs/loso/em_seed2 --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5
    python benchmarks/zoom_search.py runs/loso/em_seed2 --data <the same> --split held-out   # test (val for Lucchi++)
    python benchmarks/zoom_search.py runs/loso/em_seed2 --analyse      # the table again, from zoom_search.json

For each `without_<set>` model of a `benchmarks/loso.py` folder, every val
slice of every set is brought to the model's pixel size (as
`benchmarks/auto_zoom.py` does), presented with its pixel size withheld, and
predicted once (no test-time augmentation) at each candidate zoom (default
x0.5, 0.71, 1, 1.41, 2). For every (slice, zoom) it records the pixel counts
that score it (true/false positives, false negatives at the model's
threshold) and label-free statistics of the probability map (`statistics`).
The analysis then asks, for each label-free score: choosing each slice's zoom
by that score, what pooled F1 results, zero shot (the left-out set) and on
the sets the model was trained on, against zoom 1, the best single zoom and
the per-slice oracle, and the zoom the product's own search picks on the
slice (`autoscale.prediction_grid` with zoom search "always": a centred
crop, "product search"). For models calibrated by `python -m xmdl_tf.calibrate`
(an `ood.npz` beside them) it also records whether the out-of-distribution
score warns about each slice and scores `--zoom-search ood` (the product's
pick for the warned slices, zoom 1 for the rest). Labels are read only to score.
Writes `zoom_search.json` (every record) and `zoom_search.md` into the folder
(`zoom_search_held_out.*` with `--split held-out`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)
from auto_zoom import model_grid_slices, present  # noqa: E402

ZOOMS = (0.5, 0.71, 1.0, 1.41, 2.0)
CORE_PX = 4  # model px from the background to count as an object's core


def statistics(prob: np.ndarray, threshold: float, min_px: int = 30) -> dict[str, float]:
    """Label-free statistics of one probability map (H, W) on the grid the model predicted on.

    Counts are in that grid's pixels. `band` is the number of unsure pixels (0.1 < p < 0.9), `fg`
    of pixels at or above the threshold, `sure_fg` at or above 0.9; `entropy` the summed binary
    entropy (bits); `objects` the connected components of the foreground with at least
    `min_px` model px, `object_mean_p` the mean over them of each one's mean probability,
    `fg_p_mean_kept` the mean probability of the foreground pixels in them (the score of the
    product's search, `autoscale.mean_foreground_probability`).
    """
    import cv2

    from xmdl_tf.autoscale import mean_foreground_probability

    p = np.clip(prob.astype(np.float64), 1e-6, 1 - 1e-6)
    fg = prob >= threshold
    ent = -(p * np.log2(p) + (1 - p) * np.log2(1 - p))
    n, comp, stats, _ = cv2.connectedComponentsWithStats(fg.astype(np.uint8), connectivity=8)
    keep = np.flatnonzero(stats[1:, cv2.CC_STAT_AREA] >= max(1, min_px)) + 1
    means = (np.bincount(comp.ravel(), prob.ravel(), n) / np.maximum(stats[:, cv2.CC_STAT_AREA], 1))[keep]
    # The objects' cores: at least CORE_PX from the background, where the rim's lower probabilities
    # (a share of an object that falls as the object grows, zoomed in) do not reach.
    core = cv2.distanceTransform(np.pad(fg.astype(np.uint8), 1), cv2.DIST_L2, 3)[1:-1, 1:-1] >= CORE_PX
    logit = np.log(p / (1 - p))
    return {"pixels": int(prob.size), "fg": int(fg.sum()), "sure_fg": int((prob >= 0.9).sum()),
            # the product's score (`autoscale.search_zoom`): as fg_p_sum / fg, without the specks
            "fg_p_mean_kept": mean_foreground_probability(prob, threshold, min_px),
            "band": int(((prob > 0.1) & (prob < 0.9)).sum()), "fg_p_sum": float(prob[fg].sum()),
            "fg_logit_sum": float(logit[fg].sum()), "core": int(core.sum()),
            "core_p_sum": float(prob[core].sum()), "core_logit_sum": float(logit[core].sum()),
            "entropy": float(ent.sum()), "objects": int(len(keep)),
            "object_mean_p": float(means.mean()) if len(keep) else 0.0}


# Label-free scores (higher = the zoom the slice wants), from one record's statistics.
SCORES = {
    # mean probability of the foreground pixels: how sure the model is of what it marks
    "mean fg probability": lambda s: s["fg_p_sum"] / s["fg"] if s["fg"] else 0.0,
    # the same without the specks under the minimum object size: `autoscale.mean_foreground_probability`
    "mean fg probability, objects": lambda s: s.get("fg_p_mean_kept", np.nan),
    # share of the marked pixels it is sure of (p >= 0.9)
    "sure share of fg": lambda s: s["sure_fg"] / s["fg"] if s["fg"] else 0.0,
    # the same in logits, which saturate less than probabilities near 1
    "mean fg logit": lambda s: s["fg_logit_sum"] / s["fg"] if s["fg"] else -np.inf,
    "mean core probability": lambda s: s["core_p_sum"] / s["core"] if s["core"] else 0.0,
    "mean core logit": lambda s: s["core_logit_sum"] / s["core"] if s["core"] else -np.inf,
    # unsure band per marked pixel: how wide the unsure rim is for the objects' size
    "- band per fg": lambda s: -s["band"] / s["fg"] if s["fg"] else -np.inf,
    "- mean entropy": lambda s: -s["entropy"] / s["pixels"],
    "mean object probability": lambda s: s["object_mean_p"],
}


def f1(records: list[dict]) -> float:
    tp, fp, fn = (sum(r[k] for r in records) for k in ("tp", "fp", "fn"))
    return 2 * tp / max(2 * tp + fp + fn, 1)


def score_set(predictor, slices: list[tuple[np.ndarray, np.ndarray]], zooms) -> list[dict]:
    """One record per (slice, zoom): counts against the label on the slice's own grid and
    `statistics` of the prediction on the zoomed grid, where the model made it (mapped back to
    the own grid, a prediction made zoomed in or out is smoothed by the interpolation, which
    would favour zoom 1 for nothing)."""
    import dataclasses

    import cv2

    from xmdl_tf.autoscale import prediction_grid, unlike_training
    from xmdl_tf.ood import model_distribution

    ic = predictor.config.inference
    has_ood = model_distribution(predictor) is not None
    always = dataclasses.replace(ic, zoom_search="always")
    out = []
    for i, (img, lab) in enumerate(slices):
        # Would `--zoom-search ood` search this slice? (The slice is on the model's grid already.)
        warned = unlike_training(predictor, img, None) if has_ood else None
        # The zoom the product's search picks (`autoscale.prediction_grid`: a centred crop of at most
        # SEARCH_SIDE model px, normalised as the whole slice), as `analyze --zoom-search` would use.
        _, est = prediction_grid(predictor, img, always, None) if predictor.pixel_size_nm else (None, None)
        for z in zooms:
            shown, _ = present(img, lab, z)
            prob_z = predictor.predict_slice(shown, ic.tile, ic.overlap, ic.batch_size, tta=False, pixel_size_nm=None)
            prob = prob_z if z == 1.0 else cv2.resize(prob_z, lab.shape[::-1], interpolation=cv2.INTER_LINEAR)
            m = prob >= ic.threshold
            out.append({"slice": i, "zoom": z, "ood_warning": warned,
                        "product_zoom": est.zoom if est is not None else None, "tp": int((m & lab).sum()),
                        "fp": int((m & ~lab).sum()), "fn": int((~m & lab).sum()),
                        **statistics(prob_z, ic.threshold, ic.min_size_px)})
    return out


def choose(records: list[dict], rule) -> list[dict]:
    """Each slice's record at the zoom `rule(records of that slice)` picks."""
    by_slice: dict[int, list[dict]] = {}
    for r in records:
        by_slice.setdefault(r["slice"], []).append(r)
    return [rule(rs) for _, rs in sorted(by_slice.items())]


def analyse(results: dict) -> list[str]:
    """Markdown: pooled F1 per (model, scored set) for zoom 1, each fixed zoom's best, the oracle and each score."""
    rules = {"zoom 1": lambda rs: next(r for r in rs if r["zoom"] == 1.0),
             "oracle (per slice)": lambda rs: max(rs, key=lambda r: f1([r]))}
    for name, fn in SCORES.items():
        rules[name] = (lambda fn: lambda rs: max(rs, key=lambda r: (fn(r), r["zoom"] == 1.0)))(fn)
    every = [r for m in results.values() for recs in m["records"].values() for r in recs]
    if not all("fg_p_mean_kept" in r for r in every):  # records of a version before that statistic
        del rules["mean fg probability, objects"]
    if all(r.get("product_zoom") is not None for r in every):
        # The product's own choice, on a centred crop (`autoscale.prediction_grid`, zoom search "always").
        rules["product search"] = lambda rs: min(rs, key=lambda r: abs(r["zoom"] - r["product_zoom"]))
    if all(r.get("ood_warning") is not None for r in every):
        # What `--zoom-search ood` does: search only the warned slices (the product's pick where recorded).
        surest = rules.get("product search", rules["mean fg probability"])
        rules["surest where OOD-warned"] = lambda rs: surest(rs) if rs[0]["ood_warning"] else rules["zoom 1"](rs)
    cols = list(rules)
    md = ["| model | scored set | kind | " + " | ".join(cols) + " | best fixed zoom | slices OOD-warned |",
          "|---|---|---|" + "---|" * (len(cols) + 2)]
    means: dict[str, dict[str, list[float]]] = {"zero shot": {}, "seen": {}}
    for model, r in results.items():
        for scored, recs in r["records"].items():
            kind = r["kind"][scored]
            row = {c: f1(choose(recs, rules[c])) for c in cols}
            zs = sorted({x["zoom"] for x in recs})
            fixed = {z: f1([x for x in recs if x["zoom"] == z]) for z in zs}
            best = max(fixed, key=fixed.get)
            for c in cols:
                means[kind].setdefault(c, []).append(row[c])
            picks = {c: np.median([x["zoom"] for x in choose(recs, rules[c])]) for c in cols}
            warned = [x.get("ood_warning") for x in choose(recs, rules["zoom 1"])]
            md.append(f"| {model} | {scored} | {kind} | " + " | ".join(f"{row[c]:.3f} (x{picks[c]:g})" for c in cols)
                      + f" | {fixed[best]:.3f} (x{best:g}) | "
                      + (f"{sum(warned)} / {len(warned)}" if None not in warned else "-") + " |")
    for kind, m in means.items():
        if m:
            md.append(f"\nmean over {len(next(iter(m.values())))} {kind} cells: " +
                      ", ".join(f"{c} {np.mean(v):.3f}" for c, v in m.items()))
    return md


def main(argv: list[str] | None = None) -> int:
    from xmdl_tf import cli
    from xmdl_tf.evaluate import held_out_split
    from xmdl_tf.predict import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("loso", help="a benchmarks/loso.py output folder (without_<set>/ runs)")
    p.add_argument("--data", nargs="+", default=None)
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed)")
    p.add_argument("--zooms", nargs="+", type=cli.positive_float, default=list(ZOOMS))
    p.add_argument("--split", choices=("val", "held-out"), default="val",
                   help="slices scored: val (where choices are made) or held-out (test; val where a set has none)")
    p.add_argument("--analyse", action="store_true", help="only rebuild the table from LOSO/STEM.json")
    args = p.parse_args(argv)
    out = Path(args.loso)
    stem = "zoom_search" if args.split == "val" else "zoom_search_held_out"
    if args.analyse:
        src = out / f"{stem}.json"
        if not src.is_file():
            p.error(f"{src}: not found; run without --analyse first")
        results = json.loads(src.read_text())
        _util.write_results(out, stem, results, analyse(results))
        return 0
    if not args.data:
        p.error("--data is required (unless --analyse)")
    px = _util.pixel_sizes(p, args)
    names = [Path(d).resolve().name for d in args.data]
    runs = {n: out / f"without_{n}" for n in names if (out / f"without_{n}" / "model.keras").is_file()}
    if not runs:
        p.error(f"{out}: no without_<set> runs for these --data sets")
    results = {}
    for left_out, path in runs.items():
        pred = load_model(path)
        records, kind = {}, {}
        for i, n in enumerate(names):
            kind[n] = "zero shot" if n == left_out else "seen"
            split = "val" if args.split == "val" else held_out_split(args.data[i])
            records[n] = score_set(pred, model_grid_slices(pred, args.data[i], px[i], None, split), args.zooms)
            print(f"without_{left_out}", n, len(records[n]), "records", flush=True)
        results[f"without_{left_out}"] = {"kind": kind, "records": records}
    _util.write_results(out, stem, results, analyse(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
