"""xmdl_tf: explainable mitochondria segmentation and morphometry for EM (XM-DL).

The public API is imported lazily, so `import xmdl_tf` and the CLIs' `--help`
do not pay for importing TensorFlow.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "build_model": "model",
    "normalize": "data",
    "load_model": "predict",
    "train": "train",
    "evaluate": "evaluate",
    "find_pairs": "io",
    "read_image": "io",
    "read_label": "io",
    "Config": "config",
    "SegmentationLoss": "losses",
    "PooledMetric": "losses",
    "mask_to_instances": "instances",
    "measure": "morphometry",
}

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module 'xmdl_tf' has no attribute {name!r}")
