"""How unlike the training data is an image? An out-of-distribution score from the network's own features.

Each image is cut (at the model's pixel size, after the model's
normalisation) into up to `MAX_TILES` evenly spread tiles of `TILE` px; each
tile becomes one feature vector: the spatial mean and standard deviation of
each channel of the first three encoder levels (`OOD_LAYERS`, `OOD_STATS`;
which layers and statistics are stored in ood.npz). `FeatureDistribution` models the training tiles'
vectors by their mean and principal components (a Mahalanobis distance in
the leading components, plus the normalised residual off them). An image's
score is the median over its tiles; `threshold` is a high quantile of the
scores of held-out in-distribution images (the model's val slices), above
which `analyze` warns. The NumPy part (`FeatureDistribution`) needs no model.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

OOD_LAYER = "bottleneck_conv2"  # what an ood.npz without `layers` modelled (older models)
# What `calibrate` models by default: the per-channel mean and spread of the first three encoder
# levels' activations, statistics of texture and contrast ("style"). Chosen on the
# leave-one-set-out models (benchmarks/trust.py, trust_features.py): left-out sets against the
# training sets' held-out slices, AUROC 1.00 / 1.00 / 1.00 against 1.00 / 0.69 / 0.33 for the
# bottleneck's mean, which the network has made invariant to exactly what changes between
# microscopes.
OOD_LAYERS = ("enc1_relu2", "enc2_relu2", "enc3_relu2")
OOD_STATS = "mean_std"
TILE = 256
MIN_TILES = 3  # feature vectors (tiles) the distribution is fitted on, at least
MAX_TILES = 16
OOD_FILE = "ood.npz"  # beside model.keras


def tile_origins(shape: tuple[int, int], tile: int = TILE, k: int = MAX_TILES) -> list[tuple[int, int]]:
    """Up to k (y, x) origins of tile x tile windows spread evenly over an image of (H, W) (deterministic)."""
    h, w = shape
    ny, nx = max(1, -(-h // tile)), max(1, -(-w // tile))
    ys = np.linspace(0, max(h - tile, 0), ny).round().astype(int)
    xs = np.linspace(0, max(w - tile, 0), nx).round().astype(int)
    grid = [(int(y), int(x)) for y in ys for x in xs]
    if len(grid) > k:
        grid = [grid[i] for i in np.linspace(0, len(grid) - 1, k).round().astype(int)]
    return grid


def available_layers(model, layers: tuple[str, ...] = OOD_LAYERS) -> tuple[str, ...]:
    """Those of `layers` the model has (a shallow model lacks deep encoder levels); the
    bottleneck if none."""
    names = {layer.name for layer in model.layers}
    return tuple(n for n in layers if n in names) or (OOD_LAYER,)


def feature_extractor(model, layers: tuple[str, ...] = (OOD_LAYER,), stats: str = "mean"):
    """A function (n, t, t, 1) normalised tiles -> (n, D) features: per channel of each of `layers`,
    the spatial mean (stats "mean") or the spatial mean and standard deviation ("mean_std")."""
    import keras

    if stats not in ("mean", "mean_std"):
        raise ValueError(f"unknown OOD feature statistics {stats!r} (mean or mean_std)")
    sub = keras.Model(model.inputs, [model.get_layer(name).output for name in layers])

    def fn(x: np.ndarray) -> np.ndarray:
        outs = sub([x], training=False)  # a list in: the functional input structure
        outs = outs if isinstance(outs, (list, tuple)) else [outs]
        parts = []
        for a in outs:
            a = np.asarray(a, np.float64)
            parts.append(a.mean(axis=(1, 2)))
            if stats == "mean_std":
                parts.append(a.std(axis=(1, 2)))
        return np.concatenate(parts, axis=1)

    return fn


def image_features(predictor, image: np.ndarray, pixel_size_nm: float | None = None, rescale: bool = True,
                   tile: int = TILE, k: int = MAX_TILES, layers: tuple[str, ...] = (OOD_LAYER,),
                   stats: str = "mean", zoom: float = 1.0) -> np.ndarray:
    """(n_tiles, D) features (`feature_extractor`) of one raw slice (H, W), at the model's pixel size
    (times `zoom`, as `Predictor.predict_slice` takes it)."""
    from .sampling import normalize_as, resample_image

    cache = predictor.__dict__.setdefault("_ood_features", {})
    key = (tuple(layers), stats)
    if key not in cache:
        # (an exported SavedModel serves them through its `ood_features` signature)
        cache[key] = predictor.ood_feature_function(tuple(layers), stats)
    x = normalize_as(image, predictor.config.normalization)
    x = resample_image(x, predictor.scale_factor(pixel_size_nm, rescale) * zoom)
    if min(x.shape) < tile:  # small images: mirror-pad up to one tile (never downscale)
        x = np.pad(x, [(0, max(0, tile - x.shape[0])), (0, max(0, tile - x.shape[1]))], mode="symmetric")
    tiles = np.stack([x[y:y + tile, x0:x0 + tile] for y, x0 in tile_origins(x.shape, tile, k)])
    return cache[key](tiles[..., None].astype(np.float32))


def model_distribution(predictor) -> "FeatureDistribution | None":
    """The model's FeatureDistribution (ood.npz beside it, or in an export's assets), loaded once; None
    without one."""
    cache = predictor.__dict__.setdefault("_ood_model", {})
    if "dist" not in cache:
        path = predictor.ood_file()  # beside model.keras, or in an export's assets
        cache["dist"] = FeatureDistribution.load(path) if path is not None else None
    return cache["dist"]


@dataclass
class FeatureDistribution:
    """Mean, leading principal axes and their variances of in-distribution tile features."""

    mean: np.ndarray
    components: np.ndarray  # (k, D), orthonormal rows
    variances: np.ndarray  # (k,)
    residual_variance: float  # mean variance per dimension off the k axes
    threshold: float = float("inf")  # image scores above this are out of distribution
    tile: int = TILE  # tile size (model px) the features were computed on
    layers: tuple[str, ...] = (OOD_LAYER,)  # the layers and statistics of `image_features`
    stats: str = "mean"

    @classmethod
    def fit(cls, features: np.ndarray, k: int = 16, tile: int = TILE, layers: tuple[str, ...] = (OOD_LAYER,),
            stats: str = "mean") -> "FeatureDistribution":
        """Fit on (N, D) training tile features computed on `tile`-px tiles from `layers` / `stats`."""
        x = np.asarray(features, np.float64)
        if len(x) < MIN_TILES:
            raise ValueError(f"need at least {MIN_TILES} feature vectors to fit the feature distribution")
        if not np.isfinite(x).all():
            raise ValueError(f"{int((~np.isfinite(x).all(1)).sum())} of {len(x)} feature vectors hold NaN or inf: "
                             "cannot fit the feature distribution")
        mu = x.mean(0)
        u, s, vt = np.linalg.svd(x - mu, full_matrices=False)
        var = s ** 2 / (len(x) - 1)
        k = int(min(k, len(var) - 1, x.shape[1] - 1)) or 1
        rest = var[k:]
        resid = float(rest.sum() / max(x.shape[1] - k, 1)) if rest.size else 1e-12
        floor = 1e-6 * max(float(var[0]), 1e-12)  # no division by a zero-variance axis
        return cls(mu, vt[:k], np.maximum(var[:k], floor), max(resid, floor), tile=tile, layers=tuple(layers),
                   stats=stats)

    def tile_scores(self, features: np.ndarray) -> np.ndarray:
        """Per tile: sqrt of the mean squared whitened distance (about 1 for in-distribution tiles)."""
        d = np.asarray(features, np.float64) - self.mean
        proj = d @ self.components.T
        inside = np.sum(proj ** 2 / self.variances, axis=1)
        residual = np.sum(d ** 2, axis=1) - np.sum(proj ** 2, axis=1)
        dims = len(self.mean)
        return np.sqrt((inside + np.maximum(residual, 0) / self.residual_variance) / dims)

    def image_score(self, predictor, image: np.ndarray, pixel_size_nm: float | None = None,
                    rescale: bool = True) -> float:
        """`score` of one raw slice (H, W), its features computed as this distribution's were."""
        return self.score(image_features(predictor, image, pixel_size_nm, rescale, tile=self.tile,
                                         layers=self.layers, stats=self.stats))

    def score(self, features: np.ndarray) -> float:
        """One image's score: the median of its tiles' scores."""
        return float(np.median(self.tile_scores(features)))

    def calibrate(self, image_scores: list[float], quantile: float = 0.99) -> "FeatureDistribution":
        """Set the warning threshold at `quantile` of in-distribution images' scores (held out from the fit),
        linearly interpolated between the two nearest scores (`numpy.quantile`'s default).

        ValueError on no scores or a NaN or inf among them (a NaN threshold would never warn)."""
        scores = np.asarray(image_scores, np.float64)
        if scores.size == 0 or not np.isfinite(scores).all():
            raise ValueError(f"the OOD warning threshold needs finite in-distribution image scores; got {scores.size}"
                             f" ({int((~np.isfinite(scores)).sum())} NaN or inf)")
        self.threshold = float(np.quantile(scores, quantile))
        return self

    def save(self, path: str | Path) -> None:
        import io

        from .runlock import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, mean=self.mean, components=self.components, variances=self.variances,
                 residual_variance=self.residual_variance, threshold=self.threshold, tile=self.tile,
                 layers=np.array(self.layers), stats=self.stats)
        atomic_write_bytes(Path(path), buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "FeatureDistribution":
        """What `save` wrote. FileNotFoundError without the file; one ValueError naming it when it
        is not such an archive or a stored value is missing or damaged."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: out-of-distribution model not found")
        redo = "run calibrate again or remove it"
        try:
            with np.load(path) as z:
                dist = cls(np.asarray(z["mean"], np.float64), np.asarray(z["components"], np.float64),
                           np.asarray(z["variances"], np.float64), float(z["residual_variance"]),
                           float(z["threshold"]), int(z["tile"]) if "tile" in z else TILE,
                           tuple(str(n) for n in z["layers"]) if "layers" in z else (OOD_LAYER,),
                           str(z["stats"]) if "stats" in z else "mean")
        except Exception as err:  # np.load's and zipfile's own errors name neither the file nor its role
            raise ValueError(f"{path}: cannot read this out-of-distribution model ({type(err).__name__}: "
                             f"{' '.join(str(err).split())}); {redo}") from None
        d, k = dist.mean.shape, dist.variances.shape
        if len(d) != 1 or len(k) != 1 or dist.components.shape != k + d:
            raise ValueError(f"{path}: out-of-distribution model with inconsistent shapes: mean {d}, components "
                             f"{dist.components.shape}, variances {k}; {redo}")
        if not (np.isfinite(dist.mean).all() and np.isfinite(dist.components).all()
                and (dist.variances > 0).all() and np.isfinite(dist.variances).all()
                and 0 < dist.residual_variance < np.inf and not np.isnan(dist.threshold)):
            raise ValueError(f"{path}: out-of-distribution model holds NaN, inf or non-positive variances; {redo}")
        return dist
