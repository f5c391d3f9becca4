"""Configuration dataclasses for data, model and training, and `config.json` I/O.

Every trained model folder holds a `config.json` next to `model.keras`, so
prediction, evaluation and export never restate the architecture or the
normalisation. Unknown keys are rejected: a typo in a hand-edited config must
fail loudly instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class DataConfig:
    """How tiles are drawn from slices.

    tile_size: tile height and width in pixels (must be divisible by 2**(depth-1)).
    tiles_per_slice: random crops drawn from a slice each time it is decoded.
    foreground_fraction: minimum expected share of training tiles centred on a
        mitochondrion pixel (0 = uniform random crops, the default).
    ignore_value: label value marking unlabelled pixels that the loss ignores
        (sparse annotation); None means every pixel is labelled.
    shuffle_buffer: tiles mixed together before they are batched; the tiles of
        shuffle_buffer // tiles_per_slice slices are shuffled as one group.
    pixel_size_nm: the model's pixel size in nm (training slices of known pixel
        size are resampled to it on the fly), or None if unknown.
    set_weights: share of the training tiles drawn from each data set, in the
        order the sets are given (normalised to sum 1); None = equal shares,
        however many slices each set has.
    """

    tile_size: int = 256
    tiles_per_slice: int = 8
    foreground_fraction: float = 0.0
    augment: bool = True
    shuffle_buffer: int = 64
    ignore_value: int | None = None
    pixel_size_nm: float | None = None
    set_weights: tuple[float, ...] | None = None

    def __post_init__(self):
        from .cli import PIXEL_SIZE_RANGE_NM

        lo, hi = PIXEL_SIZE_RANGE_NM
        # 0 (written by older versions) means unknown, like None.
        if self.pixel_size_nm and not lo <= self.pixel_size_nm <= hi:
            raise ValueError(f"pixel size {self.pixel_size_nm:g} nm is outside the plausible range {lo:g}-{hi:g} nm "
                             "for EM (a unit mistake? nm per pixel)")
        problems = [f"{k} {getattr(self, k)!r} must be a whole number >= 1" for k in ("tile_size", "tiles_per_slice")
                    if not _whole(getattr(self, k), 1)]
        if not _number_in(self.foreground_fraction, 0, 1):
            problems.append(f"foreground_fraction {self.foreground_fraction!r} must be between 0 and 1")
        if not _whole(self.shuffle_buffer, 0):
            problems.append(f"shuffle_buffer {self.shuffle_buffer!r} must be a whole number >= 0")
        if self.ignore_value is not None and not _whole(self.ignore_value, 0):
            problems.append(f"ignore_value {self.ignore_value!r} must be a label value >= 0 (or None)")
        w = self.set_weights
        if w is not None and not (isinstance(w, (tuple, list)) and w and all(_number_in(v, 0, math.inf) for v in w)
                                  and sum(w) > 0):
            problems.append(f"set_weights {w!r} must be weights >= 0 with a positive sum (or None)")
        _refuse("data settings", problems)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation (see `xmdl_tf.augment`); ranges are at strength 1.

    Geometry (image and label together, one resampling per tile):
      rotate: "any" (continuous angle + mirror) or "90" (dihedral group only).
      scale: (min, max) random zoom, log-uniform; (1, 1) = none. Tolerates
          unknown or wrong pixel sizes. 0.5-2 (was 0.7-1.4) raised the
          leave-one-set-out zero-shot F1 by 0.08; 0.35-2.8 lowered it by 0.08
          (models/README.md).
      elastic: amplitude (model pixels) of a smooth random displacement field; 0 = none.
    Intensity (image only, on the normalised [0, 1] image):
      blur: largest defocus sigma (pixels), applied to half the tiles.
      sharpen: largest unsharp-mask amount (sigma 1-2 px), applied to the other
          half: images crisper than the training data's (0 = off, the "em"
          default: amount 1 lowered the leave-one-set-out zero-shot mean by
          0.05 in one draw; models/README.md).
      texture: probability of a random texture (a random shallow convolutional
          network, as GIN of Ouyang et al. 2022, kept to the tile's polarity, mean
          and spread, and mixed with the tile at a random weight): grain, edges
          and fine detail of microscopes the training data lacks (0 = off, the
          "em" default: 0.5 left the leave-one-set-out zero-shot mean where it
          was, 0.590 against 0.600, in one draw; models/README.md).
      contrast, gamma: largest |log| factor; brightness: largest shift.
      noise: largest Gaussian noise sigma; poisson: probability of shot noise
          at a random dose (10-300 counts at full scale).
      stripes: probability of section / scan stripes (row or column offsets).
      illumination: largest amplitude of a smooth multiplicative shading field.
    strength: multiplies every intensity range (2 = heavy, as for fine-tuning).
    """

    rotate: str = "any"
    scale: tuple[float, float] = (0.5, 2.0)
    elastic: float = 2.0
    blur: float = 2.0
    sharpen: float = 0.0
    texture: float = 0.0
    contrast: float = 0.4
    brightness: float = 0.12
    gamma: float = 0.5
    noise: float = 0.04
    poisson: float = 0.3
    stripes: float = 0.2
    illumination: float = 0.25
    strength: float = 1.0

    COMPONENTS = ("rotate", "scale", "elastic", "blur", "sharpen", "texture", "contrast", "brightness", "gamma",
                  "noise", "poisson", "stripes", "illumination")

    def __post_init__(self):
        problems = []
        if self.rotate not in ("any", "90"):
            problems.append(f"rotate {self.rotate!r} must be 'any' or '90'")
        s = self.scale
        if not (isinstance(s, (tuple, list)) and len(s) == 2 and all(_number_in(v, 0, math.inf) for v in s)
                and 0 < s[0] <= s[1]):
            problems.append(f"scale {s!r} must be (min, max) zoom with 0 < min <= max")
        for k in ("elastic", "blur", "sharpen", "contrast", "brightness", "gamma", "noise", "illumination", "strength"):
            if not _number_in(getattr(self, k), 0, math.inf):
                problems.append(f"{k} {getattr(self, k)!r} must be a number >= 0")
        for k in ("texture", "poisson", "stripes"):
            if not _number_in(getattr(self, k), 0, 1):
                problems.append(f"{k} {getattr(self, k)!r} must be a probability between 0 and 1")
        _refuse("augmentation settings", problems)

    @classmethod
    def preset(cls, name: str) -> "AugmentConfig":
        """"em" (the default: ranges spanning TEM, SBEM and FIB-SEM) or "basic"
        (flips, 90-degree rotations, mild blur and intensity jitter: the recipe of
        the first reference model)."""
        if name == "em":
            return cls()
        if name == "basic":
            return cls(rotate="90", scale=(1.0, 1.0), elastic=0.0, blur=1.2, contrast=0.2, brightness=0.08,
                       gamma=0.3, noise=0.02, poisson=0.0, stripes=0.0, illumination=0.0)
        raise ValueError(f"unknown augmentation preset {name!r}; choose 'em' or 'basic'")

    def without(self, *components: str) -> "AugmentConfig":
        """A copy with the named components switched off (for the augmentation study)."""
        off = {"rotate": "90", "scale": (1.0, 1.0)}
        for c in components:
            if c not in self.COMPONENTS:
                raise ValueError(f"unknown augmentation component {c!r}; choose from {', '.join(self.COMPONENTS)}")
        return dataclasses.replace(self, **{c: off.get(c, 0.0) for c in components})


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the residual attention U-Net (see `xmdl_tf.model`).

    input_blur: sigma (model pixels) of a fixed Gaussian low-pass in front of
        the network, 0 = none; part of the saved graph, so every consumer
        (analyze, export, serving) applies it. Off in the shipped model: sigma 2
        lifted the zero-shot Drosophila set and lowered Lucchi++ more in the
        leave-one-set-out study (models/README.md).
    mixstyle: probability that a training tile's feature statistics after each of
        the first three encoder levels are mixed with another tile's of the batch
        (MixStyle, Zhou et al. 2021; identity at inference), 0 = off (the
        default: 0.5 lowered the leave-one-set-out zero-shot mean 0.600 -> 0.514
        in one draw, Lucchi++ over-segmented; models/README.md).
    """

    depth: int = 6
    base_filters: int = 8
    residual: bool = True
    attention: bool = True
    n_classes: int = 2
    dropout: float = 0.0
    input_blur: float = 0.0
    mixstyle: float = 0.0

    @property
    def size_divisor(self) -> int:
        """Height and width of inputs must be multiples of this (2**(depth-1))."""
        return 2 ** (self.depth - 1)

    @property
    def variant(self) -> str:
        return variant_name(self.residual, self.attention)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation recipe (paper defaults: Adam 1e-3, Dice loss, patience 5)."""

    epochs: int = 50
    batch_size: int = 8
    learning_rate: float = 1e-3
    patience: int = 5
    # "constant" (the paper), or "cosine": lr * (1 + cos(pi * epoch / epochs)) / 2,
    # a function of the epoch only, so a resumed run continues it exactly.
    lr_schedule: str = "constant"
    loss: str = "dice"  # "dice" or "dice_ce"
    steps_per_epoch: int | None = None
    # Without steps_per_epoch: one pass over the training slices' tiles, but at least this many
    # steps. `finetune` sets 40: one pass over one slice is 1-2 steps, and EarlyStopping on such
    # epochs ended runs on the noise of a validation carved from the same slices (models/README.md,
    # "Adapting to a new stack").
    min_steps_per_epoch: int = 1
    seed: int = 0
    mixed_precision: bool | str = False  # False, "float16" (True in old configs) or "bfloat16"
    # "auto": XLA on GPUs only. On CPU, XLA measured 2x slower for this model
    # (benchmarks/bench_training.py: 5.9 vs 11.7 tiles/s on 2 cores).
    jit_compile: bool | str = "auto"
    # Exponential moving average of the weights (decay per training step; 0 = off):
    # validation, EarlyStopping and the saved model use the average, not the last
    # step's weights (weight averaging, as in SWA/SWAD, seeks the flatter minima that
    # transfer better to unseen domains; models/README.md measures it).
    weight_average: float = 0.0

    def __post_init__(self):
        if self.min_steps_per_epoch < 1:
            raise ValueError(f"min_steps_per_epoch must be >= 1, got {self.min_steps_per_epoch}")
        if not 0 <= self.weight_average < 1:
            raise ValueError(f"weight_average is a decay per step, 0 <= decay < 1; got {self.weight_average}")
        # What train() would otherwise find out only after creating the run folder (or never: a
        # learning rate of 0 or below trains nothing, or climbs the loss).
        problems = [f"{k} {getattr(self, k)!r} must be a whole number >= 1" for k in ("epochs", "batch_size")
                    if not _whole(getattr(self, k), 1)]
        if not _number_in(self.learning_rate, 0, math.inf) or self.learning_rate == 0:
            problems.append(f"learning_rate {self.learning_rate!r} must be a number above 0")
        if not _whole(self.patience, 0):
            problems.append(f"patience {self.patience!r} must be a whole number >= 0")
        if self.steps_per_epoch is not None and not _whole(self.steps_per_epoch, 1):
            problems.append(f"steps_per_epoch {self.steps_per_epoch!r} must be a whole number >= 1 (or None: "
                            "one pass over the training slices)")
        if not _whole(self.seed, 0) or self.seed >= 2 ** 32:
            problems.append(f"seed {self.seed!r} must be a whole number from 0 to 2**32 - 1")
        if self.loss not in LOSSES:
            problems.append(f"loss {self.loss!r} must be one of {LOSSES}")
        if self.lr_schedule not in LR_SCHEDULES:
            problems.append(f"lr_schedule {self.lr_schedule!r} must be one of {LR_SCHEDULES}")
        if self.mixed_precision not in (False, True, None, "", "float32", "float16", "bfloat16"):
            problems.append(f"mixed_precision {self.mixed_precision!r} must be false, 'float16' or 'bfloat16'")
        _refuse("training settings", problems)


LOSSES = ("dice", "dice_ce")  # TrainConfig.loss
LR_SCHEDULES = ("constant", "cosine")  # TrainConfig.lr_schedule


def _whole(value, least: int) -> bool:
    """`value` is a whole number (Python or NumPy, not a bool) >= least."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def _number_in(value, lo: float, hi: float) -> bool:
    """`value` is a finite real number (Python or NumPy, not a bool) in [lo, hi] (hi may be inf)."""
    return (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
            and lo <= value <= hi)


def _refuse(what: str, problems: list[str]) -> None:
    if problems:
        raise ValueError(f"{what}: " + "; ".join(problems))


def check_model_config(model: "ModelConfig") -> None:
    """ValueError (one line) for an architecture no network can be built from. Called by `train` before
    anything is written; not in `ModelConfig` itself, whose graph-inferred copies of foreign `.keras`
    files (`predict.load_keras_with_config`) must still load far enough to be refused with a clear reason."""
    problems = []
    if not _whole(model.depth, 2):
        problems.append(f"depth {model.depth!r} must be a whole number >= 2")
    if not _whole(model.base_filters, 1):
        problems.append(f"base_filters {model.base_filters!r} must be a whole number >= 1")
    if not _whole(model.n_classes, 2):
        problems.append(f"n_classes {model.n_classes!r} must be a whole number >= 2")
    if not _number_in(model.dropout, 0, 1) or model.dropout == 1:
        problems.append(f"dropout {model.dropout!r} must be >= 0 and below 1")
    if not _number_in(model.mixstyle, 0, 1):
        problems.append(f"mixstyle {model.mixstyle!r} must be a probability between 0 and 1")
    if not _number_in(model.input_blur, 0, math.inf):
        problems.append(f"input_blur {model.input_blur!r} must be a sigma >= 0")
    _refuse("model settings", problems)


ZOOM_SEARCH = ("off", "always", "ood")  # InferenceConfig.zoom_search


@dataclass(frozen=True)
class InferenceConfig:
    """How a trained model is applied to whole slices and its output post-processed.

    Stored in config.json (and the export's metadata) so `analyze`, `evaluate`
    and the benchmarks apply a model the same way; their flags override it.
    tile, overlap: largest inference tile and least overlap between tiles (px,
        at the model's pixel size); 64 px keeps stitched masks within 0.5% of
        one-pass ones (benchmarks/bench_inference.py).
    batch_size: tiles per call; None = by tile size.
    tta: average the 8 flips/rotations (8x the compute).
    threshold: foreground is probability >= threshold.
    min_area_nm2 / min_size_px: smallest object kept, in nm^2 when the pixel
        size is known, else in pixels.
    min_volume_nm3 / min_volume_vox: the same for 3-D objects (`analyze --volume`).
    separate: split touching mitochondria at necks.
    rescale: resample inputs of known pixel size to the model's.
    gradcam_layer: conv layer explained (None = dec1_conv2).
    auto_zoom: for a slice of unknown pixel size, estimate the zoom that brings its
        mitochondria to the widths the model knows (`xmdl_tf.autoscale`); needs
        object_width_px and a model pixel size (models/README.md, "Auto zoom").
    object_width_px: (smallest, largest) median width, in model pixels, of the
        objects the model predicts on its validation sets (`python -m xmdl_tf.tune`
        measures it); None = unknown, no auto zoom.
    zoom_search: "off", "always" or "ood": instead of auto zoom, predict each slice
        (a crop of it) at zooms x0.5-2 of the grid its pixel size asks for (its own
        grid when unknown; known pixel sizes too) and keep the zoom at which the model
        is surest of what it marks (`autoscale.search_zoom`); "ood" (default): only for
        slices the model's out-of-distribution score warns about (models/README.md, "Zoom search").
    """

    tile: int = 2048
    overlap: int = 64
    batch_size: int | None = None
    tta: bool = False
    threshold: float = 0.5
    min_area_nm2: float = 5_000.0  # ~80 nm across: below the smallest mitochondrial profiles in EM
    min_size_px: int = 30
    # A sphere ~80 nm across, the 2-D minimum's width: smaller is speckle, not a mitochondrion.
    min_volume_nm3: float = 250_000.0
    min_volume_vox: int = 100
    separate: bool = True
    rescale: bool = True
    gradcam_layer: str | None = None
    auto_zoom: bool = True
    object_width_px: tuple[float, float] | None = None
    # "ood": on two draws of leave-one-set-out models the surest zoom lifted the zero-shot val mean
    # (+0.08, +0.04) and, searched only where the OOD score warns, left the seen sets as they were.
    zoom_search: str = "ood"

    def __post_init__(self):
        problems = []
        if isinstance(self.zoom_search, bool):  # a bare switch reads as on / off
            object.__setattr__(self, "zoom_search", "always" if self.zoom_search else "off")
        if self.zoom_search not in ZOOM_SEARCH:
            problems.append(f"zoom_search {self.zoom_search!r} must be one of {ZOOM_SEARCH}")
        w = self.object_width_px
        if w is not None and not (isinstance(w, (tuple, list)) and len(w) == 2
                                  and all(isinstance(v, (int, float)) for v in w) and 0 < w[0] <= w[1]):
            problems.append(f"object_width_px {w} must be (smallest, largest) with 0 < smallest <= largest")
        if self.tile < 1:
            problems.append(f"tile {self.tile} must be positive")
        if self.overlap < 0:  # (tiling caps it at half a tile)
            problems.append(f"overlap {self.overlap} must be >= 0")
        if self.batch_size is not None and self.batch_size < 1:
            problems.append(f"batch_size {self.batch_size} must be positive")
        if not 0 < self.threshold < 1:
            problems.append(f"threshold {self.threshold} must be between 0 and 1")
        if min(self.min_area_nm2, self.min_size_px, self.min_volume_nm3, self.min_volume_vox) < 0:
            problems.append("minimum object sizes must be >= 0")
        if problems:
            raise ValueError("inference settings: " + "; ".join(problems))

    def min_size(self, pixel_size_nm: float | None) -> int:
        """Smallest object in pixels at `pixel_size_nm` (min_size_px when unknown)."""
        if not pixel_size_nm:
            return self.min_size_px
        from .instances import min_size_px_from_area

        return min_size_px_from_area(self.min_area_nm2, pixel_size_nm)

    def min_volume(self, voxel_size_nm: "tuple[float, float, float] | None") -> int:
        """Smallest 3-D object in voxels at `voxel_size_nm` (z, y, x) (min_volume_vox when unknown)."""
        if not voxel_size_nm:
            return self.min_volume_vox
        from .instances3d import min_volume_vox

        return min_volume_vox(self.min_volume_nm3, voxel_size_nm)


def resolve_inference(predictor, inference: "InferenceConfig | dict | None" = None, **overrides) -> InferenceConfig:
    """The InferenceConfig to apply with `predictor`: a whole `inference` as given, else the
    model's own (config.json "inference"; the built-in defaults for objects without a config)
    with the fields of an `inference` dict replaced; `overrides` are applied last."""
    if isinstance(inference, InferenceConfig):
        return dataclasses.replace(inference, **overrides)
    config = getattr(predictor, "config", None)
    base = config.inference if config is not None else InferenceConfig()
    return dataclasses.replace(base, **{**(inference or {}), **overrides})


VARIANTS = {
    "unet": (False, False),
    "residual": (True, False),
    "attention": (False, True),
    "residual_attention": (True, True),
}


def resolve_jit(jit_compile: bool | str | None) -> bool:
    """True/False as given; "auto" (or None) means: on TensorFlow, XLA when a GPU is
    present; on JAX always (uncompiled JAX is many times slower); on PyTorch never."""
    if jit_compile in ("auto", None):
        import keras

        backend = keras.backend.backend()
        if backend == "jax":
            return True
        if backend != "tensorflow":
            return False
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    return bool(jit_compile)


def variant_name(residual: bool, attention: bool) -> str:
    for name, flags in VARIANTS.items():
        if flags == (residual, attention):
            return name
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Config:
    """Everything needed to rebuild, feed and describe a trained model."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    normalization: dict = field(default_factory=lambda: dict(NORMALIZATION))
    # Free-form provenance: data paths, versions, lineage, timing.
    info: dict = field(default_factory=dict)
    # Fitted after training by `python -m xmdl_tf.calibrate` (temperature, object
    # confidence, OOD threshold); empty until then.
    calibration: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write config.json atomically (a kill mid-write never leaves half a file)."""
        from .runlock import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Config":
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, source)
        sub = {}
        for name, klass in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig),
                            ("augment", AugmentConfig), ("inference", InferenceConfig)):
            part = d.get(name, {})
            _check_keys(part, {f.name for f in dataclasses.fields(klass)}, f"{source}[{name!r}]")
            _check_types(part, klass, f"{source}[{name!r}]")
            # JSON has no tuples: restore them so configs compare equal after a round trip.
            try:
                sub[name] = klass(**{k: tuple(v) if isinstance(v, list) else v for k, v in part.items()})
            except (TypeError, ValueError) as err:  # name the file: a hand-edited config.json is the usual cause
                raise ValueError(f"{source}[{name!r}]: {err}") from None
        for name in ("info", "calibration"):
            if not isinstance(d.get(name, {}), dict):
                raise ValueError(f"{source}[{name!r}]: expected a JSON object, got {type(d[name]).__name__}")
        return cls(
            **sub,
            normalization=check_normalization(d.get("normalization", dict(NORMALIZATION)),
                                              f"{source}['normalization']"),
            info=d.get("info", {}),
            calibration=d.get("calibration", {}),
        )

    @classmethod
    def load(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: config.json not found (every model folder needs one)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from None
        return cls.from_dict(d, source=str(path))


# Intensity normalisation, recorded in every config so export and inference
# reproduce exactly what training saw (see `xmdl_tf.data.normalize`).
NORMALIZATION = {"method": "percentile", "low": 1.0, "high": 99.8, "clip": True}
# "percentile": linear between the low and high percentiles of each slice (the
# default); "equalize": each grey value's mid-rank in its slice's histogram,
# blind to any monotone change of contrast (a leave-one-set-out arm).
NORMALIZATION_METHODS = ("percentile", "equalize")


def check_normalization(normalization: dict, source: str = "normalization") -> dict:
    """The stored normalisation settings, checked; raises ValueError naming `source` and the problem."""
    if not isinstance(normalization, dict):
        raise ValueError(f"{source}: expected an object like {NORMALIZATION}, got {normalization!r}")
    unknown = set(normalization) - {"method", "low", "high", "clip"}
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}")
    method = normalization.get("method", "percentile")
    if method not in NORMALIZATION_METHODS:
        raise ValueError(f"{source}: method {method!r} is not one of {NORMALIZATION_METHODS}")
    if method == "percentile":
        lo, hi = normalization.get("low", NORMALIZATION["low"]), normalization.get("high", NORMALIZATION["high"])
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) \
                or not 0 <= lo < hi <= 100:
            raise ValueError(f"{source}: percentiles need 0 <= low < high <= 100, got low={lo!r}, high={hi!r}")
    return normalization


def _check_types(part: dict, klass: type, source: str) -> None:
    """ValueError naming the key when a value's JSON type is not one the field's annotation allows
    (a quoted number, a list for a number, a fraction for a count, ...)."""
    import types
    import typing

    hints = typing.get_type_hints(klass)
    json_types = {bool: (bool,), int: (int,), float: (int, float), str: (str,), type(None): (type(None),),
                  tuple: (list, tuple), list: (list, tuple), dict: (dict,)}
    names = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", tuple: "a list",
             list: "a list", dict: "a JSON object", type(None): "null"}
    for key, value in part.items():
        hint = hints.get(key)
        options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
        options = [typing.get_origin(o) or o for o in options]
        if not all(o in json_types for o in options):
            continue  # a type this check does not know: the dataclass judges it
        allowed = tuple(t for o in options for t in json_types[o])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in options):
            want = " or ".join(dict.fromkeys(names[o] for o in options))
            raise ValueError(f"{source}[{key!r}]: expected {want}, got {json.dumps(value)}")


def _check_keys(d: Any, allowed: set[str], source: str) -> None:
    if not isinstance(d, dict):
        raise ValueError(f"{source}: expected a JSON object of settings, got {type(d).__name__} {d!r:.60}")
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
