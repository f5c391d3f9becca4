"""The Python examples of the README and docs/*.md: every block compiles and imports only names
xmdl_tf has, and the README's analyze/evaluate example runs as written, with the suite's tiny
trained model (`blob_run`) in place of the built-in one and its data in place of the real set."""
from __future__ import annotations

import importlib
import re
import shutil
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


def test_documented_python_blocks_compile_and_import_existing_names():
    checked = 0
    for doc in DOCS:
        for block in python_blocks(doc):
            compile(block, str(doc), "exec")
            for module, names in re.findall(r"^from ((?:xmdl_tf|data_prep)[\w.]*) import ([\w, ]+)$", block, re.M):
                mod = importlib.import_module(module)
                for name in (n.strip() for n in names.split(",")):
                    assert hasattr(mod, name), f"{doc.name}: {module} has no {name}"
                checked += 1
            for name in re.findall(r"\bxmdl_tf\.(\w+)\(", block):
                import xmdl_tf

                assert hasattr(xmdl_tf, name), f"{doc.name}: xmdl_tf has no {name}"
    assert checked >= 3


def test_readme_analyze_and_evaluate_example_runs(blob_run, tmp_path, monkeypatch):
    data, run = blob_run
    block = next(b for b in python_blocks(ROOT / "README.md") if "analyze_image" in b)
    assert '"xmdl_ref"' in block and '"../shared/data/drosophila_vnc_sstem"' in block
    code = block.replace('"xmdl_ref"', repr(str(run))).replace('"../shared/data/drosophila_vnc_sstem"', repr(str(data)))
    shutil.copy(sorted((data / "test" / "x").glob("*.png"))[0], tmp_path / "slice.png")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)
    result, scores = ns["result"], ns["scores"]
    shape = (128, 128)
    assert result.instances.shape == shape and result.instances.dtype == np.uint16
    for name in ("probability", "heatmap", "uncertainty"):
        arr = getattr(result, name)
        assert arr.shape == shape and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1, name
    assert result.mask.dtype == bool and result.mask.shape == shape
    assert len(result.table) == result.summary["count"] == int(result.instances.max())
    assert result.summary["count"] > 0  # the tiny model finds the blobs
    assert 0.5 < scores["f1"] <= 1 and 0 < scores["iou"] <= scores["f1"] and scores["split"] == "test"

    # The prose under the block: Settings overrides, and load_model(...).predict_slice.
    import xmdl_tf

    settings = xmdl_tf.analyze.Settings(inference={"tta": False, "threshold": 0.5})
    again = ns["analyze_image"](ns["pred"], xmdl_tf.read_image("slice.png"), "slice", settings=settings)
    assert again.instances.shape == shape
    prob = ns["pred"].predict_slice(xmdl_tf.read_image("slice.png"))
    assert prob.shape == shape and prob.dtype == np.float32

