"""napari reader for the images and volumes the toolkit reads, scaled by their pixel or voxel size.

2-D slices (PNG, JPEG, single-page TIFF) are read whole by `io.read_image`
with the TIFF's pixel size (`io.read_pixel_size_nm`). Stacks (multi-page,
ImageJ or OME TIFF; `file.h5:/path` or an `.h5` holding one 3-D dataset;
Zarr / OME-Zarr; N5) are opened by `volume_io.open_volume` and wrapped in a
dask array of one chunk per slice, so napari reads only the slices it shows.

Layers get `scale` in nm (pixel or voxel size; 1 where unknown), `units`
"nm" when known, and metadata {"source", "pixel_size_nm", "voxel_size_nm"}.

The toolkit's own results open as what they are: `instances.tif` and
`mask.tif` as Labels, `probability.tif` / `uncertainty.tif` / `gradcam.tif`
as float images in [0, 1]; a result folder (`analyze`'s `OUT/<stem>/`) as
all of these at once; an OME-Zarr with NGFF labels (`xmdl-volume`'s
`OUT.zarr`) as its image plus a Labels layer per label image. A folder of
numbered slices opens as one volume.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..io import IMAGE_EXTS, TIFF_EXTS, DataError
from ..volume_io import HDF5_EXTS

if TYPE_CHECKING:
    import dask.array

LayerData = tuple[Any, dict, str]


def napari_get_reader(path: str | list[str]) -> Callable[[str | list[str]], list[LayerData]] | None:
    """The reader for `path`, or None when it is not one of our formats (napari's convention)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    return read_layers if _claims(str(path)) else None


# The toolkit's outputs (analyze, analyze --volume): label images, and float maps in [0, 1] with the
# colormap the plugin's own layers use for them.
RESULT_LABELS = ("instances.tif", "mask.tif")
RESULT_MAPS = {"probability.tif": "viridis", "uncertainty.tif": "magma", "gradcam.tif": "inferno"}


def read_layers(path: str | list[str]) -> list[LayerData]:
    """[(data, kwargs, "image" | "labels"), ...] for one image, volume, result file or result folder."""
    spec = str(path[0] if isinstance(path, (list, tuple)) else path)
    p = Path(spec)
    if p.is_dir() and _is_result_folder(p):
        layers = [layer_data(str(p / n)) for n in ("probability.tif", "uncertainty.tif", "gradcam.tif",
                                                   "instances.tif") if (p / n).is_file()]
        for data, kwargs, _ in layers:  # the segmentation over its probability; the other maps one click away
            kwargs["visible"] = kwargs["name"].endswith(("probability", "instances"))
        return layers
    layers = [layer_data(spec)]
    if p.is_dir():
        layers += ngff_label_layers(p, layers[0][1])
    return layers


def _is_result_folder(p: Path) -> bool:
    return (p / "instances.tif").is_file() and (p / "probability.tif").is_file()


def _claims(spec: str) -> bool:
    from ..volume_io import _is_zarr_dir, _split_container

    container, _ = _split_container(spec)
    p = Path(container or spec)
    if not p.exists():
        return False
    if p.is_dir():
        return (p.suffix.lower() in (".zarr", ".n5") or _is_zarr_dir(p) or (p / "attributes.json").is_file()
                or _is_result_folder(p) or _holds_images(p))
    ext = p.suffix.lower()
    return ext in IMAGE_EXTS or ext in HDF5_EXTS


def _holds_images(folder: Path) -> bool:
    """A folder of slices (what `volume_io` reads as a volume): image files and no sub-folders of data."""
    try:
        return any(f.suffix.lower() in IMAGE_EXTS and f.is_file() for f in folder.iterdir())
    except OSError:
        return False


def layer_data(spec: str) -> LayerData:
    """One layer's (data, kwargs, "image" | "labels") for a 2-D image file or a stack; DataError names the file."""
    from ..io import read_image, read_pixel_size_nm, stack_depth

    p = Path(spec)
    if p.is_file() and p.name.lower() in (*RESULT_LABELS, *RESULT_MAPS):
        result = result_layer_data(p)
        if result is not None:
            return result
    if p.is_file() and p.suffix.lower() in IMAGE_EXTS and (p.suffix.lower() not in TIFF_EXTS or stack_depth(p) == 1):
        image = read_image(p, allow_constant=True)  # shown, even if there is nothing to segment in it
        px = read_pixel_size_nm(p)
        meta = {"source": spec, "pixel_size_nm": px, "voxel_size_nm": None}
        return image, _kwargs(p.stem, (px, px) if px else None, meta), "image"
    return volume_layer_data(spec)


def volume_layer_data(spec: str) -> LayerData:
    """A stack as a lazy dask array (Z, Y, X), one chunk per slice, scaled by its voxel size."""
    from ..volume_io import open_volume

    vol = open_volume(spec, kind="image")
    data = lazy_volume(vol)
    voxel = vol.voxel_size_nm
    px = voxel[2] if voxel else _plane_pixel_size(spec)
    meta = {"source": spec, "pixel_size_nm": px, "voxel_size_nm": voxel, "voxel_note": vol.voxel_note}
    # Only the in-plane size known (serial sections without a z spacing): shown isotropic,
    # which the metadata says; the segment widget asks for the section thickness.
    scale = voxel or ((px, px, px) if px else None)
    kwargs = _kwargs(vol.name, scale, meta)
    kwargs["contrast_limits"] = _contrast_limits(vol)
    return data, kwargs, "image"


def result_layer_data(p: Path) -> LayerData | None:
    """A result file of the toolkit (`RESULT_LABELS`, `RESULT_MAPS`) as Labels or as a float map in
    [0, 1]; None when its data is not what that name holds here (a user's own file of that name)."""
    from ..io import open_tiff, read_pixel_size_nm
    from ..volume_io import open_volume

    with open_tiff(p) as tif:
        dtype, depth = np.dtype(tif.series[0].dtype), len(tif.series[0].shape)
    name = f"{p.parent.name} {p.stem}"  # "im0015 instances": the image it belongs to
    labels = p.name.lower() in RESULT_LABELS
    if labels != (dtype.kind in "ui") or (not labels and dtype.kind != "f") or depth not in (2, 3):
        return None
    if depth == 2:
        import tifffile

        data = tifffile.imread(p)
        px = read_pixel_size_nm(p)
        scale, meta = ((px, px) if px else None), {"source": str(p), "pixel_size_nm": px, "voxel_size_nm": None}
    else:
        vol = open_volume(str(p), kind="label" if labels else "image")
        data, voxel = lazy_volume(vol), vol.voxel_size_nm
        scale = voxel
        meta = {"source": str(p), "pixel_size_nm": voxel[2] if voxel else None, "voxel_size_nm": voxel}
    kwargs = _kwargs(name, scale, meta)
    if labels:
        del kwargs["colormap"]
        kwargs["opacity"] = 0.6
        return data, kwargs, "labels"
    kwargs.update(colormap=RESULT_MAPS[p.name.lower()], contrast_limits=(0.0, 1.0))
    return data, kwargs, "image"


def ngff_label_layers(store: Path, image_kwargs: dict) -> list[LayerData]:
    """Labels layers for the NGFF label images of an OME-Zarr (`labels/<name>`, level 0, lazy), on the
    image's scale; an xmdl-volume result's image (the probability) is shown as a map in [0, 1]."""
    import json

    import dask.array as da

    group = store / "labels"
    try:
        attrs = json.loads((group / ".zattrs").read_text()) if (group / ".zattrs").is_file() else \
            json.loads((group / "zarr.json").read_text()).get("attributes", {})
        names = [str(n) for n in attrs.get("labels", [])]
    except (OSError, ValueError, AttributeError):
        return []
    if (store / "summary.json").is_file() and "instances" in names:  # (distributed.process_volume's layout)
        image_kwargs.update(colormap="viridis", contrast_limits=(0.0, 1.0))
    out = []
    for n in names:
        if not (group / n / "0").is_dir():
            continue
        data = da.from_zarr(str(group / n / "0"))
        kwargs = {k: v for k, v in image_kwargs.items() if k in ("scale", "units", "metadata")}
        out.append((data, {**kwargs, "name": f"{image_kwargs['name']} {n}", "opacity": 0.6}, "labels"))
    return out


def lazy_volume(vol) -> dask.array.Array:
    """`vol` (a `volume_io.Volume`) as a dask array; each chunk is one `Volume.slab` read."""
    import dask.array as da

    y, x = vol.shape[1:]
    return da.from_array(_SlabReader(vol), chunks=(1, y, x), asarray=False, fancy=False,
                         meta=np.empty((0, 0, 0), vol.dtype), name=f"xmdl-volume-{vol.source}")


class _SlabReader:
    """Array-like view of a Volume for `dask.array.from_array` (basic slicing only)."""

    def __init__(self, vol):
        self.vol = vol
        self.shape = tuple(int(n) for n in vol.shape)
        self.dtype = np.dtype(vol.dtype)
        self.ndim = 3

    def __getitem__(self, key: tuple) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        key = key + (slice(None),) * (3 - len(key))
        ranges = [range(*k.indices(n)) if isinstance(k, slice) else range(int(k), int(k) + 1)
                  for k, n in zip(key, self.shape)]
        if not all(len(r) for r in ranges):
            return np.empty(tuple(len(r) for r in ranges), self.dtype)
        if any(r.step != 1 for r in ranges):
            raise IndexError("strided reads are not supported; dask asks for whole chunks")
        z, y, x = ranges
        arr = self.vol.slab(z.start, z.stop, (slice(y.start, y.stop), slice(x.start, x.stop)))
        drop = tuple(0 if not isinstance(k, slice) else slice(None) for k in key)
        return arr[drop]


def _plane_pixel_size(spec: str) -> float | None:
    """In-plane pixel size of a TIFF stack whose metadata lacks z (ImageJ / resolution tags)."""
    from ..io import read_pixel_size_nm

    return read_pixel_size_nm(spec) if Path(spec).suffix.lower() in TIFF_EXTS else None


def _contrast_limits(vol) -> tuple[float, float]:
    """Display range from the middle slice, so napari does not read the volume to find one."""
    if np.dtype(vol.dtype) == np.uint8:
        return 0.0, 255.0
    mid = np.asarray(vol.slab(len(vol) // 2, len(vol) // 2 + 1), np.float64)
    lo, hi = float(mid.min()), float(mid.max())
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _kwargs(name: str, scale: tuple[float, ...] | None, meta: dict) -> dict:
    kw: dict[str, Any] = {"name": name, "metadata": meta, "colormap": "gray"}
    if scale:
        kw["scale"] = tuple(float(s) for s in scale)
        kw["units"] = ("nm",) * len(scale)
    return kw


# nm per unit of a layer's scale, for the length units napari (pint) names.
_NM_PER_UNIT = {"nm": 1.0, "nanometer": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "micrometer": 1e3, "micron": 1e3,
                "mm": 1e6, "millimeter": 1e6, "angstrom": 0.1, "Å": 0.1}


def _nm_per_unit(unit) -> float | None:
    return _NM_PER_UNIT.get(str(unit).strip())


def pixel_size_of(layer) -> float | None:
    """In-plane pixel size (nm) of a layer: its metadata, else its scale when its units are a length
    (nm, µm, ...)."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get("pixel_size_nm"):
        return float(meta["pixel_size_nm"])
    if meta.get("voxel_size_nm"):
        return float(meta["voxel_size_nm"][-1])
    units = list(getattr(layer, "units", ()))
    per = _nm_per_unit(units[-1]) if units else None
    return float(layer.scale[-1]) * per if per else None


def voxel_size_of(layer) -> tuple[float, float, float] | None:
    """(z, y, x) voxel size (nm) of a 3-D layer from its metadata or its scale in length units, or None."""
    meta = getattr(layer, "metadata", {}) or {}
    if meta.get("voxel_size_nm"):
        return tuple(float(v) for v in meta["voxel_size_nm"])
    units = list(getattr(layer, "units", ()))
    per = [_nm_per_unit(u) for u in units[-3:]]
    if len(units) >= 3 and all(per) and not meta.get("pixel_size_nm"):
        return tuple(float(s) * f for s, f in zip(layer.scale[-3:], per))
    return None


__all__ = ["DataError", "layer_data", "lazy_volume", "napari_get_reader", "pixel_size_of", "read_layers",
           "voxel_size_of"]
