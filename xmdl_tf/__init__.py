"""xmdl_tf: explainable mitochondria segmentation and morphometry for EM (XM-DL).

The public API is imported lazily, so `import xmdl_tf` and the CLIs' `--help`
do not pay for importing TensorFlow.
"""
from __future__ import annotations

import importlib
import os

# TensorFlow 2.21 leaves its oneDNN kernels off on some x86 CPUs; on, training
# measured 2x faster on this project's 2-core AVX2 machine (3.72 -> 7.62
# tiles/s, `benchmarks/bench_training.py --only shipped` with
# TF_ENABLE_ONEDNN_OPTS=0 and without). Takes effect only if TensorFlow is
# imported after xmdl_tf; set TF_ENABLE_ONEDNN_OPTS=0 to keep it off.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

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
