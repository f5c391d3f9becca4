"""Reading EM images, label masks and stacks, with errors that name the file.

Three layouts are understood (see `find_pairs`):

(a) split layout (MitoEM as distributed for BiaPy, and `../shared/data`):
    `<dir>/{train,val,test}/x/*.png|tif` with `<dir>/<split>/y/*.tif|png`,
    paired by sorted order and checked by the number in the file names;
(b) an image folder (or glob) plus a label folder (or glob), paired by stem;
(c) a multi-page TIFF image stack plus a label stack of the same shape.

Images are 2-D 8- or 16-bit grayscale (RGB is converted with a warning;
signed, wider-integer and float images are shifted or mapped linearly onto
uint16). Labels are binary (0/1 or 0/255) or instance ids; foreground is label > 0.
"""
from __future__ import annotations

import contextlib
import functools
import json
import glob as _glob
import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_EXTS = (".tif", ".tiff", ".png", ".bmp", ".jpg", ".jpeg")
LOSSY_EXTS = (".jpg", ".jpeg")
TIFF_EXTS = (".tif", ".tiff")


class DataError(ValueError):
    """Bad input data; the message names the file and the problem."""


@dataclass(frozen=True)
class SlicePair:
    """One 2-D slice: an image file (page `page` of a stack, if set) and its label."""

    image: Path
    label: Path | None = None
    page: int | None = None

    @property
    def name(self) -> str:
        stem = self.image.stem
        return stem if self.page is None else f"{stem}_z{self.page:04d}"


# ----------------------------------------------------------------------------
# Single files


def _read_raw(path: Path, page: int | None) -> np.ndarray:
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a folder, expected an image file")
    ext = path.suffix.lower()
    try:
        if ext in TIFF_EXTS:
            arr = _read_tiff_plane(path, page)
        else:
            if page not in (None, 0):
                raise DataError(f"{path}: page {page} requested from a single-page {ext} file")
            arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise DataError(f"{path}: not a readable image (unsupported or corrupt {ext or 'file'})")
            if arr.ndim == 3 and arr.shape[2] in (3, 4):  # OpenCV gives BGR(A); make it RGB(A)
                # Only the colour channels turn round: [..., ::-1] would make BGRA into ARGB.
                arr = np.concatenate([arr[..., 2::-1], arr[..., 3:]], axis=-1)
    except DataError:
        raise
    except Exception as err:  # tifffile raises many types for corrupt files
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None
    return np.asarray(arr)


def _planes(shape: tuple[int, ...]) -> int:
    """Number of 2-D planes in a TIFF series shape ((Z, H, W), (Z, H, W, 3), (H, W), ...)."""
    if len(shape) >= 3 and shape[-1] in (3, 4):
        return int(np.prod(shape[:-3])) if len(shape) > 3 else 1
    return int(np.prod(shape[:-2])) if len(shape) > 2 else 1


# What tifffile logs when a file ends early or its page chain is broken. It then guesses a
# shorter stack (a truncated 6-slice ImageJ stack opens as one 2-D image) instead of failing.
_DAMAGE = ("invalid page offset", "failed to read", "failed to reshape", "corrupted", "truncated")


class _TiffLog(logging.Handler):
    """Collects what tifffile logs in this thread while one file is open (other threads' files
    are not this one's damage)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.thread = threading.get_ident()
        self.damage: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.thread == self.thread and any(k in message for k in _DAMAGE):
            self.damage.append(message.split("> ", 1)[-1])


_TIFF_LOG = logging.getLogger("tifffile")
_TIFF_LOG_LOCK = threading.Lock()
_tiff_log_users: list[tuple[bool, int]] = []  # one entry per open file; the first holds what to restore


@contextlib.contextmanager
def _listening(seen: _TiffLog) -> Iterator[None]:
    """tifffile's log goes to `seen`, not the screen, while any thread has a TIFF open. Its level
    is set too: an application that quiets the root logger must not quiet this check."""
    with _TIFF_LOG_LOCK:
        _tiff_log_users.append((_TIFF_LOG.propagate, _TIFF_LOG.level))
        _TIFF_LOG.propagate = False
        _TIFF_LOG.setLevel(logging.WARNING)
        _TIFF_LOG.addHandler(seen)
    try:
        yield
    finally:
        with _TIFF_LOG_LOCK:
            _TIFF_LOG.removeHandler(seen)
            propagate, level = _tiff_log_users.pop()
            if not _tiff_log_users:  # the last one out restores what the first one found
                _TIFF_LOG.propagate = propagate
                _TIFF_LOG.setLevel(level)


@contextlib.contextmanager
def open_tiff(path: str | Path) -> Iterator[tifffile.TiffFile]:
    """`tifffile.TiffFile(path)`, raising DataError naming the file when it cannot be read or
    is damaged (truncated download, broken page chain), even where tifffile itself would carry
    on with what it could guess. The check covers what the `with` body touched (series, pages,
    data), so read the series inside it."""
    path = Path(path)
    seen = _TiffLog()
    try:
        with _listening(seen), tifffile.TiffFile(path) as tif:
            yield tif
    except DataError:
        raise
    except Exception as err:  # tifffile raises many types for corrupt files
        if seen.damage:
            raise DataError(f"{path}: damaged TIFF ({seen.damage[0]}); download or export it again") from None
        raise DataError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from None
    if seen.damage:
        raise DataError(f"{path}: damaged TIFF ({seen.damage[0]}); download or export it again")


@functools.lru_cache(maxsize=2)
def _whole_series(path: Path, mtime: float) -> np.ndarray:
    with open_tiff(path) as tif:
        return tif.asarray(series=0)


def _read_tiff_plane(path: Path, page: int | None) -> np.ndarray:
    """Plane `page` of a TIFF; page None: its only plane (the first of a stack, with a warning)."""
    with open_tiff(path) as tif:
        series = tif.series[0]
        n = _planes(series.shape)
        if page is None:
            if n > 1:  # one slice asked of a stack: say so, or its other slices go unnoticed
                warnings.warn(f"{path}: a stack of {n} slices; reading its first only (pass page=, or read it "
                              "as a stack: xmdl_tf.volume_io.open_volume, analyze --volume)", stacklevel=4)
            page = 0
        if page >= n:
            raise DataError(f"{path}: page {page} requested but the stack has {n} slices")
        if n == 1:
            return series.asarray()
        pages = series.pages
        if len(pages) == n and pages[page] is not None:
            return pages[page].asarray()
    # One TIFF page holds the whole volume: read it once, keep it for the next planes.
    vol = _whole_series(path, path.stat().st_mtime)
    return vol.reshape(-1, *vol.shape[-3 if vol.shape[-1] in (3, 4) and vol.ndim > 3 else -2:])[page]


def rgb_to_grey(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) colour -> (...) grey by the ITU-R 601 weights, in the input's dtype (rounded for
    integers; a float image in 0..1 stays one)."""
    grey = rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    return (grey.round() if rgb.dtype.kind in "iub" else grey).astype(rgb.dtype)


def _to_2d(arr: np.ndarray, path: Path, what: str) -> np.ndarray:
    # Drop singleton stack/channel axes, never height or width (a 1 x 1 image stays 2-D).
    while arr.ndim > 2 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and what == "label":
        return _colour_label(arr, path)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
            warnings.warn(f"{path}: RGB {what} converted to grayscale", stacklevel=3)
        arr = rgb_to_grey(rgb)
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D {what}, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{path}: empty {what}")
    return arr


def _colour_label(arr: np.ndarray, path: Path) -> np.ndarray:
    """(H, W, 3|4) label -> (H, W) ids: grey (equal channels) as it is; a mask drawn only in alpha (one
    colour everywhere) as its alpha; else one id per colour, background the black pixels (or, with no
    black, the most common colour). Grey by luminance would lose dark colours (0, 0, 3 -> 0) and merge
    colours of equal luminance, i.e. drop or merge mitochondria."""
    rgb = arr[..., :3]
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        if arr.shape[-1] == 4 and rgb.min() == rgb.max() and arr[..., 3].min() != arr[..., 3].max():
            return _alpha_mask(arr, path)
        return rgb[..., 0]
    if rgb.dtype.kind not in "ub" or rgb.dtype.itemsize > 1:
        raise DataError(f"{path}: colour label of dtype {rgb.dtype}; save labels as one channel of ids")
    key = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    colours, inverse, counts = np.unique(key, return_inverse=True, return_counts=True)
    black = np.flatnonzero(colours == 0)
    bg = int(black[0]) if len(black) else int(np.argmax(counts))
    ids = np.where(np.arange(len(colours)) < bg, np.arange(len(colours)) + 1, np.arange(len(colours)))
    ids[bg] = 0
    dtype = np.uint16 if len(colours) <= 65536 else np.uint32
    warnings.warn(f"{path}: colour label read as {len(colours) - 1} label(s), one per colour, on "
                  + ("black" if len(black) else f"the most common colour #{colours[bg]:06x}") + " background",
                  stacklevel=4)
    return ids.astype(dtype)[inverse.reshape(key.shape)]


def _alpha_mask(arr: np.ndarray, path: Path) -> np.ndarray:
    warnings.warn(f"{path}: label drawn in the alpha channel only; its alpha is read as the mask", stacklevel=5)
    return arr[..., 3]


def read_image(path: str | Path, page: int | None = None, allow_constant: bool = False) -> np.ndarray:
    """Read one EM slice as a 2-D uint8 or uint16 array (H, W) (`to_em_dtype`: float images,
    e.g. 0..1, are mapped linearly onto 0..65535, which the percentile normalisation does not see).

    Raises DataError for missing, unreadable, non-2-D or empty images, for
    unsupported dtypes and, unless allow_constant (a viewer showing it), for
    constant images, which have nothing to segment.
    """
    path = Path(path)
    raw = _to_2d(_read_raw(path, page), path, "image")
    arr = to_em_dtype(raw, path)
    if arr.min() == arr.max() and not allow_constant:
        raise DataError(f"{path}: constant image (every pixel is {raw.flat[0]}); nothing to segment")
    return arr


def as_em_slice(array, name: str = "image") -> np.ndarray:
    """An in-memory EM slice as `read_image` returns a file's: (H, W) uint8 or uint16.

    array: any array-like (NumPy, memory-mapped, dask, zarr, nested lists) of any numeric dtype,
    taken by the rules files are read with: leading singleton axes and a trailing channel of 1 are
    dropped ((1, H, W), (H, W, 1)), RGB(A) becomes grey (with a warning unless its channels are
    equal), and grey values go through `to_em_dtype` (bool -> 0/255, signed integers shifted,
    floats such as 0..1 mapped linearly onto 0..65535: the percentile normalisation sees none of
    it). A (H, W) uint8/uint16 array is returned as it is (no copy). The input is never modified.
    DataError naming `name` for a stack, an empty or non-numeric array, or NaN / infinite values.
    """
    arr = np.asarray(array)
    try:
        arr = _to_2d(arr, Path(name), "image")
    except DataError:
        if arr.ndim >= 3:
            raise DataError(f"{name}: expected one 2-D (H, W) slice, got an array of shape {arr.shape}; analyse a "
                            "stack slice by slice, or as a volume (xmdl_tf.volume.analyze_volume)") from None
        raise
    return to_em_dtype(arr, name)


def as_em_volume(array, name: str = "volume") -> np.ndarray:
    """An in-memory EM volume as (Z, Y, X) uint8 or uint16, by the rules of `as_em_slice` (one grey-value
    map for the whole volume). array: any array-like (NumPy, memory-mapped, dask, zarr); leading
    singleton axes and a trailing channel of 1 are dropped, RGB(A) slices become grey. DataError naming
    `name` for a 2-D image, an empty array or NaN / infinite values.
    """
    arr = np.asarray(array)
    while arr.ndim > 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim == 4 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim == 4 and arr.shape[-1] in (3, 4) and arr.size:
        arr = np.stack([_to_2d(a, Path(name), "image") for a in arr])
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and arr.shape[-2] > arr.shape[-1]:
        raise DataError(f"{name}: shape {arr.shape} is one 2-D colour image, not a (Z, Y, X) volume")
    if arr.ndim != 3:
        hint = "; for one slice use xmdl_tf.analyze.analyze_image (or image[None], a one-slice volume)" if arr.ndim == 2 else ""
        raise DataError(f"{name}: expected a 3-D (Z, Y, X) volume, got an array of shape {arr.shape}{hint}")
    if arr.size == 0:
        raise DataError(f"{name}: empty volume of shape {arr.shape}")
    return to_em_dtype(arr, name)


def to_em_dtype(arr: np.ndarray, path: str | Path, value_range: tuple[float, float] | None = None,
                integral: bool | None = None) -> np.ndarray:
    """An EM image or stack of any numeric dtype as uint8 or uint16, the one rule for slices,
    volumes and napari layers: bool -> 0/255 uint8; uint8 and uint16 unchanged; other integers
    `_int_to_uint16`; floats whose values are all integers in 0..65535 cast; other floats mapped
    linearly onto 0..65535 (`_float_to_uint16`; a constant one onto 0). The percentile
    normalisation sees none of these maps. value_range, integral: the (min, max) of a whole
    volume and whether all its values are integers (`Volume.value_stats`), so that every slab of
    it gets the same map; default this array's own. DataError names `path`.
    """
    path = Path(path)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * np.uint8(255)
    if arr.dtype in (np.uint8, np.uint16):
        return arr
    if arr.dtype.kind in "iu":
        return _int_to_uint16(arr, path, value_range)
    if arr.dtype.kind != "f":
        raise DataError(f"{path}: unsupported image dtype {arr.dtype}; expected 8- or 16-bit grayscale")
    if value_range is None:
        lo, hi = float(arr.min()), float(arr.max())  # NaN where any is: neither test below passes
        integral = bool(np.array_equal(arr, np.round(arr)))
    else:
        lo, hi = map(float, value_range)
    if integral and 0 <= lo and hi <= 65535:
        return arr.astype(np.uint16)
    return _float_to_uint16(arr, path, None if value_range is None else (lo, hi))


def _int_to_uint16(arr: np.ndarray, path: Path, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """An integer EM image as uint16: values in 0..65535 kept; signed data (e.g. int16 MRC from
    SerialEM, with negative grey values) shifted by its minimum when its range fits, else mapped
    linearly as floats are. The percentile normalisation sees neither an offset nor a linear map.
    value_range: (lo, hi) of a whole volume, so that every slab gets the same map."""
    lo, hi = (int(arr.min()), int(arr.max())) if value_range is None else (int(value_range[0]), int(value_range[1]))
    if lo >= 0 and hi <= 65535:
        return arr.astype(np.uint16)
    if hi - lo <= 65535:
        return (arr.astype(np.int64) - lo).astype(np.uint16)
    return _float_to_uint16(arr.astype(np.float64), path, (lo, hi))


def _float_to_uint16(arr: np.ndarray, path: Path, value_range: tuple[float, float] | None = None) -> np.ndarray:
    """A float EM image (e.g. 0..1 or calibrated values) mapped linearly onto 0..65535.

    The normalisation is percentile-based, so a linear map leaves what the
    model sees unchanged (up to 1/65535 quantisation). value_range: (lo, hi)
    mapped to (0, 65535), default the image's own; a volume passes its global
    range so that every slab gets the same map.
    """
    finite = np.isfinite(arr)
    if not finite.any():
        raise DataError(f"{path}: float image with no finite pixel value")
    if not finite.all():
        raise DataError(f"{path}: float image with NaN or infinite pixels ({int((~finite).sum())} of {arr.size})")
    lo, hi = (float(arr.min()), float(arr.max())) if value_range is None else map(float, value_range)
    if hi == lo:  # constant: whether that is an error is the caller's to say
        return np.zeros(arr.shape, np.uint16)
    return np.round((arr.astype(np.float64) - lo) * (65535.0 / (hi - lo))).astype(np.uint16)


def read_label(path: str | Path, page: int | None = None) -> np.ndarray:
    """Read a label image as a 2-D integer array (H, W); foreground is > 0.

    Binary masks (0/1, 0/255) and instance-id images are returned unchanged.
    Lossy formats (JPEG) are refused: compression changes the values at every
    edge, and no threshold recovers a mask whose values mean different things
    (0/1 mitochondria with 255 unlabelled reads back as 255 = foreground).
    """
    path = Path(path)
    if path.suffix.lower() in LOSSY_EXTS:
        raise DataError(f"{path}: labels must be lossless; JPEG compression changes the label values at every "
                        "edge, so this mask cannot be trusted; export it again as PNG or TIFF")
    arr = _to_2d(_read_raw(path, page), path, "label")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.array_equal(arr, np.round(arr)) or arr.min() < 0:
            raise DataError(f"{path}: label has non-integer or negative values; expected a mask or instance ids")
        arr = arr.astype(np.uint32)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.signedinteger):
        if arr.min() < 0:
            raise DataError(f"{path}: label has negative values")
        arr = arr.astype(np.uint32)
    return arr


def stack_depth(path: str | Path) -> int:
    """Number of 2-D pages in a TIFF (1 for other formats)."""
    path = Path(path)
    if path.suffix.lower() not in TIFF_EXTS:
        return 1
    with open_tiff(path) as tif:
        return _planes(tif.series[0].shape)


def dataset_info(folder: str | Path) -> dict:
    """A data set's dataset.json (written by the data_prep converters), or {} when absent or unreadable."""
    meta = Path(folder) / "dataset.json"
    try:
        info = json.loads(meta.read_text()) if meta.is_file() else {}
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def dataset_pixel_size_nm(folder: str | Path) -> float | None:
    """The pixel size (nm) its dataset.json states (the first value of a list), or None.

    DataError naming the file for a value no EM pixel has (`cli.PIXEL_SIZE_RANGE_NM`: 0.005
    is a micrometre, a negative one a typo): resampling by it would train or score nonsense.
    """
    from .cli import PIXEL_SIZE_RANGE_NM

    value = dataset_info(folder).get("pixel_size_nm")
    try:
        px = float(value[0] if isinstance(value, list) else value) if value is not None else None
    except (TypeError, ValueError, IndexError):
        return None
    lo, hi = PIXEL_SIZE_RANGE_NM
    if px is not None and not lo <= px <= hi:
        raise DataError(f"{Path(folder) / 'dataset.json'}: pixel_size_nm {px:g} is outside the plausible range "
                        f"{lo:g}-{hi:g} nm for EM (a unit mistake? nm per pixel, or null when unknown)")
    return px


def set_pixel_sizes(data: list[str | Path], given: list[float | None] | None) -> list[float | None]:
    """Each set's pixel size (nm) for slices whose files do not state one: the one given, else its
    dataset.json's (`dataset_pixel_size_nm`, which refuses an implausible value), else None."""
    return [g if g is not None else dataset_pixel_size_nm(d) for g, d in zip(given or [None] * len(data), data)]


def set_ignore_values(data: list[str | Path], split: str, given: int | None) -> list[int | None]:
    """Each set's label value of unlabelled pixels on `split`: the one given, else its dataset.json's
    (`dataset_ignore_value`); DataError when it would swallow every mitochondrion pixel of the split
    (`check_ignore_value`: 0/255 masks and 255), checked before anything is predicted."""
    out = []
    for d in data:
        value = given if given is not None else dataset_ignore_value(d)
        if value is not None:
            check_ignore_value(check_labels(find_pairs(d, split), value), value)
        out.append(value)
    return out


def dataset_ignore_value(folder: str | Path) -> int | None:
    """The label value its dataset.json marks as unlabelled ("ignore_value", as napari's corrections
    write it), or None."""
    value = dataset_info(folder).get("ignore_value")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def read_pixel_size_nm(path: str | Path) -> float | None:
    """Pixel size in nm from TIFF metadata (ImageJ or OME or resolution tags), or None.

    Non-square pixels (x and y sizes more than 1% apart) are warned about: the toolkit measures in
    one pixel size, x's. A unit it does not know gives None (not a guess).
    """
    path = Path(path)
    if path.suffix.lower() not in TIFF_EXTS or not path.is_file():
        return None
    try:
        x, y = _pixel_sizes_xy(path)
    except Exception:  # noqa: BLE001 - metadata is optional: unreadable means unknown
        return None
    if x is not None and y is not None and abs(x - y) > 0.01 * max(x, y):
        warnings.warn(f"{path}: pixels are not square ({x:g} nm wide, {y:g} nm high); measurements use "
                      f"{x:g} nm for both, so areas are off by x{y / x:.3g}: resample the image to square pixels",
                      stacklevel=2)
    return x


def _pixel_sizes_xy(path: Path) -> tuple[float | None, float | None]:
    """(x, y) pixel size in nm from one TIFF's OME or ImageJ/resolution metadata (None where unknown)."""
    with tifffile.TiffFile(path) as tif:
        if tif.ome_metadata:
            sizes = []
            for axis in "XY":
                m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', tif.ome_metadata)
                unit = re.search(rf'PhysicalSize{axis}Unit="([^"]+)"', tif.ome_metadata)
                scale = _UNIT_NM.get(unit.group(1) if unit else "µm")  # OME's default unit is the micrometre
                sizes.append(float(m.group(1)) * scale if m and scale else None)
            if sizes[0] is not None:
                return sizes[0], sizes[1]
        page = tif.pages[0]
        unit = tif.imagej_metadata.get("unit") if tif.imagej_metadata else None
        if unit is None:
            res_unit = page.tags.get("ResolutionUnit")
            code = int(res_unit.value) if res_unit is not None else 2
            unit = {3: "cm", 2: "inch"}.get(code)
            if unit == "inch":
                return None, None  # 72 dpi etc. is a display setting, not a pixel size
        scale = _UNIT_NM.get(unit)
        out = []
        for name in ("XResolution", "YResolution"):
            tag = page.tags.get(name)
            num, den = tag.value if tag is not None else (0, 1)
            out.append(scale * den / num if scale is not None and num else None)
        return out[0], out[1]


_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "µm": 1000.0, "μm": 1000.0, "um": 1000.0, "micron": 1000.0,
            "micrometer": 1000.0, "\\u00B5m": 1000.0, "mm": 1e6, "millimeter": 1e6, "cm": 1e7, "m": 1e9,
            "Å": 0.1, "angstrom": 0.1, "Angstrom": 0.1, "pm": 1e-3, "picometer": 1e-3}


# ----------------------------------------------------------------------------
# Layouts


def _list_files(folder: Path, exts: tuple[str, ...]) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def _number(stem: str) -> int | None:
    nums = re.findall(r"\d+", stem)
    return int(nums[-1]) if nums else None


def split_pairs(root: str | Path, split: str = "train", require_labels: bool = True) -> list[SlicePair]:
    """Layout (a): `<root>/<split>/x/*` paired with `<root>/<split>/y/*`.

    By name when every image has a label named after it (`a.png` <-> `a.tif`,
    `a_mask.tif`); else by sorted order (BiaPy's rule), where the numbers in
    the names (im0050.png / seg0050.tif) must agree and no label named after
    one image may land on another.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data folder not found")
    xdir, ydir = root / split / "x", root / split / "y"
    if not xdir.is_dir():
        raise DataError(f"{xdir}: missing image folder (expected the layout <dir>/{split}/x and <dir>/{split}/y)")
    images = _list_files(xdir, IMAGE_EXTS)
    if not images:
        raise DataError(f"{xdir}: no images found (looked for {', '.join(IMAGE_EXTS)})")
    if not ydir.is_dir():
        if require_labels:
            raise DataError(f"{ydir}: missing label folder")
        return [q for p in images for q in _pages(p, None)]
    labels = _list_files(ydir, LABEL_EXTS)
    _refuse_shared_stems(images)
    _refuse_shared_stems(labels)
    index = LabelIndex(ydir)
    named = {img: index._by_stem.get(img.stem) for img in images}
    if len(images) != len(labels):
        raise DataError(f"{xdir} has {len(images)} images but {ydir} has {len(labels)} labels"
                        + _unmatched(images, labels, index))
    if all(named.values()) and len(set(named.values())) == len(images):
        return [q for img in images for q in _pages(img, named[img])]
    pairs = []
    for img, lbl in zip(images, labels):
        ni, nl = _number(img.stem), _number(lbl.stem)
        if ni is not None and nl is not None and ni != nl:
            raise DataError(f"{img} is paired with {lbl} by sorted order but their numbers differ ({ni} vs {nl})")
        if named[img] not in (None, lbl):
            raise DataError(f"{img} is paired with {lbl.name} by sorted order, but {named[img].name} is named after "
                            "it; name every label after its image (a.png <-> a.tif or a_mask.tif), or number "
                            "images and labels alike")
        pairs += _pages(img, lbl)
    return pairs


def _refuse_shared_stems(files: list[Path]) -> None:
    """Two files of one folder with one name (`im0000.png` and `im0000.tif`): which is the slice?"""
    seen: dict[str, Path] = {}
    for f in files:
        if f.stem in seen:
            raise DataError(f"{f.parent}: {seen[f.stem].name} and {f.name} share the name {f.stem}; keep one")
        seen[f.stem] = f


def _unmatched(images: list[Path], labels: list[Path], index: "LabelIndex") -> str:
    """'; no label for X' / '; no image for Y' when names or numbers tell which file is alone."""
    found = {img: index.find(img) for img in images}
    alone = [img for img, lbl in found.items() if lbl is None]
    if alone and len(images) > len(labels):
        return f"; no label named or numbered like {alone[0].name}"
    used = set(found.values())
    extra = [lbl for lbl in labels if lbl not in used]
    if extra and len(labels) > len(images) and not alone:
        return f"; no image named or numbered like {extra[0].name}"
    return ""


def _pages(image: Path, label: Path | None) -> list[SlicePair]:
    """One pair per slice: a multi-page TIFF gives one per page (with a label stack of as many pages)."""
    n = stack_depth(image)
    if n == 1:
        return [SlicePair(image, label)]
    if label is not None and stack_depth(label) != n:
        raise DataError(f"{image} has {n} slices but its label {label} has {stack_depth(label)}")
    return [SlicePair(image, label, z) for z in range(n)]


_LABEL_SUFFIXES = ("_mask", "_masks", "_label", "_labels", "_seg", "_gt", "_groundtruth")


def _expand(spec: str | Path, exts: tuple[str, ...]) -> list[Path]:
    spec_s = str(spec)
    if any(c in spec_s for c in "*?["):
        files = sorted(Path(p) for p in _glob.glob(spec_s) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec_s}: no files match this pattern")
        return files
    path = Path(spec)
    if not path.exists():
        raise DataError(f"{path}: not found (no such file or folder)")
    if path.is_file():
        return [path]
    files = _list_files(path, exts)
    if not files:
        raise DataError(f"{path}: no images found (looked for {', '.join(exts)})")
    return files


class LabelIndex:
    """Label files found by an image's stem (`a.png` <-> `a.tif`, `a_mask.tif`, `a_label.png`, ...)
    or, failing that, by the number in its name (`im0050.png` <-> `seg0050.tif`)."""

    def __init__(self, spec: str | Path):
        self.spec = spec
        self.files = _expand(spec, LABEL_EXTS)
        self._by_stem: dict[str, Path] = {}
        self._by_number: dict[int | None, list[Path]] = {}
        for f in self.files:
            stem = f.stem
            for suf in _LABEL_SUFFIXES:
                if stem.lower().endswith(suf):
                    stem = stem[: -len(suf)]
                    break
            self._by_stem[stem] = f
            self._by_number.setdefault(_number(f.stem), []).append(f)

    def find(self, image: Path, by_number: bool = True) -> Path | None:
        found = self._by_stem.get(image.stem)
        n = _number(image.stem)
        if found is None and by_number and n is not None and len(self._by_number.get(n, [])) == 1:
            found = self._by_number[n][0]
        return found


def folder_pairs(images: str | Path, labels: str | Path | None = None) -> list[SlicePair]:
    """Layout (b): image folder or glob plus label folder or glob, paired by file stem.

    A label may carry a suffix such as `_mask` or `_label` (`a.png` <-> `a_mask.tif`); failing
    that, by the number in the name when exactly one label carries it (`im0050.png` <->
    `seg0050.tif`), as `analyze --labels` pairs.
    """
    img_files = _expand(images, IMAGE_EXTS)
    if labels is None:
        return [SlicePair(p) for p in img_files]
    index = LabelIndex(labels)
    lbl_files = index.files
    pairs, missing = [], []
    for p in img_files:
        lbl = index.find(p)
        if lbl is None:
            missing.append(p)
        else:
            pairs.append(SlicePair(p, lbl))
    if missing:
        raise DataError(f"no label with a matching name or number for {len(missing)} image(s), e.g. {missing[0]} "
                        f"(labels in {labels})")
    used: dict[Path, Path] = {}
    for pair in pairs:
        if pair.label in used:
            raise DataError(f"{used[pair.label].name} and {pair.image.name} both match the label {pair.label}; "
                            "name each label after its image")
        used[pair.label] = pair.image
    if len(lbl_files) != len(img_files):
        raise DataError(f"{images}: {len(img_files)} images but {labels}: {len(lbl_files)} labels")
    return pairs


def stack_pairs(image_stack: str | Path, label_stack: str | Path | None = None) -> list[SlicePair]:
    """Layout (c): a multi-page TIFF image stack and a label stack of the same shape."""
    image_stack = Path(image_stack)
    if not image_stack.is_file():
        raise DataError(f"{image_stack}: image stack not found")
    n = stack_depth(image_stack)
    if label_stack is None:
        return [SlicePair(image_stack, None, z) for z in range(n)]
    label_stack = Path(label_stack)
    if not label_stack.is_file():
        raise DataError(f"{label_stack}: label stack not found")
    m = stack_depth(label_stack)
    if n != m:
        raise DataError(f"{image_stack} has {n} slices but {label_stack} has {m}")
    shape_i = _page_shape(image_stack)
    shape_l = _page_shape(label_stack)
    if shape_i[:2] != shape_l[:2]:
        raise DataError(f"{image_stack} slices are {shape_i[:2]} but {label_stack} slices are {shape_l[:2]}")
    return [SlicePair(image_stack, label_stack, z) for z in range(n)]


def _page_shape(path: Path) -> tuple[int, ...]:
    with open_tiff(path) as tif:
        shape = tif.series[0].shape
    return tuple(shape[-3:-1]) if len(shape) >= 3 and shape[-1] in (3, 4) else tuple(shape[-2:])


def find_pairs(data: str | Path, split: str = "train", labels: str | Path | None = None,
               require_labels: bool = True) -> list[SlicePair]:
    """Resolve any supported layout into slice pairs.

    data: a split-layout root (with `<split>/x`), a folder with `x/` and `y/`,
        an image folder or glob (with `labels`), or a TIFF stack (with `labels`).
    split: the split read from a split-layout root ("train", "val", "test").
    labels: a label folder or glob (paired by stem: `a.png` <-> `a.tif`, `a_mask.tif`)
        or a label stack of the image stack's shape.
    require_labels: False lets an image folder without labels through (label None).
    Returns one `SlicePair(image, label, page)` per slice (page: the stack page, else None),
    in sorted order; DataError names the file for missing, unpaired or mismatched ones.
    """
    p = Path(data)
    if labels is not None:
        if p.is_file() and p.suffix.lower() in TIFF_EXTS and stack_depth(p) > 1:
            return stack_pairs(p, labels)
        return folder_pairs(data, labels)
    if p.is_dir():
        if (p / split / "x").is_dir():
            return split_pairs(p, split, require_labels)
        if (p / "x").is_dir():
            return split_pairs(p.parent, p.name, require_labels)
        if any((p / s).is_dir() for s in ("train", "val", "test")):
            raise DataError(f"{p / split}: split '{split}' not found in {p}")
        if require_labels:
            raise DataError(f"{p}: no '{split}/x' folder; give labels explicitly for an image folder")
        return folder_pairs(p)
    if p.is_file():
        if p.suffix.lower() in TIFF_EXTS and stack_depth(p) > 1:
            if require_labels:
                raise DataError(f"{p}: an image stack needs a label stack")
            return stack_pairs(p)
        if require_labels:
            raise DataError(f"{p}: a single image needs a label file")
        return [SlicePair(p)]
    if any(c in str(data) for c in "*?["):
        if require_labels:
            raise DataError(f"{data}: an image glob needs a label glob")
        return folder_pairs(data)
    raise DataError(f"{p}: not found")


def read_pair(pair: SlicePair) -> tuple[np.ndarray, np.ndarray | None]:
    """Read image (H, W) uint8/uint16 and label (H, W) int (or None), checking shapes agree."""
    image = read_image(pair.image, pair.page)
    if pair.label is None:
        return image, None
    label = read_label(pair.label, pair.page)
    if label.shape != image.shape:
        raise DataError(f"{pair.image} is {image.shape} but its label {pair.label} is {label.shape}")
    return image, label


def image_shape(path: str | Path, page: int | None = None) -> tuple[int, int]:
    """(H, W) of an image from its header, without decoding the pixels."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        if path.suffix.lower() in TIFF_EXTS:
            return tuple(int(v) for v in _page_shape(path))
        from PIL import Image

        with Image.open(path) as im:
            return im.height, im.width
    except Exception as err:
        raise DataError(f"{path}: not a readable image ({type(err).__name__}: {err})") from None


def check_pairs(pairs: list[SlicePair]) -> list[tuple[int, int]]:
    """Check every pair from file headers (exists, readable, same shape); return (H, W) each."""
    shapes = []
    for p in pairs:
        shape = image_shape(p.image, p.page)
        if p.label is not None:
            lshape = image_shape(p.label, p.page)
            if lshape != shape:
                raise DataError(f"{p.image} is {shape} but its label {p.label} is {lshape}")
        shapes.append(shape)
    return shapes


def check_fit_data(data_dirs, split: str, what: str) -> None:
    """Read every slice and label of each set's `split` up front (as `check_labels`) and refuse a set
    with no mitochondrion pixel: `what` (inference defaults, a calibration) would be fitted to nothing
    (every setting scores 0, a temperature needs both classes) after minutes of prediction."""
    for d in data_dirs:
        pairs = find_pairs(d, split)
        if check_labels(pairs)["foreground"] == 0:
            raise DataError(f"{d} [{split}]: no mitochondrion in any of its {len(pairs)} labels; {what} need "
                            "slices with mitochondria (and background)")


def check_ignore_value(stats: dict[str, int], ignore_value: int | None) -> None:
    """Refuse an `ignore_value` that swallows every foreground pixel (`check_labels`' pooled counts):
    with 0/255 masks and --ignore-value 255 nothing would be a mitochondrion, and every score 0."""
    if ignore_value is not None and stats["foreground"] == 0 and stats["ignored"]:
        raise DataError(f"--ignore-value {ignore_value}: every non-zero label pixel has this value, so no pixel is "
                        "a mitochondrion (in 0/{0} masks {0} marks mitochondria); leave --ignore-value out, or mark "
                        "unlabelled pixels with another value".format(ignore_value))


def check_labels(pairs: list[SlicePair], ignore_value: int | None = None, workers: int | None = None,
                 progress=None) -> dict[str, int]:
    """Decode every image and label once, up front, so bad ones fail before anything is trained.

    Each image must be a readable, non-constant slice with finite values
    (`read_image`), each label readable as a mask or instance ids
    (`read_label`) of its image's (H, W). Runs in threads (the decoders
    release the GIL). progress: called with the number of pairs done.
    Returns pooled pixel counts: {"slices", "pixels", "foreground", "ignored"}
    (foreground excludes `ignore_value`).
    """
    from concurrent.futures import ThreadPoolExecutor

    def one(p: SlicePair) -> tuple[int, int, int]:
        # The whole image, not only its header: a constant, NaN or truncated slice would otherwise
        # fail inside the tf.data pipeline, after the run folder exists, as a traceback (or a hang).
        shape = read_image(p.image, p.page).shape
        if p.label is None:
            return 0, 0, 0
        label = read_label(p.label, p.page)
        if label.shape != shape:
            raise DataError(f"{p.image} is {shape} but its label {p.label} is {label.shape}")
        ignored = int(np.count_nonzero(label == ignore_value)) if ignore_value is not None else 0
        fg = int(np.count_nonzero(label)) - (ignored if ignore_value else 0)
        return label.size, fg, ignored

    todo = list(pairs)
    total = {"slices": sum(p.label is not None for p in todo), "pixels": 0, "foreground": 0, "ignored": 0}
    workers = workers or min(8, (os.cpu_count() or 2) + 2)
    with ThreadPoolExecutor(workers) as pool:
        for i, (n, fg, ig) in enumerate(pool.map(one, todo)):
            total["pixels"] += n
            total["foreground"] += fg
            total["ignored"] += ig
            if progress is not None:
                progress(i + 1)
    return total
