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
import shutil
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
from xmdl_tf.io import DataError
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


def test_a_warning_to_the_user_is_one_line():
    code = ("import warnings, sys\nfrom xmdl_tf.cli import guarded\n"
            "@guarded\ndef main(argv=None):\n    warnings.warn('a.png: RGB image\\n converted to grayscale')\n"
            "sys.exit(main([]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and proc.stderr == "warning: a.png: RGB image converted to grayscale\n", proc.stderr


def test_the_interrupt_advice_names_resume_where_a_command_needs_it(capsys):
    from xmdl_tf import cli

    def stop(argv=None):
        raise KeyboardInterrupt

    assert cli.guarded(stop)([]) == 130 and "same command again to continue" in capsys.readouterr().err
    assert cli.guarded(resume_flag=True)(stop)([]) == 130
    assert "same command with --resume to continue" in capsys.readouterr().err


def test_running_out_of_memory_is_one_line_with_what_to_lower(capsys):
    """A model or tile too large for the machine (`--base-filters 100000`): TensorFlow's allocator
    error is pages long; the user gets one line saying what to change."""
    import tensorflow as tf

    from xmdl_tf import cli

    def tf_oom(argv=None):
        raise tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor with shape[8,100000,256,256]"
                                               "\nhint: if you want to see a list of allocated tensors ...")

    def numpy_oom(argv=None):
        raise MemoryError("Unable to allocate 64.0 GiB for an array")

    for fn, said in ((tf_oom, "OOM when allocating tensor with shape[8,100000,256,256]"),
                     (numpy_oom, "Unable to allocate 64.0 GiB")):
        assert cli.guarded(fn)([]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: out of memory ({said}") and "smaller tiles or batches" in err and err.count("\n") == 1


def test_ignore_value_that_swallows_all_foreground_is_refused(tmp_path, capsys):
    data = tmp_path / "d"
    write_split(data, "train", 2, size=64)
    for f in (data / "train" / "y").iterdir():  # 0/255 masks
        tifffile.imwrite(f, tifffile.imread(f) * 255)
    assert train_main(["--data", str(data), "--out", str(tmp_path / "run"), *ARGS, "--ignore-value", "255"]) == 2
    one_line_error(capsys, "--ignore-value 255", "no pixel is a mitochondrion")
    # evaluate refuses it too, before it loads a model (it used to score F1 0 without a word).
    from xmdl_tf.evaluate import main as evaluate_main
    for volume in ([], ["--volume"]):
        assert evaluate_main(["--model", str(tmp_path / "no_model"), "--data", str(data), "--split", "train",
                              "--ignore-value", "255", *volume]) == 2
        one_line_error(capsys, "--ignore-value 255", "no pixel is a mitochondrion")


# ----------------------------------------------------------------------------
# --overwrite, locks, kills


def test_overwrite_keeps_the_old_run_until_the_new_one_finishes(blob_dataset, tmp_path):
    import keras

    from xmdl_tf.train import build_parser, config_from_args, train

    out = tmp_path / "run"
    argv = ["--data", str(blob_dataset), "--out", str(out), *ARGS, "--epochs", "1", "--steps-per-epoch", "1"]
    cfg = config_from_args(build_parser().parse_args(argv))
    train([str(blob_dataset)], out, cfg, verbose=0)
    before = digest(out)

    class Boom(Exception):
        pass

    class FailMidway(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0:
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


def test_a_users_folder_is_never_taken_for_a_killed_start_of_a_run(blob_dataset, tmp_path, capsys):
    """A folder holding only a config.json of the user's own and *.tmp files looks like what `train`
    writes before its first epoch; it used to be deleted as such, without --overwrite."""
    from xmdl_tf.config import Config
    from xmdl_tf.train import _only_startup_files

    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "config.json").write_text('{"microscope": "Talos"}')
    (proj / "scan.tmp").write_text("half a scan")
    before = digest(proj)
    for extra in ([], ["--overwrite"]):
        assert train_main(["--data", str(blob_dataset), "--out", str(proj), *ARGS, "--epochs", "1", *extra]) == 2
        one_line_error(capsys, str(proj), "is not a training run", "choose another --out")
        assert digest(proj) == before
    assert not list(tmp_path.glob(".proj.overwrite*"))
    for files in ({"config.json": '{"microscope": "Talos"}'}, {"notes.tmp": "mine"}, {"config.json": "{}"}):
        other = tmp_path / f"other{len(list(tmp_path.glob('other*')))}"
        other.mkdir()
        for name, text in files.items():
            (other / name).write_text(text)
        assert not _only_startup_files(other), files
    # What a start killed before its first epoch leaves (the run's config.json, the checkpoint folder,
    # an atomic write's temporary) is still recognised, and restarted by the same command.
    killed = tmp_path / "killed"
    (killed / "checkpoint").mkdir(parents=True)
    Config(info={"data": []}).save(killed / "config.json")
    (killed / ".config.json.123.tmp").write_text("{")
    (killed / "checkpoint" / ".state.json.123.tmp").write_text("{")
    assert _only_startup_files(killed)


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
    """Start `cmd`; SIGKILL it as soon as `until()` is true (or leave it if it ends first).

    The process's stderr is kept as `proc.err` (str), for the assertion message."""
    import tempfile

    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
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
    err.seek(0)
    proc.err = err.read()[-3000:]
    err.close()
    return proc


@pytest.mark.slow
def test_train_resumes_after_kills_at_any_moment(blob_dataset, tmp_path):
    """SIGKILL during the first epoch, in the middle of a checkpoint write and at a random
    time; each time the same command continues, and the finished run is whole."""
    out = tmp_path / "run"
    ckpt = out / "checkpoint"
    cmd = [sys.executable, "-m", "xmdl_tf.train", "--data", str(blob_dataset), "--out", str(out), *ARGS,
           "--epochs", "3", "--steps-per-epoch", "4", "--patience", "10"]
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
    t_kill = time.time() + random.Random(13).uniform(4, 10)
    _run_until(cmd, env, lambda: time.time() > t_kill)
    # 4. to the end, untouched
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    s = state()
    assert s["finished"] and s["epoch"] == 2
    h = pd.read_csv(out / "history.csv")
    assert list(h["epoch"]) == [1, 2, 3]
    assert sorted(f.name for f in ckpt.iterdir()) == sorted({"state.json", s["last"], s["best_file"]})
    import keras

    keras.models.load_model(out / "model.keras", compile=False)
    json.loads((out / "config.json").read_text())


# ----------------------------------------------------------------------------
# analyze: rows as it goes, --resume, kills, a full disk


@pytest.fixture(scope="module")
def small_model(untrained_model) -> Path:
    return untrained_model


@pytest.fixture
def images(tmp_path) -> Path:
    import cv2

    from conftest import blob_image

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        cv2.imwrite(str(folder / f"s{i}.png"), blob_image(96, seed=40 + i)[0])
    return folder


def _table_ok(out: Path) -> pd.DataFrame:
    """summary.csv parses, and every image it lists has its whole set of files."""
    from xmdl_tf.analyze import OUTPUT_FILES

    summary = pd.read_csv(out / "summary.csv")
    for name in summary["image"]:
        for f in OUTPUT_FILES:
            if f.endswith(".tif"):
                tifffile.imread(out / name / f)  # whole, not truncated
            else:
                assert (out / name / f).stat().st_size > 0
    return summary


ANALYZE = ["--tile", "64", "--overlap", "16"]


def test_analyze_failure_of_one_image_loses_nothing_and_resume_continues(small_model, images, tmp_path, capsys,
                                                                         monkeypatch):
    import xmdl_tf.analyze as an

    out = tmp_path / "out"
    real = an.analyze_image
    calls = []

    def flaky(predictor, image, name, *a, **k):
        calls.append(name)
        if name == "s2":
            raise RuntimeError("an unexpected failure")  # not one of the error types an image used to be allowed
        if name == "s4":
            raise KeyboardInterrupt  # as a kill would
        return real(predictor, image, name, *a, **k)

    monkeypatch.setattr(an, "analyze_image", flaky)
    assert an.main([str(images), "--model", str(small_model), "--out", str(out), *ANALYZE]) == 130
    summary = _table_ok(out)
    assert list(summary["image"]) == ["s0", "s1", "s3"]  # rows written as each image finished
    assert "s2" in capsys.readouterr().err
    monkeypatch.setattr(an, "analyze_image", real)
    before = {n: (out / n / "instances.tif").read_bytes() for n in ("s0", "s1", "s3")}
    # Without --resume the finished results are not touched.
    assert an.main([str(images), "--model", str(small_model), "--out", str(out), *ANALYZE]) == 2
    assert "--resume" in capsys.readouterr().err
    assert an.main([str(images), "--model", str(small_model), "--out", str(out), *ANALYZE, "--resume"]) == 0
    summary = _table_ok(out)
    assert list(summary["image"]) == [f"s{i}" for i in range(6)]
    assert {n: (out / n / "instances.tif").read_bytes() for n in before} == before
    objects = pd.read_csv(out / "objects.csv")
    assert objects.groupby("image").size().reindex(summary["image"], fill_value=0).tolist() == summary["count"].tolist()


def test_analyze_refuses_missing_labels_and_implausible_pixel_sizes_up_front(small_model, images, tmp_path, capsys):
    from xmdl_tf.analyze import main

    labels = tmp_path / "labels"
    labels.mkdir()
    tifffile.imwrite(labels / "s0.tif", np.zeros((96, 96), np.uint8))
    out = tmp_path / "out"
    assert main([str(images), "--model", str(small_model), "--labels", str(labels), "--out", str(out)]) == 2
    one_line_error(capsys, "no label for 5 input(s)")
    assert not out.exists()
    with pytest.raises(SystemExit):
        main([str(images), "--model", str(small_model), "--pixel-size", "1e-6", "--out", str(out)])
    assert "outside the plausible range" in capsys.readouterr().err
    for bad in (["--overlap", "-8"], ["--tile", "0"], ["--batch-size", "-1"], ["--threshold", "2"]):
        with pytest.raises(SystemExit):
            main([str(images), "--model", str(small_model), "--out", str(out), *bad])
        assert bad[0] in capsys.readouterr().err
    # Implausible metadata is ignored with a warning; a plausible one that would resample
    # absurdly far (200 nm into a 5 nm model: x40) is refused for that image, clearly.
    noise = np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)
    tifffile.imwrite(images / "huge.tif", noise, imagej=True, resolution=(1e-3, 1e-3), metadata={"unit": "um"})
    tifffile.imwrite(images / "far.tif", noise, imagej=True, resolution=(5.0, 5.0), metadata={"unit": "um"})
    assert main([str(images / "huge.tif"), str(images / "far.tif"), "--model", str(small_model), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "huge.tif metadata: pixel size 1e+06 nm is outside the plausible range" in err
    assert "skipped far: pixel size 200 nm would resample the image by x40" in err
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary["image"]) == ["huge"] and np.isnan(summary["pixel_size_nm"][0])
    # A stale calibration (200 nm/pixel in the file) is overridden by an explicit --pixel-size, with a warning.
    assert main([str(images / "far.tif"), "--model", str(small_model), "--out", str(out), "--pixel-size", "5",
                 "--resume"]) == 0
    assert "far.tif: its metadata says 200 nm per pixel; --pixel-size 5 is used" in capsys.readouterr().err
    assert pd.read_csv(out / "summary.csv").set_index("image").loc["far", "pixel_size_nm"] == 5.0


def test_an_image_narrower_than_the_model_can_see_is_refused_not_padded(small_model, tmp_path, capsys):
    from xmdl_tf.analyze import main
    from xmdl_tf.config import InferenceConfig
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import predict_volume

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "strip.tif", rng.integers(0, 255, (3, 500), np.uint8))
    tifffile.imwrite(tmp_path / "ok.tif", rng.integers(0, 255, (64, 64), np.uint8))
    out = tmp_path / "out"
    assert main([str(tmp_path / "strip.tif"), str(tmp_path / "ok.tif"), "--model", str(small_model),
                 "--out", str(out), "--no-figure"]) == 1
    assert "skipped strip: image of 3 x 500 px: narrower than 4 px" in capsys.readouterr().err
    assert list(pd.read_csv(out / "summary.csv")["image"]) == ["ok"]
    with pytest.raises(DataError, match="slices of 64 x 2 px: narrower than 4 px"):
        predict_volume(load_model(small_model), rng.integers(0, 255, (3, 64, 2), np.uint8), InferenceConfig(tta=False))


@pytest.mark.slow
def test_resume_and_overwrite_never_mix_settings_in_one_table(small_model, images, tmp_path, capsys):
    import json
    import shutil

    import xmdl_tf.analyze as an

    out = tmp_path / "out"
    base = ["--model", str(small_model), "--out", str(out), *ANALYZE]
    first = [str(images / "s0.png"), str(images / "s1.png")]
    assert an.main(first + base + ["--no-figure"]) == 0
    made = json.loads((out / "settings.json").read_text())
    assert made["inference"]["tile"] == 64 and len(made["model_sha256"]) == 64
    table = (out / "summary.csv").read_bytes()
    # Resuming with another threshold, or another model, would add rows made otherwise: refused,
    # naming what differs, and nothing is written.
    other = tmp_path / "other_model"
    shutil.copytree(small_model, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg.setdefault("inference", {})["threshold"] = 0.6  # the model's own default: a different model
    (other / "config.json").write_text(json.dumps(cfg))
    for argv, needle in ((first + [str(images / "s2.png")] + base + ["--threshold", "0.3"], "(threshold)"),
                         ([str(images / "s2.png"), "--model", str(other), "--out", str(out), *ANALYZE],
                          f"model {small_model}")):
        assert an.main(argv + ["--no-figure", "--resume"]) == 2
        err = capsys.readouterr().err
        assert needle in err and "other settings" in err and "Traceback" not in err, err
        assert (out / "summary.csv").read_bytes() == table and not (out / "s2").exists()
    # --overwrite with other settings may replace this batch, but not leave s1's row made the old way.
    assert an.main([str(images / "s0.png")] + base + ["--no-figure", "--overwrite", "--threshold", "0.3"]) == 2
    assert "holds results of 1 other input(s) (e.g. s1)" in capsys.readouterr().err
    assert (out / "summary.csv").read_bytes() == table
    assert an.main(first + base + ["--no-figure", "--overwrite", "--threshold", "0.3"]) == 0
    assert json.loads((out / "settings.json").read_text())["inference"]["threshold"] == 0.3
    # The same settings resume (the figure is not a setting of the results).
    assert an.main(first + [str(images / "s2.png")] + base + ["--threshold", "0.3", "--resume"]) == 0
    assert list(pd.read_csv(out / "summary.csv")["image"]) == ["s0", "s1", "s2"]


def test_analyze_resumes_after_a_random_kill(small_model, tmp_path):
    import cv2

    from conftest import blob_image

    images = tmp_path / "many"
    images.mkdir()
    for i in range(8):  # enough images, each slow enough, that the kill lands mid-batch
        cv2.imwrite(str(images / f"s{i}.png"), blob_image(256, seed=60 + i, n=12)[0])
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [sys.executable, "-m", "xmdl_tf.analyze", str(images), "--model", str(small_model), "--out", str(out),
           *ANALYZE]
    rng = random.Random(5)
    after_rows, delay = rng.randint(1, 4), rng.uniform(0, 0.1)

    def rows() -> int:
        try:
            return len(pd.read_csv(out / "summary.csv"))
        except (OSError, ValueError):
            return 0

    t_hit = []

    def until() -> bool:
        if not t_hit and rows() >= after_rows:
            t_hit.append(time.time())
        return bool(t_hit) and time.time() > t_hit[0] + delay

    p = _run_until(cmd, env, until)
    assert p.returncode == -signal.SIGKILL, p.err
    partial = _table_ok(out)
    assert 1 <= len(partial) < 8
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{len(partial)} image(s) already done" in done.stdout
    resumed = _table_ok(out)
    # The same numbers as one uninterrupted run of the same command (in a process of its own:
    # an untrained model's probabilities sit near the threshold, where thread pools differ).
    ref_cmd = [*cmd[:cmd.index("--out") + 1], str(tmp_path / "ref"), *ANALYZE]
    assert subprocess.run(ref_cmd, env=env, capture_output=True, timeout=300).returncode == 0
    ref = pd.read_csv(tmp_path / "ref" / "summary.csv")
    pd.testing.assert_series_equal(resumed["count"], ref["count"])
    assert list(resumed["image"]) == list(ref["image"])


def test_analyze_on_a_full_disk_keeps_what_was_finished(small_model, images, tmp_path, capsys):
    from xmdl_tf.analyze import main

    # Room for the first image's outputs (measured: they vary with the untrained model's random
    # weights) and the tables, not for all six.
    first = tmp_path / "first"
    first.mkdir()
    shutil.copy(sorted(images.iterdir())[0], first)
    assert main([str(first), "--model", str(small_model), "--out", str(tmp_path / "measured"), *ANALYZE]) == 0
    one = sum(f.stat().st_size for f in (tmp_path / "measured").rglob("*") if f.is_file())
    size_kb = int(one * 1.6) // 1024 + 64
    disk = tmp_path / "small_disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(disk)],
                             capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root and mount rights)")
    try:
        out = disk / "out"
        rc = main([str(images), "--model", str(small_model), "--out", str(out), *ANALYZE])
        err = capsys.readouterr().err
        assert rc == 2 and "No space left on device" in err and "Traceback" not in err
        summary = _table_ok(out)  # parses, and lists only images whose files are all whole
        assert 1 <= len(summary) < 6
    finally:
        subprocess.run(["umount", str(disk)], check=False)


# ----------------------------------------------------------------------------
# One inference configuration, one post-processing and scoring path


def test_analyze_and_evaluate_agree_by_construction(small_model, tmp_path):
    """The same slices scored by `evaluate` and by `analyze --labels` give the same numbers,
    with the model's stored inference settings and with the same flags overriding them."""
    from conftest import write_split
    from xmdl_tf.analyze import main as analyze_main
    from xmdl_tf.config import Config, InferenceConfig
    from xmdl_tf.evaluate import main as evaluate_main

    data = tmp_path / "d"
    write_split(data, "test", 3, size=96)
    # A model whose stored settings differ from the built-in ones: both commands must use them.
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.keras").write_bytes((small_model / "model.keras").read_bytes())
    cfg = Config.load(small_model / "config.json")
    Config(**{**cfg.__dict__, "inference": InferenceConfig(threshold=0.45, min_size_px=5, tile=64, overlap=16)}).save(
        model / "config.json")
    for flags in ([], ["--threshold", "0.55", "--no-separate"]):
        tag = "-".join(flags) or "stored"
        assert evaluate_main(["--model", str(model), "--data", str(data), "--out", str(tmp_path / f"ev{tag}"),
                              *flags]) == 0
        assert analyze_main([str(data / "test" / "x"), "--labels", str(data / "test" / "y"), "--model", str(model),
                             "--out", str(tmp_path / f"an{tag}"), "--no-figure", *flags]) == 0
        ev = pd.read_csv(tmp_path / f"ev{tag}" / "per_image.csv").set_index("image")
        an = pd.read_csv(tmp_path / f"an{tag}" / "summary.csv").set_index("image")
        for col_ev, col_an in (("f1", "f1"), ("iou", "iou"), ("count", "count"), ("gt_count", "gt_count"),
                               ("count_error", "count_error")):
            np.testing.assert_allclose(ev[col_ev], an.loc[ev.index, col_an], err_msg=f"{tag}: {col_ev}")
        metrics = json.loads((tmp_path / f"ev{tag}" / "metrics.json").read_text())
        assert metrics["inference"]["threshold"] == (0.55 if flags else 0.45)
        assert metrics["inference"]["separate"] is (not flags)


def test_one_threshold_operator_and_ignored_pixels():
    from xmdl_tf.config import InferenceConfig
    from xmdl_tf.postprocess import foreground, instances, score_slice

    prob = np.zeros((32, 32), np.float32)
    prob[4:12, 4:12] = 0.5  # exactly at the threshold: foreground, in the mask and in the instances
    prob[20:28, 20:28] = np.nan
    ic = InferenceConfig(threshold=0.5, min_size_px=0)
    assert foreground(prob, 0.5).sum() == 64 and (instances(prob, ic) > 0).sum() == 64
    label = np.zeros((32, 32), np.uint8)
    label[4:12, 4:12] = 1
    label[0:2, :] = 255  # unlabelled rows: left out of every count
    prob[0:2, :] = 0.9
    sc = score_slice(prob, label, ic, ignore_value=255)
    assert (sc["tp"], sc["fp"], sc["fn"], sc["tn"]) == (64, 0, 0, 32 * 32 - 64 - 64)
    assert (sc["inst_tp"], sc["inst_fp"], sc["count"]) == (1, 0, 1)
    with pytest.raises(ValueError, match="threshold"):
        InferenceConfig(threshold=2)
    with pytest.raises(ValueError, match="overlap"):
        InferenceConfig(tile=64, overlap=-1)
    with pytest.raises(ValueError, match="tile"):
        InferenceConfig(tile=0)


def test_an_empty_slice_predicted_empty_scores_1_for_objects_as_for_pixels():
    from xmdl_tf.config import InferenceConfig
    from xmdl_tf.metrics import scores
    from xmdl_tf.postprocess import pooled_instance_scores, score_slice

    ic = InferenceConfig(threshold=0.5, min_size_px=0)
    empty = score_slice(np.zeros((32, 32), np.float32), np.zeros((32, 32), np.uint8), ic)
    assert scores(empty)["f1"] == 1.0
    pooled = pooled_instance_scores([empty])
    assert pooled["instance_f1_iou50"] == pooled["instance_precision_iou50"] == 1.0
    # One false object on another empty slice: nothing to find, one found -> precision and F1 0.
    prob = np.zeros((32, 32), np.float32)
    prob[4:12, 4:12] = 0.9
    false = score_slice(prob, np.zeros((32, 32), np.uint8), ic)
    assert pooled_instance_scores([empty, false])["instance_f1_iou50"] == 0.0


def test_an_empty_test_split_is_scored_on_val(tmp_path):
    from xmdl_tf.evaluate import held_out_split

    write_split(tmp_path / "d", "val", 1, size=32)
    (tmp_path / "d" / "test" / "x").mkdir(parents=True)  # a converter's empty test split
    assert held_out_split(tmp_path / "d") == "val"
    write_split(tmp_path / "d", "test", 1, size=32)
    assert held_out_split(tmp_path / "d") == "test"


def test_model_mistakes_are_one_clear_line_in_every_command(small_model, images, tmp_path, capsys):
    from xmdl_tf.analyze import main as analyze_main
    from xmdl_tf.evaluate import main as evaluate_main
    from xmdl_tf.export import main as export_main

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.keras").write_bytes(b"junk, not a zip")
    (bad / "config.json").write_text((small_model / "config.json").read_text())
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "model.keras").write_bytes((small_model / "model.keras").read_bytes())
    (truncated / "config.json").write_text((small_model / "config.json").read_text()[:200])
    data = tmp_path / "d"
    write_split(data, "test", 1, size=64)
    for model, message in ((bad, "not a Keras model file"), (truncated, "not valid JSON"),
                           (tmp_path / "nowhere", "model not found")):
        assert analyze_main([str(images), "--model", str(model), "--out", str(tmp_path / "o")]) == 2
        one_line_error(capsys, message)
        assert evaluate_main(["--model", str(model), "--data", str(data)]) == 2
        one_line_error(capsys, message)
        assert export_main(["--model", str(model), "--out", str(tmp_path / "e")]) == 2
        one_line_error(capsys, message)
    assert not (tmp_path / "o").exists() and not (tmp_path / "e").exists()


def test_an_unusable_out_is_refused_before_any_model_is_loaded(images, tmp_path, capsys):
    """A file in the way of --out (or a folder this user cannot write) is the first thing each
    command says, before it loads a model or predicts a slice: here the model does not even exist."""
    from xmdl_tf.analyze import main as analyze_main
    from xmdl_tf.evaluate import main as evaluate_main
    from xmdl_tf.export import main as export_main

    data = tmp_path / "d"
    write_split(data, "test", 1, size=64)
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    nowhere = str(tmp_path / "nowhere")
    targets = [(blocker, "exists and is not a folder"), (blocker / "sub", "is a file, so")]
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        targets += [(ro, "no permission to write there"), (ro / "sub", "no permission to write in")]
    for out, message in targets:
        assert analyze_main([str(images), "--model", nowhere, "--out", str(out)]) == 2
        one_line_error(capsys, message)
        assert evaluate_main(["--model", nowhere, "--data", str(data), "--out", str(out)]) == 2
        one_line_error(capsys, message)
        assert export_main(["--model", nowhere, "--out", str(out)]) == 2
        one_line_error(capsys, message)
    assert blocker.read_text() == "mine"


def test_a_resampled_slice_is_normalised_by_its_own_grey_values_before_resampling(small_model):
    """As training normalises whole slices and then resamples tiles, and as the chunked path passes
    each slice's histogram: the percentiles are the slice's own, not those of its resampled copy,
    whose interpolated values thin the tails (the two differed by several grey levels)."""
    from conftest import blob_image
    from xmdl_tf.predict import load_model
    from xmdl_tf.sampling import grey_counts, resample_image

    pred = load_model(small_model, jit_compile=False)  # model pixel size 5 nm
    image = blob_image(64, seed=3)[0]
    image[::9, ::7] = 255  # isolated bright pixels: their share shrinks when the slice is enlarged x2
    image[4::11, 3::5] = 0
    native = pred.predict_slice(image, tile=64, overlap=16, pixel_size_nm=10.0)
    np.testing.assert_array_equal(
        native, pred.predict_slice(image, tile=64, overlap=16, pixel_size_nm=10.0, counts=grey_counts(image)))
    after = pred.predict_slice(image, tile=64, overlap=16, pixel_size_nm=10.0,
                               counts=grey_counts(resample_image(image, 2.0)))
    assert np.abs(native - after).max() > 1e-4  # the check above could tell the two apart


def test_inference_normalises_with_the_models_stored_settings(small_model, tmp_path):
    from conftest import blob_image
    from xmdl_tf.config import Config
    from xmdl_tf.predict import load_model
    from xmdl_tf.sampling import normalize_np

    model = tmp_path / "m"
    model.mkdir()
    (model / "model.keras").write_bytes((small_model / "model.keras").read_bytes())
    cfg = Config.load(small_model / "config.json")
    Config(**{**cfg.__dict__, "normalization": {"method": "percentile", "low": 10.0, "high": 90.0, "clip": True}}).save(
        model / "config.json")
    img = blob_image(64, seed=3)[0]
    pred = load_model(model, jit_compile=False)
    direct = pred.model(normalize_np(img, 10.0, 90.0)[None, ..., None], training=False).numpy()[0, ..., 1]
    np.testing.assert_allclose(pred.predict_slice(img, 64, 0), direct, atol=1e-5)
    default = load_model(small_model, jit_compile=False).predict_slice(img, 64, 0)
    assert np.abs(default - direct).max() > 1e-3
    # Histogram equalisation, stored the same way, reaches the network as stored.
    Config(**{**cfg.__dict__, "normalization": {"method": "equalize"}}).save(model / "config.json")
    eq = pred.model(normalize_np(img, method="equalize")[None, ..., None], training=False).numpy()[0, ..., 1]
    np.testing.assert_allclose(load_model(model, jit_compile=False).predict_slice(img, 64, 0), eq, atol=1e-5)
    assert np.abs(eq - default).max() > 1e-3


def test_a_run_started_before_a_new_setting_existed_still_resumes():
    from xmdl_tf.config import Config
    from xmdl_tf.train import _comparable

    new = json.loads(json.dumps(Config().to_dict(), default=str))
    old = {k: v for k, v in new.items() if k != "inference"}  # written before InferenceConfig existed
    old["train"] = {k: v for k, v in old["train"].items() if k != "lr_schedule"}
    assert _comparable(old) == _comparable(new)
    assert _comparable({**old, "train": {**old["train"], "learning_rate": 0.1}}) != _comparable(new)


# ----------------------------------------------------------------------------
# --help


def _parsers(main) -> list:
    """The ArgumentParser(s) a CLI builds (sub-commands included), captured at parse time."""
    import argparse

    seen = []

    def capture(self, *a, **k):
        seen.append(self)
        raise SystemExit(0)

    old = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(SystemExit):
            main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = old
    out = []
    todo = list(seen)
    while todo:
        p = todo.pop()
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                todo += list(a.choices.values())
    return out


@pytest.mark.parametrize("module", ["xmdl_tf.train", "xmdl_tf.finetune", "xmdl_tf.evaluate", "xmdl_tf.analyze",
                                    "xmdl_tf.export", "data_prep.generic", "data_prep.lucchi", "data_prep.mitoem",
                                    "data_prep.synthetic", "data_prep.compare_figure"])
def test_help_shows_the_default_of_every_flag(module):
    import argparse
    import importlib

    missing = []
    for p in _parsers(importlib.import_module(module).main):
        for a in p._actions:
            if not a.option_strings or a.default in (None, False, argparse.SUPPRESS, []) or a.help == argparse.SUPPRESS:
                continue
            f = p._get_formatter()
            f.add_argument(a)
            text = " ".join(f.format_help().split())
            shown = a.default if not isinstance(a.default, (tuple, list)) else a.default[0]
            forms = {str(shown)} | ({f"{shown:g}"} if isinstance(shown, float) else set())
            if not any(form in text for form in forms):
                missing.append(f"{a.option_strings[0]} (default {a.default!r})")
    assert not missing, f"{module}: --help does not show the default of {missing}"


def test_train_refuses_out_of_range_numbers_before_anything(blob_dataset, tmp_path, capsys):
    for flag, value in (("--lr", "-1"), ("--batch-size", "-2"), ("--epochs", "0"), ("--val-fraction", "1.5"),
                        ("--tile-size", "0"), ("--model-pixel-size", "1e6")):
        with pytest.raises(SystemExit) as exc:
            train_main(["--data", str(blob_dataset), "--out", str(tmp_path / "r"), *ARGS, flag, value])
        assert exc.value.code == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
