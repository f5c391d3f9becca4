"""Adapt a trained model to your microscope from a few annotated slices: `python -m xmdl_tf.finetune`.

    python -m xmdl_tf.finetune --model xmdl_ref --data my_annotated/ --out runs/mine --max-slices 2

The same trainer as `python -m xmdl_tf.train --init-from MODEL` (one code path),
with fine-tuning defaults: the parent's architecture, weights and
normalisation; learning rate 1e-4; heavy augmentation (strength 2); a fixed
budget of 10 epochs of at least 40 steps (3,200 tiles at batch 8), the best
epoch by validation loss kept (one pass over a few slices is 1-7 steps, and
early stopping on such epochs ended runs on noise: models/README.md, "Adapting
to a new stack"); optionally a frozen encoder. A single annotated slice is enough: without a
`val` split, validation is carved from it as held-back rows, and config.json
says so. Sparse annotation: label the pixels you are sure of and give the
rest the value `--ignore-value` (e.g. 255, with mitochondria 1 and background
0); the loss ignores them (a data set's dataset.json "ignore_value" is used
when no flag gives one). The parent is validated once on the same validation
data before the first epoch, and an epoch must beat its validation loss to
replace it: a run no epoch improves keeps the parent's weights, and says so.
The new `config.json` records the lineage (parent model and its data, the
slices used here) and the parent's and the kept model's validation figures
(`info.parent_validation`, `info.best_validation`).
"""
from __future__ import annotations

import sys

from . import cli
from .train import build_parser, check_args, train_from_args


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    parser = build_parser("python -m xmdl_tf.finetune", finetune=True, description=__doc__.split("\n\n")[0])
    args = parser.parse_args(argv)
    check_args(parser, args)
    train_from_args(args, args.model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
