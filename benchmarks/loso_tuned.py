"""Leave-one-set-out with the recipe's tuning step: zero-shot scores with inference defaults
chosen on the model's own training sets.

    python benchmarks/loso_tuned.py runs/loso/em \
        --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem ../shared/data/lucchipp_fibsem_mouse \
        --pixel-size unknown 4.6 5 [--tta compare|on|off]

`loso.py` scores every model with `evaluate` defaults of an untuned model
(threshold 0.5, no test-time augmentation, no minimum size, no auto zoom). A
reference model is tuned before it ships (`python -m xmdl_tf.tune`: TTA,
threshold, minimum object size and the object widths auto zoom aims at, chosen
on validation data), so the zero-shot estimate of the whole recipe includes
that step, taken without the left-out set: for each `RUN/without_<S>`, its
model and config are copied to `RUN/tuned/without_<S>` (the run itself is left
as it is), tuned on the *other* sets' val splits (`tune --write`), and the left-out
set's val split and held-out split (test, or val where there is none) are
scored with those defaults (`evaluate`). Writes `RUN/tuned/loso_tuned.json` and
`.md`: per left-out set, the settings chosen and zero-shot F1 untuned (from
`RUN/loso.json`) and tuned. Re-running skips finished steps.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # loso.py's scoring, however this file is loaded
import _util  # noqa: E402  (shared benchmark helpers)


def tuned_copy(run: Path, dest: Path, data: list[str], pixel_sizes: list[float | None], tta: str) -> dict:
    """Copy `run`'s model to `dest` and tune it on `data` (val splits) unless done; the chosen settings."""
    from xmdl_tf.tune import main as tune_main

    done = dest / "tune.json"
    if not done.is_file():
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("model.keras", "config.json"):
            shutil.copy2(run / name, dest / name)
        px = ["unknown" if p is None else str(p) for p in pixel_sizes]
        # tune writes config.json atomically, then the table: tune.json marks a finished step.
        rc = tune_main(["--model", str(dest), "--data", *data, "--pixel-size", *px, "--tta", tta, "--write",
                        "--json", str(dest / "tune.tmp.json")])
        if rc != 0:
            raise SystemExit(f"{dest}: tune failed ({rc})")
        (dest / "tune.tmp.json").replace(done)
    best = json.loads(done.read_text())["best"]
    return {k: best[k] for k in ("tta", "threshold", "min_area_nm2", "object_width_px")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a leave-one-set-out folder of loso.py (RUN/without_<set>/, RUN/loso.json)")
    p.add_argument("--data", nargs="+", required=True, help="the data sets, as given to loso.py")
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed), as for loso.py")
    p.add_argument("--tta", choices=("compare", "on", "off"), default="compare",
                   help="test-time augmentation in the tuning: compared (the recipe's), or fixed")
    args = p.parse_args(argv)
    from loso import score

    run = Path(args.run)
    px = _util.pixel_sizes(p, args)
    names = [Path(d).resolve().name for d in args.data]
    untuned = json.loads((run / "loso.json").read_text())["cells"] if (run / "loso.json").is_file() else {}
    out = run / "tuned"
    rows = {}
    for i, left in enumerate(names):
        model = run / f"without_{left}"
        if not (model / "model.keras").is_file():
            print(f"{model}: no model.keras (train it with loso.py first); skipped", file=sys.stderr)
            continue
        keep = [j for j in range(len(names)) if j != i]
        dest = out / f"without_{left}"
        chosen = tuned_copy(model, dest, [args.data[j] for j in keep], [px[j] for j in keep], args.tta)
        cells = {}
        for split in ("val", "test"):
            m = score(dest, args.data[i], split, dest / "scores" / f"{left}_{split}", px[i])
            if m is not None:
                cells[split] = {k: m[k] for k in ("f1", "iou", "precision", "recall", "instance_f1_iou50")}
        cells["held_out"] = cells.get("test", cells.get("val"))
        before = untuned.get(left, {}).get(left, {})
        rows[left] = {"chosen": chosen, "tuned": cells,
                      "untuned": {k: before[k] for k in ("val", "held_out") if k in before}}
    if not rows:
        print(f"{run}: no leave-one-set-out models found", file=sys.stderr)
        return 1
    out.mkdir(parents=True, exist_ok=True)
    (out / "loso_tuned.json").write_text(json.dumps({"sets": names, "tta": args.tta, "rows": rows}, indent=2) + "\n")
    md = table(rows)
    (out / "loso_tuned.md").write_text(md)
    print(md)
    return 0


def table(rows: dict) -> str:
    """Markdown: per left-out set, the tuned settings and zero-shot F1 untuned -> tuned (val, held-out)."""

    def f(cells: dict, split: str, key: str = "f1") -> str:
        c = cells.get(split)
        return "-" if not c else f"{c[key]:.3f}"

    lines = ["| left out | chosen on the other sets' val: TTA, threshold, min area nm^2 | zero-shot val F1 untuned -> "
             "tuned | precision / recall tuned | held-out F1 untuned -> tuned |", "|---|---|---|---|---|"]
    means = {k: [] for k in ("uv", "tv", "uh", "th")}
    for left, r in rows.items():
        c, t, u = r["chosen"], r["tuned"], r["untuned"]
        lines.append(f"| {left} | {'on' if c['tta'] else 'off'}, {c['threshold']:g}, {c['min_area_nm2']:g} | "
                     f"{f(u, 'val')} -> **{f(t, 'val')}** | {f(t, 'val', 'precision')} / {f(t, 'val', 'recall')} | "
                     f"{f(u, 'held_out')} -> {f(t, 'held_out')} |")
        for key, cells, split in (("uv", u, "val"), ("tv", t, "val"), ("uh", u, "held_out"), ("th", t, "held_out")):
            if cells.get(split):
                means[key].append(cells[split]["f1"])
    m = {k: (sum(v) / len(v) if v else float("nan")) for k, v in means.items()}
    lines.append(f"\nmean zero-shot F1 over {len(rows)} sets: val {m['uv']:.3f} untuned -> {m['tv']:.3f} tuned; "
                 f"held-out {m['uh']:.3f} -> {m['th']:.3f}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
