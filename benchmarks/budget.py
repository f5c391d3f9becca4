"""Training budget: validation F1 against tiles seen and wall time, for several runs.

    python benchmarks/budget.py runs/f8 runs/f16 --out models/budget.png

Reads each run folder's history.csv (`tiles_seen`, `seconds`, `val_f1`, and the
per-set `val_<set>_f1` columns) and config.json (base filters, precision,
backend), draws mean validation F1 against tiles seen and against hours of
training, and prints the best validation F1 each run reached within common
budgets of wall time (and, with --tiles, of training tiles, which compares runs
made on hosts of different speed), so model sizes are compared at equal cost.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def label(run: Path) -> str:
    cfg = json.loads((run / "config.json").read_text())
    mp = cfg["train"].get("mixed_precision") or "float32"
    return f"{run.name}: f{cfg['model']['base_filters']}, {mp}, {cfg['info'].get('versions', {}).get('backend', 'tensorflow')}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (with history.csv and config.json)")
    p.add_argument("--out", default=None, help="PNG to write")
    p.add_argument("--hours", nargs="+", type=float, default=[0.5, 1, 2, 4])
    p.add_argument("--tiles", nargs="*", type=int, default=[],
                   help="also the best val F1 within these many training tiles (independent of the host's speed, "
                        "for runs trained on different machines)")
    args = p.parse_args(argv)
    import pandas as pd

    rows, curves = [], []
    for r in map(Path, args.runs):
        h = pd.read_csv(r / "history.csv")
        if "tiles_seen" not in h:
            print(f"{r}: history.csv has no tiles_seen column (trained before it was recorded); skipped")
            continue
        curves.append((label(r), h))
        row = {"run": label(r), "epochs": len(h), "tiles": int(h["tiles_seen"].iloc[-1]),
               "hours": round(h["seconds"].iloc[-1] / 3600, 2), "best val F1": round(h["val_f1"].max(), 4)}
        for hrs in args.hours:
            within = h[h["seconds"] <= hrs * 3600]
            row[f"F1 @ {hrs:g} h"] = round(within["val_f1"].max(), 4) if len(within) else None
        for n in args.tiles:
            within = h[h["tiles_seen"] <= n]
            row[f"F1 @ {n:,} tiles"] = round(within["val_f1"].max(), 4) if len(within) else None
        rows.append(row)
    if not rows:
        return 1
    print(pd.DataFrame(rows).to_markdown(index=False) if _has_tabulate() else pd.DataFrame(rows).to_string(index=False))
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
        for name, h in curves:
            axes[0].plot(h["tiles_seen"] / 1000, h["val_f1"], "o-", ms=3, label=name)
            axes[1].plot(h["seconds"] / 3600, h["val_f1"], "o-", ms=3, label=name)
        axes[0].set_xlabel("training tiles seen (thousands)")
        axes[1].set_xlabel("wall time (hours)")
        for ax in axes:
            ax.set_ylabel("validation F1 (mean over sets)")
            ax.grid(alpha=0.3)
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    return 0


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
