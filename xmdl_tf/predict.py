"""Whole-slice inference for trained models (`.keras` files and model folders).

`load_model` returns a `Predictor` that knows its normalisation, size divisor
and Grad-CAM layers from the `config.json` beside the model; `predict_slice`
normalises a whole slice once and stitches overlapping tiles (see `tiling`).
"""
from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .config import Config, InferenceConfig, ModelConfig
from .tiling import auto_batch_size, max_tile, plan_tiles, predict_tiled

log = logging.getLogger(__name__)

# Slices up to 2048 px (1792 for 16 base filters: `tiling.max_tile`) go through in
# one pass; larger ones are tiled, the tiles evened out by plan_tiles (a 4096-px
# slice: 3 x 3 tiles of 1408 px, 6% of the pixels computed twice). The 64-px
# overlap keeps pixels >= 24 px from a cut edge (tiling.default_margin); measured,
# stitched 4096-px slices then differ from one-pass predictions on 0.5% of mask
# pixels, at seams (--overlap 128: 0.03%, 10% more compute;
# benchmarks/bench_inference.py).
DEFAULT_TILE = InferenceConfig().tile  # 2048
DEFAULT_OVERLAP = InferenceConfig().overlap  # 64
# Beyond 16x either way the pixel size is almost surely wrong (a unit mistake),
# and a 4096-px slice would become a 65536-px one.
MAX_RESAMPLE = 16.0


class ModelError(ValueError):
    """A model file or folder that cannot be used; the message names it."""


def check_pixel_size(pixel_size_nm) -> None:
    """ValueError unless `pixel_size_nm` is None (unknown) or a finite number > 0 (nm per pixel)."""
    if pixel_size_nm is None:
        return
    ok = isinstance(pixel_size_nm, numbers.Real) and not isinstance(pixel_size_nm, (bool, np.bool_))
    if not ok or not (math.isfinite(pixel_size_nm) and pixel_size_nm > 0):
        raise ValueError(f"pixel_size_nm must be a positive number of nm per pixel or None (unknown), "
                         f"got {pixel_size_nm!r}")


def resolve_model_path(path: str | Path) -> tuple[Path, Path | None]:
    """(model.keras path, config.json path or None) for a file, a run folder or a built-in model's name."""
    from .pretrained import resolve_model_spec

    path = resolve_model_spec(path)
    if path.is_dir():
        if (path / "model.keras").is_file():
            path = path / "model.keras"
        else:
            from .pretrained import builtin_models

            # `--model models/xmdl_ref` in a checkout: the model card's folder, whose weights ship
            # in the package under the built-in name.
            hint = f"; for the built-in model say --model {path.name}" if path.name in builtin_models() else ""
            if is_saved_model(path):
                hint = ("; it is a SavedModel export, which serves and analyses but does not train or "
                        "calibrate: give the run folder or .keras model it was exported from")
            raise ModelError(f"{path}: no model.keras in this folder{hint}")
    elif not path.is_file():
        raise ModelError(f"{path}: model not found")
    if path.suffix != ".keras":
        raise ModelError(f"{path}: expected a .keras model file")
    cfg = path.parent / "config.json"
    return path, (cfg if cfg.is_file() else None)


def load_keras(path: str | Path):
    """Load a `.keras` model with safe_mode=True (no arbitrary Python code is run)."""
    import keras

    from . import losses  # noqa: F401  (registers the custom loss and metrics)
    from . import model as _model  # noqa: F401  (registers InputBlur)

    path = Path(path)
    import zipfile

    if not zipfile.is_zipfile(path):
        raise ModelError(f"{path}: not a Keras model file (a .keras file is a zip archive; this one is corrupt, "
                         "truncated or of another format)")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except ValueError as err:
        if "safe_mode" in str(err) or "Lambda" in str(err) or "lambda" in str(err):
            raise ModelError(
                f"{path}: refused to load: the file contains arbitrary Python code (e.g. a Lambda layer), "
                "which could execute anything on this machine. Only load such files from a source you trust."
            ) from None
        raise ModelError(f"{path}: cannot load model ({err})") from None
    except Exception as err:
        raise ModelError(f"{path}: cannot load model ({type(err).__name__}: {err})") from None


def without_padding(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(image to predict, grey-value counts to normalise it by, padding mask or None) of a whole slice.

    A slice's constant padding (`sampling.padding_mask`: a registered or rotated section set into a
    canvas) is neither tissue nor context: it is left out of the normalisation's percentiles, shown to
    the network as the tissue's median grey, and its probability is 0. Otherwise the slice as it is,
    normalised by its own grey values, taken before any resampling as training does (and the chunked
    path, by its slices' counts): resampling thins the tails the percentiles come from.
    """
    from .sampling import find_padding, grey_values

    # (The padding's grey values leave the whole histogram, tissue pixels of that value too: the chunked
    # path and the served graph, which never hold a slice whole, can do no other, and all three agree.)
    pad, counts = find_padding(grey_values(image))
    if pad is None:
        return image, counts, None
    return fill_padding(image, pad, counts), counts, pad


def fill_padding(image: np.ndarray, pad: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The image with its padding pixels set to the median grey of the tissue histogram `counts`."""
    from .sampling import median_grey

    return np.where(pad, median_grey(counts), image).astype(image.dtype)


@dataclass
class Predictor:
    """A loaded model plus what is needed to feed it."""

    model: object
    config: Config
    path: Path
    jit_compile: bool | str | None = "auto"  # XLA on GPUs; on CPU it measured slower
    tta: bool = False  # average the 8 flips/rotations of each tile (8x the compute)

    def __post_init__(self):
        import tensorflow as tf

        from .config import resolve_jit

        self.jit_compile = resolve_jit(self.jit_compile)
        model = self.model
        self._fn = tf.function(lambda x: model(x, training=False), jit_compile=self.jit_compile, reduce_retracing=True)

    @property
    def size_divisor(self) -> int:
        return self.config.model.size_divisor

    def tile_for(self, tile: int) -> int:
        """`tile`, capped at the largest this model runs at full speed (`tiling.max_tile`)."""
        if not (isinstance(tile, numbers.Real) and tile >= 1):
            raise ValueError(f"tile must be a positive number of pixels, got {tile!r}")
        cap = max_tile(self.config.model.base_filters, self.size_divisor)
        if tile > cap:
            log.debug("tile %d capped at %d px for a %d-filter model", tile, cap, self.config.model.base_filters)
        return min(tile, cap)

    def predict_batch(self, x: np.ndarray, tta: bool | None = None) -> np.ndarray:
        """float32 (n, h, w, 1) normalised tiles -> float32 (n, h, w, C) probabilities."""
        if not (self.tta if tta is None else tta):
            return self._fn(x).numpy()
        return dihedral_mean(lambda t: self._fn(np.ascontiguousarray(t)).numpy(), x)

    @property
    def pixel_size_nm(self) -> float | None:
        """Pixel size (nm) of the data the model was trained on, or None if unknown."""
        return self.config.data.pixel_size_nm

    def ood_file(self) -> Path | None:
        """The out-of-distribution model `calibrate` stored beside the model (`ood.OOD_FILE`), if any."""
        from .ood import OOD_FILE

        path = Path(self.path).parent / OOD_FILE
        return path if path.is_file() else None

    def ood_feature_function(self, layers: tuple[str, ...], stats: str) -> Callable:
        """(n, t, t, 1) normalised tiles -> (n, D) out-of-distribution features (`ood.feature_extractor`)."""
        from .ood import feature_extractor

        return feature_extractor(self.model, tuple(layers), stats)

    def scale_factor(self, pixel_size_nm: float | None, rescale: bool = True) -> float:
        """Resize factor that brings an input of `pixel_size_nm` to the model's pixel size (1 = none)."""
        from .sampling import resample_factor

        check_pixel_size(pixel_size_nm)
        factor = resample_factor(pixel_size_nm, self.pixel_size_nm) if rescale else 1.0
        if not 1 / MAX_RESAMPLE <= factor <= MAX_RESAMPLE:
            raise ValueError(f"pixel size {pixel_size_nm:g} nm would resample the image by x{factor:.3g} to the model's "
                             f"{self.pixel_size_nm:g} nm (more than x{MAX_RESAMPLE:g} either way); check the pixel size "
                             "(a stale calibration in the file? --pixel-size overrides it)")
        return factor

    def predict_slice(self, image: np.ndarray, tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                      batch_size: int | None = None, progress: Callable[[int], None] | None = None,
                      tta: bool | None = None, pixel_size_nm: float | None = None,
                      rescale: bool = True, counts: np.ndarray | None = None,
                      spread: bool = False, members: bool = False, zoom: float = 1.0,
                      padding: np.ndarray | None = None
                      ) -> np.ndarray | tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw slice (H, W) -> mitochondria probability float32 (H, W) in [0, 1].

        image: uint8/uint16, or any numeric array-like taken as files are read (`io.as_em_slice`:
        (H, W, 1) / (1, H, W) squeezed, RGB made grey, signed shifted, floats such as 0..1 mapped
        onto 0..65535); a stack, NaN or an invalid pixel size is a ValueError (DataError).

        tta: override the predictor's test-time augmentation setting.
        spread: also return the standard deviation (H, W) of the foreground
        probability over the 8 test-time-augmented predictions (zeros without TTA):
        a (probability, spread) pair, at no extra cost over TTA.
        members: also return the 8 test-time-augmented foreground probabilities
        themselves, float32 (H, W, 8) (without TTA the one prediction, (H, W, 1)):
        (probability, spread, members) with `spread`, else (probability, members);
        4x the blending memory of `spread`.
        pixel_size_nm: the slice's pixel size; when it and the model's are known
        (and `rescale`), the slice is resampled to the model's pixel size, predicted
        there and the probabilities mapped back to the slice's own grid.
        counts: the grey-value histogram of the whole slice when `image` is a
        piece of it (`sampling.grey_counts`), so the piece is normalised as its
        slice; default: its own, taken before any resampling (as in training),
        less its constant padding (`without_padding`).
        padding: with `counts`, bool (H, W) the piece's share of its slice's padding
        (`counts` then being the slice's tissue histogram): shown as the tissue's
        median grey and predicted 0, as a whole slice's is.
        zoom: predict with the slice resampled by this much more than its pixel size
        asks (0.8: objects look 20% smaller to the model); the output is on the
        slice's grid all the same (for the scale-agreement feature).
        """
        from .sampling import normalize_as

        if not (isinstance(zoom, numbers.Real) and math.isfinite(zoom) and zoom > 0):
            raise ValueError(f"zoom must be a positive number, got {zoom!r}")
        tile = self.tile_for(tile)
        use_tta = self.tta if tta is None else tta
        image, counts, pad = self._with_counts(image, counts, padding)
        moments = spread and use_tta

        def batch(t: np.ndarray) -> np.ndarray:
            if members and use_tta:  # every member blended on its own (all linear, as the mean)
                return dihedral_members(lambda u: self._fn(np.ascontiguousarray(u)).numpy()[..., 1:2], t)
            if moments:  # blend the mean and the mean square of the members: both are linear
                return dihedral_mean(lambda u: np.concatenate([(f := self._fn(np.ascontiguousarray(u)).numpy()[..., 1:2]),
                                                               f * f], -1), t)
            return self.predict_batch(t, tta)[..., 1:2]  # only the foreground channel is blended

        def run(img: np.ndarray, _region: None) -> np.ndarray:
            x = normalize_as(img, self.config.normalization, counts)
            bs = self._batch_size(x.shape, tile, overlap, batch_size)
            return predict_tiled(self._pad_batches(batch, bs), x, tile, overlap, self.size_divisor, bs,
                                 progress=progress)

        out = self._at_model_scale(image, None, self.scale_factor(pixel_size_nm, rescale) * zoom, run)
        if pad is not None:
            out[pad] = 0.0
        if members:
            prob = out.mean(-1, dtype=np.float32)
            sd = out.std(-1, dtype=np.float32) if use_tta else np.zeros_like(prob)
            return (prob, sd, out) if spread else (prob, out)
        prob = out[..., 0]
        if not spread:
            return prob
        sd = np.sqrt(np.maximum(out[..., 1] - prob * prob, 0)).astype(np.float32) if moments else np.zeros_like(prob)
        return prob, sd

    def explain_slice(self, image: np.ndarray, layer: str | None = None, region: np.ndarray | None = None,
                      tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP, batch_size: int | None = None,
                      progress: Callable[[int], None] | None = None, pixel_size_nm: float | None = None,
                      rescale: bool = True, counts: np.ndarray | None = None,
                      padding: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probability and Grad-CAM of a raw slice in one tiled pass.

        image: (H, W) uint8/uint16 (or any array `predict_slice` takes). region: optional (H, W) bool target region
        (default: the predicted mask). layer: conv layer name (default `dec1_conv2`).
        pixel_size_nm, rescale, counts, padding: as in `predict_slice`.
        Returns (probability float32 (H, W), heatmap float32 (H, W) in [0, 1]).
        """
        from .sampling import normalize_as
        from .gradcam import PREDICTED, scale_unit

        image, counts, pad = self._with_counts(image, counts, padding)  # as `predict_slice`
        if region is not None and np.shape(region) != image.shape:
            raise ValueError(f"region of shape {np.shape(region)} differs from the image's {image.shape}")
        explain = self._explainer(layer or self.gradcam_layer)
        tile = self.tile_for(tile)

        def run(img: np.ndarray, reg: np.ndarray | None) -> np.ndarray:
            x = normalize_as(img, self.config.normalization, counts)
            r = np.full(x.shape, PREDICTED, np.float32) if reg is None else reg.astype(np.float32)
            bs = self._batch_size(x.shape, tile, overlap, batch_size)
            fn = self._pad_batches(lambda t: np.asarray(explain(t))[..., [1, -1]], bs)
            return predict_tiled(fn, np.stack([x, r], -1), tile, overlap, self.size_divisor, bs,
                                 progress=progress)

        out = self._at_model_scale(image, region, self.scale_factor(pixel_size_nm, rescale), run)
        if pad is not None:
            out[pad] = 0.0
        return out[..., 0], scale_unit(out[..., 1])

    @staticmethod
    def _with_counts(image, counts: np.ndarray | None, padding: np.ndarray | None):
        """(image to predict, the histogram to normalise it by, padding mask or None): a whole slice's own
        (`without_padding`, after `io.as_em_slice`), or a piece's, given with its slice's `counts` and its
        share of the slice's padding (shown as the tissue's median grey)."""
        from .io import as_em_slice

        if counts is None:
            if padding is not None:
                raise ValueError("padding= is the share of a slice's padding in a piece of it, given with the "
                                 "slice's counts=; a whole slice's own is found by predict_slice itself")
            return without_padding(as_em_slice(image))
        pad = None
        if padding is not None:
            pad = np.asarray(padding, bool)
            if pad.shape != np.shape(image):
                raise ValueError(f"padding of shape {pad.shape} differs from the image's {np.shape(image)}")
            pad = pad if pad.any() else None
        return (image if pad is None else fill_padding(image, pad, counts)), counts, pad

    @staticmethod
    def _at_model_scale(image: np.ndarray, region: np.ndarray | None, factor: float, run: Callable) -> np.ndarray:
        """Apply `run` at the model's pixel size and map its (h, w, C) float output back to (H, W, C)."""
        import cv2

        from .sampling import resample_image

        if factor == 1.0:
            return run(image, region)
        h, w = image.shape
        img = resample_image(image, factor)
        if region is not None:
            region = cv2.resize(np.asarray(region, np.uint8), img.shape[::-1],
                                interpolation=cv2.INTER_NEAREST_EXACT).astype(bool)
        out = run(img, region)
        back = cv2.resize(out, (w, h), interpolation=cv2.INTER_LINEAR)
        return back.reshape(h, w, -1)

    @property
    def gradcam_layer(self) -> str:
        from .model import DEFAULT_GRADCAM_LAYER

        return self.config.info.get("gradcam_layer", DEFAULT_GRADCAM_LAYER)

    def _explainer(self, layer: str):
        from .gradcam import explainer

        cache = self.__dict__.setdefault("_explainers", {})
        if layer not in cache:
            cache[layer] = explainer(self.model, layer, self.jit_compile)
        return cache[layer]

    def _batch_size(self, shape: tuple[int, int], tile: int, overlap: int, batch_size: int | None) -> int:
        """`batch_size`, or the automatic one for the tiles a slice of `shape` is cut into."""
        return batch_size or auto_batch_size(plan_tiles(shape, tile, overlap, self.size_divisor)[0])

    def _pad_batches(self, fn: Callable[[np.ndarray], np.ndarray], batch_size: int) -> Callable[[np.ndarray], np.ndarray]:
        # Under XLA pad the last, short batch so the compiled function sees one shape
        # only; without XLA a short batch is cheaper than computing padding tiles.
        if not self.jit_compile:
            return fn

        def padded(x: np.ndarray) -> np.ndarray:
            n = len(x)
            if n < batch_size:
                x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), x.dtype)])
            return fn(x)[:n]

        return padded


def _dihedral(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray):
    """fn of each of the 8 flips/rotations of (n, h, w, c) tiles, mapped back to the original orientation."""
    for flip in (False, True):
        xf = x[:, :, ::-1] if flip else x
        for k in range(4):
            y = np.rot90(fn(np.rot90(xf, k, axes=(1, 2))), -k, axes=(1, 2))
            yield y[:, :, ::-1] if flip else y


def dihedral_mean(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """Test-time augmentation: mean of fn over the 8 flips/rotations of (n, h, w, c) tiles.

    Each prediction is mapped back to the original orientation before averaging.
    """
    total = None
    for y in _dihedral(fn, x):
        total = y if total is None else total + y
    return total / 8.0


def dihedral_members(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """The 8 test-time-augmented predictions of (n, h, w, c) tiles side by side: (n, h, w, 8 * c),
    member m in channels m * c ... (m + 1) * c - 1, each in the original orientation."""
    return np.concatenate([np.ascontiguousarray(y) for y in _dihedral(fn, x)], axis=-1)


def is_saved_model(path: str | Path) -> bool:
    """True for an exported SavedModel folder (TF Serving layout `DIR/<version>/` or one version)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / "saved_model.pb").is_file():
        return True
    return any((v / "saved_model.pb").is_file() for v in path.iterdir() if v.is_dir() and v.name.isdigit())


def load_model(path: str | Path | None = None, jit_compile: bool | str = "auto", tta: bool = False) -> Predictor:
    """Load a trained model: a run folder or `.keras` file (with `config.json` beside it), a
    built-in model's name (`"xmdl_ref"`, `"xmdl_ref_f8"`), or a SavedModel exported by
    `python -m xmdl_tf.export` (a `SavedModelPredictor`, see `xmdl_tf.export`); None: the
    default the commands use without `--model` ($XMDL_MODEL, else the built-in `xmdl_ref`).

    tta: the default of `predict_slice` / `predict_batch` (8 flips and rotations, 8x the
    compute); the model's own `inference.tta` is applied by `analyze` and `evaluate`, not here.
    Returns a `Predictor`: `predict_slice(image)` maps a raw (H, W) uint8/uint16 slice to the
    float32 (H, W) mitochondria probability in [0, 1]; `config` is the model's `Config`.
    """
    from .pretrained import model_or_default

    path = model_or_default(path)
    if is_saved_model(path):
        from .export import load_saved_model

        return load_saved_model(path, tta=tta)
    model, config, mpath = load_keras_with_config(path)
    return Predictor(model, config, mpath, jit_compile, tta)


def load_keras_with_config(path: str | Path):
    """(keras model, Config, model path) of a run folder or `.keras` file, on any Keras backend.

    A bare `.keras` file without config.json gets a Config inferred from its graph.
    """
    mpath, cpath = resolve_model_path(path)
    model = load_keras(mpath)
    if cpath is not None:
        config = Config.load(cpath)
    else:  # a bare .keras file: read the architecture off the graph (fine-tuning rebuilds it)
        names = [l.name for l in model.layers]
        convs = [l.filters for l in model.layers if l.name.endswith("_conv1") and hasattr(l, "filters")]
        config = Config(model=ModelConfig(
            depth=1 + sum(1 for n in names if n.endswith("_pool")),
            base_filters=int(min(convs)) if convs else ModelConfig.base_filters,
            residual=any(n.endswith("_add") and "_att_" not in n for n in names),
            attention=any("_att_" in n for n in names),
            n_classes=int(model.output_shape[-1]),
            dropout=next((float(l.rate) for l in model.layers if l.name.endswith("_dropout")), 0.0),
            input_blur=next((float(l.sigma) for l in model.layers if l.name == "input_blur"), 0.0),
            mixstyle=next((float(l.p) for l in model.layers if l.name.endswith("_mixstyle")), 0.0)))
    if model.input_shape[-1] != 1:
        raise ModelError(f"{mpath}: model expects {model.input_shape[-1]} channels; xmdl_tf works on 1-channel EM")
    return model, config, mpath


def receptive_field(predict_batch: Callable[[np.ndarray], np.ndarray], size: int = 256, tol: float = 1e-6) -> int:
    """Width in pixels of the region an impulse at the centre changes (the empirical receptive field).

    Pushes a single bright pixel through the network (as CSBDeep does) and
    measures how far the output changes relative to a blank input.
    """
    x0 = np.zeros((1, size, size, 1), np.float32)
    x1 = x0.copy()
    x1[0, size // 2, size // 2, 0] = 1.0
    diff = np.abs(predict_batch(x1) - predict_batch(x0)).max(axis=(0, 3))
    ys, xs = np.nonzero(diff > tol)
    if len(ys) == 0:
        return 1
    return int(max(ys.max() - ys.min(), xs.max() - xs.min()) + 1)
