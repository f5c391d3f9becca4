"""Fit what tells a user when not to trust the model: `python -m xmdl_tf.calibrate`.

    python -m xmdl_tf.calibrate --model runs/ref --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5

On the model's own data (never a test split):
All on the probabilities `analyze` makes (with test-time augmentation when
the model's defaults use it).
1. temperature scaling of the foreground probability, fitted on val pixels
   (the same number of pixels from every set), with the expected calibration
   error of each set before and after (`--figure`: reliability diagrams);
2. the per-object confidence model (`confidence.ObjectConfidence`), fitted on
   the val split's predicted objects labelled true or false by matching them
   to the labels at IoU >= 0.5, over the features that separate the two in
   every set (`confidence.select_features`);
3. the out-of-distribution model (`ood.FeatureDistribution`) of the training
   slices' encoder texture statistics (`ood.OOD_LAYERS`), its warning
   threshold the 99th percentile of the val slices' scores.
Stored beside the model: `calibration` in config.json, and `ood.npz`.
`analyze` then writes uncertainty.tif, per-object `confidence` and
`needs_review`, and per-image `ood_score` and `ood_warning`.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np

from . import cli
from .config import Config

PIXELS_PER_SET = 400_000
MIN_EACH = 5  # true and false val detections needed to fit the object confidence model


def collect_val(predictor, data: list[str], pixel_sizes: list[float | None], split: str = "val",
                verbose: bool = True, agreement: tuple[str, ...] | None = None,
                grid: bool = False, ignore_value: int | None = None) -> dict[str, list[dict]]:
    """Per set, per slice of `split`: probability, Grad-CAM, predicted instances, labels and pixel size.

    As `analyze` makes them: with test-time augmentation when the model's defaults say so (then
    "spread" is the TTA members' standard deviation, else None), and the instances under small
    changes of the prediction (`postprocess.alternative_instances`) that the `agreement` features
    need (default: every one of `confidence.AGREEMENT_FEATURES`; "scale_agreement" costs about 2
    more passes, for the `postprocess.ZOOMS` scales; none: "alternatives" is None).
    grid: predict each slice on the grid `analyze` chooses (`autoscale.prediction_grid`: auto zoom
    for an unknown pixel size, `InferenceConfig.zoom_search`), its objects' minimum size kept in the
    slice's pixels (`autoscale.for_objects`); "zoom" is that zoom (1 when none was made). Default:
    on the grid the pixel size asks for, as the calibration has always been fitted.
    ignore_value: label value of unlabelled pixels (default: each set's dataset.json "ignore_value"):
    zero in "label" and "truth", False in "valid" (None when there is none), and every predicted
    object touching them dropped from "instances" (their truth is unknown).
    """
    from .autoscale import for_objects, prediction_grid
    from .confidence import AGREEMENT_FEATURES

    from skimage.segmentation import relabel_sequential

    from .io import find_pairs, read_pair, read_pixel_size_nm, set_ignore_values
    from .postprocess import ZOOMS, alternative_instances, ground_truth_instances, instances

    ic = predictor.config.inference
    agreement = AGREEMENT_FEATURES if agreement is None else tuple(agreement)
    out = {}
    for d, px_given, ignore in zip(data, pixel_sizes, set_ignore_values(data, split, ignore_value)):
        name = Path(d).resolve().name
        rows = []
        pairs = find_pairs(d, split)
        for i, pair in enumerate(pairs):
            image, label = read_pair(pair)
            valid = None if ignore is None else label != ignore
            px = read_pixel_size_nm(pair.image) or px_given
            grid_px, zoom = prediction_grid(predictor, image, ic, px) if grid else (px, None)
            ic_slice = for_objects(ic, zoom)
            prob, cam = predictor.explain_slice(image, ic.gradcam_layer, None, ic.tile, ic.overlap, ic.batch_size,
                                                pixel_size_nm=grid_px, rescale=ic.rescale)
            spread = members = None
            if ic.tta:
                prob, spread, *rest = predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=True,
                                                              pixel_size_nm=grid_px, rescale=ic.rescale, spread=True,
                                                              members="tta_agreement" in agreement)
                members = rest[0] if rest else None
            alternatives = None
            if agreement:
                zoomed = [predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=False,
                                                  pixel_size_nm=grid_px, rescale=ic.rescale, zoom=z)
                          for z in ZOOMS] if "scale_agreement" in agreement else None
                alternatives = alternative_instances(prob, ic_slice, px, members, zoomed)
            objects = instances(prob, ic_slice, px)
            if valid is not None:  # unlabelled pixels: no truth there, and no object touching them is judged
                label = np.where(valid, label, 0)
                objects[np.isin(objects, np.unique(objects[~valid]))] = 0
                objects = relabel_sequential(objects)[0]
            rows.append({"set": name, "name": pair.name, "image": image, "probability": prob, "gradcam": cam,
                         "spread": spread, "label": label, "valid": valid,
                         "pixel_size_nm": px, "instances": objects,
                         "zoom": zoom.zoom if zoom is not None else 1.0,
                         "alternatives": alternatives,
                         "truth": ground_truth_instances(label)})
            if verbose:
                print(f"{name} [{split}] {i + 1}/{len(pairs)}", flush=True)
        out[name] = rows
    return out


def fit_temperature_on(slices: dict[str, list[dict]], per_set: int = PIXELS_PER_SET, seed: int = 0,
                       figure: str | Path | None = None) -> dict:
    """Temperature from an equal number of random val pixels of each set; ECE per set before and after.

    figure: also draw the reliability diagram of each set, before and after, into this PNG.
    """
    from .calibration import apply_temperature, expected_calibration_error, fit_temperature, nll, sample_pixels

    rng = np.random.default_rng(seed)
    samples = {}
    for name, rows in slices.items():
        k = max(1, per_set // max(len(rows), 1))
        ps, ys = zip(*(sample_pixels(r["probability"], r["label"] > 0, r.get("valid"), k, rng) for r in rows))
        samples[name] = (np.concatenate(ps), np.concatenate(ys))
    p = np.concatenate([s[0] for s in samples.values()])
    y = np.concatenate([s[1] for s in samples.values()])
    t = fit_temperature(p, y)
    ece = {name: {"before": round(expected_calibration_error(ps, ys), 4),
                  "after": round(expected_calibration_error(apply_temperature(ps, t), ys), 4)}
           for name, (ps, ys) in samples.items()}
    nlls = {"before": round(nll(p, y), 5), "after": round(nll(apply_temperature(p, t), y), 5)}
    if figure is not None:
        reliability_figure(samples, t, ece, figure)
    return {"temperature": round(t, 4), "ece": ece, "nll": nlls, "pixels_per_set": per_set}


def object_sets(rows: list[dict]) -> np.ndarray:
    """The data set of every predicted object of the slices, in `object_table`'s order (N,) str."""
    return np.repeat([r["set"] for r in rows], [int(r["instances"].max()) for r in rows])


def reliability_figure(samples: dict[str, tuple[np.ndarray, np.ndarray]], temperature: float, ece: dict,
                       path: str | Path) -> None:
    """One panel per set: observed foreground frequency against predicted probability, raw and
    after the temperature, with the pixel count per bin (log scale) below; written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .calibration import apply_temperature, reliability
    from .runlock import atomic_write_bytes

    fig, axes = plt.subplots(2, len(samples), figsize=(3.6 * len(samples), 4.8), squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    for j, (name, (ps, ys)) in enumerate(samples.items()):
        top, bottom = axes[0, j], axes[1, j]
        top.plot([0, 1], [0, 1], color="0.7", lw=1, label="perfect")
        for label, q, color in (("raw", ps, "tab:red"), (f"T = {temperature:.2f}", apply_temperature(ps, temperature),
                                                          "tab:blue")):
            r = reliability(q, ys)
            key = "before" if label == "raw" else "after"
            top.plot(r["mean_probability"], r["frequency"], "o-", ms=3, color=color,
                     label=f"{label}: ECE {ece[name][key]:.3f}")
            centres = (r["edges"][:-1] + r["edges"][1:]) / 2
            bottom.step(centres, np.maximum(r["count"], 1), where="mid", color=color)
        top.set_title(name, fontsize=9)
        top.set_ylabel("observed foreground frequency" if j == 0 else "")
        top.legend(fontsize=7, loc="upper left")
        bottom.set_yscale("log")
        bottom.set_xlabel("predicted foreground probability")
        bottom.set_ylabel("pixels" if j == 0 else "")
    fig.suptitle("Reliability on the val splits\n(the same number of pixels from each set)", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())


def object_table(rows: list[dict], temperature: float, names: tuple[str, ...] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(features (N, F) named `names` (default `confidence.FEATURES`), is_true (N,)) of every
    predicted object of the given slices."""
    from .calibration import apply_temperature
    from .confidence import FEATURES, feature_matrix, object_features
    from .postprocess import matched_objects

    xs, ys = [], []
    for r in rows:
        f = object_features(r["instances"], apply_temperature(r["probability"], temperature), r["gradcam"],
                            spread=r.get("spread"), alternatives=r.get("alternatives"), image=r.get("image"))
        xs.append(feature_matrix(f, names or FEATURES))
        ys.append(matched_objects(r["instances"], r["truth"]))
    return np.concatenate(xs), np.concatenate(ys)


def fit_ood(predictor, data: list[str], pixel_sizes: list[float | None], val_slices: dict[str, list[dict]],
            quantile: float = 0.99, verbose: bool = True, tile: int | None = None,
            layers: tuple[str, ...] | None = None, stats: str | None = None):
    """FeatureDistribution of the training slices' tile features (`ood.image_features` of `layers` /
    `stats`, default `ood.OOD_LAYERS` / `ood.OOD_STATS`); threshold from the val slices' scores."""
    from .io import find_pairs, read_image, read_pixel_size_nm
    from .ood import OOD_LAYERS, OOD_STATS, TILE, FeatureDistribution, available_layers, image_features

    ic = predictor.config.inference
    tile, layers, stats = tile or TILE, available_layers(predictor.model, tuple(layers or OOD_LAYERS)), stats or OOD_STATS
    feats = []
    for d, px_given in zip(data, pixel_sizes):
        for pair in find_pairs(d, "train"):
            px = read_pixel_size_nm(pair.image) or px_given
            feats.append(image_features(predictor, read_image(pair.image, pair.page), px, ic.rescale, tile=tile,
                                        layers=layers, stats=stats))
        if verbose:
            print(f"{Path(d).name}: training features done", flush=True)
    dist = FeatureDistribution.fit(np.concatenate(feats), tile=tile, layers=layers, stats=stats)
    scores = [dist.image_score(predictor, r["image"], r["pixel_size_nm"], ic.rescale)
              for rows in val_slices.values() for r in rows]
    return dist.calibrate(scores, quantile), scores


def check_ood_data(predictor, data: list[str], pixel_sizes: list[float | None], tile: int | None = None) -> int:
    """The number of training tiles the OOD model will be fitted on (`fit_ood`), from the image headers;
    DataError when a set has no readable train split or all sets give fewer than `ood.MIN_TILES`."""
    from .io import DataError, find_pairs, image_shape, read_pixel_size_nm
    from .ood import MIN_TILES, TILE, tile_origins

    tile, n = tile or TILE, 0
    for d, px_given in zip(data, pixel_sizes):
        for pair in find_pairs(d, "train"):
            factor = predictor.scale_factor(read_pixel_size_nm(pair.image) or px_given,
                                            predictor.config.inference.rescale)
            n += len(tile_origins(tuple(max(1, round(s * factor)) for s in image_shape(pair.image, pair.page)), tile))
    if n < MIN_TILES:
        raise DataError(f"{', '.join(map(str, data))}: the train split(s) give {n} tile(s) of {tile} px to fit the "
                        f"out-of-distribution model on; at least {MIN_TILES} are needed (add training slices)")
    return n


def calibrate(model, data: list[str], pixel_sizes: list[float | None] | None = None, split: str = "val",
              verbose: bool = True, ood_tile: int | None = None, figure: str | Path | None = None,
              ignore_value: int | None = None) -> dict:
    """Fit temperature, object confidence and the OOD model; store them beside the model; return the report.

    pixel_sizes: per set where its files do not say (default: its dataset.json's). figure: a PNG
    path for the reliability diagrams of each set before and after the temperature. ignore_value:
    label value of unlabelled pixels (default: each set's dataset.json "ignore_value"), left out
    of the fit with every object touching them.
    """
    from .io import set_pixel_sizes
    from .predict import load_model, resolve_model_path

    if split == "test":
        raise cli.UsageError("--split test: calibration is fitted on validation data, never on test data")
    t0 = time.time()
    pixel_sizes = set_pixel_sizes(data, pixel_sizes)
    predictor = load_model(model) if isinstance(model, (str, Path)) else model
    model_path, cfg_path = resolve_model_path(predictor.path)
    if cfg_path is None:
        raise FileNotFoundError(f"{model_path}: no config.json beside the model to store the calibration in")
    from .confidence import AGREEMENT_FEATURES, POOL

    check_ood_data(predictor, data, pixel_sizes, ood_tile)  # seconds, before minutes of val predictions
    slices = collect_val(predictor, data, pixel_sizes, split, verbose,
                         agreement=tuple(f for f in AGREEMENT_FEATURES if f in POOL), ignore_value=ignore_value)
    return fit_calibration(predictor, slices, data, pixel_sizes, split, verbose, ood_tile, t0, figure)


def fit_calibration(predictor, slices: dict[str, list[dict]], data: list[str], pixel_sizes: list[float | None],
                    split: str = "val", verbose: bool = True, ood_tile: int | None = None,
                    t0: float | None = None, figure: str | Path | None = None, ood: bool = True) -> dict:
    """`calibrate` on slices already collected (`collect_val`); stores into the model's config.json.

    ood: also fit the out-of-distribution model (a pass over every training slice); without it,
    a previous `ood.npz` beside the model is kept and the report names no threshold."""
    from .confidence import COMBINE, POOL, TTA_FEATURES, ObjectConfidence, auroc, select_features
    from .ood import OOD_FILE
    from .predict import resolve_model_path

    t0 = time.time() if t0 is None else t0
    model_path, cfg_path = resolve_model_path(predictor.path)
    temp = fit_temperature_on(slices, figure=figure)
    rows = [r for rs in slices.values() for r in rs]
    x, y = object_table(rows, temp["temperature"], POOL)
    groups = object_sets(rows)
    conf = conf_no_tta = None
    if min(y.sum(), (~y).sum()) >= MIN_EACH:
        # Only features that hold in every set: a logistic fit on pooled val objects otherwise leans
        # on relations peculiar to these sets, and ranks objects worse on a new microscope.
        names = select_features(x, y, groups, POOL)
        columns = lambda chosen: x[:, [POOL.index(n) for n in chosen]]  # noqa: E731
        conf = ObjectConfidence(names).fit(columns(names), y, combine=COMBINE)
        rest = tuple(n for n in names if n not in TTA_FEATURES)
        if rest and rest != names:  # for analyze runs without test-time augmentation
            conf_no_tta = ObjectConfidence(rest).fit(columns(rest), y, combine=COMBINE)
        x = columns(names)
    old = Config.load(cfg_path).calibration if cfg_path else {}
    kept = conf is None and bool(old.get("object_confidence"))
    if conf is None and verbose:
        # An earlier object confidence (inherited by adapt, or fitted before) is kept rather than dropped:
        # objects would otherwise lose their confidence and needs_review without a word.
        fate = ("the object confidence config.json had is kept (fitted "
                + (f"for {old['inherited_from']}" if old.get("inherited_from") else "earlier") + ")"
                if kept else "so objects get none")
        print(f"warning: only {int(y.sum())} true and {int((~y).sum())} false detections on {split}; at least "
              f"{MIN_EACH} of each are needed to fit object confidence, {fate}", file=sys.stderr)
    dist = None
    if ood:
        dist, _ = fit_ood(predictor, data, pixel_sizes, slices, verbose=verbose, tile=ood_tile)
        dist.save(model_path.parent / OOD_FILE)
    report = {**temp, "object_confidence": conf.to_dict() if conf else None,
              "object_confidence_without_tta": conf_no_tta.to_dict() if conf_no_tta else None,
              "features": list(conf.features) if conf else [], "combine": COMBINE,
              "objects": int(len(y)), "true_objects": int(y.sum()),
              "object_auroc_in_sample": round(auroc(conf.predict(x), y), 4) if conf else None,
              "ood_file": OOD_FILE if dist else None, "ood_threshold": round(dist.threshold, 4) if dist else None,
              "fitted_on": {"split": split, "sets": [str(Path(d).resolve()) for d in data]},
              "seconds": round(time.time() - t0, 1)}
    if kept:
        report.update({k: old.get(k) for k in ("object_confidence", "object_confidence_without_tta", "features",
                                               "combine", "inherited_from") if k in old},
                      object_confidence_kept=True)
    cfg = Config.load(cfg_path)
    dataclasses.replace(cfg, calibration=report).save(cfg_path)
    return report


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    from .train import parse_pixel_sizes

    p = cli.parser("python -m xmdl_tf.calibrate", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder or .keras file (config.json beside it; a built-in model: copy it first)")
    p.add_argument("--data", nargs="+", required=True, help="the model's data set folder(s), split layout")
    p.add_argument("--pixel-size", nargs="+", default=None, metavar="NM",
                   help="nm per pixel of each set whose files do not say ('unknown' allowed)")
    p.add_argument("--split", default="val", help="split to fit on (never a test split)")
    p.add_argument("--ood-tile", type=cli.positive_int, default=256,
                   help="tile size (model px) of the out-of-distribution features")
    p.add_argument("--figure", default=None, metavar="PNG",
                   help="also draw each set's reliability diagram, before and after the temperature, here "
                        "(a new file)")
    p.add_argument("--ignore-value", type=cli.nonnegative_int, default=None,
                   help="label value of unlabelled pixels, left out of the fit (default: the set's "
                        "dataset.json 'ignore_value', else none)")
    args = p.parse_args(argv)
    try:
        sizes = parse_pixel_sizes(args.pixel_size, len(args.data))
    except ValueError as err:
        p.error(str(err))
    if args.figure and not args.figure.lower().endswith(".png"):
        p.error(f"--figure {args.figure}: give a .png path")
    if args.figure and not Path(args.figure).resolve().parent.is_dir():
        p.error(f"--figure {args.figure}: its folder does not exist")
    if args.figure and (Path(args.figure).exists() or Path(args.figure).is_symlink()):
        p.error(f"--figure {args.figure}: exists; give a new file (nothing is overwritten)")
    cli.check_set_names(args.data)
    cli.refuse_test_split(args.data, args.split, "calibration and the OOD threshold")
    from .io import check_fit_data

    check_fit_data(args.data, args.split, "calibration and the OOD threshold")
    from .pretrained import refuse_builtin

    refuse_builtin(args.model, "calibrate")
    r = calibrate(args.model, args.data, sizes, args.split, ood_tile=args.ood_tile, figure=args.figure,
                  ignore_value=args.ignore_value)
    print(f"temperature {r['temperature']}; ECE before -> after: " +
          ", ".join(f"{k} {v['before']} -> {v['after']}" for k, v in r["ece"].items()))
    if r.get("object_confidence") and not r.get("object_confidence_kept"):
        print(f"object confidence fitted on {r['objects']} objects ({r['true_objects']} true), in-sample AUROC "
              f"{r['object_auroc_in_sample']}; OOD threshold {r['ood_threshold']}")
    else:  # (the warning above said why)
        print(f"no object confidence fitted ({r['objects']} objects, {r['true_objects']} true"
              + ("; the earlier one is kept" if r.get("object_confidence_kept") else "")
              + f"); OOD threshold {r['ood_threshold']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
