"""Installs like other tools: built-in model, console commands, wheel, BioImage Model Zoo export."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
from xmdl_tf.config import Config

ROOT = Path(__file__).resolve().parents[1]


def test_console_scripts_are_the_listed_commands_and_each_has_a_main():
    import importlib

    from xmdl_tf.__main__ import COMMANDS

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, module, _ in COMMANDS}
    for _, module, _ in COMMANDS:
        assert callable(importlib.import_module(module).main), module


def test_python_m_xmdl_tf_lists_every_command_and_runs_one(capsys):
    from xmdl_tf.__main__ import COMMANDS, main

    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name, _, _ in COMMANDS) and "built-in models: xmdl_ref" in out
    assert main(["bogus"]) == 2
    with pytest.raises(SystemExit) as e:  # `python -m xmdl_tf export --help` reaches export's parser
        main(["export", "--help"])
    assert e.value.code == 0 and "--format" in capsys.readouterr().out


def test_builtin_model_is_found_by_name_and_a_local_folder_or_env_wins(tmp_path, monkeypatch):
    from xmdl_tf.predict import ModelError, resolve_model_path
    from xmdl_tf.pretrained import builtin_models, default_model_path, resolve_model_spec

    ref = builtin_models()["xmdl_ref"]
    assert ref.parent.parent == ROOT / "xmdl_tf" and (ref / "model.keras").is_file()
    assert not (ROOT / "models" / "xmdl_ref" / "model.keras").exists()  # one copy of the weights
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("XMDL_MODEL", raising=False)
    assert default_model_path() == ref
    assert resolve_model_path("xmdl_ref") == (ref / "model.keras", ref / "config.json")
    (tmp_path / "xmdl_ref").mkdir()  # a user's own folder of that name is never shadowed
    assert resolve_model_spec("xmdl_ref") == Path("xmdl_ref")
    # ... and when it holds no weights (the checkout's model-card folder), the error says the way out.
    with pytest.raises(ModelError, match="xmdl_ref: no model.keras in this folder; for the built-in model say "
                                         "--model xmdl_ref"):
        resolve_model_path("xmdl_ref")
    monkeypatch.setenv("XMDL_MODEL", str(tmp_path / "mine"))
    assert default_model_path() == tmp_path / "mine"


@pytest.mark.slow
def test_wheel_installs_with_its_model_and_analyzes_the_sample_like_the_checkout(tmp_path):
    """pip wheel -> fresh venv -> `xmdl-analyze sample --out --no-tta` from outside the repo, no --model
    (the built-in named by $XMDL_MODEL, found in the installed package)."""
    import zipfile

    import pandas as pd
    import tifffile


    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", dist,
                    ROOT], check=True, cwd=tmp_path)
    wheel = next(dist.glob("xmdl_tf-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "xmdl_tf/models/xmdl_ref/model.keras" in names and "xmdl_tf/sample/x/im0015.png" in names
    assert "xmdl_tf/napari/napari.yaml" in names and not any(n.startswith("models/") for n in names)

    # A fresh venv with this wheel; the dependencies come from the test environment's
    # site-packages as a plain path entry (no .pth files, so not the editable checkout).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True)
    vpy = venv / "bin" / "python"
    site = subprocess.run([vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", vpy, "install", "--no-deps", "-q", wheel], check=True)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    image = ROOT / "xmdl_tf" / "sample" / "x" / "im0015.png"
    env = {k: v for k, v in os.environ.items() if k not in ("XMDL_MODEL", "PYTHONPATH")}
    where = subprocess.run([vpy, "-c", "import xmdl_tf; print(xmdl_tf.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where
    # Without test-time augmentation (8x the inference): what is compared is the installed wheel's
    # model and code against the checkout's, not the defaults, which tests/test_analyze.py covers.
    # The 8-filter built-in, by the name a lab's default takes ($XMDL_MODEL): found inside the installed
    # wheel as the default one is (`pretrained.builtin_model`), at a sixth of the 16-filter model's time.
    env["XMDL_MODEL"] = "xmdl_ref_f8"
    run = subprocess.run([venv / "bin" / "xmdl-analyze", image, "--out", "results", "--no-tta"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]

    # The checkout's analysis in a fresh process too, like the wheel's: inside the test process,
    # TensorFlow's thread pools are already set up by other tests, and a model's per-object
    # confidence moves by a few 1e-4 with the order of float32 reductions.
    check = subprocess.run([sys.executable, "-m", "xmdl_tf.analyze", image, "--out", tmp_path / "checkout", "--no-tta"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert check.returncode == 0, check.stderr[-2000:]
    ours, theirs = elsewhere / "results" / "im0015", tmp_path / "checkout" / "im0015"
    used = Path(json.loads((elsewhere / "results" / "settings.json").read_text())["model"])
    assert used.is_relative_to(venv) and used.parent.name == "xmdl_ref_f8", used  # the wheel's own copy
    assert np.array_equal(tifffile.imread(ours / "instances.tif"), tifffile.imread(theirs / "instances.tif"))
    a, b = pd.read_csv(ours / "morphometry.csv"), pd.read_csv(theirs / "morphometry.csv")
    assert len(a) > 0 and list(a.columns) == list(b.columns)
    # The CSV rounds to 4 decimals; another process may land one rounding step apart.
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-3, atol=2e-4)


def test_bioimageio_package_validates_and_reproduces_its_test_output(blob_run, tmp_path, monkeypatch):
    before = os.environ.get("KERAS_BACKEND")
    pytest.importorskip("bioimageio.spec")
    pytest.importorskip("bioimageio.core")
    import yaml
    from bioimageio.spec import load_model_description

    from xmdl_tf.export import main

    _, run = blob_run
    out = tmp_path / "zoo"
    # bioimageio.core unzips the SavedModel into ./bioimageio_unzipped_tf_weights; the check runs it
    # from a scratch folder, so the folder a user (or this test) runs from stays as it was.
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    assert main(["--format", "bioimageio", "--model", str(run), "--out", str(out)]) == 0  # runs core's model test
    assert list(work.iterdir()) == [] and Path.cwd() == work
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert rdf["format_version"].startswith("0.5") and set(rdf["weights"]) == {"keras_v3", "tensorflow_saved_model_bundle"}
    pre = [p["id"] for p in rdf["inputs"][0]["preprocessing"]]
    assert "scale_range" in pre and "clip" in pre
    assert load_model_description(str(out / "rdf.yaml")).validation_summary.status in ("passed", "valid-format")
    x, y = np.load(out / "test_input.npy"), np.load(out / "test_output.npy")
    assert x.shape[-1] == 1 and y.shape == x.shape[:3] + (2,) and np.allclose(y.sum(-1), 1, atol=1e-4)
    assert x.max() > 1  # raw grey values: the package's preprocessing normalises them
    cfg = Config.load(run / "config.json")
    doc = (out / "README.md").read_text()  # this model's architecture and threshold, not the shipped one's
    assert f"({cfg.model.depth} levels, {cfg.model.base_filters} base filters" in doc
    assert f"multiples of {cfg.model.size_divisor} " in doc and f"at {cfg.inference.threshold:g} for a mask" in doc

    # bioimageio.core sets KERAS_BACKEND ("torch") on import; the export puts it back, or every
    # process this test worker starts afterwards would run Keras on PyTorch.
    assert os.environ.get("KERAS_BACKEND") == before
    # Nothing already written is replaced without --overwrite.
    assert main(["--format", "bioimageio", "--model", str(run), "--out", str(out), "--no-test"]) == 2
    assert (out / "rdf.yaml").is_file()
    # --overwrite replaces an earlier package only: a folder of anything else, or a file, is never deleted.
    other = tmp_path / "mydata"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("keep")
    note = tmp_path / "note.txt"
    note.write_text("keep")
    for target in (other, note):
        assert main(["--format", "bioimageio", "--model", str(run), "--out", str(target), "--overwrite"]) == 2
    assert (other / "notes.txt").read_text() == "keep" and (other / "sub").is_dir() and note.read_text() == "keep"
    # `--out .` from an empty folder, and a config whose normalisation leaves the defaults out.
    import dataclasses
    import shutil

    partial = tmp_path / "partial_norm"
    shutil.copytree(run, partial)
    dataclasses.replace(cfg, normalization={"method": "percentile"}).save(partial / "config.json")
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["--format", "bioimageio", "--model", str(partial), "--out", ".", "--no-test"]) == 0
    assert (here / "rdf.yaml").is_file()


def test_bioimageio_package_of_a_model_with_an_input_blur_ships_the_saved_model_only(blob_run, tmp_path,
                                                                                     monkeypatch):
    """A model whose graph holds an xmdl_tf layer (InputBlur) cannot be loaded by plain Keras, so
    its package carries only the SavedModel, which bioimageio.core runs and reproduces."""
    pytest.importorskip("bioimageio.core")
    import shutil
    from dataclasses import replace

    import yaml

    from xmdl_tf.config import Config
    from xmdl_tf.export import main
    from xmdl_tf.model import build_model
    from xmdl_tf.predict import load_keras

    _, run = blob_run
    blurred = tmp_path / "blurred"
    shutil.copytree(run, blurred, ignore=shutil.ignore_patterns("checkpoint"))
    cfg = Config.load(run / "config.json")
    m = cfg.model
    net = build_model(m.depth, m.base_filters, m.residual, m.attention, m.n_classes, input_blur=1.5)
    net.set_weights(load_keras(run / "model.keras").get_weights())
    net.save(blurred / "model.keras")
    replace(cfg, model=replace(m, input_blur=1.5)).save(blurred / "config.json")
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    out = tmp_path / "zoo"
    assert main(["--format", "bioimageio", "--model", str(blurred), "--out", str(out)]) == 0  # core's test passes
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    shipped = {k for k, v in rdf["weights"].items() if v}
    assert shipped == {"tensorflow_saved_model_bundle"} and not (out / "weights.keras").exists(), rdf["weights"]


def test_bioimageio_package_of_an_equalised_model_is_refused_in_one_line(blob_run, tmp_path, capsys):
    """bioimage.io preprocessing has no histogram equalisation: such a model gets one clear
    line, and nothing is written."""
    import shutil
    from dataclasses import replace

    from xmdl_tf.config import Config
    from xmdl_tf.export import main

    _, run = blob_run
    eq = tmp_path / "eq"
    shutil.copytree(run, eq, ignore=shutil.ignore_patterns("checkpoint"))
    replace(Config.load(run / "config.json"), normalization={"method": "equalize"}).save(eq / "config.json")
    assert main(["--format", "bioimageio", "--model", str(eq), "--out", str(tmp_path / "zoo")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'equalize' has no bioimage.io equivalent" in err[0]
    assert not (tmp_path / "zoo").exists()


def _doc_commands(text: str) -> list[tuple[int, str]]:
    """(line, command) of every fenced code line (backslash continuations joined) and every
    inline `code` span (it may wrap lines) of a Markdown text."""
    import re

    out, prose, buf, start, fenced = [], [], "", 0, False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            prose.append((i, line))
            continue
        start = start if buf else i
        cmd = f"{buf} {line.strip()}" if buf else line
        if cmd.rstrip().endswith("\\"):
            buf = cmd.rstrip()[:-1]
            continue
        buf = ""
        out.append((start, cmd))
    joined, offsets = "", []
    for i, line in prose:
        offsets.append((len(joined), i))
        joined += line + "\n"
    for m in re.finditer(r"`([^`]+)`", joined):
        if "\n\n" not in m.group(1):
            out.append((max(i for pos, i in offsets if pos <= m.start()), m.group(1).replace("\n", " ")))
    return out


def test_documented_commands_use_only_flags_and_choices_their_parsers_have(monkeypatch):
    """Every `python -m xmdl_tf.X ...` and `xmdl-X ...` quoted in the README, the model card and
    docs/*.md names a command, and each --flag it uses exists in that command's argparse parser
    (exactly: no abbreviations) with a value among the flag's choices where it has them.
    Placeholders (<DIR>, RUN, ...) are not judged; only the parsers are built (main up to
    parse_args), nothing runs."""
    import argparse
    import importlib
    import importlib.util
    import re
    import shlex

    from xmdl_tf.__main__ import COMMANDS

    modules = {module.removesuffix(".launch"): module for _, module, _ in COMMANDS}
    scripts = {name: module for name, module, _ in COMMANDS}

    class Parsed(BaseException):  # not an Exception: cli.guarded must not turn it into an error line
        def __init__(self, parser, known: bool):
            self.parser, self.known = parser, known

    def stopper(name: str):
        original = getattr(argparse.ArgumentParser, name)

        def stop(self, args=None, namespace=None):
            if args:  # a parser the script fills with fixed arguments of its own (e.g. another's defaults)
                return original(self, args, namespace)
            raise Parsed(self, name == "parse_known_args")  # main([]): the command's own parser

        return stop

    parsers: dict[str, tuple[argparse.ArgumentParser, bool]] = {}

    def load(module: str):
        if not module.startswith("benchmarks/"):
            return importlib.import_module(module)
        spec = importlib.util.spec_from_file_location(Path(module).stem, ROOT / module)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def parser_of(module: str) -> tuple[argparse.ArgumentParser, bool]:
        """(the parser, whether it passes unknown flags on: to `xmdl_tf.train`, in the scripts that do)."""
        if module not in parsers:
            with monkeypatch.context() as m:
                m.setattr(argparse.ArgumentParser, "parse_args", stopper("parse_args"))
                m.setattr(argparse.ArgumentParser, "parse_known_args", stopper("parse_known_args"))
                with pytest.raises(Parsed) as got:
                    load(module).main([])
            parsers[module] = got.value.parser, got.value.known
        return parsers[module]

    # The toolkit's commands, and the benchmark scripts every figure in the docs names.
    command = re.compile(r"(?:^|[\s/])python3?\s+-m\s+(xmdl_tf(?:\.[\w.<>]+)?)|(?:^|\s)(xmdl-[a-z]+)(?=\s|$)"
                         r"|(?:^|\s)(?:python3?|\S*/bin/python|KERAS_BACKEND=\w+\s+python3?)\s+(benchmarks/\w+\.py)")
    docs = [ROOT / "README.md", ROOT / "models" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    problems, checked = [], 0
    for doc in docs:
        for line, cmd in _doc_commands(doc.read_text()):
            for seg in re.split(r"&&|;", re.sub(r"\s#\s.*$", "", cmd)):
                m = command.search(seg)
                if not m:
                    continue
                where = f"{doc.relative_to(ROOT)}:{line}: {seg.strip()[:120]}"
                name = m.group(1) or m.group(2) or m.group(3)
                if name == "xmdl_tf" or "<" in name:  # the command list; python -m xmdl_tf.<name>
                    continue
                if m.group(2) and name not in scripts:  # xmdl-tf, the plugin's name
                    continue
                module = scripts.get(name) or modules.get(name) or (name if (ROOT / name).is_file() else None)
                if module is None:
                    problems.append(f"{where}: {name} is not a command")
                    continue
                rest = seg[m.end():].replace("[", " ").replace("]", " ")
                try:
                    tokens = shlex.split(rest)
                except ValueError:
                    tokens = rest.split()
                parser, passes_on = parser_of(module)
                checked += 1
                for k, tok in enumerate(tokens):
                    if not tok.startswith("--") or "<" in tok or " " in tok:  # (a quoted value: '--epochs 50')
                        continue
                    flag, _, value = tok.partition("=")
                    action = parser._option_string_actions.get(flag)
                    if action is None and passes_on:
                        action = parser_of("xmdl_tf.train")[0]._option_string_actions.get(flag)
                    if action is None:
                        problems.append(f"{where}: {name} has no {flag}")
                        continue
                    value = value or (tokens[k + 1] if k + 1 < len(tokens) else "")
                    if action.choices is None or not value or value.startswith("-"):
                        continue
                    for alt in value.split("|"):  # `--meshes ply|obj` in prose
                        if alt.isidentifier() and alt.upper() != alt and alt not in action.choices:
                            problems.append(f"{where}: {flag} {alt!r} is not one of {sorted(action.choices)}")
    assert checked > 20, checked  # the extraction still finds the documented commands
    assert not problems, "\n".join(problems)
