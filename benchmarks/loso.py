"""Leave-one-set-out generalisation: train on all sets but one, score zero-shot on the one left out.

    python benchmarks/loso.py --out runs/loso/em \
        --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse \
        --pixel-size unknown 4.6 5 --model-pixel-size 5 --epochs 6 --steps-per-epoch 100 [any train option ...]

For each set S: trains `OUT/without_<S>` on the other sets (a fixed budget:
--epochs x --steps-per-epoch batches; options this script does not know are
passed to `python -m xmdl_tf.train`), then scores that model on every set with
`evaluate` defaults, on each set's `val` split and on its `test` split (where it
has one). Prints 3 x 3 tables of F1 and IoU (rows: the set left out of training;
columns: the set scored; the diagonal is zero-shot) on the val splits and on
the held-out splits (test, or val for a set without one, as for Lucchi++) and writes `OUT/loso.json` and
`OUT/loso.md`. Choices (augmentation, scale handling, model size, loss) are
made on the mean zero-shot F1 of the *val* table: every split of a left-out set
is unseen by its model, and the test splits stay out of every choice.
Re-running resumes unfinished trainings and skips finished scores.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def score(model: Path, data: str, split: str, out: Path, pixel_size_nm: float | None) -> dict | None:
    """evaluate()'s metrics for one model, set and split (cached in out/metrics.json); None if no such split."""
    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.io import DataError, find_pairs

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    try:
        find_pairs(data, split)
    except DataError:
        return None
    return evaluate(str(model), data, split, out=out, pixel_size_nm=pixel_size_nm)


def table_md(cells: dict, names: list[str], split: str, key: str = "f1") -> str:
    head = f"| left out \\ scored ({split}, {key}) | " + " | ".join(names) + " |"
    rows = [head, "|---|" + "---|" * len(names)]
    for left in names:
        vals = []
        for scored in names:
            m = cells.get(left, {}).get(scored, {}).get(split)
            v = "-" if m is None else f"{m[key]:.3f}"
            vals.append(f"**{v}**" if left == scored else v)
        rows.append(f"| {left} | " + " | ".join(vals) + " |")
    zs = [cells[n][n][split][key] for n in names if cells.get(n, {}).get(n, {}).get(split)]
    if zs:
        rows.append(f"\nmean zero-shot {key} ({split}): {sum(zs) / len(zs):.3f} over {len(zs)} sets")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True, help="three (or more) data sets in the split layout")
    p.add_argument("--out", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed), as for train")
    p.add_argument("--only", nargs="+", default=None, help="left-out sets to run (names); default all")
    args, train_args = p.parse_known_args(argv)
    from xmdl_tf.train import main as train_main, parse_pixel_sizes, run_finished

    if len(args.data) < 3:
        p.error("leave-one-set-out needs at least three data sets")
    px = parse_pixel_sizes(args.pixel_size, len(args.data))
    names = [Path(d).resolve().name for d in args.data]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells: dict = {}
    for i, left in enumerate(names):
        if args.only and left not in args.only:
            continue
        run = out / f"without_{left}"
        keep = [j for j in range(len(names)) if j != i]
        if not run_finished(run):
            pxa = ["unknown" if px[j] is None else str(px[j]) for j in keep]
            train_main(["--data", *[args.data[j] for j in keep], "--out", str(run), "--pixel-size", *pxa, *train_args])
        for j, scored in enumerate(names):
            for split in ("val", "test"):
                m = score(run, args.data[j], split, run / "scores" / f"{scored}_{split}", px[j])
                if m is not None:
                    cells.setdefault(left, {}).setdefault(scored, {})[split] = {
                        k: m[k] for k in ("f1", "iou", "precision", "recall", "instance_f1_iou50", "n_images")}
            # The held-out figure: test where the set has one, else val (Lucchi++).
            c = cells.get(left, {}).get(scored, {})
            if c:
                c["held_out"] = c.get("test", c.get("val"))
    # Each run's own config says how it was trained (this call's options may be fewer on a rerun).
    recipes = {}
    for left in cells:
        cfg = json.loads((out / f"without_{left}" / "config.json").read_text())
        recipes[left] = {k: cfg[k] for k in ("data", "model", "train", "augment", "normalization") if k in cfg}
        recipes[left]["tiles_seen"] = cfg["info"].get("tiles_seen")
        recipes[left]["train_seconds"] = cfg["info"].get("train_seconds")
    (out / "loso.json").write_text(json.dumps({"sets": names, "pixel_size_nm": px, "runs": recipes,
                                               "cells": cells}, indent=2) + "\n")
    md = "\n".join(table_md(cells, names, split, key) for split in ("val", "held_out") for key in ("f1", "iou"))
    (out / "loso.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
