"""SavedModel export for TF Serving: signatures, a stand-in server process, the REST client, consumers.

One tiny model (depth 3, 4 filters, untrained; its logits bias is nudged so
the predicted mask covers part of the image and Grad-CAM has a target) is
exported once per module.
"""
import hashlib
import importlib.util
import json
import os
import shutil
import re
import shlex
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile

from xmdl_tf.config import Config, ModelConfig
from xmdl_tf.export import META_FILE, SavedModelPredictor, export_model, main as export_main, versions
from xmdl_tf.gradcam import GradCamError
from xmdl_tf.predict import DEFAULT_OVERLAP, DEFAULT_TILE, ModelError, load_model

from conftest import ROOT, blob_image, write_split

# The documented signatures (docs/serving.md): name -> inputs and outputs as (dtype, shape).
SIGNATURES = {
    "serving_default": ({"images": ("DT_UINT8", "(-1, -1, -1, 1)")},
                        {"probabilities": ("DT_FLOAT", "(-1, -1, -1)"), "mask": ("DT_UINT8", "(-1, -1, -1)")}),
    "serving_float": ({"images": ("DT_FLOAT", "(-1, -1, -1, 1)")},
                      {"probabilities": ("DT_FLOAT", "(-1, -1, -1)"), "mask": ("DT_UINT8", "(-1, -1, -1)")}),
    "explain": ({"images": ("DT_UINT8", "(-1, -1, -1, 1)")},
                {"probabilities": ("DT_FLOAT", "(-1, -1, -1)"), "mask": ("DT_UINT8", "(-1, -1, -1)"),
                 "gradcam": ("DT_FLOAT", "(-1, -1, -1)"), "uncertainty": ("DT_FLOAT", "(-1, -1, -1)")}),
    "explain_float": ({"images": ("DT_FLOAT", "(-1, -1, -1, 1)")},
                      {"probabilities": ("DT_FLOAT", "(-1, -1, -1)"), "mask": ("DT_UINT8", "(-1, -1, -1)"),
                       "gradcam": ("DT_FLOAT", "(-1, -1, -1)"), "uncertainty": ("DT_FLOAT", "(-1, -1, -1)")}),
    "predict_normalized": ({"images": ("DT_FLOAT", "(-1, -1, -1, 1)")},
                           {"probabilities": ("DT_FLOAT", "(-1, -1, -1, 2)")}),
    "explain_normalized": ({"images": ("DT_FLOAT", "(-1, -1, -1, 2)")},
                           {"probabilities": ("DT_FLOAT", "(-1, -1, -1, 2)"), "cam": ("DT_FLOAT", "(-1, -1, -1)")}),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run folder (model.keras, config.json, metrics.json) whose mask covers part of a blob image."""
    import keras

    from xmdl_tf.data import normalize_np
    from xmdl_tf.model import build_model

    keras.utils.set_random_seed(0)
    model = build_model(depth=3, base_filters=4)
    img, _ = blob_image(64, seed=3)
    logits = keras.Model(model.input, model.get_layer("logits").output)(normalize_np(img)[None, ..., None])
    margin = np.asarray(logits[..., 1] - logits[..., 0])
    # Shift the mitochondria logit so that about 40% of pixels are predicted mitochondria.
    bias = model.get_layer("logits").bias
    bias.assign(bias.numpy() + np.array([0.0, -np.percentile(margin, 60)], np.float32))
    folder = tmp_path_factory.mktemp("run")
    model.save(folder / "model.keras")
    Config(model=ModelConfig(depth=3, base_filters=4), calibration={"temperature": 2.0}).save(folder / "config.json")
    (folder / "metrics.json").write_text(json.dumps({"f1": 0.5, "iou": 0.33}))
    return folder


@pytest.fixture(scope="module")
def export_dir(run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export") / "xmdl"
    assert export_main(["--model", str(run), "--out", str(out)]) == 0
    return out


def raw_images() -> np.ndarray:
    """Two uint8 slices of an odd size (37 x 53) as a batch [2, 37, 53, 1]."""
    return np.stack([blob_image(64, seed=s)[0][:37, :53] for s in (3, 4)])[..., None]


# A TF Serving stand-in: TensorFlow only, no xmdl_tf and no new Keras import (the
# import guard goes in after `import tensorflow`, which itself imports a Keras shim).
SERVER_SCRIPT = textwrap.dedent("""
    import importlib.abc, json, sys
    import numpy as np
    import tensorflow as tf

    class Guard(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in ("xmdl_tf", "keras", "tf_keras"):
                raise ImportError(f"the serving stand-in imported {name}")

    sys.meta_path.insert(0, Guard())
    folder = sys.argv[1]
    sig = tf.saved_model.load(sys.argv[2]).signatures
    images = np.load(f"{folder}/images.npy")
    out = {}
    for name in ("serving_default", "explain"):
        out.update({f"{name}.{k}": v.numpy() for k, v in sig[name](images=tf.constant(images)).items()})
    wide = (images.astype(np.float32) * 257.0)  # the same slices as 16-bit grey values
    out.update({f"explain_float.{k}": v.numpy() for k, v in sig["explain_float"](images=tf.constant(wide)).items()})
    np.savez(f"{folder}/served.npz", **out)
    bad = {
        "dtype": lambda: sig["serving_default"](images=tf.constant(wide)),
        "rank": lambda: sig["serving_default"](images=tf.constant(images[..., 0])),
        "5-D": lambda: sig["serving_default"](images=tf.constant(images[None])),
        "unbatched": lambda: sig["serving_default"](images=tf.constant(images[0])),
        "channels": lambda: sig["explain"](images=tf.constant(np.repeat(images, 3, axis=-1))),
        "empty": lambda: sig["serving_default"](images=tf.constant(images[:, :0])),
        "normalised floats": lambda: sig["serving_float"](images=tf.constant(wide / 65535.0 - 0.5)),
        "unit floats": lambda: sig["serving_float"](images=tf.constant(wide / 65535.0)),
        "tile size": lambda: sig["predict_normalized"](images=tf.constant(np.zeros((1, 30, 32, 1), np.float32))),
        "empty batch": lambda: sig["serving_default"](images=tf.constant(images[:0])),
        "constant": lambda: sig["serving_default"](images=tf.constant(np.full((1, 32, 32, 1), 7, np.uint8))),
        "too large": lambda: sig["serving_default"](images=tf.zeros((1, 4100, 4100, 1), tf.uint8)),
        "nan tile": lambda: sig["predict_normalized"](images=tf.constant(np.full((1, 32, 32, 1), np.nan, np.float32))),
    }
    errors = {}
    for case, call in bad.items():
        try:
            call()
            errors[case] = None
        except Exception as err:
            errors[case] = str(err)
    json.dump(errors, open(f"{folder}/errors.json", "w"))
""")


def test_served_signatures_match_keras_in_a_separate_process(run, export_dir, tmp_path):
    images = raw_images()
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run([sys.executable, "-c", SERVER_SCRIPT, str(tmp_path), str(export_dir / "1")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    served = np.load(tmp_path / "served.npz")

    keras_pred = load_model(run, jit_compile=False)
    for i, img in enumerate(images[..., 0]):
        prob = keras_pred.predict_slice(img)
        prob_e, cam = keras_pred.explain_slice(img)
        assert 0.05 < (prob >= 0.5).mean() < 0.95  # Grad-CAM has a target and a background
        sure = np.abs(prob - 0.5) > 1e-4
        for sig in ("serving_default", "explain", "explain_float"):
            assert served[f"{sig}.probabilities"].shape == (2, 37, 53)
            assert served[f"{sig}.mask"].dtype == np.uint8
            np.testing.assert_allclose(served[f"{sig}.probabilities"][i], prob, atol=1e-5)
            np.testing.assert_array_equal(served[f"{sig}.mask"][i][sure], (prob >= 0.5)[sure])
        for sig in ("explain", "explain_float"):
            assert served[f"{sig}.gradcam"].dtype == np.float32
            assert served[f"{sig}.gradcam"][i].min() >= 0 and served[f"{sig}.gradcam"][i].max() == pytest.approx(1)
            np.testing.assert_allclose(served[f"{sig}.gradcam"][i], cam, atol=1e-4)
        np.testing.assert_allclose(prob_e, prob, atol=1e-6)

    errors = json.loads((tmp_path / "errors.json").read_text())
    assert "expected to be a uint8 tensor but is a float tensor" in errors["dtype"]
    assert "images must have shape [batch, height, width, 1]; got shape] [2 37 53]" in errors["rank"]
    assert "images must have shape [batch, height, width, 1]; got shape] [2 37 53 3]" in errors["channels"]
    assert "images must have shape [batch, height, width, 1]; got shape] [1 2 37 53 1]" in errors["5-D"]
    assert "images must have shape [batch, height, width, 1]; got shape] [37 53 1]" in errors["unbatched"]
    assert "height and width must be at least 1 pixel" in errors["empty"]
    assert "raw grey values must be in [0, 65535]" in errors["normalised floats"]
    assert "which looks normalised" in errors["unit floats"]
    assert "multiples of the size divisor 4" in errors["tile size"]
    assert "empty batch" in errors["empty batch"]
    assert "constant image" in errors["constant"]
    assert "request too large" in errors["too large"]
    assert "NaN or infinite" in errors["nan tile"]


def test_a_padded_image_is_served_as_analyze_predicts_it(run, export_dir):
    """A section set into a canvas of its lowest grey value (registration): the served graph leaves
    the padding out of the normalisation and answers 0 there, as the local path does; so do the
    `xmdl-volume` thumbnails and the graph's on an image above 256 px (every 2nd pixel)."""
    import tensorflow as tf

    from xmdl_tf.distributed import chunk_padding, slice_padding
    from xmdl_tf.export import unpadded
    from xmdl_tf.predict import without_padding
    from xmdl_tf.sampling import block_extremes, grey_counts

    img = np.maximum(blob_image(64, seed=3)[0], 30)  # tissue never reaches the canvas's 0
    canvas = np.zeros((96, 120), np.uint8)
    canvas[20:84, 40:104] = img
    canvas[:, :3] = 255  # and a saturated margin at the left edge: padding of the highest value too
    served = tf.saved_model.load(str(export_dir / "1")).signatures
    keras_pred = load_model(run, jit_compile=False)
    prob = keras_pred.predict_slice(canvas)
    _, _, pad = without_padding(canvas)
    assert pad.sum() == 96 * 120 - 64 * 64 and (prob[pad] == 0).all()
    for sig in ("serving_default", "explain"):
        out = served[sig](images=tf.constant(canvas[None, ..., None]))
        np.testing.assert_allclose(out["probabilities"].numpy()[0], prob, atol=1e-5)
    assert (out["gradcam"].numpy()[0][pad] == 0).all()
    # Float grey values that are not integers are read as a float file is (mapped onto 0..65535), by the
    # served graph as by the local path.
    floats = canvas.astype(np.float32) * 0.731 + 0.25
    np.testing.assert_allclose(served["serving_float"](images=tf.constant(floats[None, ..., None]))["probabilities"]
                               .numpy()[0], keras_pred.predict_slice(floats), atol=1e-5)
    # Above 256 px the graph, as xmdl-volume and the whole-slice path, searches a grid of 2 x 2 blocks.
    big = np.zeros((300, 281), np.uint16)
    big[60:252, 50:242] = np.kron(canvas[20:84, 40:104], np.ones((3, 3), np.uint8)).astype(np.uint16) * 100
    big[:, 270:] = 65535
    big[100, 100:140] = 0  # tissue of the canvas's grey that does not touch it,
    big[59, 50] = big[60, 49] = 3000  # and a tissue pixel of that grey touching it only diagonally
    big[60, 50] = 0
    clipped = np.where(np.random.default_rng(1).random(big.shape) < 0.6, 0, 40000).astype(np.uint16)
    clipped[0, 0] = 65535  # clipped noise at both ends and a third value: no padding anywhere
    for image in (big, clipped):
        xi, counts, graph_pad = (t.numpy() for t in unpadded(tf.constant(image.astype(np.int32))))
        filled, local_counts, local_pad = without_padding(image)
        np.testing.assert_array_equal(graph_pad, False if local_pad is None else local_pad)
        np.testing.assert_array_equal(counts, np.pad(local_counts, (0, 65536 - len(local_counts))))
        np.testing.assert_array_equal(xi, filled)
        bmin, bmax = block_extremes(image, 2)
        codes = slice_padding(grey_counts(image)[None], bmin[None], bmax[None])
        rows, cols = np.minimum(np.arange(300) // 2, 149), np.minimum(np.arange(281) // 2, 140)
        chunked = chunk_padding(image, codes[0], grey_counts(image), rows, cols)[0]
        assert np.array_equal(False if chunked is None else chunked, False if local_pad is None else local_pad)
        if image is big:
            assert not local_pad[100, 100:140].any() and not local_pad[60, 50] and local_pad[59, 49]
    assert local_pad is None and not graph_pad.any()  # the clipped noise


def test_equalized_model_exports_its_normalisation_into_the_graph(run, tmp_path):
    """A model trained on histogram-equalised slices is served with the same equalisation,
    computed inside the SavedModel from each raw image."""
    import shutil

    import tensorflow as tf

    model = tmp_path / "eq"
    shutil.copytree(run, model)
    cfg = Config.load(model / "config.json")
    Config(**{**cfg.__dict__, "normalization": {"method": "equalize"}}).save(model / "config.json")
    assert export_main(["--model", str(model), "--out", str(tmp_path / "x")]) == 0
    sig = tf.saved_model.load(str(tmp_path / "x" / "1")).signatures["serving_default"]
    images = raw_images()
    served = sig(images=tf.constant(images))["probabilities"].numpy()
    eq, plain = load_model(model, jit_compile=False), load_model(run, jit_compile=False)
    for i, img in enumerate(images[..., 0]):
        np.testing.assert_allclose(served[i], eq.predict_slice(img), atol=1e-5)
        assert np.abs(served[i] - plain.predict_slice(img)).max() > 1e-3
    meta = json.loads((tmp_path / "x" / "1" / "assets" / META_FILE).read_text())
    assert meta["normalization"]["method"] == "equalize"


def test_saved_model_cli_lists_the_documented_signatures(export_dir):
    cli = Path(sys.executable).parent / "saved_model_cli"
    proc = subprocess.run([str(cli), "show", "--dir", str(export_dir / "1"), "--all"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.split("Concrete Functions")[0]
    found = {}
    for block in re.split(r"\nsignature_def\['", text)[1:]:
        name = block.split("'")[0]
        ins, outs = block.split("output(s):")
        parse = lambda part: {k: (d, s) for k, d, s in re.findall(
            r"\w+\['(\w+)'\] tensor_info:\s+dtype: (\w+)\s+shape: (\([-\d, ]*\))", part)}
        found[name] = (parse(ins), parse(outs))
    found.pop("__saved_model_init_op", None)
    assert found == SIGNATURES


def test_metadata_asset(run, export_dir):
    meta = json.loads((export_dir / "1" / "assets" / META_FILE).read_text())
    assert meta["size_divisor"] == 4 and meta["n_classes"] == 2 and (meta["tile_size"], meta["overlap"]) == (DEFAULT_TILE, DEFAULT_OVERLAP)
    assert meta["gradcam_layer"] == "dec1_conv2" and meta["normalization"]["high"] == 99.8
    assert meta["config"] == json.loads((run / "config.json").read_text())
    assert meta["model_card"] == {"metrics.json": {"f1": 0.5, "iou": 0.33}}
    assert {k: set(v["outputs"]) for k, v in meta["signatures"].items()} == {
        k: set(outputs) for k, (_, outputs) in SIGNATURES.items()}


def load_client():
    spec = importlib.util.spec_from_file_location("serving_client", ROOT / "examples" / "serving_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rest_client_round_trip(export_dir, tmp_path):
    """The client's JSON body goes through a stand-in for TF Serving's REST API and back into TIFFs."""
    import tensorflow as tf

    client = load_client()
    signatures = tf.saved_model.load(str(export_dir / "1")).signatures

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # what TF Serving does with a row-format request
            assert self.path == "/v1/models/xmdl:predict"
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            sig = signatures[body["signature_name"]]
            spec = sig.structured_input_signature[1]["images"]
            x = tf.constant([row["images"] for row in body["instances"]], spec.dtype)
            out = {k: v.numpy() for k, v in sig(images=x).items()}
            rows = [{k: v[i].tolist() for k, v in out.items()} for i in range(len(x))]
            data = json.dumps({"predictions": rows}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    img = blob_image(64, seed=5)[0][:45, :50]
    cv2.imwrite(str(tmp_path / "slice.png"), img)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/models/xmdl:predict"
        assert client.main([str(tmp_path / "slice.png"), "--url", url, "--out", str(tmp_path / "out")]) == 0
    finally:
        server.shutdown()
    direct = {k: v.numpy()[0] for k, v in signatures["explain"](images=tf.constant(img[None, ..., None])).items()}
    mask = tifffile.imread(tmp_path / "out" / "slice_mask.tif")
    heat = tifffile.imread(tmp_path / "out" / "slice_gradcam.tif")
    assert mask.shape == heat.shape == (45, 50) and mask.dtype == np.uint8 and heat.dtype == np.float32
    np.testing.assert_array_equal(mask, direct["mask"])
    np.testing.assert_allclose(heat, direct["gradcam"], atol=1e-6)

    # --dry-run writes the body; a 16-bit TIFF goes to explain_float; columnar responses parse too.
    tifffile.imwrite(tmp_path / "wide.tif", img.astype(np.uint16) * 257)
    assert client.main([str(tmp_path / "wide.tif"), "--dry-run", "--out", str(tmp_path / "dry")]) == 0
    body = json.loads((tmp_path / "dry" / "wide_request.json").read_text())
    assert body["signature_name"] == "explain_float" and np.shape(body["instances"][0]["images"]) == (45, 50, 1)
    parsed = client.parse_response({"outputs": {k: v[None].tolist() for k, v in direct.items()}})
    assert parsed["mask"].shape == parsed["gradcam"].shape == (1, 45, 50) and parsed["mask"].dtype == np.uint8
    with pytest.raises(RuntimeError, match="TF Serving: bad input"):
        client.parse_response({"error": "bad input"})


def test_grpc_without_serving_api_is_explained(tmp_path):
    if importlib.util.find_spec("tensorflow_serving") is not None:
        pytest.skip("tensorflow-serving-api is installed")
    client = load_client()
    with pytest.raises(SystemExit, match="pip install tensorflow-serving-api"):
        client.grpc_predict(np.zeros((8, 8), np.uint8))


def test_versions_are_never_overwritten(run, export_dir, capsys):
    before = hashlib.sha256((export_dir / "1" / "saved_model.pb").read_bytes()).hexdigest()
    # Staging folders: one left by an export killed a day ago (removed), one of an export that may
    # still be running (kept).
    stale, recent = export_dir / ".tmp-2-killed", export_dir / ".tmp-7-running"
    for p in (stale, recent):
        (p / "variables").mkdir(parents=True)
    os.utime(stale, (time.time() - 86400,) * 2)
    assert export_main(["--model", str(run), "--out", str(export_dir)]) == 0
    assert versions(export_dir) == [1, 2]
    assert not stale.exists() and recent.is_dir()
    shutil.rmtree(recent)
    assert export_main(["--model", str(run), "--out", str(export_dir), "--version", "1"]) == 2
    assert "version 1 already exists" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="never overwritten"):
        export_model(run, export_dir, version=2)
    assert export_main(["--model", str(run), "--out", str(export_dir), "--gradcam-layer", "nope"]) == 2
    assert "'nope' not in the model" in capsys.readouterr().err
    assert hashlib.sha256((export_dir / "1" / "saved_model.pb").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in export_dir.iterdir()) == ["1", "2"]  # no half-written leftovers
    # A version folder others can read (a TF Serving process of another user), not mkdtemp's 0o700.
    mask = os.umask(0)
    os.umask(mask)
    assert (export_dir / "2").stat().st_mode & 0o777 == 0o777 & ~mask


def test_exporting_an_export_is_refused_in_one_line_as_python_m(export_dir, tmp_path):
    """`python -m xmdl_tf.export` runs export.py as __main__ too; the refusal must still fire."""
    proc = subprocess.run([sys.executable, "-m", "xmdl_tf.export", "--model", str(export_dir / "1"),
                           "--out", str(tmp_path / "again")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2, proc.stderr
    assert "already a SavedModel" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "again").exists()


def test_explain_serves_the_uncertainty_of_the_calibrated_probability(run, export_dir):
    import tensorflow as tf

    from xmdl_tf.calibration import apply_temperature
    from xmdl_tf.confidence import entropy

    sig = tf.saved_model.load(str(export_dir / "1")).signatures["explain"]
    out = {k: v.numpy() for k, v in sig(images=tf.constant(raw_images())).items()}
    t = Config.load(run / "config.json").calibration["temperature"]
    assert t == 2.0
    np.testing.assert_allclose(out["uncertainty"], entropy(apply_temperature(out["probabilities"], t)), atol=1e-4)
    assert out["uncertainty"].shape == out["probabilities"].shape


def test_load_model_on_export_dir_matches_keras(run, export_dir):
    keras_pred = load_model(run)
    served = load_model(export_dir)  # the highest version
    assert isinstance(served, SavedModelPredictor) and served.path.parent == export_dir
    assert load_model(export_dir / "1").path == export_dir / "1"
    assert served.size_divisor == 4 and served.gradcam_layer == "dec1_conv2" and not served.tta
    assert served.config == keras_pred.config
    img = blob_image(130, seed=9, n=10)[0][:100]
    kw = dict(tile=64, overlap=16, batch_size=3)
    prob = served.predict_slice(img, **kw)
    np.testing.assert_allclose(prob, keras_pred.predict_slice(img, **kw), atol=1e-4)
    prob_e, cam = served.explain_slice(img, **kw)
    ref_prob, ref_cam = keras_pred.explain_slice(img, **kw)
    assert cam.shape == (100, 130) and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(prob_e, ref_prob, atol=1e-4)
    np.testing.assert_allclose(cam, ref_cam, atol=1e-4)
    with pytest.raises(GradCamError, match="re-export with --gradcam-layer bottleneck_conv2"):
        served.explain_slice(img, layer="bottleneck_conv2", **kw)
    with pytest.raises(ValueError, match="size divisor 4"):
        served.predict_batch(np.zeros((1, 30, 32, 1), np.float32))
    with pytest.raises(ValueError, match=r"shape \(n, h, w, 1\)"):
        served.predict_batch(np.zeros((30, 32), np.float32))


def test_evaluate_accepts_export_dir(run, export_dir, tmp_path):
    from xmdl_tf.evaluate import evaluate

    write_split(tmp_path / "data", "test", 2, size=96, seed=30)
    served = evaluate(export_dir, str(tmp_path / "data"), "test", tile=64, overlap=16)
    local = evaluate(run, str(tmp_path / "data"), "test", tile=64, overlap=16)
    assert Path(served["model"]).parent == export_dir and served["n_pixels"] == 2 * 96 * 96
    for key in ("f1", "iou"):
        assert served[key] == pytest.approx(local[key], abs=1e-3)


def test_keras_file_with_lambda_layer_is_refused(tmp_path):
    import keras

    inputs = keras.Input((None, None, 1))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="softmax")(x)).save(tmp_path / "lambda.keras")
    with pytest.raises(ModelError, match="refused to load.*arbitrary Python code.*Lambda"):
        load_model(tmp_path / "lambda.keras")
    assert export_main(["--model", str(tmp_path / "lambda.keras"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_a_calibrated_models_export_warns_and_thresholds_as_the_keras_model(run, tmp_path, capsys):
    """ood.npz travels in the export (served through `ood_features`), so analyze with the export
    gives the same OOD score; the served mask uses the model's own threshold."""
    import shutil

    import tensorflow as tf

    from xmdl_tf.ood import OOD_FILE, FeatureDistribution, available_layers, image_features, model_distribution

    model = tmp_path / "calibrated"
    shutil.copytree(run, model)
    import dataclasses

    cfg = Config.load(model / "config.json")
    dataclasses.replace(cfg, inference=dataclasses.replace(cfg.inference, threshold=0.6)).save(model / "config.json")
    keras_pred = load_model(model, jit_compile=False)
    layers = available_layers(keras_pred.model)
    feats = np.concatenate([image_features(keras_pred, blob_image(96, seed=s)[0], tile=32, layers=layers,
                                           stats="mean_std") for s in range(4)])
    FeatureDistribution.fit(feats, k=4, tile=32, layers=layers, stats="mean_std").calibrate([1.0, 2.0]).save(
        model / OOD_FILE)
    assert export_main(["--model", str(model), "--out", str(model)]) == 2  # into its own folder: refused
    assert "the model's own folder" in capsys.readouterr().err and versions(model) == []
    out = tmp_path / "export"
    assert export_main(["--model", str(model), "--out", str(out)]) == 0
    assert (out / "1" / "assets" / OOD_FILE).is_file()
    served = load_model(out)
    keras_pred = load_model(model, jit_compile=False)
    d_served, d_keras = model_distribution(served), model_distribution(keras_pred)
    assert d_served is not None and d_served.threshold == d_keras.threshold
    image = blob_image(96, seed=7)[0]
    assert d_served.image_score(served, image) == pytest.approx(d_keras.image_score(keras_pred, image), rel=1e-4)
    inverted = 255 - image  # unlike the training images: scored the same way by both
    assert d_served.image_score(served, inverted) == pytest.approx(d_keras.image_score(keras_pred, inverted), rel=1e-4)
    sig = tf.saved_model.load(str(out / "1")).signatures["serving_default"]
    res = sig(images=tf.constant(raw_images()))
    p = res["probabilities"].numpy()
    sure = np.abs(p - 0.6) > 1e-4
    np.testing.assert_array_equal(res["mask"].numpy()[sure], (p >= 0.6)[sure])
    assert json.loads((out / "1" / "assets" / META_FILE).read_text())["mask_threshold"] == 0.6



# ----------------------------------------------------------------------------
# Odd inputs: one clear line naming the file, nothing created or deleted


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], err
    return err[0]


def test_a_scalar_request_is_refused_with_the_shape_message(export_dir):
    """A rank-0 tensor (`{"inputs": 7}` over REST) gets the shape message, not a slice-index error."""
    import tensorflow as tf

    sig = tf.saved_model.load(str(export_dir / "1")).signatures
    for name, value in (("serving_default", np.uint8(7)), ("serving_float", np.float32(7)),
                        ("predict_normalized", np.float32(0.5))):
        with pytest.raises(tf.errors.InvalidArgumentError, match=r"images must have shape \[batch, height, width, 1\]"):
            sig[name](images=tf.constant(value))


def test_unreadable_files_of_a_model_or_an_export_are_named_in_one_line(run, export_dir, tmp_path, capsys):
    import shutil

    # A broken model-card file beside the model: named, not a bare JSON parser message.
    card = tmp_path / "card"
    shutil.copytree(run, card)
    (card / "metrics_test.json").write_text("")
    assert export_main(["--model", str(card), "--out", str(tmp_path / "x1")]) == 2
    line = _one_error_line(capsys)
    assert "metrics_test.json" in line and "not valid JSON" in line, line
    # A damaged ood.npz (an interrupted calibrate): named, no KeyError traceback.
    ood = tmp_path / "ood"
    shutil.copytree(run, ood)
    np.savez(ood / "ood.npz", mean=np.zeros(3))
    assert export_main(["--model", str(ood), "--out", str(tmp_path / "x2")]) == 2
    line = _one_error_line(capsys)
    assert "ood.npz" in line and "out-of-distribution" in line, line
    # An export whose assets/xmdl.json is damaged: loading it names the file; exporting it again is
    # refused as a SavedModel, before anything in it is read.
    broken = tmp_path / "broken"
    shutil.copytree(export_dir / "1", broken / "1")
    (broken / "1" / "assets" / META_FILE).write_text("{")
    with pytest.raises(ModelError, match=f"{META_FILE}: not valid JSON"):
        load_model(broken)
    (broken / "1" / "saved_model.pb").write_bytes(b"not a graph")
    assert export_main(["--model", str(broken), "--out", str(tmp_path / "x3")]) == 2
    assert "already a SavedModel" in _one_error_line(capsys)
    assert not any((tmp_path / f"x{i}").exists() for i in (1, 2, 3))


def test_odd_out_model_and_config_are_refused_before_anything_is_written(run, export_dir, tmp_path, capsys,
                                                                        monkeypatch):
    import shutil

    # --out copied from a path to saved_model.pb: a version folder, not the export's base folder.
    before = sorted(p.name for p in (export_dir / "1").iterdir())
    assert export_main(["--model", str(run), "--out", str(export_dir / "1")]) == 2
    assert "version folder" in _one_error_line(capsys)
    assert sorted(p.name for p in (export_dir / "1").iterdir()) == before
    # $XMDL_MODEL naming nothing: the message says where the path came from.
    monkeypatch.setenv("XMDL_MODEL", str(tmp_path / "gone"))
    assert export_main(["--out", str(tmp_path / "x1")]) == 2
    assert "$XMDL_MODEL" in _one_error_line(capsys)
    monkeypatch.delenv("XMDL_MODEL")
    # A config.json whose pixel size is no pixel size: named, as the other config errors are.
    bad = tmp_path / "bad px"
    shutil.copytree(run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["data"]["pixel_size_nm"] = -5.0
    (bad / "config.json").write_text(json.dumps(cfg))
    assert export_main(["--model", str(bad), "--out", str(tmp_path / "x2")]) == 2
    line = _one_error_line(capsys)
    assert "config.json" in line and "pixel size -5 nm" in line, line
    assert not (tmp_path / "x1").exists() and not (tmp_path / "x2").exists()


def test_bioimageio_odd_inputs_are_refused_in_one_line_and_nothing_is_deleted(run, export_dir, tmp_path, capsys):
    pytest.importorskip("bioimageio.spec")
    import shutil

    def zoo(*args):
        return export_main(["--format", "bioimageio", "--no-test", *map(str, args)])

    # An export given as the model: said so, not "no model.keras in this folder".
    assert zoo("--model", export_dir, "--out", tmp_path / "z1") == 2
    assert "SavedModel" in _one_error_line(capsys)
    # --overwrite of a package folder that holds the model: the model would be deleted with it.
    pkg = tmp_path / "pkg"
    shutil.copytree(run, pkg / "mine")
    (pkg / "rdf.yaml").write_text("format_version: 0.5.4\n")
    assert zoo("--model", pkg / "mine", "--out", pkg, "--overwrite") == 2
    assert "would replace the input" in _one_error_line(capsys)
    assert (pkg / "mine" / "model.keras").is_file() and (pkg / "rdf.yaml").is_file()
    # A config.json with a negative pixel size, and a damaged ood.npz: each named in one line.
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["data"]["pixel_size_nm"] = -1
    (bad / "config.json").write_text(json.dumps(cfg))
    assert zoo("--model", bad, "--out", tmp_path / "z2") == 2
    line = _one_error_line(capsys)
    assert "config.json" in line and "pixel size -1 nm" in line, line
    ood = tmp_path / "ood"
    shutil.copytree(run, ood)
    np.savez(ood / "ood.npz", mean=np.zeros(3))
    assert zoo("--model", ood, "--out", tmp_path / "z3") == 2
    line = _one_error_line(capsys)
    assert "ood.npz" in line and "out-of-distribution" in line, line
    assert not any((tmp_path / f"z{i}").exists() for i in (1, 2, 3))


def test_bioimageio_package_of_a_model_at_a_coarse_pixel_size_into_a_folder_with_spaces(run, tmp_path, capsys):
    """The cover renders the 4.6-nm sample: a model at 100 nm (beyond the x16 resampling limit)
    still gets a package, and the printed zip command works for a name with spaces."""
    pytest.importorskip("bioimageio.spec")
    import shutil

    import yaml

    coarse = tmp_path / "coarse"
    shutil.copytree(run, coarse)
    cfg = json.loads((coarse / "config.json").read_text())
    cfg["data"]["pixel_size_nm"] = 100.0
    (coarse / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "my zoo ü"
    assert export_main(["--format", "bioimageio", "--no-test", "--model", str(coarse), "--out", str(out)]) == 0
    rdf = yaml.safe_load((out / "rdf.yaml").read_text())
    assert rdf["inputs"][0]["axes"][1]["scale"] == 100.0 and (out / "cover.png").is_file()
    from PIL import Image

    with Image.open(out / "cover.png") as cover:  # the zoo's 2:1, whole panels on a white canvas
        assert cover.width == 2 * cover.height or cover.width == 2 * cover.height - 1
    hint = capsys.readouterr().out.strip().splitlines()[-1].split(": ", 1)[1]
    proc = subprocess.run(["bash", "-c", hint.replace("python", shlex.quote(sys.executable), 1)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (hint, proc.stderr[-2000:])
    import zipfile

    with zipfile.ZipFile(tmp_path / "my zoo ü.zip") as z:
        assert "rdf.yaml" in z.namelist()


def test_a_stray_file_with_a_version_number_is_skipped_not_named_as_the_next_free_version(run, tmp_path):
    out = tmp_path / "exports"
    out.mkdir()
    (out / "1").write_text("keep")
    assert export_main(["--model", str(run), "--out", str(out)]) == 0
    assert (out / "1").read_text() == "keep" and (out / "2" / "saved_model.pb").is_file()


def test_a_damaged_export_is_one_line_and_an_export_given_to_training_says_what_it_is(run, export_dir, tmp_path,
                                                                                         capsys):
    import shutil

    from xmdl_tf.analyze import main as analyze_main
    from xmdl_tf.finetune import main as finetune_main

    broken = tmp_path / "broken"
    shutil.copytree(export_dir, broken)
    for data in (broken).rglob("variables.data-*"):
        data.write_bytes(b"")
    img = tmp_path / "a.png"
    import cv2

    cv2.imwrite(str(img), raw_images()[0, ..., 0])
    assert analyze_main([str(img), "--model", str(broken), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "damaged export, TensorFlow cannot load it" in err and "export the model again" in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert finetune_main(["--model", str(export_dir), "--data", str(tmp_path), "--out", str(tmp_path / "ft")]) == 2
    assert "it is a SavedModel export" in capsys.readouterr().err
    # A Grad-CAM layer the export cannot explain: one line before any image, not a failure of each.
    assert analyze_main([str(img), "--model", str(export_dir), "--out", str(tmp_path / "o"),
                         "--gradcam-layer", "enc1_conv1"]) == 2
    err = capsys.readouterr().err
    assert "exported for layer 'dec1_conv2' only" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
