"""EM volumes: `python -m xmdl_tf.analyze STACK --volume` and `evaluate --volume`.

A stack (multi-page TIFF, folder of numbered slices, HDF5 dataset or Zarr /
OME-Zarr array; see `volume_io`) is analysed as one volume:

1. every XY slice is predicted by the 2-D model, with its Grad-CAM, at the
   model's pixel size (optionally also the XZ and YZ planes of a
   near-isotropic volume, averaged: `planes`);
2. the probability volume is thresholded and separated into 3-D mitochondria
   (`instances3d.volume_instances`: one id through all its slices, touching
   ones split at necks measured in nm);
3. every object is measured in 3-D (`morphometry3d.measure3d`: volume,
   surface, sphericity, axes, solidity, skeleton...) and given a 3-D shape
   class (`ShapeRules3D`);
4. with a label stack, the volume is scored as MitoEM scores it (3-D
   foreground F1 / IoU, instance F1, AP at IoU 0.50 and 0.75, count error).

Outputs of `analyze_volumes` (one folder per volume, written atomically):

    OUT/summary.csv                 one row per volume
    OUT/objects.csv                 one row per 3-D mitochondrion (`volume` column)
    OUT/settings.json               the model (path, sha256) and settings every row was made with
    OUT/<stem>/probability.tif      float32 (Z, Y, X), voxel size in the metadata
    OUT/<stem>/mask.tif             uint8 0/1
    OUT/<stem>/instances.tif        uint16/uint32 ids, one per 3-D object
    OUT/<stem>/gradcam.tif          float32 Grad-CAM of each XY slice, [0, 1]
    OUT/<stem>/objects.csv          this volume's rows of objects.csv
    OUT/<stem>/figure.png           orthogonal views by shape class + 3-D surfaces
    OUT/<stem>/meshes.ply|obj       with `meshes`: every object's surface (nm)

Memory: slices are predicted one at a time; separation and measurements run
object by object on bounding boxes. The whole-volume arrays are the raw image,
the probability and Grad-CAM (float32), the mask and the ids, about 15 bytes
per voxel for 8-bit data (`benchmarks/bench_volume.py` measures it).
"""
from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import cli
from .config import InferenceConfig, resolve_inference
from .io import DataError

log = logging.getLogger(__name__)

PLANES = ("xy", "xz", "yz")
VOLUME_FILES = ("probability.tif", "mask.tif", "instances.tif", "gradcam.tif", "objects.csv", "figure.png")
# Beyond this ratio of the largest to the smallest voxel side, XZ / YZ planes
# are stretched too far from what the 2-D model was trained on.
MAX_PLANE_ANISOTROPY = 1.25


def parse_planes(text: str | Sequence[str]) -> tuple[str, ...]:
    """'xy,xz,yz' -> ('xy', 'xz', 'yz'); 'xy' must be among them (it carries Grad-CAM)."""
    planes = tuple(p.strip().lower() for p in (text.split(",") if isinstance(text, str) else text) if p.strip())
    bad = [p for p in planes if p not in PLANES]
    if bad or not planes:
        raise cli.UsageError(f"--planes: expected a comma-separated subset of {','.join(PLANES)}, got {text!r}")
    if "xy" not in planes:
        raise cli.UsageError("--planes must include xy (the slices Grad-CAM explains)")
    return tuple(p for p in PLANES if p in planes)


def check_planes(planes: Sequence[str], voxel_size_nm: Sequence[float] | None, name: str) -> None:
    """XZ / YZ planes need near-isotropic voxels (ratio <= MAX_PLANE_ANISOTROPY), so a known voxel size."""
    if set(planes) == {"xy"}:
        return
    if voxel_size_nm is None:
        raise cli.UsageError(f"{name}: --planes {','.join(planes)} needs near-isotropic voxels, and the voxel size "
                             "is unknown; give it with --voxel-size Z Y X (nm), or use --planes xy")
    ratio = max(voxel_size_nm) / min(voxel_size_nm)
    if ratio > MAX_PLANE_ANISOTROPY:
        raise cli.UsageError(f"{name}: --planes {','.join(planes)} needs near-isotropic voxels, but the voxel size is "
                             f"{' x '.join(f'{v:g}' for v in voxel_size_nm)} nm (ratio {ratio:.2g}); use --planes xy")


def check_voxel_size(voxel_size_nm: Sequence[float] | None) -> tuple[float, float, float] | None:
    """(z, y, x) as floats; ValueError unless None or three finite numbers > 0 (nm)."""
    if voxel_size_nm is None:
        return None
    try:
        vals = tuple(float(v) for v in np.asarray(voxel_size_nm, dtype=float).ravel())
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
        raise ValueError(f"voxel_size_nm must be three positive numbers (z, y, x) in nm or None, got {voxel_size_nm!r}")
    return vals


# ----------------------------------------------------------------------------
# Prediction


def predict_volume(predictor, image: np.ndarray, inference: InferenceConfig,
                   voxel_size_nm: Sequence[float] | None = None, planes: Sequence[str] = ("xy",),
                   gradcam: bool = True, progress: Callable[[str, int, int], None] | None = None,
                   pixel_size_nm: float | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Probability (and Grad-CAM) of a raw volume, slice by slice with the 2-D model.

    image: (Z, Y, X) uint8/uint16. voxel_size_nm: (z, y, x); its in-plane
    size drives the resampling to the model's pixel size (`pixel_size_nm`
    stands in when only the in-plane size is known). planes: XY slices
    always; XZ / YZ planes too (their probabilities averaged with XY's) for
    near-isotropic volumes. progress: called with (plane, done, total).
    Returns float32 probability (Z, Y, X) in [0, 1] and float32 Grad-CAM
    (Z, Y, X) of the XY slices (None without `gradcam`).
    """
    from .io import as_em_volume
    from .tiling import check_width

    image = as_em_volume(image)
    voxel_size_nm = check_voxel_size(voxel_size_nm)
    ic = inference
    px_xy = pixel_size_nm if voxel_size_nm is None else float(voxel_size_nm[2])
    check_width(image.shape[1:], predictor.scale_factor(px_xy, ic.rescale), predictor.size_divisor, "slices")
    px_z = None if voxel_size_nm is None else float(voxel_size_nm[0])
    scale = {"rescale": ic.rescale}
    n_z = image.shape[0]
    prob = np.empty(image.shape, np.float32)
    cam = np.empty(image.shape, np.float32) if gradcam else None
    for z in range(n_z):
        if gradcam:
            p, c = predictor.explain_slice(image[z], ic.gradcam_layer, None, ic.tile, ic.overlap, ic.batch_size,
                                           pixel_size_nm=px_xy, **scale)
            cam[z] = c
            if ic.tta:
                p = predictor.predict_slice(image[z], ic.tile, ic.overlap, ic.batch_size, tta=True,
                                            pixel_size_nm=px_xy, **scale)
        else:
            p = predictor.predict_slice(image[z], ic.tile, ic.overlap, ic.batch_size, tta=ic.tta,
                                        pixel_size_nm=px_xy, **scale)
        prob[z] = p
        if progress is not None:
            progress("xy", z + 1, n_z)
    extra = [p for p in planes if p != "xy"]
    if extra:
        # Near-isotropic only (check_planes): one pixel size for both plane axes.
        px = px_xy if voxel_size_nm is None else float(np.mean([px_z, px_xy]))
        for plane in extra:
            axis = 1 if plane == "xz" else 2
            n = image.shape[axis]
            for i in range(n):
                sl = (slice(None), i) if axis == 1 else (slice(None), slice(None), i)
                prob[sl] += predictor.predict_slice(np.ascontiguousarray(image[sl]), ic.tile, ic.overlap,
                                                    ic.batch_size, tta=ic.tta, pixel_size_nm=px, **scale)
                if progress is not None:
                    progress(plane, i + 1, n)
        prob /= len(planes)
    return prob, cam


# ----------------------------------------------------------------------------
# Scores


def ground_truth_instances_3d(label: np.ndarray, ignore_value: int | None = None) -> np.ndarray:
    """3-D instances of a label stack: its ids when it has several, else its 6-connected components."""
    from scipy import ndimage as ndi

    fg = label > 0
    if ignore_value is not None:
        fg &= label != ignore_value
    # The top foreground value, not the label's: an ignore value above it (0/1 masks, 255 unlabelled)
    # would make every mask voxel look like an id and the whole mask one object.
    top = int(label[fg].max()) if fg.any() else 0
    if np.count_nonzero(fg & (label != top)):  # more than one foreground value: instance ids
        return np.where(fg, label, 0)
    out = np.empty(label.shape, np.int32)
    ndi.label(fg, output=out)
    return out


def score_volume(probability: np.ndarray, instances: np.ndarray, label: np.ndarray, threshold: float,
                 ignore_value: int | None = None) -> dict:
    """3-D scores of one volume against its label stack (all (Z, Y, X)).

    Returns foreground precision / recall / F1 (Dice) / IoU / accuracy pooled
    over all voxels, voxel counts tp/fp/fn/tn, instance precision / recall /
    F1 at IoU 0.5 (one-to-one matching), ap50 / ap75 (`instances.average_precision`,
    the MitoEM definition, objects ranked by size), count, gt_count and count_error.
    """
    from .instances import average_precision, match_instances
    from .metrics import confusion, scores

    if label.shape != probability.shape:
        raise DataError(f"label stack is {label.shape} but the volume is {probability.shape}")
    valid = None if ignore_value is None else label != ignore_value
    true = ground_truth_instances_3d(label, ignore_value)
    counts = confusion(probability >= threshold, true > 0, valid)
    pred = instances if valid is None else np.where(valid, instances, 0)
    m = match_instances(pred, true, 0.5)
    ap = average_precision(pred, true, (0.5, 0.75))
    return {**scores(counts), **counts, "instance_precision_iou50": m["precision"],
            "instance_recall_iou50": m["recall"], "instance_f1_iou50": m["f1"], **ap,
            "count": m["n_pred"], "gt_count": m["n_true"], "count_error": m["count_error"]}


# ----------------------------------------------------------------------------
# One volume


@dataclass
class VolumeSettings:
    """What applies to every volume of one `analyze --volume` call.

    inference: overrides of the model's InferenceConfig (dict), a whole one, or None.
    voxel_size_nm: (z, y, x) nm for volumes whose metadata does not say (--voxel-size).
    planes: 'xy' plus optionally 'xz', 'yz' (near-isotropic volumes).
    rules: ShapeRules3D (None = defaults). meshes: None, 'ply' or 'obj'.
    """

    inference: InferenceConfig | dict | None = None
    voxel_size_nm: tuple[float, float, float] | None = None
    planes: tuple[str, ...] = ("xy",)
    rules: object = None
    figure: bool = True
    meshes: str | None = None


@dataclass
class VolumeAnalysis:
    """Everything computed for one volume (arrays (Z, Y, X))."""

    name: str
    image: np.ndarray
    probability: np.ndarray
    instances: np.ndarray
    heatmap: np.ndarray | None
    table: "object"
    summary: dict = field(default_factory=dict)
    voxel_size_nm: tuple[float, float, float] | None = None
    timings: dict = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        return self.instances > 0


def analyze_volume(predictor, image: np.ndarray, name: str = "volume", settings: VolumeSettings | None = None,
                   voxel_size_nm: Sequence[float] | None = None, label: np.ndarray | None = None,
                   ignore_value: int | None = None, progress=None) -> VolumeAnalysis:
    """The whole pipeline on one raw volume (Z, Y, X) uint8/uint16 (see the module docstring).

    image: any other numeric array-like (memory-mapped, dask, zarr, signed, float, (Z, Y, X, 1)) is
    taken as a stack file would be read (`io.as_em_volume`, one grey-value map for the whole volume);
    `VolumeAnalysis.image` and `mean_intensity` are then in those grey values.
    voxel_size_nm: (z, y, x) nm, three positive numbers, or None (unknown).
    """
    from .autoscale import for_objects, prediction_grid
    from .gradcam import energy_inside
    from .instances3d import volume_instances
    from .morphometry3d import ShapeRules3D, classify3d, measure3d, summarize3d
    from .volume_io import warn_blank_slices

    from .io import as_em_volume

    image = as_em_volume(image, name)  # as a stack file is read: any numeric dtype, dask, zarr, ...
    voxel_size_nm = check_voxel_size(voxel_size_nm)
    if image.size and image.min() == image.max():  # a file was refused on reading; an array (napari, API) here
        raise DataError(f"{name}: constant volume (every voxel the same value); nothing to segment")
    if image.size:
        flat = image.reshape(len(image), -1)
        warn_blank_slices(name, np.flatnonzero(flat.min(1) == flat.max(1)))
    s = settings or VolumeSettings()
    ic = resolve_inference(predictor, s.inference)
    voxel = None if voxel_size_nm is None else tuple(float(v) for v in voxel_size_nm)
    check_planes(s.planes, voxel, name)
    t = {}
    t0 = time.perf_counter()
    # Unknown voxel size: the zoom is estimated on the middle slice and applied in-plane (autoscale).
    grid_px, zoom = (None, None) if voxel else prediction_grid(predictor, image[image.shape[0] // 2], ic, None)
    prob, cam = predict_volume(predictor, image, ic, voxel, s.planes, progress=progress, pixel_size_nm=grid_px)
    ic = for_objects(ic, zoom)
    t["predict_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    instances = volume_instances(prob, voxel, ic.threshold, ic.min_volume(voxel), separate=ic.separate)
    t["instances_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = measure3d(instances, voxel, image=image, heatmap=cam)
    table["shape_class"] = classify3d(table, s.rules or ShapeRules3D())
    t["morphometry_s"] = time.perf_counter() - t0
    summary = {"volume": name, "slices": image.shape[0], "height": image.shape[1], "width": image.shape[2],
               **summarize3d(table, image.shape, voxel),
               "voxel_size_z_nm": voxel[0] if voxel else math.nan, "voxel_size_y_nm": voxel[1] if voxel else math.nan,
               "voxel_size_x_nm": voxel[2] if voxel else math.nan, "planes": ",".join(s.planes),
               "auto_zoom": zoom.zoom if zoom is not None else None,
               "gradcam_energy_in_mask": energy_inside(cam, instances > 0) if cam is not None else math.nan}
    if label is not None:
        summary.update(score_volume(prob, instances, label, ic.threshold, ignore_value))
    table.insert(0, "volume", name)
    return VolumeAnalysis(name, image, prob, instances, cam, table, summary, voxel, t)


def volume_meshes(instances: np.ndarray, voxel_size_nm: Sequence[float] | None, step: int = 1,
                  ids: Sequence[int] | None = None) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{id: (vertices (n, 3) z, y, x in nm (voxels when unknown), faces (m, 3))} of each object's surface."""
    from scipy import ndimage as ndi

    from .morphometry3d import object_mesh

    wanted = None if ids is None else set(int(i) for i in ids)
    out = {}
    for i, sl in enumerate(ndi.find_objects(instances), start=1):
        if sl is None or (wanted is not None and i not in wanted):
            continue
        out[i] = object_mesh(instances[sl] == i, voxel_size_nm, offset_vox=tuple(s.start for s in sl), step=step)
    return out


def write_volume_outputs(a: VolumeAnalysis, folder: Path, figure: bool = True, meshes: str | None = None) -> None:
    """Write one volume's files (module docstring) into `folder`, atomically (staging folder, then rename)."""
    import shutil

    from .figure import volume_figure
    from .morphometry3d import write_meshes
    from .runlock import atomic_replace_dir
    from .volume_io import write_volume_tiff

    stage = folder.with_name(f".{folder.name}.partial")
    if stage.exists():
        shutil.rmtree(stage)
    stage.mkdir(parents=True)
    try:
        write_volume_tiff(stage / "probability.tif", a.probability, a.voxel_size_nm)
        write_volume_tiff(stage / "mask.tif", a.mask.astype(np.uint8), a.voxel_size_nm)
        write_volume_tiff(stage / "instances.tif", a.instances, a.voxel_size_nm)
        if a.heatmap is not None:
            write_volume_tiff(stage / "gradcam.tif", a.heatmap, a.voxel_size_nm)
        a.table.to_csv(stage / "objects.csv", index=False)
        if meshes:
            write_meshes(stage / f"meshes.{meshes}", volume_meshes(a.instances, a.voxel_size_nm), meshes)
        if figure:
            volume_figure(a.image, a.instances, a.table, stage / "figure.png", voxel_size_nm=a.voxel_size_nm,
                          title=a.name, summary=a.summary)
        atomic_replace_dir(stage, folder)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------
# Many volumes


def _needed(figure: bool, gradcam: bool = True) -> list[str]:
    return [f for f in VOLUME_FILES if (figure or f != "figure.png") and (gradcam or f != "gradcam.tif")]


def analyze_volumes(inputs: Sequence[str], model=None, out: str | Path = "xmdl_out", labels: str | None = None,
                    settings: VolumeSettings | None = None, overwrite: bool = False, resume: bool = False,
                    ignore_value: int | None = None, verbose: bool = True) -> dict:
    """Analyse each input stack as one volume; returns {"analysed", "skipped", "failed"} as `analyze.analyze`.

    Every input, the label stack, the voxel sizes, the planes, the model and
    the output folder are checked before anything is written; each volume's
    files land atomically and its rows are added to OUT/summary.csv and
    OUT/objects.csv as soon as it is done. Existing results are kept unless
    `overwrite`; `resume` skips volumes already complete. `labels` (one label
    stack) needs exactly one input.
    """
    from .analyze import (SETTINGS_FILE, _previous_rows, _write_tables, check_run_settings, refuse_foreign_result,
                          run_settings, write_run_settings)
    from .morphometry3d import ShapeRules3D
    from .predict import load_model
    from .runlock import FolderLock, finish_replace_dir
    from .volume_io import check_same_grid, open_volume, resolve_voxel_size, source_path

    s = settings or VolumeSettings()
    out = cli.check_out_folder(out)
    if labels is not None and len(inputs) != 1:
        raise cli.UsageError(f"--labels with --volume takes one label stack for one STACK, got {len(inputs)} inputs")
    volumes, failed = [], []
    for spec in inputs:
        try:
            vol = open_volume(spec, kind="image")
            voxel = resolve_voxel_size(vol, s.voxel_size_nm)
            check_planes(s.planes, voxel, spec)
            volumes.append((vol, voxel))
        except DataError as err:
            failed.append((str(spec), cli.one_line(err)))
    if not volumes:
        return {"analysed": [], "skipped": [], "failed": failed}
    names = [v.name for v, _ in volumes]
    for vol, _ in volumes:
        if vol.name in ("", ".", ".."):
            raise cli.UsageError(f"{vol.source}: gives no output name; name the folder or file itself (not '.' "
                                 "or '..')")
        cli.refuse_replacing_input(out / vol.name, source_path(vol.source))
        refuse_foreign_result(out / vol.name)
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"several inputs share the output name(s) {dupes}; analyse them into separate --out folders")
    label_vol = None
    if labels is not None:
        label_vol = open_volume(labels, kind="label")
        check_same_grid(volumes[0][0], label_vol)
    predictor = load_model(model) if model is None or isinstance(model, (str, Path)) else model
    ic = resolve_inference(predictor, s.inference)  # invalid overrides fail here, before any output

    with FolderLock(out, "analysis"):
        for vol, _ in volumes:  # a run killed between the two renames of atomic_replace_dir: keep its result
            finish_replace_dir(out / vol.name)
        rows, objects = _previous_rows(out, key="volume")
        need = _needed(s.figure)
        complete = {n for n in rows if all((out / n / f).is_file() for f in need)}
        if not (overwrite or resume):
            clash = [out / n for n in ("summary.csv", "objects.csv") if (out / n).exists()]
            clash += [out / v.name for v, _ in volumes if (out / v.name).exists()]
            if clash:
                raise FileExistsError(f"{clash[0]} exists (and {len(clash) - 1} more outputs); use --resume to "
                                      "continue an interrupted batch, --overwrite to replace, or another --out")
        mine = run_settings(predictor, ic, planes=list(s.planes), rules=s.rules or ShapeRules3D())
        check_run_settings(out, mine, resume, overwrite, sorted(set(rows) - set(names)))
        todo = [(v, vx) for v, vx in volumes if overwrite or v.name not in complete]
        skipped = [v.name for v, _ in volumes if v.name in complete and not overwrite]
        if verbose and skipped:
            print(f"--resume: {len(skipped)} volume(s) already done, {len(todo)} to go", flush=True)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        write_run_settings(out, mine)
        done = []
        for k, (vol, voxel) in enumerate(todo):
            try:
                t0 = time.time()
                image = vol.image_slab(0, len(vol))
                label = label_vol.label_slab(0, len(label_vol)) if label_vol is not None else None
                if verbose:
                    size = " x ".join(str(n) for n in vol.shape)
                    unit = (f"voxel {' x '.join(f'{v:g}' for v in voxel)} nm" if voxel else
                            "voxel size unknown: measurements in voxels (give --voxel-size Z Y X)"
                            + (f"; {vol.voxel_note}" if vol.voxel_note else ""))
                    print(f"[{k + 1}/{len(todo)}] {vol.name}  {size} (z, y, x), {unit}", flush=True)
                a = analyze_volume(predictor, image, vol.name, s, voxel, label, ignore_value,
                                   progress=_progress_printer() if verbose else None)
                write_volume_outputs(a, out / vol.name, s.figure, s.meshes)
                rows[vol.name] = a.summary
                objects[vol.name] = a.table
                _write_tables(out, rows, objects, [v.name for v, _ in volumes], key="volume")
                done.append(vol.name)
                if verbose:
                    extra = (f", AP50 {a.summary['ap50']:.3f}, 3-D F1 {a.summary['f1']:.3f}" if label is not None
                             else "")
                    print(f"    {cli.mitochondria(a.summary['count'])} in 3-D{extra} -> {out / vol.name} "
                          f"({time.time() - t0:.0f} s)", flush=True)
            except (DataError, ValueError) as err:
                failed.append((vol.source, cli.one_line(err)))
                print(f"    skipped {vol.name}: {cli.one_line(err)}", file=sys.stderr, flush=True)
        if created and not any(p.name != SETTINGS_FILE for p in out.iterdir()):
            (out / SETTINGS_FILE).unlink(missing_ok=True)
            out.rmdir()  # every volume failed: leave no empty folder behind
    return {"analysed": done, "skipped": skipped, "failed": failed}


def _progress_printer() -> Callable[[str, int, int], None]:
    """Progress bar per plane (keras Progbar: one line, updated in place)."""
    from keras.utils import Progbar

    bars: dict[str, Progbar] = {}

    def update(plane: str, done: int, total: int) -> None:
        if plane not in bars:
            print(f"    predicting {plane.upper()} planes", flush=True)
            bars[plane] = Progbar(total, unit_name="slice")
        bars[plane].update(done)

    return update


# ----------------------------------------------------------------------------
# `python -m xmdl_tf.volume`: volumes bigger than memory, in chunks on Dask


@cli.guarded(resume_flag=True)
def main(argv: list[str] | None = None) -> int:
    from .distributed import DEFAULT_CHUNKS, DEFAULT_HALO, process_volume

    p = cli.parser("python -m xmdl_tf.volume",
                   "Segment, separate and measure the mitochondria of a volume of any size, in chunks on Dask; "
                   "writes OME-Zarr (probability, labels/instances) with objects.csv and summary.json.")
    p.add_argument("input", help="OME-Zarr / Zarr array, file.h5:/dataset, TIFF stack or folder of slices")
    p.add_argument("--out", required=True, help="output OME-Zarr folder (NAME.zarr)")
    p.add_argument("--model", default=None, help="run folder, .keras file or built-in name (default: $XMDL_MODEL, else "
                   "the built-in xmdl_ref)")
    p.add_argument("--scheduler", default="local",
                   help="'local' starts a Dask LocalCluster here; else a scheduler address (tcp://host:8786)")
    p.add_argument("--workers", type=cli.positive_int, default=2, help="worker processes of the local cluster")
    p.add_argument("--chunks", type=cli.positive_int, nargs=3, metavar=("Z", "Y", "X"), default=DEFAULT_CHUNKS,
                   help="chunk size in voxels")
    p.add_argument("--halo", type=cli.nonnegative_int, default=DEFAULT_HALO,
                   help="context around each chunk in y and x, px (the tiled inference's overlap)")
    p.add_argument("--voxel-size", type=cli.voxel_size, nargs=3, metavar=("Z", "Y", "X"), default=None,
                   help="voxel size in nm when the metadata does not say")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: skip chunks already written")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT.zarr")
    cli.add_inference_args(p, explain=False)
    args = p.parse_args(argv)
    if args.resume and args.overwrite:
        p.error("--resume and --overwrite exclude each other")
    cli.inference_from_args(args, InferenceConfig())
    process_volume(args.input, args.out, args.model, scheduler=args.scheduler, workers=args.workers,
                   chunks=args.chunks, voxel_size_nm=args.voxel_size, inference=cli.inference_overrides(args),
                   halo=args.halo, resume=args.resume, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    sys.exit(main())
