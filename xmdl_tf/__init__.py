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
    "find_pairs": "io",
    "read_image": "io",
    "read_label": "io",
    "Config": "config",
    "SegmentationLoss": "losses",
    "PooledMetric": "losses",
    "mask_to_instances": "instances",
    "measure": "morphometry",
}
# Training and scoring are modules (`python -m xmdl_tf.train`), each with its function of the same
# name: `xmdl_tf.train.train(...)`, `xmdl_tf.evaluate.evaluate(...)`. (A package attribute cannot be
# both: importing the submodule replaces a function of its name, so `xmdl_tf.train` is the module.)
_MODULES = ("adapt", "analyze", "calibrate", "evaluate", "export", "finetune", "train", "tune", "volume")

__all__ = sorted(_API)


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    elif name in _MODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'xmdl_tf' has no attribute {name!r}")
    globals()[name] = value  # once: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API) | set(_MODULES))
