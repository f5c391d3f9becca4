"""Reading and writing EM volumes (Z, Y, X) with their voxel size.

`open_volume(spec)` understands four kinds of stack, all read lazily slab by
slab (`Volume.slab(z0, z1)` touches only those slices):

1. a multi-page TIFF: plain, ImageJ hyperstack or OME-TIFF;
2. a folder of numbered 2-D slices (png/tif/...), ordered by the last number
   in each name (`slice_2.png` before `slice_10.png`);
3. an HDF5 dataset: `file.h5:/path/to/dataset` (or `file.h5/path/...`), or
   `file.h5` holding exactly one 3-D dataset;
4. a Zarr array or OME-Zarr image: `x.zarr`, `x.ome.zarr`, `x.zarr/path/to/array`
   (or `x.zarr:/path`); OME-Zarr (NGFF 0.4 `multiscales`, 0.5 `ome.multiscales`)
   gives its full-resolution dataset (the first in `datasets`).

Voxel size in nm, (z, y, x), is taken from the metadata where it is complete:

- ImageJ TIFF: `spacing` (z) with `unit` (or `zunit`/`yunit`) and the
  X/YResolution tags (pixels per unit);
- OME-TIFF: `PhysicalSizeX/Y/Z` with `PhysicalSize*Unit` (default µm);
- other TIFFs: X/YResolution with ResolutionUnit centimetre (never z);
- HDF5 / Zarr attributes: `element_size_um` (z, y, x in µm; the Fiji/ilastik
  convention), else `resolution` or `voxel_size` (z, y, x in nm, as in CREMI;
  a `unit` attribute may say otherwise);
- OME-Zarr: the dataset's `scale` (times any multiscale-level scale) with the
  axes' `unit` (micrometer, nanometer, ...);
- folder of slices: what the first slice's TIFF metadata holds (normally only
  y and x).

Partial metadata (typically y and x without z), values outside 0.1..10000 nm
and unknown units give `voxel_size_nm = None`; `Volume.voxel_note` says what
was found, so the caller can ask for `--voxel-size Z Y X`. See
`resolve_voxel_size` for how that flag and the metadata combine.

A single plane is a one-slice volume (Z = 1) when the file says it is a stack
(shape (1, Y, X) in tifffile, HDF5 or Zarr; axes with a singleton z; one file
in a folder of slices). ImageJ and OME-TIFF files describe every image as a
hyperstack, so a one-plane file of those kinds is read as Z = 1 too (logged);
plain 2-D files (PNG, a 2-D TIFF) are refused. RGB stacks are converted to
grayscale as `io.read_image` does (with its warning).
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import tifffile

from .io import (
    IMAGE_EXTS,
    TIFF_EXTS,
    _UNIT_NM,
    DataError,
    _list_files,
    _number,
    _read_raw,
    _to_2d,
    _whole_series,
    image_shape,
    open_tiff,
    to_em_dtype,
)

logger = logging.getLogger(__name__)

HDF5_EXTS = (".h5", ".hdf5", ".hdf", ".he5")
PLAUSIBLE_NM = (0.1, 10000.0)
STACK_HINT = "a volume needs a stack: a multi-page TIFF, a folder of slices, HDF5 or Zarr"
# ImageJ TIFFs cannot be BigTIFF; past this size write an OME BigTIFF instead
# (the margin leaves room for the IFDs and metadata).
_BIGTIFF_BYTES = 2**32 - 2**25
# The 2-D reader's units plus the spellings of OME-XML and OME-Zarr (NGFF).
_UNITS_NM = {**_UNIT_NM, "\u03bcm": 1000.0, "micrometer": 1000.0, "micrometre": 1000.0, "microns": 1000.0,
             "nanometre": 1.0, "millimeter": 1e6, "millimetre": 1e6, "centimeter": 1e7, "meter": 1e9,
             "metre": 1e9, "Å": 0.1, "angstrom": 0.1, "pm": 1e-3, "picometer": 1e-3}

Triple = tuple[float, float, float]


def _unit_nm(unit: Any) -> float | None:
    """nm per `unit` ("µm", "nanometer", ...), or None for unknown units (e.g. ImageJ's "pixel")."""
    if not isinstance(unit, str):
        return None
    unit = unit.strip()
    return _UNITS_NM.get(unit, _UNITS_NM.get(unit.lower()))


def _fmt(values: Sequence[float | None]) -> str:
    return " x ".join("?" if v is None else f"{v:g}" for v in values)


def _shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(n)) for n in shape) + ")"


# ----------------------------------------------------------------------------
# The volume


@dataclass
class Volume:
    """A lazily read EM volume (Z, Y, X).

    source: what the user passed; name: stem for outputs (file stem, folder
    name, `<file stem>_<dataset>` for a named HDF5/Zarr dataset); dtype: of
    `slab()` (stored dtype; RGB is already gray); voxel_size_nm: (z, y, x) nm
    from complete, plausible metadata, else None (`voxel_note` says why);
    kind: "image" or "label" (used in messages).
    """

    source: str
    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    voxel_size_nm: Triple | None
    kind: str = "image"
    voxel_note: str = ""
    _read: Callable[..., np.ndarray] = field(default=None, repr=False, compare=False)
    _reads_yx: bool = field(default=False, repr=False, compare=False)  # _read takes a (y, x) slice pair
    _stats: tuple[float, float, bool] | None = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return self.shape[0]

    def slab(self, z0: int, z1: int, yx: tuple[slice, slice] | None = None) -> np.ndarray:
        """Raw slices z0..z1-1 as (z1 - z0, Y, X) in `dtype`; reads only those slices.

        yx: optional (y slice, x slice) of each slice (step 1); HDF5 and Zarr
        read only that region, other formats read whole slices and crop.
        """
        if not 0 <= z0 < z1 <= self.shape[0]:
            raise IndexError(f"{self.source}: slab {z0}:{z1} outside 0:{self.shape[0]}")
        if yx is not None and self._reads_yx:
            arr = np.asarray(self._read(z0, z1, yx))
        else:
            arr = np.asarray(self._read(z0, z1))
            if yx is not None:
                arr = arr[:, yx[0], yx[1]]
        plane = self.shape[1:] if yx is None else tuple(len(range(*sl.indices(n))) for sl, n in zip(yx, self.shape[1:]))
        want = (z1 - z0, *plane)
        if arr.shape != want:
            raise DataError(f"{self.source}: slices {z0}..{z1 - 1} read as {_shape_str(arr.shape)}, "
                            f"expected {_shape_str(want)}")
        return arr

    def read(self) -> np.ndarray:
        """The whole volume (Z, Y, X) in `dtype`."""
        return self.slab(0, self.shape[0])

    def value_stats(self, slab: int = 64) -> tuple[float, float, bool]:
        """(min, max, all values integral) over the whole volume, read once in slabs and cached.

        Raises DataError for NaN or infinite values.
        """
        if self._stats is None:
            lo, hi, integral = math.inf, -math.inf, True
            for z0, z1 in iter_slabs(len(self), slab):
                arr = self.slab(z0, z1)
                if arr.dtype.kind == "f":
                    bad = ~np.isfinite(arr)
                    if bad.any():
                        zs = (np.flatnonzero(bad.reshape(len(arr), -1).any(1)) + z0).tolist()
                        where = ", ".join(map(str, zs[:5])) + (f" and {len(zs) - 5} more" if len(zs) > 5 else "")
                        raise DataError(f"{self.source}: NaN or infinite values in slice{'s' * (len(zs) > 1)} "
                                        f"{where} ({int(bad.sum())} voxels)")
                    integral = integral and bool(np.array_equal(arr, np.round(arr)))
                lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
            self._stats = (lo, hi, integral)
        return self._stats

    def use_value_stats(self, stats: Sequence) -> None:
        """Take `value_stats` computed elsewhere (the driver of a chunked run, from the same source)
        instead of reading the whole volume again here."""
        lo, hi, integral = stats
        self._stats = (float(lo), float(hi), bool(integral))

    def image_slab(self, z0: int, z1: int, yx: tuple[slice, slice] | None = None,
                   check_constant: bool = True) -> np.ndarray:
        """Slices z0..z1-1 as an EM image (z1 - z0, Y, X), uint8 or uint16, like `io.read_image`.

        The dtype rule of `io.to_em_dtype`, with one map for the whole volume (signed integers
        shifted by its minimum, floats mapped from its range or cast when all its values are
        integers in 0..65535), so that the chunks of a slice agree: the first such call reads
        the volume once for `value_stats`. A constant volume is a DataError; a constant slice
        inside a varying volume is not. check_constant=False skips that check (which reads the
        whole volume when this slab is constant): for callers that check the volume elsewhere.
        """
        raw = self.slab(z0, z1, yx)
        if raw.dtype.kind in "iuf" and raw.dtype not in (np.uint8, np.uint16):
            lo, hi, integral = self.value_stats()
            if lo == hi:
                raise DataError(f"{self.source}: constant volume (every voxel is {lo:g}); nothing to segment")
            return to_em_dtype(raw, f"{self.source} (slices {z0}..{z1 - 1})", (lo, hi), integral)
        out = to_em_dtype(raw, self.source)
        if check_constant and out.min() == out.max() and self.value_stats()[0] == self.value_stats()[1]:
            raise DataError(f"{self.source}: constant volume (every voxel is {raw.flat[0]}); nothing to segment")
        return out

    def label_slab(self, z0: int, z1: int, yx: tuple[slice, slice] | None = None) -> np.ndarray:
        """Slices z0..z1-1 as label ids (z1 - z0, Y, X); foreground is > 0.

        Unsigned ids are returned unchanged, bool as uint8, signed and float ids
        as uint32 (uint64 when an id exceeds uint32, never wrapped); negative or
        non-integer values are a DataError (checked as each slab is read).
        """
        raw = self.slab(z0, z1, yx)
        where = f"{self.source} (slices {z0}..{z1 - 1})"
        if raw.dtype == np.bool_:
            return raw.astype(np.uint8)
        if raw.dtype.kind == "f":
            if not np.isfinite(raw).all() or not np.array_equal(raw, np.round(raw)) or raw.min() < 0:
                raise DataError(f"{where}: label has non-integer or negative values; expected a mask or instance ids")
            return raw.astype(_id_dtype(raw))
        if raw.dtype.kind == "i":
            if raw.min() < 0:
                raise DataError(f"{where}: label has negative values")
            return raw.astype(_id_dtype(raw))
        if raw.dtype.kind == "u":
            return raw
        raise DataError(f"{self.source}: unsupported label dtype {raw.dtype}")


def _id_dtype(ids: np.ndarray) -> type:
    """uint32 for non-negative ids that fit it, else uint64 (a cast must never merge two ids)."""
    return np.uint32 if ids.size == 0 or ids.max() <= np.iinfo(np.uint32).max else np.uint64


def iter_slabs(n_slices: int, slab: int) -> Iterator[tuple[int, int]]:
    """(z0, z1) half-open ranges of at most `slab` slices covering 0..n_slices."""
    if slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    for z0 in range(0, n_slices, slab):
        yield z0, min(z0 + slab, n_slices)


def check_same_grid(image: Volume, label: Volume) -> None:
    """DataError unless `label` has the shape of `image`; a warning if their voxel sizes differ by > 1%."""
    if tuple(label.shape) != tuple(image.shape):
        raise DataError(f"label stack {label.source} is {_shape_str(label.shape)} "
                        f"but image stack {image.source} is {_shape_str(image.shape)}")
    a, b = image.voxel_size_nm, label.voxel_size_nm
    if a is not None and b is not None and _differ(a, b):
        logger.warning("label stack %s has voxel size %s nm but image stack %s has %s nm; using the image's",
                       label.source, _fmt(b), image.source, _fmt(a))


def _differ(a: Sequence[float], b: Sequence[float], rel: float = 0.01) -> bool:
    return any(abs(x - y) > rel * max(abs(x), abs(y)) for x, y in zip(a, b))


# ----------------------------------------------------------------------------
# Voxel size


def _plausible(values: Sequence[float]) -> bool:
    return all(PLAUSIBLE_NM[0] <= v <= PLAUSIBLE_NM[1] for v in values)


def _voxel_from(found: Sequence[float | None] | None, origin: str) -> tuple[Triple | None, str]:
    """(voxel size or None, a note saying what the metadata held) from a partial (z, y, x)."""
    if found is None or all(v is None for v in found):
        return None, f"no voxel size in the {origin}"
    if any(v is None for v in found):
        return None, f"the {origin} gives only part of the voxel size: {_fmt(found)} nm (z, y, x)"
    vals = tuple(float(v) for v in found)
    if not all(math.isfinite(v) for v in vals) or not _plausible(vals):
        return None, (f"the {origin} gives voxel size {_fmt(vals)} nm, outside "
                      f"{PLAUSIBLE_NM[0]:g}..{PLAUSIBLE_NM[1]:g} nm; ignored")
    return vals, f"voxel size {_fmt(vals)} nm (z, y, x) from the {origin}"


def resolve_voxel_size(volume: Volume, given: Sequence[float] | None) -> Triple | None:
    """Voxel size (z, y, x) in nm to measure `volume` with, or None when unknown.

    An explicit `--voxel-size Z Y X` (given, nm) wins: the user has said what
    they mean, e.g. to correct metadata that a converter wrote wrongly; a
    warning is logged when it differs from the metadata by more than 1%.
    Without it the metadata's voxel size is used (None when incomplete or
    implausible). given must be exactly 3 positive numbers (DataError).
    """
    if given is None:
        return volume.voxel_size_nm
    from .instances3d import as_voxel_size

    try:
        vals = as_voxel_size(given)
    except ValueError:
        shown = " ".join(map(str, given)) if isinstance(given, (list, tuple)) else repr(given)
        raise DataError(f"--voxel-size needs exactly 3 positive numbers Z Y X in nm, got {shown}") from None
    if not _plausible(vals):
        logger.warning("--voxel-size %s nm is outside %g..%g nm; the values are in nm, not µm",
                       _fmt(vals), *PLAUSIBLE_NM)
    meta = volume.voxel_size_nm
    if meta is not None and _differ(vals, meta):
        logger.warning("%s: --voxel-size %s nm overrides the voxel size in its metadata (%s nm)",
                       volume.source, _fmt(vals), _fmt(meta))
    return vals


def _triple(value: Any) -> tuple[float, float, float] | None:
    try:
        vals = tuple(float(v) for v in np.asarray(value, dtype=float).ravel())
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == 3 else None


def _attrs_voxel_nm(attrs: dict) -> Sequence[float | None] | None:
    """(z, y, x) nm from HDF5/Zarr attributes (see the module docstring), or None."""
    if "element_size_um" in attrs:
        t = _triple(attrs["element_size_um"])
        if t is not None:
            return tuple(v * 1000.0 for v in t)
    for key in ("resolution", "voxel_size"):
        if key in attrs:
            t = _triple(attrs[key])
            unit = attrs.get("unit", attrs.get("units", "nm"))
            unit = unit.decode() if isinstance(unit, bytes) else unit
            scale = _unit_nm(unit)
            if t is not None and scale is not None:
                return tuple(v * scale for v in t)
    return None


def _tiff_voxel_nm(tif: tifffile.TiffFile) -> tuple[float | None, float | None, float | None]:
    """(z, y, x) nm from OME-XML, ImageJ metadata or resolution tags; None where unknown."""
    try:
        return _tiff_voxel_nm_unchecked(tif)
    except (ValueError, TypeError, ZeroDivisionError):  # malformed metadata must not make the pixels unreadable
        return None, None, None


def _tiff_voxel_nm_unchecked(tif: tifffile.TiffFile) -> tuple[float | None, float | None, float | None]:
    if tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
        except ET.ParseError:
            root = None
        pixels = next((el for el in root.iter() if el.tag.endswith("}Pixels") or el.tag == "Pixels"), None) \
            if root is not None else None
        if pixels is not None:
            out = []
            for ax in "ZYX":
                size = pixels.get(f"PhysicalSize{ax}")
                scale = _unit_nm(pixels.get(f"PhysicalSize{ax}Unit", "µm"))
                out.append(float(size) * scale if size is not None and scale is not None else None)
            return tuple(out)
    page = tif.pages[0]
    ij = tif.imagej_metadata or {}
    unit = ij.get("unit")
    if not ij:  # resolution tags alone: only a centimetre unit is a physical size, inches are display dpi
        res_unit = page.tags.get("ResolutionUnit")
        unit = "cm" if res_unit is not None and int(res_unit.value) == 3 else None

    def per_pixel(tag: str, axis_unit: Any) -> float | None:
        t = page.tags.get(tag)
        scale = _unit_nm(axis_unit)
        if t is None or scale is None:
            return None
        num, den = t.value
        return scale * den / num if num else None

    z = None
    if "spacing" in ij:
        scale = _unit_nm(ij.get("zunit", unit))
        z = float(ij["spacing"]) * scale if scale is not None else None
    return z, per_pixel("YResolution", ij.get("yunit", unit)), per_pixel("XResolution", unit)


# ----------------------------------------------------------------------------
# Opening


def open_volume(spec: str | Path, kind: str = "image") -> Volume:
    """Open a stack (see the module docstring) as a lazily read `Volume` (Z, Y, X).

    kind: "image" or "label" (what the volume is, for messages). Raises
    DataError naming the file for missing or unreadable input, 2-D images,
    data that is not one (Z, Y, X) stack, and ambiguous containers.
    """
    if kind not in ("image", "label"):
        raise ValueError(f"kind must be 'image' or 'label', got {kind!r}")
    spec_s = str(spec)
    container, inner = _split_container(spec_s)
    if container is not None:
        path = Path(container)
        if not path.exists():
            raise DataError(f"{path}: not found (no such file or folder)")
        if path.suffix.lower() == ".zarr":
            return _open_zarr(spec_s, path, inner, kind)
        if path.suffix.lower() == ".n5":
            return _open_n5(spec_s, path, inner, kind)
        return _open_h5(spec_s, path, inner, kind)
    path = Path(spec_s)
    if not path.exists():
        raise DataError(f"{path}: not found (no such file or folder)")
    if path.is_dir():
        if _is_zarr_dir(path):
            return _open_zarr(spec_s, path, None, kind)
        if (path / "attributes.json").is_file():
            return _open_n5(spec_s, path, None, kind)
        return _open_folder(spec_s, path, kind)
    ext = path.suffix.lower()
    if ext in TIFF_EXTS:
        return _open_tiff(spec_s, path, kind)
    if ext in IMAGE_EXTS:
        h, w = image_shape(path)
        raise DataError(f"{path} is a single 2-D image ({h} x {w}); {STACK_HINT}")
    if _is_hdf5(path):
        return _open_h5(spec_s, path, None, kind)
    try:
        return _open_tiff(spec_s, path, kind)
    except DataError:
        raise DataError(f"{path}: unsupported file ({ext or 'no extension'}); {STACK_HINT}") from None


_CONTAINER_RE = re.compile(r"^(.+?\.(?:h5|hdf5|hdf|he5|zarr|n5))(?:[:/](.*))?$", re.IGNORECASE)


def source_path(spec: str | Path) -> Path:
    """The file or folder a volume spec reads (`x.h5` of `x.h5:/a/b`)."""
    container, _ = _split_container(str(spec))
    return Path(container if container is not None else spec)


def _split_container(spec: str) -> tuple[str | None, str | None]:
    """("x.h5", "a/b") from "x.h5:/a/b" or "x.h5/a/b"; (None, None) when spec names no container."""
    m = _CONTAINER_RE.match(spec)
    if m is None:
        return None, None
    inner = (m.group(2) or "").strip("/") or None
    return m.group(1), inner


def _is_zarr_dir(path: Path) -> bool:
    return any((path / n).exists() for n in (".zarray", ".zgroup", "zarr.json"))


def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89HDF\r\n\x1a\n"


def _stem(path: Path) -> str:
    name = path.name
    for ext in (".ome.tiff", ".ome.tif", ".ome.zarr", *TIFF_EXTS, *HDF5_EXTS, ".zarr"):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


def _gray(arr: np.ndarray, where: Path, kind: str) -> np.ndarray:
    """(n, Y, X, 3|4) -> (n, Y, X) with `io`'s RGB conversion (and its warning); n >= 1."""
    return np.stack([_to_2d(a, where, kind) for a in arr])


def _make(source: str, name: str, shape: Sequence[int], dtype: Any, found: Sequence[float | None] | None,
          origin: str, kind: str, read: Callable[..., np.ndarray], reads_yx: bool = False) -> Volume:
    voxel, note = _voxel_from(found, origin)
    shape3 = tuple(int(n) for n in shape)
    if any(n == 0 for n in shape3):
        raise DataError(f"{source}: empty volume {_shape_str(shape3)}")
    return Volume(source, name, shape3, np.dtype(dtype), voxel, kind, note, read, reads_yx)


# --- TIFF


def _open_tiff(source: str, path: Path, kind: str) -> Volume:
    # open_tiff refuses a truncated file, of which tifffile would guess a shorter stack.
    with open_tiff(path) as tif:
        series = tif.series[0]
        others = [tuple(x.shape) for x in tif.series[1:] if not getattr(x, "is_pyramidal", False)]
        shape, axes = series.get_shape(False), series.get_axes(False)
        # Colour only when the samples follow Y and X (contiguous RGB, as ImageJ and cameras write
        # it). Samples first are how tifffile.imwrite stores a (3 or 4, Y, X) grey stack: its slices,
        # as the 2-D readers (`io.stack_depth`) take them.
        rgb = ("S" in axes and shape[axes.index("S")] in (3, 4) and int(tif.pages[0].photometric) == 2
               and axes.index("S") > axes.index("Y"))
        found = _tiff_voxel_nm(tif)
        n_pages = len(series.pages)
        dtype, tkind = series.dtype, series.kind
    if others:
        # Pages of different sizes, or stacks written one after the other: reading the first series
        # alone would silently drop the rest (or call a stack a single 2-D image).
        raise DataError(f"{path}: holds {len(others) + 1} image series (shapes {tuple(shape)}, "
                        f"{', '.join(map(str, others[:3]))}{', ...' if len(others) > 3 else ''}); save the volume as "
                        "one stack of equally sized slices")
    stack = [(a, n) for a, n in zip(axes, shape) if a not in "YX" and not (a == "S" and (rgb or n == 1))]
    big = [(a, n) for a, n in stack if n > 1]
    y, x = shape[axes.index("Y")], shape[axes.index("X")]
    if len(big) > 1:
        dims = ", ".join(f"{a}={n}" for a, n in big)
        raise DataError(f"{path}: {len(big) + 2}-D data ({dims}, Y={y}, X={x}) is not one (Z, Y, X) stack; "
                        "save a single channel and time point")
    if not stack:
        raise DataError(f"{path} is a single 2-D image ({y} x {x}); {STACK_HINT}")
    n = big[0][1] if big else 1
    if big and big[0][0] not in "ZQIS":  # (S: a grey stack tifffile stored as planar samples, above)
        logger.warning("%s: axis %s (%d planes) read as the z slices", path, big[0][0], n)
    if not big and tkind in ("imagej", "ome"):
        logger.warning("%s holds a single plane (%d x %d); read as a one-slice volume (Z = 1)", path, y, x)
    s_pos, y_pos = (axes.index("S"), axes.index("Y")) if rgb else (0, 0)
    by_page = n_pages == n

    def read(z0: int, z1: int) -> np.ndarray:
        if by_page:
            with open_tiff(path) as tif:
                arr = tif.asarray(key=range(z0, z1), series=0)
        else:  # the planes share pages (one page holds several): read the series once, keep it
            arr = _whole_series(path, path.stat().st_mtime)
        if rgb and s_pos < y_pos:  # planar RGB: samples before Y
            arr = np.moveaxis(arr, arr.ndim - 3, -1)
        arr = arr.reshape(-1, y, x, *(shape[s_pos],) if rgb else ())
        arr = arr if by_page else arr[z0:z1]
        return _gray(arr, path, kind) if rgb else arr

    origin = "OME metadata" if tkind == "ome" else "ImageJ metadata" if tkind == "imagej" else "TIFF tags"
    return _make(source, _stem(path), (n, y, x), dtype, found, f"{origin} of {path}", kind, read)


# --- Folder of slices


def _slice_header(path: Path) -> tuple[tuple[int, int], np.dtype]:
    """(H, W) and the dtype a slice decodes to (after RGB -> gray), from its header."""
    try:
        if path.suffix.lower() in TIFF_EXTS:
            with open_tiff(path) as tif:
                series = tif.series[0]
                shape, axes = series.shape, series.axes
                planes = int(np.prod([n for a, n in zip(axes, shape) if a not in "YXS"] or [1]))
                if planes > 1:
                    raise DataError(f"{path}: a {planes}-page TIFF in a folder of slices; expected one 2-D image per file")
                return (shape[axes.index("Y")], shape[axes.index("X")]), np.dtype(series.dtype)
        if path.suffix.lower() == ".png":
            with open(path, "rb") as f:
                head = f.read(26)
            if head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
                raise ValueError("not a PNG file")
            # IHDR: width, height, bit depth; OpenCV decodes 16-bit PNGs (gray or RGB) to uint16.
            w, h = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
            return (h, w), np.dtype(np.uint16 if head[24] == 16 else np.uint8)
        from PIL import Image

        with Image.open(path) as im:
            # What OpenCV (io._read_raw) decodes each PIL mode to.
            dtype = np.uint16 if im.mode.startswith("I;16") else np.int32 if im.mode == "I" \
                else np.float32 if im.mode == "F" else np.uint8
            return (im.height, im.width), np.dtype(dtype)
    except DataError:
        raise
    except Exception as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def _open_folder(source: str, folder: Path, kind: str) -> Volume:
    files = _list_files(folder, IMAGE_EXTS)
    if not files:
        raise DataError(f"{folder}: empty folder, no slices found (looked for {', '.join(IMAGE_EXTS)}); {STACK_HINT}")
    numbered = [(_number(f.stem), f) for f in files]
    if len(files) > 1:
        unnumbered = [f for n, f in numbered if n is None]
        if unnumbered:
            raise DataError(f"{unnumbered[0]}: no number in the name; the slices of {folder} are ordered by "
                            "the number in their names")
        numbered.sort(key=lambda t: t[0])
        for (n0, a), (n1, b) in zip(numbered, numbered[1:]):
            if n0 == n1:
                raise DataError(f"{a} and {b} have the same slice number {n0}")
        steps = sorted({n1 - n0 for (n0, _), (n1, _) in zip(numbered, numbered[1:])})
        if len(steps) > 1:  # missing slices: the stack is read as if they were not there
            (n0, a), (n1, b) = next((p, q) for p, q in zip(numbered, numbered[1:]) if q[0] - p[0] != steps[0])
            warnings.warn(f"{folder}: slice numbers are not evenly spaced ({a.name} is followed by {b.name}); "
                          "the slices are read as adjacent, so 3-D objects and measurements span the gap")
        elif steps and steps[0] > 1:
            warnings.warn(f"{folder}: slice numbers step by {steps[0]}; the z voxel size must be the distance "
                          "between these slices")
    files = [f for _, f in numbered]
    shape, dtype = _slice_header(files[0])
    for f in files[1:]:
        s, d = _slice_header(f)
        if (s, d) != (shape, dtype):
            raise DataError(f"{f}: slice is {s[0]} x {s[1]} {d} but {files[0].name} is {shape[0]} x {shape[1]} "
                            f"{dtype}; all slices of a stack must have the same shape and dtype")

    def read(z0: int, z1: int) -> np.ndarray:
        out = np.empty((z1 - z0, *shape), dtype)
        for i, f in enumerate(files[z0:z1]):
            arr = _to_2d(_read_raw(f, None), f, kind)
            if arr.shape != shape or arr.dtype != dtype:
                raise DataError(f"{f}: slice decodes as {arr.shape[0]} x {arr.shape[1]} {arr.dtype} "
                                f"but the stack is {shape[0]} x {shape[1]} {dtype}")
            out[i] = arr
        return out

    found = None
    if files[0].suffix.lower() in TIFF_EXTS:
        with open_tiff(files[0]) as tif:
            found = _tiff_voxel_nm(tif)
    return _make(source, folder.name, (len(files), *shape), dtype, found, f"metadata of {files[0]}", kind, read)


# --- HDF5 and Zarr arrays


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading {what} needs the '{module}' package (pip install {module})") from None


def _rgb_plane(shape: Sequence[int]) -> bool:
    """(H, W, 3 or 4): one colour image; no EM volume is 3 or 4 voxels across."""
    return len(shape) == 3 and shape[-1] in (3, 4) and shape[-2] > shape[-1]


def _array_plan(shape: Sequence[int], where: str) -> tuple[Callable[[int, int], tuple], tuple[int, int, int], bool]:
    """How to read (n, Y, X[, C]) slabs from an array of `shape` with no axis names.

    Returns (key(z0, z1) -> index tuple, (Z, Y, X), rgb). The last two axes are
    Y, X (a trailing axis of 3 or 4 after them is RGB(A), of 1 is dropped);
    singleton axes before them are dropped; at most one may be longer than 1.
    """
    shape = tuple(int(n) for n in shape)
    if _rgb_plane(shape):
        raise DataError(f"{where} is a single 2-D {'RGB' if shape[-1] == 3 else 'RGBA'} image "
                        f"({shape[0]} x {shape[1]} x {shape[2]}); {STACK_HINT}")
    tail: tuple = ()
    rgb = False
    if len(shape) >= 4 and shape[-1] in (1, 3, 4):
        rgb = shape[-1] != 1
        tail = (slice(None),) if rgb else (0,)
        shape = shape[:-1]
    if len(shape) < 3:
        dims = " x ".join(map(str, shape))
        raise DataError(f"{where} is a single 2-D image ({dims}); {STACK_HINT}")
    lead = shape[:-2]
    big = [i for i, n in enumerate(lead) if n > 1]
    if len(big) > 1:
        raise DataError(f"{where}: {len(shape)}-D data {_shape_str(shape)} has several axes longer than 1 "
                        "before (Y, X); expected one (Z, Y, X) stack")
    z_axis = big[0] if big else len(lead) - 1

    def key(z0: int, z1: int, yx: tuple = (slice(None), slice(None))) -> tuple:
        return tuple(slice(z0, z1) if i == z_axis else 0 for i in range(len(lead))) + tuple(yx) + tail

    return key, (lead[z_axis], shape[-2], shape[-1]), rgb


def _named_plan(shape: Sequence[int], names: Sequence[str], where: str
                ) -> tuple[Callable[[int, int], tuple], tuple[int, int, int], bool]:
    """`_array_plan` for arrays with named axes (OME-Zarr): drop singleton t/c, the rest must be z, y, x."""
    names = [n.lower() for n in names]
    if len(names) != len(shape):
        raise DataError(f"{where}: {len(names)} axes {names} for a {len(shape)}-D array")
    dropped = {i for i, (a, n) in enumerate(zip(names, shape)) if a in ("t", "c") and n == 1}
    kept = [a for i, a in enumerate(names) if i not in dropped]
    if kept == ["y", "x"]:
        raise DataError(f"{where} is a single 2-D image ({shape[-2]} x {shape[-1]}); {STACK_HINT}")
    if kept != ["z", "y", "x"]:
        dims = ", ".join(f"{a}={n}" for a, n in zip(names, shape))
        raise DataError(f"{where}: axes ({dims}) do not reduce to (z, y, x); expected one channel and time point")

    def key(z0: int, z1: int, yx: tuple = (slice(None), slice(None))) -> tuple:
        where_ = {"z": slice(z0, z1), "y": yx[0], "x": yx[1]}
        return tuple(0 if i in dropped else where_.get(a, slice(None)) for i, a in enumerate(names))

    return key, tuple(int(shape[names.index(a)]) for a in ("z", "y", "x")), False


def _listing(items: Sequence[tuple[str, Sequence[int], Any]]) -> str:
    return ", ".join(f"/{n} {_shape_str(s)} {d}" for n, s, d in sorted(items, key=lambda t: t[0])) or "none"


def _open_h5(source: str, path: Path, inner: str | None, kind: str) -> Volume:
    h5py = _require("h5py", "HDF5")
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        raise DataError(f"{path}: not a readable HDF5 file ({err})") from None
    with f:
        found_ds: list[tuple[str, tuple, Any]] = []
        f.visititems(lambda n, o: found_ds.append((n, o.shape, o.dtype)) if isinstance(o, h5py.Dataset) else None)
        if inner is not None:
            obj = f.get(inner)
            if not isinstance(obj, h5py.Dataset):
                raise DataError(f"{path}: no dataset /{inner}; datasets: {_listing(found_ds)}")
            key_name = inner
        else:
            three = [d for d in found_ds if len(d[1]) == 3 and not _rgb_plane(d[1])]
            if len(three) != 1:
                if not three and len(found_ds) == 1:
                    key_name = found_ds[0][0]  # one dataset, not 3-D: let the plan say what is wrong with it
                else:
                    what = "no 3-D dataset" if not three else f"{len(three)} 3-D datasets"
                    raise DataError(f"{path}: {what}; name one as {path}:/path/to/dataset "
                                    f"(datasets: {_listing(found_ds)})")
            else:
                key_name = three[0][0]
            obj = f[key_name]
        where = f"{path}:/{key_name}"
        key, shape, rgb = _array_plan(obj.shape, where)
        found = _attrs_voxel_nm(dict(obj.attrs))
        dtype = obj.dtype

    def read(z0: int, z1: int, yx: tuple = (slice(None), slice(None))) -> np.ndarray:
        with h5py.File(path, "r") as h:
            arr = h[key_name][key(z0, z1, yx)]
        return _gray(arr, Path(where), kind) if rgb else arr

    name = _stem(path) if inner is None else f"{_stem(path)}_{Path(key_name).name}"
    return _make(source, name, shape, dtype, found, f"attributes of {where}", kind, read, reads_yx=True)


def _ngff(attrs: dict) -> dict | None:
    """The first OME-Zarr multiscale of a group's attributes (NGFF 0.4, or 0.5 under "ome"), or None."""
    ms = attrs.get("multiscales") or (attrs.get("ome") or {}).get("multiscales")
    return ms[0] if isinstance(ms, list) and ms and isinstance(ms[0], dict) else None


def _ngff_scale(transforms: Any) -> list[float] | None:
    for t in transforms or ():
        if isinstance(t, dict) and t.get("type") == "scale" and "scale" in t:
            return [float(v) for v in t["scale"]]
    return None


def _ngff_voxel_nm(ms: dict, dataset: dict, names: list[str]) -> tuple[float | None, ...] | None:
    """(z, y, x) nm from the dataset's scale (times the multiscale's) and the axes' units."""
    scale = _ngff_scale(dataset.get("coordinateTransformations"))
    if scale is None or len(scale) != len(names):
        return None
    outer = _ngff_scale(ms.get("coordinateTransformations"))
    if outer is not None and len(outer) == len(scale):
        scale = [a * b for a, b in zip(scale, outer)]
    axes = ms.get("axes") or []
    units = [a.get("unit") if isinstance(a, dict) else None for a in axes]
    out = []
    for ax in ("z", "y", "x"):
        i = names.index(ax)
        per = _unit_nm(units[i]) if i < len(units) else None
        out.append(scale[i] * per if per is not None else None)
    return tuple(out)


def _open_zarr(source: str, path: Path, inner: str | None, kind: str) -> Volume:
    zarr = _require("zarr", "Zarr")
    try:
        root = zarr.open(store=str(path), mode="r")
    except Exception as err:
        raise DataError(f"{path}: not a readable Zarr store ({type(err).__name__}: {err})") from None

    def arrays(group) -> list[tuple[str, Any]]:
        return [(n, a) for n, a in group.members(max_depth=None) if isinstance(a, zarr.Array)]

    node, node_path = root, inner or ""
    if inner is not None:
        if isinstance(root, zarr.Array):
            raise DataError(f"{path} is an array, it has no /{inner}")
        try:
            node = root[inner]
        except KeyError:
            listing = _listing([(n, a.shape, a.dtype) for n, a in arrays(root)])
            raise DataError(f"{path}: no array or group /{inner}; arrays: {listing}") from None
    ms, names, dataset = None, None, None
    if isinstance(node, zarr.Array):
        # x.zarr/0 inside an OME-Zarr image: its parent's multiscales give axes and scale.
        parent_path, _, base = node_path.rpartition("/")
        parent = root[parent_path] if parent_path else root
        pms = _ngff(dict(parent.attrs)) if node_path and not isinstance(parent, zarr.Array) else None
        dataset = next((d for d in (pms or {}).get("datasets", []) if str(d.get("path")) == base), None)
        ms = pms if dataset is not None else None
        arr = node
    else:
        ms = _ngff(dict(node.attrs))
        if ms is not None:
            datasets = ms.get("datasets") or []
            if not datasets:
                raise DataError(f"{path}: OME-Zarr multiscales lists no datasets")
            dataset = datasets[0]
            try:
                arr = node[str(dataset["path"])]
            except KeyError:
                raise DataError(f"{path}: OME-Zarr dataset '{dataset['path']}' is missing") from None
            node_path = f"{node_path}/{dataset['path']}".strip("/")
        else:
            found_arrays = arrays(node)
            if not found_arrays:
                raise DataError(f"{path}{'/' + inner if inner else ''}: Zarr group without arrays; {STACK_HINT}")
            three = [(n, a) for n, a in found_arrays if a.ndim == 3 and not _rgb_plane(a.shape)]
            if len(three) != 1 and not (not three and len(found_arrays) == 1):
                what = "no 3-D array" if not three else f"{len(three)} 3-D arrays"
                listing = _listing([(n, a.shape, a.dtype) for n, a in found_arrays])
                raise DataError(f"{path}: {what}; name one as {path}/path/to/array (arrays: {listing})")
            name_in, arr = (three or found_arrays)[0]
            node_path = f"{node_path}/{name_in}".strip("/")
    where = f"{path}/{node_path}" if node_path else str(path)
    if ms is not None:
        axes = ms.get("axes") or []
        names = [a.get("name", "") if isinstance(a, dict) else str(a) for a in axes]
        if not names:  # NGFF < 0.3 had no axes: always 5-D t, c, z, y, x
            names = list("tczyx")[-arr.ndim:]
        key, shape, rgb = _named_plan(arr.shape, names, where)
        found = _ngff_voxel_nm(ms, dataset, names)
        origin = f"OME-Zarr metadata of {path}"
    else:
        key, shape, rgb = _array_plan(arr.shape, where)
        found = _attrs_voxel_nm(dict(arr.attrs))
        origin = f"attributes of {where}"

    def read(z0: int, z1: int, yx: tuple = (slice(None), slice(None))) -> np.ndarray:
        data = np.asarray(arr[key(z0, z1, yx)])
        return _gray(data, Path(where), kind) if rgb else data

    name = _stem(path) if inner is None else f"{_stem(path)}_{Path(node_path).name}"
    return _make(source, name, shape, arr.dtype, found, origin, kind, read, reads_yx=True)


def _json_or_empty(path: Path) -> dict:
    """A JSON object file's contents, or {} when it is unreadable or not an object (listing only)."""
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def _open_n5(source: str, path: Path, inner: str | None, kind: str) -> Volume:
    """An N5 dataset (a folder with attributes.json holding `dimensions`), read with tensorstore.

    N5 lists dimensions fastest-first (x, y, z, as the Java tools write them,
    unless an `axes` attribute says otherwise), so the array is transposed to
    (z, y, x). Voxel size: `resolution` or `pixelResolution` (x, y, z order,
    `unit` default nm).
    """
    ts = _require("tensorstore", "N5")
    folder = path / inner.strip("/") if inner else path
    attrs_file = folder / "attributes.json"
    if not attrs_file.is_file():
        raise DataError(f"{folder}: not an N5 dataset (no attributes.json)")
    try:
        attrs = json.loads(attrs_file.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{attrs_file}: unreadable N5 attributes ({err})") from None
    if "dimensions" not in attrs:
        found = sorted(p.parent.relative_to(path).as_posix() for p in path.rglob("attributes.json")
                       if "dimensions" in _json_or_empty(p))
        raise DataError(f"{folder}: an N5 container, not a dataset; name one as {path}/<dataset> "
                        f"(datasets: {', '.join(found) or 'none'})")
    try:
        arr = ts.open({"driver": "n5", "kvstore": {"driver": "file", "path": str(folder)}}, read=True).result()
    except Exception as err:  # tensorstore raises ValueError with its own status text
        raise DataError(f"{folder}: not a readable N5 dataset ({err})") from None
    axes = [str(a).lower() for a in attrs.get("axes", ["x", "y", "z"][: arr.ndim])]
    if sorted(axes) != ["x", "y", "z"]:
        raise DataError(f"{folder}: N5 axes {axes}; expected x, y and z")
    arr = arr.transpose([axes.index(a) for a in "zyx"])
    res = attrs.get("resolution") or (attrs.get("pixelResolution") or {}).get("dimensions")
    unit = (attrs.get("pixelResolution") or {}).get("unit", attrs.get("unit", "nm"))
    found = None
    if isinstance(res, list) and len(res) == 3 and _unit_nm(unit):
        found = [float(res[axes.index(a)]) * _unit_nm(unit) for a in "zyx"]

    def read(z0: int, z1: int, yx: tuple = (slice(None), slice(None))) -> np.ndarray:
        return np.asarray(arr[z0:z1, yx[0], yx[1]].read().result())

    name = _stem(path) if inner is None else f"{_stem(path)}_{Path(inner).name}"
    return _make(source, name, tuple(arr.shape), np.dtype(arr.dtype.numpy_dtype), found, f"attributes of {folder}",
                 kind, read, reads_yx=True)


# ----------------------------------------------------------------------------
# Writing


def write_volume_tiff(path: str | Path, array: np.ndarray, voxel_size_nm: Sequence[float] | None = None,
                      compression: str | None = "zlib", bigtiff: bool | None = None) -> None:
    """Write a (Z, Y, X) volume as a TIFF that Fiji and `open_volume` read with its voxel size.

    uint8, uint16 and float32 become an ImageJ hyperstack (axes ZYX, unit "um",
    X/YResolution in pixels per µm, `spacing` in µm); other dtypes (uint32, ...)
    and volumes that need BigTIFF (bigtiff=None: past ~4 GiB), which ImageJ's
    format cannot hold, become an OME-TIFF with PhysicalSize* in µm. bool is
    written as 0/1 uint8. voxel_size_nm: (z, y, x) nm, or None to write none.
    Written atomically: a temporary file in the same folder, then a rename.
    """
    path = Path(path)
    arr = np.asarray(array)
    if arr.ndim != 3:
        raise ValueError(f"write_volume_tiff expects a (Z, Y, X) array, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    if voxel_size_nm is not None:
        vox = tuple(float(v) for v in voxel_size_nm)
        if len(vox) != 3 or not all(math.isfinite(v) and v > 0 for v in vox):
            raise ValueError(f"voxel_size_nm must be 3 positive numbers (z, y, x), got {voxel_size_nm!r}")
    big = arr.nbytes > _BIGTIFF_BYTES if bigtiff is None else bool(bigtiff)
    if arr.dtype in (np.uint8, np.uint16, np.float32) and not big:
        metadata: dict[str, Any] = {"axes": "ZYX"}
        kwargs: dict[str, Any] = {"imagej": True}
        if voxel_size_nm is not None:
            kwargs["resolution"] = (1000.0 / vox[2], 1000.0 / vox[1])
            metadata.update(spacing=vox[0] / 1000.0, unit="um")
    else:
        metadata = {"axes": "ZYX"}
        kwargs = {"ome": True, "bigtiff": big}
        if voxel_size_nm is not None:
            for ax, v in zip("ZYX", vox):
                metadata[f"PhysicalSize{ax}"] = v / 1000.0
                metadata[f"PhysicalSize{ax}Unit"] = "µm"
            # Also as tags, for readers that ignore OME-XML (pixels per cm).
            kwargs.update(resolution=(1e7 / vox[2], 1e7 / vox[1]), resolutionunit="CENTIMETER")
    # Not runlock.atomic_write_bytes: that needs the encoded file in memory,
    # a second copy of a volume that may be many GB.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        if compression == "zlib":
            # Level 1: 1.7x faster than the default 6 on float32 probability maps, 2% larger files.
            kwargs["compressionargs"] = {"level": 1}
        tifffile.imwrite(tmp, arr, photometric="minisblack", compression=compression, metadata=metadata, **kwargs)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def warn_blank_slices(source: str, blank: Sequence[int]) -> None:
    """One warning naming the slices of a volume that hold a single grey value (a missing or blank
    section): every mitochondrion crossing one is cut in two there, with nothing else to say so."""
    import warnings

    blank = [int(z) for z in blank]
    if blank:
        shown = ", ".join(map(str, blank[:10])) + (f" and {len(blank) - 10} more" if len(blank) > 10 else "")
        warnings.warn(f"{source}: slice(s) {shown} (from 0) hold a single grey value (a blank or missing "
                      "section?); mitochondria crossing them are cut in two there: remove or replace those "
                      "slices for whole objects", UserWarning, stacklevel=2)
