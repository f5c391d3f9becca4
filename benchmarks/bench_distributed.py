"""Chunked volumes on Dask (`python -m xmdl_tf.volume`): throughput, per-worker memory, overheads.

    python benchmarks/bench_distributed.py [--model xmdl_ref] [--slices 32 128] [--workers 1 2]

A synthetic EM volume (data_prep.synthetic3d, 1024 x 1024 slices, 5 nm
voxels) of each depth in --slices is written as a Zarr array and processed
on a LocalCluster of each --workers count with the default 32 x 1024 x 1024
chunks. Reported per run: voxels per second, each stage's share of the time
(the halo's share of the prediction and the cross-chunk merge, i.e. the
components and label-painting stages), and every worker's peak RSS. Peak
RSS per worker that stays flat while the volume grows is the evidence that
the path streams: no worker ever holds the volume (its float32 probability
alone is 4 bytes per voxel).
"""
from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _util import machine  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_mb() -> float:
    """This process's peak resident memory in MiB: VmHWM, the high-water mark of its own address space.

    Not getrusage's ru_maxrss: Linux keeps that across fork and exec, so a
    spawned Dask worker would report the peak of the process it came from.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_zarr(path: Path, slices: int, size: int = 1024) -> None:
    """A (slices, size, size) uint8 EM-like volume as a Zarr array, written in slabs of 32 slices."""
    import numpy as np
    import zarr

    from data_prep.synthetic3d import generate_volume

    arr = zarr.open_array(str(path), mode="w", shape=(slices, size, size), chunks=(32, 1024, 1024), dtype="uint8",
                          zarr_format=2)
    arr.attrs["resolution"] = [5.0, 5.0, 5.0]
    # One 32-slice slab, mirrored in z from slab to slab (so objects continue across
    # slabs): generating each slab anew would take minutes and change nothing measured.
    slab = generate_volume(shape=(32, size, size), seed=0, voxel_size_nm=(5.0, 5.0, 5.0))["image"].astype(np.uint8)
    for k, z0 in enumerate(range(0, slices, 32)):
        n = min(32, slices - z0)
        arr[z0 : z0 + n] = (slab if k % 2 == 0 else slab[::-1])[:n]


def one_run(src: Path, out: Path, model: str, workers: int, chunks, halo: int, memory_limit: str | None,
            inference: dict | None = None) -> dict:
    from distributed import Client, LocalCluster

    from xmdl_tf.distributed import process_volume

    # Dask pauses a worker at 80% of its limit and restarts it at 95%: a run that
    # finishes under a limit smaller than the data proves that nothing holds it whole.
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                           memory_limit=memory_limit or "auto")
    client = Client(cluster)
    try:
        t0 = time.time()
        s = process_volume(str(src), out, model, client=client, chunks=chunks, halo=halo, inference=inference,
                           verbose=False)
        seconds = time.time() - t0
        peaks = sorted(client.run(_peak_rss_mb).values())
    finally:
        client.close()
        cluster.close()
    return {"summary": s, "seconds": seconds, "worker_peak_rss_mb": [round(p) for p in peaks]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="xmdl_ref")
    p.add_argument("--slices", type=int, nargs="+", default=[32, 128])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--chunks", type=int, nargs=3, default=[32, 1024, 1024])
    p.add_argument("--size", type=int, default=1024, help="slice width and height, px")
    p.add_argument("--halo", type=int, default=64)
    p.add_argument("--memory-limit", default=None, help="per worker, e.g. 2GB (default: RAM / workers)")
    p.add_argument("--tta", choices=("off", "on", "model"), default="off",
                   help="test-time augmentation: off (default; it multiplies the prediction time by 8), on, "
                        "or the model's own setting")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    print(machine())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for slices in args.slices:
            src = d / f"in_{slices}.zarr"
            synthetic_zarr(src, slices, args.size)
            for workers in args.workers:
                out = d / f"out_{slices}_{workers}.zarr"
                inference = None if args.tta == "model" else {"tta": args.tta == "on"}
                r = one_run(src, out, args.model, workers, args.chunks, args.halo, args.memory_limit, inference)
                s = r["summary"]
                voxels = slices * args.size * args.size
                stages = {k: s[k] for k in ("histograms_s", "probability_s", "components_s", "objects_s", "labels_s",
                                            "pyramids_tables_s")}
                total = sum(stages.values())
                n = args.size
                cy, cx = min(args.chunks[1], n), min(args.chunks[2], n)
                # Pixels predicted with the halo (clipped at the slice's edges) over the slice's pixels, minus 1.
                def span(c):
                    return sum(min(a + c + args.halo, n) - max(a - args.halo, 0) for a in range(0, n, c))

                halo_share = span(cy) * span(cx) / (n * n) - 1
                row = {"slices": slices, "voxels": voxels, "workers": workers, "tta": args.tta,
                       "seconds": round(r["seconds"], 1),
                       "voxels_per_s": round(voxels / r["seconds"]), "objects": s["count"],
                       "probability_float32_mb": round(voxels * 4 / 2**20),
                       "arrays_written_mb": round(voxels * (1 + 4 + 4 + 4) / 2**20),  # input, probability, components, labels
                       "memory_limit": args.memory_limit or "RAM / workers",
                       "worker_peak_rss_mb": r["worker_peak_rss_mb"],
                       "stage_share": {k: round(v / total, 3) for k, v in stages.items()},
                       "halo_extra_pixels": round(halo_share, 3),
                       "merge_share": round((stages["components_s"] + stages["labels_s"]) / total, 3)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "runs": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
