"""The ablation the paper lacks: plain U-Net vs residual vs attention vs both, same data and budget.

    python benchmarks/ablation.py --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem \
        --out runs/ablation --epochs 20 --steps-per-epoch 56

Each variant is trained with `xmdl_tf.train` (same seed, tiles, steps, epochs,
EarlyStopping patience 5) and scored with `xmdl_tf.evaluate` on each set's
test split. Interrupted runs resume; finished ones are reused. Prints and
writes `ablation.json` and `ablation.md`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import markdown, table  # noqa: E402

VARIANT_ORDER = ("unet", "residual", "attention", "residual_attention")


def run_variant(variant: str, data: list[str], out: Path, args) -> list[dict]:
    from xmdl_tf.config import Config
    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.train import build_parser, config_from_args, train

    run = out / variant
    targs = build_parser().parse_args(["--data", *data, "--out", str(run), "--variant", variant,
                                       "--base-filters", str(args.base_filters), "--epochs", str(args.epochs),
                                       "--steps-per-epoch", str(args.steps_per_epoch), "--seed", str(args.seed)])
    train(data, run, config_from_args(targs))
    info = Config.load(run / "config.json").info
    rows = []
    for d in data:
        ev = run / f"test_{Path(d).name}"
        m = (json.loads((ev / "metrics.json").read_text()) if (ev / "metrics.json").is_file()
             else evaluate(run, d, "auto", ev))
        rows.append({"variant": variant, "set": Path(d).name, "params": info.get("parameters"),
                     "train min": round(info.get("train_seconds", 0) / 60, 1), "epochs": info.get("epochs_run"),
                     **{k: round(m[k], 4) for k in ("f1", "iou", "precision", "recall", "instance_f1_iou50")}})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--base-filters", type=int, default=8)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=56)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="+", default=list(VARIANT_ORDER), choices=VARIANT_ORDER)
    args = p.parse_args(argv)
    out = Path(args.out)
    rows = []
    for v in args.variants:
        rows += run_variant(v, args.data, out, args)
        print(table(rows, list(rows[0])), flush=True)
    (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "ablation.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
