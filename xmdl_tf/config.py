"""Configuration dataclasses for data, model and training, and `config.json` I/O.

Every trained model folder holds a `config.json` next to `model.keras`, so
prediction, evaluation and export never restate the architecture or the
normalisation. Unknown keys are rejected: a typo in a hand-edited config must
fail loudly instead of being silently ignored.
"""
from __future__ import annotations

import dataclasses
import json
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
    pixel_size_nm: pixel size of the training data in nm, or None if unknown.
    """

    tile_size: int = 256
    tiles_per_slice: int = 8
    foreground_fraction: float = 0.0
    augment: bool = True
    shuffle_buffer: int = 256
    ignore_value: int | None = None
    pixel_size_nm: float | None = None


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the residual attention U-Net (see `xmdl_tf.model`)."""

    depth: int = 6
    base_filters: int = 8
    residual: bool = True
    attention: bool = True
    n_classes: int = 2
    dropout: float = 0.0

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
    loss: str = "dice"  # "dice" or "dice_ce"
    steps_per_epoch: int | None = None
    seed: int = 0
    mixed_precision: bool = False
    # "auto": XLA on GPUs only. On CPU, XLA measured 2x slower for this model
    # (benchmarks/bench_training.py: 5.9 vs 11.7 tiles/s on 2 cores).
    jit_compile: bool | str = "auto"


VARIANTS = {
    "unet": (False, False),
    "residual": (True, False),
    "attention": (False, True),
    "residual_attention": (True, True),
}


def resolve_jit(jit_compile: bool | str | None) -> bool:
    """True/False as given; "auto" (or None) means XLA when a GPU is present."""
    if jit_compile in ("auto", None):
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
    normalization: dict = field(default_factory=lambda: dict(NORMALIZATION))
    # Free-form provenance: data paths, versions, lineage, timing.
    info: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "Config":
        _check_keys(d, {f.name for f in dataclasses.fields(cls)}, source)
        sub = {}
        for name, klass in (("data", DataConfig), ("model", ModelConfig), ("train", TrainConfig)):
            part = d.get(name, {})
            _check_keys(part, {f.name for f in dataclasses.fields(klass)}, f"{source}[{name!r}]")
            sub[name] = klass(**part)
        return cls(
            **sub,
            normalization=d.get("normalization", dict(NORMALIZATION)),
            info=d.get("info", {}),
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


def _check_keys(d: dict, allowed: set[str], source: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
