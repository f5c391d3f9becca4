"""Convert the Lucchi / EPFL hippocampus mitochondria stacks to the split layout.

Source: "Electron Microscopy Dataset" of the EPFL CVLab (Lucchi et al., 2012,
https://www.epfl.ch/labs/cvlab/data/data-em/): two FIB-SEM sub-volumes of the
CA1 hippocampus, 165 slices of 768 x 1024 px each, about 5 x 5 x 5 nm voxels.
Expected files in ``--src`` (as downloaded, multi-page TIFF, labels 0/255)::

    training.tif  training_groundtruth.tif  testing.tif  testing_groundtruth.tif

Output: train and val from the training stack (val = the last ``--val-fraction``
of its slices, whole slices in one z block, so val never interleaves with
train), test from the testing stack. Labels are written 0/1 uint8.

    python -m data_prep.lucchi --src lucchi/ --out data/lucchi --val-fraction 0.15
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from data_prep import _common as c
from xmdl_tf.cli import guarded, pixel_size

FILES = {
    "train_images": "training.tif",
    "train_labels": "training_groundtruth.tif",
    "test_images": "testing.tif",
    "test_labels": "testing_groundtruth.tif",
}
PIXEL_SIZE_NM = 5.0


def _check_binary(stack: c.Stack) -> None:
    """Lucchi masks are 0/255 (or 0/1); anything else means the wrong file."""
    for i in range(len(stack)):
        values = np.unique(stack.read(i))
        if not set(values.tolist()) <= {0, 1, 255}:
            raise ValueError(f"{stack.names[i]} holds values {values[:10].tolist()}; "
                             "expected a 0/255 (or 0/1) mitochondria mask")


def convert_lucchi(src: str | Path, out: str | Path, *, val_fraction: float = 0.1, overwrite: bool = False,
                   pixel_size_in: float = PIXEL_SIZE_NM, pixel_size_out: float | None = None,
                   box: Sequence[int] | None = None) -> Path:
    """Write the Lucchi stacks in ``src`` as ``out/{train,val,test}/{x,y}``.

    ``val_fraction`` of the training slices (rounded, at least one when > 0)
    form the validation split, taken as the last slices in z. Returns the
    path of the written dataset.json.
    """
    src = Path(src)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    paths = {k: src / v for k, v in FILES.items()}
    for path in paths.values():
        if not path.is_file():
            raise FileNotFoundError(f"missing Lucchi file: {path} (expected {', '.join(FILES.values())} in {src})")
    stacks = {k: c.open_stack(p, label=k.endswith("labels")) for k, p in paths.items()}
    for part in ("train", "test"):
        images, labels = stacks[f"{part}_images"], stacks[f"{part}_labels"]
        if len(images) != len(labels):
            raise ValueError(f"{labels.path} has {len(labels)} slices but {images.path} has {len(images)}")
        _check_binary(labels)

    n_train = len(stacks["train_images"])
    n_val = c.split_counts(n_train, (1 - val_fraction, val_fraction))[1] if val_fraction > 0 else 0
    factor = c.scale_factor(pixel_size_in, pixel_size_out)
    pairs = [c.Pair("train" if z < n_train - n_val else "val", stacks["train_images"], z, stacks["train_labels"])
             for z in range(n_train)]
    pairs += [c.Pair("test", stacks["test_images"], z, stacks["test_labels"]) for z in range(len(stacks["test_images"]))]

    with c.output_folder(out, overwrite) as stage:
        records = c.convert_pairs(stage, pairs, kind="binary", box=box, factor=factor)
        c.write_dataset_json(
            stage, name="lucchi_epfl_hippocampus", converter="data_prep.lucchi", source_files=list(paths.values()),
            splits=records, kind="binary", pixel_size_in=pixel_size_in, factor=factor, box=box,
            val_fraction=val_fraction,
            note="train/val from training.tif (val = last slices in z), test from testing.tif",
        )
    return Path(out) / "dataset.json"


@guarded
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data_prep.lucchi", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, type=Path, help="folder holding the four Lucchi TIFF stacks")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of training slices (last in z) used for validation (default 0.1)")
    parser.add_argument("--pixel-size-in", type=pixel_size, default=PIXEL_SIZE_NM,
                        help=f"source pixel size in nm (default {PIXEL_SIZE_NM})")
    c.add_output_args(parser)
    args = parser.parse_args(argv)
    path = convert_lucchi(args.src, args.out, val_fraction=args.val_fraction, overwrite=args.overwrite,
                          pixel_size_in=args.pixel_size_in, pixel_size_out=args.pixel_size_out, box=args.crop)
    print(f"wrote {path.parent} ({path})")


if __name__ == "__main__":
    sys.exit(main())
