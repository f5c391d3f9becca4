"""Label-free adaptation measured on the leave-one-set-out models: self-training on pseudo-labels.

    python benchmarks/self_training.py runs/loso/em_scale_0.5_2 --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5

For each model RUN/without_<S> of `benchmarks/loso.py`: predict (with TTA) up to
`--slices` evenly spaced *training* slices of the left-out set S, whose labels are
never read; keep the pixels the model is sure of as pseudo-labels (mitochondrion
where p >= `--high`, background where p <= `--low`, objects under `--min-area` px
and everything in between ignored; `xmdl_tf.adapt`'s pseudo-labels); fine-tune the model on them alone, as a user
with a new stack and no annotation could (`--with-sources`: together with the
model's own labelled training sets, which a user of the shipped model does not
have), "em" augmentation at strength 1, learning rate 1e-4 (`xmdl_tf.finetune`);
score the result on S's val and held-out splits as `loso.py` scores (evaluate
defaults). `--rounds N` pseudo-labels again with each round's model and fine-tunes
the original on those labels. Writes RUN/self_training[_sources]/{self_training.json,md};
resumable.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loso import score  # noqa: E402
from xmdl_tf.adapt import IGNORE  # noqa: E402

def write_pseudo_set(model: Path, data: str, pixel_size_nm: float | None, out: Path, n_slices: int,
                     low: float, high: float, min_area: int) -> dict:
    """Pseudo-labelled copy of up to `n_slices` evenly spaced training slices of `data` (labels unread)."""
    from xmdl_tf.adapt import evenly_spaced, write_pseudo_set as write
    from xmdl_tf.io import find_pairs
    from xmdl_tf.predict import load_model

    pairs = find_pairs(data, "train")
    return write(load_model(model), [pairs[i] for i in evenly_spaced(len(pairs), n_slices)], out, pixel_size_nm,
                 low, high, min_area)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a benchmarks/loso.py output folder (holding without_<set>/)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--pixel-size", nargs="+", default=None)
    p.add_argument("--slices", type=int, default=8, help="training slices of the left-out set to pseudo-label")
    p.add_argument("--low", type=float, default=0.1)
    p.add_argument("--high", type=float, default=0.9)
    p.add_argument("--min-area", type=int, default=100, help="px at the slice's grid")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--steps-per-epoch", type=int, default=60)
    p.add_argument("--rounds", type=int, default=1,
                   help="pseudo-label again with the last round's model and fine-tune the original on those labels")
    p.add_argument("--with-sources", action="store_true", help="fine-tune with the model's training sets too")
    args = p.parse_args(argv)
    from xmdl_tf.finetune import main as finetune_main
    from xmdl_tf.train import parse_pixel_sizes, run_finished

    run = Path(args.run)
    px = parse_pixel_sizes(args.pixel_size, len(args.data))
    names = [Path(d).resolve().name for d in args.data]
    base = json.loads((run / "loso.json").read_text())["cells"]
    out = run / ("self_training_sources" if args.with_sources else "self_training")
    rows = {}
    for i, left in enumerate(names):
        model = run / f"without_{left}"
        if not (model / "config.json").is_file():
            continue
        teacher = model
        for rnd in range(1, args.rounds + 1):
            work = out / f"without_{left}" / ("" if rnd == 1 else f"round{rnd}")
            pseudo = work / "pseudo" / left  # named as the set, so per-set columns read as it
            info_f = work / "pseudo_labels.json"
            if not pseudo.is_dir():
                info = write_pseudo_set(teacher, args.data[i], px[i], pseudo, args.slices, args.low, args.high,
                                        args.min_area)
                info_f.write_text(json.dumps(info, indent=2) + "\n")
            keep = [j for j in range(len(names)) if j != i] if args.with_sources else []
            sets = [str(pseudo)] + [args.data[j] for j in keep]
            pxs = ["unknown" if q is None else str(q) for q in [px[i]] + [px[j] for j in keep]]
            adapted = work / "model"
            if not run_finished(adapted):
                # Every round fine-tunes the original model, on the latest model's pseudo-labels
                # (a student taught by a better teacher), so rounds differ only in their labels.
                finetune_main(["--model", str(model), "--data", *sets, "--out", str(adapted), "--pixel-size", *pxs,
                               "--ignore-value", str(IGNORE), "--augment", "em", "--augment-strength", "1",
                               "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch)])
            row = {"round": rnd, "pseudo_labels": json.loads(info_f.read_text())}
            for split in ("val", "test"):
                m = score(adapted, args.data[i], split, work / "scores" / f"{left}_{split}", px[i])
                if m is not None:
                    row[split] = {k: m[k] for k in ("f1", "iou", "precision", "recall", "instance_f1_iou50")}
                    row[split + "_zero_shot"] = base[left][left][split]["f1"]
            row["held_out"] = row.get("test", row.get("val"))
            row["held_out_zero_shot"] = row.get("test_zero_shot", row.get("val_zero_shot"))
            rows[left if rnd == 1 else f"{left} (round {rnd})"] = row
            teacher = adapted
    (out / "self_training.json").write_text(json.dumps({"recipe": vars(args), "rows": rows}, indent=2) + "\n")
    lines = ["| left out | pseudo-labelled slices (mito / background / ignored) | val F1 zero shot -> self-trained "
             "| held-out F1 zero shot -> self-trained | precision / recall (val) |", "|---|---|---|---|---|"]
    for left, r in rows.items():
        pl, v = r["pseudo_labels"], r.get("val", {})
        lines.append(f"| {left} | {pl['slices']} ({pl['mitochondrion']:.2f} / {pl['background']:.2f} / "
                     f"{pl['ignored']:.2f}) | {r.get('val_zero_shot', float('nan')):.3f} -> {v.get('f1', float('nan')):.3f} "
                     f"| {r['held_out_zero_shot']:.3f} -> {r['held_out']['f1']:.3f} "
                     f"| {v.get('precision', float('nan')):.3f} / {v.get('recall', float('nan')):.3f} |")
    for rnd in range(1, args.rounds + 1):
        got = [r for r in rows.values() if r["round"] == rnd]
        if got:
            mean = lambda k: np.mean([r[k] if isinstance(r[k], float) else r[k]["f1"] for r in got])
            lines.append(f"| **mean{'' if rnd == 1 else f' (round {rnd})'}** | | {mean('val_zero_shot'):.3f} -> "
                         f"{mean('val'):.3f} | {mean('held_out_zero_shot'):.3f} -> {mean('held_out'):.3f} | |")
    (out / "self_training.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
