"""Adapt a model to a new microscope without annotation: self-training on the pixels it is sure of.

    python -m xmdl_tf.adapt my_stack.tif --out runs/my_adapted [--model xmdl_ref] [--pixel-size 6]
    python -m xmdl_tf.analyze my_stack.tif --model runs/my_adapted/model --out results/

The model predicts (with test-time augmentation) up to `--slices` evenly spaced
slices of the inputs; the pixels it is sure of become pseudo-labels
(mitochondrion where p >= `--high`, background where p <= `--low`; the band
between, and sure specks under `--min-area` pixels, are ignored by the loss).
The model is then fine-tuned on them (`xmdl_tf.finetune`'s trainer: "em"
augmentation at strength 1, learning rate 1e-4, validation on held-back rows of
the same slices). `--rounds N` repeats: the newest model pseudo-labels again
and the *original* is fine-tuned on those labels, so each round differs only in
its teacher (3 by default). `--max-drift 0.2` stops before a round whose
pseudo-labels' share of mitochondrion moved from the round before's by more than
a factor 1.2 either way, keeping the last round's model (off by default: on one
draw of models it spared the one set that declined, on another it cut short
three that still gained). `--zoom-search ood` has the teacher predict each slice
its OOD score warns about at the zoom `analyze` would search (the model is surer
there); the labels stay on the slice's own grid, where the student learns them
(off by default: over three draws of models, one round, it lifted SBEM and cost
Drosophila ssTEM every time; model card "The teacher at the searched zoom").
Measured on the leave-one-set-out models
(`benchmarks/self_training.py`, model card "Adapting without labels"): zero-shot
val F1, mean of the three microscopes, 0.599 -> 0.668 after three rounds on one
draw of models and 0.590 -> 0.698 on another (on the first, SBEM drifts towards
over-segmentation after one round). With a slice or two annotated,
`xmdl_tf.finetune` gains far more.

Layout of OUT: `round<r>/pseudo/<name>/train/{x,y}` (the slices and their
pseudo-labels, lossless: 1 mitochondrion, 0 background, 255 ignored; open them
to see what the model was taught), `round<r>/model` (each round's run folder),
`model/` (the adapted model: the last round's, with its config.json, which keeps
the parent's temperature and object confidence, `INHERITED_CALIBRATION`, but
not its OOD model) and `adapt.json` (what each round did). Interrupted runs
resume with the same command.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import cli

log = logging.getLogger(__name__)

IGNORE = 255  # label value of the pixels the loss leaves out


def pseudo_label(prob: np.ndarray, low: float, high: float, min_area: int) -> np.ndarray:
    """Mitochondrion probability float (H, W) -> uint8 (H, W) pseudo-label: 1 where p >= high,
    0 where p <= low, IGNORE elsewhere and on sure objects smaller than `min_area` pixels
    (specks: mostly noise, and too small to teach a shape). Given several predictions of the
    slice, float (H, W, K) (the test-time-augmented members), a pixel is sure only when all
    K agree: every one >= high, or every one <= low."""
    import cv2

    if not 0 <= low < high <= 1:
        raise ValueError(f"pseudo-labels need 0 <= low < high <= 1, got low={low}, high={high}")
    if prob.ndim == 3:
        lowest, highest = prob.min(-1), prob.max(-1)
    else:
        lowest = highest = prob
    sure = (lowest >= high).astype(np.uint8)
    n, comp, stats, _ = cv2.connectedComponentsWithStats(sure, connectivity=8)
    small = np.zeros(n, bool)
    small[1:] = stats[1:, cv2.CC_STAT_AREA] < min_area
    out = np.full(lowest.shape, IGNORE, np.uint8)
    out[highest <= low] = 0
    out[sure.astype(bool)] = 1
    out[small[comp]] = IGNORE
    return out


def drift_round(mito_shares: list[float], max_drift: float | None) -> int | None:
    """The first round (1-based) whose pseudo-labelled mitochondrion share differs from the round
    before by more than a factor 1 + max_drift either way, or None (also when max_drift is None
    or 0). Self-training that relabels ever more (or less) of the image as mitochondrion is
    teaching itself its own errors, or learning what it missed: measured, the rule does not tell
    the two apart (model card, "Adapting without labels")."""
    if not max_drift:
        return None
    for r in range(1, len(mito_shares)):
        before, now = mito_shares[r - 1], mito_shares[r]
        if before == now == 0:
            continue
        if min(before, now) == 0 or abs(np.log(now / before)) > np.log1p(max_drift):
            return r + 1
    return None


# What an adapted model keeps of its parent's calibration: the temperature and the object
# confidence, which rank the adapted model's objects on a microscope neither model was labelled
# on as well as a confidence refitted on labelled val data does (model card, "Trust after
# adapting"); not the OOD model, whose statistics describe the parent's features and training data.
INHERITED_CALIBRATION = ("temperature", "object_confidence", "object_confidence_without_tta", "features", "combine")


def inherited_calibration(calibration: dict | None, parent: str) -> dict:
    """The part of a parent model's `calibration` (config.json) its adapted model keeps, marked
    `inherited_from: parent`; {} when the parent has no object confidence to pass on."""
    if not calibration or not calibration.get("object_confidence"):
        return {}
    kept = {k: calibration[k] for k in INHERITED_CALIBRATION if k in calibration}
    return {**kept, "inherited_from": parent, "ood_file": None, "ood_threshold": None}


def evenly_spaced(n_items: int, n: int) -> np.ndarray:
    """Indices of min(n, n_items) items spread evenly over 0 .. n_items - 1 (ends included)."""
    return np.unique(np.linspace(0, n_items - 1, min(n, n_items)).round().astype(int))


def write_pseudo_set(predictor, pairs: list, out: Path, pixel_size_nm: float | None = None,
                     low: float = 0.1, high: float = 0.9, min_area: int = 100, consensus: bool = False,
                     zoom_search: str = "off") -> dict:
    """Pseudo-label `pairs` (SlicePairs; any label files are not read) with `predictor` (TTA)
    into the split layout `out/train/{x,y}`, written whole or not at all (a `.part` folder
    renamed at the end); `consensus`: from the 8 TTA members, sure only where all agree
    (`pseudo_label`), not from their mean. zoom_search: each slice is predicted on the grid
    `analyze --zoom-search MODE` would choose (`autoscale.prediction_grid`; "ood" needs the
    teacher's OOD model), the labels always on the slice's own grid; the zooms go to
    `out/zooms.json`. Returns `label_shares(out)`."""
    import tifffile

    from .autoscale import prediction_grid
    from .io import read_image
    from .runlock import atomic_write_text

    ic = replace(predictor.config.inference, zoom_search=zoom_search)
    zooms = {}

    tmp = out.with_name(out.name + ".part")
    if tmp.exists():
        shutil.rmtree(tmp)  # an interrupted earlier attempt: its slices are redone
    for sub in ("x", "y"):
        (tmp / "train" / sub).mkdir(parents=True)
    for pair in pairs:
        image = read_image(pair.image, pair.page)
        grid_px, zoom = prediction_grid(predictor, image, ic, pixel_size_nm)
        zooms[pair.name] = zoom.zoom if zoom is not None else 1.0
        pred = predictor.predict_slice(image, tta=True, pixel_size_nm=grid_px, members=consensus)
        lab = pseudo_label(pred[1] if consensus else pred, low, high, min_area)
        tifffile.imwrite(tmp / "train" / "x" / f"{pair.name}.tif", image)
        tifffile.imwrite(tmp / "train" / "y" / f"{pair.name}.tif", lab, compression="zlib")
        log.info("pseudo-labelled %s (zoom x%.3g): %.1f%% mitochondrion, %.1f%% ignored", pair.name, zooms[pair.name],
                 100 * np.mean(lab == 1), 100 * np.mean(lab == IGNORE))
    atomic_write_text(tmp / "zooms.json", json.dumps(zooms, indent=2) + "\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return label_shares(out)


def label_shares(pseudo: Path) -> dict:
    """Mean shares (over slices) of mitochondrion, background and ignored pixels in the pseudo-labels
    of a `write_pseudo_set` folder, read back from its files."""
    import tifffile

    shares = [[np.mean(lab == 1), np.mean(lab == 0), np.mean(lab == IGNORE)]
              for lab in map(tifffile.imread, sorted((pseudo / "train" / "y").glob("*.tif")))]
    s = np.mean(shares, axis=0)
    out = {"slices": len(shares), "mitochondrion": float(s[0]), "background": float(s[1]), "ignored": float(s[2])}
    if (pseudo / "zooms.json").is_file():  # the zoom each slice was predicted at (`write_pseudo_set`)
        out["zooms"] = json.loads((pseudo / "zooms.json").read_text())
    return out


def _forget_first_round(out: Path, folder: Path, record: Path) -> None:
    """Nothing was trained yet: remove round 1's pseudo-labels and the record, so that the rerun with
    the relaxed settings an error advises is not refused as "an interrupted adaptation"."""
    shutil.rmtree(folder)
    record.unlink()
    if not any(out.iterdir()):
        out.rmdir()


def adapt(model, inputs: list[str], out: str | Path, pixel_size_nm: float | None = None, slices: int = 8,
          low: float = 0.1, high: float = 0.9, min_area: int = 100, rounds: int = 3, epochs: int = 5,
          steps_per_epoch: int = 60, seed: int = 0, tile_size: int = 256, consensus: bool = False,
          max_drift: float | None = None, verbose: int = 2, zoom_search: str = "off") -> Path:
    """Self-train `model` (a run folder, .keras file or built-in name) on unlabelled `inputs`
    (files, folders, globs, stacks, as `analyze` takes them); returns the adapted model's folder
    (`out/model`). pixel_size_nm: the inputs' pixel size when their files do not say (then
    slices are resampled to the model's, as everywhere). consensus: pseudo-label only the
    pixels all 8 TTA members are sure of (`write_pseudo_set`). max_drift: stop before a round
    whose pseudo-labels' mitochondrion share moved by more than a factor 1 + max_drift either
    way from the last round's (`drift_round`), keeping the last round's model (None or 0:
    every round). zoom_search: the teacher predicts each slice on the grid `analyze --zoom-search
    MODE` would choose ("off", "always", or "ood": where the teacher's OOD score warns; the
    adapted rounds have no OOD model, so only the parent searches), the student is trained on
    the slices' own grid. Everything is checked before anything is written; a finished `out` is
    returned as it is when made with the same settings and refused otherwise; an interrupted
    one is resumed."""
    from .analyze import _pixel_size, expand_inputs
    from .config import ZOOM_SEARCH, Config
    from .io import DataError, read_image, read_pixel_size_nm
    from .predict import load_model, resolve_model_path
    from .runlock import atomic_write_text
    from .train import build_parser, config_from_args, run_finished, train

    out = Path(out)
    if not 0 <= low < high <= 1:
        raise ValueError(f"--low {low:g} and --high {high:g}: need 0 <= low < high <= 1")
    if min(slices, rounds, epochs, steps_per_epoch) < 1 or min_area < 0:
        raise ValueError("slices, rounds, epochs and steps per epoch must be >= 1, min area >= 0")
    if zoom_search not in ZOOM_SEARCH:
        raise ValueError(f"zoom search {zoom_search!r}: one of {', '.join(ZOOM_SEARCH)}")
    model_file, parent_cfg = resolve_model_path(model)
    if zoom_search != "off":  # else the teacher would silently not search
        from .ood import OOD_FILE

        if parent_cfg is None or not Config.load(parent_cfg).data.pixel_size_nm:
            raise ValueError(f"--zoom-search {zoom_search}: {model_file} states no pixel size of its own "
                             "(config.json), so there is no grid to search around")
        if zoom_search == "ood" and not (model_file.parent / OOD_FILE).is_file():
            raise ValueError(f"--zoom-search ood: {model_file.parent / OOD_FILE} is missing, so nothing would be "
                             "warned about (python -m xmdl_tf.calibrate fits it), or use --zoom-search always")
    pairs, failed = expand_inputs(inputs)
    if failed:
        raise DataError(failed[0][1])  # names the input already
    if not pairs:
        raise DataError(f"no images found in {' '.join(inputs)}")
    pairs = [pairs[i] for i in evenly_spaced(len(pairs), slices)]
    sizes = set()
    for p in pairs:
        # The whole image, not its header: a constant, NaN or truncated slice fails now, before
        # `out` exists (its leftovers would block the next run), not in the first pseudo-labelling.
        read_image(p.image, p.page)
        sizes.add(_pixel_size(p, read_pixel_size_nm(p.image), pixel_size_nm, verbose=False))  # as analyze reads it
    if len(sizes) > 1:
        raise DataError(f"the inputs state different pixel sizes ({', '.join(f'{s:g} nm' if s else 'unknown' for s in sizes)}); "
                        "adapt to one microscope's images at a time")
    pixel_size_nm = sizes.pop()  # the pseudo-labelled copies carry no metadata: it is passed on
    record = out / "adapt.json"
    if out.exists() and any(out.iterdir()) and not record.is_file():
        raise FileExistsError(f"{out}: folder exists and is not an adaptation; choose another --out")
    recipe = {"model": str(model_file.resolve()), "inputs": [str(Path(i).resolve()) for i in inputs],
              "slices": [p.name for p in pairs], "pixel_size_nm": pixel_size_nm, "low": low, "high": high,
              "min_area_px": min_area, "rounds": rounds, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
              "tile_size": tile_size, "seed": seed, "consensus": consensus, "max_drift": max_drift or 0,
              "zoom_search": zoom_search}
    # Records written before --consensus, --max-drift and --zoom-search existed ran without them.
    state = json.loads(record.read_text()) if record.is_file() else {"recipe": recipe, "rounds": []}
    state["recipe"] = {"consensus": False, "max_drift": 0, "zoom_search": "off", **state["recipe"]}
    finished = (out / "model" / "model.keras").is_file()
    if state["recipe"] != recipe:
        raise FileExistsError(f"{out}: {'holds an adapted model' if finished else 'an interrupted adaptation'} "
                              f"made with other settings ({', '.join(cli.differing(state['recipe'], recipe))}); "
                              "choose another --out")
    if finished:
        log.info("%s: already adapted with these settings (%s)", out, state.get("stopped") or f"{rounds} rounds")
        return out / "model"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, json.dumps(state, indent=2) + "\n")

    args = build_parser(finetune=True).parse_args(
        ["--model", str(model_file), "--data", "-", "--out", "-", "--augment", "em", "--augment-strength", "1",
         "--epochs", str(epochs), "--steps-per-epoch", str(steps_per_epoch), "--ignore-value", str(IGNORE),
         "--seed", str(seed), "--tile-size", str(tile_size)])
    config = config_from_args(args)
    teacher = model_file
    name = out.resolve().name
    for rnd in range(1, rounds + 1):
        folder = out / f"round{rnd}"
        pseudo = folder / "pseudo" / name
        if not pseudo.is_dir():
            write_pseudo_set(load_model(teacher), pairs, pseudo, pixel_size_nm, low, high, min_area, consensus,
                             zoom_search)
        recorded = {r["round"]: r for r in state["rounds"]}
        if rnd not in recorded:  # (also when a kill fell between writing the labels and recording them)
            state["rounds"] = [*state["rounds"], {"round": rnd, **label_shares(pseudo)}]
            atomic_write_text(record, json.dumps(state, indent=2) + "\n")
        done = [r["mitochondrion"] for r in sorted(state["rounds"], key=lambda r: r["round"]) if r["round"] <= rnd]
        if drift_round(done, max_drift) == rnd:
            before, now = done[rnd - 2], done[rnd - 1]
            state["stopped"] = (f"round {rnd}'s pseudo-labels mark {100 * now:.1f}% of the pixels as mitochondrion, "
                                f"round {rnd - 1}'s {100 * before:.1f}%: the model drifts; kept round {rnd - 1}'s model")
            atomic_write_text(record, json.dumps(state, indent=2) + "\n")
            log.warning("stopped early: %s (--max-drift %g)", state["stopped"], max_drift)
            break
        shares = {r["round"]: r for r in state["rounds"]}[rnd]
        if shares["mitochondrion"] == 0 or shares["background"] == 0:
            # Said in the user's terms: train would speak of labels and --ignore-value, which adapt has not.
            sure = "no mitochondrion" if shares["mitochondrion"] == 0 else "no background"
            if rnd == 1:
                _forget_first_round(out, folder, record)
            raise DataError(f"round {rnd}: the model is sure of {sure} on these slices (probability >= --high "
                            f"{high:g} over at least --min-area {min_area} px, or <= --low {low:g}), so there is "
                            "nothing to learn from; relax --high / --low / --min-area, or annotate a slice and use "
                            "python -m xmdl_tf.finetune")
        run = folder / "model"
        if not run_finished(run):
            # Every round fine-tunes the original model: rounds differ only in who made the labels.
            try:
                train([str(pseudo)], run, config, init_from=str(model_file), augment_strength=1.0,
                      pixel_sizes=[pixel_size_nm], verbose=verbose)
            except DataError as err:  # refused before training (e.g. no mitochondrion in its validation rows)
                if rnd == 1 and not run.exists():
                    _forget_first_round(out, folder, record)
                raise DataError(f"round {rnd}, the pseudo-labels: {err}; relax --high / --low / --min-area, or "
                                "annotate a slice and use python -m xmdl_tf.finetune") from None
        teacher = run
    final, tmp = out / "model", out / "model.part"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    shutil.copy2(teacher / "model.keras", tmp / "model.keras")
    parent_cal = Config.load(parent_cfg).calibration if parent_cfg is not None else {}
    cfg = Config.load(teacher / "config.json")
    replace(cfg, calibration=inherited_calibration(parent_cal, str(model_file.resolve()))).save(tmp / "config.json")
    tmp.rename(final)
    return final


def build_parser() -> argparse.ArgumentParser:
    from .config import ZOOM_SEARCH

    p = cli.parser("python -m xmdl_tf.adapt", __doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="unlabelled image files, folders, globs or TIFF stacks")
    p.add_argument("--out", required=True, help="output folder (the adapted model is OUT/model)")
    p.add_argument("--model", default=None, help="model to adapt (run folder, .keras file or built-in name; "
                   "default: $XMDL_MODEL, else the shipped reference model)")
    p.add_argument("--pixel-size", type=cli.pixel_size, default=None, help="nm per pixel when the files do not say")
    p.add_argument("--slices", type=cli.positive_int, default=8, help="slices to pseudo-label, evenly spaced")
    p.add_argument("--low", type=cli.fraction, default=0.1, help="background where the probability is at most this")
    p.add_argument("--high", type=cli.fraction, default=0.9, help="mitochondrion where it is at least this")
    p.add_argument("--min-area", type=cli.nonnegative_int, default=100,
                   help="sure objects smaller than this (pixels) are ignored, not taught")
    p.add_argument("--rounds", type=cli.positive_int, default=3,
                   help="self-training rounds, each pseudo-labelling with the last round's model (chosen on the "
                        "leave-one-set-out val splits, model card)")
    p.add_argument("--epochs", type=cli.positive_int, default=5, help="fine-tuning epochs per round")
    p.add_argument("--steps-per-epoch", type=cli.positive_int, default=60, help="batches of 8 tiles per epoch")
    p.add_argument("--max-drift", type=cli.nonnegative_float, default=0.0,
                   help="stop when a round's pseudo-labelled share of mitochondrion moved from the round before's "
                        "by more than a factor 1 + this either way, keeping the last model (e.g. 0.2; default: "
                        "every round, since the rule cost as much as it saved: model card)")
    p.add_argument("--consensus", action="store_true",
                   help="pseudo-label only pixels that all 8 test-time-augmented predictions are sure of")
    p.add_argument("--zoom-search", default="off", choices=ZOOM_SEARCH,
                   help="the teacher predicts each slice at the zoom analyze's --zoom-search would choose "
                        "('ood': only slices the model's out-of-distribution score warns about; the student "
                        "is trained on the slices' own grid) (off)")
    p.add_argument("--tile-size", type=cli.positive_int, default=256, help="training tile height and width, px")
    p.add_argument("--seed", type=int, default=0)
    return p


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.low >= args.high:
        parser.error(f"--low {args.low:g} must be below --high {args.high:g}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .pretrained import model_or_default

    final = adapt(model_or_default(args.model), args.inputs, args.out, args.pixel_size, args.slices, args.low, args.high,
                  args.min_area, args.rounds, args.epochs, args.steps_per_epoch, args.seed, args.tile_size,
                  args.consensus, args.max_drift, zoom_search=args.zoom_search)
    print(f"adapted model: {final}  (python -m xmdl_tf.analyze ... --model {final})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
