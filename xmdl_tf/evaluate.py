"""Score a trained model on whole slices: `python -m xmdl_tf.evaluate`.

    python -m xmdl_tf.evaluate --model xmdl_ref --data ../shared/data/cdeep3m_sbem_mouse \
        --split test --out eval/cdeep3m

Every slice of the split is predicted whole (overlapping tiles, blended),
post-processed with the model's inference settings (config.json "inference";
flags override them) and compared with its label by `postprocess.score_slice`,
the same path `analyze` takes. Writes `metrics.json`
(foreground precision, recall, F1 = Dice, IoU and accuracy pooled over all
pixels of all slices, plus counts) and `per_image.csv`, and prints a table.
"""
from __future__ import annotations

import json
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from . import cli
from .config import InferenceConfig, resolve_inference
from .pretrained import model_or_default

if TYPE_CHECKING:
    from .predict import Predictor


def held_out_split(data: str | Path) -> str:
    """The split to score by default: `test` where the data set has one, else `val`
    (e.g. Lucchi++, whose test volume is kept apart), else `test` (for the error message).
    A split folder with no file in it (a converter's empty test split) counts as absent."""
    p = Path(data)

    def has(split: str) -> bool:
        return (p / split / "x").is_dir() and any(f.is_file() for f in (p / split / "x").iterdir())

    if not has("test") and has("val"):
        return "val"
    return "test"


def evaluate(model: Predictor | str | Path, data: str, split: str = "auto", out: str | Path | None = None,
             inference: InferenceConfig | dict | None = None, labels: str | None = None, overwrite: bool = False,
             pixel_size_nm: float | None = None, ignore_value: int | None = None, **overrides) -> dict:
    """Whole-slice evaluation of `model` (a Predictor, a path or a built-in name) on a split.

    inference: the model's `InferenceConfig` is used, with these fields (a dict,
    or keyword `overrides` such as tile=64, tta=True) replaced, or a whole
    InferenceConfig. Post-processing and scoring are `postprocess.score_slice`,
    as in `analyze`. pixel_size_nm: the data's pixel size (else read from TIFF
    metadata); slices are resampled to the model's pixel size when both are
    known (unless inference.rescale is off). ignore_value: label value left
    out of every count (default: the set's dataset.json "ignore_value", when the
    labels are the set's own). split: "auto" = `held_out_split(data)`.
    Returns the metrics dict written to `out/metrics.json`.
    """
    import pandas as pd

    from .autoscale import for_objects, prediction_grid
    from .io import (check_ignore_value, check_labels, dataset_ignore_value, dataset_pixel_size_nm, find_pairs,
                     read_pair, read_pixel_size_nm)
    from .metrics import add_counts, scores
    from .postprocess import pooled_instance_scores, score_slice
    from .predict import load_model
    from .runlock import atomic_write_text

    if out is not None:
        out = cli.check_out_folder(out)
        existing = [out / n for n in ("metrics.json", "per_image.csv") if (out / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{existing[0]} exists; use --overwrite or another --out")
    if pixel_size_nm is not None:
        cli.check_pixel_size(pixel_size_nm, "--pixel-size")
    if split == "auto":
        split = held_out_split(data)
    pairs = find_pairs(data, split, labels=labels)
    if ignore_value is None and labels is None:  # as napari's corrections declare theirs
        ignore_value = dataset_ignore_value(data)
    if ignore_value is not None:  # before any prediction: 0/255 masks with --ignore-value 255 would score 0
        check_ignore_value(check_labels(pairs, ignore_value), ignore_value)
    predictor = load_model(model) if isinstance(model, (str, Path)) else model
    ic = resolve_inference(predictor, inference, **overrides)
    total: dict[str, int] = {}
    rows = []
    t0 = time.time()
    set_px = dataset_pixel_size_nm(data)
    if pixel_size_nm is None and set_px is None and read_pixel_size_nm(pairs[0].image) is None:
        warn_trained_pixel_size(predictor, data)
    for pair in pairs:
        image, label = read_pair(pair)
        # As analyze: a given --pixel-size wins over the file's metadata, which wins over dataset.json.
        px = pixel_size_nm or read_pixel_size_nm(pair.image) or set_px
        # As analyze: auto zoom when px is unknown; without TTA its last pass may be the prediction.
        grid_px, zoom = prediction_grid(predictor, image, ic, px, keep_probability=not ic.tta)
        if zoom is not None and zoom.probability is not None:
            prob = zoom.probability  # the estimate's last pass is this very prediction
        else:
            prob = predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=ic.tta,
                                           pixel_size_nm=grid_px, rescale=ic.rescale)
        sc = score_slice(prob, label, for_objects(ic, zoom), px, ignore_value)
        c = {k: sc[k] for k in ("tp", "fp", "fn", "tn")}
        total = add_counts(total, c)
        rows.append({"image": pair.name, **scores(c), **sc, "pixels": int(label.size),
                     "auto_zoom": zoom.zoom if zoom is not None else None})
    result = {
        **scores(total),
        **total,
        **pooled_instance_scores(rows),
        "n_images": len(rows),
        "n_pixels": int(sum(r["pixels"] for r in rows)),
        "threshold": ic.threshold,
        "ignore_value": ignore_value,
        "pooling": "all pixels of all slices",
        **_provenance(predictor, data, split, ic, t0, labels),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        # metrics.json last, and an old one gone first: a run stopped between the two files never
        # leaves the new per-image table beside the old run's pooled scores.
        (out / "metrics.json").unlink(missing_ok=True)
        atomic_write_text(out / "per_image.csv", pd.DataFrame(rows).to_csv(index=False))
        atomic_write_text(out / "metrics.json", _json_text(result))
    return result


def _provenance(predictor, data, split: str, ic: InferenceConfig, t0: float, labels=None) -> dict:
    """What was scored, how, and how long it took (the tail of metrics.json).

    "split" is the split folder scored (`<data>/<split>/x`, or the name of a folder holding x/ and y/),
    None for an image folder, glob or stack given with --labels, which has no split.
    """
    p = Path(data)
    scored = (split if labels is None and (p / split / "x").is_dir()
              else p.name if labels is None and (p / "x").is_dir() else None)
    return {"inference": asdict(ic), "model": str(getattr(predictor, "path", predictor)),
            "data": str(p.resolve()), "split": scored, "tta": ic.tta, "seconds": round(time.time() - t0, 1)}


def evaluate_volume(model, data: str, split: str = "auto", out: str | Path | None = None,
                    inference: InferenceConfig | dict | None = None, labels: str | None = None,
                    overwrite: bool = False, voxel_size_nm=None, pixel_size_nm: float | None = None,
                    ignore_value: int | None = None, planes=("xy",), **overrides) -> dict:
    """3-D scores of `model` on a split whose slices, in order, form one volume.

    The slices are predicted one by one (as `analyze --volume` does), separated
    into 3-D mitochondria (`instances3d.volume_instances`) and scored by
    `volume.score_volume`: foreground precision / recall / F1 / IoU pooled over
    all voxels, instance F1 at IoU 0.5, AP at IoU 0.50 and 0.75 as the MitoEM
    challenge computes it, and the count error.
    voxel_size_nm: (z, y, x) nm; without it the in-plane `pixel_size_nm` (or
    TIFF metadata) still drives resampling, and 3-D distances are in voxels.
    ignore_value: label value left out of every count (default, as `evaluate`: the set's dataset.json
    "ignore_value", when the labels are the set's own).
    Returns the metrics dict written to `out/metrics.json` (there a NaN AP, of a volume with no true
    object, is written as null).
    """
    import numpy as np

    from .instances3d import volume_instances
    from .autoscale import for_objects, prediction_grid
    from .io import (DataError, check_ignore_value, check_labels, dataset_ignore_value, dataset_pixel_size_nm,
                     find_pairs, read_pair, read_pixel_size_nm)
    from .predict import load_model
    from .runlock import atomic_write_text
    from .volume import check_planes, predict_volume, score_volume

    if out is not None:
        out = cli.check_out_folder(out)
        if (out / "metrics.json").exists() and not overwrite:
            raise FileExistsError(f"{out / 'metrics.json'} exists; use --overwrite or another --out")
    voxel = None
    if voxel_size_nm is not None:
        voxel = tuple(cli.check_pixel_size(float(v), "--voxel-size") for v in voxel_size_nm)
        if len(voxel) != 3:
            raise cli.UsageError(f"--voxel-size takes three numbers (z y x, nm), got {len(voxel)}")
    if pixel_size_nm is not None:
        cli.check_pixel_size(pixel_size_nm, "--pixel-size")
    if split == "auto":
        split = held_out_split(data)
    pairs = find_pairs(data, split, labels=labels)
    if ignore_value is None and labels is None:  # as the 2-D scores: the set's declared unlabelled value
        ignore_value = dataset_ignore_value(data)
    if ignore_value is not None:
        check_ignore_value(check_labels(pairs, ignore_value), ignore_value)
    voxel_from = "--voxel-size" if voxel else None
    if voxel is None and pixel_size_nm is None:
        voxel = _dataset_voxel(data)
        voxel_from = "dataset.json" if voxel else None
    _warn_z_step(data, voxel)
    check_planes(planes, voxel, str(data))
    predictor = load_model(model) if isinstance(model, (str, Path)) else model
    ic = resolve_inference(predictor, inference, **overrides)
    t0 = time.time()
    read = [read_pair(p) for p in pairs]
    shapes = {im.shape for im, _ in read}
    if len(shapes) > 1:
        raise DataError(f"{data} [{split}]: slices differ in size ({sorted(shapes)}); they cannot form one volume")
    image = np.stack([im for im, _ in read])
    label = np.stack([lb for _, lb in read])
    del read
    px = pixel_size_nm or read_pixel_size_nm(pairs[0].image) or dataset_pixel_size_nm(data)
    grid_px, zoom = (px, None) if voxel else prediction_grid(predictor, image[image.shape[0] // 2], ic, px)
    prob, _ = predict_volume(predictor, image, ic, voxel, planes, gradcam=False, pixel_size_nm=grid_px)
    instances = volume_instances(prob, voxel, ic.threshold, for_objects(ic, zoom).min_volume(voxel),
                                 separate=ic.separate)
    result = {
        **score_volume(prob, instances, label, ic.threshold, ignore_value),
        "n_slices": int(image.shape[0]),
        "shape_zyx": list(image.shape),
        "voxel_size_nm": list(voxel) if voxel else None,
        "voxel_size_from": voxel_from,
        "planes": ",".join(planes),
        "auto_zoom": zoom.zoom if zoom is not None else None,
        "ignore_value": ignore_value,
        "pooling": "all voxels of the volume; instances in 3-D",
        "ap_definition": "MitoEM challenge (mAP_3Dvolume): objects ranked by size, 101-point interpolated precision",
        **_provenance(predictor, data, split, ic, t0, labels),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "metrics.json", _json_text(result))
    return result


def warn_trained_pixel_size(predictor, data: str | Path) -> None:
    """Warn when `data`, whose pixel size is unknown here, is a set the model was trained on at a
    known pixel size (its config.json "info.data"): scored without it, it is not scored as trained."""
    entries = (getattr(predictor.config, "info", None) or {}).get("data") or []
    here = str(Path(data).resolve())
    for d in entries:
        if isinstance(d, dict) and d.get("path") == here and d.get("pixel_size_nm") and not d.get("labels"):
            px = float(d["pixel_size_nm"])
            warnings.warn(f"{data}: pixel size unknown here (no dataset.json or TIFF metadata), but the model was "
                          f"trained on this set at {px:g} nm (its config.json); pass --pixel-size {px:g} to score "
                          "it as trained", stacklevel=2)
            return


def _json_text(result: dict) -> str:
    """metrics.json's text: strict JSON, a NaN score (AP of a volume with no true object) written as null."""
    import math

    clean = {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.items()}
    return json.dumps(clean, indent=2, allow_nan=False) + "\n"


def _dataset_voxel(data) -> tuple[float, float, float] | None:
    """(z, y, x) nm from dataset.json: z = section thickness x z_step (a set of every N-th section has
    slices N sections apart), y = x = its pixel size; None unless both are stated and plausible."""
    from .io import dataset_info, dataset_pixel_size_nm

    info = dataset_info(data)
    px, thick, step = dataset_pixel_size_nm(data), info.get("section_thickness_nm"), info.get("z_step") or 1
    try:
        voxel = (float(thick) * int(step), float(px), float(px))
        return tuple(cli.check_pixel_size(v, f"{Path(data) / 'dataset.json'}") for v in voxel)
    except (TypeError, ValueError, cli.UsageError):
        return None


def _warn_z_step(data, voxel) -> None:
    """Warn when a converted set kept only every N-th section (dataset.json "z_step", e.g. `data_prep.mitoem
    release --z-step 3`) and the z voxel size does not say so: its slices are N sections apart."""
    import warnings

    from .io import dataset_info

    info = dataset_info(data)
    step, thick = info.get("z_step") or 1, info.get("section_thickness_nm")
    if step > 1 and not (voxel and thick and abs(voxel[0] - step * thick) < 1e-6 * step * thick):
        need = f"{step} x the section thickness" + (f" ({step * thick:g} nm)" if thick else "")
        given = f"; --voxel-size gives z = {voxel[0]:g} nm" if voxel else ""
        meta = Path(data) / "dataset.json"
        warnings.warn(f"{meta}: the slices are {step} sections apart (z_step {step}), so the z voxel size is {need}"
                      f"{given}")


def format_volume_table(result: dict) -> str:
    cols = {"precision": "precision", "recall": "recall", "f1": "F1", "iou": "IoU",
            "instance_f1_iou50": "inst F1@0.5", "ap50": "AP50", "ap75": "AP75"}
    head = f"{'slices':>7} " + " ".join(f"{label:>12}" for label in cols.values()) + f" {'count':>7} {'true':>7}"
    row = (f"{result['n_slices']:>7} " + " ".join(f"{result[k]:>12.4f}" for k in cols)
           + f" {result['count']:>7} {result['gt_count']:>7}")
    return head + "\n" + row


def format_table(result: dict) -> str:
    cols = {"precision": "precision", "recall": "recall", "f1": "F1", "iou": "IoU", "accuracy": "accuracy",
            "instance_f1_iou50": "inst F1@0.5", "mean_abs_count_error": "|count err|"}
    head = f"{'images':>7} " + " ".join(f"{label:>12}" for label in cols.values())
    row = f"{result['n_images']:>7} " + " ".join(f"{result[k]:>12.4f}" for k in cols)
    return head + "\n" + row


def _split_tag(result: dict) -> str:
    return f" [{result['split']}]" if result.get("split") else ""


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m xmdl_tf.evaluate", __doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="run folder, .keras file, exported SavedModel folder or built-in "
                   "name (default: $XMDL_MODEL, else the shipped reference model)")
    p.add_argument("--data", required=True, help="data set folder (split layout), image folder or stack")
    p.add_argument("--labels", default=None, help="label folder/glob/stack when --data is not in the split layout")
    p.add_argument("--split", default="auto", help="split to score; auto: test, or val for a set without one")
    p.add_argument("--out", default=None, help="folder for metrics.json and per_image.csv")
    p.add_argument("--pixel-size", type=cli.pixel_size, default=None, help="nm per pixel of the data (else TIFF metadata)")
    p.add_argument("--ignore-value", type=cli.nonnegative_int, default=None,
                   help="label value of unlabelled pixels, left out of the scores (default: the set's "
                        "dataset.json 'ignore_value', else none)")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--volume", action="store_true",
                   help="score the split's slices, in order, as one volume (3-D instances, AP50/AP75 as MitoEM)")
    p.add_argument("--voxel-size", type=cli.voxel_size, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="voxel size in nm for --volume")
    p.add_argument("--planes", default="xy", help="--volume: xy, or xy,xz,yz for near-isotropic volumes")
    cli.add_inference_args(p, explain=False)
    args = p.parse_args(argv)
    cli.inference_from_args(args, InferenceConfig())  # the flags' values must form a valid config
    args.model = model_or_default(args.model)
    if not args.volume and (args.voxel_size is not None or args.planes != "xy"):
        p.error("--voxel-size and --planes need --volume")
    if args.volume:
        from .volume import parse_planes

        result = evaluate_volume(args.model, args.data, args.split, args.out, cli.inference_overrides(args),
                                 args.labels, args.overwrite, args.voxel_size, args.pixel_size, args.ignore_value,
                                 parse_planes(args.planes))
        vox = result["voxel_size_nm"]
        print(f"{args.data}{_split_tag(result)} as one volume, {' x '.join(map(str, result['shape_zyx']))} voxels"
              + (f" of {' x '.join(f'{v:g}' for v in vox)} nm (z, y, x; from {result['voxel_size_from']})" if vox
                 else " (voxel size unknown: 3-D distances in voxels)"))
        print(format_volume_table(result))
        if args.out:
            print(f"wrote {Path(args.out) / 'metrics.json'}")
        return 0
    result = evaluate(args.model, args.data, args.split, args.out, cli.inference_overrides(args), args.labels,
                      args.overwrite, args.pixel_size, args.ignore_value)
    print(f"{args.data}{_split_tag(result)}  pooled over {result['n_pixels']:,} pixels")
    print(format_table(result))
    if args.out:
        print(f"wrote {Path(args.out) / 'metrics.json'} and per_image.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
