"""`import xmdl_tf`: the lazily imported public API."""
import importlib
import subprocess
import sys

import xmdl_tf


def test_api_names_are_stable_and_commands_are_their_modules():
    # Each name resolves to the same object every time, also after its submodule is imported
    # (a function named like its submodule used to turn into the module on the second look-up).
    first = xmdl_tf.load_model
    importlib.import_module("xmdl_tf.predict")
    assert xmdl_tf.load_model is first and callable(first)
    for name in ("train", "evaluate"):
        module = getattr(xmdl_tf, name)
        assert getattr(xmdl_tf, name) is module and callable(getattr(module, name)) and callable(module.main)
    assert {"load_model", "read_image", "train", "evaluate", "analyze"} <= set(dir(xmdl_tf))
    assert set(xmdl_tf.__all__) <= set(dir(xmdl_tf))


def test_import_is_light():
    """`import xmdl_tf` (and --help of the commands) must not pay for TensorFlow."""
    code = "import sys, xmdl_tf; xmdl_tf.__all__; print('tensorflow' in sys.modules, 'keras' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
