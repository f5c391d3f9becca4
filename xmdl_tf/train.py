"""Train the residual attention U-Net on annotated EM slices: `python -m xmdl_tf.train`.

    python -m xmdl_tf.train --data ../shared/data/cdeep3m_sbem_mouse ../shared/data/drosophila_vnc_sstem \
        --out runs/ref --base-filters 8

Writes to RUN_DIR: model.keras (best weights by validation loss), config.json,
history.csv, training_curves.png, and checkpoint/ (last epoch's full state).
Run the same command again after an interruption and training resumes from
the last finished epoch, with EarlyStopping's counter and best weights intact.
Fine-tuning a trained model is the same trainer: `--init-from MODEL`
(see also `python -m xmdl_tf.finetune`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from .config import VARIANTS, Config, DataConfig, ModelConfig, TrainConfig, resolve_jit

STATE = "checkpoint/state.json"
LAST = "checkpoint/last.keras"


# ----------------------------------------------------------------------------
# Data resolution (no TensorFlow needed)


def resolve_data(data_dirs: list[str], val_fraction: float = 0.2, train_split: str = "train",
                 val_split: str = "val", max_slices: int | None = None):
    """Training and validation regions for one or several data sets.

    Each data set uses its own `val` split when present; otherwise validation is
    carved from its training slices as held-back rows (and reported as such).
    max_slices: use only the first N training slices of each set (fine-tuning
    from a few annotated slices).
    Returns (train_regions, val_regions, provenance list of dicts).
    """
    from .data import SliceRegion, holdout_split
    from .io import DataError, find_pairs

    train, val, info = [], [], []
    for d in data_dirs:
        pairs = find_pairs(d, train_split)
        if max_slices is not None:
            pairs = pairs[:max_slices]
        try:
            vpairs = find_pairs(d, val_split)
        except DataError:
            vpairs = []
        if vpairs:
            t_regions, v_regions = [SliceRegion(p) for p in pairs], [SliceRegion(p) for p in vpairs]
            how = f"split '{val_split}'"
        else:
            t_regions, v_regions = holdout_split(pairs, val_fraction)
            how = f"held-back bottom {val_fraction:.0%} of rows of each training slice"
        train += t_regions
        val += v_regions
        info.append({
            "path": str(Path(d).resolve()),
            "train_slices": [p.name for p in pairs],
            "val_slices": [p.name for p in vpairs] if vpairs else [p.name for p in pairs],
            "validation": how,
            "pixel_size_nm": dataset_pixel_size(d, pairs[0].image),
        })
    return train, val, info


def dataset_pixel_size(data_dir: str, first_image: Path) -> float | None:
    """Pixel size of a data set from its dataset.json, else from TIFF metadata, else None."""
    from .io import read_pixel_size_nm

    meta = Path(data_dir) / "dataset.json"
    if meta.is_file():
        try:
            value = json.loads(meta.read_text()).get("pixel_size_nm")
            if value is not None:
                return float(value[0] if isinstance(value, list) else value)
        except (ValueError, TypeError, AttributeError):
            pass
    return read_pixel_size_nm(first_image)


# ----------------------------------------------------------------------------
# Training


def _versions() -> dict:
    import keras
    import numpy
    import tensorflow as tf

    from . import __version__

    return {"xmdl_tf": __version__, "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "python": platform.python_version()}


def _atomic_save(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    model.save(tmp)
    os.replace(tmp, path)


def _save_inference(model, path: Path) -> None:
    """Save weights and architecture only (no optimizer state): a third of the size, safe to ship."""
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    _atomic_save(clone, path)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _comparable(cfg: dict) -> dict:
    """The parts of a config that must match to resume a run (not provenance, not XLA on/off)."""
    out = {k: v for k, v in cfg.items() if k != "info"}
    out["train"] = {k: v for k, v in out.get("train", {}).items() if k != "jit_compile"}
    return out


def _strategy():
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) > 1:
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


def _freeze_encoder(model) -> int:
    n = 0
    for layer in model.layers:
        if layer.name.startswith(("enc", "bottleneck")):
            layer.trainable = False
            n += 1
    return n


def train(data_dirs: list[str], out: str | Path, config: Config, val_fraction: float = 0.2,
          init_from: str | Path | None = None, freeze_encoder: bool = False, augment_strength: float = 1.0,
          max_slices: int | None = None, overwrite: bool = False, verbose: int = 2,
          callbacks: list | None = None) -> Path:
    """Train (or resume, or fine-tune) a model; returns the run folder.

    The best model by validation loss is `out/model.keras`; a run killed
    mid-epoch resumes from `out/checkpoint/` with the same call.
    callbacks: extra Keras callbacks, run after the checkpointing ones.
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from .data import default_steps_per_epoch, training_dataset, validation_dataset
    from .io import check_pairs
    from .losses import SegmentationLoss, pooled_metrics
    from .model import build_from_config

    out = Path(out)
    state_path = out / STATE
    train_regions, val_regions, info = resolve_data(data_dirs, val_fraction, max_slices=max_slices)
    shapes = check_pairs([r.pair for r in train_regions])
    val_shapes = check_pairs([r.pair for r in val_regions])
    tile = config.data.tile_size
    if tile % config.model.size_divisor:
        raise ValueError(f"tile size {tile} is not divisible by 2**(depth-1) = {config.model.size_divisor}")
    steps = config.train.steps_per_epoch or default_steps_per_epoch(train_regions, shapes, tile, config.train.batch_size)
    # --pixel-size fills in the sets whose files do not say; the model's pixel
    # size is the sets' common one, and unknown (None) when they differ.
    for i in info:
        if i["pixel_size_nm"] is None:
            i["pixel_size_nm"] = config.data.pixel_size_nm
    pixel_sizes = {i["pixel_size_nm"] for i in info}
    pixel_size = next(iter(pixel_sizes)) if len(pixel_sizes) == 1 else None
    config = replace(config, data=replace(config.data, pixel_size_nm=pixel_size),
                     train=replace(config.train, steps_per_epoch=steps))

    parent_info = None
    if init_from is not None:
        from .predict import load_model

        parent = load_model(init_from, jit_compile=False)
        # The architecture comes from the parent; everything else from this call.
        config = replace(config, model=parent.config.model, normalization=parent.config.normalization)
        parent_info = {"model": str(Path(parent.path).resolve()), "config": parent.config.info.get("data", [])}

    info_block = {
        "data": info,
        "versions": _versions(),
        "train_slices": sum(len(i["train_slices"]) for i in info),
        "lineage": parent_info,
        "freeze_encoder": freeze_encoder,
        "augment_strength": augment_strength,
        "command": " ".join(sys.argv) if sys.argv and "xmdl_tf" in " ".join(sys.argv) else None,
    }
    config = replace(config, info=info_block)

    resume = False
    if out.exists() and any(out.iterdir()):
        if overwrite:
            for name in ("model.keras", "config.json", "history.csv", "training_curves.png"):
                (out / name).unlink(missing_ok=True)
            shutil.rmtree(out / "checkpoint", ignore_errors=True)
        elif state_path.is_file():
            state = json.loads(state_path.read_text())
            old = json.loads((out / "config.json").read_text()) if (out / "config.json").is_file() else {}
            if _comparable(old) != _comparable(json.loads(json.dumps(config.to_dict(), default=str))):
                raise FileExistsError(f"{out}: holds a run with a different configuration; "
                                      "use another --out, or --overwrite to replace it")
            if state.get("finished"):
                print(f"{out}: training already finished (best epoch {state['best_epoch'] + 1}); "
                      "nothing to do. Use --overwrite to train again.")
                return out
            resume = True
        else:
            raise FileExistsError(f"{out}: folder exists and is not a resumable run; choose another --out "
                                  "or pass --overwrite")
    (out / "checkpoint").mkdir(parents=True, exist_ok=True)

    keras.utils.set_random_seed(config.train.seed)
    if config.train.mixed_precision:
        keras.mixed_precision.set_dtype_policy("mixed_float16")
    strategy = _strategy()
    global_batch = config.train.batch_size
    train_ds = training_dataset(train_regions, config.data, global_batch, config.train.seed, augment_strength)
    val_ds = validation_dataset(val_regions, config.data, global_batch, val_shapes)

    jit = resolve_jit(config.train.jit_compile)
    with strategy.scope():
        if resume:
            model = keras.models.load_model(out / LAST, safe_mode=True)
            initial_epoch = state["epoch"] + 1
            history = state["history"]
            print(f"{out}: resuming after epoch {initial_epoch} (best so far: epoch {state['best_epoch'] + 1}, "
                  f"val_loss {state['best']:.4f})")
        else:
            model = build_from_config(config.model)
            if init_from is not None:
                model.set_weights(parent.model.get_weights())
            if freeze_encoder:
                _freeze_encoder(model)
            model.compile(
                optimizer=keras.optimizers.Adam(config.train.learning_rate),
                loss=SegmentationLoss(config.train.loss),
                metrics=pooled_metrics(),
                jit_compile=jit,
            )
            initial_epoch, history, state = 0, [], None
    config = replace(config, info={**config.info, "parameters": int(model.count_params())})
    config.save(out / "config.json")

    ResumableEarlyStopping, RunCheckpoint = _make_callbacks()
    early = ResumableEarlyStopping(state, monitor="val_loss", patience=config.train.patience,
                                   restore_best_weights=True, verbose=1)
    ckpt = RunCheckpoint(out, history, early)
    t0 = time.time()
    model.fit(train_ds, validation_data=val_ds, epochs=config.train.epochs, steps_per_epoch=steps,
              initial_epoch=initial_epoch, callbacks=[early, ckpt, *(callbacks or [])], verbose=verbose)
    # EarlyStopping restored the best weights; make model.keras exactly those.
    _save_inference(model, out / "model.keras")
    final = json.loads(state_path.read_text())
    final["finished"] = True
    _atomic_write(state_path, json.dumps(final))
    cfg_final = replace(config, info={**config.info, "best_epoch": final["best_epoch"] + 1,
                                      "epochs_run": final["epoch"] + 1,
                                      "train_seconds": round(final.get("seconds", 0.0), 1)})
    cfg_final.save(out / "config.json")
    plot_history(out / "history.csv", out / "training_curves.png")
    print(f"{out}: done in {time.time() - t0:.0f} s; best epoch {final['best_epoch'] + 1} "
          f"(val_loss {final['best']:.4f}); model at {out / 'model.keras'}")
    return out


def _make_callbacks():
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping whose counter, best value and best weights survive a restart."""

        def __init__(self, state: dict | None, **kw):
            super().__init__(**kw)
            self._resume = state

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            s = self._resume
            if s:
                self.wait, self.best, self.best_epoch = s["wait"], s["best"], s["best_epoch"]
                best = keras.models.load_model(Path(s["run"]) / "model.keras", compile=False, safe_mode=True)
                self.best_weights = best.get_weights()

    class RunCheckpoint(keras.callbacks.Callback):
        """After each epoch: best model, last full state (with optimizer), history, state.json."""

        def __init__(self, out: Path, history: list, early):
            super().__init__()
            self.out, self.history, self.early = out, history, early
            self._t = time.time()
            self._seconds = 0.0

        def on_train_begin(self, logs=None):
            if self.early._resume:
                self._seconds = self.early._resume.get("seconds", 0.0)

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            self._seconds += time.time() - self._t
            self.history.append({"epoch": epoch + 1, **logs, "seconds": round(self._seconds, 1)})
            if self.early.best_epoch == epoch:
                _save_inference(self.model, self.out / "model.keras")
            _atomic_save(self.model, self.out / LAST)
            write_history(self.history, self.out / "history.csv")
            state = {"run": str(self.out), "epoch": epoch, "wait": self.early.wait,
                     "best": float(self.early.best), "best_epoch": self.early.best_epoch,
                     "seconds": self._seconds, "history": self.history, "finished": False}
            _atomic_write(self.out / STATE, json.dumps(state))

    return ResumableEarlyStopping, RunCheckpoint


def write_history(rows: list[dict], path: Path) -> None:
    import pandas as pd

    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, path)


def plot_history(history_csv: Path, out_png: Path) -> None:
    """Loss, F1 and IoU per epoch for training and validation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    h = pd.read_csv(history_csv)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("loss", "f1", "iou"), ("Dice loss", "foreground F1 (Dice)", "foreground IoU")):
        if key in h:
            ax.plot(h["epoch"], h[key], "o-", label="train", ms=3)
        if f"val_{key}" in h:
            ax.plot(h["epoch"], h[f"val_{key}"], "s-", label="validation", ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    if "val_loss" in h:
        best = h["val_loss"].idxmin()
        axes[0].axvline(h["epoch"][best], color="grey", ls="--", lw=1)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------
# CLI


def build_parser(prog: str = "python -m xmdl_tf.train", finetune: bool = False) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", nargs="+", required=True, help="data set folder(s) in the split layout <dir>/{train,val}/{x,y}")
    p.add_argument("--out", required=True, help="run folder (created; an interrupted run here is resumed)")
    p.add_argument("--tile-size", type=int, default=256)
    p.add_argument("--tiles-per-slice", type=int, default=8, help="random crops per decoded slice")
    p.add_argument("--foreground-fraction", type=float, default=0.0,
                   help="expected minimum share of tiles centred on a mitochondrion (0 = uniform)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--patience", type=int, default=5, help="EarlyStopping patience on validation loss")
    p.add_argument("--lr", type=float, default=1e-4 if finetune else 1e-3, help="Adam learning rate")
    p.add_argument("--loss", choices=("dice", "dice_ce"), default="dice")
    p.add_argument("--steps-per-epoch", type=int, default=None,
                   help="default: enough tiles to cover the training slices once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="rows held back for validation when a data set has no val split")
    p.add_argument("--ignore-value", type=int, default=None, help="label value of unlabelled pixels (ignored by the loss)")
    p.add_argument("--pixel-size", type=float, default=None,
                   help="pixel size in nm of data sets whose dataset.json / TIFF metadata do not give one")
    p.add_argument("--max-slices", type=int, default=None, help="use only the first N training slices of each set")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--augment-strength", type=float, default=2.0 if finetune else 1.0)
    p.add_argument("--mixed-precision", action="store_true", help="float16 compute (GPUs)")
    p.add_argument("--no-jit", action="store_true",
                   help="never use XLA (default: XLA on GPUs only; on CPU it measured slower)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    if finetune:
        p.add_argument("--model", required=True, help="parent model (.keras file or run folder)")
        p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder")
    else:
        p.add_argument("--depth", type=int, default=6)
        p.add_argument("--base-filters", type=int, default=8)
        p.add_argument("--variant", choices=sorted(VARIANTS), default="residual_attention")
        p.add_argument("--dropout", type=float, default=0.0)
        p.add_argument("--init-from", default=None, help="start from this model's weights (fine-tuning)")
        p.add_argument("--freeze-encoder", action="store_true", help="with --init-from: train only the decoder")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    residual, attention = VARIANTS[getattr(args, "variant", "residual_attention")]
    return Config(
        data=DataConfig(tile_size=args.tile_size, tiles_per_slice=args.tiles_per_slice,
                        foreground_fraction=args.foreground_fraction, augment=not args.no_augment,
                        ignore_value=args.ignore_value, pixel_size_nm=args.pixel_size),
        model=ModelConfig(depth=getattr(args, "depth", 6), base_filters=getattr(args, "base_filters", 8),
                          residual=residual, attention=attention, dropout=getattr(args, "dropout", 0.0)),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                          patience=args.patience, loss=args.loss, steps_per_epoch=args.steps_per_epoch,
                          seed=args.seed, mixed_precision=args.mixed_precision, jit_compile=False if args.no_jit else "auto"),
    )


def train_from_args(args: argparse.Namespace, init_from: str | None) -> Path:
    """`train` with everything taken from parsed `train` or `finetune` arguments."""
    return train(args.data, args.out, config_from_args(args), val_fraction=args.val_fraction, init_from=init_from,
                 freeze_encoder=args.freeze_encoder, augment_strength=args.augment_strength,
                 max_slices=args.max_slices, overwrite=args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.freeze_encoder and not args.init_from:
        build_parser().error("--freeze-encoder needs --init-from")
    train_from_args(args, args.init_from)
    return 0


if __name__ == "__main__":
    sys.exit(main())
