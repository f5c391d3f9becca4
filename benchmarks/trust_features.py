"""Which confidence features and which OOD scores carry over to data the model never saw?

    python benchmarks/trust_features.py runs/loso/em/trust_tables.npz

Reads the tables `benchmarks/trust.py` writes (every predicted object's
features and truth, every slice's candidate OOD scores, per leave-one-set-out
model: `fit` = the seen sets' val slices the calibration is fitted on,
`zero_shot` = the left-out set, `in_distribution` = the seen sets' held-out
slices) and prints, per left-out set and on average:
1. each feature's own AUROC for true against false detections, its direction
   taken from the fit part (so a feature that flips on unseen data scores
   below 0.5);
2. each candidate feature set (`CANDIDATES`, and the features `calibrate`'s
   rule selects at a few cut-offs) fitted as `ObjectConfidence` on the fit
   part, as a full logistic fit and with equal weights (suffix " (equal)",
   what `calibrate` ships), scored zero shot and in distribution
   (AUROC; share of detections flagged; instance F1 before and after a user
   removes the flagged false ones); a few also fitted on the fit part plus the
   other folds' zero-shot detections (`+other_zero_shot`: examples of errors
   on an unseen microscope, none from the set being scored); tables with
   slices also get `relative_log_area` (each object's log10 area less its
   slice's median) and the rule's selection from a pool that includes it;
3. each candidate OOD score: AUROC of left-out slices against the seen sets'
   held-out slices, and the share of each warned at the 99th percentile of
   the fit (val) slices' scores;
4. what the false detections are (tables with `iou`, each detection's best
   IoU with a true mitochondrion): the share that touch no true one (IoU 0:
   another structure) and that overlap one at IoU under 0.5 (a mitochondrion
   segmented too large, too small, merged or split), and the AUROC of the
   shipped rule (`REFERENCE`) for true detections against each kind alone.
A choice made here is made on the leave-one-set-out splits (our own data),
never on a test set the model is reported on elsewhere.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trust import SECOND_FEATURES, review_f1  # noqa: E402
from xmdl_tf.confidence import (AGREEMENT_FEATURES, ALL_FEATURES, FEATURES, MIN_SET_AUROC, POOL,  # noqa: E402
                                 REVIEW_BELOW, ObjectConfidence, auroc, auroc_interval, select_features)

SCALE_FREE = ("mean_probability", "low_probability", "mean_uncertainty", "edge_contrast", "mean_gradcam",
              "solidity", "elongation", "gradcam_contrast")
CANDIDATES = {
    "shipped": FEATURES,
    "all": ALL_FEATURES,
    "scale_free": SCALE_FREE,
    "probability": ("mean_probability", "low_probability", "mean_uncertainty", "edge_contrast"),
    "gradcam": ("mean_gradcam", "gradcam_contrast"),
    "gradcam_shape": ("mean_gradcam", "gradcam_contrast", "solidity", "elongation"),
    "spread": ("tta_spread", "mean_probability", "mean_gradcam"),
    "scale_free_spread": SCALE_FREE + ("tta_spread",),
    "probability_gradcam": ("mean_probability", "low_probability", "edge_contrast", "mean_gradcam",
                            "gradcam_contrast"),
    # Does the object keep its shape under a moved threshold and under each test-time augmentation?
    "agreement": ("threshold_agreement", "tta_agreement"),
    "probability_agreement": ("mean_probability", "edge_contrast", "threshold_agreement", "tta_agreement"),
    "scale_free_agreement": SCALE_FREE + ("threshold_agreement",),
    "scale_free_spread_agreement": SCALE_FREE + ("tta_spread", "threshold_agreement", "tta_agreement"),
    "all_agreement": ("threshold_agreement", "tta_agreement", "scale_agreement"),
    "image": ("image_contrast", "image_texture"),
    "scale_free_image": SCALE_FREE + ("image_contrast", "image_texture"),
    "scale_free_all_agreement": SCALE_FREE + ("tta_spread", "threshold_agreement", "tta_agreement",
                                              "scale_agreement"),
    # A second model's opinion (trust.py --second): a two-member deep ensemble.
    "second": SECOND_FEATURES,
    "probability_second": ("mean_probability", "edge_contrast") + SECOND_FEATURES,
    "gradcam_second": ("mean_gradcam", "gradcam_contrast") + SECOND_FEATURES,
}
# The pool `calibrate` selects from, widened by the agreement features (for the selected@ rows).
AGREEMENT_POOL = POOL + tuple(f for f in AGREEMENT_FEATURES if f not in POOL)
# Derived from the tables (log_area and slice_of): each object's log10 area less its slice's median,
# a size feature that means the same at any pixel size (candidates "selected+relative_area@...").
RELATIVE_AREA = "relative_log_area"
EQUAL = " (equal)"  # suffix of the candidates combined with equal weights
# Candidates also fitted with the other folds' zero-shot detections added (suffix SHIFTED).
SHIFTED = "+other_zero_shot"
SHIFTED_CANDIDATES = ("shipped", "scale_free", "scale_free_spread", "probability_gradcam")
# The rule `calibrate` ships: its feature selection at its own cut-off, equal weights (tables
# without data-set groups cannot select: there, the shipped features with equal weights).
REFERENCE = f"selected@{MIN_SET_AUROC}{EQUAL}"
# Candidate OOD scores, oriented so that higher means "more unlike the training data".
OOD_SIGN = {"mean_entropy": 1, "uncertain_fraction": 1, "foreground_fraction": 1,
            "mean_object_confidence": -1, "review_fraction": 1}


def directed_auroc(train_x: np.ndarray, train_y: np.ndarray, x: np.ndarray, y: np.ndarray) -> float:
    """AUROC of one feature on (x, y), oriented as it separates (train_x, train_y)."""
    sign = 1.0 if auroc(train_x, train_y) >= 0.5 else -1.0
    return auroc(sign * x, y)


def error_kinds(score: np.ndarray, is_true: np.ndarray, iou: np.ndarray) -> dict:
    """What the false detections are, and how well `score` (N,) tells each kind from the true
    ones (`is_true` (N,) bool; `iou` (N,): each detection's best IoU with a true object):
    `other`: touches no true object (IoU 0); `partial`: overlaps one, at IoU under 0.5."""
    is_true, iou = np.asarray(is_true, bool), np.asarray(iou, np.float64)
    other, partial = ~is_true & (iou <= 0), ~is_true & (iou > 0)
    n_false = max(int((~is_true).sum()), 1)
    return {"false": int((~is_true).sum()), "other_share": round(float(other.sum() / n_false), 3),
            "partial_share": round(float(partial.sum() / n_false), 3),
            "auroc_other": round(auroc(score[is_true | other], is_true[is_true | other]), 4),
            "auroc_partial": round(auroc(score[is_true | partial], is_true[is_true | partial]), 4)}


def relative_to_slice(values: np.ndarray, slice_of: np.ndarray) -> np.ndarray:
    """Each object's `values` (N,) minus the median of its slice's objects (`slice_of` (N,)): for
    log10 areas, how many times larger than the slice's typical detection, whatever the pixel size."""
    out = np.empty(len(values))
    for k in np.unique(slice_of):
        m = slice_of == k
        out[m] = values[m] - np.median(values[m])
    return out


def study(tables) -> dict:
    names = [str(f) for f in tables["features"]]
    columns = [str(c) for c in tables["slice_columns"]]
    folds = sorted({k.split("/")[0] for k in tables.files if "/" in k})
    derive = "log_area" in names and all(f"{f}/fit/slice_of" in tables.files for f in folds)
    if derive:
        names = names + [RELATIVE_AREA]

    def features(fold: str, p: str) -> np.ndarray:
        x = tables[f"{fold}/{p}/x"]
        if derive:
            x = np.c_[x, relative_to_slice(x[:, names.index("log_area")], tables[f"{fold}/{p}/slice_of"])]
        return x

    out = {}
    for left in folds:
        part = {p: (features(left, p), tables[f"{left}/{p}/y"].astype(bool), tables[f"{left}/{p}/slices"])
                for p in ("fit", "zero_shot", "in_distribution")}
        # The slice each object lies in (older tables: none, each object its own).
        slice_of = {p: tables[f"{left}/{p}/slice_of"] if f"{left}/{p}/slice_of" in tables.files
                    else np.arange(len(part[p][1])) for p in part}
        fx, fy, fs = part["fit"]
        r = {"feature": {}, "candidate": {}, "ood": {}}
        for i, f in enumerate(names):
            r["feature"][f] = {p: round(directed_auroc(fx[:, i], fy, part[p][0][:, i], part[p][1]), 4)
                               for p in ("fit", "zero_shot", "in_distribution")}
        candidates = dict(CANDIDATES)
        if f"{left}/fit/groups" in tables.files:  # the rule `calibrate` applies, at a few cut-offs
            for tag, pool_names in (("", tuple(f for f in POOL if f in names)), ("+all_agreement", AGREEMENT_POOL),
                                    ("+second", POOL + SECOND_FEATURES), ("+relative_area", POOL + (RELATIVE_AREA,))):
                if tag and not set(pool_names) <= set(names):
                    continue
                pool = [names.index(f) for f in pool_names]
                for cut in sorted({0.55, 0.6, 0.65, 0.7, MIN_SET_AUROC}):
                    candidates[f"selected{tag}@{cut}"] = select_features(fx[:, pool], fy, tables[f"{left}/fit/groups"],
                                                                         pool_names, cut)
            r["selected"] = {c: list(f) for c, f in candidates.items() if c.startswith("selected")}
        # Also fit each candidate on the fit part plus the *other* folds' zero-shot detections: what a
        # model's detections look like on a microscope it never saw, from sets other than the one
        # scored here (so nothing of the left-out set enters its own fit).
        ox = [features(o, "zero_shot") for o in folds if o != left]
        oy = [tables[f"{o}/zero_shot/y"].astype(bool) for o in folds if o != left]
        shifted = (np.concatenate([fx, *ox]), np.concatenate([fy, *oy]))
        # Tables of an older trust.py lack the newer features: those candidates are left out.
        candidates = {c: f for c, f in candidates.items() if set(f) <= set(names)}
        fits = [(c, feats, (fx, fy), "logistic") for c, feats in candidates.items()]
        # The same features combined with equal weights (`ObjectConfidence.fit(combine="equal")`).
        fits += [(f"{c}{EQUAL}", feats, (fx, fy), "equal") for c, feats in candidates.items()]
        fits += [(f"{c}{SHIFTED}", candidates[c], shifted, "logistic") for c in SHIFTED_CANDIDATES if c in candidates]
        reference = REFERENCE if any(f[0] == REFERENCE for f in fits) else f"shipped{EQUAL}"
        for c, feats, (tx, ty), combine in fits:
            idx = [names.index(f) for f in feats]
            model = ObjectConfidence(tuple(feats)).fit(tx[:, idx], ty, combine=combine)
            conf = {p: model.predict(part[p][0][:, idx]) for p in ("fit", "zero_shot", "in_distribution")}
            if c == reference:
                # How sure each figure is: a 95% interval from resampling whole slices.
                r["interval"] = {p: [round(v, 4) for v in (auroc(conf[p], part[p][1]),
                                                            *auroc_interval(conf[p], part[p][1], slice_of[p]))]
                                 for p in ("zero_shot", "in_distribution")}
                r["errors_of"] = reference
                r["errors"] = {p: error_kinds(conf[p], part[p][1], tables[f"{left}/{p}/iou"])
                               for p in ("zero_shot", "in_distribution") if f"{left}/{p}/iou" in tables.files}
            r["candidate"][c] = {p: round(auroc(conf[p], part[p][1]), 4) for p in conf}
            for p in ("zero_shot", "in_distribution"):
                flagged = conf[p] < REVIEW_BELOW
                before, after = review_f1(part[p][1], flagged, int(tables[f"{left}/{p}/n_true"]))
                r["candidate"][c].update({f"{p}_flagged": float(flagged.mean()), f"{p}_f1": before,
                                          f"{p}_f1_reviewed": after})
        s_un, s_in = part["zero_shot"][2], part["in_distribution"][2]
        for j, col in enumerate(columns):
            sign = OOD_SIGN.get(col, 1)
            un, seen, val = sign * s_un[:, j], sign * s_in[:, j], sign * fs[:, j]
            thr = float(np.nanquantile(val, 0.99))
            r["ood"][col] = {"auroc": round(auroc(np.r_[un, seen], np.r_[np.ones(len(un), bool),
                                                                       np.zeros(len(seen), bool)]), 4),
                             "warned_unseen": round(float(np.mean(un > thr)), 3),
                             "warned_seen": round(float(np.mean(seen > thr)), 3)}
        out[left] = r
    return out


def table(out: dict, key: str, parts: tuple[str, ...], field_of=lambda v, p: v[p]) -> list[str]:
    folds = list(out)
    rows_ = list(dict.fromkeys(k for v in out.values() for k in v[key]))
    head = [f"{f} {p}" for f in folds for p in parts] + [f"mean {p}" for p in parts]
    lines = [f"| {key} | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for name in rows_:
        get = lambda f, p: field_of(out[f][key][name], p) if name in out[f][key] else np.nan  # noqa: E731
        vals = [get(f, p) for f in folds for p in parts]
        means = [np.nanmean([get(f, p) for f in folds]) for p in parts]
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals + means) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tables", help="trust_tables.npz from benchmarks/trust.py")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)
    out = study(np.load(args.tables))
    lines = table(out, "feature", ("zero_shot", "in_distribution")) + [""]
    lines += table(out, "candidate", ("fit", "zero_shot", "in_distribution")) + [""]
    lines += table(out, "candidate", ("zero_shot_flagged", "zero_shot_f1", "zero_shot_f1_reviewed")) + [""]
    lines += table(out, "ood", ("auroc", "warned_unseen", "warned_seen"), lambda v, p: v[p])
    if all("interval" in r for r in out.values()):
        rule = next(iter(out.values()))["errors_of"]
        lines += ["", f"AUROC of {rule} with its 95% interval (bootstrap over slices):", "",
                  "| left out | zero shot | in distribution |", "|---|---|---|"]
        lines += [f"| {f} | " + " | ".join("{:.3f} [{:.3f}, {:.3f}]".format(*r["interval"][p])
                                          for p in ("zero_shot", "in_distribution")) + " |" for f, r in out.items()]
    if all(len(r.get("errors", ())) == 2 for r in out.values()):
        rule = next(iter(out.values()))["errors_of"]
        lines += ["", f"false detections, and AUROC of {rule} for true ones against each kind:"]
        kinds = ("other_share", "partial_share", "auroc_other", "auroc_partial")
        lines += table({f: {"errors": {k: {p: e[k] for p, e in r["errors"].items()} for k in kinds}}
                        for f, r in out.items()}, "errors", ("zero_shot", "in_distribution"))
    lines += [f"{f}: {json.dumps(r['selected'])}" for f, r in out.items() if "selected" in r]
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
