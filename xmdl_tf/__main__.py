"""`python -m xmdl_tf`: the toolkit's commands, one line each.

Every command runs as `python -m xmdl_tf.<module>` or as the console script
installed with the package (`xmdl-<name>`); both call the same `main(argv)`.
"""
from __future__ import annotations

import sys

# (console script, module, what it does). pyproject.toml's [project.scripts]
# must list exactly these (tests/test_packaging.py checks it); kept static so
# listing the commands imports nothing heavy.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("xmdl-analyze", "xmdl_tf.analyze",
     "segment, separate, count, measure, classify and explain slices or stacks (--volume for 3-D)"),
    ("xmdl-volume", "xmdl_tf.volume",
     "chunked OME-Zarr/N5/HDF5/TIFF volumes on a local or remote Dask cluster"),
    ("xmdl-evaluate", "xmdl_tf.evaluate", "score a model on annotated slices or volumes (F1, IoU, instance AP)"),
    ("xmdl-train", "xmdl_tf.train", "train the residual attention U-Net on annotated EM"),
    ("xmdl-finetune", "xmdl_tf.finetune", "adapt a trained model to your microscope from a few annotated slices"),
    ("xmdl-adapt", "xmdl_tf.adapt", "adapt a model to your microscope without annotation (self-training)"),
    ("xmdl-tune", "xmdl_tf.tune", "choose a model's inference defaults (threshold, minimum size) on validation data"),
    ("xmdl-calibrate", "xmdl_tf.calibrate",
     "fit temperature, object confidence and the out-of-distribution warning on validation data"),
    ("xmdl-export", "xmdl_tf.export", "export for TF Serving (SavedModel) or the BioImage Model Zoo (--format bioimageio)"),
    ("xmdl-napari", "xmdl_tf.napari.launch", "open napari with the xmdl-tf widgets docked (needs the [napari] extra)"),
)


def usage() -> str:
    """The command table as printed by `python -m xmdl_tf`."""
    from . import __version__

    width = max(len(c[0]) for c in COMMANDS)
    lines = [f"xmdl_tf {__version__}: mitochondria in electron microscopy (XM-DL)", "",
             "commands: xmdl-NAME, or python -m xmdl_tf NAME, or python -m MODULE; --help on any of them", ""]
    for name, module, desc in COMMANDS:
        lines += [f"  {name:<{width}}  {desc}", f"  {'':<{width}}  (python -m {module.removesuffix('.launch')})"]
    lines += ["", "built-in models: " + (", ".join(_builtin()) or "none installed"),
              "docs: README.md; model card: models/README.md in the source repository"]
    return "\n".join(lines)


def _builtin() -> list[str]:
    from .pretrained import builtin_models

    return list(builtin_models())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] not in ("-h", "--help"):
        names = {c[0].removeprefix("xmdl-"): c[1] for c in COMMANDS}
        if argv[0] in names:  # `python -m xmdl_tf analyze ...` works too
            import importlib

            return importlib.import_module(names[argv[0]]).main(argv[1:])
        print(f"unknown command {argv[0]!r}\n\n{usage()}", file=sys.stderr)
        return 2
    print(usage())
    return 0


if __name__ == "__main__":
    sys.exit(main())
