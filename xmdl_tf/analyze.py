"""The unified XM-DL pipeline: `python -m xmdl_tf.analyze INPUT [INPUT ...]`.

For every image: whole-slice segmentation -> separated instances -> count ->
morphometry -> shape classes -> Grad-CAM (scored) -> one figure. Outputs:

    OUT/summary.csv              one row per image
    OUT/objects.csv              one row per mitochondrion, all images (`image` column)
    OUT/settings.json            the model (path, sha256) and settings every row was made with
    OUT/<stem>/mask.tif          uint8, 0 background / 1 mitochondrion
    OUT/<stem>/instances.tif     uint16 or uint32 instance ids, 0 background
    OUT/<stem>/probability.tif   float32 mitochondria probability
    OUT/<stem>/gradcam.tif       float32 heatmap in [0, 1]
    OUT/<stem>/uncertainty.tif   float32 entropy (bits, [0, 1]) of the calibrated probability
    OUT/<stem>/morphometry.csv   this image's rows of objects.csv
    OUT/<stem>/figure.png        the unified figure

With a calibrated model (`python -m xmdl_tf.calibrate`), objects.csv has each
object's `confidence` (probability that it is a real mitochondrion) and
`needs_review` (confidence < 0.5), and summary.csv `n_needs_review`,
`ood_score` and `ood_warning` (the image is unlike the training data).

INPUT may be image files (PNG, TIFF, JPEG), folders, globs or multi-page TIFF
stacks (each page is analysed as `<stem>_z0000`, ...), 8- or 16-bit.

With `--volume` each INPUT is one EM volume (multi-page TIFF, folder of
numbered slices, `file.h5:/dataset`, Zarr / OME-Zarr) analysed in 3-D:
mitochondria linked across slices, measured in nm^3 and classified by 3-D
shape (see `xmdl_tf.volume` for its outputs).
"""
from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from . import cli
from .autoscale import enabled as auto_zoom_enabled
from .config import InferenceConfig, resolve_inference
from .io import TIFF_EXTS, DataError, LabelIndex, SlicePair, folder_pairs, stack_depth, stack_pairs

if TYPE_CHECKING:
    from .predict import Predictor

log = logging.getLogger(__name__)
_WARNED: set[str] = set()  # warnings given once per process

OUTPUT_FILES = ("mask.tif", "instances.tif", "probability.tif", "gradcam.tif", "uncertainty.tif", "morphometry.csv",
                "figure.png")
# Once per run: a model's zero-shot F1 falls by up to half on a grid off by x2 (models/README.md,
# "Where the zero-shot errors come from"), and nothing else tells the user the scale was assumed.
UNKNOWN_GRID = ("note: {name} states no pixel size and --pixel-size was not given: predicting on the image's own "
                "grid as if it were the model's {model:g} nm; give --pixel-size NM when known (a grid off by x2 can "
                "halve the F1)")
NO_WIDTHS = ("note: auto zoom needs the widths of the objects the model knows, which its config.json lacks; "
             "python -m xmdl_tf.tune --model MODEL --data ITS_SETS --write measures them")
AUTO_GRID = ("note: {name} states no pixel size and --pixel-size was not given: each such image is zoomed so that its "
             "mitochondria look as wide as the model's own (auto zoom, column auto_zoom of summary.csv; measurements "
             "stay in pixels); give --pixel-size NM when known")
SEARCH_GRID = ("note: --zoom-search always: each image is predicted at the zoom, among x0.5-2 of the grid its "
               "pixel size asks for (its own when unknown), at which the model is surest of what it marks (column "
               "auto_zoom of summary.csv; measurements stay in the image's pixels or nm)")


# ----------------------------------------------------------------------------
# Inputs


def expand_inputs(inputs: list[str]) -> tuple[list[SlicePair], list[tuple[str, str]]]:
    """Image slices from files, folders, globs and stacks; plus (input, error) for bad ones."""
    pairs: list[SlicePair] = []
    failed: list[tuple[str, str]] = []
    for spec in inputs:
        try:
            p = Path(spec)
            if p.is_file() and p.suffix.lower() in TIFF_EXTS and stack_depth(p) > 1:
                pairs += stack_pairs(p)
            elif p.is_file():
                pairs.append(SlicePair(p))
            else:
                for q in folder_pairs(spec):
                    if q.image.suffix.lower() in TIFF_EXTS and stack_depth(q.image) > 1:
                        pairs += stack_pairs(q.image)
                    else:
                        pairs.append(q)
        except DataError as err:
            failed.append((spec, str(err)))
    names = [p.name for p in pairs]
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise DataError(f"several inputs share the output name(s) {sorted(dupes)}; analyse them into separate --out folders")
    return pairs, failed


def match_labels(pairs: list[SlicePair], labels: str | None) -> dict[str, SlicePair]:
    """Map each input slice name to its label slice (file, folder/glob by stem, or stack by page)."""
    if labels is None:
        return {}
    lp = Path(labels)
    if lp.is_file():
        if lp.suffix.lower() in TIFF_EXTS and stack_depth(lp) > 1:
            return {p.name: SlicePair(lp, None, p.page) for p in pairs if p.page is not None}
        if len(pairs) != 1:
            raise DataError(f"{lp}: one label file given for {len(pairs)} images; give a folder or a stack")
        return {pairs[0].name: SlicePair(lp)}
    index = LabelIndex(labels)
    out = {}
    for p in pairs:
        f = index.find(p.image)
        if f is not None:
            out[p.name] = SlicePair(f, None, p.page if stack_depth(f) > 1 else None)
    if not out:
        raise DataError(f"{labels}: no label file matches any input by name")
    return out


# ----------------------------------------------------------------------------
# One image


@dataclass
class Settings:
    """What applies to every image of one `analyze` call.

    inference: overrides of the model's `InferenceConfig` (config.json
    "inference"): a dict of its fields, a whole InferenceConfig, or None for
    the model's own settings.
    """

    inference: InferenceConfig | dict | None = None
    pixel_size_nm: float | None = None  # used when a file does not say
    faithfulness: bool = False
    rules: object = None
    figure: bool = True

    def resolve(self, predictor) -> InferenceConfig:
        """The InferenceConfig to apply with `predictor` (`config.resolve_inference`)."""
        return resolve_inference(predictor, self.inference)


@dataclass
class Analysis:
    """Everything computed for one image (H, W: the image's own grid, whatever it was predicted at).

    image: the raw slice; probability, heatmap (Grad-CAM, [0, 1]) and uncertainty (entropy, bits,
    [0, 1]): float32 (H, W); mask: bool (H, W), probability >= threshold; instances: uint16 (uint32
    above 65535 objects) (H, W) ids, 0 background; table: pandas DataFrame, one row per object
    (the objects.csv columns, lengths in px and, with a pixel size, nm); summary: the summary.csv
    row; true_mask: bool (H, W) when a label was given.
    """

    name: str
    image: np.ndarray
    probability: np.ndarray
    mask: np.ndarray
    heatmap: np.ndarray
    instances: np.ndarray
    table: "object"
    summary: dict = field(default_factory=dict)
    true_mask: np.ndarray | None = None
    uncertainty: np.ndarray | None = None  # (H, W) float32 entropy of the calibrated probability


def analyze_image(predictor: Predictor, image: np.ndarray, name: str = "image", settings: Settings | None = None,
                  label: np.ndarray | None = None, pixel_size_nm: float | None = None,
                  progress: Callable[[int], None] | None = None) -> Analysis:
    """Run the whole pipeline on one raw slice (H, W) uint8/uint16; returns an `Analysis`.

    image: any other numeric array-like is taken as a file would be read (`io.as_em_slice`: (H, W, 1)
    squeezed, RGB made grey, signed integers shifted, floats such as 0..1 mapped onto 0..65535), and
    `Analysis.image` (and `mean_intensity`) are then in those grey values.

    predictor: from `load_model` (a run folder, `.keras` file, export or built-in name).
    settings: inference overrides, shape rules, faithfulness (`Settings`); default: the
    model's own inference settings, as `python -m xmdl_tf.analyze` applies them.
    label: optional ground truth (H, W) (binary mask or instance ids) for scores.
    pixel_size_nm: nm per pixel, or None (measurements in pixels).
    progress: optional callable, called with the number of tiles in each finished batch.
    """
    from .autoscale import for_objects, prediction_grid
    from .gradcam import deletion_check, energy_inside
    from .metrics import scores
    from .morphometry import ShapeRules, classify, measure, summarize
    from .postprocess import foreground, instance_scores, instances as to_instances, score_slice, truth
    from .tiling import check_width

    from .io import as_em_slice
    from .predict import check_pixel_size

    image = as_em_slice(image, name)  # as a file is read: any numeric dtype, (H, W, 1), RGB, ...
    check_pixel_size(pixel_size_nm)
    if image.size and image.min() == image.max():  # a file was refused on reading; an array (napari, API) here
        raise DataError(f"{name}: constant image (every pixel the same value); nothing to segment")
    s = settings or Settings()
    ic = s.resolve(predictor)
    check_width(image.shape, predictor.scale_factor(pixel_size_nm, ic.rescale), predictor.size_divisor)
    # With zoom search, the OOD score (at the grid the pixel size asks for) decides whether to search, and
    # is the one reported: computed once here.
    from .ood import model_distribution

    from .predict import without_padding

    # A registered section's constant padding (`predict.without_padding`): not part of the image the model
    # is judged on, and what touches it is cut there, as at the image edge.
    unpadded, counts, pad = without_padding(image)
    if pad is not None:  # judged on the tissue's bounding box: a canvas of flat grey is unlike any EM
        ys, xs = np.nonzero(~pad)
        box = unpadded[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
        unpadded = box if min(box.shape) >= 64 else unpadded
    dist = model_distribution(predictor) if ic.zoom_search != "off" else None
    ood_score = dist.image_score(predictor, unpadded, pixel_size_nm, ic.rescale) if dist is not None else None
    # Unknown pixel size and auto_zoom: predict at the zoom the objects' widths suggest; measure in px.
    # Zoom search: at the zoom the model is surest at ("ood": for a slice its OOD score warns about).
    grid_px, zoom = prediction_grid(predictor, image, ic, pixel_size_nm,
                                    unlike=None if ood_score is None else ood_score > dist.threshold)
    scale = {"pixel_size_nm": grid_px, "rescale": ic.rescale}
    found = {"counts": counts, "padding": pad}  # the slice's padding, found once for both passes
    prob, cam = predictor.explain_slice(image, ic.gradcam_layer, None, ic.tile, ic.overlap, ic.batch_size, progress,
                                        **scale, **found)
    spread = members = None
    if ic.tta:
        # The members themselves only when the object confidence reads their agreement (4x the memory).
        need = _confidence_features(predictor, tta=True)
        prob, spread, *rest = predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=True, spread=True,
                                                      members="tta_agreement" in need, **scale, **found)
        members = rest[0] if rest else None
    ic = for_objects(ic, zoom)
    instances = to_instances(prob, ic, pixel_size_nm)
    table = measure(instances, image=image, pixel_size_nm=pixel_size_nm, heatmap=cam)
    if pad is not None and len(table):
        import cv2

        near = cv2.dilate(pad.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        table.loc[table["id"].isin(np.unique(instances[near])), "touches_border"] = True
    table["shape_class"] = classify(table, s.rules or ShapeRules(), pixel_size_nm)
    mask = foreground(prob, ic.threshold)
    summary = {"image": name, **summarize(table), "foreground_fraction": float(mask.mean()),
               "padding_fraction": float(pad.mean()) if pad is not None else 0.0,
               "gradcam_energy_in_mask": energy_inside(cam, mask), "pixel_size_nm": pixel_size_nm,
               "rescaled_by": predictor.scale_factor(grid_px, ic.rescale),
               "auto_zoom": zoom.zoom if zoom is not None else None}
    true_mask = None
    if label is not None:
        true_mask = truth(label)[0]
        sc = score_slice(prob, label, ic, pixel_size_nm, predicted=instances)
        tp, fp, fn = sc["inst_tp"], sc["inst_fp"], sc["inst_fn"]
        summary.update(scores(sc))
        summary.update({**instance_scores(tp, fp, fn), "gt_count": sc["gt_count"], "count_error": sc["count_error"],
                        "gradcam_energy_in_true_mask": energy_inside(cam, true_mask)})
    if s.faithfulness:
        check = deletion_check(lambda im: predictor.predict_slice(im, ic.tile, ic.overlap, ic.batch_size, **scale),
                               image, cam, ic.threshold)
        summary.update({f"deletion_{k}": v for k, v in check.items()})
    uncertainty = _trust(predictor, image, prob, cam, instances, table, summary, pixel_size_nm, ic, spread, members,
                         grid_px, ood_score)
    table.insert(0, "image", name)
    return Analysis(name, image, prob, mask, cam, instances, table, summary, true_mask, uncertainty)


def _confidence_features(predictor, tta: bool) -> tuple[str, ...]:
    """The features the predictor's object confidence model reads (none if it is not calibrated)."""
    config = getattr(predictor, "config", None)
    model = confidence_model(config.calibration if config is not None else {}, tta, _calibration_source(predictor))
    return model.features if model is not None else ()


def _calibration_source(predictor) -> str:
    """Where a model's stored calibration lives, for error messages."""
    path = getattr(predictor, "path", None)
    return f"{Path(path).parent / 'config.json' if path else 'config.json'}['calibration']"


def check_calibration(predictor) -> None:
    """ValueError naming the file when the stored calibration (config.json's temperature and object
    confidence models, ood.npz) is damaged: once, before any image, not as a failure of each."""
    from .calibration import check_temperature

    config = getattr(predictor, "config", None)
    cal = config.calibration if config is not None else {}
    source = _calibration_source(predictor)
    try:
        check_temperature(float(cal.get("temperature", 1.0)))
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}['temperature']: {err}; run calibrate again") from None
    from .confidence import ObjectConfidence
    from .ood import model_distribution

    for key in ("object_confidence", "object_confidence_without_tta"):
        if cal.get(key):
            ObjectConfidence.from_dict(cal[key], f"{source}[{key!r}]")
    if model_distribution(predictor) is None and cal.get("ood_file"):  # (a damaged one: a ValueError naming it)
        warnings.warn(f"{source} names the out-of-distribution model {cal['ood_file']}, which is not beside the "
                      "model: no image is checked against the training data (ood_warning stays empty); run "
                      "calibrate again to restore it", stacklevel=2)


def _trust(predictor, image, prob, cam, instances, table, summary, pixel_size_nm, ic, spread=None,
           members=None, grid_px: float | None = None, ood_score: float | None = None) -> np.ndarray:
    """Per-pixel uncertainty; per-object `confidence` / `needs_review` and per-image OOD columns
    when the model is calibrated (`python -m xmdl_tf.calibrate`), else NaN / False / empty.

    members: the test-time-augmented predictions (H, W, 8) when the confidence reads their agreement.
    grid_px: the pixel size the slice was predicted at (`autoscale.prediction_grid`; default
    `pixel_size_nm`). ood_score: the slice's OOD score when already computed (zoom search)."""
    from .calibration import apply_temperature
    from .confidence import AGREEMENT_FEATURES, IMAGE_FEATURES, REVIEW_BELOW, entropy, feature_matrix, object_features
    from .postprocess import ZOOMS, alternative_instances

    grid_px = pixel_size_nm if grid_px is None else grid_px

    config = getattr(predictor, "config", None)
    cal = config.calibration if config is not None else {}
    p_cal = apply_temperature(prob, float(cal.get("temperature", 1.0)))  # (checked: `check_calibration`)
    uncertainty = entropy(p_cal)
    model = confidence_model(cal, tta=spread is not None, source=_calibration_source(predictor))
    if model is not None and len(table):
        alternatives = None
        if set(AGREEMENT_FEATURES) & set(model.features):
            zoomed = [predictor.predict_slice(image, ic.tile, ic.overlap, ic.batch_size, tta=False,
                                              pixel_size_nm=grid_px, rescale=ic.rescale, zoom=z)
                      for z in ZOOMS] if "scale_agreement" in model.features else None
            alternatives = alternative_instances(prob, ic, pixel_size_nm, members, zoomed)
        uses_image = bool(set(IMAGE_FEATURES) & set(model.features))  # else not worth a pass over the slice
        f = object_features(instances, p_cal, cam, spread=spread, alternatives=alternatives,
                            image=image if uses_image else None)
        conf = model.predict(feature_matrix(f, model.features))
        by_id = dict(zip(f["label"].tolist(), conf.tolist()))
        # Rounded down to 4 decimals: `confidence < REVIEW_BELOW` in the table is `needs_review`
        # exactly (0.49996 shown as 0.5 would read as sure while it is flagged).
        table["confidence"] = [math.floor(by_id[int(i)] * 1e4) / 1e4 for i in table["id"]]
        table["needs_review"] = table["confidence"] < REVIEW_BELOW
    else:
        table["confidence"] = np.nan
        table["needs_review"] = False
    summary["calibrated"] = bool(cal)
    summary["n_needs_review"] = int(table["needs_review"].sum()) if model is not None else None
    summary["mean_uncertainty"] = float(uncertainty.mean())
    from .ood import model_distribution

    dist = model_distribution(predictor)
    # No OOD model: not checked, so neither "warned" nor "fine" (empty in summary.csv).
    summary["ood_score"], summary["ood_threshold"], summary["ood_warning"] = float("nan"), float("nan"), None
    if dist is not None:
        # With zoom search, on the grid the pixel size asks for (where "ood" decided to search: the
        # warning is about the data, not the zoom chosen for it); else where the slice was predicted.
        score = ood_score if ood_score is not None else dist.image_score(
            predictor, image, pixel_size_nm if ic.zoom_search != "off" else grid_px, ic.rescale)
        # A score that could not be computed (NaN) warns: nothing says the slice is like the training data.
        summary.update(ood_score=round(score, 4), ood_threshold=round(dist.threshold, 4),
                       ood_warning=bool(not score <= dist.threshold))
    return uncertainty


def confidence_model(calibration: dict, tta: bool, source: str = "calibration"):
    """The calibration's object confidence model for predictions made with or without test-time
    augmentation, or None. A model fitted on the TTA spread or agreement needs it: without TTA, the
    one fitted without them (`object_confidence_without_tta`), else none (a spread of 0 would read
    as sure). source: where the calibration was read from, named by errors."""
    from .confidence import TTA_FEATURES, ObjectConfidence

    d = calibration.get("object_confidence")
    if not d:
        return None
    model = ObjectConfidence.from_dict(d, f"{source}['object_confidence']")
    if tta or not set(TTA_FEATURES) & set(model.features):
        return model
    other = calibration.get("object_confidence_without_tta")
    if other:
        return ObjectConfidence.from_dict(other, f"{source}['object_confidence_without_tta']")
    if "confidence_needs_tta" not in _WARNED:
        _WARNED.add("confidence_needs_tta")
        log.warning("per-object confidence left empty: this model's confidence was calibrated on the spread of "
                    "test-time-augmented predictions; run with test-time augmentation to get it")
    return None


# Files a computer writes beside a user's (never a reason to keep a folder).
_SYSTEM_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")


def refuse_foreign_result(folder: Path) -> None:
    """One-line error when OUT/<name> exists and is not a result of analyze (2-D or --volume):
    --resume and --overwrite replace that folder whole, and must never delete what this command
    did not write (say, a folder of slices `stack/` beside the `stack.tif` being analysed)."""
    if not folder.exists() and not folder.is_symlink():
        return
    from .volume import VOLUME_FILES

    ours = {*OUTPUT_FILES, *VOLUME_FILES, "meshes.ply", "meshes.obj", *_SYSTEM_FILES}
    if folder.is_symlink() or not folder.is_dir():
        what = "a link" if folder.is_symlink() else "a file"
    else:
        other = sorted(p.name for p in folder.iterdir() if p.name not in ours or not p.is_file())
        what = other and f"holds {other[0]}" + (f" and {len(other) - 1} more" if len(other) > 1 else "")
    if what:
        raise cli.UsageError(f"{folder}: exists and is not a result of analyze ({what}), which this input's "
                             "results would replace; choose another --out")


def write_outputs(a: Analysis, folder: Path, make_figure: bool = True) -> None:
    """Write the per-image files (see module docstring) into `folder`, atomically.

    They are written into a hidden sibling folder first and renamed into place
    when complete, so `folder` holds either a whole result or none (an earlier
    result it replaces stays until then).
    """
    import shutil

    import tifffile

    from .figure import unified_figure
    from .runlock import atomic_replace_dir

    stage = folder.with_name(f".{folder.name}.partial")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        res = {}
        if a.summary.get("pixel_size_nm"):
            # ImageJ-readable pixel size, so Fiji opens the outputs calibrated.
            res = {"resolution": (1.0 / (a.summary["pixel_size_nm"] / 1000.0),) * 2, "imagej": True,
                   "metadata": {"unit": "um"}}
        tifffile.imwrite(stage / "mask.tif", a.mask.astype(np.uint8), compression="zlib", **res)
        tifffile.imwrite(stage / "instances.tif", a.instances, compression="zlib", **res)
        tifffile.imwrite(stage / "probability.tif", a.probability.astype(np.float32), compression="zlib", **res)
        tifffile.imwrite(stage / "gradcam.tif", a.heatmap.astype(np.float32), compression="zlib", **res)
        if a.uncertainty is not None:
            tifffile.imwrite(stage / "uncertainty.tif", a.uncertainty.astype(np.float32), compression="zlib", **res)
        a.table.to_csv(stage / "morphometry.csv", index=False)
        if make_figure:
            unified_figure(a.image, a.instances, a.table, a.heatmap, stage / "figure.png", title=a.name,
                           true_mask=a.true_mask, summary=a.summary, uncertainty=a.uncertainty)
        atomic_replace_dir(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------
# Many images


def analyze(inputs: list[str], model=None, out: str | Path = "xmdl_out", labels: str | None = None,
            settings: Settings | None = None, overwrite: bool = False, verbose: bool = True,
            resume: bool = False) -> dict:
    """Analyse every input slice; returns {"analysed": [...], "skipped": [...], "failed": [(input, error), ...]}.

    Everything is checked before anything is written: the inputs (a bad one is
    reported by name and left out), a label for every input when `labels` is
    given, the model, the pixel size and the output folder. Then each image's
    files land atomically in `out/<name>/` and its rows are added to
    `out/summary.csv` and `out/objects.csv` as soon as it is done, so a kill or
    a failure loses at most the image in progress; one failing image never
    stops the others (a full disk stops the batch). `out` is locked against a
    second process.

    Existing results are never overwritten unless `overwrite` (each image's
    old files and rows are replaced when its new ones are complete); `resume`
    continues an interrupted batch, skipping images whose outputs and rows are
    complete.
    """
    import errno

    from keras.utils import Progbar

    from .io import read_image, read_label, read_pixel_size_nm
    from .morphometry import ShapeRules
    from .predict import load_model
    from .runlock import FolderLock, finish_replace_dir

    s = settings or Settings()
    if s.pixel_size_nm is not None:
        cli.check_pixel_size(s.pixel_size_nm, "--pixel-size")
    out = cli.check_out_folder(out)
    pairs, failed = expand_inputs(inputs)
    if not pairs and failed:
        return {"analysed": [], "skipped": [], "failed": failed}
    for pair in pairs:  # OUT/<name> is replaced whole on --overwrite: it must not hold an input
        cli.refuse_replacing_input(out / pair.name, pair.image)
        refuse_foreign_result(out / pair.name)
    label_map = match_labels(pairs, labels)
    if labels is not None:
        unlabelled = [p.name for p in pairs if p.name not in label_map]
        if unlabelled:
            raise DataError(f"{labels}: no label for {len(unlabelled)} input(s), e.g. {unlabelled[0]}; give a label "
                            "for every input, or analyse the unlabelled ones without --labels")
    predictor = load_model(model) if model is None or isinstance(model, (str, Path)) else model
    ic = s.resolve(predictor)
    check_calibration(predictor)
    from .gradcam import GradCamError

    try:  # a model-wide setting: one line now, not a failure of every image after its prediction
        predictor._explainer(ic.gradcam_layer or predictor.gradcam_layer)
    except GradCamError as err:
        raise cli.UsageError(str(err)) from None
    if ic.tile % predictor.size_divisor:  # once, here, rather than as a failure of every image
        raise cli.UsageError(f"--tile {ic.tile} is not a multiple of the model's size divisor "
                             f"{predictor.size_divisor}; try {max(ic.tile // predictor.size_divisor, 1) * predictor.size_divisor}")

    with FolderLock(out, "analysis"):
        for pair in pairs:  # a run killed between the two renames of atomic_replace_dir: keep its result
            finish_replace_dir(out / pair.name)
        rows, objects = _previous_rows(out)
        complete = {n for n in rows if _complete(out / n, s.figure)}
        if not (overwrite or resume):
            clash = [out / n for n in ("summary.csv", "objects.csv") if (out / n).exists()]
            clash += [out / p.name for p in pairs if (out / p.name).exists()]
            if clash:
                raise FileExistsError(f"{clash[0]} exists (and {len(clash) - 1} more outputs); use --resume to "
                                      "continue an interrupted batch, --overwrite to replace, or another --out")
        # What makes rows comparable: the model, its inference settings and the shape rules. A pixel
        # size is the input's (each row records its own), the Grad-CAM check only adds columns.
        mine = run_settings(predictor, ic, rules=s.rules or ShapeRules())
        check_run_settings(out, mine, resume, overwrite, sorted(set(rows) - {p.name for p in pairs}))
        todo = [p for p in pairs if overwrite or p.name not in complete]
        skipped = [p.name for p in pairs if p not in todo]
        if verbose and skipped:
            print(f"--resume: {len(skipped)} image(s) already done, {len(todo)} to go", flush=True)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        write_run_settings(out, mine)
        done = []
        t0 = time.time()
        warned_grid = warned_search = False
        # Whether --zoom-search can act: a model pixel size to zoom from and, for "ood", an OOD model.
        from .ood import model_distribution

        search_possible = (ic.zoom_search != "off" and ic.rescale and bool(predictor.pixel_size_nm)
                           and (ic.zoom_search == "always" or model_distribution(predictor) is not None))
        for i, pair in enumerate(todo):
            where = str(pair.image) + (f" (page {pair.page})" if pair.page is not None else "")
            try:
                image = read_image(pair.image, pair.page)
                label = None
                if pair.name in label_map:
                    lp = label_map[pair.name]
                    label = read_label(lp.image, lp.page)
                    if label.shape != image.shape:
                        raise DataError(f"{lp.image} is {label.shape} but {pair.image} is {image.shape}")
                px = _pixel_size(pair, read_pixel_size_nm(pair.image), s.pixel_size_nm, verbose)
                bar = None
                if verbose and not warned_search and search_possible and ic.zoom_search == "always":
                    warned_search = True  # ("ood" says so in the warning of each slice it searches)
                    print(SEARCH_GRID, file=sys.stderr, flush=True)
                if verbose and px is None and predictor.pixel_size_nm and not warned_grid:
                    warned_grid = True
                    print((AUTO_GRID if auto_zoom_enabled(predictor, ic) else UNKNOWN_GRID).format(
                              name=where, model=predictor.pixel_size_nm),
                          file=sys.stderr, flush=True)
                    if ic.auto_zoom and not ic.object_width_px:
                        print(NO_WIDTHS, file=sys.stderr, flush=True)
                if verbose:
                    factor = predictor.scale_factor(px, ic.rescale)
                    note = f"  (resampled x{factor:.3g} to the model's {predictor.pixel_size_nm:g} nm)" if factor != 1 else ""
                    print(f"[{i + 1}/{len(todo)}] {pair.name}  {image.shape[0]}x{image.shape[1]}{note}", flush=True)
                    from .tiling import plan_tiles

                    scaled = tuple(max(1, round(n * factor)) for n in image.shape)
                    n_tiles = len(plan_tiles(scaled, predictor.tile_for(ic.tile), ic.overlap,
                                             predictor.size_divisor)[2])
                    if n_tiles > 4:
                        bar = Progbar(n_tiles, unit_name="tile")
                a = analyze_image(predictor, image, pair.name, s, label, px,
                                  progress=(lambda n, b=bar: b.add(n)) if bar else None)
                write_outputs(a, out / pair.name, s.figure)
                rows[pair.name] = a.summary
                objects[pair.name] = a.table
                _write_tables(out, rows, objects, [p.name for p in pairs])
                done.append(pair.name)
                if verbose:
                    z = a.summary.get("auto_zoom")
                    zoomed = f" (zoom x{z:.3g})" if z not in (None, 1.0) else ""
                    print(f"    {cli.mitochondria(a.summary['count'])}{zoomed} -> {out / pair.name}", flush=True)
                if a.summary.get("ood_warning"):
                    print(f"    warning: {pair.name} is unlike the model's training data (OOD score "
                          f"{a.summary['ood_score']:.2f} > {a.summary['ood_threshold']:.2f}); check its results and "
                          "consider fine-tuning on a few annotated slices (python -m xmdl_tf.finetune) or, "
                          "without annotation, adapting to these images (python -m xmdl_tf.adapt)"
                          + (f"; it was predicted at the zoom the model is surest at, "
                             f"x{a.summary.get('auto_zoom') or 1:.3g} (--zoom-search off keeps the grid its pixel "
                             "size asks for)" if search_possible
                             else "; --zoom-search always may also help" if ic.zoom_search == "off" and ic.rescale
                             and predictor.pixel_size_nm else ""),
                          file=sys.stderr, flush=True)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
                    raise  # every further image would fail the same way
                failed.append((where, cli.one_line(err)))
                print(f"    skipped {pair.name}: {cli.one_line(err)}", file=sys.stderr, flush=True)
            except Exception as err:  # noqa: BLE001 - one image's failure must not lose the others
                msg = str(err) if isinstance(err, (DataError, ValueError)) else f"{type(err).__name__}: {err}"
                failed.append((where, " ".join(msg.split())))
                print(f"    skipped {pair.name}: {failed[-1][1]}", file=sys.stderr, flush=True)
        if created and not any(p.name != SETTINGS_FILE for p in out.iterdir()):
            (out / SETTINGS_FILE).unlink(missing_ok=True)
            out.rmdir()  # every image failed: leave no empty folder behind
        if verbose:
            where = f"-> {out}/summary.csv, objects.csv" if (out / "summary.csv").exists() else "; nothing written"
            print(f"analysed {len(done)} image(s) in {time.time() - t0:.0f} s {where}")
    return {"analysed": done, "skipped": skipped, "failed": failed}


SETTINGS_FILE = "settings.json"  # OUT/settings.json: what every row of OUT/summary.csv was made with


def model_fingerprint(path: str | Path) -> str:
    """sha256 (hex) of a model's files: the weights (a file, or every file of a SavedModel or run
    folder) and the config.json / ood.npz beside them, so a recalibrated model counts as another."""
    import hashlib

    path = Path(path)
    if not path.exists():  # (a model built in memory)
        return ""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_file():
        files += [path.parent / n for n in ("config.json", "ood.npz") if (path.parent / n).is_file()]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()


def run_settings(predictor, ic: InferenceConfig, **given) -> dict:
    """The settings that decide an output folder's results (JSON-ready): the model (by content),
    the inference settings as resolved, and `given` (pixel or voxel size, shape rules, ...)."""
    import json
    from dataclasses import asdict, is_dataclass

    ready = {k: asdict(v) if is_dataclass(v) else v for k, v in given.items()}
    return json.loads(json.dumps({"model": str(predictor.path), "model_sha256": model_fingerprint(predictor.path),
                                  "inference": asdict(ic), **ready}))


def check_run_settings(out: Path, mine: dict, resume: bool, overwrite: bool, others: list[str]) -> None:
    """One-line error before a run adds rows made with other settings to OUT's tables.

    --resume must continue with the settings OUT/settings.json records; --overwrite may change
    them only when no result of another input (`others`) would stay behind with the old ones.
    An OUT written before settings.json existed is taken as it is.
    """
    import json

    path = out / SETTINGS_FILE
    if not (resume or overwrite) or not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
        if not isinstance(old, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err}); move it away, or use another --out") from None
    diff = cli.differing(old, mine, qualify=False, skip=("model", "model_sha256"))
    if old.get("model_sha256") != mine["model_sha256"]:
        diff.insert(0, f"model {old.get('model', '?')}")
    if not diff:
        return
    what = ", ".join(diff)
    if resume:
        raise cli.UsageError(f"{out}: its results were made with other settings ({what}); resume with the same "
                             "ones, or use --overwrite or another --out")
    if others:
        raise cli.UsageError(f"{out}: holds results of {len(others)} other input(s) (e.g. {others[0]}) made with "
                             f"other settings ({what}); --overwrite replaces only this batch's, so the tables "
                             "would mix the two; use another --out")


def write_run_settings(out: Path, mine: dict) -> None:
    import json

    from .runlock import atomic_write_text

    atomic_write_text(out / SETTINGS_FILE, json.dumps(mine, indent=2) + "\n")


def _pixel_size(pair: SlicePair, from_file: float | None, given: float | None, verbose: bool) -> float | None:
    """The slice's pixel size: `given` (--pixel-size) when given, else its metadata if plausible, else None.

    An explicit --pixel-size wins, as --voxel-size does for volumes: a stale calibration in a file
    (1 um/pixel is a common one) must not decide the measurements of a user who said otherwise; a
    disagreement is warned about."""
    if given is not None:
        if verbose and from_file is not None and abs(from_file - given) > 0.02 * given:
            print(f"    warning: {pair.image}: its metadata says {from_file:g} nm per pixel; --pixel-size "
                  f"{given:g} is used", file=sys.stderr, flush=True)
        return given
    if from_file is not None:
        try:
            return cli.check_pixel_size(from_file, f"{pair.image} metadata")
        except cli.UsageError as err:
            if verbose:
                print(f"    warning: {err}; ignored (give --pixel-size)", file=sys.stderr, flush=True)
    return None


def _complete(folder: Path, figure: bool) -> bool:
    need = [f for f in OUTPUT_FILES if figure or f != "figure.png"]
    return all((folder / f).is_file() for f in need)


def _previous_rows(out: Path, key: str = "image") -> tuple[dict, dict]:
    """Rows of an earlier (possibly interrupted) run in `out`: {name: summary row}, {name: objects table};
    `key` is the column naming the image (or the volume, for `--volume`)."""
    import pandas as pd

    rows, objects = {}, {}
    if (out / "summary.csv").is_file():
        try:
            for r in pd.read_csv(out / "summary.csv").to_dict("records"):
                rows[str(r[key])] = r
        except (ValueError, KeyError, pd.errors.EmptyDataError) as err:
            raise DataError(f"{out / 'summary.csv'}: unreadable ({err}); move it away to start again") from None
    if (out / "objects.csv").is_file():
        try:
            table = pd.read_csv(out / "objects.csv")
        except (ValueError, pd.errors.EmptyDataError):
            table = pd.DataFrame(columns=[key])
        for name, t in table.groupby(key, sort=False) if key in table else []:
            objects[str(name)] = t
    # An image counts as done only with both its summary row and its files.
    return rows, {n: t for n, t in objects.items() if n in rows}


def _write_tables(out: Path, rows: dict, objects: dict, order: list[str], key: str = "image") -> None:
    """Rewrite summary.csv and objects.csv atomically: this batch in input order, then earlier images."""
    import pandas as pd

    from .runlock import atomic_write_text

    names = [n for n in order if n in rows] + [n for n in rows if n not in set(order)]
    atomic_write_text(out / "summary.csv", pd.DataFrame([rows[n] for n in names]).to_csv(index=False))
    tables = [objects[n] for n in names if n in objects and len(objects[n])]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=[key])
    atomic_write_text(out / "objects.csv", table.to_csv(index=False))


@cli.guarded(resume_flag=True)
def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m xmdl_tf.analyze", __doc__.split("\n\n")[0])
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders, globs or TIFF stacks")
    p.add_argument("--model", default=None, help="run folder, .keras file, exported SavedModel folder or built-in name (default: $XMDL_MODEL, "
                   "else the built-in xmdl_ref)")
    p.add_argument("--labels", default=None, help="ground-truth masks or instance labels (file, folder, glob or stack)")
    p.add_argument("--pixel-size", type=cli.pixel_size, default=None,
                   help="nm per pixel (wins over the files' metadata, with a warning where they disagree)")
    p.add_argument("--out", default="xmdl_out", help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results in --out (each image's when its new one is done)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted batch: skip images already done")
    p.add_argument("--rules", default=None, help="JSON file of shape-class thresholds")
    p.add_argument("--rule", action="append", default=[], metavar="NAME=VALUE", help="override one shape rule")
    p.add_argument("--faithfulness", action="store_true", help="deletion check of the Grad-CAM heatmap")
    p.add_argument("--no-figure", action="store_true")
    v = p.add_argument_group("volumes (each STACK analysed in 3-D)")
    v.add_argument("--volume", action="store_true",
                   help="treat each input (multi-page TIFF, folder of slices, file.h5:/dataset, Zarr) as one volume")
    v.add_argument("--voxel-size", type=cli.voxel_size, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="voxel size in nm when the metadata does not say")
    v.add_argument("--planes", default="xy", help="xy, or xy,xz,yz to also predict the XZ/YZ planes of near-isotropic volumes")
    v.add_argument("--meshes", choices=("ply", "obj"), default=None, help="also write every object's surface mesh")
    v.add_argument("--ignore-value", type=cli.nonnegative_int, default=None,
                   help="label value of unlabelled voxels, left out of the scores")
    cli.add_inference_args(p)
    args = p.parse_args(argv)

    if not args.volume:
        given = [f for f, val in (("--voxel-size", args.voxel_size), ("--meshes", args.meshes),
                                  ("--ignore-value", args.ignore_value)) if val is not None]
        given += ["--planes"] if args.planes != "xy" else []
        if given:
            p.error(f"{given[0]} needs --volume")
    elif args.faithfulness:
        p.error("--faithfulness is for 2-D slices; it is not available with --volume")
    elif args.pixel_size is not None:
        p.error("with --volume give the voxel size as --voxel-size Z Y X (nm), not --pixel-size")

    if args.volume:
        from .morphometry3d import ShapeRules3D as Rules
    else:
        from .morphometry import ShapeRules as Rules

    try:
        rules = Rules.from_json(args.rules) if args.rules else Rules()
    except ValueError as err:
        p.error(f"--rules {err}")
    if args.rule:
        values = {}
        for r in args.rule:
            name, eq, value = r.partition("=")
            try:
                values[name.strip()] = float(value)
            except ValueError:
                p.error(f"--rule {r!r}: expected NAME=VALUE with a number, e.g. round_max_aspect=1.3"
                        if not eq else f"--rule {name.strip()}: {value!r} is not a number")
        try:
            rules = rules.override(values)
        except ValueError as err:
            p.error(f"--rule: {err}")
    cli.inference_from_args(args, InferenceConfig())  # the flags' values must form a valid config
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    if args.volume:
        from .volume import VolumeSettings, analyze_volumes, parse_planes

        vs = VolumeSettings(inference=cli.inference_overrides(args),
                            voxel_size_nm=tuple(args.voxel_size) if args.voxel_size else None,
                            planes=parse_planes(args.planes), rules=rules, figure=not args.no_figure,
                            meshes=args.meshes)
        result = analyze_volumes(args.inputs, args.model, args.out, args.labels, vs, args.overwrite, args.resume,
                                 args.ignore_value)
        return _report_failed(result)
    settings = Settings(inference=cli.inference_overrides(args), pixel_size_nm=args.pixel_size,
                        faithfulness=args.faithfulness, rules=rules, figure=not args.no_figure)
    result = analyze(args.inputs, args.model, args.out, args.labels, settings, args.overwrite, resume=args.resume)
    return _report_failed(result)


def _report_failed(result: dict) -> int:
    if result["failed"]:
        print(f"{len(result['failed'])} input(s) failed:", file=sys.stderr)
        for name, err in result["failed"]:
            print(f"  {err}" if err.startswith(name.split(" (page")[0]) else f"  {name}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
