"""Chunked volumes on a real Dask LocalCluster (2 worker processes): `python -m xmdl_tf.volume`."""
import json
import os
import signal
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tifffile
import zarr

from xmdl_tf.io import DataError
from xmdl_tf.volume_io import write_volume_tiff

from test_volume import blob_volume


INFER = {"tile": 64, "overlap": 16}
VOXEL = (20.0, 10.0, 10.0)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                           scheduler_kwargs={"dashboard_address": ":0"})  # as xmdl_tf.volume: a free port
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def volume(tmp_path_factory):
    """A blob volume with one dark tube along each axis, crossing every chunk border."""
    root = tmp_path_factory.mktemp("dist")
    image, ids = blob_volume((24, 96, 96), seed=1, n=3)
    z, y, x = np.ogrid[:24, :96, :96]
    tubes = (((y - 80) ** 2 + (x - 14) ** 2 <= 25)  # along z
             | (((z - 12) ** 2 + (x - 86) ** 2 <= 16) & (y > 4) & (y < 92))  # along y
             | (((z - 20) ** 2 + (y - 10) ** 2 <= 16) & (x > 4) & (x < 70)))  # along x
    tubes &= ids == 0
    image[tubes] = np.clip(70 + np.random.default_rng(0).normal(0, 12, int(tubes.sum())), 0, 255).astype(np.uint8)
    write_volume_tiff(root / "vol.tif", image, VOXEL)
    return root, image, tubes


def _run(client, src, out, model, **kw):
    from xmdl_tf.distributed import process_volume

    args = dict(client=client, chunks=(8, 48, 48), halo=16, inference=INFER, verbose=False)
    args.update(kw)
    return process_volume(str(src), out, str(model), **args)


def _in_memory(model, image):
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import VolumeSettings, analyze_volume

    return analyze_volume(load_model(model, jit_compile=False), image, "v", VolumeSettings(inference=INFER), VOXEL)


def _one_to_one(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a[(a > 0) | (b > 0)].tolist(), b[(a > 0) | (b > 0)].tolist()))
    return len(pairs) == len({p for p, _ in pairs}) == len({q for _, q in pairs}) and all(p and q for p, q in pairs)


def test_chunked_equals_in_memory_and_objects_cross_chunks(client, volume, blob_run, tmp_path):
    root, image, tubes = volume
    model = blob_run[1]
    # Chunks holding whole slices: the probability equals the in-memory path's up to float
    # round-off (the workers run TensorFlow on fewer threads), and from that probability
    # the objects and the table are exactly those of the in-memory separation and measurement.
    from xmdl_tf.config import resolve_inference
    from xmdl_tf.instances3d import volume_instances
    from xmdl_tf.morphometry3d import measure3d
    from xmdl_tf.predict import load_model

    s = _run(client, root / "vol.tif", tmp_path / "whole.zarr", model, chunks=(8, 96, 96))
    mem = _in_memory(model, image)
    prob = zarr.open_array(str(tmp_path / "whole.zarr" / "0"))[:]
    np.testing.assert_allclose(prob, mem.probability, atol=1e-4)
    # Each slice's grey-value counts, summed from its chunks: what every chunk is normalised by.
    hist = np.load(tmp_path / "whole.zarr" / ".xmdl" / "histograms.npy")
    # Done: the volume-sized scratch label arrays are gone, and --resume has nothing left to do.
    assert sorted(p.name for p in (tmp_path / "whole.zarr" / ".xmdl").iterdir()) == ["done", "histograms.npy",
                                                                                      "state.json"]
    assert _run(client, root / "vol.tif", tmp_path / "whole.zarr", model, chunks=(8, 96, 96),
                resume=True)["count"] == s["count"]
    assert hist.shape == (24, 256)
    np.testing.assert_array_equal(hist, np.stack([np.bincount(s.ravel(), minlength=256) for s in image]))
    ic = resolve_inference(load_model(model, jit_compile=False), INFER)
    ref = volume_instances(prob, VOXEL, ic.threshold, ic.min_volume(VOXEL))
    labels = zarr.open_array(str(tmp_path / "whole.zarr" / "labels" / "instances" / "0"))[:]
    assert s["count"] == ref.max() >= 4 and _one_to_one(labels, ref)
    ref_table = measure3d(ref, VOXEL, image=image)
    table = pd.read_csv(tmp_path / "whole.zarr" / "objects.csv")
    to_ref = {int(c): int(m) for c, m in set(zip(labels[labels > 0].tolist(), ref[labels > 0].tolist()))}
    table["id"] = table["id"].map(to_ref)
    table, ref_table = table.set_index("id").sort_index(), ref_table.set_index("id").sort_index()
    for col in ("volume_nm3", "surface_area_nm2", "sphericity", "axis_major_nm", "solidity", "n_branches",
                "skeleton_length_nm", "mean_intensity", "touches_border", "centroid_z_nm", "bbox_x1"):
        np.testing.assert_allclose(table[col].astype(float), ref_table[col].astype(float), rtol=1e-6, err_msg=col)
    # Chunks of 8 x 48 x 48 (27 of them): each tube crosses borders along its axis and stays one object.
    _run(client, root / "vol.tif", tmp_path / "small.zarr", model)
    small = zarr.open_array(str(tmp_path / "small.zarr" / "labels" / "instances" / "0"))[:]
    from scipy import ndimage as ndi

    parts, n = ndi.label(tubes, np.ones((3, 3, 3), bool))
    for k in range(1, n + 1):
        ids, counts = np.unique(small[parts == k], return_counts=True)
        assert counts[ids > 0].max() > 0.8 * (parts == k).sum(), "a tube was cut at a chunk border"
    # Up to the seams of tiled inference, the same objects as in memory.
    assert abs(int(small.max()) - int(mem.instances.max())) <= 1
    summary = json.loads((tmp_path / "small.zarr" / "summary.json").read_text())
    assert summary["count"] == int(small.max()) and summary["chunks"] == [8, 48, 48]
    # OME-Zarr: multiscales on the image, NGFF labels with their source.
    root_attrs = zarr.open_group(str(tmp_path / "small.zarr"), mode="r").attrs
    ms = root_attrs["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["z", "y", "x"] and ms["axes"][0]["unit"] == "nanometer"
    assert ms["datasets"][0]["coordinateTransformations"][0]["scale"] == list(VOXEL)
    lab_attrs = zarr.open_group(str(tmp_path / "small.zarr" / "labels" / "instances"), mode="r").attrs
    assert lab_attrs["image-label"]["source"]["image"] == "../../"


def test_worker_killed_mid_run_and_resume(client, volume, blob_run, tmp_path):
    root, _, _ = volume
    model = blob_run[1]
    ref = _run(client, root / "vol.tif", tmp_path / "ref.zarr", model)
    ref_labels = zarr.open_array(str(tmp_path / "ref.zarr" / "labels" / "instances" / "0"))[:]

    # Kill a worker process as soon as the first probability chunk is written.
    out = tmp_path / "killed.zarr"
    pids = list(client.run(os.getpid).values())
    killed = []

    def killer():
        done = out / ".xmdl" / "done" / "probability"
        for _ in range(1200):
            if done.is_dir() and any(done.iterdir()):
                os.kill(pids[0], signal.SIGKILL)
                killed.append(len(list(done.iterdir())))
                return
            time.sleep(0.05)

    t = threading.Thread(target=killer)
    t.start()
    s = _run(client, root / "vol.tif", out, model)
    t.join()
    assert killed and killed[0] < 27  # killed while chunks were still to be predicted
    client.wait_for_workers(2, timeout=120)
    assert pids[0] not in client.run(os.getpid).values()  # Dask replaced the worker
    assert s["count"] == ref["count"]
    np.testing.assert_array_equal(zarr.open_array(str(out / "labels" / "instances" / "0"))[:], ref_labels)

    # A run interrupted while it paints the labels continues with --resume only.
    from xmdl_tf.distributed import Cancelled

    out = tmp_path / "interrupted.zarr"
    cancel = threading.Event()

    def stop_painting(stage, done, total):
        if stage == "instance labels" and done >= 1:
            cancel.set()

    with pytest.raises(Cancelled):
        _run(client, root / "vol.tif", out, model, progress=stop_painting, cancel=cancel)
    assert not (out / "summary.json").exists() and (out / ".xmdl" / "cc").is_dir()
    prob_marks = {m.name: m.stat().st_mtime_ns for m in (out / ".xmdl" / "done" / "probability").iterdir()}
    with pytest.raises(FileExistsError):
        _run(client, root / "vol.tif", out, model)
    with pytest.raises(DataError, match="other settings"):
        _run(client, root / "vol.tif", out, model, resume=True, halo=8)
    _run(client, root / "vol.tif", out, model, resume=True)
    np.testing.assert_array_equal(zarr.open_array(str(out / "labels" / "instances" / "0"))[:], ref_labels)
    # Nothing already done was recomputed.
    assert {m.name: m.stat().st_mtime_ns for m in (out / ".xmdl" / "done" / "probability").iterdir()} == prob_marks


def test_overwrite_keeps_the_earlier_result_until_the_new_one_is_complete(client, volume, blob_run, tmp_path):
    from xmdl_tf.distributed import Cancelled, previous_result

    root, _, _ = volume
    out = tmp_path / "o.zarr"
    first = _run(client, root / "vol.tif", out, blob_run[1])
    labels = zarr.open_array(str(out / "labels" / "instances" / "0"))[:]
    prev = previous_result(out)

    def stop_after_first_chunk(stage, done, total):
        if stage.startswith("probability") and done >= 1:
            cancel.set()

    for _ in range(2):  # a second failed --overwrite must not replace the kept result with the unfinished one
        cancel = threading.Event()
        with pytest.raises(Cancelled):
            _run(client, root / "vol.tif", out, blob_run[1], overwrite=True, progress=stop_after_first_chunk,
                 cancel=cancel)
        assert not (out / "summary.json").exists()
        assert json.loads((prev / "summary.json").read_text())["count"] == first["count"]
        np.testing.assert_array_equal(zarr.open_array(str(prev / "labels" / "instances" / "0"))[:], labels)
    # Resuming the replacement completes it, and only then is the earlier result removed.
    assert _run(client, root / "vol.tif", out, blob_run[1], resume=True)["count"] == first["count"]
    assert not prev.exists()
    np.testing.assert_array_equal(zarr.open_array(str(out / "labels" / "instances" / "0"))[:], labels)
    # A replacement that completes at once leaves nothing beside OUT.
    _run(client, root / "vol.tif", out, blob_run[1], overwrite=True)
    assert not prev.exists() and (out / "summary.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir() if "o.zarr" in p.name) == [".o.zarr.lock", "o.zarr"]


def test_inputs_zarr_v2_v3_hdf5_and_tiff_agree(client, volume, blob_run, tmp_path):
    import h5py

    root, image, _ = volume
    model = blob_run[1]
    z2 = zarr.open_array(str(tmp_path / "v2.zarr"), mode="w", shape=image.shape, chunks=(8, 48, 48),
                         dtype=image.dtype, zarr_format=2)
    z2[:] = image
    z2.attrs["resolution"] = list(VOXEL)
    z3 = zarr.open_array(str(tmp_path / "v3.zarr"), mode="w", shape=image.shape, chunks=(8, 48, 48),
                         dtype=image.dtype, zarr_format=3)
    z3[:] = image
    z3.attrs["resolution"] = list(VOXEL)
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f.create_dataset("raw", data=image, chunks=(8, 48, 48))
        f["raw"].attrs["element_size_um"] = [v / 1000 for v in VOXEL]
    # Signed grey values (int16, as SerialEM writes): shifted by the volume's minimum, which the
    # driver reads once and hands the workers in the plan.
    signed = image.astype(np.int16) - 300
    write_volume_tiff(tmp_path / "signed.tif", signed, VOXEL)
    results = []
    for i, src in enumerate([root / "vol.tif", tmp_path / "v2.zarr", tmp_path / "v3.zarr", f"{tmp_path / 'v.h5'}:/raw",
                             tmp_path / "signed.tif"]):
        s = _run(client, src, tmp_path / f"o{i}.zarr", model, chunks=(12, 96, 96))
        assert s["voxel_size_nm"] == list(VOXEL)
        results.append(zarr.open_array(str(tmp_path / f"o{i}.zarr" / "labels" / "instances" / "0"))[:])
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])
    state = json.loads((tmp_path / "o4.zarr" / ".xmdl" / "state.json").read_text())
    assert state["value_stats"] == [float(signed.min()), float(signed.max()), True]
    assert json.loads((tmp_path / "o0.zarr" / ".xmdl" / "state.json").read_text())["value_stats"] is None


def test_a_worker_maps_grey_values_by_the_plan_not_by_reading_the_volume_again(tmp_path):
    from xmdl_tf.distributed import ChunkPlan, _volume

    data = (np.arange(2 * 32 * 32).reshape(2, 32, 32) - 500).astype(np.int16)
    tifffile.imwrite(tmp_path / "w.tif", data)
    plan = ChunkPlan(str(tmp_path / "w.tif"), "model", data.shape, (2, 32, 32), 8, None, {}, (-1000.0, 5000.0, True))
    # The plan's range (not the volume's own minimum, -500) sets the shift.
    np.testing.assert_array_equal(_volume(plan).image_slab(0, 2), data.astype(np.int64) + 1000)


def test_a_volume_without_mitochondria_gives_empty_tables(client, blob_run, tmp_path):
    """No component anywhere: every stage still runs (Dask cannot scatter an empty dict of offsets)."""
    image = np.random.default_rng(0).integers(0, 255, (8, 96, 96), np.uint8)  # noise: nothing blob-like
    write_volume_tiff(tmp_path / "noise.tif", image, VOXEL)
    result = _run(client, tmp_path / "noise.tif", tmp_path / "n.zarr", blob_run[1])
    assert result["count"] == 0
    assert len(pd.read_csv(tmp_path / "n.zarr" / "objects.csv")) == 0
    assert not zarr.open_array(str(tmp_path / "n.zarr" / "labels" / "instances" / "0"), mode="r")[:].any()


def test_bad_inputs_fail_before_writing(blob_run, tmp_path, capsys):
    import h5py

    from xmdl_tf.volume import main

    model = str(blob_run[1])
    with h5py.File(tmp_path / "v.h5", "w") as f:
        f["raw"] = np.zeros((4, 32, 32), np.uint8)
    tifffile.imwrite(tmp_path / "flat.tif", np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    image, _ = blob_volume((24, 96, 96), n=1)
    write_volume_tiff(tmp_path / "vol.tif", image)
    nan = image.astype(np.float32)
    nan[3, 5, 5] = np.nan
    tifffile.imwrite(tmp_path / "nan.tif", nan)
    write_volume_tiff(tmp_path / "narrow.tif", image[:4, :64, :2])
    cases = [
        ([str(tmp_path / "nan.tif")], "NaN or infinite values in slice 3 (1 voxels)"),
        ([f"{tmp_path / 'v.h5'}:/nothere"], "nothere"),
        ([str(tmp_path / "flat.tif")], "2-D"),
        ([str(tmp_path / "vol.tif"), "--chunks", "8", "40", "40", "--halo", "32"], "halo"),
        ([str(tmp_path / "missing.zarr")], "not found"),
        ([str(tmp_path / "narrow.tif")], "slices of 64 x 2 px: narrower than 4 px"),
    ]
    for k, (argv, needle) in enumerate(cases):
        out = tmp_path / f"o{k}.zarr"
        assert main(argv + ["--out", str(out), "--model", model]) == 2
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, err
        assert not out.exists()
    # --overwrite deletes only an earlier run of this command: never the input, never other data.
    import zarr
    src = tmp_path / "in.zarr"
    zarr.open_array(str(src), mode="w", shape=image.shape, chunks=(8, 96, 96), dtype=image.dtype)[:] = image
    mine = tmp_path / "mine.zarr"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    for out, needle in ((src, "would replace the input"), (mine, "is not a run of this command")):
        for flag in ("--overwrite", "--resume"):
            assert main([str(src), "--out", str(out), "--model", model, flag]) == 2
            err = capsys.readouterr().err
            assert needle in err and "Traceback" not in err, err
    assert np.array_equal(zarr.open_array(str(src), mode="r")[:], image) and (mine / "notes.txt").is_file()


def test_ctrl_c_stops_a_run_with_one_line(blob_run, tmp_path):
    """Ctrl-C reaches the whole process group: the workers ignore it and the run stops in order,
    with the --resume advice as the only message (no worker tracebacks, no Dask warnings; --resume
    itself: test_worker_killed_mid_run_and_resume)."""
    import subprocess
    import sys

    from conftest import ROOT

    image = np.random.default_rng(0).integers(0, 255, (12, 256, 256), np.uint8)
    write_volume_tiff(tmp_path / "vol.tif", image, VOXEL)
    argv = [sys.executable, "-u", "-m", "xmdl_tf.volume", str(tmp_path / "vol.tif"), "--out", str(tmp_path / "o.zarr"),
            "--model", str(blob_run[1]), "--chunks", "4", "128", "128", "--halo", "16", "--tile", "64",
            "--overlap", "16", "--no-tta"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    def as_from_a_terminal():
        # Ctrl-C at its default and unblocked in the child, whatever this test process does with it:
        # an ignored or blocked SIGINT is inherited, and Python then leaves it so.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=as_from_a_terminal)
    out = []
    try:
        for line in proc.stdout:  # interrupt while the workers predict
            out.append(line)
            if line.strip().startswith("probability"):
                time.sleep(1.0)
                os.killpg(proc.pid, signal.SIGINT)
                break
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err_lines = [e for e in err.splitlines() if e.strip() and "cuda" not in e.lower() and "absl" not in e
                 and "oneDNN" not in e and "rebuild TensorFlow" not in e]
    assert proc.returncode == 130, (f"SIGINT here: {signal.getsignal(signal.SIGINT)}, blocked: "
                                    f"{signal.SIGINT in signal.pthread_sigmask(signal.SIG_BLOCK, [])}\n"
                                    + "".join(out) + rest + err)
    assert err_lines == ["interrupted; outputs written so far are complete (run the same command with --resume to "
                         "continue)"], err


def test_a_run_started_before_value_stats_existed_resumes(tmp_path):
    from dataclasses import asdict

    from xmdl_tf.distributed import ChunkPlan, _create

    plan = ChunkPlan("/data/v.tif", "/m/model.keras", (4, 64, 64), (4, 64, 64), 8, None, {}, (-5.0, 900.0, True))
    out = tmp_path / "o.zarr"
    _create(out, plan, overwrite=False, resume=False)
    state = out / ".xmdl" / "state.json"
    old = {k: v for k, v in json.loads(state.read_text()).items() if k != "value_stats"}
    state.write_text(json.dumps(old))
    _create(out, plan, overwrite=False, resume=True)  # the same run: resumed, not "other settings ()"
    state.write_text(json.dumps({**asdict(plan), "halo": 16, "value_stats": list(plan.value_stats)}))
    with pytest.raises(DataError, match=r"other settings \(halo\)"):
        _create(out, plan, overwrite=False, resume=True)
    # An inference setting is named as itself.
    state.write_text(json.dumps({**asdict(plan), "inference": {"threshold": 0.5}, "value_stats": list(plan.value_stats)}))
    with pytest.raises(DataError, match=r"other settings \(inference threshold\)"):
        _create(out, plan, overwrite=False, resume=True)


def test_out_inside_the_input_store_is_refused(blob_run, tmp_path, capsys):
    """An OUT.zarr inside a Zarr input becomes part of that store: the workers (and any later run) then
    find several 3-D arrays there and cannot read the input any more."""
    from xmdl_tf.volume import main

    image = blob_volume((24, 64, 64), n=1)[0][:8]
    src = tmp_path / "in.zarr"
    zarr.open_group(str(src), mode="w", zarr_format=2).create_array("raw", data=image)
    out = src / "res.zarr"
    assert main([str(src), "--out", str(out), "--model", str(blob_run[1])]) == 2
    err = capsys.readouterr().err
    assert "inside the input" in err and "Traceback" not in err, err
    assert sorted(p.name for p in src.iterdir()) == [".zattrs", ".zgroup", "raw"] or \
        sorted(p.name for p in src.iterdir()) == [".zgroup", "raw"]


def test_a_constant_chunk_is_not_a_whole_volume_read_and_a_constant_volume_one_line(client, blob_run, tmp_path,
                                                                                    monkeypatch):
    from xmdl_tf.distributed import ChunkPlan, _CACHE, task_histogram
    from xmdl_tf.volume_io import Volume

    image = blob_volume((24, 64, 64), n=1)[0][:8]
    image[:, :, :32] = 0  # a blank margin: the left chunks are constant
    write_volume_tiff(tmp_path / "margin.tif", image)
    plan = ChunkPlan(str(tmp_path / "margin.tif"), "model", image.shape, (8, 64, 32), 8, None, {}, None)
    _CACHE.clear()

    def whole_read(self, *a, **k):
        raise AssertionError("a worker read the whole volume for a constant chunk")

    monkeypatch.setattr(Volume, "value_stats", whole_read)
    counts = task_histogram(plan, plan.grid[0])[0]
    assert counts[:, 0].tolist() == [64 * 32] * 8
    _CACHE.clear()
    monkeypatch.undo()
    # A constant 8-bit volume (known only once its histograms are in): one line, and no OUT left.
    write_volume_tiff(tmp_path / "const.tif", np.full((4, 64, 64), 7, np.uint8))
    with pytest.raises(DataError, match="constant volume"):
        _run(client, tmp_path / "const.tif", tmp_path / "c.zarr", blob_run[1], chunks=(4, 64, 64))
    assert not (tmp_path / "c.zarr").exists()


def test_a_corrupt_slice_read_by_a_worker_is_one_line(blob_run, tmp_path, capfd):
    """A DataError raised in a worker (here a slice whose header reads but whose pixels do not) is
    reported once by the driver, without Dask's "Compute Failed" log and the worker's traceback."""
    import cv2

    from xmdl_tf.volume import main

    image = blob_volume((24, 64, 64), n=1)[0][:8]
    folder = tmp_path / "slices"
    folder.mkdir()
    for z in range(4):
        cv2.imwrite(str(folder / f"im{z}.png"), image[z])
    (folder / "im2.png").write_bytes((folder / "im2.png").read_bytes()[:300])  # cut short
    capfd.readouterr()
    assert main([str(folder), "--out", str(tmp_path / "o.zarr"), "--model", str(blob_run[1]), "--workers", "1",
                 "--tile", "64"]) == 2
    err = capfd.readouterr().err
    assert "im2.png: not a readable image" in err
    assert "Compute Failed" not in err and "Traceback" not in err, err


def _canvas(image: np.ndarray, size: int, y: int, x: int) -> np.ndarray:
    """Each slice of `image` (tissue never 0) set into a black size x size canvas at (y, x)."""
    out = np.zeros((len(image), size, size), image.dtype)
    out[:, y:y + image.shape[1], x:x + image.shape[2]] = np.maximum(image, 30)
    return out


def test_padding_found_on_blocks_is_the_whole_slice_padding():
    """The chunked path never holds a whole slice: it finds a slice's padding on its grid of s x s blocks
    (their extremes combined from the chunks) and gives each chunk its share. Cut into pieces, that is
    the padding and the tissue histogram the whole-slice path (`predict.without_padding`) finds."""
    from xmdl_tf.distributed import chunk_padding, slice_padding
    from xmdl_tf.predict import without_padding
    from xmdl_tf.sampling import block_extremes, grey_counts

    vol = blob_volume((24, 96, 96), seed=4, n=3)[0][11:13]
    canvas = np.kron(_canvas(vol, 150, 27, 27), np.ones((1, 2, 2), np.uint8))  # 300 x 300: blocks of 2 px
    canvas[1][canvas[1] == 0] = 3  # the second slice's canvas is grey 3, its lowest value,
    canvas[1][:, 295:] = 255  # and it has a saturated margin as well: padding of its highest value
    canvas[1][150, 100:140] = 3  # tissue of exactly the canvas's grey, not touching it: tissue
    s = 2
    pieces = [(slice(0, 150), slice(0, 150)), (slice(150, 300), slice(120, 300)), (slice(0, 150), slice(150, 300)),
              (slice(150, 300), slice(0, 120)), (slice(31, 141), slice(141, 263))]
    hist = np.stack([grey_counts(c) for c in canvas])
    bmin, bmax = np.full((2, 150, 150), 255, np.uint8), np.zeros((2, 150, 150), np.uint8)
    for ys, xs in pieces[:4]:  # the extremes of the blocks, combined over chunks (one cuts blocks in two)
        for z in range(2):
            lo, hi = block_extremes(canvas[z][ys, xs], s, (ys.start, xs.start))
            at = (z, slice(ys.start // s, ys.start // s + lo.shape[0]), slice(xs.start // s, xs.start // s + lo.shape[1]))
            bmin[at], bmax[at] = np.minimum(bmin[at], lo), np.maximum(bmax[at], hi)
    codes = slice_padding(hist, bmin, bmax)
    for z in range(2):
        _, counts, pad = without_padding(canvas[z])
        assert pad is not None and pad.sum() == 300 * 300 - 192 * 192  # (both slices: canvas and margin)
        assert not pad[150, 100:140].any()
        for ys, xs in pieces:
            rows, cols = (np.minimum(np.arange(r.start, r.stop) // s, 149) for r in (ys, xs))
            piece_pad, piece_counts = chunk_padding(canvas[z][ys, xs], codes[z], hist[z], rows, cols)
            np.testing.assert_array_equal(piece_counts, counts)
            np.testing.assert_array_equal(piece_pad if piece_pad is not None else False, pad[ys, xs])


def test_clipped_tissue_is_no_padding_on_any_grid():
    """Dark tissue clipped to 0 in half its pixels at the edge of a 1024-px slice is no padding: no whole
    block of a grid of 4 x 4 px is 0 (single sampled pixels were; the chunked path then zeroed it)."""
    from xmdl_tf.predict import without_padding
    from xmdl_tf.sampling import padding_mask

    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 30, (1024, 1024)), 1, 255).astype(np.uint8)
    img[:, :200] = np.where(rng.random((1024, 200)) < 0.57, 0, img[:, :200])
    assert padding_mask(img) is None and without_padding(img)[2] is None
    # Two grey values only, both at the edge ("padding" everywhere): no tissue would be left, so none.
    two = np.zeros((64, 64), np.uint8)
    two[:, 32:] = 255
    assert padding_mask(two) is None


def test_a_padded_volume_is_segmented_as_in_memory(client, blob_run, tmp_path):
    """A registered stack's sections in a black canvas: each slice's padding is left out of the
    normalisation and predicted 0 by the chunked path as by `analyze --volume`, so whole-slice chunks
    give its probability, and chunks that cut the canvas give 0 in the padding as well."""
    vol = blob_volume((24, 96, 96), seed=2, n=3)[0][10:14]
    canvas = _canvas(vol, 128, 24, 8)
    write_volume_tiff(tmp_path / "padded.tif", canvas, VOXEL)
    mem = _in_memory(blob_run[1], canvas)
    assert (mem.probability[canvas == 0] == 0).all()
    _run(client, tmp_path / "padded.tif", tmp_path / "whole.zarr", blob_run[1], chunks=(4, 128, 128))
    prob = zarr.open_array(str(tmp_path / "whole.zarr" / "0"))[:]
    np.testing.assert_allclose(prob, mem.probability, atol=1e-4)
    _run(client, tmp_path / "padded.tif", tmp_path / "cut.zarr", blob_run[1], chunks=(4, 64, 64))
    cut = zarr.open_array(str(tmp_path / "cut.zarr" / "0"))[:]
    assert (cut[canvas == 0] == 0).all()
    assert np.mean((cut >= 0.5) == (mem.probability >= 0.5)) > 0.99
    assert sorted(p.name for p in (tmp_path / "cut.zarr" / ".xmdl").iterdir()) == ["done", "histograms.npy",
                                                                                    "state.json"]
