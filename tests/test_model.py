import numpy as np
import pytest

from xmdl_tf.config import VARIANTS
from xmdl_tf.model import build_model, conv_layer_names


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_shapes_and_names(variant):
    residual, attention = VARIANTS[variant]
    m = build_model(depth=3, base_filters=4, residual=residual, attention=attention)
    for h, w in [(48, 80), (4, 4), (100, 36)]:
        out = m(np.random.default_rng(0).random((2, h, w, 1)).astype(np.float32))
        assert out.shape == (2, h, w, 2)
        np.testing.assert_allclose(out.numpy().sum(-1), 1.0, atol=1e-5)
    names = {l.name for l in m.layers}
    assert {"enc1_conv1", "enc2_conv2", "bottleneck_conv2", "dec2_up", "dec1_conv2", "softmax"} <= names
    assert ("dec1_att_gate" in names) == attention
    assert ("enc1_add" in names) == residual
    assert "dec1_conv2" in conv_layer_names(m)


def test_six_levels_default():
    m = build_model(depth=6, base_filters=2)
    assert sum(1 for l in m.layers if l.name.endswith("_pool")) == 5
    assert m.get_layer("bottleneck_conv2").filters == 2 * 2**5
    assert m(np.zeros((1, 32, 64, 1), np.float32)).shape == (1, 32, 64, 2)


def test_parameter_counts_grow_with_residual_and_attention():
    counts = {v: build_model(3, 4, *VARIANTS[v]).count_params() for v in VARIANTS}
    assert counts["unet"] < counts["residual"] < counts["residual_attention"]
    assert counts["unet"] < counts["attention"] < counts["residual_attention"]


def test_keras_round_trip(tmp_path):
    import keras

    m = build_model(3, 4)
    x = np.random.default_rng(1).random((1, 32, 32, 1)).astype(np.float32)
    m.save(tmp_path / "m.keras")
    m2 = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(m(x).numpy(), m2(x).numpy(), atol=1e-6)


def test_bad_arguments():
    with pytest.raises(ValueError):
        build_model(depth=1)
    with pytest.raises(ValueError):
        build_model(n_classes=1)


def test_mixed_precision_outputs_float32_and_trains():
    import keras

    from xmdl_tf.losses import SegmentationLoss

    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        m = build_model(depth=2, base_filters=2)
        assert m.get_layer("enc1_conv1").compute_dtype == "float16"
        x = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
        y = (x > 0.7).astype(np.float32)
        assert m(x).dtype.name == "float32"
        m.compile(keras.optimizers.Adam(1e-3), SegmentationLoss())
        loss = m.train_on_batch(x, y)
        assert np.isfinite(loss)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_model_trained_in_bfloat16_is_saved_computing_in_float32(tmp_path):
    """A mixed-precision run's model.keras computes in float32: what ships does not depend on
    the training precision, and its predictions equal a float32 build with the same weights."""
    import keras

    from xmdl_tf.predict import load_keras
    from xmdl_tf.train import _save_inference

    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        m = build_model(depth=3, base_filters=4)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    assert m.get_layer("enc1_conv1").compute_dtype == "bfloat16"
    _save_inference(m, tmp_path / "model.keras")
    saved = load_keras(tmp_path / "model.keras")
    assert {l.dtype_policy.name for l in saved.layers} == {"float32"}
    assert all(np.array_equal(a, b) for a, b in zip(m.get_weights(), saved.get_weights()))
    ref = build_model(depth=3, base_filters=4)
    ref.set_weights(m.get_weights())
    x = np.random.default_rng(2).random((1, 48, 48, 1)).astype(np.float32)
    np.testing.assert_allclose(saved(x).numpy(), ref(x).numpy(), atol=1e-6)
    # bfloat16 keeps 8 bits of mantissa: the mixed model itself is close, not equal
    assert np.abs(m(x).numpy() - ref(x).numpy()).max() > 1e-6


def test_saved_inference_model_has_no_optimizer_state(tmp_path):
    """What train saves for shipping holds the weights only, also from a compiled, trained
    model (Keras 3.15's clone_model compiles the clone like the original)."""
    import zipfile

    import h5py
    import keras

    from xmdl_tf.train import _save_inference

    m = build_model(depth=3, base_filters=4)
    m.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse")
    x = np.random.default_rng(0).random((2, 32, 32, 1)).astype(np.float32)
    m.fit(x, np.zeros((2, 32, 32, 2), np.float32), verbose=0)
    _save_inference(m, tmp_path / "model.keras")
    with zipfile.ZipFile(tmp_path / "model.keras") as z:
        z.extract("model.weights.h5", tmp_path)
    with h5py.File(tmp_path / "model.weights.h5") as f:
        assert "layers" in f and "optimizer" not in f
    saved = keras.models.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(saved(x).numpy(), m(x).numpy(), atol=1e-6)
    assert not isinstance(saved(x), (list, tuple))  # one tensor, as the model it was copied from


def test_input_blur_is_a_gaussian_with_reflected_borders():
    """InputBlur equals scipy's Gaussian filter (mirror borders = numpy's "reflect"); a flat
    image stays flat to its edge, so tile borders keep their grey level."""
    from scipy import ndimage

    from xmdl_tf.model import InputBlur

    layer = InputBlur(1.7)
    x = np.random.default_rng(3).random((2, 40, 52, 1)).astype(np.float32)
    ref = np.stack([ndimage.gaussian_filter(im[..., 0], 1.7, mode="mirror", truncate=layer.radius / 1.7)
                    for im in x])[..., None]
    np.testing.assert_allclose(np.asarray(layer(x)), ref, atol=1e-5)
    flat = np.full((1, 33, 33, 1), 0.4, np.float32)
    np.testing.assert_allclose(np.asarray(layer(flat)), flat, atol=1e-6)
    with pytest.raises(ValueError):
        InputBlur(0)
    with pytest.raises(ValueError):
        build_model(depth=2, base_filters=2, input_blur=-1)


def test_input_blur_is_part_of_the_saved_graph(tmp_path):
    """A model with input_blur loads safely (no Python code), predicts as built, and its
    blur changes the prediction (it sits in front of the network, not beside it)."""
    from xmdl_tf.config import Config, ModelConfig
    from xmdl_tf.model import build_from_config, float32_copy
    from xmdl_tf.predict import load_keras

    cfg = Config(model=ModelConfig(depth=3, base_filters=4, input_blur=2.0))
    m = build_from_config(cfg.model)
    assert m.layers[1].name == "input_blur" and m.count_params() == build_model(3, 4).count_params()
    x = np.random.default_rng(4).random((1, 32, 48, 1)).astype(np.float32)
    float32_copy(m).save(tmp_path / "m.keras")
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json").model.input_blur == 2.0
    loaded = load_keras(tmp_path / "m.keras")
    np.testing.assert_allclose(loaded(x).numpy(), m(x).numpy(), atol=1e-6)
    # A bare .keras file (no config.json beside it) still reports its blur.
    from xmdl_tf.predict import load_keras_with_config

    (tmp_path / "bare").mkdir()
    (tmp_path / "m.keras").rename(tmp_path / "bare" / "m.keras")
    assert load_keras_with_config(tmp_path / "bare" / "m.keras")[1].model.input_blur == 2.0
    plain = build_model(3, 4)
    plain.set_weights(m.get_weights())
    assert np.abs(plain(x).numpy() - m(x).numpy()).max() > 1e-3


def test_mixstyle_mixes_tile_statistics_in_training_only(tmp_path):
    """In training every chosen tile's channel means become mixes of two tiles' (so they stay
    inside the batch's range) while its normalised pattern is kept; at inference the layer is
    the identity, so a model with it predicts exactly as the same weights without it, saved or not."""
    from xmdl_tf.config import Config, ModelConfig
    from xmdl_tf.model import MixStyle, build_from_config
    from xmdl_tf.predict import load_keras, load_keras_with_config

    rng = np.random.default_rng(0)
    x = (rng.normal(size=(6, 12, 12, 3)) * np.arange(1, 7)[:, None, None, None]
         + 10 * np.arange(6)[:, None, None, None]).astype(np.float32)
    layer = MixStyle(1.0, seed=1)
    np.testing.assert_array_equal(np.asarray(layer(x, training=False)), x)
    np.testing.assert_array_equal(np.asarray(MixStyle(0.0)(x, training=True)), x)
    moved = 0
    for _ in range(5):
        y = np.asarray(layer(x, training=True))
        mu_x, mu_y = x.mean(axis=(1, 2)), y.mean(axis=(1, 2))
        assert np.all(mu_y >= mu_x.min(axis=0) - 1e-3) and np.all(mu_y <= mu_x.max(axis=0) + 1e-3)
        z = lambda a: (a - a.mean(axis=(1, 2), keepdims=True)) / a.std(axis=(1, 2), keepdims=True)
        np.testing.assert_allclose(z(y), z(x), atol=1e-3)  # only the statistics move
        moved += int(np.sum(np.abs(mu_y - mu_x).max(axis=1) > 1.0))
    assert moved >= 3
    with pytest.raises(ValueError):
        MixStyle(1.5)
    with pytest.raises(ValueError):
        build_model(depth=2, base_filters=2, mixstyle=-0.1)

    cfg = Config(model=ModelConfig(depth=3, base_filters=4, mixstyle=0.5))
    m = build_from_config(cfg.model)
    assert [l.name for l in m.layers if isinstance(l, MixStyle)] == ["enc1_mixstyle", "enc2_mixstyle"]
    plain = build_model(3, 4)
    plain.set_weights(m.get_weights())  # the layer has no weights
    img = rng.random((2, 32, 32, 1)).astype(np.float32)
    np.testing.assert_allclose(m(img).numpy(), plain(img).numpy(), atol=1e-6)
    m.save(tmp_path / "m.keras")
    np.testing.assert_allclose(load_keras(tmp_path / "m.keras")(img).numpy(), plain(img).numpy(), atol=1e-6)
    assert load_keras_with_config(tmp_path / "m.keras")[1].model.mixstyle == 0.5  # bare file: read off the graph


@pytest.mark.parametrize("arch", [dict(depth=3, base_filters=4), dict(depth=4, base_filters=6, residual=False),
                                  dict(depth=2, base_filters=5, attention=False, dropout=0.1),
                                  dict(depth=3, base_filters=4, residual=False, attention=False)])
def test_a_bare_keras_file_reports_its_whole_architecture(tmp_path, arch):
    """Without config.json, fine-tuning rebuilds the network from what the graph says: every field
    must come back, or the weights do not fit (a 4-filter model read as the default 8)."""
    from xmdl_tf.config import ModelConfig
    from xmdl_tf.model import build_from_config, float32_copy
    from xmdl_tf.predict import load_keras_with_config

    cfg = ModelConfig(**arch)
    float32_copy(build_from_config(cfg)).save(tmp_path / "m.keras")
    got = load_keras_with_config(tmp_path / "m.keras")[1].model
    assert got == cfg
    build_from_config(got).set_weights(load_keras_with_config(tmp_path / "m.keras")[0].get_weights())


@pytest.mark.parametrize("edit, message", [({"inference": {"threshold": "0.5"}}, "['threshold']: expected a number"),
                                           ({"data": None}, "['data']: expected a JSON object"),
                                           ({"model": {"depth": 3.5}}, "['depth']: expected a whole number"),
                                           ({"info": []}, "['info']: expected a JSON object"),
                                           ({"data": {"pixel_size_nm": -4.6}}, "['data']: pixel size -4.6 nm is outside")])
def test_a_hand_edited_config_with_a_wrong_type_is_refused_in_one_line(tmp_path, edit, message):
    import json

    from xmdl_tf.config import Config

    cfg = Config().to_dict()
    for key, value in edit.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and isinstance(cfg[key], dict) else value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError) as err:
        Config.load(tmp_path / "config.json")
    assert str(tmp_path / "config.json") in str(err.value) and message in str(err.value)
    assert Config.from_dict(json.loads(json.dumps(Config().to_dict()))) == Config()  # a saved config loads as saved
