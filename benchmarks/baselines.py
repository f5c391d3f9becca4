"""Classical baselines users reach for instead of a network, scored exactly like the U-Net.

    python benchmarks/baselines.py --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem --out baselines/

1. Otsu: Gaussian smoothing (sigma 2 px), Otsu threshold, polarity (dark or
   bright mitochondria) chosen on the training slices, then morphological
   opening (radius 2), hole filling and removal of objects under 200 px.
2. ilastik-style random forest: scikit-image multiscale features (intensity,
   edges, texture; sigma 1-16 px) of the normalised slice, a scikit-learn
   random forest (100 trees, depth 16) trained on 30,000 pixels sampled from
   every training slice of all sets together (as the reference model is).

Both are evaluated with `xmdl_tf.evaluate.evaluate` on each set's test split
(pooled foreground precision, recall, F1, IoU; instance F1 at IoU 0.5; count
error). Needs `pip install scikit-learn` (the `baselines` extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import table  # noqa: E402


class _Classical:
    """Predictor-shaped wrapper so `evaluate` scores a baseline like a model."""

    size_divisor = 1
    tta = False

    def __init__(self, name: str, fn):
        self.path, self._fn = Path(name), fn

    def predict_slice(self, image, *args, **kwargs) -> np.ndarray:
        return self._fn(image).astype(np.float32)


def otsu_baseline(train_pairs) -> _Classical:
    from scipy import ndimage as ndi
    from skimage.filters import gaussian, threshold_otsu
    from skimage.morphology import disk, remove_small_objects

    from xmdl_tf.data import normalize_np
    from xmdl_tf.io import read_pair
    from xmdl_tf.metrics import add_counts, confusion, scores

    def segment(image, dark: bool) -> np.ndarray:
        x = gaussian(normalize_np(image), 2)
        fg = x < threshold_otsu(x) if dark else x > threshold_otsu(x)
        fg = ndi.binary_opening(fg, structure=disk(2))
        return remove_small_objects(ndi.binary_fill_holes(fg), max_size=199)  # drop objects under 200 px

    counts = {True: {}, False: {}}
    for pair in train_pairs:
        image, label = read_pair(pair)
        for dark in counts:
            counts[dark] = add_counts(counts[dark], confusion(segment(image, dark), label > 0))
    dark = scores(counts[True])["f1"] >= scores(counts[False])["f1"]
    return _Classical(f"otsu ({'dark' if dark else 'bright'} mitochondria)", lambda im: segment(im, dark))


def forest_baseline(train_pairs, per_slice: int = 30_000, seed: int = 0) -> _Classical:
    from skimage.feature import multiscale_basic_features
    from sklearn.ensemble import RandomForestClassifier

    from xmdl_tf.data import normalize_np
    from xmdl_tf.io import read_pair

    def features(image) -> np.ndarray:
        return multiscale_basic_features(normalize_np(image), intensity=True, edges=True, texture=True,
                                         sigma_min=1, sigma_max=16, workers=2)

    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for pair in train_pairs:
        image, label = read_pair(pair)
        feats = features(image)
        idx = rng.choice(label.size, min(per_slice, label.size), replace=False)
        xs.append(feats.reshape(label.size, -1)[idx])
        ys.append((label.ravel() > 0)[idx])
    forest = RandomForestClassifier(n_estimators=100, max_depth=16, n_jobs=2, random_state=seed)
    forest.fit(np.concatenate(xs), np.concatenate(ys))

    def predict(image) -> np.ndarray:
        feats = features(image)
        return forest.predict_proba(feats.reshape(-1, feats.shape[-1]))[:, 1].reshape(image.shape)

    return _Classical("random forest (multiscale features)", predict)


def main(argv=None) -> int:
    from xmdl_tf.evaluate import evaluate
    from xmdl_tf.io import find_pairs

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--split", default="auto", help="test, or val for a set without a test split")
    args = p.parse_args(argv)
    train = [pair for d in args.data for pair in find_pairs(d, "train")]
    rows = []
    for name, build in (("otsu", otsu_baseline), ("random_forest", forest_baseline)):
        method = build(train)
        for d in args.data:
            out = Path(args.out) / name / Path(d).name
            r = evaluate(method, d, args.split, out, overwrite=True)
            rows.append({"method": str(method.path), "set": Path(d).name, **{k: r[k] for k in (
                "precision", "recall", "f1", "iou", "instance_f1_iou50", "mean_abs_count_error")}})
            print(table(rows, list(rows[0])).splitlines()[-1], flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "baselines.json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n" + table(rows, list(rows[0])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
