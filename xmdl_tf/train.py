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
import contextlib
import io
import json
import math
import os
import platform
import shutil
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import cli
from .config import (NORMALIZATION, NORMALIZATION_METHODS, VARIANTS, AugmentConfig, Config, DataConfig, ModelConfig,
                     TrainConfig, check_model_config, resolve_jit)
from .runlock import atomic_write_bytes, atomic_write_text
from .sampling import SAME_PIXEL_SIZE, resample_factor

# --augment-scale bounds: a tile zoomed out 4x is cut from a 1024-px window; beyond
# that, and beyond 4x in, the model would learn on mostly empty or mostly blurred tiles.
MIN_ZOOM, MAX_ZOOM = 0.25, 4.0
# --input-blur reaches 3 sigma (InputBlur's reflected border needs less than the tile);
# 8 px keeps that inside a 32-px tile, the smallest of the default depth.
MAX_INPUT_BLUR = 8.0
STATE = "checkpoint/state.json"
LAST = "checkpoint/last.keras"


# ----------------------------------------------------------------------------
# Data resolution (no TensorFlow needed)

def parse_pixel_sizes(values: list[str] | None, n_sets: int) -> list[float | None]:
    """`--pixel-size` values (nm, or "unknown") -> one entry per data set.

    One value applies to every set; otherwise give exactly one per set.
    """
    if not values:
        return [None] * n_sets
    if len(values) not in (1, n_sets):
        raise ValueError(f"--pixel-size: give one value or one per data set ({n_sets}), got {len(values)}")
    out: list[float | None] = []
    for v in values:
        if str(v).lower() in ("unknown", "none", "-"):
            out.append(None)
            continue
        try:
            f = float(v)
        except ValueError:
            raise ValueError(f"--pixel-size: {v!r} is not a number of nm (or 'unknown')") from None
        if not 0.1 <= f <= 10000:
            raise ValueError(f"--pixel-size: {v} nm is outside the plausible range 0.1-10000 nm for EM")
        out.append(f)
    return out * n_sets if len(out) == 1 else out


def choose_model_pixel_size(known: list[float]) -> float | None:
    """The model's pixel size when none is asked for: the sets' common one, the median
    of differing ones (so as few sets as possible are resampled far), or None."""
    if not known:
        return None
    if max(known) <= min(known) * (1 + SAME_PIXEL_SIZE):
        return known[0]
    return float(sorted(known)[len(known) // 2])


def resolve_data(data_dirs: list[str], val_fraction: float = 0.2, train_split: str = "train",
                 val_split: str = "val", max_slices: int | None = None, pixel_sizes: list[float | None] | None = None,
                 model_pixel_size: float | None = None, weights: list[float] | None = None,
                 labels: list[str | None] | None = None):
    """Training and validation sets for one or several data sets.

    Each data set uses its own `val` split when present; otherwise validation is
    carved from its training slices as held-back rows (and reported as such).
    max_slices: use only the first N training slices of each set (fine-tuning
    from a few annotated slices). pixel_sizes: nm per set where the set's
    dataset.json / TIFF metadata do not say (None = unknown). model_pixel_size:
    the model's pixel size (default `choose_model_pixel_size`). weights: share of
    the training tiles per set (default equal). labels: per set, the label folder,
    glob or stack of a set given as an image folder, glob or TIFF stack (the other
    two layouts of `io.find_pairs`; None for a set in the split layout); such a set
    has no val split, so its validation is carved from its slices.
    Returns (train sets, val sets, model pixel size, provenance list of dicts).
    """
    from .io import dataset_pixel_size_nm, find_pairs
    from .sampling import SliceRegion, TrainingSet, holdout_split

    if weights is not None and len(weights) != len(data_dirs):
        raise ValueError(f"--set-weights: give one weight per data set ({len(data_dirs)}), got {len(weights)}")
    if weights is not None and (any(w < 0 for w in weights) or sum(weights) <= 0):
        raise ValueError(f"--set-weights must be >= 0 with a positive sum, got {weights}")
    given = pixel_sizes or [None] * len(data_dirs)
    labels = check_labels_per_set(labels, len(data_dirs))
    names = [_set_name(d, lab) for d, lab in zip(data_dirs, labels)]
    if len(set(names)) != len(names):
        raise ValueError(f"two data sets share a folder name: {names}; give each set its own name")
    found = []
    for d, lab in zip(data_dirs, labels):
        p = Path(d)
        if lab is not None:  # an image folder, glob or stack with its labels: no splits, no val split
            pairs = find_pairs(d, train_split, labels=lab)
            found.append((pairs[:max_slices] if max_slices is not None else pairs, []))
            continue
        if p.name in (train_split, val_split, "test") and (p / "x").is_dir() and (p.parent / train_split).is_dir():
            # SET/train: the set's val split and dataset.json (pixel size, unlabelled value) lie one up.
            warnings.warn(f"{d} is the '{p.name}' split of {p.parent}: trained on as a set of its own, with "
                          "validation carved from its rows and no dataset.json; give the set folder "
                          f"{p.parent} to use its val split and metadata", stacklevel=2)
        pairs = find_pairs(d, train_split)
        if max_slices is not None:
            pairs = pairs[:max_slices]
        # No val split (or an empty one): validation is carved from the training slices. A val split
        # that is there but broken (no y/, fewer labels than images) is an error, not a fallback.
        vdir = Path(d) / val_split
        present = vdir.is_dir() and any(any((vdir / sub).iterdir()) for sub in ("x", "y") if (vdir / sub).is_dir())
        vpairs = find_pairs(d, val_split) if present else []
        found.append((pairs, vpairs))
    # The set's own pixel size (dataset.json, then TIFF metadata) wins; --pixel-size fills in sets that
    # say nothing. A given value that disagrees is said to be unused, not dropped in silence.
    set_px = []
    for i, d in enumerate(data_dirs):
        own = dataset_pixel_size(d, found[i][0][0].image)
        if given[i] and own and abs(given[i] / own - 1) > SAME_PIXEL_SIZE:
            source = "dataset.json" if dataset_pixel_size_nm(d) else f"TIFF metadata ({found[i][0][0].image})"
            warnings.warn(f"{d}: --pixel-size {given[i]:g} nm is not used: the set's {source} states {own:g} nm "
                          "(--pixel-size fills in sets that state none); if the file is wrong, write the right "
                          f"\"pixel_size_nm\" into {Path(d) / 'dataset.json'}", stacklevel=2)
        set_px.append(own or given[i])
    if model_pixel_size is None:
        model_pixel_size = choose_model_pixel_size([p for p in set_px if p])
    w = [1.0] * len(data_dirs) if weights is None else [float(x) for x in weights]
    total = sum(w)
    train, val, info = [], [], []
    for i, d in enumerate(data_dirs):
        pairs, vpairs = found[i]
        if vpairs:
            t_regions, v_regions = [SliceRegion(p) for p in pairs], [SliceRegion(p) for p in vpairs]
            how = f"split '{val_split}'"
        else:
            t_regions, v_regions = holdout_split(pairs, val_fraction)
            how = f"held-back bottom {val_fraction:.0%} of rows of each training slice"
        factor = resample_factor(set_px[i], model_pixel_size)
        train.append(TrainingSet(names[i], t_regions, factor, w[i] / total))
        val.append(TrainingSet(names[i], v_regions, factor, 1.0))
        info.append({
            "name": names[i],
            "path": str(Path(d).resolve()),
            **({"labels": _label_source(labels[i])} if labels[i] is not None else {}),
            "train_slices": [p.name for p in pairs],
            "val_slices": [p.name for p in vpairs] if vpairs else [p.name for p in pairs],
            "validation": how,
            "pixel_size_nm": set_px[i],
            "resample_factor": round(factor, 4),
            "sampling_weight": round(w[i] / total, 4),
        })
    return train, val, model_pixel_size, info


def check_labels_per_set(labels: list[str | None] | None, n_sets: int) -> list[str | None]:
    """`--labels` values -> one entry per data set (None: the set is in the split layout).

    Give exactly one per --data set; "-" (or "none") stands for a set in the split layout."""
    if not labels:
        return [None] * n_sets
    if len(labels) != n_sets:
        raise ValueError(f"--labels: give one label folder, glob or stack per --data set ({n_sets}), got "
                         f"{len(labels)} ('-' for a set in the split layout)")
    return [None if lab is None or str(lab).lower() in ("-", "none") else str(lab) for lab in labels]


def _set_name(data: str, labels: str | None) -> str:
    """A data set's name (history columns, config.json): its folder's; a stack's file stem; a glob's folder."""
    if labels is None:
        return Path(data).resolve().name
    p = Path(data)
    while any(c in p.name for c in "*?[") and p != p.parent:
        p = p.parent
    p = p.resolve()
    return p.stem if p.is_file() else p.name


def _label_source(labels: str) -> str:
    """How config.json records a --labels value: resolved, unless it is a glob."""
    return labels if any(c in labels for c in "*?[") else str(Path(labels).resolve())


def dataset_pixel_size(data_dir: str, first_image: Path) -> float | None:
    """Pixel size of a data set from its dataset.json, else from TIFF metadata, else None."""
    from .cli import check_pixel_size
    from .io import dataset_pixel_size_nm, read_pixel_size_nm

    px = dataset_pixel_size_nm(data_dir)  # a DataError for an implausible value
    if px is None and (px := read_pixel_size_nm(first_image)) is not None:
        check_pixel_size(px, f"{first_image} metadata")
    return px


def oversized_tile(tile: int, largest: float, divisor: int) -> str | None:
    """A warning when training tiles are more than twice the largest slice (`largest`, px at the model's
    pixel size): tiles larger than slices are padded, so most of their memory would hold nothing."""
    if not largest or tile <= 2 * largest:
        return None
    enough = -(-int(math.ceil(largest)) // divisor) * divisor
    return (f"--tile-size {tile} is more than twice the largest training slice ({largest:.0f} px at the model's "
            f"pixel size): most of every tile is padding, at {tile} x {tile} px of memory each; --tile-size {enough} "
            "holds the same")


def with_shapes(sets: list) -> list:
    """The same sets with (H, W) of every slice filled in (checks every pair on the way)."""
    from .io import check_pairs

    return [replace(s, shapes=check_pairs([r.pair for r in s.regions])) for s in sets]


# ----------------------------------------------------------------------------
# Training


def _command_line() -> str | None:
    """The command line that runs this process, as the user can type it again: `python -m xmdl_tf.train
    ...` (sys.argv[0] is then the module's file path, which does not run), `xmdl-train ...` for the
    console scripts; None when the toolkit is called from another program (the Python API)."""
    import shlex

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", None) or ""
    if name == "xmdl_tf" or name.startswith("xmdl_tf."):
        return shlex.join(["python", "-m", name.removesuffix(".__main__"), *sys.argv[1:]])
    if sys.argv and Path(sys.argv[0]).name.startswith("xmdl-"):
        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return None


def _versions() -> dict:
    import keras
    import numpy

    from . import __version__

    out = {"xmdl_tf": __version__, "keras": keras.__version__, "backend": keras.backend.backend(),
           "numpy": numpy.__version__, "python": platform.python_version()}
    for mod in ("tensorflow", "jax", "torch"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    return out


def _atomic_save(model, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    model.save(tmp)
    os.replace(tmp, path)


def _save_inference(model, path: Path) -> None:
    """Save weights and architecture only (no optimizer state, float32 compute whatever the
    training precision): a third of the size, safe to ship."""
    from .model import float32_copy

    _atomic_save(float32_copy(model), path)


def _comparable(cfg: dict) -> dict:
    """The parts of a config that must match to resume a run: not provenance, not XLA on/off,
    not how the finished model is applied (inference). Read through `Config.from_dict`, so a
    run started before a new setting existed compares by that setting's default."""
    try:
        cfg = json.loads(json.dumps(Config.from_dict(cfg).to_dict(), default=str))
    except (TypeError, ValueError):
        pass  # unreadable: compared as is, and refused as different
    out = {k: v for k, v in cfg.items() if k not in ("info", "inference", "calibration")}
    out["train"] = {k: v for k, v in out.get("train", {}).items() if k != "jit_compile"}
    # What the run learns from is part of it too: other data, slices, pixel sizes, parent or a
    # frozen encoder would continue one run on another's terms (provenance and versions are not).
    info = cfg.get("info") if isinstance(cfg.get("info"), dict) else {}
    keys = ("path", "labels", "train_slices", "val_slices", "validation", "pixel_size_nm", "sampling_weight")
    out["learns_from"] = {
        "data": [{k: d.get(k) for k in keys} for d in info.get("data") or [] if isinstance(d, dict)],
        "parent": (info.get("lineage") or {}).get("model"),
        "freeze_encoder": bool(info.get("freeze_encoder")),
    }
    return out


def _strategy():
    import keras

    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return (tf.distribute.MirroredStrategy() if len(gpus) > 1 else tf.distribute.get_strategy()).scope()


def _freeze_encoder(model) -> int:
    n = 0
    for layer in model.layers:
        if layer.name.startswith(("enc", "bottleneck")):
            layer.trainable = False
            n += 1
    return n


def _dtype_policy(mixed_precision: bool | str) -> str | None:
    """Keras dtype policy for TrainConfig.mixed_precision (True = float16, for old configs)."""
    if mixed_precision in (False, None, "", "float32"):
        return None
    kind = "float16" if mixed_precision is True else str(mixed_precision)
    if kind not in ("float16", "bfloat16"):
        raise ValueError(f"mixed_precision must be float16 or bfloat16, got {mixed_precision!r}")
    return f"mixed_{kind}"


def run_finished(out: str | Path) -> bool:
    """Whether the run folder `out` holds a training that ran to its end (not one to resume)."""
    state = Path(out) / STATE
    return state.is_file() and bool(json.loads(state.read_text()).get("finished"))


def train(data_dirs: list[str], out: str | Path, config: Config, val_fraction: float = 0.2,
          init_from: str | Path | None = None, freeze_encoder: bool = False, augment_strength: float | None = None,
          max_slices: int | None = None, overwrite: bool = False, verbose: int = 2,
          callbacks: list | None = None, pixel_sizes: list[float | None] | None = None,
          parent_baseline: bool = False, labels: list[str | None] | None = None) -> Path:
    """Train (or resume, or fine-tune) a model; returns the run folder.

    Data sets are sampled by `config.data.set_weights` (equal by default) and
    resampled to `config.data.pixel_size_nm` where their pixel size is known
    (`pixel_sizes` fills in sets whose files do not say). Validation runs on
    every set's val split; the monitored `val_loss` is the mean of the sets'
    pooled losses, so each set counts equally whatever its size.
    The best model by that loss is `out/model.keras`. The input pipeline is
    tf.data on the TensorFlow backend and a PyDataset on JAX / PyTorch.

    Safety: every image header and label is checked before anything is
    written; `out` is locked against a second process; a run killed at any
    moment (the first epoch included) resumes with the same call; with
    `overwrite`, the new run trains beside the old one and replaces it only
    when finished, so a failed or killed new run loses nothing.
    callbacks: extra Keras callbacks, run after the checkpointing ones.
    labels: per data set, the label folder, glob or stack of a set given as an image
    folder, glob or TIFF stack (None for a set in the split layout; `resolve_data`).
    parent_baseline: with `init_from`, validate the parent once before the
    first epoch and keep its weights unless an epoch beats its validation loss
    (what `finetune` and `train --init-from` do; off for self-training, whose
    validation labels are the parent's own pseudo-labels, which it cannot lose on).
    """
    from .io import DataError
    from .runlock import FolderLock
    from .sampling import default_steps_per_epoch

    out = cli.check_out_folder(out)  # before anything is read, or the lock file created beside it
    if init_from is None:  # (a fine-tuned model's architecture is its parent's)
        check_model_config(config.model)
    if augment_strength is not None:
        config = replace(config, augment=replace(config.augment, strength=augment_strength))
    parent = None
    model_px = config.data.pixel_size_nm
    if init_from is not None:
        from .predict import load_keras_with_config

        parent, parent_config, parent_path = load_keras_with_config(init_from)
        # The architecture, normalisation and pixel size come from the parent, and so does how it is
        # applied (TTA, threshold, minimum size, auto zoom: a child of a tuned model is used as its
        # parent is until `tune` re-chooses them on the child's own val data); the rest from this call.
        config = replace(config, model=parent_config.model, normalization=parent_config.normalization,
                         inference=parent_config.inference)
        parent_px = parent_config.data.pixel_size_nm
        if model_px and parent_px and abs(model_px / parent_px - 1) > SAME_PIXEL_SIZE:
            raise ValueError(f"--model-pixel-size {model_px} nm differs from the parent model's {parent_px} nm; "
                             "a fine-tuned model keeps its parent's pixel size")
        model_px = model_px or parent_px
    train_sets, val_sets, model_px, info = resolve_data(
        data_dirs, val_fraction, max_slices=max_slices, pixel_sizes=pixel_sizes, model_pixel_size=model_px,
        weights=list(config.data.set_weights) if config.data.set_weights else None, labels=labels)
    train_sets, val_sets = with_shapes(train_sets), with_shapes(val_sets)
    # As evaluate, tune and calibrate: a set's dataset.json says which label value is unlabelled
    # (napari's corrections write 255 there), and a given --ignore-value wins. Resolved before the
    # checks and before config.json, so both see, and the run records, the value it learns with.
    ignore = resolve_ignore_value(data_dirs, config.data.ignore_value)
    try:
        check_training_labels(train_sets, val_sets, ignore, verbose=bool(verbose))
    except DataError as err:
        if config.data.ignore_value is None and ignore is not None and "--ignore-value" in str(err):
            raise DataError(f"{err} (the value {ignore} is the data set's dataset.json \"ignore_value\")") from None
        raise
    config = replace(config, data=replace(config.data, ignore_value=ignore))
    tile = config.data.tile_size
    if tile % config.model.size_divisor:
        raise ValueError(f"tile size {tile} is not divisible by 2**(depth-1) = {config.model.size_divisor}")
    oversized = oversized_tile(tile, max((max(hw) * st.factor for st in train_sets for hw in st.shapes), default=0),
                               config.model.size_divisor)
    if oversized:
        warnings.warn(oversized, stacklevel=2)
    steps = config.train.steps_per_epoch or max(config.train.min_steps_per_epoch,
                                                default_steps_per_epoch(train_sets, tile, config.train.batch_size))
    config = replace(config, data=replace(config.data, pixel_size_nm=model_px),
                     train=replace(config.train, steps_per_epoch=steps))
    parent_info = None
    if parent is not None:
        parent_info = {"model": str(Path(parent_path).resolve()), "config": parent_config.info.get("data", []),
                       "inference": "the parent's"}
        if config.inference.object_width_px and not all(i["pixel_size_nm"] for i in info):
            # A set of unknown pixel size is learnt on its own grid: the parent's object widths no
            # longer say which scale the child knows, so auto zoom waits for `tune` to measure them.
            config = replace(config, inference=replace(config.inference, object_width_px=None))
            parent_info["inference"] = "the parent's, without its auto-zoom widths (a set of unknown pixel size)"

    info_block = {
        "data": info,
        "versions": _versions(),
        "train_slices": sum(len(i["train_slices"]) for i in info),
        "lineage": parent_info,
        "freeze_encoder": freeze_encoder,
        "augment_strength": config.augment.strength,
        "command": _command_line(),
    }
    config = replace(config, info=info_block)
    for source in [*data_dirs, *(lab for lab in labels or [] if lab), *([init_from] if init_from is not None else [])]:
        if Path(source).exists():  # --overwrite would delete it with the old run
            cli.refuse_replacing_input(out, source)
    with FolderLock(out, "training run"):
        return _train_locked(out, config, train_sets, val_sets, parent, freeze_encoder, overwrite, verbose,
                             callbacks, parent_baseline=parent_baseline and parent is not None)


def resolve_ignore_value(data_dirs: list[str], given: int | None) -> int | None:
    """The label value of unlabelled pixels for training on `data_dirs`: `given` (--ignore-value), else
    the one the sets' dataset.json files declare ("ignore_value", `io.dataset_ignore_value`), else None.

    As in evaluate, a given value wins over a dataset.json that says otherwise (with a warning). Training
    applies one value to every set, so sets declaring different values are refused (DataError), and a
    value declared by some sets only is applied to the others with a warning.
    """
    from .io import DataError, dataset_ignore_value

    declared = {str(d): dataset_ignore_value(d) for d in data_dirs}
    if given is not None:
        for d, v in declared.items():
            if v is not None and v != given:
                warnings.warn(f"{Path(d) / 'dataset.json'} marks unlabelled pixels {v}; --ignore-value {given} "
                              "is used instead", stacklevel=2)
        return given
    values = sorted({v for v in declared.values() if v is not None})
    if not values:
        return None
    if len(values) > 1:
        said = ", ".join(f"{Path(d) / 'dataset.json'}: {v}" for d, v in declared.items() if v is not None)
        raise DataError(f"the data sets mark unlabelled pixels with different values ({said}); training applies one "
                        "value to every set: give --ignore-value, or relabel one set")
    undeclared = [d for d, v in declared.items() if v is None]
    if undeclared:
        source = next(d for d, v in declared.items() if v is not None)
        warnings.warn(f"ignore_value {values[0]} of {Path(source) / 'dataset.json'} is applied to "
                      f"{', '.join(undeclared)} too (one value for every set): its label pixels of that value are "
                      "not learnt", stacklevel=2)
    return values[0]


def check_training_labels(train_sets, val_sets, ignore_value: int | None, verbose: bool = True) -> None:
    """Decode every training and validation image and label before training (see `io.check_labels`).

    Refuses a training set with no mitochondrion pixel at all, and an
    `ignore_value` that swallows every foreground pixel (0/255 masks with
    --ignore-value 255).
    """
    from .io import DataError, check_ignore_value, check_labels

    pairs = list(dict.fromkeys(r.pair for s in [*train_sets, *val_sets] for r in s.regions))
    n = len(pairs)
    step = max(n // 4, 1)
    report = (lambda i: print(f"checked {i}/{n} slices", flush=True) if i % step == 0 or i == n else None)
    t = time.time()
    stats = check_labels(pairs, ignore_value, progress=report if verbose and n >= 100 else None)
    train_pairs = list(dict.fromkeys(r.pair for s in train_sets for r in s.regions))
    if verbose:
        print(f"checked {n} slices and labels in {time.time() - t:.1f} s", flush=True)
    check_ignore_value(stats, ignore_value)
    _check_validation_is_labelled(val_sets, ignore_value)
    if stats["foreground"] == 0:
        raise DataError(f"no mitochondrion pixel in any of the {len(train_pairs)} training labels "
                        f"(e.g. {train_pairs[0].label}); check the label folder")
    _warn_suspicious_labels(train_sets, ignore_value)


# Labels made only of 0, one small value and 255 are masks with 255 marking unlabelled pixels (napari's
# corrections, sparse annotation); a mid-grey second value (128) is more likely a class of a 3-class mask.
_SMALL_LABEL = 127
# Mitochondria are a few to ~40% of an EM slice; an inverted mask (Fiji's black-on-white) makes them
# 60-95%. Above 70% a warning is very likely right, and dense synthetic or cropped data stays below it.
INVERTED_SHARE = 0.7


def _label_summary(region, ignore_value: int | None) -> tuple[frozenset | None, int, int, int]:
    """(values present, or None when more than 3 or above 255; labelled, foreground, ignored pixel
    counts) of a training region's rows."""
    from .io import read_label

    label = read_label(region.pair.label, region.pair.page)
    h = label.shape[0]
    rows = label[int(round(region.row_from * h)):int(round(region.row_to * h))]
    if rows.size and int(rows.max()) <= 255:
        flat = rows.ravel()
        counts = np.zeros(256, np.int64)
        for i in range(0, flat.size, 1 << 20):  # in blocks: bincount widens to int64 (8 bytes a pixel)
            counts += np.bincount(flat[i:i + (1 << 20)], minlength=256)
        present = np.flatnonzero(counts)
        values = frozenset(int(v) for v in present) if len(present) <= 3 else None
        nonzero = int(rows.size - counts[0])
        ignored = int(counts[ignore_value]) if ignore_value is not None and ignore_value <= 255 else 0
    else:  # instance ids: many values, none of them "unlabelled" unless told
        values = None
        nonzero = int(np.count_nonzero(rows))
        ignored = int(np.count_nonzero(rows == ignore_value)) if ignore_value is not None else 0
    if ignore_value == 0:
        ignored = rows.size - nonzero  # 0 unlabelled: the background is not counted either
        return values, nonzero, nonzero, ignored
    return values, int(rows.size) - ignored, nonzero - ignored, ignored


def _warn_suspicious_labels(train_sets, ignore_value: int | None) -> None:
    """One-line warnings, per training set, for labels that train without error but teach the wrong thing:
    values exactly {0, 1, 255} with no ignore value (255 is then learnt as mitochondrion, though it
    almost always means unlabelled), and mitochondria covering more than half of the labelled pixels
    (an inverted mask: mitochondria black on white, as exported from Fiji). One more decode of each
    training label, in threads (the decoders release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(8, (os.cpu_count() or 2) + 2)) as pool:
        for s in train_sets:
            regions = [r for r in s.regions if r.pair.label is not None]
            summaries = list(pool.map(lambda r: _label_summary(r, ignore_value), regions))
            if not summaries:
                continue
            values: set | None = set()
            for v, *_ in summaries:
                values = None if v is None or values is None else values | v
            if ignore_value is None and values is not None and len(values) == 3 and {0, 255} <= values:
                small = min(values - {0, 255})
                if small <= _SMALL_LABEL:
                    where = next(r.pair.label for r, (v, *_) in zip(regions, summaries) if v and 255 in v)
                    warnings.warn(f"{where}: the labels of {s.name} hold only the values 0, {small} and 255; if 255 "
                                  f"marks unlabelled pixels, add --ignore-value 255 (now they are learnt as "
                                  "mitochondrion)", stacklevel=3)
            labelled = sum(x[1] for x in summaries)
            foreground = sum(x[2] for x in summaries)
            ignored = sum(x[3] for x in summaries)
            # Sparse labels (pixels ignored) may well be mostly mitochondrion: the user labelled what they
            # chose to, so the shares say nothing about inversion there.
            if not ignored and labelled and foreground > INVERTED_SHARE * labelled:
                where = max(zip(regions, summaries), key=lambda t: t[1][2] / max(t[1][1], 1))[0].pair.label
                warnings.warn(f"{s.name}: mitochondria cover {100 * foreground / labelled:.0f}% of the labelled "
                              f"pixels of its training labels (e.g. {where}); the masks may be inverted "
                              "(mitochondria must be the non-zero pixels)", stacklevel=3)


def _check_validation_is_labelled(val_sets, ignore_value: int | None) -> None:
    """Refuse a set whose validation rows are all `ignore_value` (its validation loss would be 0 and
    its F1 1 at every epoch, and the best epoch would be the first: sparse labels on one slice), and
    val splits without a single mitochondrion pixel in any set (F1 0 at every epoch)."""
    from .io import DataError, read_label

    foreground = 0
    for s in val_sets:
        labelled = 0
        for r in s.regions:
            label = read_label(r.pair.label, r.pair.page)
            h = label.shape[0]
            rows = label[int(round(r.row_from * h)):int(round(r.row_to * h))]
            known = rows != ignore_value if ignore_value is not None else np.ones(rows.shape, bool)
            labelled += int(np.count_nonzero(known))
            foreground += int(np.count_nonzero((rows > 0) & known))
            if labelled and foreground:
                break
        where = ("its val split" if all(r.row_from == 0 and r.row_to == 1 for r in s.regions)
                 else "the held-back bottom rows of its slices, its validation")
        if not labelled:
            raise DataError(f"{s.name}: {where} holds no labelled pixel (all --ignore-value {ignore_value}), so "
                            "nothing can be validated; label some pixels there (mitochondria and background), "
                            "or give a val split")
    # Only val splits the user gave: rows held back from a slice or two (fine-tuning on a few) may
    # well miss every mitochondrion, and there the loss still tells epochs apart by false detections.
    given = all(all(r.row_from == 0 and r.row_to == 1 for r in s.regions) for s in val_sets)
    if val_sets and given and not foreground:
        raise DataError(f"{', '.join(s.name for s in val_sets)}: the val split holds no mitochondrion pixel, so "
                        "the validation loss cannot choose an epoch; give a val split with mitochondria in it "
                        "(or none: validation is then held back from the training slices)")


def _train_locked(out: Path, config: Config, train_sets, val_sets, parent, freeze_encoder: bool, overwrite: bool,
                  verbose: int, callbacks: list | None, parent_baseline: bool = False) -> Path:
    """The part of `train` that writes: run with `out` locked."""
    import keras

    from .losses import SegmentationLoss, pooled_metrics
    from .model import build_from_config
    from .runlock import atomic_replace_dir, finish_replace_dir

    cli.check_out_folder(out)
    finish_replace_dir(out)
    staging = out.with_name(f".{out.name}.overwrite")
    has_run = out.exists() and any(out.iterdir())
    if overwrite and has_run and not _is_run_config(out / "config.json") and not _only_startup_files(out):
        # --overwrite replaces the folder whole: only ever a training run, never anyone's other files.
        raise FileExistsError(f"{out}: exists and is not a training run (no config.json of this toolkit); "
                              "--overwrite replaces only a run folder; choose another --out")
    run_dir = staging if overwrite and has_run else out
    if run_dir is out and staging.exists():
        if overwrite:
            shutil.rmtree(staging)  # out is empty: nothing to replace, train in place
        elif has_run:
            print(f"note: {staging} holds an unfinished --overwrite run for {out}; add --overwrite to continue it")
    comparable = _comparable(json.loads(json.dumps(config.to_dict(), default=str)))
    state = _read_state(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        old = _read_config_dict(run_dir / "config.json")
        if state is None or old is None:
            if run_dir is staging or _only_startup_files(run_dir):
                # Killed while starting, before anything worth keeping was written.
                shutil.rmtree(run_dir)
                state = None
            else:
                if _is_run_config(run_dir / "config.json"):  # a run whose state is lost: --overwrite may replace it
                    raise FileExistsError(f"{out}: folder exists and is not a resumable run; choose another --out "
                                          "or pass --overwrite")
                raise FileExistsError(f"{out}: exists and is not a training run; choose another --out")
        elif _comparable(old) != comparable:
            if run_dir is staging:
                shutil.rmtree(staging)  # an older --overwrite attempt with other settings
                state = None
            else:
                was, diff = _comparable(old), []
                for k in sorted(set(was) | set(comparable)):
                    a, b = was.get(k), comparable.get(k)
                    if isinstance(a, dict) and isinstance(b, dict):
                        diff += [f"{k}.{j}" for j in sorted(set(a) | set(b)) if a.get(j) != b.get(j)]
                    elif a != b:
                        diff.append(k)
                raise FileExistsError(f"{out}: holds a run with a different configuration (differs in "
                                      f"{', '.join(diff[:6])}); use another --out, or --overwrite to replace it")
        elif state.get("finished"):
            if run_dir is staging:
                atomic_replace_dir(staging, out)
                print(f"{out}: replaced by the finished --overwrite run")
            else:
                print(f"{out}: training already finished (best: {_best_name(state)}); "
                      "nothing to do. Use --overwrite to train again.")
            return out
    else:
        state = None
    ckpt_dir = run_dir / "checkpoint"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    resume = state is not None and state.get("epoch", -1) >= 0

    keras.utils.set_random_seed(config.train.seed)
    policy = _dtype_policy(config.train.mixed_precision)
    if policy:
        keras.mixed_precision.set_dtype_policy(policy)
    batch = config.train.batch_size
    steps = config.train.steps_per_epoch
    initial_epoch = state["epoch"] + 1 if resume else 0
    aug = config.augment if config.data.augment else None
    # A resumed run continues the tile stream instead of replaying its first epochs.
    train_ds = make_training_input(train_sets, config, start_tile=initial_epoch * steps * batch)

    jit = resolve_jit(config.train.jit_compile)
    killed_start = state  # a start killed before its first epoch ended (or None): may hold the parent's validation
    with _strategy():
        if resume:
            _sync_best(run_dir, state)
            model = keras.models.load_model(ckpt_dir / state.get("last", "last.keras"), safe_mode=True)
            history = state["history"]
            print(f"{out}: resuming after epoch {initial_epoch} (best so far: {_best_name(state)}, "
                  f"val_loss {state['best']:.4f})")
        else:
            model = build_from_config(config.model)
            if parent is not None:
                model.set_weights(parent.get_weights())
            if freeze_encoder:
                _freeze_encoder(model)
            model.compile(
                optimizer=keras.optimizers.Adam(config.train.learning_rate),
                loss=SegmentationLoss(config.train.loss),
                metrics=pooled_metrics(),
                jit_compile=jit,
            )
            history, state = [], None
    config = replace(config, info={**config.info, "parameters": int(model.count_params()),
                                   "augment": "on" if aug else "off"})
    config.save(run_dir / "config.json")
    start = None  # the state training starts from: a resumed run's, or the parent's as "epoch 0"
    if resume:
        start = state
    else:
        # A start killed after validating the parent keeps that validation (the same weights, the same data).
        baseline = (killed_start or {}).get("parent") if parent_baseline else None
        # Written before the first epoch, so a run killed during it resumes (from the start).
        atomic_write_text(run_dir / STATE, json.dumps({"epoch": -1, "finished": False,
                                                       **({"parent": baseline} if baseline else {})}))
        if parent_baseline:
            if baseline is None:
                t = time.time()
                # The per-epoch validation's own code path, on the same sets, tiles and loss.
                baseline = validation_scores(_validation_counts(model, val_sets, config.data, batch,
                                                                config.normalization), config.train.loss)
                print(f"parent model: val_loss {baseline['val_loss']:.4f}  val_f1 {baseline['val_f1']:.4f} "
                      f"({time.time() - t:.0f} s); an epoch must beat it to replace the parent's weights",
                      flush=True)
            start = _parent_state(baseline)
            # The parent is the best so far: model.keras holds its weights until an epoch beats it.
            _save_inference(model, ckpt_dir / start["best_file"])
            atomic_write_text(run_dir / STATE, json.dumps(start))
            _sync_best(run_dir, start)

    ResumableEarlyStopping, RunCheckpoint = _make_callbacks()
    average = [WeightAverage(config.train.weight_average, ckpt_dir, state["epoch"] if resume else None)
               ] if config.train.weight_average else []
    validate = SetValidation(val_sets, config.data, batch, config.train.loss, config.normalization)
    schedule = [] if config.train.lr_schedule == "constant" else [
        keras.callbacks.LearningRateScheduler(lambda e, _lr: lr_at(e, config.train))]
    early = ResumableEarlyStopping(start, run_dir, monitor="val_loss", patience=config.train.patience,
                                   restore_best_weights=True, verbose=1)
    ckpt = RunCheckpoint(run_dir, history, early, steps * batch)
    t0 = time.time()
    # A kill after the last epoch's state was written but before the run was marked finished: the
    # run had ended (all epochs, or EarlyStopping's patience spent, as Keras decides it); training
    # on would add epochs the uninterrupted run never had.
    # (Keras stops only after an epoch that did not improve: an improving one resets the wait.)
    ended = resume and (initial_epoch >= config.train.epochs
                        or (state["epoch"] > 0 and state.get("best_epoch") != state["epoch"]
                            and state.get("wait", 0) >= config.train.patience))
    if not ended:
        model.fit(train_ds, epochs=config.train.epochs, steps_per_epoch=steps, initial_epoch=initial_epoch,
                  callbacks=[*schedule, *average, validate, early, ckpt, *(callbacks or [])], verbose=verbose)
    final = _read_state(run_dir)
    # model.keras is the best epoch's weights (saved when it was reached).
    _sync_best(run_dir, final)
    final["finished"] = True
    atomic_write_text(run_dir / STATE, json.dumps(final))
    (ckpt_dir / AVERAGE_FILE).unlink(missing_ok=True)  # only a resume reads it
    parent_val = final.get("parent")
    cfg_final = replace(config, info={**config.info, "best_epoch": final["best_epoch"] + 1,
                                      "epochs_run": final["epoch"] + 1,
                                      "tiles_seen": (final["epoch"] + 1) * steps * batch,
                                      "train_seconds": round(final.get("seconds", 0.0), 1),
                                      **_parent_summary(final)})
    cfg_final.save(run_dir / "config.json")
    plot_history(run_dir / "history.csv", run_dir / "training_curves.png", parent=parent_val)
    if run_dir is staging:
        atomic_replace_dir(staging, out)
    print(f"{out}: done in {time.time() - t0:.0f} s; best: {_best_name(final)} "
          f"(val_loss {final['best']:.4f}); model at {out / 'model.keras'}")
    return out


PARENT_FILE = "best-0000.keras"  # the parent's weights as the run's "epoch 0" (epochs are best-0001, ...)


def _parent_state(baseline: dict) -> dict:
    """The run's state before its first epoch when it must beat its parent: the parent's validation
    (`validation_scores`) is the best so far, its weights the best checkpoint (epoch index -1)."""
    return {"epoch": -1, "wait": 0, "best": float(baseline["val_loss"]), "best_epoch": -1, "best_file": PARENT_FILE,
            "last": None, "seconds": 0.0, "history": [], "finished": False, "parent": baseline}


def _best_name(state: dict) -> str:
    return "the parent model (no epoch beat it)" if state.get("best_epoch") == -1 else \
        f"epoch {state['best_epoch'] + 1}"


def _parent_summary(state: dict) -> dict:
    """config.json `info` entries comparing the parent with the run's result (empty without a baseline):
    `parent_validation` (its val_* figures), `best_validation` (the kept model's) and `kept_parent`."""
    parent = state.get("parent")
    if not parent:
        return {}
    keys = ("val_loss", "val_f1", "val_iou", "val_precision", "val_recall")
    kept = state.get("best_epoch") == -1
    row = parent if kept else next((r for r in state.get("history", []) if r.get("epoch") == state["best_epoch"] + 1),
                                   {})
    return {"parent_validation": {k: parent[k] for k in keys if k in parent},
            "best_validation": {k: row[k] for k in keys if k in row}, "kept_parent": kept}


def parent_comparison(out: str | Path) -> list[str]:
    """The lines a command prints at the end of a run that started from a parent model: whether an
    epoch beat the parent, and "parent F1 X -> best Y" (from config.json; [] for other runs)."""
    info = (_read_config_dict(Path(out) / "config.json") or {}).get("info") or {}
    parent, best = info.get("parent_validation"), info.get("best_validation")
    if not parent or not best:
        return []
    lines = []
    if info.get("kept_parent"):
        lines.append(f"no epoch beat the parent model (val_loss {parent['val_loss']:.3f}, F1 {parent['val_f1']:.3f}): "
                     "the run keeps the parent's weights")
    lines.append(f"validation F1: parent {parent['val_f1']:.3f} -> best {best['val_f1']:.3f} "
                 f"({'the parent' if info.get('kept_parent') else 'epoch ' + str(info.get('best_epoch'))})")
    return lines


def _only_startup_files(run_dir: Path) -> bool:
    """True if `run_dir` holds nothing but what `train` writes before the first epoch ends: a killed
    start of a run, safe to delete. A config.json must be one this toolkit wrote (`_is_run_config`),
    and temporaries only those of its atomic writes: a user's folder holding a config.json or *.tmp
    files of their own is not a run, and is never deleted."""
    startup = {"config.json", "checkpoint", STATE}
    for f in run_dir.rglob("*"):
        rel = f.relative_to(run_dir)
        # What atomic_write_text leaves when killed mid-write (.config.json.<pid>.tmp, and the state's).
        ours_tmp = f.name.endswith(".tmp") and (rel.parts[0] == "checkpoint" or f.name.startswith(".config.json."))
        if not (str(rel) in startup or ours_tmp):
            return False
    return not (run_dir / "config.json").exists() or _is_run_config(run_dir / "config.json")


def _is_run_config(path: Path) -> bool:
    """Whether `path` is a config.json this toolkit wrote for a run (not a user's file of that name)."""
    d = _read_config_dict(path)
    if not isinstance(d, dict) or not {"data", "model", "train", "info"} <= set(d):
        return False
    try:
        Config.from_dict(d, source=str(path))
    except (TypeError, ValueError):
        return False
    return True


def _read_state(run_dir: Path) -> dict | None:
    try:
        return json.loads((run_dir / STATE).read_text())
    except (OSError, ValueError):
        return None


def _read_config_dict(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _sync_best(run_dir: Path, state: dict) -> None:
    """Make model.keras the best checkpoint the state names (a kill may have come in between)."""
    best = state.get("best_file")
    if best and (run_dir / "checkpoint" / best).is_file():
        src = run_dir / "checkpoint" / best
        tmp = run_dir / ".model.keras.tmp"
        shutil.copyfile(src, tmp)
        os.replace(tmp, run_dir / "model.keras")
    _prune_checkpoints(run_dir / "checkpoint", keep={state.get("last"), best})


def _prune_checkpoints(ckpt_dir: Path, keep: set) -> None:
    """Delete checkpoint files the state no longer names, and half-written temporaries.

    A kill in the middle of an atomic write leaves its temporary behind (any
    file with ``.tmp`` in its name: a model, or ``.state.json.<pid>.tmp``);
    only one process trains into a run folder (the run lock), so none of them
    is still being written.
    """
    for f in ckpt_dir.iterdir() if ckpt_dir.is_dir() else ():
        stale = ".tmp" in f.name
        old = f.suffix == ".keras" and f.name.startswith(("last-", "best-")) and f.name not in keep
        if f.is_file() and (stale or old):
            f.unlink(missing_ok=True)


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Learning rate of epoch `epoch` (0-based) under cfg.lr_schedule."""
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "cosine":
        return float(cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * epoch / max(cfg.epochs, 1))))
    raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {cfg.lr_schedule!r}")


def make_training_input(train_sets, config: Config, start_tile: int = 0):
    """tf.data on the TensorFlow backend, a PyDataset elsewhere; the same batches either way."""
    import keras

    aug = config.augment if config.data.augment else None
    args = (train_sets, config.data, config.train.batch_size, config.train.seed, aug, start_tile)
    if keras.backend.backend() == "tensorflow":
        from .data import training_dataset

        return training_dataset(*args, normalization=config.normalization)
    from .pydata import TrainingTiles

    return TrainingTiles(*args, normalization=config.normalization)


def region_counts(model, region, factor: float, data_cfg, batch_size: int,
                  normalization: dict | None = None) -> np.ndarray:
    """Pooled [sum p*t, sum p, sum t, tp, fp, fn, tn, sum CE, n valid] of one validation region's grid tiles
    (`sampling.selection_tiles`: at least 256 px of context, whatever the training tile)."""
    from .sampling import selection_tiles

    acc = np.zeros(9, np.float64)
    x, y = selection_tiles(region, data_cfg.tile_size, factor, data_cfg.ignore_value, normalization)
    # The training batch's pixels per call, in tiles that may be larger (sampling.validation_tile).
    batch_size = max(1, batch_size * data_cfg.tile_size ** 2 // x.shape[1] ** 2)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size, ..., 0]
        n = len(xb)
        if n < batch_size:  # one input shape only: no retracing for the last batch
            xb = np.concatenate([xb, np.zeros((batch_size - n, *xb.shape[1:]), xb.dtype)])
        p = np.asarray(model.predict_on_batch(xb), np.float32)[:n, ..., 1]
        v = yb >= 0
        t, pv = np.where(v, yb, 0.0), np.where(v, p, 0.0)
        pred = (p >= 0.5) & v
        truth = (yb > 0.5) & v
        pc = np.clip(pv, 1e-7, 1 - 1e-7)
        ce = -(t * np.log(pc) + (1 - t) * np.log(1 - pc))
        acc += [np.sum(pv * t), np.sum(pv), np.sum(t), np.sum(pred & truth), np.sum(pred & ~truth),
                np.sum(~pred & truth), np.sum(~pred & ~truth & v), np.sum(ce * v), np.sum(v)]
    return acc


def _validation_counts(model, sets, data_cfg, batch_size: int,
                       normalization: dict | None = None) -> dict[str, np.ndarray]:
    """Per set: `region_counts` summed over its validation regions."""
    return {s.name: sum((region_counts(model, r, s.factor, data_cfg, batch_size, normalization) for r in s.regions),
                        np.zeros(9))
            for s in sets}


def validation_scores(counts: dict[str, np.ndarray], loss: str = "dice") -> dict[str, float]:
    """Per-set and mean validation figures from `_validation_counts`.

    Each set's loss is the soft Dice (+ mean CE for "dice_ce") pooled over its
    whole val split; `val_loss`, `val_f1`, ... are means over sets, so a set
    with many slices does not outweigh the others.
    """
    from .metrics import scores

    per = {}
    for name, (spt, sp, st, tp, fp, fn, tn, ce, nv) in counts.items():
        loss_v = 1.0 - (2 * spt + 1.0) / (sp + st + 1.0)
        if loss == "dice_ce":
            loss_v += ce / max(nv, 1.0)
        sc = scores({"tp": int(tp), "fp": int(fp), "fn": int(fn), "tn": int(tn)})
        per[name] = {"loss": float(loss_v), **{k: float(sc[k]) for k in ("f1", "iou", "precision", "recall")}}
    logs = {f"val_{k}": float(np.mean([p[k] for p in per.values()])) for k in ("loss", "f1", "iou", "precision", "recall")}
    if len(per) > 1:
        for name, p in per.items():
            logs.update({f"val_{name}_{k}": p[k] for k in ("loss", "f1", "iou")})
    return logs


def SetValidation(val_sets, data_cfg, batch_size: int, loss: str = "dice", normalization: dict | None = None):
    """Keras callback: after each epoch, validate on every set and put `val_*` into the logs
    (before EarlyStopping and the checkpoint read them)."""
    import keras

    class _SetValidation(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            t = time.time()
            v = validation_scores(_validation_counts(self.model, val_sets, data_cfg, batch_size, normalization),
                                  loss)
            if logs is not None:
                logs.update(v)
            per = "  ".join(f"{s.name} F1 {v.get(f'val_{s.name}_f1', v['val_f1']):.3f}" for s in val_sets)
            print(f"epoch {epoch + 1}: val_loss {v['val_loss']:.4f}  val_f1 {v['val_f1']:.4f}  ({per}; "
                  f"{time.time() - t:.0f} s)", flush=True)

    return _SetValidation()


AVERAGE_FILE = "average.npz"


def WeightAverage(decay: float, ckpt_dir: Path, resume_epoch: int | None = None):
    """Keras callback: an exponential moving average of the model's float weights (batch-norm
    statistics included), updated after every training step with decay min(decay, (1 + t) /
    (10 + t)), t = steps averaged so far (the warm-up of tf.train.ExponentialMovingAverage, so the
    average soon leaves the initial weights).

    At each epoch's end the average replaces the weights, so that validation, EarlyStopping's best
    weights and the checkpoints see it; the optimiser's own weights come back at the next epoch's
    start. Both are kept in `ckpt_dir/average.npz`, written before the epoch's state, so a run
    resumed after epoch `resume_epoch` continues both exactly (where the file is of another epoch,
    the kill came between the two writes, and training resumes from the average).
    """
    import keras

    class _WeightAverage(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            w = self.model.get_weights()
            # Floats only: seed-generator states are integers and must not be averaged.
            self._index = [i for i, a in enumerate(w) if np.issubdtype(a.dtype, np.floating)]
            self._avg = [w[i].astype(np.float32) for i in self._index]
            self._raw, self._steps = None, 0
            path = ckpt_dir / AVERAGE_FILE
            if resume_epoch is not None and path.is_file():
                with np.load(path) as f:
                    if int(f["epoch"]) == resume_epoch and int(f["n"]) == len(self._index):
                        self._steps = int(f["steps"])
                        self._raw = [f[f"raw{k}"] for k in range(len(self._index))]
                        self._avg = [f[f"avg{k}"] for k in range(len(self._index))]

        def _put(self, values):
            w = self.model.get_weights()
            for i, v in zip(self._index, values):
                w[i] = v.astype(w[i].dtype)
            self.model.set_weights(w)

        def on_epoch_begin(self, epoch, logs=None):
            if self._raw is not None:
                self._put(self._raw)
                self._raw = None

        def on_train_batch_end(self, batch, logs=None):
            d = min(decay, (1 + self._steps) / (10 + self._steps))
            w = self.model.get_weights()
            for a, i in zip(self._avg, self._index):
                a *= d
                a += (1 - d) * w[i]
            self._steps += 1

        def on_epoch_end(self, epoch, logs=None):
            w = self.model.get_weights()
            self._raw = [w[i] for i in self._index]
            arrays = {f"raw{k}": a for k, a in enumerate(self._raw)}
            arrays.update({f"avg{k}": a for k, a in enumerate(self._avg)})
            buf = io.BytesIO()
            np.savez(buf, epoch=epoch, steps=self._steps, n=len(self._index), **arrays)
            atomic_write_bytes(ckpt_dir / AVERAGE_FILE, buf.getvalue())
            self._put(self._avg)

    return _WeightAverage()


def _make_callbacks():
    import keras

    class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
        """EarlyStopping whose counter, best value and best weights survive a restart."""

        def __init__(self, state: dict | None, run_dir: Path, **kw):
            super().__init__(**kw)
            self._resume, self.run_dir = state, run_dir

        def on_train_begin(self, logs=None):
            super().on_train_begin(logs)
            s = self._resume
            if s:
                self.wait, self.best, self.best_epoch = s["wait"], s["best"], s["best_epoch"]
                best = self.run_dir / "checkpoint" / s["best_file"] if s.get("best_file") else self.run_dir / "model.keras"
                self.best_weights = keras.models.load_model(best, compile=False, safe_mode=True).get_weights()

    class RunCheckpoint(keras.callbacks.Callback):
        """After each epoch: best and last checkpoints (named by epoch), history, then state.json.

        state.json is written last and names the files it belongs to, so a kill
        at any point leaves a consistent state: the previous epoch's or this one's.
        """

        def __init__(self, out: Path, history: list, early, tiles_per_epoch: int):
            super().__init__()
            self.out, self.history, self.early = out, history, early
            self.tiles_per_epoch = tiles_per_epoch
            self._t = time.time()
            self._seconds = 0.0
            self._best_file = None

        def on_train_begin(self, logs=None):
            if self.early._resume:
                self._seconds = self.early._resume.get("seconds", 0.0)
                self._best_file = self.early._resume.get("best_file")

        def on_epoch_begin(self, epoch, logs=None):
            self._t = time.time()

        def on_epoch_end(self, epoch, logs=None):
            logs = {k: float(v) for k, v in (logs or {}).items()}
            self._seconds += time.time() - self._t
            self.history.append({"epoch": epoch + 1, **logs, "seconds": round(self._seconds, 1),
                                 "tiles_seen": (epoch + 1) * self.tiles_per_epoch})
            ckpt = self.out / "checkpoint"
            new_best = self.early.best_epoch == epoch
            if new_best:
                self._best_file = f"best-{epoch + 1:04d}.keras"
                _save_inference(self.model, ckpt / self._best_file)
            last = f"last-{epoch + 1:04d}.keras"
            _atomic_save(self.model, ckpt / last)
            write_history(self.history, self.out / "history.csv")
            state = {"epoch": epoch, "wait": self.early.wait,
                     "best": float(self.early.best), "best_epoch": self.early.best_epoch,
                     "best_file": self._best_file, "last": last,
                     "seconds": self._seconds, "history": self.history, "finished": False}
            if (self.early._resume or {}).get("parent"):  # the baseline, kept for a resume and the summary
                state["parent"] = self.early._resume["parent"]
            atomic_write_text(self.out / STATE, json.dumps(state))
            if new_best:
                _sync_best(self.out, state)
            else:
                _prune_checkpoints(ckpt, {last, self._best_file})

    return ResumableEarlyStopping, RunCheckpoint


def write_history(rows: list[dict], path: Path) -> None:
    import pandas as pd

    tmp = path.with_name(path.name + ".tmp")
    pd.DataFrame(rows).to_csv(tmp, index=False)
    os.replace(tmp, path)


def plot_history(history_csv: Path, out_png: Path, parent: dict | None = None) -> None:
    """Loss, F1 and IoU per epoch for training and validation; `parent`: the parent model's validation
    figures (`validation_scores`), drawn as a level the epochs had to beat."""
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
    if parent:
        for ax, key in zip(axes, ("val_loss", "val_f1", "val_iou")):
            if key in parent:
                ax.axhline(parent[key], color="tab:red", ls=":", lw=1, label="parent (validation)")
                ax.legend()
    if "val_loss" in h and not (parent and h["val_loss"].min() >= parent["val_loss"]):
        best = h["val_loss"].idxmin()
        axes[0].axvline(h["epoch"][best], color="grey", ls="--", lw=1)
    fig.tight_layout()
    tmp = out_png.with_name(f".{out_png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out_png)


# ----------------------------------------------------------------------------
# CLI


def build_parser(prog: str = "python -m xmdl_tf.train", finetune: bool = False,
                 description: str | None = None) -> argparse.ArgumentParser:
    p = cli.parser(prog, description or __doc__.split("\n\n")[0])
    p.add_argument("--data", nargs="+", required=True,
                   help="data set folder(s) in the split layout <dir>/{train,val}/{x,y}; or, with --labels, image "
                        "folders, globs or multi-page TIFF stacks")
    p.add_argument("--labels", nargs="+", default=None, metavar="LABELS",
                   help="one per --data set: the label folder or glob (paired by file name) of an image folder, or "
                        "the label stack of a TIFF stack; '-' for a set in the split layout. Such a set has no val "
                        "split: validation is held back from its slices (--val-fraction)")
    p.add_argument("--out", required=True, help="run folder (created; an interrupted run here is resumed)")
    p.add_argument("--tile-size", type=cli.positive_int, default=256, help="training tile height and width, px")
    p.add_argument("--tiles-per-slice", type=cli.positive_int, default=8, help="random crops per decoded slice")
    p.add_argument("--foreground-fraction", type=cli.fraction, default=0.0,
                   help="expected minimum share of tiles centred on a mitochondrion (0 = uniform)")
    p.add_argument("--batch-size", type=cli.positive_int, default=8, help="tiles per training step")
    # Fine-tuning on a few slices: a fixed budget of 10 epochs of at least 40 steps (3,200 tiles), the
    # best epoch kept. Up to 50 epochs of one pass (1-7 steps) with patience 5 stopped half such runs
    # within 20 epochs on validation noise; the fixed budget lifted the val F1 of the leave-one-set-out
    # models on the set they never saw by 0.08 and 0.04 on average over two draws (models/README.md,
    # "Adapting to a new stack").
    p.add_argument("--epochs", type=cli.positive_int, default=10 if finetune else 50,
                   help="most epochs (EarlyStopping may end sooner)")
    p.add_argument("--patience", type=cli.nonnegative_int, default=10 if finetune else 5,
                   help="EarlyStopping patience on validation loss")
    p.add_argument("--lr", type=cli.learning_rate, default=1e-4 if finetune else 1e-3, help="Adam learning rate")
    p.add_argument("--loss", choices=("dice", "dice_ce"), default="dice")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="cosine: decay the learning rate to 0 over --epochs (steadier validation late in long runs)")
    p.add_argument("--steps-per-epoch", type=cli.positive_int, default=None,
                   help="default: enough tiles to cover the training slices once, at least --min-steps-per-epoch")
    p.add_argument("--min-steps-per-epoch", type=cli.positive_int, default=40 if finetune else 1,
                   help="least steps of an epoch whose length is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=cli.probability, default=0.2,
                   help="rows held back for validation when a data set has no val split")
    p.add_argument("--ignore-value", type=cli.nonnegative_int, default=None, help="label value of unlabelled pixels (ignored by the loss)")
    p.add_argument("--pixel-size", nargs="+", default=None, metavar="NM",
                   help="pixel size in nm of data sets whose dataset.json / TIFF metadata do not give one: one value "
                        "for all, or one per --data set ('unknown' for a set whose pixel size is not known)")
    p.add_argument("--set-weights", nargs="+", type=cli.nonnegative_float, default=None, metavar="W",
                   help="share of the training tiles from each --data set (default: equal shares)")
    p.add_argument("--max-slices", type=cli.positive_int, default=None, help="use only the first N training slices of each set")
    p.add_argument("--no-augment", action="store_true")
    # Fine-tuning keeps the recipe its adaptation curve was measured with (models/README.md).
    p.add_argument("--augment", choices=("em", "basic"), default="basic" if finetune else "em",
                   help="augmentation preset: 'em' spans TEM, SBEM and FIB-SEM (zoom, any rotation, elastic, defocus, "
                        "noise, stripes, shading); 'basic' is flips, 90-degree turns and mild intensity jitter")
    p.add_argument("--augment-off", nargs="+", default=[], choices=AugmentConfig.COMPONENTS, metavar="PART",
                   help=f"switch parts of the preset off (one of: {', '.join(AugmentConfig.COMPONENTS)})")
    p.add_argument("--augment-scale", nargs=2, type=cli.positive_float, default=None, metavar=("MIN", "MAX"),
                   help="range of the random zoom (log-uniform; default {:g} {:g}): wider tolerates more error in, "
                        "or ignorance of, the data's pixel size".format(*AugmentConfig().scale))
    p.add_argument("--augment-sharpen", type=cli.nonnegative_float, default=None, metavar="AMOUNT",
                   help="largest unsharp-mask amount on the tiles not defocused (default: the preset's, "
                        "{:g} for 'em')".format(AugmentConfig().sharpen))
    p.add_argument("--augment-texture", type=cli.fraction, default=None, metavar="P",
                   help="share of tiles given a random texture (a random shallow convolutional network, GIN; "
                        "default: the preset's, {:g} for 'em')".format(AugmentConfig().texture))
    p.add_argument("--augment-strength", type=cli.nonnegative_float, default=2.0 if finetune else 1.0,
                   help="multiplies every intensity augmentation range")
    p.add_argument("--weight-average", type=cli.fraction, default=0.0, metavar="DECAY",
                   help="validate and keep an exponential moving average of the weights, DECAY per step "
                        "(e.g. 0.995; default 0: off)")
    p.add_argument("--mixed-precision", nargs="?", const="float16", default=None, choices=("float16", "bfloat16"),
                   help="mixed-precision compute: float16 (GPUs) or bfloat16 (GPUs, CPUs with AVX512-BF16/AMX)")
    p.add_argument("--no-jit", action="store_true",
                   help="never use XLA (default: XLA on GPUs only; on CPU it measured slower)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    if finetune:
        p.add_argument("--model", required=True, help="parent model (run folder, .keras file or built-in name)")
        p.add_argument("--freeze-encoder", action="store_true", help="train only the decoder")
    else:
        p.add_argument("--model-pixel-size", type=cli.pixel_size, default=None, metavar="NM",
                       help="the model's pixel size; sets of known pixel size are resampled to it (default: the sets' "
                            "common pixel size, or the median of differing ones)")
        p.add_argument("--depth", type=cli.positive_int, default=6, help="U-Net levels")
        p.add_argument("--base-filters", type=cli.positive_int, default=8, help="filters of the first level (doubling per level)")
        p.add_argument("--variant", choices=sorted(VARIANTS), default="residual_attention")
        p.add_argument("--dropout", type=cli.fraction, default=0.0)
        p.add_argument("--input-blur", type=cli.nonnegative_float, default=0.0, metavar="SIGMA",
                       help="fixed Gaussian low-pass (sigma in model pixels) in front of the network, in training "
                            "and inference alike (default 0: none)")
        p.add_argument("--mixstyle", type=cli.fraction, default=0.0, metavar="P",
                       help="in training, mix each tile's feature statistics (first three encoder levels) with "
                            "another tile's of the batch with probability P (MixStyle; default 0: off)")
        p.add_argument("--normalization", choices=NORMALIZATION_METHODS, default=NORMALIZATION["method"],
                       help="intensity normalisation of each slice, stored with the model and applied at inference: "
                            "'percentile' (linear between its 1st and 99.8th percentiles; default) or 'equalize' "
                            "(each grey value's rank in the slice's histogram: blind to contrast, gamma and "
                            "brightness)")
        p.add_argument("--init-from", default=None, help="start from this model's weights (fine-tuning)")
        p.add_argument("--freeze-encoder", action="store_true", help="with --init-from: train only the decoder")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    residual, attention = VARIANTS[getattr(args, "variant", "residual_attention")]
    return Config(
        data=DataConfig(tile_size=args.tile_size, tiles_per_slice=args.tiles_per_slice,
                        foreground_fraction=args.foreground_fraction, augment=not args.no_augment,
                        ignore_value=args.ignore_value, pixel_size_nm=getattr(args, "model_pixel_size", None),
                        set_weights=tuple(args.set_weights) if args.set_weights else None),
        model=ModelConfig(depth=getattr(args, "depth", 6), base_filters=getattr(args, "base_filters", 8),
                          residual=residual, attention=attention, dropout=getattr(args, "dropout", 0.0),
                          input_blur=getattr(args, "input_blur", 0.0), mixstyle=getattr(args, "mixstyle", 0.0)),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                          patience=args.patience, loss=args.loss, steps_per_epoch=args.steps_per_epoch,
                          min_steps_per_epoch=args.min_steps_per_epoch,
                          lr_schedule=args.lr_schedule,
                          seed=args.seed, mixed_precision=args.mixed_precision or False,
                          jit_compile=False if args.no_jit else "auto",
                          weight_average=getattr(args, "weight_average", 0.0)),
        augment=augment_from_args(args),
        normalization={**NORMALIZATION, "method": getattr(args, "normalization", NORMALIZATION["method"])},
    )


def augment_from_args(args: argparse.Namespace) -> AugmentConfig:
    """The --augment preset with --augment-off parts switched off and --augment-scale and
    --augment-sharpen and --augment-texture applied."""
    aug = AugmentConfig.preset(args.augment)
    if getattr(args, "augment_scale", None):
        aug = replace(aug, scale=tuple(args.augment_scale))
    if getattr(args, "augment_sharpen", None) is not None:
        aug = replace(aug, sharpen=args.augment_sharpen)
    if getattr(args, "augment_texture", None) is not None:
        aug = replace(aug, texture=args.augment_texture)
    return aug.without(*args.augment_off)


def train_from_args(args: argparse.Namespace, init_from: str | None) -> Path:
    """`train` with everything taken from parsed `train` or `finetune` arguments."""
    out = train(args.data, args.out, config_from_args(args), val_fraction=args.val_fraction, init_from=init_from,
                freeze_encoder=args.freeze_encoder, augment_strength=args.augment_strength,
                max_slices=args.max_slices, overwrite=args.overwrite,
                pixel_sizes=parse_pixel_sizes(args.pixel_size, len(args.data)), parent_baseline=True,
                labels=args.labels)
    for line in parent_comparison(out):
        print(line)
    return out


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.freeze_encoder and not args.init_from:
        parser.error("--freeze-encoder needs --init-from")
    check_args(parser, args)
    train_from_args(args, args.init_from)
    return 0


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse arguments that would only fail later, with one line naming the problem."""
    if getattr(args, "augment_scale", None):
        lo, hi = args.augment_scale
        if not MIN_ZOOM <= lo <= hi <= MAX_ZOOM:
            parser.error(f"--augment-scale {lo:g} {hi:g}: need {MIN_ZOOM:g} <= MIN <= MAX <= {MAX_ZOOM:g}")
    try:
        parse_pixel_sizes(args.pixel_size, len(args.data))
        check_labels_per_set(args.labels, len(args.data))
    except ValueError as err:
        parser.error(str(err))
    if args.set_weights is not None and (len(args.set_weights) != len(args.data) or min(args.set_weights) < 0
                                         or sum(args.set_weights) <= 0):
        parser.error(f"--set-weights: give one weight >= 0 per --data set ({len(args.data)}), with a positive sum")
    depth = getattr(args, "depth", None)
    if depth is not None:
        if not 2 <= depth <= 8:
            parser.error(f"--depth must be between 2 and 8, got {depth}")
        if args.tile_size % 2 ** (depth - 1):
            parser.error(f"--tile-size {args.tile_size} must be a multiple of 2**(depth-1) = {2 ** (depth - 1)}")
    if args.weight_average >= 1:
        parser.error(f"--weight-average {args.weight_average:g}: a decay per step, below 1 (e.g. 0.995)")
    if getattr(args, "dropout", 0.0) >= 1:
        parser.error("--dropout must be below 1")
    blur = getattr(args, "input_blur", 0.0)
    if blur > MAX_INPUT_BLUR:
        parser.error(f"--input-blur {blur:g}: at most {MAX_INPUT_BLUR:g} pixels (the tile must stay wider "
                     "than the blur's reach)")
    if blur and math.ceil(3 * blur) >= args.tile_size:
        parser.error(f"--input-blur {blur:g} reaches {math.ceil(3 * blur)} px, not less than --tile-size "
                     f"{args.tile_size}")
    if blur and getattr(args, "init_from", None):
        parser.error("--input-blur with --init-from: the architecture comes from the parent model")
    if getattr(args, "mixstyle", 0.0) and getattr(args, "init_from", None):
        parser.error("--mixstyle with --init-from: the architecture comes from the parent model")


if __name__ == "__main__":
    sys.exit(main())
