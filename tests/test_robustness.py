"""Nothing lost, nothing hung, nothing silently wrong (issue 13): bad data, kills,
concurrent runs and --overwrite, for `train` and the data converters.

Each test first builds the situation that used to lose data or hang, then
checks that the earlier outputs are intact (checksums), that no process
hangs (subprocess timeouts) and that the message is one clear line.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import ROOT, write_split
from xmdl_tf.train import main as train_main

ARGS = ["--tile-size", "32", "--depth", "3", "--base-filters", "4", "--batch-size", "4", "--tiles-per-slice", "4",
        "--no-jit"]


def digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


# ----------------------------------------------------------------------------
# Bad labels are found before anything is written


def test_bad_labels_fail_before_training_in_one_line(tmp_path, capsys):
    data = tmp_path / "d"
    write_split(data, "train", 3, size=64)
    write_split(data, "val", 1, size=64, start=3)
    bad = data / "train" / "y" / "seg0001.tif"
    tifffile.imwrite(bad, (np.arange(64 * 64).reshape(64, 64) % 2 * 0.5).astype(np.float32))
    out = tmp_path / "run"
    assert train_main(["--data", str(data), "--out", str(out), *ARGS]) == 2
    one_line_error(capsys, "seg0001.tif", "non-integer")
    assert not out.exists()

    tifffile.imwrite(bad, np.zeros((64, 60), np.uint8))
    assert train_main(["--data", str(data), "--out", str(out), *ARGS]) == 2
    one_line_error(capsys, "seg0001.tif", "(64, 60)")
    assert not out.exists()


def test_ignore_value_that_swallows_all_foreground_is_refused(tmp_path, capsys):
    data = tmp_path / "d"
    write_split(data, "train", 2, size=64)
    for f in (data / "train" / "y").iterdir():  # 0/255 masks
        tifffile.imwrite(f, tifffile.imread(f) * 255)
    assert train_main(["--data", str(data), "--out", str(tmp_path / "run"), *ARGS, "--ignore-value", "255"]) == 2
    one_line_error(capsys, "--ignore-value 255", "no pixel is a mitochondrion")


# ----------------------------------------------------------------------------
# --overwrite, locks, kills


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(blob_dataset, tmp_path):
    import keras

    from xmdl_tf.train import build_parser, config_from_args, train

    out = tmp_path / "run"
    argv = ["--data", str(blob_dataset), "--out", str(out), *ARGS, "--epochs", "1", "--steps-per-epoch", "2"]
    cfg = config_from_args(build_parser().parse_args(argv))
    train([str(blob_dataset)], out, cfg, verbose=0)
    before = digest(out)

    class Boom(Exception):
        pass

    class FailMidway(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 1:
                raise Boom()

    new_cfg = config_from_args(build_parser().parse_args([*argv, "--seed", "7"]))
    with pytest.raises(Boom):
        train([str(blob_dataset)], out, new_cfg, overwrite=True, callbacks=[FailMidway()], verbose=0)
    assert digest(out) == before  # the old run is untouched

    train([str(blob_dataset)], out, new_cfg, overwrite=True, verbose=0)
    after = digest(out)
    assert after["model.keras"] != before["model.keras"]
    assert json.loads((out / "config.json").read_text())["train"]["seed"] == 7
    assert not list(tmp_path.glob(".run.overwrite*")) and not list(tmp_path.glob(".run.replaced"))


def test_a_second_process_on_the_same_run_is_refused(blob_dataset, tmp_path, capsys):
    from xmdl_tf.runlock import FolderLock

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; sys.path.insert(0, sys.argv[1]); from xmdl_tf.runlock import FolderLock\n"
        "with FolderLock(sys.argv[2]):\n    print('locked', flush=True); time.sleep(60)"), str(ROOT), str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert train_main(["--data", str(blob_dataset), "--out", str(out), *ARGS, "--epochs", "1"]) == 2
        one_line_error(capsys, f"process {holder.pid}", "already writing")
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait(10)
    with FolderLock(out):  # released by the kernel when its holder died
        pass


def _run_until(cmd: list[str], env: dict, until, timeout: float = 180) -> subprocess.Popen:
    """Start `cmd`; SIGKILL it as soon as `until()` is true (or leave it if it ends first)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while proc.poll() is None:
        if until():
            proc.send_signal(signal.SIGKILL)
            break
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError(f"{cmd} hung for {timeout} s")
        time.sleep(0.005)
    proc.wait(30)
    return proc


@pytest.mark.slow
def test_train_resumes_after_kills_at_any_moment(blob_dataset, tmp_path):
    """SIGKILL during the first epoch, in the middle of a checkpoint write and at a random
    time; each time the same command continues, and the finished run is whole."""
    out = tmp_path / "run"
    ckpt = out / "checkpoint"
    cmd = [sys.executable, "-m", "xmdl_tf.train", "--data", str(blob_dataset), "--out", str(out), *ARGS,
           "--epochs", "4", "--steps-per-epoch", "6", "--patience", "10"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}

    def state() -> dict:
        try:
            return json.loads((ckpt / "state.json").read_text())
        except (OSError, ValueError):
            return {}

    # 1. during the first epoch (the state says no epoch has finished yet)
    p = _run_until(cmd, env, lambda: state().get("epoch") == -1)
    assert p.returncode == -signal.SIGKILL and state().get("epoch") == -1
    # 2. while a checkpoint file is being written
    p = _run_until(cmd, env, lambda: ckpt.is_dir() and any(".tmp" in f.name for f in ckpt.iterdir()))
    # 3. at a random moment
    t_kill = time.time() + random.Random(13).uniform(4, 12)
    _run_until(cmd, env, lambda: time.time() > t_kill)
    # 4. to the end, untouched
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s = state()
    assert s["finished"] and s["epoch"] == 3
    h = pd.read_csv(out / "history.csv")
    assert list(h["epoch"]) == [1, 2, 3, 4]
    assert sorted(f.name for f in ckpt.iterdir()) == sorted({"state.json", s["last"], s["best_file"]})
    import keras

    keras.models.load_model(out / "model.keras", compile=False)
    json.loads((out / "config.json").read_text())
