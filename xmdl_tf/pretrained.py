"""Built-in models: the reference model ships inside the package, found by name.

Every install (editable checkout, wheel, git URL, index) carries
`xmdl_tf/models/<name>/` (model.keras, config.json and, once calibrated,
ood.npz), located with `importlib.resources`, so the defaults work from any
folder. The model card and training artefacts stay in the repository's
`models/` folder; the weights exist once, here.

Which model a command uses, first match wins:
1. `--model PATH_OR_NAME` (a run folder, a `.keras` file, an export, or a
   built-in name such as `xmdl_ref`);
2. the environment variable `XMDL_MODEL` (a path or a built-in name), for a
   lab's own default model;
3. the built-in `xmdl_ref`.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

DEFAULT = "xmdl_ref"
ENV = "XMDL_MODEL"
MODEL_FILE = "model.keras"


def _models_root() -> Path:
    # Wheels and editable installs unpack package data as real files, so the
    # Traversable is a filesystem path; Keras needs one to open the archive.
    return Path(str(resources.files("xmdl_tf") / "models"))


def builtin_models() -> dict[str, Path]:
    """{name: folder} of the models installed with the package (folders holding model.keras)."""
    root = _models_root()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / MODEL_FILE).is_file()}


def builtin_model(name: str) -> Path | None:
    """Folder of the built-in model `name`, or None when no such model is installed."""
    return builtin_models().get(name)


def resolve_model_spec(spec: str | Path) -> Path:
    """A `--model` value as a path: an existing path as given, else a built-in name's folder.

    An existing file or folder always wins over a built-in of the same name, so
    a user's `./xmdl_ref` run folder is never shadowed by the shipped model.
    """
    path = Path(spec)
    if path.exists():
        return path
    found = builtin_model(path.name) if str(spec) == path.name else None  # a bare name, no folder part
    return found if found is not None else path


def default_model_path() -> Path | None:
    """$XMDL_MODEL (a path or built-in name), else the built-in reference model; None when neither exists."""
    env = os.environ.get(ENV)
    if env:
        return resolve_model_spec(env)
    return builtin_model(DEFAULT)


NO_DEFAULT = (f"no default model is installed (built-in '{DEFAULT}' missing and ${ENV} unset); "
              "pass --model MODEL")


def model_or_default(model: str | Path | None) -> str | Path:
    """`model` as given, else `default_model_path()`; FileNotFoundError(NO_DEFAULT) when neither exists,
    or naming $XMDL_MODEL when it names nothing (else the user sees a path they never typed)."""
    if model is not None:
        return model
    found = default_model_path()
    if found is None:
        raise FileNotFoundError(NO_DEFAULT)
    if os.environ.get(ENV) and not found.exists():
        raise FileNotFoundError(f"${ENV}={os.environ[ENV]}: no such model (a run folder, .keras file, export or "
                                f"built-in name: {', '.join(builtin_models()) or 'none installed'}); "
                                f"unset it or pass --model MODEL")
    return found


def refuse_builtin(model: str | Path, command: str) -> None:
    """ValueError when `model` is a model shipped inside the package: `command` would rewrite the
    installed files (every later default run would use them). A copy can be changed freely."""
    path = resolve_model_spec(model).resolve()
    root = _models_root().resolve()
    if path == root or root in path.parents:
        folder = path if path.is_dir() else path.parent
        raise ValueError(f"{model}: a model shipped with xmdl_tf ({folder}); {command} would rewrite the installed "
                         f"files. Copy it first (cp -r {folder} my_model) and give --model my_model")
