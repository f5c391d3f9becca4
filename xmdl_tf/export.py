"""SavedModel export for TF Serving, with Grad-CAM served too, and a predictor that consumes it.

    python -m xmdl_tf.export --model runs/ref --out exports/xmdl [--version N] [--gradcam-layer NAME]
    python -m xmdl_tf.export --format bioimageio --out DIR    (BioImage Model Zoo: xmdl_tf.bioimage_zoo)

writes the TF Serving layout `EXPORT_DIR/<version>/saved_model.pb + variables/
+ assets/xmdl.json` (version 1, else the next free number; an existing version
is never overwritten). Signatures (see docs/serving.md for the full table):

    serving_default     images uint8   [b, h, w, 1] raw pixels -> probabilities float32 [b, h, w], mask uint8 [b, h, w]
    serving_float       images float32 [b, h, w, 1] raw grey values 0..65535 (16-bit EM) -> same outputs
    explain             images uint8   [b, h, w, 1] -> probabilities, mask, gradcam and uncertainty
                        (entropy of the calibrated probability) float32 [b, h, w] in [0, 1]
    explain_float       images float32 [b, h, w, 1] -> same as explain
    predict_normalized  images float32 [b, h, w, 1] normalised tiles -> probabilities float32 [b, h, w, C]
    explain_normalized  images float32 [b, h, w, 2] normalised tile + region -> probabilities [b, h, w, C],
                        cam float32 [b, h, w] (raw Grad-CAM)

The raw-pixel signatures normalise each image of the batch on its own, inside
the graph, with `xmdl_tf.data.normalize` (the function training and inference
use), mirror-pad height and width up to the model's size divisor and crop the
outputs back, so any h, w >= 1 works. The whole request is one forward pass,
so one request may carry at most MAX_REQUEST_PIXELS (batch x height x width =
4096 x 4096) pixels; larger ones, empty batches, constant images (refused by
the CLI too), NaN and out-of-range grey values are refused with an
InvalidArgument error that says which. For slices too big for one request, consumers tile around the two
`*_normalized` signatures after normalising the whole slice once: normalising
each tile on its own would give a different intensity mapping per tile. These
two are internal but stable; `load_saved_model` uses them.

Grad-CAM runs inside the exported functions (GradientTape on a sub-model that
returns the chosen layer's activations and the logits), built by the same
`xmdl_tf.gradcam.explain_function` as local explanations: gradients taken
through a reloaded SavedModel are unreliable.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import cli
from .config import NORMALIZATION, Config
from .predict import ModelError, Predictor
from .runlock import usual_permissions

META_FILE = "xmdl.json"  # in EXPORT_DIR/<version>/assets/
MAX_GREY = 65535.0  # normalisation works on integer grey values of 8- or 16-bit EM
# Largest request (batch x height x width) one call may carry: one 4096 x 4096
# slice, or four 2048-px tiles. A whole-request pass over an 8192^2 image took
# more than 6 GB even with a tiny model; callers tile larger images
# (`load_model(EXPORT_DIR).predict_slice` does, 2048-px tiles by default).
MAX_REQUEST_PIXELS = 4096 * 4096

_MAP = "[batch, height, width]"
_SERVED = {"probabilities": f"float32 {_MAP}", "mask": f"uint8 {_MAP}"}
_PROBS = {"probabilities": "float32 [batch, height, width, n_classes]"}
# name -> (input `images` dtype, its channels, outputs). Raw-pixel signatures take
# [batch, height, width, 1]; the tile-level ones normalised tiles (see the docstring).
SIGNATURES = {
    "serving_default": ("uint8", 1, _SERVED),
    "serving_float": ("float32", 1, _SERVED),
    "explain": ("uint8", 1, {**_SERVED, "gradcam": f"float32 {_MAP} in [0, 1]",
                             "uncertainty": f"float32 {_MAP} in [0, 1] (entropy, bits)"}),
    "explain_float": ("float32", 1, {**_SERVED, "gradcam": f"float32 {_MAP} in [0, 1]",
                                     "uncertainty": f"float32 {_MAP} in [0, 1] (entropy, bits)"}),
    "predict_normalized": ("float32", 1, _PROBS),
    "explain_normalized": ("float32", 2, {**_PROBS, "cam": f"float32 {_MAP}, raw Grad-CAM >= 0"}),
}
TILE_SIGNATURES = ("predict_normalized", "explain_normalized")
# Only for a calibrated model (ood.npz beside it, copied to assets/): the out-of-distribution
# features of normalised tiles, as `ood.feature_extractor` computes them, so that an export
# warns and zoom-searches as the .keras model does.
OOD_SIGNATURE = ("ood_features", "float32", 1, {"features": "float32 [batch, n_features]"})


# ----------------------------------------------------------------------------
# Versions


def versions(out_dir: str | Path) -> list[int]:
    """Existing version numbers (numeric sub-folders) of an export folder, ascending."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    return sorted(int(p.name) for p in out_dir.iterdir() if p.is_dir() and p.name.isdigit())


def resolve_version(path: str | Path) -> Path:
    """The version folder holding `saved_model.pb`: `path` itself or its highest numeric version."""
    path = Path(path)
    if (path / "saved_model.pb").is_file():
        return path
    found = [v for v in versions(path) if (path / str(v) / "saved_model.pb").is_file()]
    if not found:
        raise ModelError(f"{path}: no SavedModel here (expected saved_model.pb or <version>/saved_model.pb)")
    return path / str(found[-1])


# ----------------------------------------------------------------------------
# Export


def export_model(model_path: str | Path, out_dir: str | Path, version: int | None = None,
                 gradcam_layer: str | None = None) -> Path:
    """Export a trained model (run folder or `.keras`) to `out_dir/<version>/` for TF Serving.

    version: None picks 1, or one more than the highest existing version; an
    existing version raises FileExistsError and nothing is written.
    gradcam_layer: conv layer explained by the `explain` signatures (default:
    the layer recorded in config.json, else `dec1_conv2`).
    Returns the version folder.
    """
    from .predict import is_saved_model, load_model, resolve_model_path
    from .pretrained import resolve_model_spec

    out_dir = cli.check_out_folder(out_dir)
    if version is not None and version < 1:
        raise ValueError(f"version must be a positive integer, got {version}")
    if (out_dir / "saved_model.pb").is_file():
        raise cli.UsageError(f"--out {out_dir} is a version folder of an export (it holds saved_model.pb); give the "
                             f"export's base folder (--out {out_dir.parent})")
    if is_saved_model(resolve_model_spec(model_path)):
        # Refused before loading: an export (a damaged one too) is never read here.
        raise ModelError(f"{model_path}: already a SavedModel; export the .keras model it came from")
    if resolve_model_path(model_path)[0].parent.resolve() == out_dir.resolve():
        # Version folders beside model.keras would make load_model read the folder as the SavedModel.
        raise cli.UsageError(f"--out {out_dir} is the model's own folder; export to a folder of its own")
    # Every numeric name is taken, a stray file "1" too (else "next free: 1" would name it again).
    existing = sorted(int(p.name) for p in out_dir.iterdir() if p.name.isdecimal()) if out_dir.is_dir() else []
    version = version if version is not None else (existing[-1] + 1 if existing else 1)
    target = out_dir / str(version)
    if target.exists():
        raise FileExistsError(f"{target}: version {version} already exists; choose another --version or omit it "
                              f"(next free: {(existing[-1] + 1) if existing else 1}); versions are never overwritten")
    from .ood import model_distribution

    predictor = load_model(model_path, jit_compile=False)
    layer = gradcam_layer or predictor.gradcam_layer
    dist = model_distribution(predictor)  # a damaged ood.npz: one ValueError naming it
    archive = _archive(predictor.model, predictor.config, layer, dist)
    meta = _metadata(predictor, layer, version, dist)

    # Write beside the target and rename at the end: TF Serving polls EXPORT_DIR
    # and must never see a half-written version (it ignores non-numeric names).
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{version}-", dir=out_dir))
    try:
        usual_permissions(tmp)  # mkdtemp's 0o700 would keep a serving process of another user out
        archive.write_out(str(tmp), verbose=False)
        (tmp / "assets").mkdir(exist_ok=True)
        (tmp / "assets" / META_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
        if dist is not None:
            shutil.copy2(predictor.ood_file(), tmp / "assets" / predictor.ood_file().name)
        if target.exists():  # another export took this number meanwhile
            raise FileExistsError(f"{target}: version {version} appeared during the export; nothing overwritten")
        os.rename(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target


STALE_TEMP_S = 6 * 3600  # an export takes minutes; a staging folder this old was left by a killed one


def _remove_stale_temps(out_dir: Path) -> None:
    """Delete the staging folders (`.tmp-<version>-*`) of exports killed before they could clean up
    (SIGKILL, power loss): hidden from TF Serving, but a full model each. Recent ones may belong
    to an export still running, so only old ones go."""
    now = time.time()
    for p in out_dir.glob(".tmp-*-*"):
        try:
            if p.is_dir() and not p.is_symlink() and now - p.stat().st_mtime > STALE_TEMP_S:
                shutil.rmtree(p)
                logging.getLogger(__name__).info("removed %s, left by an interrupted export", p)
        except OSError:  # another process removed it, or it is not ours to remove: leave it
            pass


def _archive(model, config: Config, layer: str, dist=None):
    """A keras.export.ExportArchive holding the six signatures around `model` (and `ood_features`
    for the layers and statistics of `dist`, an `ood.FeatureDistribution`)."""
    import keras
    import tensorflow as tf

    from .data import grey_ints, normalize_counts
    from .gradcam import PREDICTED, explain_function

    divisor = config.model.size_divisor
    norm = {**NORMALIZATION, **config.normalization}  # a stored setting may leave the defaults out
    method = norm["method"]
    low, high, clip = float(norm["low"]), float(norm["high"]), bool(norm["clip"])
    explain_tiles = explain_function(model, layer)

    def checked(images: tf.Tensor, channels: int, multiple: int = 1) -> tf.Tensor:
        # A served graph does not enforce its declared shape (TF Serving and loaded
        # signatures pass any shape through), so check at run time, before a deep
        # error inside the network (or a wrong answer: an unbatched (H, W, 1) image would
        # be read as H images of W x 1). tf.rank would be folded from the declared shape
        # into a constant 4, so the rank is counted from the runtime shape vector instead.
        shape = tf.raw_ops.Shape(input=images, out_type=tf.int64)
        rank = tf.shape(tf.where(tf.greater_equal(shape, 0)), out_type=tf.int64)[0]
        # The last dimension, -1 for a scalar (whose empty shape has none to index).
        last = tf.concat([tf.constant([-1], tf.int64), shape], axis=0)[-1]
        form = tf.debugging.Assert(tf.logical_and(tf.equal(rank, 4), tf.equal(last, channels)), [
            f"images must have shape [batch, height, width, {channels}]; got shape", shape], summarize=8)
        with tf.control_dependencies([form]):
            size = "images: height and width must be at least 1 pixel"
            if multiple > 1:
                size += f" and multiples of the size divisor {multiple} (the caller pads tiles)"
            pixels = shape[0] * shape[1] * shape[2]
            checks = [tf.debugging.assert_positive(shape[0:1], message="images: empty batch (no image in the request)"),
                      tf.debugging.assert_positive(shape[1:3], message=size),
                      tf.debugging.assert_equal(shape[1:3] % multiple, tf.constant(0, tf.int64), message=size),
                      tf.debugging.assert_less_equal(pixels, tf.constant(MAX_REQUEST_PIXELS, tf.int64), message=(
                          f"images: request too large (batch x height x width above {MAX_REQUEST_PIXELS} pixels); "
                          "send tiles, as xmdl_tf.export.load_saved_model(...).predict_slice does"))]
        with tf.control_dependencies(checks):
            return tf.identity(images)

    def not_constant(images: tf.Tensor) -> tf.Tensor:
        # As the CLI: a constant image has no contrast to normalise and nothing to segment.
        x = tf.cast(images, tf.float32)
        spread = tf.reduce_max(x, axis=[1, 2, 3]) - tf.reduce_min(x, axis=[1, 2, 3])
        check = tf.debugging.assert_positive(spread, message=(
            "images: a constant image (every pixel the same value) has nothing to segment"))
        with tf.control_dependencies([check]):
            return tf.identity(images)

    def finite(images: tf.Tensor) -> tf.Tensor:
        check = tf.debugging.assert_all_finite(images, "images: NaN or infinite values in normalised tiles")
        with tf.control_dependencies([check]):
            return tf.identity(images)

    def checked_grey(images: tf.Tensor) -> tf.Tensor:
        # Float requests must still be raw grey values: normalised [0, 1] data would
        # round to two levels and give a meaningless prediction without any error.
        checks = [
            tf.debugging.assert_all_finite(images, "images: NaN or infinite grey values"),
            tf.debugging.assert_greater_equal(images, 0.0, message=(
                f"images: raw grey values must be in [0, {MAX_GREY:.0f}] (send raw pixels, not normalised ones)")),
            tf.debugging.assert_less_equal(images, MAX_GREY, message=(
                f"images: raw grey values must be in [0, {MAX_GREY:.0f}] (8- or 16-bit EM)")),
            tf.debugging.assert_greater(tf.reduce_max(images, axis=[1, 2, 3]), 1.0, message=(
                "images: every grey value of an image lies in [0, 1], which looks normalised; send raw grey "
                f"values (0..255 or 0..{MAX_GREY:.0f})")),
        ]
        with tf.control_dependencies(checks):
            return tf.identity(images)

    def normalized(image: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        # One intensity mapping per image, from that image's own histogram, less its constant padding
        # (a registered section in a canvas), which is shown as the tissue's median grey and predicted 0.
        x = image[..., 0]
        xi, counts, pad = unpadded(em_grey_ints(x) if x.dtype.is_floating else grey_ints(x))
        return normalize_counts(xi, counts, low, high, clip, method)[..., None], pad

    def prepare(images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        """Raw [b, h, w, 1] -> (normalised float32 [b, H, W, 1] padded to the divisor, h, w,
        bool [b, h, w] constant padding of each image)."""
        images = checked(images, 1)
        if images.dtype.is_floating:
            images = checked_grey(images)
        images = not_constant(images)
        x, pad = tf.map_fn(normalized, images, fn_output_signature=(tf.float32, tf.bool))
        h, w = tf.shape(x)[1], tf.shape(x)[2]
        x = tf.gather(x, _mirror_index(h, -(-h // divisor) * divisor), axis=1)
        x = tf.gather(x, _mirror_index(w, -(-w // divisor) * divisor), axis=2)
        return x, h, w, pad

    threshold = float(config.inference.threshold)  # as analyze: the model's (tuned) threshold

    def served(probs: tf.Tensor, h: tf.Tensor, w: tf.Tensor, pad: tf.Tensor) -> dict[str, tf.Tensor]:
        p = tf.where(pad, 0.0, probs[:, :h, :w, 1])
        return {"probabilities": p, "mask": tf.cast(p >= threshold, tf.uint8)}

    def predict_raw(images: tf.Tensor) -> dict[str, tf.Tensor]:
        x, h, w, pad = prepare(images)
        return served(model(x, training=False), h, w, pad)

    def explain_raw(images: tf.Tensor) -> dict[str, tf.Tensor]:
        x, h, w, pad = prepare(images)
        out = explain_tiles(tf.concat([x, tf.fill(tf.shape(x), PREDICTED)], axis=-1))
        cam = tf.where(pad, 0.0, out[:, :h, :w, -1])
        # Scaled per image by its maximum, as `gradcam.scale_unit` does for a slice.
        cam = tf.math.divide_no_nan(cam, tf.reduce_max(cam, axis=(1, 2), keepdims=True))
        result = served(out[..., :-1], h, w, pad)
        return {**result, "gradcam": cam, "uncertainty": uncertainty(result["probabilities"])}

    temperature = float(config.calibration.get("temperature", 1.0))

    def uncertainty(p: tf.Tensor) -> tf.Tensor:
        # As `confidence.entropy(calibration.apply_temperature(p, T))`: a few element-wise ops
        # on the output, negligible beside the network (the explain signatures already run it twice).
        eps = 1e-6
        pc = tf.clip_by_value(p, eps, 1 - eps)
        q = tf.sigmoid((tf.math.log(pc) - tf.math.log1p(-pc)) / temperature)
        q = tf.clip_by_value(q, 1e-7, 1 - 1e-7)
        return -(q * tf.math.log(q) + (1 - q) * tf.math.log1p(-q)) / np.log(2.0)

    def predict_normalized(images: tf.Tensor) -> dict[str, tf.Tensor]:
        return {"probabilities": model(finite(checked(images, 1, divisor)), training=False)}

    def explain_normalized(images: tf.Tensor) -> dict[str, tf.Tensor]:
        out = explain_tiles(finite(checked(images, 2, divisor)))
        return {"probabilities": out[..., :-1], "cam": out[..., -1]}

    fns = {"serving_default": predict_raw, "serving_float": predict_raw, "explain": explain_raw,
           "explain_float": explain_raw, "predict_normalized": predict_normalized,
           "explain_normalized": explain_normalized}
    signatures = dict(SIGNATURES)
    if dist is not None:
        sub = keras.Model(model.inputs, [model.get_layer(name).output for name in dist.layers])

        def ood_features(images: tf.Tensor) -> dict[str, tf.Tensor]:
            outs = sub([finite(checked(images, 1, divisor))], training=False)
            outs = outs if isinstance(outs, (list, tuple)) else [outs]
            parts = []
            for a in outs:  # as ood.feature_extractor, per channel over the tile
                parts.append(tf.reduce_mean(a, axis=(1, 2)))
                if dist.stats == "mean_std":
                    parts.append(tf.math.reduce_std(a, axis=(1, 2)))
            return {"features": tf.concat(parts, axis=1)}

        name, dtype, channels, outputs = OOD_SIGNATURE
        fns[name], signatures[name] = ood_features, (dtype, channels, outputs)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (dtype, channels, _) in signatures.items():
        # Each function's argument is named `images`, which becomes the signature's input key.
        spec = tf.TensorSpec([None, None, None, channels], dtype, name="images")
        archive.add_endpoint(name, fns[name], input_signature=[spec])
    return archive


def em_grey_ints(x):
    """int32 grey values of ONE float image of raw grey values (H, W), as files and arrays are read
    (`io.to_em_dtype`): integers as they are, other floats mapped linearly from the image's range onto
    0..65535 (the percentile normalisation sees no linear map, but rounding 0..255 floats would
    quantise them differently from the local path)."""
    import tensorflow as tf

    x = tf.cast(x, tf.float64)
    lo, hi = tf.reduce_min(x), tf.reduce_max(x)
    mapped = tf.round((x - lo) * (65535.0 / tf.maximum(hi - lo, 1e-300)))
    return tf.cast(tf.where(tf.reduce_all(tf.equal(x, tf.round(x))), x, mapped), tf.int32)


def _edge_regions(same, min_fraction: float):
    """bool (h, w): the 4-connected regions of `same` (bool (h, w)) that touch the border and each
    cover at least `min_fraction` of it: `sampling._edge_regions` in the graph (each pixel takes the
    largest index in its region by repeated 4-neighbour maxima: as many steps as the regions are
    long, a few hundred on a block grid of at most 256 x 256)."""
    import tensorflow as tf

    h, w = tf.shape(same)[0], tf.shape(same)[1]
    start = tf.where(same, tf.reshape(tf.range(1, h * w + 1), [h, w]), 0)

    def step(lab, _):
        p = tf.pad(lab, [[1, 1], [1, 1]])
        top = tf.reduce_max(tf.stack([lab, p[:-2, 1:-1], p[2:, 1:-1], p[1:-1, :-2], p[1:-1, 2:]]), axis=0)
        new = tf.where(same, top, 0)
        return new, tf.reduce_any(tf.not_equal(new, lab))

    lab, _ = tf.while_loop(lambda _, changed: changed, step, [start, tf.constant(True)])
    n = h * w + 1
    area = tf.math.bincount(tf.reshape(lab, [-1]), minlength=n, maxlength=n)
    border = tf.concat([lab[0], lab[-1], lab[:, 0], lab[:, -1]], axis=0)
    keep = (tf.math.bincount(border, minlength=n, maxlength=n) > 0) & \
        (tf.cast(area, tf.float32) >= min_fraction * tf.cast(h * w, tf.float32)) & (tf.range(n) > 0)
    return tf.gather(keep, lab)


def unpadded(xi):
    """(grey values with the padding shown as the tissue's median grey, the tissue's histogram,
    bool padding mask) of ONE image of `data.grey_ints` values (H, W): `sampling.find_padding` in the
    graph, on the same grid of s x s blocks (`sampling.padding_blocks`, `padding_pixels`)."""
    import tensorflow as tf

    from .data import grey_counts
    from .sampling import PADDING_MIN_FRACTION, PADDING_THUMB

    h, w = tf.shape(xi)[0], tf.shape(xi)[1]
    s = tf.maximum(1, (tf.maximum(h, w) + PADDING_THUMB - 1) // PADDING_THUMB)
    bh, bw = (h + s - 1) // s, (w + s - 1) // s
    # Each block's extremes; a partial block at the bottom / right repeats its last row / column.
    blocks = tf.gather(tf.gather(xi, tf.minimum(tf.range(bh * s), h - 1), axis=0),
                       tf.minimum(tf.range(bw * s), w - 1), axis=1)
    blocks = tf.transpose(tf.reshape(blocks, [bh, s, bw, s]), [0, 2, 1, 3])
    bmin, bmax = tf.reduce_min(blocks, axis=[2, 3]), tf.reduce_max(blocks, axis=[2, 3])
    rows, cols = tf.minimum(tf.range(h) // s, bh - 1), tf.minimum(tf.range(w) // s, bw - 1)
    counts = grey_counts(xi)
    lo, hi = tf.reduce_min(xi), tf.reduce_max(xi)
    cores = [_edge_regions(tf.equal(bmax, lo), PADDING_MIN_FRACTION),
             _edge_regions(tf.equal(bmin, hi), PADDING_MIN_FRACTION)]
    grey = tf.range(65536)
    dropped = (tf.reduce_any(cores[0]) & tf.equal(grey, lo)) | (tf.reduce_any(cores[1]) & tf.equal(grey, hi))
    tissue = tf.where(dropped, tf.zeros_like(counts), counts)
    keep = tf.reduce_sum(tissue) > 0  # nothing but "padding" (an image of two grey values): none
    pad = tf.zeros_like(xi, tf.bool)
    for core, v in zip(cores, (lo, hi)):
        near = tf.nn.max_pool2d(tf.cast(core, tf.float32)[None, ..., None], 3, 1, "SAME")[0, ..., 0] > 0
        same = tf.gather(tf.gather(near, rows, axis=0), cols, axis=1) & tf.equal(xi, v)
        seed = same & tf.gather(tf.gather(core, rows, axis=0), cols, axis=1)
        pad |= _reconstruct(seed, same) & keep
    tissue = tf.where(keep, tissue, counts)
    cdf = tf.cumsum(tissue)
    median = tf.cast(tf.searchsorted(cdf, tf.maximum((cdf[-1:] + 1) // 2, 1), side="left")[0], tf.int32)
    return tf.where(pad, median, xi), tissue, pad


def _reconstruct(seed, mask):
    """bool: the pixels of `mask` 4-connected to `seed` within it (repeated 4-neighbour growth: as many
    steps as the band of `mask` around the seed is wide, one block at most)."""
    import tensorflow as tf

    def step(grown, _):
        p = tf.pad(grown, [[1, 1], [1, 1]])
        new = mask & (grown | p[:-2, 1:-1] | p[2:, 1:-1] | p[1:-1, :-2] | p[1:-1, 2:])
        return new, tf.reduce_any(tf.not_equal(new, grown))

    grown, _ = tf.while_loop(lambda _, changed: changed, step, [seed, tf.reduce_any(seed)])
    return grown


def _mirror_index(n, size):
    """Indices 0..size-1 folded into [0, n) by mirroring, as numpy.pad(mode="symmetric").

    Unlike tf.pad(mode="SYMMETRIC") this works for padding wider than the image.
    """
    import tensorflow as tf

    i = tf.range(size) % (2 * n)
    return tf.where(i < n, i, 2 * n - 1 - i)


def _metadata(predictor: Predictor, layer: str, version: int, dist=None) -> dict:
    """Contents of assets/xmdl.json: everything a consumer needs besides the graph."""
    import keras
    import tensorflow as tf

    from . import __version__

    model_dir = predictor.path.parent
    card = {p.name: _read_json(p, "it goes into the export's model card; fix or remove it")
            for p in sorted(model_dir.glob("metrics*.json"))}
    config = predictor.config
    return {
        "format": "xmdl_tf SavedModel",
        "version": version,
        "source_model": str(predictor.path),
        "tile_size": predictor.tile_for(config.inference.tile),
        "overlap": config.inference.overlap,
        "inference": dataclasses.asdict(config.inference),
        "max_request_pixels": MAX_REQUEST_PIXELS,
        "size_divisor": config.model.size_divisor,
        "n_classes": config.model.n_classes,
        "mitochondria_class": 1,
        "mask_threshold": float(config.inference.threshold),
        "normalization": config.normalization,
        "gradcam_layer": layer,
        "pixel_size_nm": config.data.pixel_size_nm,
        "signatures": {name: {"inputs": {"images": f"{dtype} [batch, height, width, {channels}]"}, "outputs": outputs}
                       for name, (dtype, channels, outputs) in SIGNATURES.items()}
        | ({OOD_SIGNATURE[0]: {"inputs": {"images": f"{OOD_SIGNATURE[1]} [batch, {dist.tile}, {dist.tile}, 1]"},
                               "outputs": OOD_SIGNATURE[3]}} if dist is not None else {}),
        "ood": {"file": predictor.ood_file().name, "layers": list(dist.layers), "stats": dist.stats, "tile": dist.tile,
                "threshold": dist.threshold} if dist is not None else None,
        "model_card": card or None,
        "config": config.to_dict(),
        "versions": {"xmdl_tf": __version__, "tensorflow": tf.__version__, "keras": keras.__version__},
    }


# ----------------------------------------------------------------------------
# Consumer


def read_metadata(path: str | Path) -> dict:
    """assets/xmdl.json of an export (EXPORT_DIR or EXPORT_DIR/<version>)."""
    vdir = resolve_version(path)
    meta = vdir / "assets" / META_FILE
    if not meta.is_file():
        raise ModelError(f"{vdir}: no assets/{META_FILE}; not exported by `python -m xmdl_tf.export`")
    found = _read_json(meta, "export the model again")
    if not isinstance(found, dict):
        raise ModelError(f"{meta}: expected a JSON object, got {type(found).__name__}; export the model again")
    return found


def _read_json(path: Path, advice: str):
    """The JSON in `path`; ModelError naming the file when it is not JSON (empty, truncated, binary)."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ModelError(f"{path}: not valid JSON ({cli.one_line(err)}); {advice}") from None


@dataclass
class SavedModelPredictor(Predictor):
    """A `Predictor` over an exported SavedModel: the same tiling, calling the `*_normalized` signatures.

    `model` is the object returned by tf.saved_model.load; `meta` is assets/xmdl.json.
    """

    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        import tensorflow as tf

        predict = self.model.signatures["predict_normalized"]
        self._fn = lambda x: predict(images=tf.constant(self._checked(x, 1)))["probabilities"]

    @property
    def gradcam_layer(self) -> str:
        return self.meta["gradcam_layer"]

    def _explainer(self, layer: str) -> Callable:
        import tensorflow as tf

        from .gradcam import GradCamError

        if layer != self.gradcam_layer:
            raise GradCamError(f"{self.path}: Grad-CAM was exported for layer {self.gradcam_layer!r} only; "
                               f"re-export with --gradcam-layer {layer} to explain {layer!r}")
        explain = self.model.signatures["explain_normalized"]

        def fn(x: np.ndarray):
            out = explain(images=tf.constant(self._checked(x, 2)))
            return tf.concat([out["probabilities"], out["cam"][..., None]], axis=-1)

        return fn

    def ood_file(self) -> Path | None:
        """assets/ood.npz of an export that serves `ood_features` (`ood.model_distribution` reads it)."""
        from .ood import OOD_FILE

        path = Path(self.path) / "assets" / OOD_FILE
        return path if OOD_SIGNATURE[0] in self.model.signatures and path.is_file() else None

    def ood_feature_function(self, layers: tuple[str, ...], stats: str) -> Callable:
        """(n, t, t, 1) normalised tiles -> (n, D) float64, by the `ood_features` signature."""
        import tensorflow as tf

        exported = self.meta.get("ood") or {}
        if (tuple(exported.get("layers", ())), exported.get("stats")) != (tuple(layers), stats):
            raise ModelError(f"{self.path}: the export serves OOD features of {exported.get('layers')} "
                             f"({exported.get('stats')}), not of {list(layers)} ({stats})")
        fn = self.model.signatures[OOD_SIGNATURE[0]]
        return lambda x: np.asarray(fn(images=tf.constant(self._checked(x, 1)))["features"], np.float64)

    def _checked(self, x: np.ndarray, channels: int) -> np.ndarray:
        """Refuse, before TensorFlow sees them, tiles the signatures cannot take."""
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[-1] != channels:
            raise ValueError(f"expected normalised tiles of shape (n, h, w, {channels}), got {x.shape}")
        if x.shape[1] % self.size_divisor or x.shape[2] % self.size_divisor:
            raise ValueError(f"tile size {x.shape[1:3]} is not a multiple of the size divisor {self.size_divisor}")
        if not np.issubdtype(x.dtype, np.floating):
            raise ValueError(f"expected float tiles normalised to [0, 1], got dtype {x.dtype}")
        if not len(x):
            raise ValueError("empty batch: no tile to predict")
        if x.shape[0] * x.shape[1] * x.shape[2] > MAX_REQUEST_PIXELS:
            raise ValueError(f"{x.shape[0]} tiles of {x.shape[1]}x{x.shape[2]} exceed the export's "
                             f"{MAX_REQUEST_PIXELS} pixels per request; use smaller tiles or batches")
        return x.astype(np.float32, copy=False)


def load_saved_model(path: str | Path, tta: bool = False) -> SavedModelPredictor:
    """Load an export (EXPORT_DIR, highest version, or EXPORT_DIR/<version>) as a Predictor."""
    import tensorflow as tf

    vdir = resolve_version(path)
    meta = read_metadata(vdir)
    try:
        loaded = tf.saved_model.load(str(vdir))
    except Exception as err:  # noqa: BLE001 - TensorFlow raises anything from a damaged graph or variables
        what = " ".join(str(err).split())[:160]
        raise ModelError(f"{vdir}: damaged export, TensorFlow cannot load it ({type(err).__name__}: {what}); "
                         "export the model again") from None
    missing = [s for s in TILE_SIGNATURES if s not in loaded.signatures]
    if missing:
        raise ModelError(f"{vdir}: SavedModel lacks the signature(s) {missing}; re-export with this xmdl_tf")
    config = Config.from_dict(meta["config"], source=f"{vdir}/assets/{META_FILE}")
    return SavedModelPredictor(loaded, config, vdir, jit_compile=False, tta=tta, meta=meta)


# ----------------------------------------------------------------------------
# CLI


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.parser("python -m xmdl_tf.export", __doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="run folder, .keras file or built-in name (default: the built-in reference model)")
    p.add_argument("--out", required=True, metavar="EXPORT_DIR",
                   help="tfserving: base folder, writes EXPORT_DIR/<version>/; bioimageio: the package folder")
    p.add_argument("--format", choices=("tfserving", "bioimageio"), default="tfserving",
                   help="TF Serving SavedModel, or a BioImage Model Zoo package (bioimage.io spec 0.5)")
    p.add_argument("--no-test", action="store_true",
                   help="bioimageio: skip bioimageio.core's model test (the format check still runs)")
    p.add_argument("--overwrite", action="store_true", help="bioimageio: replace an existing package folder")
    p.add_argument("--version", type=cli.positive_int, default=None, help="version number (default: 1, or the next free one)")
    p.add_argument("--gradcam-layer", default=None, help="conv layer for the explain signatures (default dec1_conv2)")
    args = p.parse_args(argv)
    if args.format == "bioimageio":
        if args.version is not None or args.gradcam_layer is not None:
            raise cli.UsageError("--version and --gradcam-layer apply to --format tfserving only")
        from .bioimage_zoo import export_bioimageio

        rdf = export_bioimageio(args.model, args.out, run_test=not args.no_test, overwrite=args.overwrite)
        print(f"wrote the bioimage.io package {rdf.parent} ({rdf.name}); checked with bioimageio.spec"
              + ("" if args.no_test else " and bioimageio.core's model test"))
        zipped, folder = shlex.quote(f"{rdf.parent.name}.zip"), shlex.quote(str(rdf.parent))
        print(f"zip it for deepImageJ or ilastik: python -m zipfile -c {zipped} {folder}/*")
        return 0
    if args.overwrite or args.no_test:
        raise cli.UsageError("--overwrite and --no-test apply to --format bioimageio only")
    from .pretrained import model_or_default

    args.model = model_or_default(args.model)
    try:
        path = export_model(args.model, args.out, args.version, args.gradcam_layer)
    except (FileExistsError, ValueError) as err:  # ModelError, GradCamError and bad versions
        print(f"error: {err}", file=sys.stderr)
        return 2
    meta = json.loads((path / "assets" / META_FILE).read_text())
    print(f"exported {args.model} -> {path}")
    print(f"signatures: {', '.join(meta['signatures'])}; Grad-CAM layer {meta['gradcam_layer']}; "
          f"size divisor {meta['size_divisor']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
