"""Choose a model's inference defaults on validation data: `python -m xmdl_tf.tune`.

    python -m xmdl_tf.tune --model runs/ref --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5 --write

Every validation slice is predicted once without and once with test-time
augmentation; then every combination of TTA, threshold and minimum object
size is post-processed and scored by `postprocess.score_slice` (the path
`analyze` and `evaluate` take). The winner is the highest mean over the data
sets of the pooled foreground F1 (each set counts equally; instance F1 breaks
ties). It also measures the median width of the objects the model finds in
each set (one pass, at the winner's threshold, in model pixels): their range is
what `analyze` and `evaluate` zoom slices of unknown pixel size towards
(`InferenceConfig.object_width_px`, `xmdl_tf.autoscale`). `--write` stores it
all as the model's `inference` settings in its config.json, with the winning row of
the table it was chosen from (`--json FILE` writes the whole table), so `analyze` and `evaluate`
use it by default. Only
validation splits are read: test splits never choose.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import cli
from .config import Config, InferenceConfig

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # 0.8: the shipped model chose 0.7, so its optimum is inside
MIN_AREAS_NM2 = (0.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0)


def candidates(base: InferenceConfig, thresholds=THRESHOLDS, min_areas=MIN_AREAS_NM2, tta=(False, True),
               model_pixel_size_nm: float | None = None) -> list[InferenceConfig]:
    """The settings compared: every (TTA, threshold, minimum area) on top of `base`.

    Slices of unknown pixel size get the same minimum expressed in model pixels.
    """
    px2 = (model_pixel_size_nm or 5.0) ** 2
    return [dataclasses.replace(base, tta=t, threshold=th, min_area_nm2=a, min_size_px=int(round(a / px2)))
            for t in tta for th in thresholds for a in min_areas]


def score_grid(predictions: dict[str, list[tuple[dict, np.ndarray, float | None]]],
               grid: list[InferenceConfig], ignore: dict[str, int | None] | None = None) -> list[dict]:
    """Pooled scores of every setting in `grid`.

    predictions: {set name: [({False: prob, True: prob_tta}, label, pixel size nm), ...]}.
    ignore: {set name: its label value of unlabelled pixels, left out of every count}.
    Returns one row per setting: its fields, per-set pooled F1 and instance F1, and their means.
    """
    from .metrics import add_counts, scores
    from .postprocess import pooled_instance_scores, score_slice

    rows = []
    for ic in grid:
        row = {"tta": ic.tta, "threshold": ic.threshold, "min_area_nm2": ic.min_area_nm2,
               "min_size_px": ic.min_size_px}
        f1s, inst = [], []
        for name, slices in predictions.items():
            total, per = {}, []
            for probs, label, px in slices:
                sc = score_slice(probs[ic.tta], label, ic, px, (ignore or {}).get(name))
                total = add_counts(total, sc)
                per.append(sc)
            f1 = scores(total)["f1"]
            fi = pooled_instance_scores(per)["instance_f1_iou50"]
            row[f"{name}_f1"], row[f"{name}_instance_f1"] = round(f1, 4), round(fi, 4)
            f1s.append(f1)
            inst.append(fi)
        row["mean_f1"], row["mean_instance_f1"] = round(float(np.mean(f1s)), 4), round(float(np.mean(inst)), 4)
        rows.append(row)
    return rows


def best(rows: list[dict]) -> dict:
    """The row with the highest mean F1, then mean instance F1; then the cheaper (no TTA), then the default-like."""
    return max(rows, key=lambda r: (r["mean_f1"], r["mean_instance_f1"], not r["tta"],
                                    -abs(r["threshold"] - 0.5)))


def tune(model, data: list[str], split: str = "val", pixel_sizes: list[float | None] | None = None,
         thresholds=THRESHOLDS, min_areas=MIN_AREAS_NM2, tta: bool | None = None, verbose: bool = True,
         ignore_value: int | None = None) -> dict:
    """Predict every `split` slice of every set (with and without TTA), score the grid, return
    {"best": InferenceConfig fields, "rows": [...], "sets": [...], "seconds": ...}.

    tta: None compares both; True / False fixes it. pixel_sizes: per set where its files do not
    say (default: its dataset.json's, as `evaluate` and `train` read it). ignore_value: label value
    of unlabelled pixels, left out of the scores (default: each set's dataset.json "ignore_value").
    """
    from .autoscale import predicted_width, width_range
    from .io import find_pairs, read_pair, read_pixel_size_nm, set_ignore_values, set_pixel_sizes
    from .predict import load_model

    pixel_sizes = set_pixel_sizes(data, pixel_sizes)
    ignore = dict(zip((Path(d).resolve().name for d in data), set_ignore_values(data, split, ignore_value)))
    predictor = load_model(model) if isinstance(model, (str, Path)) else model
    base = predictor.config.inference
    t0 = time.time()
    modes = (False, True) if tta is None else (tta,)
    predictions = {}
    for d, px_given in zip(data, pixel_sizes):
        name = Path(d).resolve().name
        pairs = find_pairs(d, split)
        slices = []
        for i, pair in enumerate(pairs):
            image, label = read_pair(pair)
            px = read_pixel_size_nm(pair.image) or px_given
            probs = {m: predictor.predict_slice(image, base.tile, base.overlap, base.batch_size, tta=m,
                                                pixel_size_nm=px, rescale=base.rescale) for m in modes}
            slices.append((probs, label, px))
            if verbose:
                print(f"{name} [{split}] {i + 1}/{len(pairs)} predicted", flush=True)
        predictions[name] = slices
    grid = candidates(base, thresholds, min_areas, modes, predictor.pixel_size_nm)
    rows = score_grid(predictions, grid, ignore)
    chosen = best(rows)
    ic = next(c for c in grid if (c.tta, c.threshold, c.min_area_nm2) ==
              (chosen["tta"], chosen["threshold"], chosen["min_area_nm2"]))
    # The widths auto zoom aims at, from the one-pass predictions it makes itself (autoscale).
    widths = {name: predicted_width([(probs[modes[0]], predictor.scale_factor(px, base.rescale))
                                     for probs, _, px in slices], ic.threshold, ic.min_size_px)
              for name, slices in predictions.items()}
    ic = dataclasses.replace(ic, object_width_px=width_range(widths))
    return {"best": dataclasses.asdict(ic), "chosen_row": chosen, "rows": rows, "split": split,
            "object_widths_px": {k: round(v, 2) for k, v in widths.items()},
            "sets": [str(Path(d).resolve()) for d in data], "seconds": round(time.time() - t0, 1)}


def write_inference(model_dir: str | Path, result: dict) -> Path:
    """Store `result["best"]` as the model's inference settings (config.json, atomically), with provenance."""
    from .predict import resolve_model_path

    _, cfg_path = resolve_model_path(model_dir)
    if cfg_path is None:
        raise FileNotFoundError(f"{model_dir}: no config.json beside the model to store the settings in")
    cfg = Config.load(cfg_path)
    info = {**cfg.info, "inference_tuning": {k: result[k] for k in ("split", "sets", "chosen_row", "object_widths_px",
                                                                   "seconds") if k in result}}
    dataclasses.replace(cfg, inference=InferenceConfig(**result["best"]), info=info).save(cfg_path)
    return cfg_path


def format_rows(rows: list[dict], top: int = 10) -> str:
    import pandas as pd

    df = pd.DataFrame(sorted(rows, key=lambda r: (-r["mean_f1"], -r["mean_instance_f1"])))
    return df.head(top).to_string(index=False)


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    from .train import parse_pixel_sizes

    p = cli.parser("python -m xmdl_tf.tune", __doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="run folder, .keras file or built-in name (config.json beside it; --write: not a built-in)")
    p.add_argument("--data", nargs="+", required=True, help="data set folder(s) in the split layout")
    p.add_argument("--split", default="val", help="split to choose on (never a test split)")
    p.add_argument("--pixel-size", nargs="+", default=None, metavar="NM",
                   help="nm per pixel of each set whose files do not say ('unknown' allowed)")
    p.add_argument("--thresholds", nargs="+", type=cli.probability, default=list(THRESHOLDS),
                   help="probability thresholds compared")
    p.add_argument("--min-areas", nargs="+", type=cli.nonnegative_float, default=list(MIN_AREAS_NM2),
                   help="smallest object areas compared, nm^2")
    p.add_argument("--tta", choices=("compare", "on", "off"), default="compare",
                   help="compare with and without test-time augmentation, or fix it")
    p.add_argument("--ignore-value", type=cli.nonnegative_int, default=None,
                   help="label value of unlabelled pixels, left out of the scores (default: the set's "
                        "dataset.json 'ignore_value', else none)")
    p.add_argument("--write", action="store_true", help="store the winner in the model's config.json")
    p.add_argument("--json", default=None, help="also write the whole table to this JSON file")
    args = p.parse_args(argv)
    if args.split == "test":
        p.error("--split test: defaults are chosen on validation data, never on test data")
    cli.check_set_names(args.data)
    cli.refuse_test_split(args.data, args.split, "inference defaults")
    for d in args.data:  # tune has no --labels: say what it reads, not what another command would take
        if Path(d).is_dir() and not any((Path(d) / s).is_dir() for s in (args.split, "x", "train", "val", "test")):
            from .io import DataError

            raise DataError(f"{d}: no '{args.split}/x' folder; tune reads data sets in the split layout "
                            f"(<set>/{args.split}/x and <set>/{args.split}/y), e.g. as data_prep writes them")
    from .io import check_fit_data

    check_fit_data(args.data, args.split, "inference defaults")
    if args.write:  # checked now, not after the whole grid is scored
        from .predict import is_saved_model, resolve_model_path
        from .pretrained import refuse_builtin

        refuse_builtin(args.model, "tune --write")
        if is_saved_model(args.model):
            raise cli.UsageError(f"--write: {args.model} is an exported SavedModel; tune its run folder (the export "
                                 "carries the settings it was exported with)")
        if resolve_model_path(args.model)[1] is None:
            raise FileNotFoundError(f"--write: {args.model}: no config.json beside the model to store the settings in")
    if args.json:
        folder = Path(args.json).parent
        if not folder.is_dir():
            raise FileNotFoundError(f"--json {args.json}: its folder {folder} does not exist")
        if Path(args.json).exists():
            raise FileExistsError(f"{args.json}: exists; choose another --json (it is never overwritten)")
    try:
        sizes = parse_pixel_sizes(args.pixel_size, len(args.data))
    except ValueError as err:
        p.error(str(err))
    result = tune(args.model, args.data, args.split, sizes, args.thresholds, args.min_areas,
                  {"compare": None, "on": True, "off": False}[args.tta], ignore_value=args.ignore_value)
    print(format_rows(result["rows"]))
    b = result["best"]
    print(f"best on {args.split}: tta={b['tta']} threshold={b['threshold']} min_area_nm2={b['min_area_nm2']:g} "
          f"(min_size_px {b['min_size_px']}): mean F1 {result['chosen_row']['mean_f1']:.4f}")
    print("median object width, model px: " + ", ".join(f"{k} {v:g}" for k, v in result["object_widths_px"].items())
          + f" -> auto zoom range {b['object_width_px']}")
    if args.json:
        from .runlock import atomic_write_text

        atomic_write_text(Path(args.json), json.dumps(result, indent=2) + "\n")
    if args.write:
        print(f"wrote the inference settings into {write_inference(args.model, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
