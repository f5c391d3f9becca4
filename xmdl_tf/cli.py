"""What every command line shares: one-line errors, argument ranges, `--debug`.

A command's `main(argv=None)` is wrapped in `guarded`: a mistake of the user's
(bad data, a missing model, an existing output, an argument out of range, a
full disk) ends with one line `error: ...` on stderr and exit code 2, no
traceback; `--debug` (or XMDL_DEBUG=1) shows the traceback instead. An
interrupt exits with 130 after saying what is safe to do next.

The `type=` helpers below refuse out-of-range values at parse time, so a
negative overlap or a threshold of 2 never reaches the library.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import warnings
from pathlib import Path
from typing import Callable

# Plausible EM pixel sizes: from sub-nm cryo-EM to 10 um overview scans. Outside
# this a value is a unit mistake (m for nm, pixels per unit for size, ...).
PIXEL_SIZE_RANGE_NM = (0.1, 10_000.0)


class UsageError(ValueError):
    """A command-line mistake found after parsing (the message says which flag)."""


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean bad input, not a bug: reported in one line."""
    from .io import DataError
    from .runlock import FolderBusy

    return (DataError, UsageError, FolderBusy, FileExistsError, FileNotFoundError, PermissionError, OSError, ValueError)


def out_of_memory_errors() -> tuple[type[BaseException], ...]:
    """NumPy's MemoryError, and TensorFlow's ResourceExhaustedError once TensorFlow is loaded (never
    imported for this)."""
    tf = sys.modules.get("tensorflow")
    exhausted = getattr(getattr(tf, "errors", None), "ResourceExhaustedError", None)
    return (MemoryError,) + ((exhausted,) if isinstance(exhausted, type) else ())


def guarded(main: Callable[[list[str] | None], int | None] | None = None, *, resume_flag: bool = False):
    """Decorator for `main(argv)`: expected errors -> `error: <message>` and exit 2.

    `@guarded(resume_flag=True)` for a command that continues an interrupted run only with
    `--resume` (the advice printed on an interrupt says so).
    """
    if main is None:
        return functools.partial(guarded, resume_flag=resume_flag)

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        args = sys.argv[1:] if argv is None else list(argv)
        debug = "--debug" in args or os.environ.get("XMDL_DEBUG", "") not in ("", "0")
        shown = warnings.formatwarning
        if not debug:  # a user's warning is one line, not Python's file:line and a line of source code
            warnings.formatwarning = _one_line_warning
        try:
            return int(main(argv) or 0)
        except KeyboardInterrupt:
            if debug:
                raise
            # train and finetune resume by themselves; analyze and volume skip what is done with --resume.
            hint = " with --resume" if resume_flag else " again"
            if sys.stderr.isatty():  # a progress bar may hold the terminal's line: start a new one
                print(file=sys.stderr)
            print(f"interrupted; outputs written so far are complete (run the same command{hint} to continue)",
                  file=sys.stderr)
            return 130
        except expected_errors() as err:
            if debug:
                raise
            print(f"error: {one_line(err)}", file=sys.stderr)
            return 2
        except out_of_memory_errors() as err:
            if debug:
                raise
            # TensorFlow's message is pages of allocator state; the size it failed on is enough.
            first = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            print(f"error: out of memory{f' ({first})' if first else ''}; use smaller tiles or batches (the "
                  "command's tile and batch size options), or a model with fewer filters (e.g. xmdl_ref_f8), then "
                  "run the same command again", file=sys.stderr)
            return 2
        finally:
            warnings.formatwarning = shown

    return wrapper


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    text = " ".join(str(message).split())
    return f"warning: {text}\n" if issubclass(category, UserWarning) else \
        f"{category.__name__}: {text} ({filename}:{lineno})\n"


def mitochondria(n) -> str:
    """'1 mitochondrion', '2 mitochondria' (a count as printed to the user)."""
    return f"{n} mitochondrion" if n == 1 else f"{n} mitochondria"


def one_line(err: BaseException) -> str:
    """The message of an exception on one line (OSErrors with their file name)."""
    if isinstance(err, OSError) and not isinstance(err, (FileExistsError, FileNotFoundError)) and err.strerror:
        name = f"{err.filename}: " if err.filename else ""
        msg = f"{name}{err.strerror}"
        if err.errno == 28:  # ENOSPC
            msg += " (the disk is full; outputs finished before this point are complete)"
        return msg
    text = str(err) or type(err).__name__
    return " ".join(text.split())


def add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's, but a help text that already says its default ("(default: the shipped model)") does
    not get a second, bare one ("(default: None)")."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if "(default" in text else super()._get_help_string(action)


def parser(prog: str, description: str, **kw) -> argparse.ArgumentParser:
    """An ArgumentParser that shows every default in --help and has --debug."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=kw.pop("formatter_class", _DefaultsFormatter), **kw)
    add_debug(p)
    return p


# ----------------------------------------------------------------------------
# argparse types


def _number(kind: type, text: str) -> float:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive_int(text: str) -> int:
    v = _number(int, text)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def nonnegative_int(text: str) -> int:
    v = _number(int, text)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {v}")
    return v


def positive_float(text: str) -> float:
    v = _number(float, text)
    if not v > 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return v


def nonnegative_float(text: str) -> float:
    v = _number(float, text)
    if not v >= 0 or v == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return v


def probability(text: str) -> float:
    """A threshold strictly between 0 and 1."""
    v = _number(float, text)
    if not 0 < v < 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (exclusive), got {text}")
    return v


def fraction(text: str) -> float:
    """A share in [0, 1]."""
    v = _number(float, text)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return v


def learning_rate(text: str) -> float:
    v = _number(float, text)
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (Adam's usual range is 1e-5 to 1e-2), got {text}")
    return v


def pixel_size(text: str) -> float:
    """Pixel size in nm within `PIXEL_SIZE_RANGE_NM`."""
    v = _number(float, text)
    check_pixel_size(v, "value")
    return v


def voxel_size(text: str) -> float:
    """One side of a voxel in nm within `PIXEL_SIZE_RANGE_NM` (--voxel-size Z Y X)."""
    v = _number(float, text)
    check_pixel_size(v, "value", what="voxel size")
    return v


def check_pixel_size(value: float, source: str, what: str = "pixel size") -> float:
    """`value` (nm) if plausible for EM; else a one-line error naming `source`."""
    lo, hi = PIXEL_SIZE_RANGE_NM
    if not lo <= value <= hi:
        unit = "nm per voxel side" if what == "voxel size" else "nm per pixel"
        msg = (f"{source}: {what} {value:g} nm is outside the plausible range {lo:g}-{hi:g} nm for EM "
               f"(a unit mistake? give {unit})")
        if source == "value":
            raise argparse.ArgumentTypeError(msg.split(": ", 1)[1])
        raise UsageError(msg)
    return value


def differing(old: dict, new: dict, qualify: bool = True, skip: tuple[str, ...] = ()) -> list[str]:
    """Names of the settings that differ between two JSON-like records (sorted; keys in `skip` left out).

    A setting that is itself a record is named by its differing fields, so a refusal says "threshold",
    not "inference": "inference threshold" with `qualify`, bare "threshold" without.
    """
    names = []
    for key in sorted((set(old) | set(new)) - set(skip)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            names += [f"{key} {f}" if qualify else f for f in sorted(set(a) | set(b)) if a.get(f) != b.get(f)]
        elif a != b:
            names.append(key)
    return names


def check_out_folder(out: str | Path) -> Path:
    """`out` as a Path if it can become or hold a command's output folder; else a one-line error.

    Called before any model is loaded or slice predicted, so a typo in --out costs nothing: a
    file in the way, or a folder (or the nearest existing parent of one to be created) that this
    user cannot write to, is refused up front.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder; choose another --out")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise FileExistsError(f"{probe}: is a file, so {out} cannot be created; choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"{out}: no permission to write {'there' if probe == out else f'in {probe}'}; "
                              "choose another --out")
    return out


def check_set_names(data_dirs) -> None:
    """One-line error when two data sets share a folder name: results are keyed by it, and one set
    would silently replace the other."""
    names = [Path(d).resolve().name for d in data_dirs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UsageError(f"two data sets share the folder name {dupes[0]!r} ({', '.join(map(str, data_dirs))}); "
                         "give each set its own name")


def refuse_test_split(data_dirs, split: str, what: str) -> None:
    """One-line error when the split folder a command would read, however spelled (`--split ./test`,
    `--data SET/test`), is a test split: `what` is chosen on validation data, never on test data."""
    for d in data_dirs:
        p = Path(d)
        folder = p / split if (p / split / "x").is_dir() or not (p / "x").is_dir() else p
        if folder.resolve().name == "test":
            raise UsageError(f"{folder}: a test split; {what} are chosen on validation data, never on test data")


def refuse_replacing_input(target: str | Path, source: str | Path) -> None:
    """One-line error when the output folder `target` (replaced whole on --overwrite) is the input
    `source` or holds it: writing there would delete the data being analysed."""
    t, s = Path(target).resolve(), Path(source).resolve()
    if t == s or t in s.parents:
        raise UsageError(f"{target}: this output would replace the input {source}; choose another --out")


# ----------------------------------------------------------------------------
# Inference flags, defined once for analyze, evaluate and the benchmarks


def add_inference_args(p: argparse.ArgumentParser, explain: bool = True) -> None:
    """Flags overriding the model's `InferenceConfig` (config.json "inference"); unset = the model's."""
    from .config import ZOOM_SEARCH, InferenceConfig

    d = InferenceConfig()
    g = p.add_argument_group("inference (default: the model's settings in config.json; built-in defaults shown)")
    g.add_argument("--tile", type=positive_int, default=None, help=f"largest inference tile, px ({d.tile})")
    g.add_argument("--overlap", type=nonnegative_int, default=None, help=f"least tile overlap, px ({d.overlap})")
    g.add_argument("--batch-size", type=positive_int, default=None, help="tiles per call (by tile size)")
    g.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                   help=f"average the 8 flips/rotations of each tile, 8x the compute ({d.tta})")
    g.add_argument("--threshold", type=probability, default=None,
                   help=f"foreground is probability >= threshold ({d.threshold})")
    g.add_argument("--min-area", type=nonnegative_float, default=None,
                   help=f"smallest object, nm^2, when the pixel size is known ({d.min_area_nm2:g})")
    g.add_argument("--min-size", type=nonnegative_int, default=None,
                   help=f"smallest object, px, when the pixel size is unknown ({d.min_size_px})")
    g.add_argument("--min-volume", type=nonnegative_float, default=None,
                   help=f"smallest 3-D object (--volume), nm^3, when the voxel size is known ({d.min_volume_nm3:g})")
    g.add_argument("--min-volume-vox", type=nonnegative_int, default=None,
                   help=f"smallest 3-D object (--volume), voxels, when the voxel size is unknown ({d.min_volume_vox})")
    g.add_argument("--separate", action=argparse.BooleanOptionalAction, default=None,
                   help=f"split touching mitochondria at necks ({d.separate})")
    g.add_argument("--rescale", action=argparse.BooleanOptionalAction, default=None,
                   help=f"resample inputs of known pixel size to the model's ({d.rescale})")
    g.add_argument("--auto-zoom", action=argparse.BooleanOptionalAction, default=None,
                   help="for slices of unknown pixel size, estimate the zoom that brings their mitochondria to "
                        "the widths the model knows, one or two quick passes more (needs a model tuned by "
                        f"xmdl_tf.tune) ({d.auto_zoom})")
    g.add_argument("--zoom-search", default=None, choices=ZOOM_SEARCH,
                   help="instead of auto zoom, predict a crop of each slice at x0.5-2 of the grid its pixel size "
                        "asks for (known or not) and keep the zoom the model is surest at (five quick passes "
                        "more): 'always', 'ood' (only slices the out-of-distribution score warns about) or "
                        f"'off' ({d.zoom_search})")
    if explain:
        g.add_argument("--gradcam-layer", default=None, help="conv layer to explain (dec1_conv2)")


def inference_overrides(args: argparse.Namespace) -> dict:
    """The `InferenceConfig` fields given on the command line (see `add_inference_args`)."""
    given = {"tile": args.tile, "overlap": args.overlap, "batch_size": args.batch_size, "tta": args.tta,
             "threshold": args.threshold, "min_area_nm2": args.min_area, "min_size_px": args.min_size,
             "min_volume_nm3": args.min_volume, "min_volume_vox": args.min_volume_vox, "separate": args.separate, "rescale": args.rescale,
             "auto_zoom": getattr(args, "auto_zoom", None), "zoom_search": getattr(args, "zoom_search", None),
             "gradcam_layer": getattr(args, "gradcam_layer", None)}
    return {k: v for k, v in given.items() if v is not None}


def inference_from_args(args: argparse.Namespace, base):
    """`base` (an InferenceConfig, usually the model's) with the flags given on the command line."""
    import dataclasses

    try:
        return dataclasses.replace(base, **inference_overrides(args))
    except ValueError as err:
        raise UsageError(str(err)) from None
