"""Shared fixtures: tiny synthetic EM-like images and the optional real data."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tifffile

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def blob_image(size: int = 128, seed: int = 0, n: int = 6, radius: tuple[int, int] = (6, 12)) -> tuple[np.ndarray, np.ndarray]:
    """Dark discs on a bright textured background: (uint8 image, uint8 0/1 mask)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), bool)
    for _ in range(n):
        r = rng.integers(*radius)
        cy, cx = rng.integers(r, size - r, 2)
        mask |= (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    background = 170 + 25 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 12, (size, size))
    image = np.where(mask, 70 + rng.normal(0, 12, (size, size)), background)
    return np.clip(image, 0, 255).astype(np.uint8), mask.astype(np.uint8)


def write_split(root: Path, split: str, n: int, size: int = 128, seed: int = 0, start: int = 0) -> None:
    (root / split / "x").mkdir(parents=True, exist_ok=True)
    (root / split / "y").mkdir(parents=True, exist_ok=True)
    import cv2

    for i in range(n):
        img, msk = blob_image(size, seed + i)
        cv2.imwrite(str(root / split / "x" / f"im{start + i:04d}.png"), img)
        tifffile.imwrite(root / split / "y" / f"seg{start + i:04d}.tif", msk, compression="zlib")


@pytest.fixture
def blob_dataset(tmp_path: Path) -> Path:
    """A split-layout data set of 128x128 blob images: 4 train, 2 val, 2 test."""
    root = tmp_path / "blobs"
    write_split(root, "train", 4, seed=0)
    write_split(root, "val", 2, seed=100, start=4)
    write_split(root, "test", 2, seed=200, start=6)
    return root


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


# The one "really trained" tiny model of the suite (depth 3, 8 filters, 32-px tiles,
# 14 epochs of 12 steps on blob_dataset's images): test_train checks how it trained,
# test_analyze uses it as a model that segments. Trained once per session.
BLOB_RUN_ARGS = ["--tile-size", "32", "--depth", "3", "--base-filters", "8", "--batch-size", "8",
                 "--tiles-per-slice", "8", "--no-jit", "--epochs", "14", "--steps-per-epoch", "12", "--patience", "5",
                 "--lr", "3e-3"]


@pytest.fixture(scope="module")
def untrained_model(tmp_path_factory) -> Path:
    """An untrained tiny model folder (depth 3, 4 filters, 5 nm): its predictions are deterministic,
    which is all tests of reading, scoring, resuming and the Python API need."""
    from xmdl_tf.config import Config, DataConfig, ModelConfig
    from xmdl_tf.model import build_from_config

    folder = tmp_path_factory.mktemp("model")
    cfg = Config(model=ModelConfig(depth=3, base_filters=4), data=DataConfig(pixel_size_nm=5.0))
    build_from_config(cfg.model).save(folder / "model.keras")
    cfg.save(folder / "config.json")
    return folder


@pytest.fixture(scope="session")
def blob_run(tmp_path_factory) -> tuple[Path, Path]:
    """(data set, run folder) of the suite's trained tiny model.

    Trained once per test session, by whichever pytest-xdist worker asks
    first (the others wait on a file lock), then copied into each worker's
    own temporary folder, so tests on different workers never share files.
    """
    import fcntl
    import os
    import shutil

    from xmdl_tf.train import main as train_main

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    trained = shared / "blob_run_trained"
    with open(shared / "blob_run_trained.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocking: released when the first worker has trained
        if not (trained / "done").is_file():
            shutil.rmtree(trained, ignore_errors=True)
            data = trained / "blobs"
            write_split(data, "train", 4, seed=0)
            write_split(data, "val", 2, seed=100, start=4)
            write_split(data, "test", 2, seed=200, start=6)
            assert train_main(["--data", str(data), "--out", str(trained / "run"), *BLOB_RUN_ARGS]) == 0
            (trained / "done").write_text("ok\n")
    root = tmp_path_factory.mktemp("blob_run")
    shutil.copytree(trained / "blobs", root / "blobs")
    shutil.copytree(trained / "run", root / "run")
    return root / "blobs", root / "run"


def check_figure_kept_when_saving_fails(write, tmp_path: Path, monkeypatch, drawing_step: str) -> Path:
    """`write(out)` draws a figure to `out`; when saving fails, or `drawing_step` (a dotted name of a
    function the drawing calls) fails half-way, an earlier `out` stays whole, no temporary file is
    left and no figure stays open. Returns `out`."""
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    out = tmp_path / "figure.png"
    out.write_bytes(b"old")
    open_before = plt.get_fignums()

    def broken(*a, **k):
        raise RuntimeError("disk on fire")

    for target in ((Figure, "savefig"), (drawing_step,)):
        with monkeypatch.context() as m:
            m.setattr(*target, broken)
            with pytest.raises(RuntimeError):
                write(out)
        assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]
        assert plt.get_fignums() == open_before
    return out
