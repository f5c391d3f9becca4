"""Shared helpers for the benchmark scripts: machine description and timing."""
from __future__ import annotations

import os
import platform
import resource
import time
from contextlib import contextmanager

import xmdl_tf  # noqa: F401  (before TensorFlow loads: xmdl_tf sets its oneDNN default)


def machine() -> str:
    import tensorflow as tf

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpus = tf.config.list_physical_devices("GPU")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            have = set(next(l for l in f if l.startswith("flags")).split())
        flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in have)
    except (OSError, StopIteration):
        pass
    return (f"{cpu} [{flags}], {os.cpu_count()} cores, {mem:.0f} GiB RAM, {len(gpus)} GPU(s); "
            f"TensorFlow {tf.__version__} (oneDNN {os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}), "
            f"Python {platform.python_version()}")


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@contextmanager
def timer(results: dict, key: str):
    t = time.perf_counter()
    yield
    results[key] = results.get(key, 0.0) + time.perf_counter() - t


def table(rows: list[dict], cols: list[str]) -> str:
    widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in cols]
    out = ["  ".join(c.rjust(w) for c, w in zip(cols, widths))]
    out += ["  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(cols, widths)) for r in rows]
    return "\n".join(out)


def markdown(rows: list[dict]) -> str:
    """Rows as a Markdown table (for the model card)."""
    cols = list(rows[0])
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(md) + "\n"


def pixel_sizes(parser, args) -> list:
    """`args.pixel_size` parsed for each of `args.data` (nm or None), or `parser.error` with why."""
    from xmdl_tf.train import parse_pixel_sizes

    try:
        return parse_pixel_sizes(args.pixel_size, len(args.data))
    except ValueError as err:
        parser.error(str(err))


def require_ood(parser, runs) -> None:
    """`parser.error` for the first of the model folders `runs` without its OOD model (ood.npz, which
    `--zoom-search ood` reads to decide what to search), before any work."""
    from pathlib import Path

    from xmdl_tf.ood import OOD_FILE

    for run in runs:
        if not (Path(run) / OOD_FILE).is_file():
            parser.error(f"--zoom-search ood: {Path(run) / OOD_FILE} is missing (calibrate the model first: "
                         "python -m xmdl_tf.calibrate --model ... on its training sets' val splits)")


def write_results(out, stem: str, rows: dict, md: list[str]) -> None:
    """Write `rows` to OUT/STEM.json and the Markdown lines `md` to OUT/STEM.md, and print them."""
    import json
    from pathlib import Path

    out = Path(out)
    (out / f"{stem}.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def pixel_counts(prob, label, threshold: float):
    """(tp, fp, fn) of the foreground `prob >= threshold` (H, W) against `label > 0`, int64 (3,):
    what pooled F1 sums over slices."""
    import numpy as np

    m, t = prob >= threshold, label > 0
    return np.array([(m & t).sum(), (m & ~t).sum(), (~m & t).sum()], np.int64)


def f1_of(counts) -> float:
    """Foreground F1 of (tp, fp, fn) counts (0 where there is nothing)."""
    tp, fp, fn = (int(v) for v in counts)
    return 2 * tp / max(2 * tp + fp + fn, 1)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return "" if v is None else str(v)
