"""Convert MitoEM (MitoEM-H human, MitoEM-R rat) to the split layout.

Source: MitoEM (Wei et al., MICCAI 2020; https://mitoem.grand-challenge.org/),
two 1000 x 4096 x 4096 serial-section EM volumes at 8 x 8 x 30 nm with
mitochondria instance labels. Two inputs are understood:

``release`` -- the files as released::

    EM30-H-im.zip                    -> im/im0000.png .. im0999.png (8-bit slices)
    EM30-H-mito-train-val-v2.zip     -> mito-train-v2/seg0000.tif .. seg0399.tif
                                        mito-val-v2/seg0400.tif .. seg0499.tif
    EM30-H-mito-test-v2.h5 (later)   -> instance ids of slices 500-999

  Each ``--*-labels`` is a folder of per-slice instance TIFFs (the number in
  ``segNNNN`` is the z of ``imNNNN``) or an HDF5 volume (Z, H, W) of instance
  ids (``mito_train.h5``, ``*_instance.h5``, ...; key from ``--h5-key`` or
  the file's only dataset, e.g. ``main`` or ``dataset_1``) whose first slice
  is image ``--train-z0`` / ``--val-z0`` / ``--test-z0`` (defaults 0, 400,
  500, the release split). Reading HDF5 needs h5py (``pip install h5py``).
  Splits follow the release: train = 0-399, val = 400-499, test = 500-999
  (written only when test labels are given).

``biapy`` -- the copy distributed for BiaPy, already split::

    <src>/{train,val,test}/x/*.png|*.tif   images
    <src>/{train,val,test}/y/*.tif         instance labels (same count; paired
                                           by number in the name, else by order)

  Every pair is checked (both present, same shape, labels integer and
  lossless), then copied (or symlinked with ``--link``) as is, renamed to
  ``imNNNN`` / ``segNNNN``. A missing val split is carved from the end of
  train with ``--val-fraction``.

    python -m data_prep.mitoem release --images EM30-H/im --train-labels EM30-H/mito-train-v2 \\
        --val-labels EM30-H/mito-val-v2 --out data/mitoem_h --z-step 10 --pixel-size-out 16
    python -m data_prep.mitoem biapy --src MitoEM-H --out data/mitoem_h --link
"""

from __future__ import annotations

import argparse
import sys
import os
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep import _common as c
from xmdl_tf.cli import fraction, guarded, pixel_size, positive_int
from xmdl_tf.io import open_tiff

PIXEL_SIZE_NM = 8.0
RELEASE_Z0 = {"train": 0, "val": 400, "test": 500}


def _label_stack(path: Path, z0: int, h5_key: str | None, split: str = "train") -> c.Stack:
    """A label source whose ``indices`` are image z numbers."""
    path = Path(path)
    if path.is_dir():  # segNNNN carries z: each number once
        return c.open_stack(path, label=True, pattern="*.tif*", numbered=True)
    if path.exists() and path.suffix.lower() not in c.HDF5_EXTS:
        raise ValueError(f"--{split}-labels {path}: expected the folder of segNNNN.tif files or an HDF5 "
                         "volume, not a single file (its slice number would be lost)")
    stack = c.open_stack(path, label=True, h5_key=h5_key)
    return c.Stack(stack.path, stack.names, tuple(z0 + z for z in stack.indices), stack.reader)


def convert_release(images: str | Path, out: str | Path, *, train_labels: str | Path | None = None,
                    val_labels: str | Path | None = None, test_labels: str | Path | None = None,
                    z0: dict[str, int] | None = None, h5_key: str | None = None, z_step: int = 1,
                    binary: bool = False, pixel_size_in: float = PIXEL_SIZE_NM,
                    pixel_size_out: float | None = None, box: Sequence[int] | None = None,
                    overwrite: bool = False, name: str = "mitoem") -> Path:
    """Write the released MitoEM files as ``out/{split}/{x,y}``.

    ``images`` is the ``im`` folder of ``imNNNN.png``; each labels argument a
    folder of ``segNNNN.tif`` or an HDF5 volume starting at ``z0[split]``.
    Every ``z_step``-th labelled slice is kept. Labels are instance ids
    (uint16/uint32), or 0/1 uint8 masks with ``binary``. Returns dataset.json's path.
    """
    if z_step < 1:
        raise ValueError(f"--z-step must be >= 1, got {z_step}")
    z0 = {**RELEASE_Z0, **(z0 or {})}
    image_stack = c.open_stack(images, pattern="im*.png", numbered=True)
    by_z = {z: i for i, z in enumerate(image_stack.indices)}
    sources = {"train": train_labels, "val": val_labels, "test": test_labels}
    if train_labels is None and val_labels is None:
        raise ValueError("give at least --train-labels or --val-labels")
    pairs, label_paths, max_bytes = [], [], 1
    split_of: dict[int, str] = {}  # z -> the split that holds it: no slice may be in two
    for split, path in sources.items():
        if path is None:
            continue
        labels = _label_stack(Path(path), z0[split], h5_key, split)
        label_paths.append(labels.path)
        max_bytes = max(max_bytes, labels.read(0).dtype.itemsize)
        for pos in range(0, len(labels), z_step):
            z = labels.indices[pos]
            if z not in by_z:
                raise FileNotFoundError(f"no image im{z:04d}.png in {image_stack.path} for label {labels.names[pos]}")
            if split_of.setdefault(z, split) != split:
                raise ValueError(f"slice {z} is labelled for both {split_of[z]} and {split} ({labels.names[pos]}); "
                                 f"splits must not share slices: check --{split}-labels and --{split}-z0")
            pairs.append(c.Pair(split, image_stack, by_z[z], labels, pos))
    kind = "binary" if binary else "instance"
    # One dtype for the whole dataset, wide enough for the source's ids.
    dtype = None if binary else (np.dtype(np.uint16) if max_bytes <= 2 else np.dtype(np.uint32))
    factor = c.scale_factor(pixel_size_in, pixel_size_out)
    with c.output_folder(out, overwrite) as stage:
        records = c.convert_pairs(stage, pairs, kind=kind, box=box, factor=factor, label_dtype=dtype)
        c.write_dataset_json(
            stage, name=name, converter="data_prep.mitoem release", source_files=[image_stack.path, *label_paths],
            splits=records, kind=kind, pixel_size_in=pixel_size_in, factor=factor, box=box,
            z_step=z_step, label_z0={s: z0[s] for s in sources if sources[s] is not None},
            section_thickness_nm=30.0,
        )
    return Path(out) / "dataset.json"


# ---------------------------------------------------------------------------
# BiaPy layout


def _check_label_file(path: Path) -> None:
    if path.suffix.lower() not in c.LABEL_EXTS:
        raise ValueError(f"unsupported label format '{path.suffix}' for {path}; expected {c.LABEL_EXTS}")
    if path.suffix.lower() in (".tif", ".tiff"):
        with open_tiff(path) as tif:
            compression, dtype = tif.pages[0].compression, tif.pages[0].dtype
        if int(compression) not in c.LOSSLESS_TIFF:
            raise ValueError(f"label {path} is stored with lossy compression {compression!r}")
        if np.dtype(dtype).kind not in "iu":
            raise ValueError(f"label {path} has dtype {dtype}; expected integer ids")


def _check_pair_content(image_file: Path, label_file: Path) -> None:
    """Read the pair as training will (`xmdl_tf.io`): files copied byte for byte must be readable
    there, so a constant, truncated or colour file fails now, naming itself, not in a training run;
    and their decoded planes must match (a colour image's (H, W, 3) is an (H, W) slice)."""
    import warnings

    from xmdl_tf.io import read_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the converter's own reading is what decides
        image = read_image(image_file)
    label = c.read_image_file(label_file, label=True)
    c.check_label_values(label, str(label_file))
    if image.shape != label.shape:
        raise ValueError(f"shape mismatch: image {image_file} is {image.shape} but label {label_file} is {label.shape}")


def check_biapy(src: str | Path) -> dict[str, list[tuple[Path, Path, int]]]:
    """Check a BiaPy-style ``src/{train,val,test}/{x,y}`` tree.

    Returns, per split present, (image file, label file, slice number)
    triples. Raises FileNotFoundError / ValueError naming the file at fault.
    """
    src = Path(src)
    if not (src / "train").is_dir():
        raise FileNotFoundError(f"missing folder {src / 'train'} (expected {src}/{{train,val,test}}/{{x,y}})")
    found = {}
    for split in c.SPLITS:
        if not (src / split).is_dir():
            continue
        for sub in ("x", "y"):
            if not (src / split / sub).is_dir():
                raise FileNotFoundError(f"missing folder {src / split / sub}")
        images = c.open_stack(src / split / "x")
        labels = c.open_stack(src / split / "y", label=True)
        triples = []
        for split_pos, (i, j) in enumerate(c.pair_positions(images, labels)):
            image_file, label_file = images.path / images.names[i], labels.path / labels.names[j]
            _check_label_file(label_file)
            _check_pair_content(image_file, label_file)
            triples.append((image_file, label_file, images.indices[i]))
        found[split] = triples
    return found


def convert_biapy(src: str | Path, out: str | Path, *, link: bool = False, val_fraction: float = 0.1,
                  pixel_size_in: float | None = PIXEL_SIZE_NM, overwrite: bool = False,
                  name: str = "mitoem") -> Path:
    """Check and copy (or symlink) a BiaPy-distributed MitoEM tree into ``out``.

    Files are kept byte for byte; only PNG labels are rewritten, as zlib TIFF
    with the same values. Returns dataset.json's path.
    """
    if link:
        s_, o_ = Path(src).resolve(), Path(out).resolve()
        if s_ == o_ or o_ in s_.parents or s_ in o_.parents:
            # The links would point into the folder the conversion replaces: to themselves, or to
            # files deleted when the new tree takes its place.
            raise ValueError(f"--link: --out {out} and --src {src} overlap, so the links would point into the "
                             "folder being replaced; copy instead (leave out --link) or choose another --out")
    found = check_biapy(src)
    carved = "val" not in found and val_fraction > 0
    if carved:
        train = found["train"]
        n_val = c.split_counts(len(train), (1 - val_fraction, val_fraction))[1]
        if n_val >= len(train):
            raise ValueError(f"--val-fraction {val_fraction}: {src} has {len(train)} train slice(s) and no val/; "
                             "carving val from them would leave no training slice")
        found["train"], found["val"] = train[:len(train) - n_val], train[len(train) - n_val:]
    records = {s: {"count": 0, "slices": [], "sources": [], "labelled": True} for s in c.SPLITS}
    with c.output_folder(out, overwrite) as stage:
        for split, triples in found.items():
            for image_file, label_file, index in triples:
                _place(image_file, stage / split / "x" / f"im{index:04d}{image_file.suffix.lower()}", link)
                label_out = stage / split / "y" / f"seg{index:04d}.tif"
                if label_file.suffix.lower() in (".tif", ".tiff"):
                    _place(label_file, label_out, link)
                else:
                    c.write_label(label_out, c.read_image_file(label_file, label=True))
                rec = records[split]
                rec["count"] += 1
                rec["slices"].append(int(index))
                rec["sources"].append({"image": str(image_file), "label": str(label_file)})
        c.write_dataset_json(
            stage, name=name, converter="data_prep.mitoem biapy", source_files=[src], splits=records,
            kind="instance", pixel_size_in=pixel_size_in, linked=link,
            val_from_train=carved, val_fraction=val_fraction if carved else None,
        )
    return Path(out) / "dataset.json"


def _place(src: Path, dst: Path, link: bool) -> None:
    if dst.exists():
        raise FileExistsError(f"{dst} would be written twice (two sources share slice number {dst.stem})")
    if link:
        os.symlink(src.resolve(), dst)
    else:
        shutil.copy2(src, dst)


# ---------------------------------------------------------------------------
# CLI


@guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.mitoem", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="layout", required=True)

    rel = sub.add_parser("release", help="the released im/ PNG folder + train/val(/test) instance labels")
    rel.add_argument("--images", required=True, type=Path, help="folder of imNNNN.png slices (the zip's im/)")
    for split in c.SPLITS:
        rel.add_argument(f"--{split}-labels", type=Path,
                         help=f"{split} labels: folder of segNNNN.tif, or an HDF5 volume")
        rel.add_argument(f"--{split}-z0", type=int, default=RELEASE_Z0[split],
                         help=f"image z of the first slice of an HDF5 {split} volume (default {RELEASE_Z0[split]})")
    rel.add_argument("--h5-key", help="dataset inside the HDF5 label files (default: the only one)")
    rel.add_argument("--z-step", type=positive_int, default=1, help="keep every N-th labelled slice (default 1)")
    rel.add_argument("--binary", action="store_true", help="write 0/1 uint8 masks instead of instance ids")
    rel.add_argument("--pixel-size-in", type=pixel_size, default=PIXEL_SIZE_NM, help=f"default {PIXEL_SIZE_NM} nm")
    rel.add_argument("--name", default="mitoem", help="dataset name, e.g. mitoem_h (default mitoem)")
    c.add_output_args(rel)

    bia = sub.add_parser("biapy", help="the already split BiaPy copy: check, then copy or link")
    bia.add_argument("--src", required=True, type=Path, help="folder holding train/ (val/, test/) with x/ and y/")
    bia.add_argument("--out", required=True, type=Path, help="output folder (must be empty unless --overwrite)")
    bia.add_argument("--overwrite", action="store_true")
    bia.add_argument("--link", action="store_true", help="symlink the files instead of copying them")
    bia.add_argument("--val-fraction", type=fraction, default=0.1,
                     help="when there is no val/, move this fraction of train (last slices) to val (default 0.1)")
    bia.add_argument("--pixel-size-in", type=pixel_size, default=PIXEL_SIZE_NM, help=f"recorded; default {PIXEL_SIZE_NM} nm")
    bia.add_argument("--name", default="mitoem", help="dataset name (default mitoem)")
    bia.add_argument("--debug", action="store_true", help="show the Python traceback of an error")

    args = parser.parse_args(argv)
    if args.layout == "release":
        path = convert_release(
            args.images, args.out, train_labels=args.train_labels, val_labels=args.val_labels,
            test_labels=args.test_labels, z0={s: getattr(args, f"{s}_z0") for s in c.SPLITS},
            h5_key=args.h5_key, z_step=args.z_step, binary=args.binary, pixel_size_in=args.pixel_size_in,
            pixel_size_out=args.pixel_size_out, box=args.crop, overwrite=args.overwrite, name=args.name)
    else:
        path = convert_biapy(args.src, args.out, link=args.link, val_fraction=args.val_fraction,
                             pixel_size_in=args.pixel_size_in, overwrite=args.overwrite, name=args.name)
    print(f"wrote {path.parent} ({path})")


if __name__ == "__main__":
    sys.exit(main())
