"""napari reader for the images and volumes the toolkit reads, scaled by their pixel or voxel size.

2-D slices (PNG, JPEG, single-page TIFF) are read whole by `io.read_image`
with the TIFF's pixel size (`io.read_pixel_size_nm`). Stacks (multi-page,
ImageJ or OME TIFF; `file.h5:/path` or an `.h5` holding one 3-D dataset;
Zarr / OME-Zarr; N5) are opened by `volume_io.open_volume` and wrapped in a
dask array of one chunk per slice, so napari reads only the slices it shows.

Layers get `scale` in nm (pixel or voxel size; 1 where unknown), `units`
"nm" when known, and metadata {"source", "pixel_size_nm", "voxel_size_nm"}.
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


def read_layers(path: str | list[str]) -> list[LayerData]:
    """[(data, kwargs, "image")] for one image or volume spec."""
    spec = str(path[0] if isinstance(path, (list, tuple)) else path)
    return [layer_data(spec)]


def _claims(spec: str) -> bool:
    from ..volume_io import _is_zarr_dir, _split_container

    container, _ = _split_container(spec)
    p = Path(container or spec)
    if not p.exists():
        return False
    if p.is_dir():
        return p.suffix.lower() in (".zarr", ".n5") or _is_zarr_dir(p) or (p / "attributes.json").is_file()
    ext = p.suffix.lower()
    return ext in IMAGE_EXTS or ext in HDF5_EXTS


def layer_data(spec: str) -> LayerData:
    """One layer's (data, kwargs, "image") for a 2-D image file or a stack; DataError names the file."""
    from ..io import read_image, read_pixel_size_nm, stack_depth

    p = Path(spec)
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
