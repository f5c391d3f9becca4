"""Is the validation loss stable enough for EarlyStopping? Slice-bootstrap error of a run's val_loss.

    python benchmarks/val_noise.py runs/ref [--boot 2000] [--data-root ../shared/data]

Recomputes the run's monitored validation loss (mean over sets of each set's
Dice loss pooled over its val split, as `train` logs it) with the run's best
model, on the sets, splits and pixel sizes its config.json records, keeping
each slice's counts. Resampling the slices of each set with replacement gives
the standard error of that loss: how much it would move on another draw of
validation slices of the same kind. Compared with the run's epoch-to-epoch
changes in history.csv, it says whether patience stops on noise or on a trend.
`--data-root DIR` scores the full val splits of the sets of the same names
under DIR instead (a run trained on another machine, or on a subset of a
set's slices, compared with others on the same slices).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="run folder (model.keras, config.json, history.csv)")
    p.add_argument("--boot", type=int, default=2000)
    p.add_argument("--data-root", default=None, help="folder holding the run's sets by name (default: the recorded paths)")
    args = p.parse_args(argv)
    import pandas as pd

    from xmdl_tf.config import Config
    from xmdl_tf.io import find_pairs
    from xmdl_tf.predict import load_keras_with_config
    from xmdl_tf.sampling import SliceRegion, holdout_split
    from xmdl_tf.train import region_counts, validation_scores

    run = Path(args.run)
    model, _, _ = load_keras_with_config(run)
    cfg = Config.load(run / "config.json")
    per_set = {}
    for d in cfg.info["data"]:
        path = Path(args.data_root) / d["name"] if args.data_root else d["path"]
        if d["validation"].startswith("split"):
            regions = [SliceRegion(q) for q in find_pairs(path, "val")]
        else:
            regions = holdout_split(find_pairs(path, "train"))[1]
        per_set[d["name"]] = np.stack([region_counts(model, r, d["resample_factor"], cfg.data, cfg.train.batch_size,
                                                     cfg.normalization)
                                       for r in regions])
    scores = validation_scores({k: v.sum(0) for k, v in per_set.items()}, cfg.train.loss)
    full = scores["val_loss"]
    rng = np.random.default_rng(0)
    boot = [validation_scores({k: v[rng.integers(len(v), size=len(v))].sum(0) for k, v in per_set.items()},
                              cfg.train.loss)["val_loss"] for _ in range(args.boot)]
    se = float(np.std(boot))
    h = pd.read_csv(run / "history.csv") if (run / "history.csv").is_file() else pd.DataFrame({"val_loss": []})
    steps = np.abs(np.diff(h["val_loss"].to_numpy()))
    print(f"{run}: val_loss {full:.4f} (slices: {', '.join(f'{k} {len(v)}' for k, v in per_set.items())})")
    print(f"  val_f1 {scores['val_f1']:.4f} (" + ", ".join(f"{k} {scores.get(f'val_{k}_f1', scores['val_f1']):.4f}"
                                                     for k in per_set) + ")")
    print(f"  slice-bootstrap standard error: {se:.4f}")
    if len(steps):
        print(f"  epoch-to-epoch |change| in history: median {np.median(steps):.4f}, "
              f"last 5: {', '.join(f'{x:.4f}' for x in steps[-5:])}")
        best = int(h["val_loss"].idxmin())
        print(f"  best epoch {best + 1} of {len(h)}; improvement over the epoch before it: "
              f"{(h['val_loss'][best - 1] - h['val_loss'][best]) if best else float('nan'):.4f}")
    (run / "val_noise.json").write_text(json.dumps({"val_loss": full, "bootstrap_se": se, "scores": scores,
                                                    "data_root": args.data_root}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
