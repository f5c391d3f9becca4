"""The same model code on other Keras backends: JAX trains through the PyDataset input path
(no TensorFlow imported), and its weights load into the TensorFlow stack with the same predictions."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

JAX_SCRIPT = r"""
import importlib.abc, json, sys
class Guard(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ImportError(f"the JAX training path imported {name}")
sys.meta_path.insert(0, Guard())
import keras, numpy as np
from xmdl_tf.train import main
data, out, probe = sys.argv[1], sys.argv[2], sys.argv[3]
main(["--data", data, "--out", out, "--tile-size", "32", "--depth", "3", "--base-filters", "4", "--batch-size", "4",
      "--epochs", "2", "--steps-per-epoch", "3", "--lr", "3e-3"])
model = keras.models.load_model(out + "/model.keras", compile=False)
x = np.load(probe)
np.save(out + "/jax_pred.npy", np.asarray(model.predict_on_batch(x)))
print(json.dumps({"backend": keras.backend.backend()}))
"""


def test_jax_trained_weights_load_into_tensorflow_with_the_same_predictions(blob_dataset, tmp_path):
    pytest.importorskip("jax")
    import keras

    out = tmp_path / "jaxrun"
    probe = np.random.default_rng(0).random((2, 64, 64, 1)).astype(np.float32)
    np.save(tmp_path / "probe.npy", probe)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", JAX_SCRIPT, str(blob_dataset), str(out), str(tmp_path / "probe.npy")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["backend"] == "jax"
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["info"]["versions"]["backend"] == "jax" and "tensorflow" not in cfg["info"]["versions"]
    hist = (out / "history.csv").read_text()
    assert "val_loss" in hist and "tiles_seen" in hist

    # This process runs TensorFlow: the JAX-trained file loads and predicts the same.
    assert keras.backend.backend() == "tensorflow"
    from xmdl_tf.predict import load_model

    pred = load_model(out, jit_compile=False)
    np.testing.assert_allclose(pred.predict_batch(probe), np.load(out / "jax_pred.npy"), atol=1e-4)
