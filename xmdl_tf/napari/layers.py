"""The plain functions behind the napari widgets; scripts and tests call them directly.

Segmenting a layer (`segment_layer`) is two steps, so that a widget can run
the first in a worker thread and the second in the GUI thread:

1. `segment_array(image, ...)` -> `Segmentation`: a 2-D slice through
   `analyze.analyze_image` (probability, instances, Grad-CAM, uncertainty,
   morphometry table) or a (Z, Y, X) stack through `volume.analyze_volume`
   (3-D instances and measurements). No viewer is touched; `progress(done,
   total)` is called per tile (2-D) or per slice (3-D), and a set `cancel`
   event raises `Cancelled` at the next of those points.
2. `show_segmentation(viewer, seg, image_layer)` adds (or updates) the
   layers: probability, instances (Labels coloured by shape class),
   Grad-CAM (inferno, additive) and, in 2-D, uncertainty.

A stack of any size goes the chunked way instead (`segment_chunked`): Dask
workers read it from its file and write an OME-Zarr (`distributed.py`);
`show_preview` shows its probability as chunks land, and the final layers
read the store lazily. Nothing is held whole in the viewer.

Fine-tuning on corrections: every instances layer made here keeps a copy of
the segmentation it started from (`EditTracker`, in the layer's metadata)
and records the pixels a brush touched. `collect_corrections(viewer)` turns
each edited slice into a sparse label (edited pixels 1 / 0, everything else
`IGNORE_VALUE`), and `finetune_from_corrections` trains the model on exactly
those through `train.train` (the `python -m xmdl_tf.finetune` recipe;
`DataConfig.ignore_value` keeps unedited pixels out of the loss), so the new
model's `config.json` records its parent (lineage). A labels layer the user
drew from scratch (or opened) over an image layer of its shape is learnt from
too (`drawn_annotations`): each plane with a label counts as fully annotated.
`finetune_on_layers` does all of it and re-segments the corrected layers and
annotated images with the new model.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from ..distributed import DEFAULT_CHUNKS, Cancelled  # one exception for every cancellable job
from ..io import DataError

log = logging.getLogger(__name__)

IGNORE_VALUE = 255  # label value of pixels the user did not edit (ignored by the loss)
MODES = ("slice", "volume", "chunked")
# A whole-stack run holds the volume and its results in memory (about 15 bytes per
# voxel, `volume.py`); beyond this a stack read from a file goes the chunked way.
MAX_VOLUME_VOXELS = 512 * 1024 * 1024
Progress = Callable[[int, int], None]


# ----------------------------------------------------------------------------
# Models


def import_tensorflow() -> None:
    """Import TensorFlow so that it cannot collide with the LLVM inside Mesa's OpenGL driver.

    TensorFlow's wheels export their own copy of LLVM's symbols and load with
    RTLD_GLOBAL. Once napari has drawn with Mesa (llvmpipe, radeonsi, iris...:
    they link libLLVM), a plain `import tensorflow` binds TensorFlow's LLVM
    to Mesa's and crashes. With RTLD_DEEPBIND TensorFlow resolves its own
    symbols first. Nothing to do when TensorFlow is loaded already or no
    libLLVM is mapped (a TensorFlow imported before the first OpenGL context
    can still crash when the process exits: open the viewer first).
    """
    if "tensorflow" in sys.modules or not sys.platform.startswith("linux") or not _llvm_mapped():
        return
    flags = sys.getdlopenflags()
    sys.setdlopenflags(flags | os.RTLD_DEEPBIND)
    try:
        import tensorflow  # noqa: F401
    finally:
        sys.setdlopenflags(flags)


def _llvm_mapped() -> bool:
    try:
        with open("/proc/self/maps") as f:
            return any("libLLVM" in line for line in f)
    except OSError:
        return False


_PREDICTORS: dict[tuple[str, float], Any] = {}
_PREDICTORS_LOCK = threading.Lock()


def model_path(model: str | Path | None) -> Path:
    """`model`, or the shipped reference model when None (FileNotFoundError when none is installed)."""
    if model is not None and str(model).strip():
        from ..pretrained import resolve_model_spec

        return resolve_model_spec(str(Path(model).expanduser()))
    from ..pretrained import default_model_path

    found = default_model_path()
    if found is None:
        raise FileNotFoundError("no default model is installed (built-in 'xmdl_ref' missing, $XMDL_MODEL unset); choose a model")
    return found


def get_predictor(model: str | Path | None):
    """A loaded `predict.Predictor` for `model` (run folder, .keras or SavedModel), cached while unchanged."""
    import_tensorflow()
    from ..predict import load_model

    path = model_path(model).resolve()
    key = (str(path), path.stat().st_mtime if path.exists() else 0.0)
    with _PREDICTORS_LOCK:
        if key not in _PREDICTORS:
            for old in [k for k in _PREDICTORS if k[0] == key[0]]:
                del _PREDICTORS[old]
            _PREDICTORS[key] = load_model(path)
        return _PREDICTORS[key]


# ----------------------------------------------------------------------------
# Segmenting


@dataclass(frozen=True)
class SegmentSettings:
    """What the "Segment mitochondria" widget asks; None leaves the model's own inference setting.

    model: run folder, .keras file or SavedModel export (None: the shipped model).
    mode: "slice" (the current 2-D slice), "volume" (the whole stack in 3-D,
    in memory) or "chunked" (the whole stack in 3-D through
    `distributed.process_volume`: Dask workers read the stack's file chunk
    by chunk and write an OME-Zarr, which the layers show lazily; nothing
    is held whole, so any size works). "volume" on a stack of more than
    MAX_VOLUME_VOXELS read from a file goes the chunked way.
    out: the chunked run's OME-Zarr (None: `<stack>.xmdl.zarr` beside the
    stack's file; an unfinished run there with the same settings continues).
    workers, chunks: the chunked run's local Dask worker processes and chunk
    size (z, y, x) in voxels; scheduler: "local" (a LocalCluster of `workers`
    processes) or the address of a running Dask scheduler (tcp://host:8786).
    pixel_size_nm: in-plane pixel size (None: from the layer, else unknown).
    z_size_nm: section thickness for "volume" (None: from the layer, else unknown).
    min_area_nm2 / min_size_px: smallest 2-D object kept (nm^2 when the pixel
    size is known, else px); min_volume_nm3 / min_volume_vox in 3-D.
    """

    model: str | Path | None = None
    mode: str = "slice"
    pixel_size_nm: float | None = None
    z_size_nm: float | None = None
    tta: bool | None = None
    threshold: float | None = None
    min_area_nm2: float | None = None
    min_size_px: int | None = None
    min_volume_nm3: float | None = None
    min_volume_vox: int | None = None
    separate: bool | None = None
    out: str | Path | None = None
    workers: int = 1
    chunks: tuple[int, int, int] = DEFAULT_CHUNKS
    scheduler: str = "local"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")

    @property
    def voxel_size_nm(self) -> tuple[float, float, float] | None:
        """(z, y, x) in nm when both the pixel size and the z step are known, else None."""
        px = self.pixel_size_nm or None
        return (float(self.z_size_nm), float(px), float(px)) if px and self.z_size_nm else None

    def inference(self) -> dict:
        """Overrides of the model's `InferenceConfig` (the fields given)."""
        keys = ("tta", "threshold", "min_area_nm2", "min_size_px", "min_volume_nm3", "min_volume_vox", "separate")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class Segmentation:
    """One run's results; arrays are (H, W) for a slice, (Z, Y, X) for a volume.

    z: the slice of a stack that was segmented (None for a 2-D image or a volume).
    image: what was analysed (uint8/uint16), kept for fine-tuning on corrections
    (None for a chunked run).
    store: the OME-Zarr of a chunked run; probability and instances are then
    lazy dask arrays read from it (probability as its pyramid, a list of levels).
    """

    name: str
    mode: str
    image: np.ndarray
    probability: np.ndarray
    instances: np.ndarray
    heatmap: np.ndarray | None
    uncertainty: np.ndarray | None
    table: Any
    summary: dict
    model: Path
    settings: SegmentSettings
    pixel_size_nm: float | None = None
    voxel_size_nm: tuple[float, float, float] | None = None
    z: int | None = None
    store: Path | None = None


def as_em_image(array: Any) -> np.ndarray:
    """A slice or stack (any numeric dtype, NumPy or dask) as uint8/uint16 the model reads, by the rule
    files are read with (`io.to_em_dtype`: integers in 0..65535 keep their values, signed ones are
    shifted, floats are mapped linearly onto 0..65535; the percentile normalisation sees neither)."""
    from ..io import to_em_dtype

    return to_em_dtype(np.asarray(array), "layer")


def _checker(progress: Progress | None, cancel: threading.Event | None, total: int) -> Callable[[int], None]:
    """A per-step callback: counts steps, reports them, raises Cancelled once `cancel` is set."""
    done = [0]

    def step(n: int = 1) -> None:
        done[0] += n
        if progress is not None:
            progress(min(done[0], total), total)
        if cancel is not None and cancel.is_set():
            raise Cancelled("cancelled")

    return step


def segment_array(image: Any, settings: SegmentSettings | None = None, name: str = "image",
                  progress: Progress | None = None, cancel: threading.Event | None = None,
                  z: int | None = None) -> Segmentation:
    """Segment a 2-D slice (H, W) or, with settings.mode "volume", a stack (Z, Y, X).

    image: any numeric array (NumPy or dask; a dask slice is read here).
    Pixel size (nm) from settings.pixel_size_nm, voxel size (z, y, x) from
    settings.z_size_nm and the pixel size; None means measurements in
    pixels / voxels and no resampling to the model's pixel size.
    progress(done, total) per tile (2-D) or slice (3-D); a set `cancel`
    raises Cancelled at the next of those steps.
    """
    import_tensorflow()
    from ..analyze import Settings, analyze_image
    from ..config import resolve_inference

    s = settings or SegmentSettings()
    ndim = len(np.shape(image))
    if s.mode == "chunked":
        raise ValueError("a chunked run reads the stack from its file: use segment_chunked(source, ...)")
    if s.mode == "volume" and ndim != 3:
        raise ValueError(f"'whole stack as a volume' needs a (Z, Y, X) stack; this layer is {ndim}-D")
    if s.mode == "slice" and ndim != 2:
        raise ValueError(f"expected one 2-D slice, got a {ndim}-D array")
    if s.mode == "volume" and int(np.prod(np.shape(image))) > MAX_VOLUME_VOXELS:
        raise MemoryError(f"the stack has {int(np.prod(np.shape(image))):,} voxels, more than this widget holds "
                          f"in memory ({MAX_VOLUME_VOXELS:,}); save it as OME-Zarr or TIFF, open that file and "
                          "segment it in chunks (or run `python -m xmdl_tf.volume` on the file)")
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")
    path = model_path(s.model)
    predictor = get_predictor(path)
    overrides = s.inference()
    ic = resolve_inference(predictor, overrides)
    arr = as_em_image(image)
    px = s.pixel_size_nm or None
    if s.mode == "volume":
        from ..volume import VolumeSettings, analyze_volume

        voxel = s.voxel_size_nm
        step = _checker(progress, cancel, arr.shape[0])
        a = analyze_volume(predictor, arr, name, VolumeSettings(inference=overrides, figure=False), voxel,
                           progress=lambda plane, done, total: step(1))
        return Segmentation(name, "volume", arr, a.probability, a.instances, a.heatmap, None, a.table, a.summary,
                            path, s, px, voxel, None)
    from ..tiling import plan_tiles

    factor = predictor.scale_factor(px, ic.rescale)
    scaled = tuple(max(1, round(n * factor)) for n in arr.shape)
    total = len(plan_tiles(scaled, predictor.tile_for(ic.tile), ic.overlap, predictor.size_divisor)[2])
    step = _checker(progress, cancel, total)
    a = analyze_image(predictor, arr, name, Settings(inference=overrides, figure=False), pixel_size_nm=px,
                      progress=step)
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")
    return Segmentation(name, "slice", arr, a.probability, a.instances, a.heatmap, a.uncertainty, a.table, a.summary,
                        path, s, px, None, z)


def layer_source(layer) -> str | None:
    """The file a layer was read from (what `volume_io.open_volume` takes), None for arrays made in memory."""
    spec = (layer.metadata or {}).get("source") or getattr(getattr(layer, "source", None), "path", None)
    return str(spec) if spec else None


def chunked_store(source: str, out: str | Path | None = None) -> Path:
    """Where a chunked run of `source` writes its OME-Zarr: `out`, else `<stack>.xmdl.zarr` beside the file."""
    if out is not None and str(out).strip():
        return Path(out).expanduser()
    from ..volume_io import _split_container

    f = Path(_split_container(source)[0] or source)
    stem = f.name[: -len(f.suffix)] if f.suffix else f.name
    return f.with_name(f"{stem}.xmdl.zarr")


def resolve_mode(layer, settings: SegmentSettings) -> SegmentSettings:
    """`settings` with "volume" turned "chunked" for a stack too big to hold, read from a file.

    ValueError for a chunked run of a layer not read from a file, or of a 2-D image.
    """
    from dataclasses import replace

    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    big = int(np.prod(data.shape[-3:])) > MAX_VOLUME_VOXELS
    source = layer_source(layer)
    if settings.mode == "volume" and big and source:
        log.info("%s: %s voxels, more than a whole-stack run holds in memory: segmenting it in chunks",
                 layer.name, f"{int(np.prod(data.shape[-3:])):,}")
        settings = replace(settings, mode="chunked")
    if settings.mode == "chunked":
        if data.ndim < 3:
            raise ValueError(f"{layer.name} is a single 2-D image; a chunked run needs a stack")
        if not source:
            raise ValueError(f"{layer.name} was not read from a file; the chunked run reads the stack from its "
                             "file: save it as OME-Zarr or TIFF and open that")
    return settings


def segment_chunked(source: str, settings: SegmentSettings | None = None, name: str = "image",
                    progress: Progress | None = None, cancel: threading.Event | None = None,
                    preview: Callable[[Path], None] | None = None) -> Segmentation:
    """Segment a stack in 3-D chunk by chunk on Dask, straight from its file (never held whole).

    source: an `open_volume` spec (OME-Zarr / Zarr, N5, `file.h5:/path`,
    TIFF stack). Runs `distributed.process_volume` on a LocalCluster of
    settings.workers processes (TensorFlow only there, not in the viewer)
    into `chunked_store(source, settings.out)`; an unfinished run there with
    the same settings is continued, one with other settings is an error.
    progress(done, total) per task of each stage (the count restarts with
    each stage); preview(store) after each chunk of probability is written,
    so a layer reading the store can show it grow; a set `cancel` stops at
    the next finished task (Cancelled; calling again continues).
    """
    from ..distributed import process_volume

    s = settings or SegmentSettings(mode="chunked")
    out = chunked_store(source, s.out)
    path = model_path(s.model)

    def report(stage: str, done: int, total: int) -> None:
        if progress is not None:
            progress(done, total)
        if preview is not None and stage == "probability" and done:
            preview(out)

    resume = (out / ".xmdl" / "state.json").is_file()
    try:
        summary = process_volume(source, out, path, scheduler=s.scheduler, workers=s.workers, chunks=s.chunks,
                                 voxel_size_nm=s.voxel_size_nm, inference=s.inference(), resume=resume,
                                 verbose=False, progress=report, cancel=cancel)
    except DataError as err:
        if "was started with other settings" not in str(err):
            raise
        # Said in the widget's terms: it continues a run of the same settings, never deletes one.
        what = str(err).split("(", 1)[1].split(")", 1)[0]
        raise DataError(f"{out} holds a run with other settings ({what}); type another output store in the "
                        "form, or delete that folder to start again") from None
    return open_chunked(out, name, path, s, summary)


def _levels(group: Path) -> list:
    """The zarr arrays 0, 1, ... of an OME-Zarr image (its pyramid), opened read-only."""
    import zarr

    n = 0
    while (group / str(n)).is_dir():
        n += 1
    return [zarr.open_array(str(group / str(i)), mode="r") for i in range(n)]


def open_chunked(store: str | Path, name: str, model: Path, settings: SegmentSettings,
                 summary: dict | None = None) -> Segmentation:
    """A finished chunked run (`distributed.process_volume`'s OME-Zarr) as a Segmentation of lazy arrays.

    probability and instances are lists of zarr arrays (pyramid levels,
    read on demand by napari), the table is objects.csv.
    """
    import pandas as pd

    store = Path(store)
    summary = summary or json.loads((store / "summary.json").read_text())
    voxel = tuple(float(v) for v in summary["voxel_size_nm"]) if summary.get("voxel_size_nm") else None
    table = pd.read_csv(store / "objects.csv")
    return Segmentation(name, "volume", None, _levels(store), _levels(store / "labels" / "instances"), None, None,
                        table, summary, model, settings, voxel[2] if voxel else None, voxel, None, store)


def show_preview(viewer, name: str, store: str | Path, image_layer=None):
    """Show (or refresh) the probability a running chunked run has written so far; call from the GUI thread.

    The layer reads the store's full-resolution array directly (zarr, no
    cache), so a refresh shows each newly written chunk.
    """
    import zarr

    store = Path(store)
    layer_name = result_names(name)["probability"]
    if layer_name in viewer.layers and viewer.layers[layer_name].metadata.get("xmdl_store") == str(store):
        viewer.layers[layer_name].refresh()
        return viewer.layers[layer_name]
    kw, _ = _placement("volume", None, None, image_layer)
    data = zarr.open_array(str(store / "0"), mode="r")
    return _put(viewer, "image", layer_name, data, colormap="viridis", contrast_limits=(0.0, 1.0),
                metadata={"xmdl_store": str(store)}, **kw)


def current_slice(viewer, layer) -> int | None:
    """Index of the slice of a (Z, Y, X) layer shown in the viewer (None for a 2-D layer)."""
    if layer.ndim < 3:
        return None
    point = np.asarray(viewer.dims.point)[-layer.ndim:]
    data = np.asarray(layer.world_to_data(point))
    return int(np.clip(round(float(data[-3])), 0, layer.data.shape[-3] - 1))


def layer_input(viewer, layer, mode: str) -> tuple[Any, int | None]:
    """(array to segment, slice index) of an image layer: its current slice, or the whole stack.

    A multiscale layer gives its full-resolution level; only the slice is read for "slice".
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    if getattr(layer, "rgb", False):
        raise ValueError(f"{layer.name}: an RGB layer; convert it to grayscale first")
    if data.ndim > 3:
        lead = [int(round(float(v))) for v in np.asarray(layer.world_to_data(
            np.asarray(viewer.dims.point)[-layer.ndim:]))[: data.ndim - 3]]
        data = data[tuple(lead)]
    if data.ndim == 2:
        if mode == "volume":
            raise ValueError(f"{layer.name} is a single 2-D image; 'whole stack as a volume' needs a stack")
        return data, None
    if mode == "volume":
        return data, None
    z = current_slice(viewer, layer)
    return data[z], z


def segment_layer(viewer, layer, settings: SegmentSettings | None = None, progress: Progress | None = None,
                  cancel: threading.Event | None = None, **overrides) -> dict:
    """Segment an image layer (its current slice, or the whole stack, in memory or in chunks) and add the results.

    settings: a SegmentSettings; keyword `overrides` replace its fields
    (e.g. `segment_layer(viewer, layer, threshold=0.4, mode="volume")`).
    Pixel / voxel size default to the layer's (metadata, or its nm scale).
    Returns {"segmentation", "probability", "instances", "gradcam", "uncertainty", "table"}.
    """
    from dataclasses import replace

    s = replace(settings or SegmentSettings(), **overrides)
    s = resolve_mode(layer, with_layer_scale(s, layer))
    if s.mode == "chunked":
        seg = segment_chunked(layer_source(layer), s, layer.name, progress, cancel)
    else:
        data, z = layer_input(viewer, layer, s.mode)
        seg = segment_array(data, s, layer.name, progress, cancel, z)
    layers = show_segmentation(viewer, seg, layer)
    return {"segmentation": seg, **layers, "table": seg.table}


def with_layer_scale(settings: SegmentSettings, layer) -> SegmentSettings:
    """`settings` with the pixel size (and section thickness) filled in from the layer where not given."""
    from dataclasses import replace

    from ._reader import pixel_size_of, voxel_size_of

    px = settings.pixel_size_nm or pixel_size_of(layer)
    zs = settings.z_size_nm
    if zs is None and layer.ndim >= 3:
        voxel = voxel_size_of(layer)
        zs = voxel[0] if voxel else None
    return replace(settings, pixel_size_nm=px, z_size_nm=zs)


# ----------------------------------------------------------------------------
# Showing


def class_colors(table: Any, mode: str = "slice") -> dict:
    """{id: colour} of each object's shape class (`figure.CLASS_COLORS`, `_3D` for volumes);
    0 and ids not in the table (newly painted ones) are transparent and white."""
    from ..figure import CLASS_COLORS, CLASS_COLORS_3D

    palette = CLASS_COLORS_3D if mode == "volume" else CLASS_COLORS
    colors: dict = {None: "white", 0: "transparent"}
    if table is not None and len(table):
        for i, c in zip(table["id"].astype(int), table["shape_class"]):
            colors[int(i)] = palette.get(str(c), "white")
    return colors


def class_counts(table: Any, mode: str = "slice") -> dict[str, int]:
    """{shape class: count} in the palette's order (every class, zeros included)."""
    from ..figure import CLASS_COLORS, CLASS_COLORS_3D

    palette = CLASS_COLORS_3D if mode == "volume" else CLASS_COLORS
    found = table["shape_class"].value_counts() if table is not None and len(table) else {}
    return {c: int(found.get(c, 0)) for c in palette}


def result_names(name: str, z: int | None = None) -> dict[str, str]:
    """Layer names of the results for image `name` (slice `z` of it, if one): one set per image
    and slice, so reruns replace them."""
    where = f" z={z}" if z is not None else ""
    return {k: f"{name}{where} {k}" for k in ("probability", "instances", "gradcam", "uncertainty")}


def _placement(mode: str, z: int | None, pixel_size_nm: float | None, image_layer
               ) -> tuple[dict, Callable[[np.ndarray], np.ndarray]]:
    """Layer kwargs (scale, translate, units) putting results of a `mode` run (slice `z`) over the
    image, and the array reshaper. A slice of a stack becomes a (1, Y, X) layer at its z, so it
    shows on that slice only.
    """
    if image_layer is None:
        kw = {"scale": (pixel_size_nm, pixel_size_nm), "units": ("nm", "nm")} if pixel_size_nm else {}
        return kw, lambda a: a
    nd = 3 if mode == "volume" or z is not None else 2
    scale = tuple(float(v) for v in image_layer.scale[-nd:])
    translate = [float(v) for v in image_layer.translate[-nd:]]
    kw = {"scale": scale, "units": tuple(str(u) for u in image_layer.units[-nd:])}
    if z is not None:
        translate[0] += z * scale[0]
        kw["translate"] = tuple(translate)
        return kw, lambda a: a[None]
    kw["translate"] = tuple(translate)
    return kw, lambda a: a


def _put(viewer, kind: str, name: str, data, **kwargs):
    """Update the layer called `name` in place when it is of this kind, else add a new one.

    A list of arrays (pyramid levels) always makes a new multiscale layer (napari cannot switch
    a layer between single- and multiscale in place).
    """
    if isinstance(data, list):
        if name in viewer.layers:
            viewer.layers.remove(name)
        return getattr(viewer, f"add_{kind}")(data if len(data) > 1 else data[0], name=name,
                                              multiscale=len(data) > 1, **kwargs)
    old = viewer.layers[name] if name in viewer.layers else None
    if old is not None and type(old).__name__.lower() == kind and old.ndim == np.ndim(data):
        layer = old
        for key in ("scale", "translate"):
            if key in kwargs:
                setattr(layer, key, kwargs[key])
        layer.data = data
        if "colormap" in kwargs:
            layer.colormap = kwargs["colormap"]
        if "metadata" in kwargs:
            layer.metadata.update(kwargs["metadata"])
        return layer
    if name in viewer.layers:
        viewer.layers.remove(name)
    return getattr(viewer, f"add_{kind}")(data, name=name, **kwargs)


def show_segmentation(viewer, seg: Segmentation, image_layer=None, keep_edits: bool = True) -> dict:
    """Add (or update) the result layers of `seg` over `image_layer`; returns them by kind.

    probability (image, viridis, hidden), instances (Labels coloured by shape
    class, tracked for corrections), gradcam (inferno, additive, hidden) and
    uncertainty (2-D only, hidden). Call from the GUI thread. keep_edits: an instances layer the
    user corrected is kept (renamed, `keep_corrections`) rather than replaced; off when the new
    result comes from a model fine-tuned on those very corrections. A layer of that name not made
    here (drawn or opened by the user) is always kept.
    """
    from napari.utils.colormaps import DirectLabelColormap

    names = result_names(seg.name, seg.z)
    kw, shaped = _placement(seg.mode, seg.z, seg.pixel_size_nm, image_layer)
    out: dict[str, Any] = {"uncertainty": None, "gradcam": None}
    if seg.store is not None:  # a chunked run: lazy pyramids read from its OME-Zarr
        return _show_store(viewer, seg, names, kw, out)
    out["probability"] = _put(viewer, "image", names["probability"], shaped(seg.probability), colormap="viridis",
                              contrast_limits=(0.0, 1.0), visible=False, **kw)
    if seg.heatmap is not None:
        out["gradcam"] = _put(viewer, "image", names["gradcam"], shaped(seg.heatmap), colormap="inferno",
                              blending="additive", contrast_limits=(0.0, 1.0), opacity=0.7, visible=False, **kw)
    if seg.uncertainty is not None:
        out["uncertainty"] = _put(viewer, "image", names["uncertainty"], shaped(seg.uncertainty), colormap="magma",
                                  blending="additive", contrast_limits=(0.0, 1.0), visible=False, **kw)
    instances = shaped(seg.instances)
    kept = keep_corrections(viewer, names["instances"], edits=keep_edits)
    if kept:
        out["kept_corrections"] = kept
    meta = {"xmdl": {"model": str(seg.model), "mode": seg.mode, "image": seg.name, "z": seg.z,
                     "pixel_size_nm": seg.pixel_size_nm, "voxel_size_nm": seg.voxel_size_nm}}
    labels = _put(viewer, "labels", names["instances"], instances,
                  colormap=DirectLabelColormap(color_dict=class_colors(seg.table, seg.mode)), opacity=0.6,
                  metadata=meta, **kw)
    EditTracker.attach(labels, seg)
    out["instances"] = labels
    return out


def keep_corrections(viewer, name: str, edits: bool = True) -> str | None:
    """Before a new result replaces the layer `name`: if the user corrected it by hand (edits), or
    it is not a result of ours at all (a layer the user drew or opened under that name), rename it
    (`<name> (corrected N)`, `<name> (kept N)`) so it survives beside the new result; return the
    new name, or None when there was nothing to keep."""
    if name not in viewer.layers:
        return None
    layer = viewer.layers[name]
    tracker = EditTracker.of(layer)
    if tracker is None:
        if "xmdl" in (getattr(layer, "metadata", None) or {}):  # an untracked result of ours (chunked)
            return None
        tag = "kept"
    else:
        if not edits:
            return None
        try:
            if not tracker.edited().any():
                return None
        except ValueError:  # its data was replaced by another shape: the user's, keep it
            pass
        tag = "corrected"
    n = 1
    while f"{name} ({tag} {n})" in viewer.layers:
        n += 1
    layer.name = f"{name} ({tag} {n})"
    return layer.name


def _show_store(viewer, seg: Segmentation, names: dict, kw: dict, out: dict) -> dict:
    """Layers of a chunked run: probability and instances as multiscale layers over its OME-Zarr.

    The instances layer is read-only (painting would write into the run's
    output); to correct and fine-tune, segment single slices.
    """
    from napari.utils.colormaps import DirectLabelColormap

    meta = {"xmdl": {"model": str(seg.model), "mode": seg.mode, "image": seg.name, "z": None,
                     "pixel_size_nm": seg.pixel_size_nm, "voxel_size_nm": seg.voxel_size_nm,
                     "store": str(seg.store)}}
    out["probability"] = _put(viewer, "image", names["probability"], list(seg.probability), colormap="viridis",
                              contrast_limits=(0.0, 1.0), visible=False, metadata={"xmdl_store": str(seg.store)},
                              **kw)
    kept = keep_corrections(viewer, names["instances"])
    if kept:
        out["kept_corrections"] = kept
    labels = _put(viewer, "labels", names["instances"], list(seg.instances), opacity=0.6, metadata=meta,
                  colormap=DirectLabelColormap(color_dict=class_colors(seg.table, seg.mode)), **kw)
    labels.editable = False
    out["instances"] = labels
    return out


# ----------------------------------------------------------------------------
# Corrections


class EditTracker:
    """Which pixels of an instances layer the user changed since it was segmented.

    Keeps a copy of the segmentation and marks the pixels of every paint,
    erase or fill event (`Labels.events.paint`); edited = changed against the
    copy, or touched by a brush (painting an object's own id over it confirms
    those pixels). Stored in the layer's metadata["xmdl_tracker"].
    """

    def __init__(self, layer, seg: Segmentation):
        self.layer, self.seg = layer, seg
        self.original = np.array(layer.data, copy=True)
        self.touched = np.zeros(self.original.shape, bool)
        layer.events.paint.connect(self._on_paint)

    @classmethod
    def attach(cls, layer, seg: Segmentation) -> "EditTracker":
        old = layer.metadata.get("xmdl_tracker")
        if old is not None:
            layer.events.paint.disconnect(old._on_paint)
        tracker = cls(layer, seg)
        layer.metadata["xmdl_tracker"] = tracker
        return tracker

    @staticmethod
    def of(layer) -> "EditTracker | None":
        return (getattr(layer, "metadata", None) or {}).get("xmdl_tracker")

    def _on_paint(self, event) -> None:
        for atom in event.value or ():
            try:
                if hasattr(atom, "slice_key"):  # napari >= 0.6: masked edit of a bounding box
                    region = self.touched[atom.slice_key]
                    if atom.mask is None:
                        region[...] = True
                    else:
                        region[np.asarray(atom.mask, bool)] = True
                elif isinstance(atom, tuple) and len(atom) == 3:  # (indices, old values, new values)
                    self.touched[atom[0]] = True
            except (IndexError, TypeError, ValueError):  # a history format we do not know: the diff still counts
                log.debug("unrecognised paint event atom %r", type(atom))

    def edited(self) -> np.ndarray:
        """bool array of the layer's shape: pixels changed or touched by a brush."""
        data = np.asarray(self.layer.data)
        if data.shape != self.original.shape:
            raise ValueError(f"{self.layer.name}: its shape changed since it was segmented")
        return (data != self.original) | self.touched


@dataclass
class Correction:
    """One corrected slice: image (H, W) uint8/uint16, sparse label (H, W) uint8
    (1 mitochondrion, 0 background, IGNORE_VALUE not edited), its pixel size (nm)."""

    name: str
    image: np.ndarray
    label: np.ndarray
    pixel_size_nm: float | None = None

    @property
    def n_edited(self) -> int:
        return int(np.count_nonzero(self.label != IGNORE_VALUE))


def correction_label(edited_labels: np.ndarray, edited: np.ndarray, ignore_value: int = IGNORE_VALUE) -> np.ndarray:
    """Sparse training label of a slice: 1 where an edited pixel is foreground, 0 where it is
    background, `ignore_value` where the user did not edit. All arrays (H, W)."""
    out = np.full(edited_labels.shape, ignore_value, np.uint8)
    out[edited] = (edited_labels[edited] > 0).astype(np.uint8)
    return out


def corrections_of(layer) -> list[Correction]:
    """The edited slices of one tracked instances layer (empty when untouched or untracked)."""
    tracker = EditTracker.of(layer)
    if tracker is None:
        return []
    edited = tracker.edited()
    data = np.asarray(layer.data)
    seg = tracker.seg
    if edited.ndim == 2:
        edited, data, image = edited[None], data[None], seg.image[None]
    elif seg.mode == "slice":  # a (1, Y, X) slice of a stack
        image = seg.image[None]
    else:
        image = seg.image
    out = []
    for k in np.flatnonzero(edited.reshape(len(edited), -1).any(axis=1)):
        z = seg.z if seg.z is not None else (int(k) if seg.mode == "volume" else None)
        name = f"{seg.name}_z{z:04d}" if z is not None else seg.name
        out.append(Correction(name, image[k], correction_label(data[k], edited[k]), seg.pixel_size_nm))
    return out


def collect_corrections(viewer) -> list[Correction]:
    """Every edited slice of every tracked instances layer in the viewer."""
    return [c for layer in viewer.layers for c in corrections_of(layer)]


@dataclass
class Annotation:
    """A labels layer the user drew (or opened) over an image layer: fine-tuning data of its own.

    Unlike a corrected segmentation there is nothing to diff against, so every
    plane with at least one painted label counts as fully annotated (label > 0
    mitochondrion, 0 background, as the split-layout labels of `finetune`);
    planes without a label are left out. job: (image (H, W), SegmentSettings,
    image layer name, z) to segment again with the fine-tuned model: the slice
    shown when fine-tuning started (the whole image in 2-D).
    """

    labels: Any
    image: Any
    corrections: list[Correction]
    job: tuple


def _plain_data(layer) -> np.ndarray | None:
    """A single-scale layer's data as NumPy (None for multiscale or lazy layers: reading one whole
    to look for annotations could take minutes)."""
    data = layer.data
    return data if isinstance(data, np.ndarray) and not getattr(layer, "multiscale", False) else None


def annotated_image(viewer, labels) -> Any | None:
    """The image layer a drawn labels layer annotates: a grey single-scale image layer of the same
    shape and in-plane scale, the nearest below it in the layer list (else above); None if none."""
    from napari.layers import Image

    stack = list(viewer.layers)
    i = stack.index(labels)
    for layer in [*reversed(stack[:i]), *stack[i + 1:]]:
        if (isinstance(layer, Image) and not layer.rgb and not getattr(layer, "multiscale", False)
                and layer.data.shape == labels.data.shape
                and np.allclose(layer.scale[-2:], labels.scale[-2:])):
            return layer
    return None


def drawn_annotations(viewer, settings: SegmentSettings | None = None,
                      pixel_sizes: dict[str, float] | None = None) -> list[Annotation]:
    """Visible labels layers drawn in the viewer (not opened from a file or a sample: ground truth
    kept for scoring must not become training data) with at least one label, that no segmentation
    here made (no `EditTracker`), each over the image layer it annotates (`annotated_image`);
    2-D or (Z, Y, X), in memory.

    settings: how the job segments the image again (default SegmentSettings()). pixel_sizes:
    {image layer name: nm} typed for an image whose layer states none (the Segment form's).
    GUI thread: reads the viewer.
    """
    from dataclasses import replace

    from napari.layers import Labels

    from ._reader import pixel_size_of

    out = []
    for layer in viewer.layers:
        if not isinstance(layer, Labels) or EditTracker.of(layer) is not None or "xmdl" in layer.metadata:
            continue
        source = getattr(layer, "source", None)
        if not layer.visible or getattr(source, "path", None) or getattr(source, "sample", None):
            continue
        data = _plain_data(layer)
        if data is None or data.ndim not in (2, 3) or not data.any():
            continue
        image = annotated_image(viewer, layer)
        if image is None:
            log.info("%s: no grey image layer of its shape %s to learn from", layer.name, data.shape)
            continue
        px = pixel_size_of(image) or pixel_size_of(layer) or (pixel_sizes or {}).get(image.name)
        planes, pixels = (data[None], image.data[None]) if data.ndim == 2 else (data, image.data)
        corrections = [Correction(f"{image.name}_z{k:04d}" if data.ndim == 3 else image.name,
                                  as_em_image(pixels[k]), (planes[k] > 0).astype(np.uint8), px)
                       for k in np.flatnonzero(planes.reshape(len(planes), -1).any(axis=1))]
        z = current_slice(viewer, image)
        job = (as_em_image(image.data if z is None else image.data[z]),
               replace(settings or SegmentSettings(), mode="slice", pixel_size_nm=px), image.name, z)
        out.append(Annotation(layer, image, corrections, job))
    return out


def write_corrections(corrections: Sequence[Correction], folder: str | Path) -> list[Path]:
    """Write corrections as split-layout data sets `folder/set<k>/{train,val}/{x,y}` (one per pixel size).

    The same slices serve as train and val: the user's few edits are all
    there is, and none is held back. Labels are uint8 TIFFs (0, 1,
    IGNORE_VALUE); dataset.json gives the pixel size. Returns the set folders.
    """
    import shutil

    import tifffile

    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    groups: dict[float | None, list[Correction]] = {}
    for c in corrections:
        groups.setdefault(c.pixel_size_nm, []).append(c)
    sets = []
    for k, (px, items) in enumerate(groups.items()):
        root = folder / f"set{k}"
        for split in ("train", "val"):
            (root / split / "x").mkdir(parents=True)
            (root / split / "y").mkdir(parents=True)
            for i, c in enumerate(items):
                tifffile.imwrite(root / split / "x" / f"im{i:04d}.tif", c.image, compression="zlib")
                tifffile.imwrite(root / split / "y" / f"seg{i:04d}.tif", c.label, compression="zlib")
        (root / "dataset.json").write_text(json.dumps({"pixel_size_nm": px, "slices": [c.name for c in items],
                                                       "ignore_value": IGNORE_VALUE}, indent=2) + "\n")
        sets.append(root)
    return sets


def finetune_from_corrections(corrections: Sequence[Correction], model: str | Path | None, out: str | Path,
                              epochs: int = 10, steps_per_epoch: int = 20, learning_rate: float | None = None,
                              tile_size: int | None = None, batch_size: int = 8, foreground_fraction: float = 0.5,
                              overwrite: bool = False, progress: Progress | None = None,
                              cancel: threading.Event | None = None, verbose: int = 0,
                              isolate: bool = False, resegment: list | None = None):
    """Fine-tune `model` on corrected slices; unedited pixels are ignored by the loss. Returns the run folder.

    The `python -m xmdl_tf.finetune` recipe (its defaults: lr 1e-4, basic
    augmentation at strength 2) through `train.train` with the parent's
    architecture, weights and normalisation and `ignore_value` IGNORE_VALUE;
    the data are written beside the run as `<out>_corrections/` and the run's
    config.json records the parent model (lineage) and those slices.
    tile_size: training tile (default 256, or the largest multiple of the
    model's size divisor that fits the smallest slice). foreground_fraction:
    share of tiles centred on corrected mitochondrion pixels. progress(done,
    total) per training step; a set `cancel` stops at the next step (Cancelled;
    the run folder is left resumable). isolate: train in a child process
    (`_finetune_job`; what the widget does, see there why); with `resegment`
    ([(image, SegmentSettings, name, z)]) the child also segments those again
    with the new model and (run, [Segmentation]) is returned.
    """
    from ..config import Config
    from ..io import DataError
    from ..predict import is_saved_model, resolve_model_path
    from ..train import build_parser, config_from_args, train

    corrections = [c for c in corrections if c.n_edited]
    if not corrections:
        raise DataError("no corrections: paint or erase on the instances layer first")
    if not any(np.any(c.label == 1) for c in corrections):
        raise DataError("the corrections mark no mitochondrion pixel; paint at least one mitochondrion (a missed "
                        "one, or over a correct one to confirm it) so the model sees both classes")
    parent = model_path(model)
    if is_saved_model(parent):
        raise DataError(f"{parent}: an exported SavedModel cannot be fine-tuned; choose its run folder or .keras")
    keras_path, cfg_path = resolve_model_path(parent)
    divisor = Config.load(cfg_path).model.size_divisor if cfg_path else 1
    if tile_size is None:
        fit = min(min(c.image.shape) for c in corrections)
        tile_size = max(divisor, min(256, fit) // divisor * divisor)
    out = Path(out)
    sets = write_corrections(corrections, out.with_name(f"{out.name}_corrections"))
    argv = ["--model", str(parent), "--data", *map(str, sets), "--out", str(out), "--epochs", str(epochs),
            "--steps-per-epoch", str(steps_per_epoch), "--tile-size", str(tile_size), "--batch-size",
            str(batch_size), "--foreground-fraction", str(foreground_fraction), "--ignore-value", str(IGNORE_VALUE),
            "--patience", str(epochs), "--no-jit"]
    if learning_rate is not None:
        argv += ["--lr", str(learning_rate)]
    args = build_parser("xmdl_tf.napari", finetune=True).parse_args(argv)  # refuses bad settings here
    total = epochs * steps_per_epoch
    step = _checker(progress, cancel, total)
    if isolate:
        return _finetune_in_child({"argv": argv, "init_from": str(keras_path), "overwrite": overwrite}, out, step,
                                  resegment)
    import_tensorflow()
    import keras

    class _Steps(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            step(1)

    # The corrections' pixel sizes are in each set's dataset.json.
    return train(args.data, args.out, config_from_args(args), init_from=str(keras_path),
                 augment_strength=args.augment_strength, overwrite=overwrite, verbose=verbose,
                 callbacks=[_Steps()])


def _finetune_in_child(spec: dict, out: Path, step: Callable[[int], None],
                       resegment: list | None = None) -> Path | tuple[Path, list]:
    """Run `_finetune_job` on `spec`; step(1) per training step (Cancelled stops the child).

    resegment: [(image, SegmentSettings, name, z)] to segment again with the new
    model in the child; then returns (run, [Segmentation]).
    """
    import pickle
    import subprocess
    import tempfile

    from ._finetune_job import STEP_LINE

    with tempfile.TemporaryDirectory(prefix="xmdl_finetune_") as tmp:
        spec_file, err_file = Path(tmp) / "spec.json", Path(tmp) / "stderr.txt"
        if resegment is not None:
            job_file = Path(tmp) / "resegment.pkl"
            with open(job_file, "wb") as f:
                pickle.dump(resegment, f, protocol=pickle.HIGHEST_PROTOCOL)
            spec = {**spec, "resegment": str(job_file)}
        spec_file.write_text(json.dumps(spec))
        with open(err_file, "w") as err:
            child = subprocess.Popen([sys.executable, "-m", "xmdl_tf.napari._finetune_job", str(spec_file)],
                                     stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                for line in child.stdout:
                    if line.strip() == STEP_LINE:
                        step(1)  # raises Cancelled when the user cancels
            except BaseException:
                child.terminate()
                child.wait(timeout=30)
                raise
            rc = child.wait()
        if rc != 0:
            lines = [ln for ln in err_file.read_text().splitlines() if ln.strip()]
            msg = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "")
            raise RuntimeError(f"fine-tuning failed (exit code {rc}): {msg.removeprefix('error: ')}")
        if resegment is not None:
            with open(job_file, "rb") as f:
                return out, pickle.load(f)
    return out


@dataclass
class FinetuneResult:
    """A fine-tuned run and the re-segmentations of the corrected layers with it."""

    run: Path
    corrections: list[Correction]
    segmentations: list[tuple[Any, Segmentation]] = field(default_factory=list)  # (instances layer, result)
    seconds: float = 0.0


def corrected_layers(viewer) -> list:
    """Tracked instances layers that have at least one edited pixel."""
    out = []
    for layer in viewer.layers:
        tracker = EditTracker.of(layer)
        if tracker is not None and tracker.edited().any():
            out.append(layer)
    return out


def finetune_and_resegment(layers: Sequence, corrections: Sequence[Correction], model: str | Path | None,
                           out: str | Path, progress: Progress | None = None, cancel: threading.Event | None = None,
                           annotations: Sequence[Annotation] = (), **finetune_kw) -> FinetuneResult:
    """`finetune_from_corrections` on `corrections` and the annotations' slices, then each corrected
    layer's input and each annotated image (its `Annotation.job`) segmented again with the new model.

    Touches no viewer (worker-thread safe): `show_finetune` adds the results.
    """
    from dataclasses import replace

    t0 = time.time()
    jobs, owners = [], []
    for layer in layers:
        seg = EditTracker.of(layer).seg
        settings = replace(seg.settings, pixel_size_nm=seg.pixel_size_nm,
                           z_size_nm=seg.voxel_size_nm[0] if seg.voxel_size_nm else seg.settings.z_size_nm)
        jobs.append((np.asarray(seg.image), settings, seg.name, seg.z))
        owners.append(layer)
    for a in annotations:
        if all((name, z) != a.job[2:] for _, _, name, z in jobs):  # that slice is segmented once
            jobs.append(a.job)
            owners.append(a.labels)
    corrections = [*corrections, *(c for a in annotations for c in a.corrections)]
    if finetune_kw.get("isolate"):  # the child also segments again (see _finetune_job)
        run, segs = finetune_from_corrections(corrections, model, out, progress=progress, cancel=cancel,
                                              resegment=jobs, **finetune_kw)
    else:
        run = finetune_from_corrections(corrections, model, out, progress=progress, cancel=cancel, **finetune_kw)
        segs = [segment_array(image, replace(settings, model=run), name, cancel=cancel, z=z)
                for image, settings, name, z in jobs]
    result = FinetuneResult(run, list(corrections), list(zip(owners, segs)))
    result.seconds = time.time() - t0
    return result


def show_finetune(viewer, result: FinetuneResult) -> dict[str, dict]:
    """Show the re-segmentations of a fine-tune run (GUI thread); returns {layer name: layers}."""
    shown = {}
    for layer, seg in result.segmentations:
        image_layer = viewer.layers[seg.name] if seg.name in viewer.layers else None
        shown[layer.name] = show_segmentation(viewer, seg, image_layer, keep_edits=False)  # (learnt from)
    return shown


def finetune_on_layers(viewer, model: str | Path | None, out: str | Path, **finetune_kw) -> FinetuneResult:
    """Fine-tune on every correction and drawn annotation in the viewer and replace the corrected
    layers' results (and segment the annotated images again).

    The whole "Fine-tune on my corrections" widget as one call (blocking).
    """
    layers = corrected_layers(viewer)
    corrections = [c for layer in layers for c in corrections_of(layer)]
    result = finetune_and_resegment(layers, corrections, model, out, annotations=drawn_annotations(viewer),
                                    **finetune_kw)
    show_finetune(viewer, result)
    return result
