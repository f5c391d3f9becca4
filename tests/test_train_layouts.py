"""Training from scratch as an image analyst does it: each documented data layout, bad settings through
the Python API, a kill after the last epoch, and the command recorded in config.json."""
from __future__ import annotations

import json
import sys
import types

import cv2
import keras
import numpy as np
import pandas as pd
import pytest
import tifffile

from conftest import blob_image, write_split
from xmdl_tf.config import Config, DataConfig, ModelConfig, TrainConfig
from xmdl_tf.train import main as train_main

TINY = ["--tile-size", "32", "--depth", "3", "--base-filters", "4", "--batch-size", "2", "--tiles-per-slice", "2",
        "--no-jit", "--epochs", "1", "--steps-per-epoch", "1"]


def _image_and_label_folders(root, n=3):
    """Layout (b): 16-bit images in one folder, 0/255 masks of the same names in another."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        img, msk = blob_image(64, seed=10 + i)
        tifffile.imwrite(root / "images" / f"cell{i}.tif", img.astype(np.uint16) * 200 + 1000)
        cv2.imwrite(str(root / "masks" / f"cell{i}.png"), msk * 255)
    return root / "images", root / "masks"


def _stacks(root, n=3):
    """Layout (c): a multi-page image stack and a label stack of instance ids."""
    from skimage.measure import label as components

    root.mkdir(parents=True)
    pairs = [blob_image(64, seed=20 + i) for i in range(n)]
    tifffile.imwrite(root / "stack.tif", np.stack([p[0] for p in pairs]))
    tifffile.imwrite(root / "labels.tif", np.stack([components(p[1]).astype(np.uint16) for p in pairs]))
    return root / "stack.tif", root / "labels.tif"


def test_train_reads_every_documented_layout(tmp_path, capsys):
    """README, "Data layouts": all commands read the split layout, an image folder + label folder and a
    TIFF stack + label stack. `train` read only the first and told the user to "give labels explicitly",
    which it had no flag for."""
    images, masks = _image_and_label_folders(tmp_path / "b")
    stack, label_stack = _stacks(tmp_path / "c")
    split = tmp_path / "blobs"
    write_split(split, "train", 2, size=64)
    write_split(split, "val", 1, size=64, seed=100, start=2)
    out = tmp_path / "run"

    # One --labels per --data set, "-" for the set in the split layout; a wrong count is one line, up front.
    with pytest.raises(SystemExit) as err:
        train_main(["--data", str(images), str(stack), "--labels", str(masks), "--out", str(out), *TINY])
    assert err.value.code == 2
    assert "--labels: give one label folder, glob or stack per --data set (2), got 1" in capsys.readouterr().err
    assert not out.exists()

    argv = ["--data", str(images), str(stack), str(split), "--labels", str(masks), str(label_stack), "-",
            "--out", str(out), *TINY]
    assert train_main(argv) == 0
    info = json.loads((out / "config.json").read_text())["info"]
    folder, stacked, plain = info["data"]
    assert folder["name"] == "images" and folder["labels"] == str(masks.resolve())
    assert folder["train_slices"] == ["cell0", "cell1", "cell2"] and folder["validation"].startswith("held-back")
    assert stacked["name"] == "stack" and stacked["labels"] == str(label_stack.resolve())
    assert stacked["train_slices"] == ["stack_z0000", "stack_z0001", "stack_z0002"]
    assert "labels" not in plain and plain["validation"] == "split 'val'"
    assert {"val_images_f1", "val_stack_f1", "val_blobs_f1"} <= set(pd.read_csv(out / "history.csv").columns)

    # The labels are part of what the run learns from: other labels do not continue this run.
    other = tmp_path / "other_masks"
    other.mkdir()
    for f in masks.iterdir():
        cv2.imwrite(str(other / f.name), 255 - cv2.imread(str(f), cv2.IMREAD_UNCHANGED))
    assert train_main([*argv[:5], str(other), *argv[6:]]) == 2
    assert "differs in learns_from.data" in capsys.readouterr().err
    # --overwrite never deletes the labels either.
    assert train_main(["--data", str(stack), "--labels", str(label_stack), "--out", str(tmp_path / "c"), *TINY,
                       "--overwrite"]) == 2
    assert "would replace the input" in capsys.readouterr().err and label_stack.is_file()


BASE = Config(data=DataConfig(tile_size=32), model=ModelConfig(depth=3, base_filters=4),
              train=TrainConfig(epochs=1, batch_size=2, steps_per_epoch=1, jit_compile=False))


@pytest.mark.parametrize("part, change, message", [
    ("train", {"epochs": 0}, "epochs 0 must be a whole number >= 1"),
    ("train", {"batch_size": 0}, "batch_size 0"),
    ("train", {"learning_rate": 0.0}, "learning_rate 0.0 must be a number above 0"),
    ("train", {"learning_rate": -1e-3}, "learning_rate -0.001"),
    ("train", {"seed": -1}, "seed -1"),
    ("data", {"tiles_per_slice": 0}, "tiles_per_slice 0"),
    ("model", {"depth": 1}, "depth 1"),
    ("model", {"dropout": 1.0}, "dropout 1.0"),
    ("augment", {"rotate": "45"}, "rotate '45'"),
])
def test_the_python_api_refuses_bad_settings_before_anything_is_written(blob_dataset, tmp_path, part, change,
                                                                        message):
    """Through `xmdl_tf.train.train` these trained anyway (a learning rate of 0 or below learns nothing, or
    climbs the loss) or failed deep in TensorFlow after the run folder had been created."""
    from dataclasses import replace

    from xmdl_tf.train import train

    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        train([str(blob_dataset)], out, replace(BASE, **{part: replace(getattr(BASE, part), **change)}), verbose=0)
    assert not out.exists()


def test_a_run_killed_after_early_stopping_ended_it_resumes_as_finished(blob_dataset, tmp_path, monkeypatch):
    """A kill after the epoch at which EarlyStopping stopped (its state written) but before the run was
    marked finished: the same command must finish it, not train epochs the uninterrupted run never had."""
    import xmdl_tf.train as tr

    losses = iter([0.5, 0.6, 0.7, 0.8, 0.9])  # worse every epoch: patience 1 stops after the second

    def scores(counts, loss="dice"):
        return {"val_loss": next(losses), "val_f1": 0.5, "val_iou": 0.3, "val_precision": 0.5, "val_recall": 0.5}

    monkeypatch.setattr(tr, "validation_scores", scores)

    class KillWhenStopped(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if self.model.stop_training:
                raise KeyboardInterrupt

    argv = ["--data", str(blob_dataset), "--out", str(tmp_path / "run"), *TINY, "--epochs", "5", "--patience", "1"]
    cfg = tr.config_from_args(tr.build_parser().parse_args(argv))
    with pytest.raises(KeyboardInterrupt):
        tr.train([str(blob_dataset)], tmp_path / "run", cfg, callbacks=[KillWhenStopped()], verbose=0)
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["epoch"] == 1 and state["wait"] == 1 and not state["finished"]

    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    tr.train([str(blob_dataset)], tmp_path / "run", cfg, callbacks=[Record()], verbose=0)
    assert seen == []
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [1, 2]
    state = json.loads((tmp_path / "run" / "checkpoint" / "state.json").read_text())
    assert state["finished"] and state["epoch"] == 1 and state["best_epoch"] == 0
    info = json.loads((tmp_path / "run" / "config.json").read_text())["info"]
    assert info["epochs_run"] == 2 and info["best_epoch"] == 1


def test_with_patience_0_a_run_killed_after_an_improving_epoch_trains_on(blob_dataset, tmp_path, monkeypatch):
    """EarlyStopping stops only after an epoch that did not improve: with --patience 0 the wait is 0 after
    every improving epoch, and a run killed there must not be taken for a finished one."""
    import xmdl_tf.train as tr

    losses = iter([0.5, 0.4, 0.3, 0.2])  # better every epoch: never stopped early

    def scores(counts, loss="dice"):
        return {"val_loss": next(losses), "val_f1": 0.5, "val_iou": 0.3, "val_precision": 0.5, "val_recall": 0.5}

    monkeypatch.setattr(tr, "validation_scores", scores)

    class KillAfterSecond(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 1:
                raise KeyboardInterrupt

    argv = ["--data", str(blob_dataset), "--out", str(tmp_path / "run"), *TINY, "--epochs", "4", "--patience", "0"]
    cfg = tr.config_from_args(tr.build_parser().parse_args(argv))
    with pytest.raises(KeyboardInterrupt):
        tr.train([str(blob_dataset)], tmp_path / "run", cfg, callbacks=[KillAfterSecond()], verbose=0)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(epoch)

    tr.train([str(blob_dataset)], tmp_path / "run", cfg, callbacks=[Record()], verbose=0)
    assert seen == [2, 3]
    assert list(pd.read_csv(tmp_path / "run" / "history.csv")["epoch"]) == [1, 2, 3, 4]


def test_the_recorded_command_can_be_run_again(monkeypatch):
    """`python -m xmdl_tf.train` has the module's file path as sys.argv[0]: recorded as is, the command does
    not run (relative imports); the console script's was not recorded at all."""
    from xmdl_tf.train import _command_line

    main = types.ModuleType("__main__")
    main.__spec__ = types.SimpleNamespace(name="xmdl_tf.train")
    monkeypatch.setitem(sys.modules, "__main__", main)
    monkeypatch.setattr(sys, "argv", ["/somewhere/xmdl_tf/train.py", "--data", "my data", "--out", "r"])
    assert _command_line() == "python -m xmdl_tf.train --data 'my data' --out r"
    main.__spec__ = None
    monkeypatch.setattr(sys, "argv", ["/venv/bin/xmdl-train", "--data", "d", "--out", "r"])
    assert _command_line() == "xmdl-train --data d --out r"
    monkeypatch.setattr(sys, "argv", ["my_pipeline.py"])  # the Python API, called from a user's program
    assert _command_line() is None


def test_a_pixel_size_given_for_a_set_that_states_another_is_said_to_be_unused(tmp_path):
    """`--pixel-size 5` for a set whose TIFF metadata says 9.2 nm trained at 9.2 nm without a word: the
    user believed the model learnt at 5 nm. (The set's own value wins, as documented; now it says so.)"""
    from xmdl_tf.train import resolve_data

    data = tmp_path / "tem"
    for split, n in (("train", 1), ("val", 1)):
        (data / split / "x").mkdir(parents=True)
        (data / split / "y").mkdir(parents=True)
        for i in range(n):
            img, msk = blob_image(64, seed=i)
            tifffile.imwrite(data / split / "x" / f"im{i:04d}.tif", img, imagej=True,
                             resolution=(1 / 0.0092, 1 / 0.0092), metadata={"unit": "um"})
            tifffile.imwrite(data / split / "y" / f"seg{i:04d}.tif", msk)
    with pytest.warns(UserWarning, match=r"--pixel-size 5 nm is not used: the set's TIFF metadata .* states 9.2 nm"):
        _, _, model_px, info = resolve_data([str(data)], pixel_sizes=[5.0])
    assert model_px == info[0]["pixel_size_nm"] == 9.2
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a value that agrees is not warned about
        resolve_data([str(data)], pixel_sizes=[9.25])


def test_a_tile_far_larger_than_every_slice_is_warned():
    """--tile-size 4096 on 256-px slices: each tile is mostly padding and the run may be killed for memory."""
    from xmdl_tf.train import oversized_tile

    said = oversized_tile(4096, 256.0, 32)
    assert said and "--tile-size 4096 is more than twice the largest training slice (256 px" in said
    assert "--tile-size 256 holds the same" in said
    assert "--tile-size 160 holds" in oversized_tile(512, 150.4, 32)  # rounded up to the size divisor
    assert oversized_tile(512, 256.0, 32) is None and oversized_tile(256, 0, 32) is None
