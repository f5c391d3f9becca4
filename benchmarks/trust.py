"""Is the model's self-assessment worth reading? Measured on data it never saw (leave one set out).

    python benchmarks/trust.py --loso runs/loso/em --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5

For each leave-one-set-out model (`benchmarks/loso.py`): calibrate it on its
own training sets' val splits (`xmdl_tf.calibrate`, written into its run
folder), then on the left-out set (val and test slices: zero-shot) and on
its training sets' held-out slices (test, or val for a set without one:
in-distribution) report
- object confidence: AUROC of `confidence` for true (IoU >= 0.5 with a true
  mitochondrion) against false detections, beside the bar set by the mean
  Grad-CAM heat inside each object; instance F1 before and after a user
  reviews only the flagged objects (`needs_review`: flagged false ones removed);
- pixel uncertainty: AUROC of the per-pixel entropy for wrong pixels;
- calibration: ECE of the raw and the calibrated probabilities;
- out of distribution: AUROC of the image OOD score, left-out slices against
  the training sets' held-out slices, and the share of left-out slices warned.
With `--zoom-search ood` every slice is predicted on the grid `analyze`
chooses by default (the zoom search for slices the model's OOD score warns
about; `calibrate.collect_val(grid=True)`), so the figures are those of
`analyze` with its defaults; without it, on the grid the pixel size asks for.
With `--second LOSO2` (another draw of the same study, e.g. `SEED=1` of
`loso_study.sh`), each object also gets a second opinion: the mean
probability of the matching model of LOSO2 inside it and its best IoU with
that model's own objects (`SECOND_FEATURES`; a deep-ensemble agreement).
Writes OUT/trust.json, OUT/trust.md (the tables it prints) and
OUT/trust_tables.npz: every object's features (`confidence.ALL_FEATURES`)
and truth, and every slice's candidate OOD scores (`SLICE_COLUMNS`), for the
calibration fit (seen val), zero-shot and in-distribution parts, so that
other features and scores can be studied without predicting again.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (shared benchmark helpers)


def true_objects(rows) -> int:
    """Number of true mitochondria (connected components of the labels) in the slices."""
    return sum(len(np.unique(r["truth"])) - (1 if (r["truth"] == 0).any() else 0) for r in rows)


def review_f1(is_true: np.ndarray, flagged: np.ndarray, n_true: int) -> tuple[float, float]:
    """Instance F1 of the detections, and after a user removes the flagged false ones."""
    tp, fp = int(is_true.sum()), int((~is_true).sum())
    fp_left = int((~is_true & ~flagged).sum())
    return (round(2 * tp / max(2 * tp + fp + (n_true - tp), 1), 4),
            round(2 * tp / max(2 * tp + fp_left + (n_true - tp), 1), 4))


# Features from a second model of the same recipe (--second): its mean probability inside each
# object, and the object's best IoU with the second model's own objects.
SECOND_FEATURES = ("second_probability", "second_agreement")


def second_opinion(second, rows) -> np.ndarray:
    """(N, 2) `SECOND_FEATURES` of every object 1..N of each row's instances, in `object_table` order:
    `second` (a Predictor) predicts each slice as `analyze` would with its own defaults."""
    from xmdl_tf.confidence import _means
    from xmdl_tf.postprocess import best_iou, instances

    ic = second.config.inference
    out = [np.zeros((0, 2))]
    for r in rows:
        p2 = second.predict_slice(r["image"], ic.tile, ic.overlap, ic.batch_size, tta=ic.tta,
                                  pixel_size_nm=r["pixel_size_nm"], rescale=ic.rescale)
        n = int(r["instances"].max())
        out.append(np.column_stack([_means(p2, r["instances"], n),
                                    best_iou(r["instances"], instances(p2, ic, r["pixel_size_nm"]))]))
    return np.concatenate(out)


def detections(x: np.ndarray, y: np.ndarray, n_true: int, confidence, names: tuple[str, ...],
               slice_of: np.ndarray | None = None) -> dict:
    """Pooled object-level figures of some slices from their object table: features x (N, F) named
    `names` (`confidence.ALL_FEATURES` first, then any extra ones, whose own AUROC is reported too),
    is_true y (N,), and the number of true mitochondria in those slices. slice_of (N,): the slice
    of each object, for the confidence AUROC's 95% interval (a bootstrap over slices)."""
    from xmdl_tf.confidence import ALL_FEATURES, REVIEW_BELOW, auroc, auroc_interval

    used = [ALL_FEATURES.index(f) for f in confidence.features] if confidence is not None else []
    conf = confidence.predict(x[:, used]) if confidence is not None and len(x) else np.full(len(x), np.nan)
    heat = x[:, ALL_FEATURES.index("mean_gradcam")]
    flagged = conf < REVIEW_BELOW
    f1, f1_reviewed = review_f1(y, flagged, n_true)
    tp, fp = int(y.sum()), int((~y).sum())
    # Each feature alone (sign-free: max(A, 1 - A)), to see which ones carry over to unseen data.
    by_feature = {f: round(max(a, 1 - a), 4) if np.isfinite(a := auroc(x[:, i], y)) else None
                  for i, f in enumerate(names)} if len(x) else {}
    interval = auroc_interval(conf, y, slice_of) if slice_of is not None and len(y) else (np.nan, np.nan)
    return {"objects": len(y), "true": tp, "false": fp, "auroc_confidence": auroc(conf, y),
            "auroc_confidence_95": [round(v, 4) for v in interval],
            "auroc_gradcam": auroc(heat, y), "flagged": int(flagged.sum()), "instance_f1": f1,
            "instance_f1_after_review": f1_reviewed, "auroc_by_feature": by_feature}


def pixels(rows, temperature: float, k: int = 200_000, seed: int = 0) -> dict:
    from xmdl_tf.calibration import apply_temperature, expected_calibration_error
    from xmdl_tf.confidence import auroc, entropy

    rng = np.random.default_rng(seed)
    ps, ys, ss = [], [], []
    for r in rows:
        idx = rng.choice(r["probability"].size, min(k // max(len(rows), 1), r["probability"].size), replace=False)
        ps.append(r["probability"].ravel()[idx])
        ys.append((r["label"] > 0).ravel()[idx])
        if r.get("spread") is not None:
            ss.append(r["spread"].ravel()[idx])
    p, y = np.concatenate(ps), np.concatenate(ys)
    cal = apply_temperature(p, temperature)
    wrong = (p >= 0.5) != y
    return {"ece_raw": round(expected_calibration_error(p, y), 4), "ece_calibrated": round(expected_calibration_error(cal, y), 4),
            "auroc_entropy_for_errors": round(auroc(entropy(cal), wrong), 4),
            "auroc_tta_spread_for_errors": round(auroc(np.concatenate(ss), wrong), 4) if len(ss) == len(ps) else None}


# Candidate image features for the OOD score: (layers, statistics) of `ood.image_features`.
OOD_SPECS = {
    "ood_bottleneck": (("bottleneck_conv2",), "mean"),
    "ood_style": (("enc1_relu2", "enc2_relu2", "enc3_relu2"), "mean_std"),
    "ood_encoder": (("enc1_relu2", "enc2_relu2", "enc3_relu2", "enc4_relu2", "bottleneck_conv2"), "mean_std"),
}
OUTPUT_COLUMNS = ("mean_entropy", "uncertain_fraction", "foreground_fraction", "mean_object_confidence",
                  "review_fraction")
SLICE_COLUMNS = tuple(OOD_SPECS) + OUTPUT_COLUMNS


def slice_scores(rows, temperature: float, confidence, ood: dict[str, list[float]]) -> np.ndarray:
    """(n_slices, len(SLICE_COLUMNS)) candidate out-of-distribution scores of each slice: the
    `OOD_SPECS` scores given in `ood`, then the `OUTPUT_COLUMNS` from its predictions."""
    from xmdl_tf.calibration import apply_temperature
    from xmdl_tf.confidence import entropy, feature_matrix, object_features

    out = []
    for i, r in enumerate(rows):
        p = apply_temperature(r["probability"], temperature)
        conf = np.full(1, np.nan)
        if confidence is not None and r["instances"].max() > 0:
            conf = confidence.predict(feature_matrix(object_features(r["instances"], p, r["gradcam"], spread=r.get("spread"),
                                                                     alternatives=r.get("alternatives"), image=r["image"]),
                                                     confidence.features))
        out.append([ood[k][i] for k in OOD_SPECS] +
                   [float(entropy(p).mean()), float(((p > 0.2) & (p < 0.8)).mean()), float((p >= 0.5).mean()),
                    float(np.nanmean(conf)) if np.isfinite(conf).any() else np.nan,
                    float(np.mean(conf < 0.5)) if np.isfinite(conf).any() else np.nan])
    return np.array(out, np.float64).reshape(-1, len(SLICE_COLUMNS))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--loso", required=True, help="folder of benchmarks/loso.py runs (without_<set>/)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None)
    p.add_argument("--out", default=None, help="folder for trust.json (default: --loso)")
    p.add_argument("--tta", choices=("on", "off", "model"), default="on",
                   help="test-time augmentation for the probabilities (default on, as the shipped model's "
                        "defaults; 'model': each model's own setting)")
    p.add_argument("--zoom-search", choices=("off", "always", "ood"), default="off",
                   help="predict every slice on the grid `analyze --zoom-search MODE` chooses (each model's OOD model, "
                        "ood.npz from an earlier `calibrate`, decides for 'ood'; auto zoom applies where the model knows "
                        "its objects' widths); default off: on the grid the pixel size asks for, as the earlier tables")
    p.add_argument("--calibration-from", default=None, metavar="LOSO2",
                   help="use the calibration stored in LOSO2/without_<set>/config.json instead of fitting one (e.g. "
                        "the models `adapt` started from, calibrated by an earlier run of this script: what an "
                        "adapted model that inherits its parent's calibration gives)")
    p.add_argument("--objects-only", action="store_true",
                   help="only the object and pixel figures: no out-of-distribution fits (about half the time; "
                        "the OOD columns of the tables are NaN)")
    p.add_argument("--second", default=None, metavar="LOSO2",
                   help="another folder of loso.py runs of the same sets: adds each object's second opinion "
                        f"({', '.join(SECOND_FEATURES)}) from its model for the same left-out set")
    args = p.parse_args(argv)
    from xmdl_tf.calibrate import collect_val, fit_calibration, fit_ood, object_sets, object_table
    from xmdl_tf.config import Config
    from xmdl_tf.confidence import ALL_FEATURES, ObjectConfidence, auroc
    from xmdl_tf.evaluate import held_out_split
    from xmdl_tf.ood import OOD_FILE, FeatureDistribution
    from xmdl_tf.postprocess import best_iou
    from xmdl_tf.predict import load_model

    sizes = _util.pixel_sizes(p, args)
    if not any((Path(args.loso) / f"without_{Path(d).resolve().name}" / "model.keras").is_file() for d in args.data):
        p.error(f"--loso {args.loso}: no without_<set>/model.keras for these --data sets (benchmarks/loso.py runs)")
    for d in args.data if args.second else ():
        name = Path(d).resolve().name
        if (Path(args.loso) / f"without_{name}" / "model.keras").is_file() and \
                not (Path(args.second) / f"without_{name}" / "model.keras").is_file():
            p.error(f"--second {args.second}: no without_{name}/model.keras beside --loso's")
    by_name = {Path(d).resolve().name: (d, px) for d, px in zip(args.data, sizes)}
    if args.calibration_from and not args.objects_only:
        p.error("--calibration-from needs --objects-only: an inherited calibration has no OOD model for these weights")
    inherited = {}
    for name in by_name if args.calibration_from else ():
        if not (Path(args.loso) / f"without_{name}" / "model.keras").is_file():
            continue
        path = Path(args.calibration_from) / f"without_{name}" / "config.json"
        try:
            inherited[name] = Config.load(path).calibration
        except (OSError, ValueError) as err:
            p.error(f"--calibration-from: {err}")
        if not inherited[name].get("object_confidence"):
            p.error(f"--calibration-from: {path} holds no object confidence (calibrate that model first)")
    if args.zoom_search == "ood":
        runs = (Path(args.loso) / f"without_{name}" for name in by_name)
        _util.require_ood(p, [r for r in runs if (r / "model.keras").is_file()])
    report, dump = {}, {}
    for left, (d_left, px_left) in by_name.items():
        run = Path(args.loso) / f"without_{left}"
        if not (run / "model.keras").is_file():
            print(f"{run}: no model; skipped")
            continue
        seen = [(d, px) for n, (d, px) in by_name.items() if n != left]
        pred = load_model(run)
        second = load_model(Path(args.second) / f"without_{left}") if args.second else None
        for m in (pred, second):
            if m is not None and args.tta != "model":
                m.config = dataclasses.replace(m.config, inference=dataclasses.replace(m.config.inference,
                                                                                   tta=args.tta == "on"))
        pred.config = dataclasses.replace(pred.config, inference=dataclasses.replace(
            pred.config.inference, zoom_search=args.zoom_search))
        grid = args.zoom_search != "off"
        val = collect_val(pred, [d for d, _ in seen], [px for _, px in seen], verbose=False, grid=grid)
        cal = inherited.get(left) or fit_calibration(pred, val, [d for d, _ in seen], [px for _, px in seen],
                                                     verbose=False, ood=not args.objects_only)
        conf = ObjectConfidence.from_dict(cal["object_confidence"]) if cal["object_confidence"] else None
        t = cal["temperature"]
        unseen = [r for split in ("val", "test") if (Path(d_left) / split / "x").is_dir()
                  for r in collect_val(pred, [d_left], [px_left], split, verbose=False, grid=grid)[left]]
        held = [r for d, px in seen for r in collect_val(pred, [d], [px], held_out_split(d), verbose=False,
                                                         grid=grid)[Path(d).resolve().name]]
        # Everything needed to study other confidence features and OOD scores without predicting again.
        val_rows = [r for rows in val.values() for r in rows]
        parts = {"fit": val_rows, "zero_shot": unseen, "in_distribution": held}
        ood = {part: {name: [np.nan] * len(rows) for name in OOD_SPECS} for part, rows in parts.items()}
        s_un, s_in, dist = [np.nan] * len(unseen), [np.nan] * len(held), None
        if not args.objects_only:
            dist = FeatureDistribution.load(run / OOD_FILE)
            score = lambda rows: [dist.image_score(pred, r["image"], r["pixel_size_nm"]) for r in rows]  # noqa: E731
            s_un, s_in = score(unseen), score(held)
            for name, (layers, stats) in OOD_SPECS.items():
                d, _ = fit_ood(pred, [d for d, _ in seen], [px for _, px in seen], val, verbose=False,
                               tile=dist.tile, layers=layers, stats=stats)
                for part, rows in parts.items():
                    ood[part][name] = [d.image_score(pred, r["image"], r["pixel_size_nm"]) for r in rows]
        extra = {part: dict(zip(SECOND_FEATURES, second_opinion(second, rows).T)) for part, rows in parts.items()
                 } if second is not None else {part: {} for part in parts}
        names = ALL_FEATURES + (SECOND_FEATURES if second is not None else ())
        found = {}  # the object table of each part, computed once for the dump and the report
        for part, rows in parts.items():
            x, y = object_table(rows, t, ALL_FEATURES)
            x = np.column_stack([x, *extra[part].values()]) if extra[part] else x
            found[part] = (x, y, true_objects(rows))
            dump[f"{left}/{part}/x"], dump[f"{left}/{part}/y"] = x, y
            dump[f"{left}/{part}/n_true"] = np.int64(found[part][2])
            dump[f"{left}/{part}/groups"] = object_sets(rows)
            # Which slice each object is of, and its best IoU with a true mitochondrion (> 0.5: "true").
            dump[f"{left}/{part}/slice_of"] = np.repeat(np.arange(len(rows)), [int(r["instances"].max()) for r in rows])
            dump[f"{left}/{part}/iou"] = (np.concatenate([best_iou(r["instances"], r["truth"]) for r in rows])
                                          if rows else np.zeros(0))
            dump[f"{left}/{part}/slices"] = slice_scores(rows, t, conf, ood[part])
        report[left] = {
            "calibration": {k: cal[k] for k in ("temperature", "ece", "nll")},
            "zoom_search": args.zoom_search,
            # How many slices of each part were predicted at each zoom (all x1 without zoom search).
            "zooms": {part: {f"{z:.3g}": int(n) for z, n in zip(*np.unique([r["zoom"] for r in rows],
                                                                      return_counts=True))}
                      for part, rows in parts.items()},
            "zero_shot": {**detections(*found["zero_shot"], conf, names, dump[f"{left}/zero_shot/slice_of"]),
                          **pixels(unseen, t)},
            "in_distribution": {**detections(*found["in_distribution"], conf, names,
                                             dump[f"{left}/in_distribution/slice_of"]), **pixels(held, t)},
            "ood": {"auroc": round(auroc(np.r_[s_un, s_in], np.r_[np.ones(len(s_un), bool), np.zeros(len(s_in), bool)]), 4),
                    "warned_unseen": float(np.mean(np.array(s_un) > dist.threshold)),
                    "warned_seen": float(np.mean(np.array(s_in) > dist.threshold)), "threshold": dist.threshold}
            if dist is not None else None,
        }
        print(left, json.dumps(report[left], indent=1), flush=True)
    out = Path(args.out or args.loso)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trust.json").write_text(json.dumps(report, indent=2) + "\n")
    features = ALL_FEATURES + (SECOND_FEATURES if args.second else ())
    np.savez_compressed(out / "trust_tables.npz", features=np.array(features), slice_columns=np.array(SLICE_COLUMNS),
                        **dump)
    rows = ["| left out | data | objects (true/false) | AUROC confidence [95%, slices resampled] | AUROC Grad-CAM | flagged | instance F1 -> after review | ECE raw -> calibrated | AUROC entropy (pixel errors) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for left, r in report.items():
        for part in ("zero_shot", "in_distribution"):
            x = r[part]
            rows.append(f"| {left} | {part.replace('_', ' ')} | {x['objects']} ({x['true']}/{x['false']}) | "
                        f"{x['auroc_confidence']:.3f} [{x['auroc_confidence_95'][0]:.3f}, {x['auroc_confidence_95'][1]:.3f}] | "
                        f"{x['auroc_gradcam']:.3f} | {x['flagged']} | "
                        f"{x['instance_f1']:.3f} -> {x['instance_f1_after_review']:.3f} | {x['ece_raw']:.3f} -> "
                        f"{x['ece_calibrated']:.3f} | {x['auroc_entropy_for_errors']:.3f} |")
    rows += ["", "| left out | OOD AUROC (left-out vs seen held-out slices) | warned: left-out | warned: seen |", "|---|---|---|---|"]
    rows += [f"| {k} | {r['ood']['auroc']:.3f} | {r['ood']['warned_unseen']:.0%} | {r['ood']['warned_seen']:.0%} |"
             for k, r in report.items() if r["ood"]]
    print("\n".join(rows))
    (out / "trust.md").write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
