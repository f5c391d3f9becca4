"""Markdown table of `metrics.json` files written by `python -m xmdl_tf.evaluate` (for the model card).

    python benchmarks/report.py models/xmdl_ref/metrics_*.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import markdown  # noqa: E402

KEYS = ("f1", "iou", "precision", "recall", "accuracy", "instance_f1_iou50", "mean_abs_count_error")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json files from xmdl_tf.evaluate")
    args = parser.parse_args(argv)
    rows = []
    for p in args.metrics:
        try:
            m = json.loads(p.read_text())
            rows.append({"set": Path(m["data"]).name, "split": m["split"], "TTA": m.get("tta", False),
                         "images": m["n_images"], **{k: round(m[k], 4) for k in KEYS}})
        except (OSError, ValueError, KeyError, TypeError) as err:
            parser.exit(2, f"error: {p}: not a metrics.json of xmdl_tf.evaluate ({type(err).__name__}: {err})\n")
    print(markdown(rows), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
