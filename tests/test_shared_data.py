"""End to end on the real EM sets in ../shared/data (skipped when absent)."""
import json

import pandas as pd
import pytest

from xmdl_tf.evaluate import main as eval_main
from xmdl_tf.io import find_pairs, read_pair
from xmdl_tf.train import main as train_main


def test_real_layouts_read(shared_data):
    from xmdl_tf.evaluate import held_out_split

    for name, n_train, shape, split in (("cdeep3m_sbem_mouse", 16, (1024, 1024), "test"),
                                        ("drosophila_vnc_sstem", 12, (1024, 1024), "test"),
                                        ("lucchipp_fibsem_mouse", 140, (768, 1024), "val")):
        pairs = find_pairs(shared_data / name, "train")
        assert len(pairs) == n_train
        img, lbl = read_pair(pairs[0])
        assert img.shape == lbl.shape == shape and img.dtype.name == "uint8"
        assert 0.01 < (lbl > 0).mean() < 0.3
        assert held_out_split(shared_data / name) == split  # Lucchi++ has train and val only


def test_train_and_evaluate_tiny_model_on_real_data(shared_data, tmp_path):
    sets = [str(shared_data / "cdeep3m_sbem_mouse"), str(shared_data / "drosophila_vnc_sstem")]
    run = tmp_path / "run"
    assert train_main(["--data", *sets, "--out", str(run), "--depth", "3", "--base-filters", "4", "--tile-size", "64",
                       "--batch-size", "4", "--epochs", "1", "--steps-per-epoch", "3", "--no-jit"]) == 0
    h = pd.read_csv(run / "history.csv")
    assert len(h) == 1 and 0 <= h["val_f1"][0] <= 1
    info = json.loads((run / "config.json").read_text())["info"]
    assert [d["pixel_size_nm"] for d in info["data"]] == [None, None]  # not in the PNG files; unknown is recorded
    out = tmp_path / "eval"
    assert eval_main(["--model", str(run), "--data", sets[1], "--split", "test", "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["n_images"] == 5 and m["n_pixels"] == 5 * 1024 * 1024
    assert m["tp"] + m["fp"] + m["fn"] + m["tn"] == m["n_pixels"]
    assert len(pd.read_csv(out / "per_image.csv")) == 5


@pytest.mark.parametrize("name, base_filters", [(None, 16), ("xmdl_ref_f8", 8)])
def test_shipped_models_load_by_name_and_segment_the_sample(name, base_filters):
    """The built-in models (xmdl_tf/models/): the default `xmdl_ref` (16 base filters) and the
    fast `xmdl_ref_f8` load and segment the shipped sample slice."""
    from pathlib import Path

    from xmdl_tf.io import read_pair, split_pairs
    from xmdl_tf.metrics import confusion, scores
    from xmdl_tf.predict import load_model
    from xmdl_tf.pretrained import builtin_model, default_model_path

    path = default_model_path() if name is None else builtin_model(name)
    if path is None:
        pytest.skip(f"built-in model {name or 'xmdl_ref'} not installed")
    pred = load_model(path)
    assert pred.config.model.depth == 6 and pred.config.model.base_filters == base_filters
    sample = Path(__file__).resolve().parents[1] / "xmdl_tf" / "sample"
    image, label = read_pair(split_pairs(sample.parent, "sample")[0])
    f1 = scores(confusion(pred.predict_slice(image) >= 0.5, label > 0))["f1"]
    assert f1 > 0.75  # measured 0.8+ on this held-out test section (models/README.md)
