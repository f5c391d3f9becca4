"""Deep ensembles on an unseen microscope: several leave-one-set-out draws averaged.

    python benchmarks/loso_ensemble.py runs/loso/em_seed2 runs/loso/em_seed3 runs/loso/em_seed4 \
        --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem \
        ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5 --out runs/loso/ensemble

Each argument is a `benchmarks/loso.py` folder of the same recipe trained with
another seed (a "draw"). For every left-out set, its `without_<set>` models
of all draws predict every slice of each set (the left-out one zero shot, the
two seen ones in distribution) on the val and held-out splits (test, or val
where a set has none), one pass each as the leave-one-set-out table scores
them (no TTA, the pixel size's grid). Printed per cell: each member's pooled
foreground F1, their mean, and the F1 of the mean probability of every subset
of K members (K = 2 .. number of draws; the mean over the subsets of each K).
Writes OUT/loso_ensemble.json and .md. Nothing is chosen on held-out cells.
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)
from _util import f1_of as f1, pixel_counts as counts  # noqa: E402


def score_cell(members: list, slices: list[tuple[np.ndarray, np.ndarray]], pixel_size_nm: float | None,
               threshold: float) -> dict:
    """Pooled F1 of each member, and of the mean probability of each subset of them, over `slices`."""
    n = len(members)
    subsets = [s for k in range(2, n + 1) for s in itertools.combinations(range(n), k)]
    single = np.zeros((n, 3), np.int64)
    mixed = np.zeros((len(subsets), 3), np.int64)
    for img, lab in slices:
        probs = [m.predict_slice(img, pixel_size_nm=pixel_size_nm, tta=False) for m in members]
        for i, p in enumerate(probs):
            single[i] += counts(p, lab, threshold)
        for j, s in enumerate(subsets):
            mixed[j] += counts(np.mean([probs[i] for i in s], 0), lab, threshold)
    row = {"members": [f1(c) for c in single]}
    row["member mean"] = float(np.mean(row["members"]))
    for k in range(2, n + 1):
        row[f"ensemble of {k}"] = float(np.mean([f1(c) for s, c in zip(subsets, mixed) if len(s) == k]))
    return row


def main(argv: list[str] | None = None) -> int:
    from xmdl_tf.evaluate import held_out_split
    from xmdl_tf.io import find_pairs, read_pair
    from xmdl_tf.predict import load_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("draws", nargs="+", help="benchmarks/loso.py folders of one recipe, other seeds (>= 2)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed)")
    p.add_argument("--out", required=True, help="folder for loso_ensemble.json and .md")
    args = p.parse_args(argv)
    px = _util.pixel_sizes(p, args)
    if len(args.draws) < 2:
        p.error("give at least two draws")
    names = [Path(d).resolve().name for d in args.data]
    for draw in args.draws:
        for name in names:
            if not (Path(draw) / f"without_{name}" / "model.keras").is_file():
                p.error(f"{Path(draw) / f'without_{name}'}: no model.keras")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for left in names:
        members = [load_model(Path(d) / f"without_{left}") for d in args.draws]
        threshold = members[0].config.inference.threshold
        for data, name, size in zip(args.data, names, px):
            for split in ("val", "held-out"):
                pairs = find_pairs(data, "val" if split == "val" else held_out_split(data))
                row = {"left out": left, "scored": name, "kind": "zero shot" if name == left else "seen",
                       "split": split}
                row.update(score_cell(members, [read_pair(q) for q in pairs], size, threshold))
                rows.append(row)
                print(json.dumps(row), flush=True)
    ks = [f"ensemble of {k}" for k in range(2, len(args.draws) + 1)]
    cols = ["member mean"] + ks
    md = ["| left out | scored | split | members | " + " | ".join(cols) + " |", "|---|---|---|---|" + "---|" * len(cols)]
    md += [f"| {r['left out']} | {r['scored']}{' (zero shot)' if r['kind'] == 'zero shot' else ''} | {r['split']} | "
           + " / ".join(f"{v:.3f}" for v in r["members"]) + " | " + " | ".join(f"{r[c]:.3f}" for c in cols) + " |"
           for r in rows]
    md.append("")
    for kind in ("zero shot", "seen"):
        for split in ("val", "held-out"):
            sel = [r for r in rows if r["kind"] == kind and r["split"] == split]
            if sel:
                md.append(f"mean over {len(sel)} {kind} cells ({split}): "
                          + ", ".join(f"{c} {np.mean([r[c] for r in sel]):.3f}" for c in cols))
    _util.write_results(out, "loso_ensemble", {"draws": [str(d) for d in args.draws], "rows": rows}, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
