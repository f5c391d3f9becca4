"""Learning curve for adapting to a new microscope: zero-shot, then 1, 2 and 4 annotated slices.

    python benchmarks/adaptation.py --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem \
        --out runs/adaptation --reference xmdl_ref

For each set T: train on the other set only (`xmdl_tf.train`), score on T's
test split (zero-shot); then fine-tune that model (`xmdl_tf.finetune`,
defaults: lr 1e-4, heavy augmentation) on the first 1, 2 and 4 training
slices of T and score again. The reference model trained on everything is
shown beside it when `--reference` is given. Writes `adaptation.json`,
`adaptation.md` and `adaptation.png` (test F1 against the number of slices).
Interrupted runs resume; finished steps are reused.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import markdown, table  # noqa: E402


def scored(model: Path, data: str, out: Path) -> dict:
    from xmdl_tf.evaluate import evaluate

    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text())
    return evaluate(model, data, "auto", out)


def main(argv=None) -> int:
    from xmdl_tf.finetune import main as finetune_main
    from xmdl_tf.train import main as train_main

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs=2, required=True, help="the two data sets")
    p.add_argument("--out", required=True)
    p.add_argument("--reference", default=None, help="model trained on both sets, for comparison")
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--steps-per-epoch", type=int, default=40)
    p.add_argument("--slices", nargs="+", type=int, default=[1, 2, 4])
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for i, target in enumerate(args.data):
        source = args.data[1 - i]
        tname = Path(target).name
        base = out / f"from_{Path(source).name}"
        train_main(["--data", source, "--out", str(base), "--base-filters", str(args.base_filters),
                    "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch)])
        curve = [(0, scored(base, target, base / f"test_{tname}"))]
        for n in args.slices:
            run = out / f"{tname}_{n}slices"
            finetune_main(["--model", str(base), "--data", target, "--out", str(run), "--max-slices", str(n),
                           "--epochs", str(args.finetune_epochs), "--steps-per-epoch", str(args.steps_per_epoch)])
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
        line, = ax.plot(*zip(*pts), "o-", label=f"{target}: other set + n slices")
        ref = [r["f1"] for r in rows if r["target"] == target and not isinstance(r["slices"], int)]
        if ref:
            ax.axhline(ref[0], color=line.get_color(), ls="--", lw=1, label=f"{target}: trained on everything")
    ax.set_xlabel("annotated slices of the target set (0 = zero-shot)")
    ax.set_ylabel("test F1 (pooled)")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
