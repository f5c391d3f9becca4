"""Training and validation batches as `keras.utils.PyDataset`: the input path without TensorFlow.

Selected automatically when `KERAS_BACKEND` is not `tensorflow` (JAX or
PyTorch, e.g. on a GPU machine without TensorFlow). Batch i is the same as
batch i of `xmdl_tf.data.training_dataset` for the same sets, configuration
and seed: both cut the same tile stream from `TileSampler` (tested).
"""
from __future__ import annotations

import os

import keras
import numpy as np

from .config import AugmentConfig, DataConfig
from .sampling import SliceRegion, TileSampler, TrainingSet, as_sets, validation_tiles


class TrainingTiles(keras.utils.PyDataset):
    """Endless (x, y) float32 batches (B, T, T, 1); use with `fit(steps_per_epoch=...)`.

    workers: threads building batches (OpenCV and NumPy release the GIL);
    default: one per CPU core, at most 16 (a GPU machine needs them all to keep
    its accelerator fed: one core builds about 170 "em" tiles/s).
    processes: worker processes that build each group's slices for those threads
    (`TileSampler(processes=...)`; same batches); default: the environment
    variable XMDL_LOADER_PROCESSES, else 0 (threads only).
    """

    def __init__(self, data: list[TrainingSet] | list[SliceRegion], cfg: DataConfig, batch_size: int,
                 seed: int = 0, augment: AugmentConfig | None = None, start_tile: int = 0,
                 workers: int | None = None, processes: int | None = None, normalization: dict | None = None):
        workers = max(1, workers if workers is not None else min(os.cpu_count() or 2, 16))
        if processes is None:
            processes = loader_processes()
        # Queue enough batches that every worker has one to build.
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(8, 2 * workers))
        self.sampler = TileSampler(as_sets(data), cfg, augment or AugmentConfig(), seed, processes=processes,
                                   normalization=normalization)
        # Batches in the queue may come from this many groups at once.
        self.sampler.cache_groups = max(4, -(-2 * workers * batch_size // self.sampler.tiles_per_group) + 2)
        self.batch_size, self.start_tile = batch_size, start_tile

    @property
    def num_batches(self):
        return None  # endless: the index keeps counting across epochs

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.sampler.batch(int(i), self.batch_size, self.start_tile)


def loader_processes() -> int:
    """XMDL_LOADER_PROCESSES as a count >= 0 (0 if unset); a clear error if it is not one."""
    raw = os.environ.get("XMDL_LOADER_PROCESSES", "").strip()
    if not raw:
        return 0
    if not raw.isdigit():
        raise ValueError(f"XMDL_LOADER_PROCESSES={raw!r}: give a whole number of processes (0: threads only)")
    return int(raw)


class ValidationTiles(keras.utils.PyDataset):
    """The grid tiles of every validation region, in order, in batches; finite."""

    def __init__(self, data: list[TrainingSet] | list[SliceRegion], cfg: DataConfig, batch_size: int,
                 normalization: dict | None = None):
        super().__init__(workers=1, use_multiprocessing=False)
        xs, ys = [], []
        for s in as_sets(data):
            for r in s.regions:
                x, y = validation_tiles(r, cfg.tile_size, s.factor, cfg.ignore_value, normalization)
                xs.append(x)
                ys.append(y)
        self.x, self.y = np.concatenate(xs), np.concatenate(ys)
        self.batch_size = batch_size

    @property
    def num_batches(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        return self.x[sl], self.y[sl]
