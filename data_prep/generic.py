"""Convert any image stack with its label stack to the split layout.

Source: your own data. ``--images`` and ``--labels`` may each be a folder of
2D files (.png/.tif; images also .jpg), a multi-page or 3D TIFF, an HDF5
volume (``--h5-key``; needs h5py) or a .npy array, all (Z, H, W). Folders
pair files by the number in their names (``im0007.png`` with
``seg0007.tif``) when both sides are numbered alike, else by sorted order;
two numbered folders may then differ only by one shift of the numbering
(``im0001..`` with ``seg0000..``): other disagreements (a label missing and
another extra) are refused, naming the first file. Labels may be binary (0
and one other value, e.g. 0/255 -> written 0/1 uint8) or instance ids
(written unchanged as uint16/uint32); ``--labels-kind auto`` decides from the
whole stack. A label drawn in the alpha channel only (RGBA of one colour) is
read as its alpha, as training reads it.

Splits are whole slices in contiguous z blocks (train, val, test in that
order), so no test slice is a z-neighbour of a training slice. ``--shuffle``
(seeded) mixes slices across splits -- only for independent 2D images.

    python -m data_prep.generic --images stack.tif --labels masks/ --out data/mine \\
        --splits 0.7,0.15,0.15 --pixel-size-in 4 --pixel-size-out 8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep import _common as c
from xmdl_tf.cli import guarded, pixel_size


def scan_labels(labels: c.Stack) -> tuple[str, int]:
    """('binary' or 'instance', largest value) over the whole label stack: binary when the stack
    holds 0 and one other value, or when every slice holds 0 and one of the mask values 1 / 255
    (masks saved 0/1 and 0/255 mixed); else instance (one object per slice, ids 3 and 7, stays ids)."""
    per_slice = True
    values: set[int] = set()
    max_value = 0
    for i in range(len(labels)):
        label = c.check_label_values(labels.read(i), labels.names[i])
        max_value = max(max_value, int(label.max(initial=0)))
        found = set(np.unique(label).tolist()) - {0}
        per_slice = per_slice and len(found) <= 1
        if len(values) <= 2:  # beyond two other values the union is settled
            values |= found
    binary = len(values) <= 1 or (per_slice and values <= {1, 255})
    return ("binary" if binary else "instance"), max_value


def convert_generic(images: str | Path, labels: str | Path, out: str | Path, *,
                    splits: Sequence[float] = (0.7, 0.15, 0.15), shuffle: bool = False, seed: int = 0,
                    labels_kind: str = "auto", h5_key: str | None = None, label_h5_key: str | None = None,
                    image_pattern: str | None = None, label_pattern: str | None = None,
                    pixel_size_in: float | None = None, pixel_size_out: float | None = None,
                    box: Sequence[int] | None = None, overwrite: bool = False, name: str | None = None) -> Path:
    """Write ``images`` + ``labels`` as ``out/{train,val,test}/{x,y}`` split by
    slice ``splits`` fractions (train, val, test). Returns dataset.json's path."""
    if labels_kind not in ("auto", "binary", "instance"):
        raise ValueError(f"labels_kind must be auto, binary or instance, got '{labels_kind}'")
    image_stack = c.open_stack(images, h5_key=h5_key, pattern=image_pattern)
    label_stack = c.open_stack(labels, label=True, h5_key=label_h5_key or h5_key, pattern=label_pattern)
    positions = c.pair_positions(image_stack, label_stack)
    kind, max_value = scan_labels(label_stack)
    if labels_kind != "auto":
        kind = labels_kind
    try:
        dtype = c.instance_dtype(max_value) if kind == "instance" else None
    except ValueError:
        raise ValueError(f"{label_stack.path}: instance id {max_value} does not fit in uint32; number the objects "
                         "1, 2, 3, ... (e.g. skimage.segmentation.relabel_sequential)") from None
    factor = c.scale_factor(pixel_size_in, pixel_size_out)
    assignment = c.assign_splits(len(positions), splits, shuffle=shuffle, seed=seed)
    pairs = [c.Pair(split, image_stack, positions[k][0], label_stack, positions[k][1])
             for split in c.SPLITS for k in assignment[split]]

    with c.output_folder(out, overwrite) as stage:
        records = c.convert_pairs(stage, pairs, kind=kind, box=box, factor=factor, label_dtype=dtype)
        c.write_dataset_json(
            stage, name=name or Path(out).name, converter="data_prep.generic",
            source_files=[image_stack.path, label_stack.path], splits=records, kind=kind,
            pixel_size_in=pixel_size_in, factor=factor, box=box,
            split_fractions=[float(f) for f in splits], shuffled=shuffle, seed=seed if shuffle else None,
        )
    return Path(out) / "dataset.json"


@guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.generic", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True, type=Path, help="image folder, TIFF stack, .h5 or .npy volume")
    parser.add_argument("--labels", required=True, type=Path, help="label folder, TIFF stack, .h5 or .npy volume")
    parser.add_argument("--splits", type=c.fractions_arg, default=(0.7, 0.15, 0.15),
                        help="train,val,test fractions of whole slices (default 0.7,0.15,0.15)")
    parser.add_argument("--shuffle", action="store_true",
                        help="assign slices to splits at random (puts z-neighbours in different splits)")
    parser.add_argument("--seed", type=int, default=0, help="seed for --shuffle (default 0)")
    parser.add_argument("--labels-kind", choices=("auto", "binary", "instance"), default="auto")
    parser.add_argument("--h5-key", help="dataset inside an HDF5 --images (and --labels) file")
    parser.add_argument("--label-h5-key", help="dataset inside an HDF5 --labels file, if different")
    parser.add_argument("--image-pattern", help="glob for image files in an --images folder, e.g. 'im*.png'")
    parser.add_argument("--label-pattern", help="glob for label files in a --labels folder")
    parser.add_argument("--pixel-size-in", type=pixel_size, metavar="NM", help="source pixel size in nm (recorded)")
    parser.add_argument("--name", help="dataset name in dataset.json (default: the --out folder name)")
    c.add_output_args(parser)
    args = parser.parse_args(argv)
    path = convert_generic(args.images, args.labels, args.out, splits=args.splits, shuffle=args.shuffle,
                           seed=args.seed, labels_kind=args.labels_kind, h5_key=args.h5_key,
                           label_h5_key=args.label_h5_key, image_pattern=args.image_pattern,
                           label_pattern=args.label_pattern, pixel_size_in=args.pixel_size_in,
                           pixel_size_out=args.pixel_size_out, box=args.crop, overwrite=args.overwrite,
                           name=args.name)
    print(f"wrote {path.parent} ({path})")


if __name__ == "__main__":
    sys.exit(main())
