"""Volumes bigger than one machine: chunked OME-Zarr processing on Dask.

    python -m xmdl_tf.volume INPUT --out OUT.zarr [--model M] [--scheduler local|ADDRESS]
        [--workers N] [--chunks Z Y X] [--voxel-size Z Y X] [--resume]

The volume is never held whole by anyone. The work is cut into Dask tasks, each
small, idempotent and recorded as done under OUT.zarr/.xmdl/ when it has
written its output, so a worker that dies has its task rerun elsewhere with
the same result, and `--resume` skips what an interrupted run finished:

1. histograms: each chunk's grey-value histogram per slice, summed over the
   chunks of a slice -> the normalisation each slice would get whole;
2. probability: per chunk, its slices plus an XY halo predicted by the 2-D
   model (loaded once per worker), the halo cropped, written to OUT.zarr/0;
3. components: 26-connected components of probability >= threshold over the
   whole volume: each chunk labelled on its own, ids touching across chunk
   faces, edges and corners merged by a union-find, every chunk rewritten
   with global ids (through zarr, so no worker holds the volume's labels);
   with their sizes and bounding boxes;
4. objects: per component (in batches), the very functions of the in-memory
   path (`instances3d.split_crop`, `morphometry3d.object_row`) on the
   component's bounding box wherever it lies, so one object that crosses
   chunk borders is one object, measured whole;
5. labels: per chunk, every component's objects painted with global ids ->
   OUT.zarr/labels/instances/0;
6. pyramids (2x in y and x per level) and OME-Zarr (NGFF 0.4) metadata;
   objects.csv (one row per object) and summary.json beside them.

On a volume that fits in memory the result equals `analyze --volume`: the
same objects up to relabelling and the same table (without Grad-CAM), as
long as the chunks hold whole slices (else up to the seams of tiled
inference, as in 2-D). `process_volume(..., client=...)` runs on any
`distributed.Client` (a SLURM cluster from dask-jobqueue, Kubernetes, ...).
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
import threading
from typing import Any, Callable, Sequence

import numpy as np

from . import cli
from .config import InferenceConfig
from .io import DataError

log = logging.getLogger(__name__)

WORK = ".xmdl"  # work folder inside OUT.zarr
DEFAULT_CHUNKS = (32, 1024, 1024)
DEFAULT_HALO = 64  # px each side in y and x: the 2-D path's tile overlap
COMPONENTS_PER_TASK = 32


@dataclass(frozen=True)
class ChunkPlan:
    """What one run does; stored in OUT.zarr/.xmdl/state.json so `--resume` continues the same run."""

    source: str
    model: str
    shape: tuple[int, int, int]
    chunks: tuple[int, int, int]
    halo: int
    voxel_size_nm: tuple[float, float, float] | None
    inference: dict = field(default_factory=dict)
    # (min, max, all integral) of a volume that is not uint8/uint16: read once by the driver, so
    # that no worker reads the whole volume again for its grey-value map (`Volume.image_slab`).
    value_stats: tuple[float, float, bool] | None = None

    @property
    def grid(self) -> list[tuple[slice, slice, slice]]:
        """Every chunk's region, in raster order."""
        starts = [range(0, n, c) for n, c in zip(self.shape, self.chunks)]
        return [tuple(slice(a, min(a + c, n)) for a, c, n in zip(corner, self.chunks, self.shape))
                for corner in np.array(np.meshgrid(*starts, indexing="ij")).reshape(3, -1).T]


def _check_chunks(chunks: Sequence[int], halo: int, shape: Sequence[int]) -> tuple[int, int, int]:
    chunks = tuple(int(c) for c in chunks)
    if len(chunks) != 3 or min(chunks) < 1:
        raise DataError(f"--chunks needs three positive sizes Z Y X, got {chunks}")
    for c, n, ax in zip(chunks[1:], shape[1:], "yx"):
        if c < min(2 * halo, n):
            raise DataError(f"--chunks: {ax} chunk {c} px is smaller than the halo on both sides (2 x {halo} px); "
                            "use chunks of at least 2 x the halo (or a smaller --halo)")
    return tuple(min(c, n) for c, n in zip(chunks, shape))


# ----------------------------------------------------------------------------
# Worker side: one model and one open volume per worker process


_CACHE: dict = {}


def _volume(plan: ChunkPlan):
    from .volume_io import open_volume

    key = ("volume", plan.source)
    if key not in _CACHE:
        _CACHE[key] = open_volume(plan.source, kind="image")
        if plan.value_stats is not None:
            _CACHE[key].use_value_stats(plan.value_stats)
    return _CACHE[key]


def _predictor(model: str, tf_threads: int | None):
    key = ("model", model)
    if key not in _CACHE:
        if tf_threads:
            import tensorflow as tf

            try:  # only possible before TensorFlow's first op in this process
                tf.config.threading.set_intra_op_parallelism_threads(tf_threads)
                tf.config.threading.set_inter_op_parallelism_threads(max(1, tf_threads // 2))
            except RuntimeError:
                pass
        from .predict import load_model

        _CACHE[key] = load_model(model)
    return _CACHE[key]


def _marker(out: Path, stage: str, key: str) -> Path:
    return out / WORK / "done" / stage / key


def _mark(out: Path, stage: str, key: str, payload: bytes = b"") -> None:
    from .runlock import atomic_write_bytes

    path = _marker(out, stage, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, payload)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """np.save through `runlock.atomic_write_bytes`: a killed run leaves the file whole or absent."""
    import io

    from .runlock import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write_bytes(path, buf.getvalue())


def _key(region: Sequence[slice]) -> str:
    return "_".join(str(s.start) for s in region)


def task_histogram(plan: ChunkPlan, region) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(z, 65536) int64 grey-value counts of each slice of a chunk, and the (min, max) grey value of each
    block of each slice's padding grid that the chunk overlaps (`sampling.block_extremes`: (z, bh, bw),
    blocks at multiples of `sampling.padding_stride`; a block shared with another chunk is combined)."""
    from .sampling import block_extremes, grey_values, padding_stride

    # The driver checks for a constant volume (from these histograms); a constant chunk (a blank margin)
    # must not make each worker read the whole volume to tell.
    img = _volume(plan).image_slab(region[0].start, region[0].stop, region[1:], check_constant=False)
    s = padding_stride(plan.shape[1:])
    origin = (region[1].start, region[2].start)
    lo, hi = zip(*(block_extremes(grey_values(p), s, origin) for p in img))
    return (np.stack([np.bincount(p.ravel().astype(np.int64), minlength=65536) for p in img]),
            np.stack(lo).astype(np.uint16), np.stack(hi).astype(np.uint16))


def slice_padding(hist: np.ndarray, bmin: np.ndarray, bmax: np.ndarray) -> np.ndarray:
    """uint8 (z, bh, bw) padding codes of each slice on its block grid (`sampling.padding_blocks`;
    0 everywhere for a slice without padding)."""
    from .sampling import padding_blocks

    codes = np.zeros(bmin.shape, np.uint8)
    for z in range(len(hist)):
        found = padding_blocks(bmin[z], bmax[z], hist[z])
        if found is not None:
            codes[z] = found
    return codes


def chunk_padding(image: np.ndarray, codes: np.ndarray, counts: np.ndarray, rows: np.ndarray,
                  cols: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """(padding mask of a piece of a slice or None, the slice's tissue histogram): `sampling.padding_pixels`
    with the slice's codes (`slice_padding`); rows, cols: each of the piece's rows' (columns') block."""
    from .sampling import grey_values, padding_pixels

    if not codes.any():
        return None, counts
    return padding_pixels(grey_values(image), codes, counts, rows, cols)


def task_predict(plan: ChunkPlan, out: str, region, histograms: str, tf_threads: int | None,
                 padding: str | None = None) -> str:
    """Predict one chunk (slice by slice, with an XY halo) into OUT.zarr/0; returns its key.

    histograms: .npy file of each whole slice's grey-value counts (z, grey levels),
    so a chunk is normalised as its slice. padding: .npy file of the slices'
    padding codes on their block grids (`slice_padding`), or None (a run started
    before padding was handled).
    """
    import zarr

    out = Path(out)
    key = _key(region)
    if _marker(out, "probability", key).exists():
        return key
    zs, ys, xs = region
    h = plan.halo
    Y, X = plan.shape[1:]
    pred = _predictor(plan.model, tf_threads)
    # The halo grown out to multiples of the network's size divisor: the tiles then sit on the pooling
    # grid of a whole-slice prediction (a U-Net is shift-equivariant only by multiples of 2**levels),
    # so a chunk boundary anywhere changes the probability only through context, not everywhere.
    d = pred.size_divisor
    grown = tuple(slice(max(s.start - h, 0) // d * d, min(-(-(s.stop + h) // d) * d, n))
                  for s, n in ((ys, Y), (xs, X)))
    img = _volume(plan).image_slab(zs.start, zs.stop, grown, check_constant=False)
    counts = np.load(histograms, mmap_mode="r")[zs.start:zs.stop]
    ic = InferenceConfig(**plan.inference)
    px = plan.voxel_size_nm[2] if plan.voxel_size_nm else None
    inner = (slice(ys.start - grown[0].start, ys.stop - grown[0].start),
             slice(xs.start - grown[1].start, xs.stop - grown[1].start))
    prob = np.empty((zs.stop - zs.start, ys.stop - ys.start, xs.stop - xs.start), np.float32)
    codes = np.load(padding, mmap_mode="r")[zs.start:zs.stop] if padding else None
    if codes is not None:
        from .sampling import padding_stride

        s = padding_stride(plan.shape[1:])
        rows, cols = (np.minimum(np.arange(g.start, g.stop) // s, n - 1) for g, n in zip(grown, codes.shape[1:]))
    for k in range(len(img)):
        pad, c = (None, np.asarray(counts[k])) if codes is None else \
            chunk_padding(img[k], np.asarray(codes[k]), np.asarray(counts[k]), rows, cols)
        p = pred.predict_slice(img[k], ic.tile, ic.overlap, ic.batch_size, tta=ic.tta, pixel_size_nm=px,
                               rescale=ic.rescale, counts=c, padding=pad)
        prob[k] = p[inner]
    zarr.open_array(str(out / "0"), mode="r+")[zs, ys, xs] = prob
    _mark(out, "probability", key)
    return key


def task_component_stats(cc_path: str, region) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, voxel counts, box starts (n, 3), box stops (n, 3)) of the components in one chunk."""
    import zarr
    from scipy import ndimage as ndi

    cc = np.asarray(zarr.open_array(cc_path, mode="r")[region])
    ids, counts = np.unique(cc, return_counts=True)
    keep = ids > 0
    ids, counts = ids[keep], counts[keep]
    boxes = ndi.find_objects(cc, max_label=int(ids.max()) if len(ids) else 0) if len(ids) else []
    lo = np.array([[s.start + r.start for s, r in zip(boxes[i - 1], region)] for i in ids], np.int64).reshape(-1, 3)
    hi = np.array([[s.stop + r.start for s, r in zip(boxes[i - 1], region)] for i in ids], np.int64).reshape(-1, 3)
    return ids.astype(np.int64), counts.astype(np.int64), lo, hi


def task_objects(plan: ChunkPlan, out: str, batch: int, comps: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                 sizes: np.ndarray, min_size: int) -> list[dict]:
    """Separate and measure a batch of components (`instances3d.split_crop`, `morphometry3d.object_row`).

    Saves each component's object labels (its region and the crop of ids
    1..k) to OUT.zarr/.xmdl/objects/<id>.npz; returns the rows, each with
    its `component` and `sub` (1..k) id.
    """
    import zarr
    from scipy import ndimage as ndi

    from .instances3d import _SMALL, Separation, split_crop
    from .morphometry3d import object_row

    out = Path(out)
    done = _marker(out, "objects", str(batch))
    if done.exists():
        return json.loads(done.read_text())
    cc_arr = zarr.open_array(str(out / WORK / "cc"), mode="r")
    params = Separation.make(plan.voxel_size_nm, separate=InferenceConfig(**plan.inference).separate)
    vol = _volume(plan)
    folder = out / WORK / "objects"
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, a, b in zip(comps.tolist(), lo, hi):
        small = sizes[i] < _SMALL
        bbox = tuple(slice(int(s), int(e)) for s, e in zip(a, b))
        region = bbox if small else params.region(bbox, plan.shape)
        crop = np.asarray(cc_arr[region]).astype(np.int32)
        crop[(sizes[np.minimum(crop, len(sizes) - 1)] < min_size) & (crop > 0)] = 0  # dropped components
        comp, sub = split_crop(crop, i, region, plan.shape, params, small=small, min_size=min_size)
        sub = np.where(comp, sub, 0)
        np.savez_compressed(folder / f"{i}.npz", start=[s.start for s in region], sub=sub.astype(np.uint32))
        for k, bb in enumerate(ndi.find_objects(sub), start=1):
            if bb is None:
                continue
            origin = [r.start + s.start for r, s in zip(region, bb)]
            box = tuple(slice(o, o + (s.stop - s.start)) for o, s in zip(origin, bb))
            image = vol.image_slab(box[0].start, box[0].stop, box[1:], check_constant=False)
            row = object_row(k, sub[bb] == k, origin, plan.shape, plan.voxel_size_nm, image=image)
            rows.append({**{c: (v.item() if hasattr(v, "item") else v) for c, v in row.items()},
                         "component": int(i), "sub": int(k)})
    _mark(out, "objects", str(batch), json.dumps(rows).encode())
    return rows


def task_paint(out: str, region, comps: list[int], offsets: dict[int, int]) -> str:
    """Write one chunk of the instance labels: each component's objects with their global ids."""
    import zarr

    out = Path(out)
    key = _key(region)
    if _marker(out, "labels", key).exists():
        return key
    block = np.zeros(tuple(s.stop - s.start for s in region), np.uint32)
    for i in comps:
        saved = np.load(out / WORK / "objects" / f"{i}.npz")
        start, sub = saved["start"], saved["sub"]
        inter = [slice(max(r.start, s), min(r.stop, s + n)) for r, s, n in zip(region, start, sub.shape)]
        if any(sl.start >= sl.stop for sl in inter):
            continue
        piece = sub[tuple(slice(sl.start - s, sl.stop - s) for sl, s in zip(inter, start))]
        target = block[tuple(slice(sl.start - r.start, sl.stop - r.start) for sl, r in zip(inter, region))]
        on = piece > 0
        target[on] = piece[on] + offsets[i]
    zarr.open_array(str(out / "labels" / "instances" / "0"), mode="r+")[region] = block
    _mark(out, "labels", key)
    return key


def task_local_components(out: str, region, threshold: float) -> int:
    """26-connected components of one chunk's foreground, ids 1..n local to the chunk -> .xmdl/cc_local."""
    import zarr
    from scipy import ndimage as ndi

    prob = np.asarray(zarr.open_array(str(Path(out) / "0"), mode="r")[region])
    local = np.empty(prob.shape, np.int32)
    n = ndi.label(prob >= threshold, structure=np.ones((3, 3, 3), bool), output=local)
    zarr.open_array(str(Path(out) / WORK / "cc_local"), mode="r+")[region] = local
    return int(n)


def _offset_plane(plan: ChunkPlan, axis: int, index: int, offsets: dict) -> np.ndarray:
    """The per-chunk id offsets laid out over the plane `index` along `axis` (the other two axes)."""
    other = [a for a in range(3) if a != axis]
    plane = np.zeros([plan.shape[a] for a in other], np.int64)
    for region, off in offsets.items():
        r = [slice(*b) for b in region]
        if r[axis].start <= index < r[axis].stop:
            plane[r[other[0]], r[other[1]]] = off
    return plane


def task_face_pairs(out: str, plan: ChunkPlan, axis: int, index: int, offsets: dict) -> np.ndarray:
    """(n, 2) global ids joined across the boundary between planes index-1 and index along `axis`.

    Whole planes of the volume are compared, shifted by -1, 0, 1 along both
    other axes, so 26-connectivity across chunk faces, edges and corners is
    exact.
    """
    import zarr

    cc = zarr.open_array(str(Path(out) / WORK / "cc_local"), mode="r")
    key_a = tuple(slice(index - 1, index) if a == axis else slice(None) for a in range(3))
    key_b = tuple(slice(index, index + 1) if a == axis else slice(None) for a in range(3))
    a = np.squeeze(np.asarray(cc[key_a]), axis).astype(np.int64)
    b = np.squeeze(np.asarray(cc[key_b]), axis).astype(np.int64)
    a = np.where(a > 0, a + _offset_plane(plan, axis, index - 1, offsets), 0)
    b = np.where(b > 0, b + _offset_plane(plan, axis, index, offsets), 0)
    pairs = []
    h, w = a.shape
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            pa = a[max(dy, 0): h + min(dy, 0), max(dx, 0): w + min(dx, 0)]
            pb = b[max(-dy, 0): h + min(-dy, 0), max(-dx, 0): w + min(-dx, 0)]
            both = (pa > 0) & (pb > 0)
            pairs.append(np.stack([pa[both], pb[both]], 1))
    return np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)


def task_relabel(out: str, region, offset: int, lut: np.ndarray) -> None:
    """Write one chunk of the global component ids: lut[offset + local id]."""
    import zarr

    local = np.asarray(zarr.open_array(str(Path(out) / WORK / "cc_local"), mode="r")[region])
    glob = np.where(local > 0, lut[np.where(local > 0, local + offset, 0)], 0).astype(np.int32)
    zarr.open_array(str(Path(out) / WORK / "cc"), mode="r+")[region] = glob


def _components(client, out: Path, plan: ChunkPlan, threshold: float, grid: list, report: "Reporter") -> None:
    """Global 26-connected components of probability >= threshold, streamed through zarr (.xmdl/cc).

    Not `dask_image.ndmeasure.label`: it keeps every block's labels in worker
    memory until the global relabelling, a volume-sized int32 array. Here
    each chunk is labelled and written, pairs of ids touching across chunk
    boundaries are read from whole boundary planes, merged by a union-find
    on the client (ids only) and each chunk rewritten with global ids.
    """
    import zarr
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    for name in ("cc_local", "cc"):
        zarr.open_array(str(out / WORK / name), mode="w", shape=plan.shape, chunks=plan.chunks, dtype="int32",
                        fill_value=0, zarr_format=2)
    futs = client.map(task_local_components, [str(out)] * len(grid), grid, [threshold] * len(grid), pure=False)
    counts = _gather(client, futs, "chunk components", report)
    offsets, total = {}, 0
    for region, n in zip(grid, counts):
        offsets[tuple((r.start, r.stop) for r in region)] = total
        total += n
    bounds = [(axis, i) for axis in range(3) for i in range(plan.chunks[axis], plan.shape[axis], plan.chunks[axis])]
    o = client.scatter(offsets, broadcast=True)
    futs = [client.submit(task_face_pairs, str(out), plan, axis, i, o, pure=False) for axis, i in bounds]
    pairs = _gather(client, futs, "chunk-boundary merges", report) if futs else []
    pairs = np.concatenate(pairs) if len(pairs) else np.zeros((0, 2), np.int64)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(total + 1, total + 1))
    _, comp = connected_components(graph, directed=False)
    # Number the merged components 1.. in order of their first local id (0 stays background).
    _, first = np.unique(comp[1:], return_index=True)
    order = np.empty(len(first), np.int64)
    order[np.argsort(first)] = np.arange(1, len(first) + 1)
    lut = np.zeros(total + 1, np.int32)
    lut[1:] = order[np.unique(comp[1:], return_inverse=True)[1]]
    lut_f = client.scatter(lut, broadcast=True)
    futs = client.map(task_relabel, [str(out)] * len(grid), grid, [offsets[tuple((r.start, r.stop) for r in g)]
                                                                   for g in grid], [lut_f] * len(grid), pure=False)
    _gather(client, futs, "global component ids", report)



# ----------------------------------------------------------------------------
# Client side


def _without_sigint(start: Callable[[], Any]) -> Any:
    """start() with Ctrl-C ignored, so that the worker processes it spawns inherit the ignoring.

    Ctrl-C reaches every process of the terminal's group: workers would die mid-task, each printing
    a traceback. Ignoring it there leaves the interrupt to this process, which stops the run and
    closes the cluster in order. (Python installs its KeyboardInterrupt handler only where SIGINT is
    not ignored at start-up.) Only the main thread may set signal handlers; elsewhere (napari's
    worker thread) start() runs as is.
    """
    import signal

    _quiet_resource_tracker()
    if threading.current_thread() is not threading.main_thread():
        return start()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return start()
    finally:
        signal.signal(signal.SIGINT, previous)


def _quiet_resource_tracker() -> None:
    """Start multiprocessing's resource tracker (shared with the workers it spawns) told not to warn.

    A worker killed in mid-task when an interrupted run closes leaves a semaphore that the tracker
    removes at exit, with a "leaked semaphore" warning that reads like a fault; its warning filters
    come from this interpreter's -W options when it starts. Nothing happens if it already runs.
    """
    import sys
    from multiprocessing import resource_tracker

    option = "ignore::UserWarning"
    sys.warnoptions.append(option)
    try:
        resource_tracker.ensure_running()
    finally:
        sys.warnoptions.remove(option)


def _log_level(level: int, *names: str) -> None:
    """Set the loggers `names` to `level` (here, or on each worker through `Client.run`)."""
    for name in names:
        logging.getLogger(name).setLevel(level)


class _DataErrorFilter(logging.Filter):
    """Drops a worker's "Compute Failed" log (with its traceback) of a DataError: bad input that the
    driver reports as one line when it re-raises it."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        return not (str(record.msg).startswith("Compute Failed") and len(args) > 3
                    and str(args[3]).startswith("DataError("))


def _quiet_data_errors() -> None:
    """Install `_DataErrorFilter` on this (worker) process's `distributed.worker` logger."""
    logger = logging.getLogger("distributed.worker")
    if not any(isinstance(f, _DataErrorFilter) for f in logger.filters):
        logger.addFilter(_DataErrorFilter())


def _cluster(client, scheduler: str, workers: int):
    """(client, close) for an existing client, an address, or a LocalCluster of `workers` processes."""
    from distributed import Client, LocalCluster

    if client is not None:
        return client, lambda interrupted=False: None
    if scheduler != "local":
        c = Client(scheduler)
        return c, lambda interrupted=False: c.close()
    # No dashboard; the scheduler's HTTP endpoints on a free port (its default, 8787, warns when another
    # cluster, e.g. a second run, holds it).
    cluster = _without_sigint(lambda: LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                                   dashboard_address=None,
                                                   scheduler_kwargs={"dashboard_address": ":0"}))
    c = Client(cluster)
    # Our own workers only (a user's cluster keeps its logging): tasks cancelled by a closing run
    # are expected, not worth a warning each.
    c.run(_log_level, logging.ERROR, "distributed.worker.state_machine")
    c.run(_quiet_data_errors)

    def close(interrupted: bool = False):
        if interrupted:  # workers cut off mid-task and mid-heartbeat would each log it
            try:
                c.run(_log_level, logging.CRITICAL, "distributed")
            except Exception:  # noqa: BLE001 - closing matters more than quiet
                pass
        c.close()
        # A worker that takes over the nanny's 4 s to exit (TensorFlow's teardown) is killed with a
        # warning: expected at the end of a run, not news to the user.
        nanny = logging.getLogger("distributed.nanny")
        level = nanny.level
        nanny.setLevel(logging.ERROR)
        try:
            cluster.close()
        finally:
            nanny.setLevel(level)

    return c, close


class Cancelled(RuntimeError):
    """A run stopped because its cancel event was set (`--resume` continues it)."""


@dataclass
class Reporter:
    """Where a run's progress goes: stdout lines (`verbose`) and/or a callback, plus a cancel event.

    progress(stage, done, total) is called in the calling thread each time a
    task of the stage finishes (stage: "histograms", "probability", ...).
    """

    verbose: bool = True
    progress: Callable[[str, int, int], None] | None = None
    cancel: threading.Event | None = None
    # On a cluster this run did not start (it stays up), cancelled tasks still running must finish before
    # the run returns: a --overwrite that follows would otherwise have them write into its new store.
    drain: bool = False


def _gather(client, futures, what: str, report: Reporter):
    """Results of `futures` in order, with Dask's progress bar on a terminal (a line per stage otherwise).

    With a callback or cancel event, waits task by task: progress per
    finished task, and on cancel the remaining tasks are cancelled and
    `Cancelled` raised (what finished stays written and marked done).
    """
    import sys

    from distributed import as_completed, progress

    t0 = time.time()
    stage = what.split(" (")[0]
    if report.verbose:
        print(f"  {what}: {len(futures)} task(s)", flush=True)
        if sys.stdout.isatty() and report.progress is None:
            progress(futures, notebook=False)
            print(flush=True)
    if report.progress is not None or report.cancel is not None:
        if report.progress is not None:
            report.progress(stage, 0, len(futures))
        for done, _ in enumerate(as_completed(futures), 1):
            if report.progress is not None:
                report.progress(stage, done, len(futures))
            if report.cancel is not None and report.cancel.is_set():
                client.cancel(futures)
                if report.drain:
                    _drain(client, {f.key for f in futures})
                raise Cancelled("cancelled")
    results = client.gather(futures)
    if report.verbose:
        print(f"    done in {time.time() - t0:.1f} s", flush=True)
    return results


def _running_keys(dask_worker) -> list:
    """Keys of the tasks occupying a worker's threads, cancelled ones included (run on each worker)."""
    return [ts.key for ts in dask_worker.state.all_running_tasks]


def _drain(client, keys: set, timeout_s: float = 600.0) -> None:
    """Wait until no worker still runs one of `keys` (a cancelled task runs to its end: Dask cannot stop
    a running function)."""
    t0 = time.time()
    while time.time() - t0 < timeout_s:
        busy = {k for ks in client.run(_running_keys).values() for k in ks} & keys
        if not busy:
            return
        time.sleep(0.2)
    log.warning("%d cancelled task(s) still running after %.0f s", len(busy), timeout_s)


def _create(out: Path, plan: ChunkPlan, overwrite: bool, resume: bool) -> bool:
    """Create OUT.zarr for `plan` (True), or check it belongs to the same run (`resume`, False)."""
    import zarr

    state = out / WORK / "state.json"
    if out.exists():
        if not state.is_file() and (not out.is_dir() or any(out.iterdir())):
            # Neither --resume nor --overwrite may touch what this command did not write: it could be
            # the input itself, or anyone's data.
            raise FileExistsError(f"{out}: exists and is not a run of this command (no {WORK}/state.json); "
                                  "choose another --out")
        if resume and state.is_file():
            old = json.loads(state.read_text())
            mine = json.loads(json.dumps(asdict(plan)))
            for key in ("value_stats",):  # added later: a run started before it had it computed per worker
                old.setdefault(key, mine[key])
            if old != mine:
                raise DataError(f"{out}: was started with other settings ({', '.join(cli.differing(old, mine))}); "
                                "resume with the same ones, or use --overwrite")
            return False
        if not overwrite:
            raise FileExistsError(f"{out} exists; use --resume to continue that run, --overwrite to replace it, "
                                  "or another --out")
        _set_aside(out)
    out.mkdir(parents=True)
    root = zarr.open_group(str(out), mode="w", zarr_format=2)
    root.create_array("0", shape=plan.shape, chunks=plan.chunks, dtype="float32", fill_value=0)
    labels = root.create_group("labels")
    labels.create_group("instances").create_array("0", shape=plan.shape, chunks=plan.chunks, dtype="uint32",
                                                  fill_value=0)
    (out / WORK).mkdir()
    state.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    return True


def previous_result(out: Path) -> Path:
    """Where --overwrite keeps OUT.zarr's earlier result until the run replacing it completes."""
    return out.with_name(f".{out.name}.previous")


def _set_aside(out: Path) -> None:
    """Move an earlier run's OUT.zarr to `previous_result(out)` (--overwrite): a replacement that fails
    or is interrupted must not have cost the user the result they had."""
    prev = previous_result(out)
    if prev.exists() and not (out / "summary.json").is_file():
        # OUT is an unfinished replacement of the result kept in prev: that one stays the one to keep.
        shutil.rmtree(out)
    else:
        if prev.exists():  # (a completed replacement whose clean-up did not happen)
            shutil.rmtree(prev)
        os.replace(out, prev)
    log.info("%s: the earlier result is kept in %s until this run completes", out, prev)


@contextlib.contextmanager
def _say_where_previous_is(out: Path):
    """On failure or interrupt, tell the user where --overwrite put the earlier result."""
    try:
        yield
    except BaseException:
        if previous_result(out).exists():
            log.warning("%s: the result it held before --overwrite is kept in %s until a run completes "
                        "(the same command with --resume continues this one)", out, previous_result(out))
        raise


def process_volume(source: str, out: str | Path, model: str | Path | None = None, client=None,
                   scheduler: str = "local", workers: int = 2, chunks: Sequence[int] = DEFAULT_CHUNKS,
                   voxel_size_nm: Sequence[float] | None = None, inference: dict | None = None,
                   halo: int = DEFAULT_HALO, resume: bool = False, overwrite: bool = False,
                   verbose: bool = True, progress: Callable[[str, int, int], None] | None = None,
                   cancel: threading.Event | None = None) -> dict:
    """Segment, separate and measure the mitochondria of a volume in chunks on Dask (module docstring).

    source: anything `volume_io.open_volume` reads (OME-Zarr / Zarr v2 and
    v3, HDF5 `file.h5:/path`, TIFF stacks, slice folders). client: a
    `distributed.Client` to use; else `scheduler` "local" (a LocalCluster of
    `workers` processes on this machine) or a scheduler address.
    progress(stage, done, total): called as each task of a stage finishes;
    a set `cancel` stops the run at the next finished task (`Cancelled`),
    leaving it to be continued with `resume=True`.
    Returns the summary written to OUT.zarr/summary.json.
    """
    from .pretrained import NO_DEFAULT, default_model_path
    from .config import Config, resolve_inference
    from .morphometry3d import ShapeRules3D, classify3d, summarize3d, table_from_rows
    from .predict import is_saved_model, resolve_model_path
    from .runlock import FolderLock, atomic_write_text
    from .sampling import padding_stride
    from .volume_io import _split_container, open_volume, resolve_voxel_size, source_path, warn_blank_slices

    t_start = time.time()
    report = Reporter(verbose, progress, cancel, drain=client is not None or scheduler != "local")
    out = Path(out)
    if out.suffix != ".zarr":
        raise DataError(f"--out {out}: the output is an OME-Zarr folder; give it a .zarr name")
    vol = open_volume(source, kind="image")
    cli.refuse_replacing_input(out, source_path(source))
    src = source_path(source).resolve()
    if src.is_dir() and src in out.resolve().parents:
        # A store inside a Zarr input becomes part of it: the input would no longer open (several arrays).
        raise DataError(f"--out {out}: inside the input {source}; the output must not be written into the "
                        "data it reads; choose another --out")
    stats = None
    if np.dtype(vol.dtype) not in (np.uint8, np.uint16, np.bool_):
        # The volume's value range (one read, here), NaN and constant checks: before OUT exists, not in a worker.
        vol.image_slab(0, 1)
        stats = vol.value_stats()
    voxel = resolve_voxel_size(vol, voxel_size_nm)
    model = model or default_model_path()
    if model is None:
        raise FileNotFoundError(NO_DEFAULT)
    if is_saved_model(model):
        raise DataError(f"{model}: the chunked path needs a Keras model folder or .keras file, not a SavedModel")
    mpath, cpath = resolve_model_path(model)
    config = Config.load(cpath) if cpath else None
    ic = resolve_inference(type("P", (), {"config": config})(), inference)
    if config is not None:  # as analyze --volume, on the model's grid
        from .sampling import resample_factor
        from .tiling import check_width

        factor = resample_factor(voxel[2] if voxel else None, config.data.pixel_size_nm) if ic.rescale else 1.0
        try:
            check_width(vol.shape[1:], factor, config.model.size_divisor, "slices")
        except DataError as err:
            raise DataError(f"{vol.source}: {err}") from None
    if ic.tta:
        log.info("test-time augmentation on: 8x the prediction time")
    # The source as an absolute path: workers may run elsewhere, and --resume must recognise the same
    # input given by another relative path.
    container, inner = _split_container(str(source))
    canonical = (f"{Path(container).resolve()}:/{inner}" if container is not None and inner
                 else str(Path(container if container is not None else source).resolve()))
    plan = ChunkPlan(canonical, str(mpath.resolve()), vol.shape, _check_chunks(chunks, halo, vol.shape), int(halo),
                     voxel, asdict(ic), stats)
    min_size = ic.min_volume(voxel)
    if verbose:
        print(f"{vol.source}: {' x '.join(map(str, vol.shape))} voxels (z, y, x), chunks "
              f"{' x '.join(map(str, plan.chunks))}, {len(plan.grid)} chunk(s); voxel "
              + (" x ".join(f"{v:g}" for v in voxel) + " nm" if voxel else "size unknown (voxels)"), flush=True)

    with FolderLock(out, "chunked volume run"), _say_where_previous_is(out):
        fresh = _create(out, plan, overwrite, resume)
        if not fresh and (out / "summary.json").is_file():  # --resume of a finished run
            summary = json.loads((out / "summary.json").read_text())
            if verbose:
                print(f"{out}: already complete ({cli.mitochondria(summary.get('count'))}); nothing to do", flush=True)
            shutil.rmtree(previous_result(out), ignore_errors=True)
            return summary
        client, close = _cluster(client, scheduler, workers)
        interrupted = False
        try:
            n_workers = max(1, len(client.scheduler_info().get("workers", {})) or workers)
            tf_threads = max(1, (os.cpu_count() or 1) // n_workers) if scheduler == "local" else None
            timings = {}
            grid = plan.grid
            work = out / WORK

            # 1. per-slice grey-value histograms, summed over chunks (each chunk is then
            # normalised as its whole slice); cut at the highest grey value present, so an
            # 8-bit volume stores 256 counts per slice
            t0 = time.time()
            hist_file, pad_file = work / "histograms.npy", work / "padding.npy"
            if not hist_file.is_file():
                futs = client.map(task_histogram, [plan] * len(grid), grid, pure=False)
                hist = np.zeros((plan.shape[0], 65536), np.int64)
                st = padding_stride(plan.shape[1:])
                grid_shape = (plan.shape[0], *(-(-n // st) for n in plan.shape[1:]))
                bmin, bmax = np.full(grid_shape, 65535, np.uint16), np.zeros(grid_shape, np.uint16)
                for region, (h, lo, hi) in zip(grid, _gather(client, futs, "histograms", report)):
                    hist[region[0]] += h
                    at = (region[0], *(slice(r.start // st, r.start // st + n)
                                       for r, n in zip(region[1:], lo.shape[1:])))
                    bmin[at], bmax[at] = np.minimum(bmin[at], lo), np.maximum(bmax[at], hi)
                levels = np.flatnonzero(hist.any(0))
                if len(levels) < 2:  # (a volume of another dtype was checked before OUT was created)
                    if fresh:
                        shutil.rmtree(out, ignore_errors=True)
                        if previous_result(out).exists():  # nothing was replaced: put the earlier result back
                            os.replace(previous_result(out), out)
                    raise DataError(f"{vol.source}: constant volume (every voxel is {int(levels.max(initial=0))}); "
                                    "nothing to segment")
                warn_blank_slices(vol.source, np.flatnonzero((hist > 0).sum(1) == 1))
                top = max(256, int(levels.max(initial=0)) + 1)
                # Each slice's constant padding (a registered section in its canvas), found on its block grid
                # and given to every chunk of it: written first, so a histograms.npy always has it beside.
                _save_npy(pad_file, slice_padding(hist, bmin, bmax))
                _save_npy(hist_file, hist[:, :top])
            timings["histograms_s"] = time.time() - t0

            # 2. probability, chunk by chunk with an XY halo
            t0 = time.time()
            todo = [r for r in grid if not _marker(out, "probability", _key(r)).exists()]
            futs = client.map(task_predict, [plan] * len(todo), [str(out)] * len(todo), todo,
                              [str(hist_file)] * len(todo), [tf_threads] * len(todo),
                              [str(pad_file) if pad_file.is_file() else None] * len(todo), pure=False)
            _gather(client, futs, f"probability ({len(grid) - len(todo)} chunk(s) already done)", report)
            timings["probability_s"] = time.time() - t0

            # 3. connected components across chunk faces, sizes and boxes
            t0 = time.time()
            cc_path = str(work / "cc")
            if not _marker(out, "components", "cc").exists():
                _components(client, out, plan, ic.threshold, grid, report)
                _mark(out, "components", "cc")
            futs = client.map(task_component_stats, [cc_path] * len(grid), grid, pure=False)
            ids, counts, los, his = zip(*_gather(client, futs, "component sizes", report))
            n = int(max((int(i.max()) for i in ids if len(i)), default=0))
            sizes = np.zeros(n + 1, np.int64)
            lo = np.full((n + 1, 3), np.iinfo(np.int64).max, np.int64)
            hi = np.zeros((n + 1, 3), np.int64)
            for i, c, a, z in zip(ids, counts, los, his):
                np.add.at(sizes, i, c)
                np.minimum.at(lo, i, a)
                np.maximum.at(hi, i, z)
            kept = np.flatnonzero((sizes >= max(min_size, 1)) & (np.arange(n + 1) > 0))
            timings["components_s"] = time.time() - t0

            # 4. objects: separation and measurement per component, on its whole extent
            t0 = time.time()
            batches = [kept[i:i + COMPONENTS_PER_TASK] for i in range(0, len(kept), COMPONENTS_PER_TASK)]
            s = client.scatter(sizes, broadcast=True)
            futs = [client.submit(task_objects, plan, str(out), k, bt, lo[bt], hi[bt], s, min_size, pure=False)
                    for k, bt in enumerate(batches)]
            rows = [r for part in _gather(client, futs, f"objects of {len(kept)} component(s)", report) for r in part]
            per_comp = {int(i): 0 for i in kept}
            for r in rows:
                per_comp[r["component"]] = max(per_comp[r["component"]], r["sub"])
            offsets, total = {}, 0
            for i in sorted(per_comp):
                offsets[i] = total
                total += per_comp[i]
            for r in rows:
                r["id"] = offsets[r["component"]] + r["sub"]
            timings["objects_s"] = time.time() - t0

            # 5. labels, chunk by chunk
            t0 = time.time()
            from .instances3d import _SMALL, Separation

            grown = {}
            params_pad = Separation.make(voxel).pad_vox
            for i in kept:  # the region each component's saved labels cover
                pad = (0, 0, 0) if sizes[i] < _SMALL else params_pad
                grown[int(i)] = (np.maximum(lo[i] - pad, 0), np.minimum(hi[i] + pad, plan.shape))
            todo = [r for r in grid if not _marker(out, "labels", _key(r)).exists()]
            starts = np.array([g[0] for g in grown.values()]).reshape(-1, 3)
            stops = np.array([g[1] for g in grown.values()]).reshape(-1, 3)
            keys = np.array(list(grown.keys()), np.int64)
            comp_lists = []
            for r in todo:
                r0 = np.array([sl.start for sl in r])
                r1 = np.array([sl.stop for sl in r])
                hit = np.all((starts < r1) & (stops > r0), axis=1) if len(keys) else np.zeros(0, bool)
                comp_lists.append(keys[hit].tolist())
            o = client.scatter(offsets, broadcast=True) if offsets else {}  # (Dask cannot scatter an empty dict)
            futs = client.map(task_paint, [str(out)] * len(todo), todo, comp_lists, [o] * len(todo), pure=False)
            _gather(client, futs, "instance labels", report)
            timings["labels_s"] = time.time() - t0
        except KeyboardInterrupt:
            interrupted = True
            # No log noise from the client's abandoned gathers or the nanny's kills.
            _log_level(logging.CRITICAL, "asyncio", "distributed", "tornado")
            raise
        finally:
            close(interrupted)

        # 6. pyramids, metadata, tables
        t0 = time.time()
        levels = _pyramids(out, plan)
        _ngff_metadata(out, plan, levels)
        table = table_from_rows(sorted(rows, key=lambda r: r["id"]), voxel, image=True)
        table["shape_class"] = classify3d(table, ShapeRules3D())
        atomic_write_text(out / "objects.csv", table.to_csv(index=False))
        timings["pyramids_tables_s"] = time.time() - t0
        summary = {"source": str(source), **summarize3d(table, plan.shape, voxel), "shape_zyx": list(plan.shape),
                   "chunks": list(plan.chunks), "halo_px": plan.halo,
                   "voxel_size_nm": list(voxel) if voxel else None, "components": int(len(kept)),
                   "workers": workers if client is None else None, "seconds": round(time.time() - t_start, 1),
                   **{k: round(v, 1) for k, v in timings.items()}}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, default=float) + "\n")
        # Replaced now (by this run, or by the interrupted one this run resumed).
        shutil.rmtree(previous_result(out), ignore_errors=True)
        # The scratch arrays are volume-sized (two int32 label volumes): a finished run keeps only its
        # state, markers and histograms, enough to know it is finished.
        for name in ("cc", "cc_local", "objects"):
            shutil.rmtree(out / WORK / name, ignore_errors=True)
        (out / WORK / "padding.npy").unlink(missing_ok=True)
    if verbose:
        print(f"{cli.mitochondria(summary['count'])} -> {out} (probability, labels/instances, objects.csv, "
              f"summary.json) in {summary['seconds']:.0f} s", flush=True)
    return summary


def _pyramids(out: Path, plan: ChunkPlan, min_size: int = 256, max_levels: int = 5) -> int:
    """Levels 1.. of the probability (2x2 mean in y, x) and labels (every other voxel); returns the count."""
    import dask.array as da

    levels = 1
    y, x = plan.shape[1:]
    while levels < max_levels and min(y, x) // 2 >= min_size:
        y, x = y // 2, x // 2
        prev = da.from_zarr(str(out / str(levels - 1)))
        prev = prev[:, : 2 * y, : 2 * x]
        nxt = prev.reshape(prev.shape[0], y, 2, x, 2).mean(axis=(2, 4)).astype(np.float32)
        da.to_zarr(nxt.rechunk((plan.chunks[0], min(plan.chunks[1], y), min(plan.chunks[2], x))),
                   str(out / str(levels)), overwrite=True, zarr_format=2)
        lab = da.from_zarr(str(out / "labels" / "instances" / str(levels - 1)))[:, : 2 * y : 2, : 2 * x : 2]
        da.to_zarr(lab.rechunk((plan.chunks[0], min(plan.chunks[1], y), min(plan.chunks[2], x))),
                   str(out / "labels" / "instances" / str(levels)), overwrite=True, zarr_format=2)
        levels += 1
    return levels


def _ngff_metadata(out: Path, plan: ChunkPlan, levels: int) -> None:
    """OME-Zarr 0.4 multiscales for the probability and the instance labels (NGFF labels spec)."""
    import zarr

    unit = "nanometer" if plan.voxel_size_nm else None
    base = plan.voxel_size_nm or (1.0, 1.0, 1.0)
    axes = [{"name": a, "type": "space", **({"unit": unit} if unit else {})} for a in "zyx"]

    def multiscales(name):
        return [{"version": "0.4", "name": name, "axes": axes,
                 "datasets": [{"path": str(i), "coordinateTransformations": [
                     {"type": "scale", "scale": [base[0], base[1] * 2**i, base[2] * 2**i]}]} for i in range(levels)],
                 "type": "mean"}]

    root = zarr.open_group(str(out), mode="r+", zarr_format=2)
    root.attrs.update({"multiscales": multiscales("probability"),
                       "omero": {"channels": [{"label": "mitochondria probability", "window":
                                               {"start": 0.0, "end": 1.0, "min": 0.0, "max": 1.0}}]}})
    zarr.open_group(str(out / "labels"), mode="r+", zarr_format=2).attrs.update({"labels": ["instances"]})
    ms = multiscales("instances")
    ms[0]["type"] = "nearest"
    zarr.open_group(str(out / "labels" / "instances"), mode="r+", zarr_format=2).attrs.update(
        {"multiscales": ms, "image-label": {"version": "0.4", "source": {"image": "../../"}}})
