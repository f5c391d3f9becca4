"""The benchmark scripts' own logic (no training): tables built from their result files."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loso_table_marks_zero_shot_on_the_diagonal_and_averages_it():
    loso = _load("loso")
    names = ["a", "b", "c"]
    cells = {l: {s: {"val": {"f1": 0.9 if l != s else 0.5 + 0.1 * i}} for s in names} for i, l in enumerate(names)}
    del cells["c"]["a"]["val"]  # a missing score is shown as '-'
    md = loso.table_md(cells, names, "val")
    lines = md.splitlines()
    assert lines[2] == "| a | **0.500** | 0.900 | 0.900 |"
    assert lines[4] == "| c | - | 0.900 | **0.700** |"
    assert "mean zero-shot f1 (val): 0.600 over 3 sets" in md
    assert "over 0 sets" not in loso.table_md({}, names, "test") and "mean" not in loso.table_md({}, names, "test")
