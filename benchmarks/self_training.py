"""Label-free adaptation measured on the leave-one-set-out models: `xmdl_tf.adapt` on the set left out.

    python benchmarks/self_training.py runs/loso/em_scale_0.5_2 --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5

For each model RUN/without_<S> of `benchmarks/loso.py`, runs `xmdl_tf.adapt.adapt`
on the *training* slices of the left-out set S (its images only: the labels are
never read), as a user with a new stack and no annotation would, with adapt's
settings (`--slices`, `--low`, `--high`, `--min-area`, `--epochs`,
`--steps-per-epoch`, `--rounds`, `--consensus`: the same options and defaults); then scores each
round's model on S's val and held-out splits as `loso.py` scores (evaluate
defaults). Writes RUN/self_training[_consensus]/{self_training.json,md}, with
adapt's folders in .../without_<S>/; resumable (the same command continues).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (shared benchmark helpers)
from loso import score  # noqa: E402


def row_name(left: str, rnd: int) -> str:
    return left if rnd == 1 else f"{left} (round {rnd})"


def mean_f1(rows: list[dict], key: str) -> float:
    """Mean F1 of `rows` under `key` (a metrics dict, or a zero-shot F1 itself)."""
    return float(np.mean([r[key] if isinstance(r[key], float) else r[key]["f1"] for r in rows]))


def main(argv: list[str] | None = None) -> int:
    from xmdl_tf.adapt import adapt, build_parser as adapt_parser, drift_round
    from xmdl_tf.cli import nonnegative_float
    from xmdl_tf.config import ZOOM_SEARCH

    defaults = adapt_parser().parse_args(["-", "--out", "-"])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a benchmarks/loso.py output folder (holding without_<set>/)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None)
    for opt in ("slices", "low", "high", "min_area", "epochs", "steps_per_epoch", "rounds"):
        p.add_argument("--" + opt.replace("_", "-"), type=type(getattr(defaults, opt)), default=getattr(defaults, opt),
                       help=f"as for xmdl_tf.adapt (default {getattr(defaults, opt)})")
    p.add_argument("--consensus", action="store_true", help="as for xmdl_tf.adapt (writes RUN/self_training_consensus)")
    p.add_argument("--zoom-search", default=defaults.zoom_search, choices=ZOOM_SEARCH,
                   help="as for xmdl_tf.adapt (other than off: writes RUN/self_training_zoom_MODE; 'ood' needs each "
                        f"model's ood.npz, from xmdl_tf.calibrate on its training sets) (default {defaults.zoom_search})")
    p.add_argument("--max-drift", type=nonnegative_float, default=0.0,
                   help="adapt's optional early stop (e.g. 0.2), applied to the recorded rounds for one more "
                        "summary row (every round is run and scored all the same)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from xmdl_tf.train import parse_pixel_sizes

    run = Path(args.run)
    px = parse_pixel_sizes(args.pixel_size, len(args.data))
    names = [Path(d).resolve().name for d in args.data]
    if not (run / "loso.json").is_file():
        p.error(f"{run}: no loso.json (a benchmarks/loso.py output folder is needed)")
    if args.zoom_search == "ood":
        models = (run / f"without_{left}" for left in names)
        _util.require_ood(p, [m for m in models if (m / "config.json").is_file()])
    base = json.loads((run / "loso.json").read_text())["cells"]
    out = run / ("self_training" + ("_consensus" if args.consensus else "")
                 + (f"_zoom_{args.zoom_search}" if args.zoom_search != "off" else ""))
    rows, picked = {}, {}
    for i, left in enumerate(names):
        model = run / f"without_{left}"
        if not (model / "config.json").is_file():
            continue
        work = out / f"without_{left}"
        # A finished adaptation with these settings is returned as it is; one with others is refused.
        adapt(model, [str(Path(args.data[i]) / "train" / "x")], work, px[i], args.slices, args.low, args.high,
              args.min_area, args.rounds, args.epochs, args.steps_per_epoch, consensus=args.consensus,
              max_drift=None, zoom_search=args.zoom_search)  # every round, so that each is scored; the stop rule is applied below
        shares = {r["round"]: r for r in json.loads((work / "adapt.json").read_text())["rounds"]}
        stop = drift_round([shares[r]["mitochondrion"] for r in sorted(shares)], args.max_drift)
        picked[left] = args.rounds if stop is None else stop - 1
        for rnd in range(1, args.rounds + 1):
            row = {"round": rnd, "pseudo_labels": shares[rnd]}
            for split in ("val", "test"):
                m = score(work / f"round{rnd}" / "model", args.data[i], split,
                          work / f"round{rnd}" / "scores" / f"{left}_{split}", px[i])
                if m is not None:
                    row[split] = {k: m[k] for k in ("f1", "iou", "precision", "recall", "instance_f1_iou50")}
                    row[split + "_zero_shot"] = base[left][left][split]["f1"]
            row["held_out"] = row.get("test", row.get("val"))
            row["held_out_zero_shot"] = row.get("test_zero_shot", row.get("val_zero_shot"))
            rows[row_name(left, rnd)] = row
    (out / "self_training.json").write_text(json.dumps({"recipe": vars(args), "rows": rows, "rounds_kept": picked},
                                                       indent=2) + "\n")
    lines = ["| left out | pseudo-labelled slices (mito / background / ignored) | val F1 zero shot -> self-trained "
             "| held-out F1 zero shot -> self-trained | precision / recall (val) |", "|---|---|---|---|---|"]
    for left, r in rows.items():
        pl, v = r["pseudo_labels"], r.get("val", {})
        zooms = np.unique(list(pl.get("zooms", {}).values()), return_counts=True)
        at = ", ".join(f"x{z:.3g} ({n})" for z, n in zip(*zooms)) if args.zoom_search != "off" else ""
        lines.append(f"| {left} | {pl['slices']} ({pl['mitochondrion']:.2f} / {pl['background']:.2f} / "
                     f"{pl['ignored']:.2f}){'; zooms ' + at if at else ''} | {r.get('val_zero_shot', float('nan')):.3f} -> {v.get('f1', float('nan')):.3f} "
                     f"| {r['held_out_zero_shot']:.3f} -> {r['held_out']['f1']:.3f} "
                     f"| {v.get('precision', float('nan')):.3f} / {v.get('recall', float('nan')):.3f} |")
    def summary(label: str, sel: list[dict]) -> None:
        if sel:
            lines.append(f"| **{label}** | | {mean_f1(sel, 'val_zero_shot'):.3f} -> {mean_f1(sel, 'val'):.3f} "
                         f"| {mean_f1(sel, 'held_out_zero_shot'):.3f} -> {mean_f1(sel, 'held_out'):.3f} | |")

    for rnd in range(1, args.rounds + 1):
        summary(row_name("mean", rnd), [r for r in rows.values() if r["round"] == rnd])
    if args.max_drift:
        summary(f"mean, stopping on drift > {args.max_drift:g} (rounds kept: {', '.join(map(str, picked.values()))})",
                [rows[row_name(left, k)] for left, k in picked.items()])
    (out / "self_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
