"""Segmentation Grad-CAM (Vinogradova et al. 2020) with GradientTape, and its scores.

For a region R (by default the predicted mitochondria mask) the target is

    S = sum over pixels in R of (logit_mito - logit_background)

(the log-odds of the mitochondria class, which is what softmax turns into a
probability; a raw softmax output saturates and kills the gradient). With A
the activations of the chosen layer, the channel weights are the spatial mean
of dS/dA, and the heatmap is ReLU(sum_k alpha_k A_k), upsampled to the input.
The default layer is the last decoder convolution (`dec1_conv2`), the paper's
"last convolutional layer"; any conv layer can be chosen by name
(`bottleneck_conv2` gives the coarse, context-level view).

Whole slices are explained tile by tile with the same overlapping, blended
tiling as inference; the probability map comes out of the same forward pass,
so explaining a slice costs little more than predicting it. The stitched map
is scaled to [0, 1] by its maximum over the slice.

Scores (the paper judged heatmaps by eye only): `energy_inside` is the share of
heatmap energy inside a mask; `deletion_check` blanks the most-heated pixels
and compares the loss of predicted mitochondria area with blanking as many
random pixels.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .model import DEFAULT_GRADCAM_LAYER

PREDICTED = -1.0  # region channel value meaning "explain the predicted mask"


class GradCamError(ValueError):
    pass


def explain_function(model, layer: str = DEFAULT_GRADCAM_LAYER) -> Callable:
    """The plain (untraced) Grad-CAM function behind `explainer`: (n, h, w, 2) -> (n, h, w, C + 1).

    Shared with `xmdl_tf.export`, which traces it inside the exported
    signatures, so served and local heatmaps come from the same code.
    """
    import keras
    import tensorflow as tf

    names = [l.name for l in model.layers]
    if layer not in names:
        convs = [l.name for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
        raise GradCamError(f"layer {layer!r} not in the model; convolution layers: {', '.join(convs)}")
    if "logits" not in names:
        raise GradCamError("the model has no 'logits' layer (build it with xmdl_tf.build_model)")
    # Only a layer the logits are computed from has a gradient (the softmax after them has none: every
    # image would fail deep in TensorFlow with "None values not supported").
    upstream = {l.name for l in keras.Model(model.inputs, model.get_layer("logits").output).layers}
    if layer not in upstream:
        convs = [l.name for l in model.layers if isinstance(l, (keras.layers.Conv2D, keras.layers.Conv2DTranspose))]
        raise GradCamError(f"layer {layer!r} comes after the logits: Grad-CAM needs a layer the logits are computed "
                           f"from; convolution layers: {', '.join(convs)}")
    sub = keras.Model(model.inputs, [model.get_layer(layer).output, model.get_layer("logits").output, model.output])

    def fn(x):
        image, region = x[..., :1], x[..., 1]
        with tf.GradientTape() as tape:
            acts, logits, probs = sub(image, training=False)
            tape.watch(acts)
            predicted = tf.cast(probs[..., 1] >= 0.5, tf.float32)
            mask = tf.stop_gradient(tf.where(region < 0, predicted, region))
            logits = tf.cast(logits, tf.float32)
            score = tf.reduce_sum((logits[..., 1] - logits[..., 0]) * mask)
        grads = tf.cast(tape.gradient(score, acts), tf.float32)
        acts = tf.cast(acts, tf.float32)
        alpha = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(alpha * acts, axis=-1, keepdims=True))
        cam = tf.image.resize(cam, tf.shape(image)[1:3], method="bilinear")
        return tf.concat([tf.cast(probs, tf.float32), cam], axis=-1)

    return fn


def explainer(model, layer: str = DEFAULT_GRADCAM_LAYER, jit_compile: bool = True) -> Callable:
    """A compiled function (n, h, w, 2) -> (n, h, w, C + 1).

    Input channels: the normalised image and a target region (1 inside, 0
    outside, or PREDICTED everywhere for the predicted mask). Output: the C
    class probabilities followed by the raw (unscaled, >= 0) Grad-CAM map.
    """
    import tensorflow as tf

    return tf.function(explain_function(model, layer), jit_compile=jit_compile, reduce_retracing=True)


def scale_unit(cam: np.ndarray) -> np.ndarray:
    """Raw heatmap -> float32 in [0, 1] by its maximum (all zeros stays zeros)."""
    cam = np.maximum(np.asarray(cam, np.float32), 0.0)
    peak = float(cam.max()) if cam.size else 0.0
    return cam / peak if peak > 0 else np.zeros_like(cam)


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Share of heatmap energy inside `mask` (0..1); NaN for an all-zero heatmap."""
    total = float(np.sum(cam, dtype=np.float64))
    if total <= 0:
        return float("nan")
    return float(np.sum(cam[np.asarray(mask, bool)], dtype=np.float64) / total)


def deletion_check(predict: Callable[[np.ndarray], np.ndarray], image: np.ndarray, cam: np.ndarray,
                   threshold: float = 0.5, seed: int = 0) -> dict[str, float]:
    """Faithfulness: does blanking the hottest pixels remove more mitochondria than random ones?

    predict: raw slice (H, W) -> probability (H, W). The n hottest pixels
    (n = predicted mitochondria area, at least 0.5% of the slice) are set to
    the slice median; the same n random pixels are blanked for comparison.
    All three areas (before, after heat, after random blanking) come from
    `predict`, so a probability made another way (test-time augmented, as
    `analyze`'s) cannot pass for area lost.
    Returns predicted areas (pixels) and `ratio` = area lost (heat) / area lost
    (random): NaN when nothing is predicted or neither blanking removes area,
    inf when only the heat's does (random blanking removing none, or adding area).
    """
    base = np.asarray(predict(image))
    area = int(np.count_nonzero(base >= threshold))
    n = max(area, int(0.005 * image.size), 1)
    fill = np.median(image).astype(image.dtype)
    hot = np.argpartition(np.asarray(cam).ravel(), -n)[-n:]
    rnd = np.random.default_rng(seed).choice(image.size, n, replace=False)
    lost = {}
    for name, idx in (("heat", hot), ("random", rnd)):
        blank = image.copy().ravel()
        blank[idx] = fill
        lost[name] = area - int(np.count_nonzero(predict(blank.reshape(image.shape)) >= threshold))
    heat, random = lost["heat"], lost["random"]
    if area == 0 or max(heat, random) <= 0:
        ratio = float("nan")
    elif random <= 0:
        ratio = float("inf")
    else:
        ratio = heat / random
    return {
        "pixels": n,
        "area_before": area,
        "area_lost_heat": heat,
        "area_lost_random": random,
        "ratio": float(ratio),
    }
