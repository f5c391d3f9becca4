"""The residual attention U-Net of XM-DL, built with the Keras functional API.

Layout for depth D (the paper: D = 6), filters f_i = base_filters * 2**i:

    enc1 .. enc{D-1}   conv block (f_i), then max-pool 2x2
    bottleneck         conv block (f_{D-1})
    dec{D-1} .. dec1   transposed conv 2x2 stride 2 (`dec{i}_up`), additive attention
                       gate on the skip from enc{i} (`dec{i}_att_*`), concat, conv block
    output             1x1 conv to n_classes logits, softmax (float32)

Conv block (`{stage}_conv1`, `{stage}_bn1`, `{stage}_relu1`, `{stage}_conv2`, ...):
two 3x3 conv + batch norm + ReLU; with `residual=True` a projection shortcut
(`{stage}_shortcut`, 1x1 conv + BN) is added before the second ReLU (He et
al. 2016). The attention gate follows Oktay et al. 2018 (additive attention),
evaluated at the skip's resolution after the transposed convolution so that
the gating signal and the skip align pixel for pixel. Layer names are stable
so Grad-CAM can pick a layer by name (default `dec1_conv2`).

With `input_blur` > 0 the normalised image first passes a fixed Gaussian
low-pass (`InputBlur`, no weights): the network then never sees detail finer
than about that many pixels, in training and at inference alike, however sharp
the microscope (see the leave-one-set-out study in models/README.md).

The model is fully convolutional: input (None, None, 1); height and width
must be multiples of 2**(D-1).
"""
from __future__ import annotations

import math

import keras
import numpy as np
from keras import layers, ops

from .config import ModelConfig

# ----------------------------------------------------------------------------
# Layers (tensor -> tensor blocks)

# Moving statistics follow the data within tens of steps instead of hundreds
# (Keras' 0.99): with few slices and short epochs, validation otherwise runs on
# stale batch statistics. Same value as PyTorch's default (momentum 0.1).
BN_MOMENTUM = 0.9


def conv_block(x, filters: int, stage: str, residual: bool = True, dropout: float = 0.0):
    """Two 3x3 conv-BN-ReLU; optionally residual. (B, H, W, C) -> (B, H, W, filters)."""
    shortcut = x
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{stage}_conv1")(x)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{stage}_bn1")(y)
    y = layers.Activation("relu", name=f"{stage}_relu1")(y)
    if dropout:
        y = layers.SpatialDropout2D(dropout, name=f"{stage}_dropout")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal", name=f"{stage}_conv2")(y)
    y = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{stage}_bn2")(y)
    if residual:
        if shortcut.shape[-1] != filters:
            shortcut = layers.Conv2D(filters, 1, use_bias=False, kernel_initializer="he_normal", name=f"{stage}_shortcut")(shortcut)
            shortcut = layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{stage}_shortcut_bn")(shortcut)
        y = layers.Add(name=f"{stage}_add")([y, shortcut])
    return layers.Activation("relu", name=f"{stage}_relu2")(y)


def attention_gate(skip, gate, inter_filters: int, stage: str):
    """Additive attention: skip * sigmoid(psi(relu(W_x skip + W_g gate))).

    skip, gate: (B, H, W, C_s), (B, H, W, C_g) at the same resolution.
    Returns the gated skip (B, H, W, C_s); the map itself is layer `{stage}_att_coef`.
    """
    theta = layers.Conv2D(inter_filters, 1, use_bias=False, name=f"{stage}_att_theta")(skip)
    phi = layers.Conv2D(inter_filters, 1, use_bias=True, name=f"{stage}_att_phi")(gate)
    f = layers.Activation("relu", name=f"{stage}_att_relu")(layers.Add(name=f"{stage}_att_add")([theta, phi]))
    psi = layers.Conv2D(1, 1, use_bias=True, name=f"{stage}_att_psi")(f)
    coef = layers.Activation("sigmoid", name=f"{stage}_att_coef")(psi)
    return layers.Multiply(name=f"{stage}_att_gate")([skip, coef])


@keras.saving.register_keras_serializable(package="xmdl_tf")
class InputBlur(layers.Layer):
    """Fixed Gaussian low-pass, (B, H, W, C) -> (B, H, W, C); `sigma` in pixels.

    Separable, with reflected borders so that a tile's edge keeps its grey
    level (zero padding would darken it). Needs H and W > 3 * sigma.
    """

    def __init__(self, sigma: float, **kwargs):
        super().__init__(**kwargs)
        if not sigma > 0:
            raise ValueError(f"InputBlur sigma must be > 0, got {sigma}")
        self.sigma = float(sigma)
        self.radius = max(1, math.ceil(3 * self.sigma))
        x = np.arange(-self.radius, self.radius + 1, dtype=np.float64)
        g = np.exp(-0.5 * (x / self.sigma) ** 2)
        self.kernel_1d = (g / g.sum()).astype(np.float32)

    def call(self, x):
        r = self.radius
        channels = x.shape[-1] or 1
        k = ops.cast(ops.convert_to_tensor(self.kernel_1d), x.dtype)
        x = ops.pad(x, [[0, 0], [r, r], [r, r], [0, 0]], mode="reflect")
        x = ops.depthwise_conv(x, ops.tile(ops.reshape(k, (1, -1, 1, 1)), (1, 1, channels, 1)), padding="valid")
        return ops.depthwise_conv(x, ops.tile(ops.reshape(k, (-1, 1, 1, 1)), (1, 1, channels, 1)), padding="valid")

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma}


@keras.saving.register_keras_serializable(package="xmdl_tf")
class MixStyle(layers.Layer):
    """Feature-statistics mixing (MixStyle, Zhou et al. 2021), (B, H, W, C) -> (B, H, W, C).

    In training each tile, with probability `p`, has its per-channel mean and
    standard deviation over the tile replaced by a random mix (weight ~ Beta(alpha,
    alpha)) of its own and another tile's of the batch: the network meets feature
    "styles" between those of the microscopes in the batch. The statistics carry
    no gradient, as in the paper. Identity at inference, so a saved or exported
    model computes exactly what one without the layer would.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= p <= 1 or not alpha > 0:
            raise ValueError(f"MixStyle needs 0 <= p <= 1 and alpha > 0, got p={p}, alpha={alpha}")
        self.p, self.alpha, self.seed = float(p), float(alpha), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=None):
        if not training or self.p == 0:
            return x
        dtype = x.dtype
        x = ops.cast(x, "float32")  # statistics in float32 under mixed precision
        batch = ops.shape(x)[0]
        mu = ops.stop_gradient(ops.mean(x, axis=(1, 2), keepdims=True))
        sigma = ops.stop_gradient(ops.sqrt(ops.var(x, axis=(1, 2), keepdims=True) + 1e-6))
        lam = keras.random.beta((batch, 1, 1, 1), self.alpha, self.alpha, seed=self.seed_generator)
        chosen = keras.random.uniform((batch, 1, 1, 1), seed=self.seed_generator) < self.p
        lam = ops.where(chosen, lam, ops.ones_like(lam))  # unchosen tiles keep their own statistics
        other = keras.random.shuffle(ops.arange(batch), seed=self.seed_generator)
        mu_mix = lam * mu + (1 - lam) * ops.take(mu, other, axis=0)
        sigma_mix = lam * sigma + (1 - lam) * ops.take(sigma, other, axis=0)
        return ops.cast((x - mu) / sigma * sigma_mix + mu_mix, dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "p": self.p, "alpha": self.alpha, "seed": self.seed}


# ----------------------------------------------------------------------------
# Functional model

# MixStyle follows the first encoder levels, where a feature's statistics are its
# "style" (grain, contrast); deeper ones carry content (the paper's choice, too).
MIXSTYLE_LEVELS = 3


def build_model(depth: int = 6, base_filters: int = 8, residual: bool = True, attention: bool = True,
                n_classes: int = 2, dropout: float = 0.0, name: str | None = None,
                input_blur: float = 0.0, mixstyle: float = 0.0) -> keras.Model:
    """Build the (residual) (attention) U-Net.

    Returns a keras.Model mapping float32 (B, H, W, 1) normalised images to
    (B, H, W, n_classes) softmax probabilities (float32 even under mixed
    precision). Channel 1 is the mitochondria class when n_classes == 2.
    residual=False, attention=False gives the plain U-Net of the ablation;
    input_blur > 0 puts a fixed Gaussian low-pass of that sigma (pixels) first;
    mixstyle > 0 mixes feature statistics between the tiles of a training batch
    with that probability after the first `MIXSTYLE_LEVELS` encoder levels
    (`MixStyle`; identity at inference).
    """
    if depth < 2:
        raise ValueError(f"depth must be >= 2, got {depth}")
    if base_filters < 1 or n_classes < 2:
        raise ValueError("base_filters must be >= 1 and n_classes >= 2")
    if input_blur < 0:
        raise ValueError(f"input_blur must be >= 0, got {input_blur}")
    if not 0 <= mixstyle <= 1:
        raise ValueError(f"mixstyle must be a probability in [0, 1], got {mixstyle}")
    cfg = ModelConfig(depth, base_filters, residual, attention, n_classes, dropout, input_blur, mixstyle)
    inputs = keras.Input((None, None, 1), name="image")
    x = InputBlur(input_blur, name="input_blur")(inputs) if input_blur else inputs
    skips = []
    for i in range(1, depth):
        x = conv_block(x, base_filters * 2 ** (i - 1), f"enc{i}", residual)
        if mixstyle and i <= MIXSTYLE_LEVELS:
            x = MixStyle(mixstyle, name=f"enc{i}_mixstyle")(x)
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"enc{i}_pool")(x)
    x = conv_block(x, base_filters * 2 ** (depth - 1), "bottleneck", residual, dropout)
    for i in range(depth - 1, 0, -1):
        filters = base_filters * 2 ** (i - 1)
        up = layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"dec{i}_up")(x)
        skip = skips[i - 1]
        if attention:
            skip = attention_gate(skip, up, max(filters // 2, 1), f"dec{i}")
        x = layers.Concatenate(name=f"dec{i}_concat")([up, skip])
        x = conv_block(x, filters, f"dec{i}", residual)
    logits = layers.Conv2D(n_classes, 1, name="logits")(x)
    outputs = layers.Activation("softmax", dtype="float32", name="softmax")(logits)
    return keras.Model(inputs, outputs, name=name or f"xmdl_{cfg.variant}_d{depth}_f{base_filters}")


def build_from_config(cfg: ModelConfig) -> keras.Model:
    return build_model(cfg.depth, cfg.base_filters, cfg.residual, cfg.attention, cfg.n_classes, cfg.dropout,
                       input_blur=cfg.input_blur, mixstyle=cfg.mixstyle)


def float32_copy(model: keras.Model) -> keras.Model:
    """The same network with every layer computing in float32, weights copied (no optimizer).

    Mixed precision (bfloat16 on AMX CPUs, float16 on GPUs) is a training-speed
    choice: the model that ships, is exported and is served computes in float32,
    so its predictions do not depend on the precision it happened to be trained in.
    The variables of a mixed-precision model are float32 already, so nothing is rounded.
    """
    def clone(layer):
        cfg = layer.get_config()
        cfg["dtype"] = "float32"
        return layer.__class__.from_config(cfg)

    copy = keras.models.clone_model(model, clone_function=clone)
    # clone_model also compiles the copy like the original (Keras >= 3.15), which would
    # save the optimizer state with it (three times the weights); a new functional
    # model over the cloned layers is uncompiled.
    # (Single tensors, not one-element lists: the model must keep returning a tensor.)
    copy = keras.Model(_single(copy.inputs), _single(copy.outputs), name=copy.name)
    copy.set_weights(model.get_weights())
    return copy


def _single(tensors: list):
    return tensors[0] if len(tensors) == 1 else tensors


DEFAULT_GRADCAM_LAYER = "dec1_conv2"


def conv_layer_names(model: keras.Model) -> list[str]:
    """Names of every convolution layer (valid Grad-CAM targets), input to output."""
    return [l.name for l in model.layers if isinstance(l, (layers.Conv2D, layers.Conv2DTranspose))]
