"""One row per leave-one-set-out study: the figures the model card compares arms by.

    python benchmarks/loso_arms.py runs/loso/em_scale_0.5_2 runs/loso/em-elastic "runs/loso/em,loss=dice_ce"

Reads each folder's `loso.json` (written by `benchmarks/loso.py`) and prints a
Markdown table: the recipe (zoom range, loss, base filters, training tiles per
model, from the first run's config), zero-shot val F1 on each left-out set and their mean (the
study's choice), the zero-shot held-out F1 mean (test, or val where a set has
no test split), the zero-shot instance F1 (IoU >= 0.5) mean on val, and the
mean val F1 of the in-distribution cells (a model scored on a set it was
trained on). A folder without a finished table is one line on stderr.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def arm_row(cells: dict, names: list[str]) -> dict:
    """Summary figures of one study's cells (loso.json "cells": left -> scored -> split -> metrics).

    Returns dict with "zero_shot" (list of val F1 per left-out set, None where
    missing), "mean", "held_out_mean", "instance_mean", "in_distribution_mean"
    (None where no cell exists).
    """
    def get(left, scored, split, key):
        return cells.get(left, {}).get(scored, {}).get(split, {}).get(key)

    def mean(v):
        v = [x for x in v if x is not None]
        return sum(v) / len(v) if v else None

    zs = [get(s, s, "val", "f1") for s in names]
    return {
        "zero_shot": zs,
        "mean": mean(zs) if None not in zs else None,
        "held_out_mean": mean([get(s, s, "held_out", "f1") for s in names]),
        "instance_mean": mean([get(s, s, "val", "instance_f1_iou50") for s in names]),
        "in_distribution_mean": mean([get(a, b, "val", "f1") for a in names for b in names if a != b]),
    }


def recipe(runs: dict) -> str:
    """Short recipe of a study's first run (loso.json "runs"): zoom range, intensity strength,
    sharpening, random texture, input low-pass, dropout, MixStyle and normalisation (when not the
    default), loss, base filters, tiles, and the
    learning-rate schedule and weight averaging when used."""
    r = next(iter(runs.values()), None)
    if not r:
        return "-"
    aug = r.get("augment", {})
    lo, hi = aug.get("scale", (1, 1))
    strength = aug.get("strength", 1)
    model = r.get("model", {})
    blur, dropout, mix = model.get("input_blur", 0), model.get("dropout", 0), model.get("mixstyle", 0)
    norm = r.get("normalization", {}).get("method", "percentile")
    return (f"zoom x{lo:g}-{hi:g}, " + (f"intensity x{strength:g}, " if strength != 1 else "")
            + "".join(f"{name} {aug[name]:g}, " for name in ("sharpen", "texture") if aug.get(name))
            + f"{r.get('train', {}).get('loss', '?')}, f{model.get('base_filters', '?')}, "
            + (f"input blur {blur:g}, " if blur else "") + (f"dropout {dropout:g}, " if dropout else "")
            + (f"mixstyle {mix:g}, " if mix else "")
            + (f"{norm} normalisation, " if norm != "percentile" else "")
            + f"{r.get('tiles_seen') or '?'} tiles"
            + (f", {schedule} learning rate" if (schedule := r.get("train", {}).get("lr_schedule", "constant"))
               != "constant" else "")
            + (f", weight average {ema:g}" if (ema := r.get("train", {}).get("weight_average", 0)) else ""))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="study folders holding loso.json")
    args = p.parse_args(argv)
    rows, names = [], None
    for run in args.runs:
        f = Path(run) / "loso.json"
        try:
            d = json.loads(f.read_text())
            if not isinstance(d, dict) or not {"sets", "cells"} <= d.keys():
                raise ValueError("no 'sets' and 'cells'")
        except (OSError, ValueError) as e:
            print(f"{f}: no readable leave-one-set-out table ({e.__class__.__name__}); run benchmarks/loso.py first",
                  file=sys.stderr)
            continue
        names = names or d["sets"]
        if d["sets"] != names:
            print(f"{f}: other sets ({', '.join(d['sets'])}) than the first table; left out", file=sys.stderr)
            continue
        rows.append((Path(run).name, recipe(d.get("runs", {})), arm_row(d["cells"], names)))
    if not rows:
        return 1

    def fmt(x):
        return "-" if x is None else f"{x:.3f}"

    print("| arm | recipe | " + " | ".join(f"zero-shot val F1: {n}" for n in names)
          + " | **mean** | zero-shot held-out F1, mean | zero-shot instance F1 (val), mean"
          " | in-distribution val F1, mean |")
    print("|---|---|" + "---|" * (len(names) + 4))
    for arm, how, r in rows:
        print(f"| {arm} | {how} | " + " | ".join(fmt(x) for x in r["zero_shot"]) + f" | **{fmt(r['mean'])}** | "
              f"{fmt(r['held_out_mean'])} | {fmt(r['instance_mean'])} | {fmt(r['in_distribution_mean'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
