"""Shared pieces of the converters: reading stacks, checking pairs, resampling,
writing the split layout and ``dataset.json``.

The split layout read by ``xmdl_tf.train``::

    <out>/{train,val,test}/x/imNNNN.png   image (uint8 or uint16 PNG; other dtypes as TIFF)
    <out>/{train,val,test}/y/segNNNN.tif  label (zlib TIFF; uint8 0/1 binary, uint16/uint32 ids)
    <out>/dataset.json                    sources, splits, counts, pixel size

``NNNN`` is the slice's index in its source stack (z), so ``im0412`` always
means source slice 412 and neighbouring slices stay recognisable.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np
import tifffile

from xmdl_tf.cli import pixel_size
from xmdl_tf.io import open_tiff, rgb_to_grey

SPLITS = ("train", "val", "test")
IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_EXTS = (".png", ".tif", ".tiff")  # lossless only: never read labels from JPEG
HDF5_EXTS = (".h5", ".hdf5", ".hdf")
STACK_EXTS = (".tif", ".tiff", ".npy") + HDF5_EXTS
LAYOUT_ITEMS = (*SPLITS, "dataset.json", "objects.csv")
# TIFF compressions that decode to the exact stored values.
LOSSLESS_TIFF = {1, 5, 8, 32773, 32946, 34925, 50000, 50013}


# ---------------------------------------------------------------------------
# Reading


def import_h5py():
    """Import h5py, which only the HDF5 paths need (the ``hdf5`` extra)."""
    try:
        import h5py
    except ImportError as err:  # pragma: no cover - exercised only without h5py
        raise ImportError(
            "Reading HDF5 (.h5) volumes needs h5py: pip install h5py  "
            "(or: pip install 'xmdl-tf[hdf5]')"
        ) from err
    return h5py


def natural_key(name: str) -> list:
    """Sort key that orders ``im2`` before ``im10``."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def trailing_number(name: str) -> int | None:
    """The last run of digits in a file stem (``seg0412.tif`` -> 412), or None."""
    digits = re.findall(r"\d+", Path(name).stem)
    return int(digits[-1]) if digits else None


def read_image_file(path: Path, *, label: bool = False) -> np.ndarray:
    """Read one 2D image or label file as stored (no rescaling).

    Returns a (H, W) array in the file's dtype. RGB images are converted to
    grey (EM slices saved as RGB); labels must be single-channel (a palette
    PNG gives its indices).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"missing file: {path}")
    ext = path.suffix.lower()
    allowed = LABEL_EXTS if label else IMAGE_EXTS
    if ext not in allowed:
        kind = "label" if label else "image"
        raise ValueError(f"unsupported {kind} format '{ext}' for {path}; expected one of {allowed}")
    if ext in (".tif", ".tiff"):
        try:
            array = tifffile.imread(path)
        except Exception as err:  # tifffile raises many types for corrupt files
            raise ValueError(f"{path}: not a readable TIFF ({type(err).__name__}: {err})") from None
    elif label and ext == ".png" and _palette_png(path):
        from PIL import Image

        with Image.open(path) as img:  # OpenCV would expand the palette into colours
            array = np.asarray(img)
    else:
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError(f"could not decode image file {path}")
        if array.ndim == 3 and array.shape[-1] in (3, 4):
            # OpenCV gives BGR(A): turn the colour channels round, keep alpha last (not ARGB).
            array = np.concatenate([array[..., 2::-1], array[..., 3:]], axis=-1)
    return to_plane(np.squeeze(array), path, label=label)


def _palette_png(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as img:
            return img.mode in ("P", "PA")
    except Exception:  # not for PIL to judge: OpenCV reads it, or says it cannot
        return False


def to_plane(array: np.ndarray, name: str | Path, *, label: bool = False, samples: bool | None = None) -> np.ndarray:
    """One slice as (H, W): colour (or grey + alpha) images made grey, in their own dtype;
    labels must have one channel. samples: whether a last axis of 2-4 is colour samples
    (default: when the array is 3-D with such a last axis)."""
    if samples is None:
        samples = array.ndim == 3 and array.shape[-1] in (2, 3, 4)
    if samples and array.ndim == 3:
        if label and array.shape[-1] in (2, 4) and _alpha_only(array):
            # Drawn in the alpha channel only (one colour everywhere): its alpha is the mask, as
            # `xmdl_tf.io.read_label` reads it; the grey would be an empty mask.
            import warnings

            warnings.warn(f"{name}: label drawn in the alpha channel only; its alpha is read as the mask",
                          stacklevel=2)
            return array[..., -1]
        grey = array.shape[-1] == 2 or all(np.array_equal(array[..., 0], array[..., k]) for k in (1, 2))
        if label and not grey:  # colours are no ids (a palette PNG gives its indices on reading)
            raise ValueError(f"label file {name} has {array.shape[-1]} colour channels; expected one channel of ids")
        # Grey + alpha, or grey saved as RGB(A): the grey values; colour made grey as training reads it.
        array = array[..., 0] if grey else rgb_to_grey(array[..., :3])
    if array.ndim != 2:
        raise ValueError(f"{name} holds an array of shape {array.shape}; expected one 2D slice")
    return array


def _alpha_only(array: np.ndarray) -> bool:
    """(H, W, 2|4): the colour (or grey) channels hold one value everywhere and the alpha does not."""
    colour, alpha = array[..., :-1], array[..., -1]
    return colour.min() == colour.max() and alpha.min() != alpha.max()


@dataclass(frozen=True)
class Stack:
    """A z-ordered sequence of 2D slices, read one at a time.

    ``indices[i]`` is slice i's number in the source (z, or the number in its
    file name); ``names[i]`` says where it came from, e.g. ``training.tif[12]``.
    """

    path: Path
    names: tuple[str, ...]
    indices: tuple[int, ...]
    reader: Callable[[int], np.ndarray] = field(repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.names)

    def read(self, i: int) -> np.ndarray:
        """Slice i as a (H, W) array in the stored dtype."""
        array = np.squeeze(np.asarray(self.reader(i)))
        if array.ndim != 2:
            raise ValueError(f"{self.names[i]} has shape {array.shape}; expected one 2D slice")
        return array

    def subset(self, positions: Sequence[int]) -> "Stack":
        """The slices at the given positions, keeping their source indices."""
        positions = list(positions)
        return Stack(
            self.path,
            tuple(self.names[p] for p in positions),
            tuple(self.indices[p] for p in positions),
            lambda i: self.reader(positions[i]),
        )


def _folder_stack(path: Path, *, label: bool, pattern: str | None, numbered: bool = False) -> Stack:
    exts = LABEL_EXTS if label else IMAGE_EXTS
    files = sorted(path.glob(pattern) if pattern else path.iterdir(), key=lambda p: natural_key(p.name))
    # Hidden files (macOS "._im0000.png" resource forks) are no slices; the loader skips them too.
    lossy = [f for f in files if label and f.is_file() and f.suffix.lower() in (".jpg", ".jpeg")]
    files = [f for f in files if f.is_file() and f.suffix.lower() in exts and not f.name.startswith(".")]
    if lossy:  # never read (JPEG changes label values at every edge); say so rather than count them out
        raise ValueError(f"{lossy[0]}: labels must be lossless; JPEG compression changes the label values at "
                         f"every edge ({len(lossy)} JPEG label(s) in {path}); export them again as PNG or TIFF")
    if not files:
        what = f"matching '{pattern}'" if pattern else f"with extension {exts}"
        raise FileNotFoundError(f"no {'label' if label else 'image'} files {what} in folder {path}")
    numbers = [trailing_number(f.name) for f in files]
    if numbered:  # the number in each name is the slice's z: a gap is fine, a clash or a missing one is not
        seen: dict[int, str] = {}
        for f, z in zip(files, numbers):
            if z is None:
                raise ValueError(f"{path / f.name}: no slice number in its name (expected e.g. seg0012.tif)")
            if z in seen:
                raise ValueError(f"{path}: {seen[z]} and {f.name} both carry slice number {z}; "
                                 "remove the copy")
            seen[z] = f.name
    elif None in numbers or len(set(numbers)) != len(numbers):
        numbers = list(range(len(files)))
    return Stack(
        path,
        tuple(f.name for f in files),
        tuple(numbers),
        lambda i: read_image_file(files[i], label=label),
    )


def _tiff_stack(path: Path, *, label: bool = False) -> Stack:
    # io.open_tiff refuses a truncated download, of which tifffile would guess a shorter stack.
    with open_tiff(path) as tif:
        shape = tif.series[0].shape
        axes = tif.series[0].axes
        n_pages = len(tif.pages)
    # tifffile names a colour (or grey + alpha) axis "S": (H, W, S) is one slice, (Z, H, W, S) a stack.
    samples = axes.endswith("S") and shape[-1] > 1
    plane = shape[-3:] if samples else shape[-2:]
    lead = tuple(s for s in shape[:len(shape) - len(plane)] if s != 1)
    if len(lead) > 1:
        raise ValueError(f"TIFF {path} holds an array of shape {shape} (axes {axes}); expected (H, W) or (Z, H, W)")
    n = lead[0] if lead else 1

    def read(fn, where: str) -> np.ndarray:
        try:
            return fn()
        except Exception as err:  # a truncated or corrupt file: tifffile raises many types
            raise ValueError(f"{where}: not readable ({type(err).__name__}: {err})") from None

    if n == n_pages:
        # One page per slice (the usual multi-page stack): read pages lazily.
        def reader(i: int) -> np.ndarray:
            return to_plane(np.asarray(read(lambda: tifffile.imread(path, key=i), f"{path.name}[{i}]")).reshape(plane),
                            f"{path.name}[{i}]", label=label, samples=samples)
    else:
        volume = read(lambda: tifffile.imread(path), str(path)).reshape((n,) + plane)

        def reader(i: int) -> np.ndarray:
            return to_plane(volume[i], f"{path.name}[{i}]", label=label, samples=samples)
    return Stack(path, tuple(f"{path.name}[{z}]" for z in range(n)), tuple(range(n)), reader)


def h5_dataset_names(path: Path) -> list[str]:
    """Names of all datasets in an HDF5 file (recursively)."""
    h5py = import_h5py()
    names: list[str] = []
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: names.append(name) if isinstance(obj, h5py.Dataset) else None)
    return names


def _h5_stack(path: Path, key: str | None) -> Stack:
    h5py = import_h5py()
    names = h5_dataset_names(path)
    if key is None:
        if len(names) != 1:
            raise ValueError(f"HDF5 file {path} holds datasets {names}; choose one with --h5-key")
        key = names[0]
    elif key not in names:
        raise ValueError(f"HDF5 file {path} has no dataset '{key}'; it holds {names}")
    with h5py.File(path, "r") as f:
        shape = f[key].shape
    if len(shape) == 2:
        shape = (1,) + shape
    if len(shape) != 3:
        raise ValueError(f"dataset '{key}' in {path} has shape {shape}; expected (Z, H, W)")

    def reader(i: int) -> np.ndarray:
        # Reopened per slice so a Stack holds no open handle (h5py is not fork-safe).
        with h5py.File(path, "r") as f:
            ds = f[key]
            return ds[i] if ds.ndim == 3 else ds[()]

    return Stack(path, tuple(f"{path.name}:{key}[{z}]" for z in range(shape[0])), tuple(range(shape[0])), reader)


def open_stack(path: str | Path, *, label: bool = False, h5_key: str | None = None,
               pattern: str | None = None, numbered: bool = False) -> Stack:
    """Open a folder of 2D files, a (multi-page) TIFF, an HDF5 volume, a .npy
    array or a single 2D image as a :class:`Stack`.

    Volumes are (Z, H, W). numbered: a folder's file names must each carry a
    distinct slice number (its z). Raises FileNotFoundError / ValueError naming
    the path, also for a stack without a single slice.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing {'labels' if label else 'images'}: {path}")
    stack = _open(path, label, h5_key, pattern, numbered)
    if len(stack) == 0:
        raise ValueError(f"{path}: holds no slice")
    return stack


def _open(path: Path, label: bool, h5_key: str | None, pattern: str | None, numbered: bool) -> Stack:
    if path.is_dir():
        return _folder_stack(path, label=label, pattern=pattern, numbered=numbered)
    ext = path.suffix.lower()
    if ext in (".tif", ".tiff"):
        return _tiff_stack(path, label=label)
    if ext in HDF5_EXTS:
        return _h5_stack(path, h5_key)
    if ext == ".npy":
        try:
            volume = np.load(path, mmap_mode="r")
        except Exception as err:  # empty, truncated or pickled (object) arrays
            raise ValueError(f"{path}: not a readable .npy array ({type(err).__name__}: {err})") from None
        volume = volume[None] if volume.ndim == 2 else volume
        if volume.ndim != 3:
            raise ValueError(f"{path} holds an array of shape {volume.shape}; expected (Z, H, W)")
        return Stack(path, tuple(f"{path.name}[{z}]" for z in range(len(volume))),
                     tuple(range(len(volume))), lambda i: np.array(volume[i]))
    allowed = (LABEL_EXTS if label else IMAGE_EXTS) + STACK_EXTS
    if ext in allowed:
        return Stack(path, (path.name,), (0,), lambda i: read_image_file(path, label=label))
    raise ValueError(f"unsupported format '{ext}' for {path}; expected a folder or one of {sorted(set(allowed))}")


def pair_positions(images: Stack, labels: Stack) -> list[tuple[int, int]]:
    """(image position, label position) pairs: by source number when both
    stacks carry the same set of numbers, else by order (counts must match)."""
    if set(images.indices) == set(labels.indices) and len(images) == len(labels):
        where = {z: i for i, z in enumerate(labels.indices)}
        return [(i, where[z]) for i, z in enumerate(images.indices)]
    if len(images) != len(labels):
        raise ValueError(f"{images.path} has {len(images)} slices but {labels.path} has {len(labels)}")
    if _named_by_number(images) and _named_by_number(labels):
        # Both folders number their files, differently: by order is right for one shift of the
        # numbering (im0001.. with seg0000..), never when the numbers disagree otherwise (a label
        # missing and another one extra would put every later label on the wrong image).
        shift = labels.indices[0] - images.indices[0]
        for i, (zi, zl) in enumerate(zip(images.indices, labels.indices)):
            if zl - zi != shift:
                raise ValueError(f"{images.path / images.names[i]} would be paired with {labels.names[i]} by sorted "
                                 f"order, but their numbers ({zi}, {zl}) disagree unlike those before; is a label "
                                 "missing or one extra? Number images and labels alike")
    return [(i, i) for i in range(len(images))]


def _named_by_number(stack: Stack) -> bool:
    """A folder whose file names each carry a distinct number, its slices' indices."""
    return stack.path.is_dir() and tuple(trailing_number(n) for n in stack.names) == stack.indices


# ---------------------------------------------------------------------------
# Labels


def label_kind(values: Iterable[int]) -> str:
    """'binary' if the label values are 0 and at most one other value, else 'instance'."""
    return "binary" if len(set(int(v) for v in values) - {0}) <= 1 else "instance"


def check_image_values(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` if it can be a training or evaluation slice; else ValueError naming it.

    NaN or infinite pixels and constant slices (blank padding, a failed
    acquisition) are refused here, when converting, rather than when a
    training run meets them (`xmdl_tf.io.read_image` refuses them too).
    """
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        bad = int((~np.isfinite(image)).sum())
        raise ValueError(f"{name}: {bad} NaN or infinite pixel(s) of {image.size}; fix or leave out this slice")
    if image.size and image.min() == image.max():
        raise ValueError(f"{name}: constant image (every pixel is {image.flat[0]}); nothing to learn or score "
                         "there, leave this slice out")
    return image


def check_label_values(label: np.ndarray, name: str) -> np.ndarray:
    """Return the label as an integer array; reject negative or fractional values."""
    if label.dtype.kind == "f":
        if not np.all(np.isfinite(label)) or np.any(label != np.round(label)):
            raise ValueError(f"label {name} holds non-integer values; labels must be ids")
        label = label.astype(np.int64)
    elif label.dtype.kind == "b":
        label = label.astype(np.uint8)
    elif label.dtype.kind not in "iu":
        raise ValueError(f"label {name} has dtype {label.dtype}; expected integers")
    if label.dtype.kind == "i" and label.size and label.min() < 0:
        raise ValueError(f"label {name} holds negative values")
    return label


def instance_dtype(max_id: int) -> np.dtype:
    """uint16 when the ids fit, else uint32 (instance labels are never uint8)."""
    if max_id < 2**16:
        return np.dtype(np.uint16)
    if max_id < 2**32:
        return np.dtype(np.uint32)
    raise ValueError(f"instance id {max_id} does not fit in uint32")


def encode_label(label: np.ndarray, kind: str, dtype: np.dtype | None = None, name: str = "label") -> np.ndarray:
    """Binary labels -> uint8 0/1 (any non-zero is foreground, so 0/255 maps to 0/1);
    instance labels -> ids unchanged in ``dtype`` (default, or when its ids do not fit
    ``dtype``: the smallest of uint16/uint32). ValueError naming ``name`` for ids beyond uint32."""
    if kind == "binary":
        return (label != 0).astype(np.uint8)
    top = int(label.max(initial=0))
    try:
        need = instance_dtype(top)
    except ValueError:
        raise ValueError(f"label {name}: instance id {top} does not fit in uint32; number the objects "
                         "1, 2, 3, ... (e.g. skimage.segmentation.relabel_sequential)") from None
    if dtype is None or top > np.iinfo(dtype).max:
        dtype = need
    return label.astype(dtype, copy=False)


# ---------------------------------------------------------------------------
# Geometry: crop and resample


def crop(array: np.ndarray, box: Sequence[int] | None, name: str) -> np.ndarray:
    """Crop (H, W) to ``box = (y, x, h, w)`` in pixels; the box must lie inside."""
    if box is None:
        return array
    y, x, h, w = (int(v) for v in box)
    if y < 0 or x < 0 or h <= 0 or w <= 0 or y + h > array.shape[0] or x + w > array.shape[1]:
        raise ValueError(f"crop box (y={y}, x={x}, h={h}, w={w}) does not fit {name} of shape {array.shape}")
    return array[y:y + h, x:x + w]


def resampled_shape(shape: Sequence[int], factor: float) -> tuple[int, int]:
    """Output (H, W) for a scale ``factor`` = pixel_size_in / pixel_size_out."""
    return tuple(max(1, int(round(s * factor))) for s in shape[:2])


def resample_image(image: np.ndarray, factor: float) -> np.ndarray:
    """Rescale an image by ``factor``: area averaging when shrinking (binning,
    no aliasing), linear when enlarging. Keeps the dtype."""
    if factor == 1.0:
        return image
    h, w = resampled_shape(image.shape, factor)
    interp = cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR
    src = image.astype(np.float32) if image.dtype not in (np.uint8, np.uint16, np.float32) else image
    out = cv2.resize(src, (w, h), interpolation=interp)
    if np.issubdtype(image.dtype, np.integer):
        info = np.iinfo(image.dtype)
        out = np.clip(np.round(out), info.min, info.max)
    return out.astype(image.dtype, copy=False)


def resample_label(label: np.ndarray, factor: float) -> np.ndarray:
    """Nearest-neighbour rescale of a label image by ``factor``; ids are only
    copied, never mixed, and any integer dtype is kept."""
    if factor == 1.0:
        return label
    h, w = resampled_shape(label.shape, factor)
    # Sample at output pixel centres mapped back into the source grid.
    rows = np.minimum(((np.arange(h) + 0.5) / factor).astype(np.int64), label.shape[0] - 1)
    cols = np.minimum(((np.arange(w) + 0.5) / factor).astype(np.int64), label.shape[1] - 1)
    return label[np.ix_(rows, cols)]


def scale_factor(pixel_size_in: float | None, pixel_size_out: float | None) -> float:
    """pixel_size_in / pixel_size_out, or 1 when no output size was asked for."""
    if pixel_size_out is None:
        return 1.0
    if pixel_size_in is None:
        raise ValueError("--pixel-size-out needs --pixel-size-in (the source pixel size in nm)")
    if pixel_size_in <= 0 or pixel_size_out <= 0:
        raise ValueError(f"pixel sizes must be positive, got {pixel_size_in} and {pixel_size_out} nm")
    return float(pixel_size_in) / float(pixel_size_out)


# ---------------------------------------------------------------------------
# Splits


def split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Whole-slice counts for ``fractions`` (normalised) summing to ``n``.

    Largest-remainder rounding; every split with a positive fraction gets at
    least one slice when n allows.
    """
    fractions = np.asarray(fractions, dtype=float)
    if fractions.ndim != 1 or not np.isfinite(fractions).all() or np.any(fractions < 0) or fractions.sum() <= 0:
        raise ValueError(f"split fractions must be non-negative and not all zero, got {list(fractions)}")
    fractions = fractions / fractions.sum()
    raw = fractions * n
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts), kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    for i in np.flatnonzero((fractions > 0) & (counts == 0)):
        donor = int(np.argmax(counts))
        if counts[donor] > 1:
            counts[donor] -= 1
            counts[i] += 1
    return counts.tolist()


def assign_splits(n: int, fractions: Sequence[float], *, shuffle: bool = False,
                  seed: int = 0) -> dict[str, list[int]]:
    """Positions 0..n-1 assigned to train/val/test.

    By default in contiguous z blocks (train, then val, then test), so no
    test slice is a z-neighbour of a training slice. ``shuffle=True`` draws
    slices at random (seeded) -- only for stacks of independent images.
    """
    counts = split_counts(n, fractions)
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    bounds = np.cumsum([0] + counts)
    return {s: sorted(order[bounds[i]:bounds[i + 1]].tolist()) for i, s in enumerate(SPLITS)}


# ---------------------------------------------------------------------------
# Writing


STAGING_PREFIX = ".xmdl-staging-"
REPLACED_PREFIX = ".xmdl-replaced-"


def check_output(out: str | Path, overwrite: bool) -> Path:
    """Refuse (FileExistsError naming the folder) a non-folder ``out``, or a
    non-empty one without ``overwrite``. Creates nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out} exists and is not a folder")
    if out.exists() and not overwrite and any(not p.name.startswith(".") for p in out.iterdir()):
        raise FileExistsError(f"output folder {out} is not empty; pass --overwrite to replace its contents")
    return out


def remove_layout(out: Path) -> None:
    """Delete the layout's own items in ``out`` (split folders, dataset.json, objects.csv)."""
    for name in LAYOUT_ITEMS:
        item = out / name
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item)
        elif item.exists() or item.is_symlink():
            item.unlink()


COMPLETE = ".complete"  # in a staging folder: the conversion finished; lists the new layout's items


def _swap(out: Path, stage: Path) -> None:
    """Put a complete staging folder's layout in place of the old one.

    Resumable at any point (`_recover` calls it again after a kill): an item
    still in the stage is not in place yet, so the old item of that name goes
    aside first; an old item the new layout lacks goes aside too; items the
    stage no longer holds are already the new ones and stay.
    """
    new_items = json.loads((stage / COMPLETE).read_text())
    trash = out / (REPLACED_PREFIX + stage.name[len(STAGING_PREFIX):])
    trash.mkdir(exist_ok=True)
    for name in LAYOUT_ITEMS:
        here = out / name
        if name in new_items and (stage / name).exists():
            if here.exists() or here.is_symlink():
                os.replace(here, trash / name)
            os.replace(stage / name, here)
        elif name not in new_items and (here.exists() or here.is_symlink()):
            os.replace(here, trash / name)
    # The old items first: while the stage (and its mark) is there, a kill here is finished by
    # `_recover` swapping again, which puts nothing old back.
    shutil.rmtree(trash, ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


def _recover(out: Path) -> None:
    """Finish what a killed conversion left: a complete staging folder is swapped in (the
    swap had begun or was about to), a half-written one deleted, and old layout items moved
    aside by a swap of an older version without the completion mark put back."""
    for stage in out.glob(STAGING_PREFIX + "*"):
        if (stage / COMPLETE).is_file():
            _swap(out, stage)
        else:
            shutil.rmtree(stage, ignore_errors=True)
    for trash in out.glob(REPLACED_PREFIX + "*"):
        for item in trash.iterdir():
            if not (out / item.name).exists():
                os.replace(item, out / item.name)
        shutil.rmtree(trash, ignore_errors=True)


def _missing_ancestors(path: Path) -> list[Path]:
    """``path``'s folders that do not exist yet, deepest first (``path`` included)."""
    out = []
    for p in [path, *path.absolute().parents]:
        if p.exists():
            break
        out.append(p)
    return out


@contextlib.contextmanager
def output_folder(out: str | Path, overwrite: bool) -> Iterator[Path]:
    """A staging folder (empty split folders) inside ``out`` to write the new data set into.

    Split folders left empty by the conversion are not kept.

    Nothing in ``out`` is touched while the conversion runs, so inputs that
    live inside ``out`` stay readable, and a failure or a kill leaves the old
    contents exactly as they were (a failed first conversion leaves no folder
    and no lock file behind). Only when the block completes are the old
    layout items (split folders, dataset.json, objects.csv; never other files)
    replaced by the new ones; a kill during that swap is finished by the next
    conversion into ``out``. ``out`` is locked against a second converter.
    """
    from xmdl_tf.runlock import FolderLock

    out = check_output(out, overwrite)
    created = _missing_ancestors(Path(out))
    lock = FolderLock(out, "data set")
    with lock:
        out.mkdir(parents=True, exist_ok=True)
        _recover(out)
        stage = out / f"{STAGING_PREFIX}{os.getpid()}"
        for split in SPLITS:
            (stage / split / "x").mkdir(parents=True, exist_ok=True)
            (stage / split / "y").mkdir(parents=True, exist_ok=True)
        try:
            yield stage
        except BaseException:
            shutil.rmtree(stage, ignore_errors=True)
            if created and not any(out.iterdir()):
                # A failed first conversion leaves nothing behind: the folders it made, and its lock
                # file (no other converter can hold a lock on a folder that did not exist).
                out.rmdir()
                lock.path.unlink(missing_ok=True)
                for folder in created[1:]:
                    try:
                        folder.rmdir()
                    except OSError:  # not empty: someone else's now
                        break
            raise
        for split in SPLITS:  # a split with no slice is left out: an empty test/ would read as a test split
            if not any((stage / split / "x").iterdir()) and not any((stage / split / "y").iterdir()):
                shutil.rmtree(stage / split)
        (stage / COMPLETE).write_text(json.dumps(sorted(p.name for p in stage.iterdir())))
        _swap(out, stage)


def write_image(path_stem: Path, image: np.ndarray) -> Path:
    """Write an image losslessly: uint8/uint16 as PNG, anything else as zlib TIFF.
    ``path_stem`` has no extension; returns the written path."""
    if image.dtype in (np.uint8, np.uint16):
        path = path_stem.with_suffix(".png")
        if not cv2.imwrite(str(path), np.ascontiguousarray(image)):
            raise OSError(f"could not write {path}")
    else:
        path = path_stem.with_suffix(".tif")
        tifffile.imwrite(path, image, compression="zlib")
    return path


def write_label(path: Path, label: np.ndarray) -> Path:
    """Write a label image as a zlib-compressed TIFF (lossless)."""
    tifffile.imwrite(path, label, compression="zlib")
    return path


@dataclass
class Pair:
    """One slice to convert: position ``pos`` of ``images`` (and of ``labels``)."""

    split: str
    images: Stack
    pos: int
    labels: Stack | None = None
    label_pos: int | None = None


def convert_pairs(out: Path, pairs: Sequence[Pair], *, kind: str, box: Sequence[int] | None = None,
                  factor: float = 1.0, label_dtype: np.dtype | None = None) -> dict[str, dict]:
    """Read, check, crop, resample and write every pair into ``out`` (already prepared).

    ``kind`` is 'binary' or 'instance'. Raises ValueError naming both files
    when an image and its label differ in shape. Returns per-split records
    for dataset.json.
    """
    records = {s: {"count": 0, "slices": [], "sources": [], "labelled": True} for s in SPLITS}
    for pair in pairs:
        index = pair.images.indices[pair.pos]
        image_name = pair.images.names[pair.pos]
        whole = pair.images.read(pair.pos)
        image = check_image_values(crop(whole, box, image_name), image_name)
        write_image(out / pair.split / "x" / f"im{index:04d}", resample_image(image, factor))
        source = {"image": image_name}
        if pair.labels is not None:
            label_pos = pair.pos if pair.label_pos is None else pair.label_pos
            label_name = pair.labels.names[label_pos]
            label = check_label_values(pair.labels.read(label_pos), label_name)
            if label.shape != whole.shape:  # before cropping: a crop would hide the mismatch
                raise ValueError(f"shape mismatch: image {image_name} is {whole.shape[:2]} "
                                 f"but label {label_name} is {label.shape}")
            label = encode_label(resample_label(crop(label, box, label_name), factor), kind, label_dtype, label_name)
            write_label(out / pair.split / "y" / f"seg{index:04d}.tif", label)
            source["label"] = label_name
        else:
            records[pair.split]["labelled"] = False
        rec = records[pair.split]
        rec["count"] += 1
        rec["slices"].append(int(index))
        rec["sources"].append(source)
    return records


def write_dataset_json(out: Path, *, name: str, converter: str, source_files: Sequence[str | Path],
                       splits: dict[str, dict], kind: str | None, pixel_size_in: float | None,
                       factor: float = 1.0, box: Sequence[int] | None = None, **extra) -> Path:
    """Write ``<out>/dataset.json``: sources, splits (slice indices), counts,
    label encoding and pixel size in nm (null when unknown)."""
    pixel_size = None if pixel_size_in is None else float(pixel_size_in) / factor
    if kind == "binary":
        labels = {"kind": "binary", "dtype": "uint8", "values": "0 background, 1 mitochondrion"}
    elif kind == "instance":
        labels = {"kind": "instance", "dtype": "uint16 or uint32", "values": "0 background, 1.. instance ids"}
    else:
        labels = None
    meta = {
        "name": name,
        "layout": "{split}/x/imNNNN.png, {split}/y/segNNNN.tif; NNNN = source slice index",
        "converter": converter,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "source_files": [str(Path(p).resolve()) for p in source_files],
        "pixel_size_nm": pixel_size,
        "source_pixel_size_nm": pixel_size_in,
        "resample_factor": factor,
        "crop_yxhw": None if box is None else [int(v) for v in box],
        "labels": labels,
        "counts": {s: splits[s]["count"] for s in SPLITS},
        "splits": splits,
        **extra,
    }
    path = out / "dataset.json"
    path.write_text(json.dumps(meta, indent=2) + "\n")
    return path


# ---------------------------------------------------------------------------
# CLI pieces


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--out, --overwrite, --crop, --pixel-size-out (shared by all converters)."""
    parser.add_argument("--out", required=True, type=Path, help="output folder (created; must be empty unless --overwrite)")
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    parser.add_argument("--overwrite", action="store_true", help="replace the split folders and dataset.json in a non-empty --out")
    parser.add_argument("--crop", nargs=4, type=int, metavar=("Y", "X", "H", "W"),
                        help="crop every slice to this box (source pixels) before resampling")
    parser.add_argument("--pixel-size-out", type=pixel_size, metavar="NM",
                        help="resample to this pixel size in nm (images: area/linear, labels: nearest neighbour)")


def fractions_arg(text: str) -> tuple[float, float, float]:
    """Parse 'train,val,test' fractions such as '0.7,0.15,0.15'."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got '{text}'") from err
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three fractions train,val,test, got '{text}'")
    if not all(np.isfinite(values)) or min(values) < 0 or sum(values) <= 0:
        raise argparse.ArgumentTypeError(f"fractions must be finite, non-negative and not all zero, got '{text}'")
    return values
