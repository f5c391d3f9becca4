"""Train the reference recipe on a GPU machine through Keras 3's JAX (or PyTorch) backend,
within a fixed wall-clock budget, and leave the run where it can be fetched.

    KERAS_BACKEND=jax python benchmarks/gpu_training.py --data-root DATA --out runs/gpu_f16 \\
        --base-filters 16 --epochs 20 --steps-per-epoch 250 --batch-size 16 --budget-s 420 --export $OUT

The recipe is `benchmarks/reference_training.sh` (three sets in equal shares,
SBEM at its own grid, the others resampled to 5 nm, "em" augmentation, Dice
loss, Adam with cosine decay, EarlyStopping on the mean of the sets' pooled
validation losses); what differs is said by the flags. A GPU machine lent for
minutes stops the run itself: after each epoch it checks whether another one
still fits in `--budget-s` (measured from the script's start) and ends training
otherwise, so the best weights are saved and exported before the machine goes.
The run folder resumes like any other (`python -m xmdl_tf.train` on the same
folder, any backend).

`--export DIR` copies model.keras (split into parts of at most 15 MiB:
`cat model.keras.part-* > model.keras`), config.json, history.csv and
training_curves.png there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

T0 = time.time()
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from xmdl_tf import cli  # noqa: E402

SETS = ("cdeep3m_sbem_mouse", "drosophila_vnc_sstem", "lucchipp_fibsem_mouse")
PIXEL_SIZES = ("unknown", "4.6", "5")
PART = 15 * 2**20


def budget_callback(budget_s: float, lr0: float | None = None, start: float = T0, log_every: int = 100,
                    batch_size: int | None = None):
    """Keras callback that fits training into `start + budget_s` seconds.

    Stops before an epoch that would end past the budget (judged by the last
    epoch; the first one also compiles), and mid-epoch once the budget is gone.
    With `lr0`, the learning rate follows a cosine from lr0 to 0 over the
    training time left after the first compiled step ("budgeted training": the
    schedule ends with the machine, whatever its speed), set at each epoch's
    start as LearningRateScheduler does. Prints the step (and, given `batch_size`,
    tile) rate every `log_every` steps.
    """
    import keras

    class Budget(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.last, self._t, self.t_first, self.lr_log = 0.0, time.time(), None, []
            self._tb, self._nb = None, 0

        def lr_at(self, now: float) -> float:
            if self.t_first is None:
                return lr0
            frac = min(1.0, max(0.0, (now - self.t_first) / max(start + budget_s - self.t_first, 1e-6)))
            return 0.5 * lr0 * (1 + math.cos(math.pi * frac))

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.time()
            if lr0 is not None:
                lr = self.lr_at(self._t)
                self.model.optimizer.learning_rate = lr
                self.lr_log.append((epoch + 1, round(self._t - start, 1), lr))

        def on_train_batch_end(self, batch, logs=None):
            now = time.time()
            if self.t_first is None:
                self.t_first = now
                print(f"first step done {now - start:.0f} s after start (compilation included)", flush=True)
            self._nb += 1
            if self._tb is None:
                self._tb, self._nb = now, 0
            elif self._nb == log_every:
                rate = log_every / (now - self._tb)
                print(f"  {log_every} steps in {now - self._tb:.1f} s ({rate:.1f} steps/s)"
                      + (f", {batch_size * rate:.0f} tiles/s" if batch_size else ""), flush=True)
                self._tb, self._nb = now, 0
            if now - start > budget_s:
                print(f"budget of {budget_s:.0f} s spent in epoch; stopping", flush=True)
                self.model.stop_training = True

        def on_epoch_end(self, epoch, logs=None):
            self.last = time.time() - self._t
            left = budget_s - (time.time() - start)
            if left < 1.1 * self.last:
                print(f"epoch {epoch + 1}: {left:.0f} s of the budget left, the last epoch took "
                      f"{self.last:.0f} s; stopping", flush=True)
                self.model.stop_training = True

    return Budget()


def input_rate(sets, data_cfg, aug, workers: int, seconds: float = 4.0, processes: int = 0) -> float:
    """Tiles/s that `workers` threads (with `processes` worker processes building the slices, as
    `TileSampler(processes=...)`) build from the training sampler: the PyDataset's work."""
    from concurrent.futures import ThreadPoolExecutor

    from xmdl_tf.sampling import TileSampler

    sampler = TileSampler(sets, data_cfg, aug, seed=12345, processes=processes)
    try:
        with ThreadPoolExecutor(workers) as ex:
            # Warm up: start the processes, decode every slice once in each.
            list(ex.map(sampler.group, range(max(workers, processes))))
            t, n, g = time.time(), 0, max(workers, processes)
            while time.time() - t < seconds:
                list(ex.map(sampler.group, range(g, g + workers)))
                g += workers
                n += workers * sampler.tiles_per_group
        return n / (time.time() - t)
    finally:
        sampler.close()


def export_run(run: Path, dest: Path) -> list[Path]:
    """Copy a finished run's model (in parts of at most 15 MiB), config, history and curves to dest."""
    dest.mkdir(parents=True, exist_ok=True)
    out = []
    data = (run / "model.keras").read_bytes()
    for i in range(0, len(data), PART):
        part = dest / f"model.keras.part-{i // PART:02d}"
        part.write_bytes(data[i:i + PART])
        out.append(part)
    for name in ("config.json", "history.csv", "training_curves.png"):
        if (run / name).is_file():
            shutil.copyfile(run / name, dest / name)
            out.append(dest / name)
    return out


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", required=True, help="folder holding the three sets")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--budget-s", type=cli.positive_float, required=True,
                   help="wall-clock seconds from start for everything")
    p.add_argument("--export", default=None, help="copy the finished run here (see above)")
    p.add_argument("--time-cosine", action="store_true",
                   help="cosine learning-rate decay over the wall-clock budget instead of over --epochs "
                        "(for a machine of unknown speed; train's own schedule is then off)")
    p.add_argument("--probe-input", type=float, default=0.0, metavar="S",
                   help="first measure the input pipeline alone for S seconds (threads only, then with "
                        "the loader processes)")
    p.add_argument("--loader-processes", type=cli.nonnegative_int, default=None, metavar="N",
                   help="worker processes building the training tiles (0: loader threads only). Default: with "
                        "--probe-input, one per CPU core (at most 16) if the probe finds them faster than the "
                        "threads alone, else 0. Sets XMDL_LOADER_PROCESSES for the PyDataset")
    args, train_flags = p.parse_known_args(argv)
    procs = args.loader_processes if args.loader_processes is not None else min(os.cpu_count() or 2, 16)
    os.environ["XMDL_LOADER_PROCESSES"] = str(args.loader_processes or 0)
    if args.time_cosine:
        train_flags = [*train_flags, "--lr-schedule", "constant"]

    from xmdl_tf.train import build_parser, check_args, config_from_args, parse_pixel_sizes, train

    root = Path(args.data_root)
    tp = build_parser()
    targs = tp.parse_args(["--data", *(str(root / s) for s in SETS), "--pixel-size", *PIXEL_SIZES,
                           "--model-pixel-size", "5", "--augment", "em", "--lr-schedule", "cosine",
                           "--patience", "10", "--out", args.out, *train_flags])
    check_args(tp, targs)
    import keras

    from xmdl_tf.runlock import atomic_write_text
    from xmdl_tf.train import resolve_data, with_shapes

    cfg = config_from_args(targs)
    print(f"backend {keras.backend.backend()}; devices: {_devices()}; {os.cpu_count()} CPU cores", flush=True)
    if args.probe_input:
        sets = with_shapes(resolve_data(targs.data, pixel_sizes=parse_pixel_sizes(targs.pixel_size, 3),
                                        model_pixel_size=5.0)[0])
        w = min(os.cpu_count() or 2, 16)
        rates = {}
        for n in dict.fromkeys((0, procs)):
            rates[n] = input_rate(sets, cfg.data, cfg.augment, w, args.probe_input, processes=n)
            print(f"input pipeline alone: {rates[n]:.0f} tiles/s ({w} threads, {n} loader processes)", flush=True)
        if args.loader_processes is None:  # the faster way on this machine (2 cores: threads; measured)
            os.environ["XMDL_LOADER_PROCESSES"] = str(max(rates, key=rates.get))
            print(f"training with {os.environ['XMDL_LOADER_PROCESSES']} loader processes", flush=True)
    lr0 = cfg.train.learning_rate if args.time_cosine else None
    budget = budget_callback(args.budget_s, lr0, batch_size=cfg.train.batch_size)
    run = train(targs.data, targs.out, cfg, pixel_sizes=parse_pixel_sizes(targs.pixel_size, 3),
                augment_strength=targs.augment_strength, callbacks=[budget])
    if args.time_cosine:
        # config.json says lr_schedule "constant" (train's own scheduler was off); record what ran.
        path = Path(run) / "config.json"
        c = json.loads(path.read_text())
        c.setdefault("info", {})["gpu_training"] = {
            "lr_schedule": "cosine from the learning rate to 0 over the wall-clock budget, set per epoch "
                           "(benchmarks/gpu_training.py --time-cosine)",
            "budget_s": args.budget_s, "lr_per_epoch": budget.lr_log, "devices": _devices()}
        atomic_write_text(path, json.dumps(c, indent=2, default=str))
    if args.export:
        for f in export_run(run, Path(args.export)):
            print(f"exported {f} ({f.stat().st_size / 2**20:.1f} MiB)")
    print(f"total {time.time() - T0:.0f} s")
    return 0


def _devices() -> str:
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return ", ".join(str(d) for d in jax.devices())
    if keras.backend.backend() == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return "tensorflow"


if __name__ == "__main__":
    sys.exit(main())
