"""Zoom and blur of the input, chosen without labels: can the OOD score pick them?

    python benchmarks/input_search.py runs/loso/em_seed2 runs/loso/em_seed3 runs/loso/em_seed4 \
        --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem \
        ../shared/data/lucchipp_fibsem_mouse --pixel-size unknown 4.6 5 --out runs/loso/input_search
    python benchmarks/input_search.py --analyse runs/loso/input_search/input_search.json

The leave-one-set-out models fail on an unseen microscope for size (SBEM) and
for sharpness (the crisp ssTEM set gains when blurred: "Where the zero-shot
errors come from" in the model card). For each draw (a `benchmarks/loso.py`
folder whose models carry an `ood.npz`, from `python -m xmdl_tf.calibrate`),
each left-out set's val and held-out slices (test, or val where a set has
none) are blurred (Gaussian, sigma in slice px: `BLURS`, 0, 1.5 and 3) and
zoomed (`ZOOMS`, x0.5 to x2), and for every (slice, blur, zoom) it records the
pixel counts against the label at threshold 0.5 (one pass, no TTA), the
slice's OOD score on that input (the model's own `ood.npz`: lower = more like
its training data) and how sure the model is of what it marks (the mean
probability of the marked pixels, on the slice's grid). The analysis scores
rules that pick each slice's input without labels (the lowest OOD score over
every input, or over the blurs at zoom 1; the surest zoom; the surest zoom
then the blur of lowest OOD score; the surest of every input) against the
slice as it is, fixed blurs, the best single input per cell and a per-slice
oracle. Writes OUT/input_search.json (every record) and .md.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _util  # noqa: E402  (first: sets the oneDNN default before TensorFlow loads)
from _util import f1_of as f1, pixel_counts  # noqa: E402

ZOOMS = (0.5, 0.71, 1.0, 1.41, 2.0)
BLURS = (0.0, 1.5, 3.0)


def records(predictor, image: np.ndarray, label: np.ndarray, pixel_size_nm: float | None,
            zooms=ZOOMS, blurs=BLURS) -> list[dict]:
    """One record per (blur, zoom) of one slice: counts at 0.5, OOD score, mean marked probability."""
    from xmdl_tf.ood import image_features, model_distribution
    from zero_shot_inference import blurred

    dist = model_distribution(predictor)
    out = []
    for b in blurs:
        im = blurred(image, b) if b else image
        for z in zooms:
            p = predictor.predict_slice(im, pixel_size_nm=pixel_size_nm, tta=False, zoom=z)
            m = p >= 0.5
            ood = dist.score(image_features(predictor, im, pixel_size_nm, tile=dist.tile, layers=dist.layers,
                                            stats=dist.stats, zoom=z))
            out.append({"blur": b, "zoom": z, "ood": ood,
                        "sure": float(p[m].mean()) if m.any() else 0.0,
                        "counts": pixel_counts(p, label, 0.5).tolist()})
    return out


def _surest(rec: list[dict], blur: float | None = None) -> dict:
    return max((r for r in rec if blur is None or r["blur"] == blur), key=lambda r: r["sure"])


def _least_ood(rec: list[dict], zoom: float | None = None) -> dict:
    return min((r for r in rec if zoom is None or r["zoom"] == zoom), key=lambda r: r["ood"])


def _at(rec: list[dict], blur: float, zoom: float) -> dict:
    return next(r for r in rec if r["blur"] == blur and r["zoom"] == zoom)


RULES = {
    "as it is": lambda rec: _at(rec, 0.0, 1.0),
    "lowest OOD, every input": _least_ood,
    "lowest OOD blur, zoom 1": lambda rec: _least_ood(rec, zoom=1.0),
    "surest zoom": lambda rec: _surest(rec, 0.0),
    "surest zoom, then lowest OOD blur": lambda rec: _least_ood(rec, zoom=_surest(rec, 0.0)["zoom"]),
    "surest, every input": _surest,
}


def analyse(data: dict) -> tuple[list[dict], list[str]]:
    """Pooled F1 per (draw, left-out set, split) for each rule, fixed blur, best input and oracle."""
    cells = defaultdict(list)
    for key, rec in data["records"].items():
        draw, left, split, _ = key.split("/")
        cells[(draw, left, split)].append(rec)
    blurs = sorted({r["blur"] for recs in cells.values() for r in recs[0]})
    rows = []
    for (draw, left, split), recs in sorted(cells.items()):
        row = {"draw": draw, "left out": left, "split": split}
        for name, rule in RULES.items():
            row[name] = f1(np.sum([rule(rec)["counts"] for rec in recs], 0))
        for b in blurs[1:]:
            row[f"blur {b:g}, zoom 1"] = f1(np.sum([_at(rec, b, 1.0)["counts"] for rec in recs], 0))
        fixed = {(r["blur"], r["zoom"]): f1(np.sum([rec[i]["counts"] for rec in recs], 0))
                 for i, r in enumerate(recs[0])}
        best = max(fixed, key=fixed.get)
        row["best single input"] = fixed[best]
        row["best input (blur, zoom)"] = f"{best[0]:g}, x{best[1]:g}"
        row["per-slice oracle"] = f1(np.sum([max(rec, key=lambda r: f1(r["counts"]))["counts"] for rec in recs], 0))
        rows.append(row)
    cols = [c for c in rows[0] if c not in ("draw", "left out", "split")]
    md = ["| draw | left out | split | " + " | ".join(cols) + " |", "|---|---|---|" + "---|" * len(cols)]
    md += [f"| {r['draw']} | {r['left out']} | {r['split']} | "
           + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.3f}" for c in cols) + " |" for r in rows]
    md.append("")
    for split in ("val", "held-out"):
        sel = [r for r in rows if r["split"] == split]
        if sel:
            md.append(f"mean over {len(sel)} zero-shot cells ({split}): " + ", ".join(
                f"{c} {np.mean([r[c] for r in sel]):.3f}" for c in cols if not isinstance(sel[0][c], str)))
    return rows, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("draws", nargs="*", help="benchmarks/loso.py folders whose models carry ood.npz")
    p.add_argument("--data", nargs="+")
    p.add_argument("--pixel-size", nargs="+", default=None, help="nm per set ('unknown' allowed)")
    p.add_argument("--out", help="folder for input_search.json and .md")
    p.add_argument("--analyse", metavar="JSON", help="only print the tables of an earlier run's input_search.json")
    args = p.parse_args(argv)
    if args.analyse:
        try:
            data = json.loads(Path(args.analyse).read_text())
        except (OSError, ValueError) as err:
            p.error(f"{args.analyse}: {err}")
        print("\n".join(analyse(data)[1]))
        return 0
    if not args.draws or not args.data or not args.out:
        p.error("give the draws, --data and --out (or --analyse JSON)")
    from xmdl_tf.evaluate import held_out_split
    from xmdl_tf.io import find_pairs, read_pair
    from xmdl_tf.ood import OOD_FILE
    from xmdl_tf.predict import load_model

    px = _util.pixel_sizes(p, args)
    names = [Path(d).resolve().name for d in args.data]
    for draw in args.draws:
        for name in names:
            run = Path(draw) / f"without_{name}"
            if not (run / "model.keras").is_file() or not (run / OOD_FILE).is_file():
                p.error(f"{run}: needs model.keras and {OOD_FILE} (python -m xmdl_tf.calibrate on its training sets)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = {"draws": [str(d) for d in args.draws], "records": {}}
    for draw in args.draws:
        for path, name, size in zip(args.data, names, px):
            pred = load_model(Path(draw) / f"without_{name}")
            held = held_out_split(path)
            for split in dict.fromkeys(("val", held)):
                # a set without a test split: its val slices are the held-out ones too
                tags = [t for t, s in (("val", "val"), ("held-out", held)) if s == split]
                for q in find_pairs(path, split):
                    rec = records(pred, *read_pair(q), size)
                    for tag in tags:
                        data["records"][f"{Path(draw).name}/{name}/{tag}/{q.image.name}"] = rec
            print(f"{draw}: {name} done", flush=True)
    rows, md = analyse(data)
    _util.write_results(out, "input_search", data, md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
