"""Learning curve for adapting to a new microscope: zero-shot, then 1, 2 and 4 annotated slices.

    python benchmarks/adaptation.py --loso runs/loso/em_seed2 --data ../shared/data/cdeep3m_sbem_mouse \
        ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5 \
        --out runs/adaptation_loso
    python benchmarks/adaptation.py --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem \
        --out runs/adaptation --reference xmdl_ref

With `--loso RUN` (a `benchmarks/loso.py` folder): for each set T, the model
trained without it (RUN/without_T) is scored on T's held-out split (test, or
val where T has none) as it is (zero shot); then it is fine-tuned on the first
1, 2 and 4 training slices of T *alone*, as a user with a few annotated slices
and nothing else has them (a folder holding only those slices, so validation is
carved from held-back rows of them and no other label of T is read), with
`xmdl_tf.finetune`'s defaults (lr 1e-4, heavy augmentation, 10 epochs of at
least 40 steps, the best kept), or `--finetune-epochs` x `--steps-per-epoch`
steps without an early stop, and `--finetune-args` for any other option; and
scored again. Every row is scored on the held-out split and, where that is not
the val split, on val (what choices are made on), with the model's own
inference defaults but the zoom search off (a fine-tuned model has no OOD model
for it to read). Beside them, from RUN/loso.json, the scores on T of the run's
other models, which trained on all of T's training slices (the level the curve
climbs towards). `--combine` averages the tables of several draws.

Without `--loso` (two sets, the first measurement): train on the other set only
(`xmdl_tf.train`), then fine-tune with `--max-slices` (validated on T's val
split); `--reference` adds a model trained on everything. Writes
`adaptation.json`, `adaptation.md` and `adaptation.png` (held-out F1 against
the number of slices). Interrupted runs resume; finished steps are reused.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import markdown, table  # noqa: E402


def scored(model: Path, data: str, out: Path, pixel_size_nm: float | None = None, split: str = "auto",
           **overrides) -> dict:
    """evaluate()'s metrics of `model` on a split (cached in OUT/metrics.json); `overrides`: InferenceConfig fields."""
    from xmdl_tf.evaluate import evaluate

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    return evaluate(model, data, split, out, pixel_size_nm=pixel_size_nm, **overrides)


def few_slices(data: str, n: int, out: Path) -> Path:
    """A data folder OUT holding only the first `n` training pairs of `data` (links): what a user
    with n annotated slices has (no val split: `finetune` holds back rows of them instead)."""
    from xmdl_tf.io import find_pairs

    for q in find_pairs(data, "train")[:n]:
        for src, sub in ((q.image, "x"), (q.label, "y")):
            dst = out / "train" / sub / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            if not dst.exists():
                dst.symlink_to(src.resolve())
    return out


def row(target: str, slices, m: dict, val: dict | None = None) -> dict:
    """One table row: held-out scores `m`, and the val F1 that choices are made on (`val`, where the
    set's held-out split is not its val split)."""
    r = {"target": target, "slices": slices, **{k: round(m[k], 4) for k in ("f1", "iou", "precision", "recall")},
         "instance_f1": round(m.get("instance_f1_iou50", float("nan")), 4)}
    return {**r, "val_f1": round((val or m)["f1"], 4)}


def held_out_and_val(model: Path, target: str, folder: Path, pixel_size_nm: float | None,
                     held_out: str) -> tuple[dict, dict | None]:
    """`model`'s scores on `target`'s held-out split (`held_out`, from `evaluate.held_out_split`), and on
    its val split where that is another one (cached under FOLDER/held_out_<set> and FOLDER/val_<set>)."""
    # One setting for every row: a fine-tuned model carries no OOD model for the zoom search to read,
    # so it is off for the zero-shot model too (the models' own other defaults apply).
    name = Path(target).name
    held = scored(model, target, folder / f"held_out_{name}", pixel_size_nm, zoom_search="off")
    if held_out == "val":
        return held, None
    return held, scored(model, target, folder / f"val_{name}", pixel_size_nm, "val", zoom_search="off")


def loso_curve(args, px: list) -> list[dict]:
    """Zero shot, then fine-tuned on n slices of the left-out set, for each RUN/without_<set>."""
    from xmdl_tf.evaluate import held_out_split
    from xmdl_tf.finetune import main as finetune_main

    out, rows = Path(args.out), []
    for target, size in zip(args.data, px):
        tname = Path(target).name
        base = Path(args.loso) / f"without_{tname}"
        split = held_out_split(target)
        label = tname if split == "test" else f"{tname} ({split})"
        rows.append(row(label, 0, *held_out_and_val(base, target, out / f"{tname}_0slices", size, split)))
        for n in args.slices:
            run = out / f"{tname}_{n}slices"
            extra = ["--pixel-size", str(size)] if size else []
            if args.finetune_epochs:
                extra += ["--epochs", str(args.finetune_epochs), "--patience", str(args.finetune_epochs)]
            if args.steps_per_epoch:
                extra += ["--steps-per-epoch", str(args.steps_per_epoch)]
            extra += shlex.split(args.finetune_args)
            if finetune_main(["--model", str(base), "--data", str(few_slices(target, n, out / "data" / f"{tname}_{n}")),
                              "--out", str(run), *extra]):
                raise SystemExit(f"{run}: fine-tuning failed (above); nothing scored")
            rows.append(row(label, n, *held_out_and_val(run, target, run, size, split)))
        seen = seen_reference(Path(args.loso), tname)
        if seen:
            held, val = ({k: sum(m[part][k] for m in seen) / len(seen) for k in seen[0][part]} for part in (0, 1))
            rows.append(row(label, f"all (mean of the {len(seen)} models that trained on it)", held, val))
        print(table(rows, list(rows[0])), flush=True)
    return rows


def seen_reference(loso: Path, target: str) -> list[tuple[dict, dict]]:
    """(held-out, val) scores on `target` of the run's other models, which trained on all its slices
    (from loso.json; dicts of f1, iou, precision, recall, instance_f1_iou50), [] if not recorded."""
    record = loso / "loso.json"
    cells = json.loads(record.read_text()).get("cells", {}) if record.is_file() else {}
    keys = ("f1", "iou", "precision", "recall", "instance_f1_iou50")
    out = []
    for left, scored_on in cells.items():
        parts = [scored_on.get(target, {}).get(split) for split in ("held_out", "val")]
        if left != target and all(m and all(k in m for k in keys) for m in parts):
            out.append(tuple({k: m[k] for k in keys} for m in parts))
    return out


def main(argv=None) -> int:
    from xmdl_tf.finetune import main as finetune_main
    from xmdl_tf.train import main as train_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", help="the data sets (two without --loso)")
    p.add_argument("--loso", help="benchmarks/loso.py folder: adapt its models to the set each left out")
    p.add_argument("--pixel-size", nargs="+", default=None, help="with --loso: nm per set ('unknown' allowed)")
    p.add_argument("--out")
    p.add_argument("--combine", nargs="+", metavar="JSON",
                   help="only print the mean over earlier --loso runs' adaptation.json (e.g. three draws)")
    p.add_argument("--reference", default=None, help="model trained on both sets, for comparison")
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="fine-tuning epochs (no early stop with --loso); default: finetune's own (--loso), 10")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="steps per epoch; default: finetune's own (--loso), 40")
    p.add_argument("--slices", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--finetune-args", default="", metavar="ARGS",
                   help="with --loso: more finetune options as one string, e.g. its defaults before 2026-12-07: "
                        "'--epochs 50 --patience 5 --min-steps-per-epoch 1'")
    args = p.parse_args(argv)
    if args.combine:
        try:
            runs = [json.loads(Path(f).read_text()) for f in args.combine]
        except (OSError, ValueError) as err:
            p.error(str(err))
        print(combined(runs))
        return 0
    if not args.data or not args.out:
        p.error("give --data and --out (or --combine JSON...)")
    out = Path(args.out)
    if args.loso:
        from _util import pixel_sizes

        px = pixel_sizes(p, args)
        missing = [m for d in args.data if not (m := Path(args.loso) / f"without_{Path(d).name}" / "model.keras").is_file()]
        if missing:
            p.error(f"{missing[0]} is missing (a benchmarks/loso.py folder holds one model per left-out set)")
        rows = loso_curve(args, px)
        return finish(rows, out)
    if len(args.data) != 2:
        p.error("without --loso, give exactly two data sets")
    steps, ft_epochs = args.steps_per_epoch or 40, args.finetune_epochs or 10  # the first measurement's budget
    rows = []
    for i, target in enumerate(args.data):
        source = args.data[1 - i]
        tname = Path(target).name
        base = out / f"from_{Path(source).name}"
        train_main(["--data", source, "--out", str(base), "--base-filters", str(args.base_filters),
                    "--epochs", str(args.epochs), "--steps-per-epoch", str(steps)])
        curve = [(0, scored(base, target, base / f"test_{tname}"))]
        for n in args.slices:
            run = out / f"{tname}_{n}slices"
            finetune_main(["--model", str(base), "--data", target, "--out", str(run), "--max-slices", str(n),
                           "--epochs", str(ft_epochs), "--steps-per-epoch", str(steps)])
            curve.append((n, scored(run, target, run / f"test_{tname}")))
        for n, m in curve:
            rows.append({"target": tname, "slices": n, "f1": round(m["f1"], 4), "iou": round(m["iou"], 4),
                         "precision": round(m["precision"], 4), "recall": round(m["recall"], 4)})
        if args.reference:
            m = scored(Path(args.reference), target, out / f"reference_test_{tname}")
            rows.append({"target": tname, "slices": "all (reference)", "f1": round(m["f1"], 4),
                         "iou": round(m["iou"], 4), "precision": round(m["precision"], 4),
                         "recall": round(m["recall"], 4)})
        print(table(rows, list(rows[0])), flush=True)
    return finish(rows, out)


def combined(runs: list[list[dict]]) -> str:
    """Markdown: per (target, slices), the mean and range over `runs` (each an adaptation.json's rows)
    of the held-out F1, its instance F1 and the val F1 (the reference rows of all draws as one, "all")."""
    import numpy as np

    keyed = [{(r["target"], r["slices"] if isinstance(r["slices"], int) else "all"): r for r in rows} for rows in runs]
    md = [f"| target | annotated slices | held-out F1, mean of {len(runs)} (range) | instance F1 | val F1 |",
          "|---|---|---|---|---|"]
    for key in keyed[0]:
        got = [k[key] for k in keyed if key in k]
        f1, inst, val = (np.array([r.get(c, np.nan) for r in got], float) for c in ("f1", "instance_f1", "val_f1"))
        md.append(f"| {key[0]} | {key[1]} | {f1.mean():.3f} ({f1.min():.3f}-{f1.max():.3f}) | {inst.mean():.3f} | "
                  + ("-" if np.isnan(val).any() else f"{val.mean():.3f}") + " |"
                  + ("" if len(got) == len(runs) else f" ({len(got)} runs)"))
    return "\n".join(md)


def finish(rows: list[dict], out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    (out / "adaptation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "adaptation.md").write_text(markdown(rows))
    plot(rows, out / "adaptation.png")
    print(markdown(rows))
    return 0


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for k, target in enumerate(dict.fromkeys(r["target"] for r in rows)):
        pts = [(r["slices"], r["f1"]) for r in rows if r["target"] == target and isinstance(r["slices"], int)]
        line, = ax.plot(*zip(*pts), "o-", label=f"{target}: trained without it, + n slices")
        ref = [r["f1"] for r in rows if r["target"] == target and not isinstance(r["slices"], int)]
        if ref:
            ax.axhline(ref[0], color=line.get_color(), ls="--", lw=1, label=f"{target}: trained with all its slices")
    ax.set_xlabel("annotated slices of the target set (0 = zero-shot)")
    ax.set_ylabel("held-out F1 (pooled)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
