"""The settings dataclasses refuse values no training can use, in one line, whoever builds them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from xmdl_tf.config import AugmentConfig, Config, DataConfig, ModelConfig, TrainConfig, check_model_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("klass, kwargs, message", [
    (TrainConfig, {"epochs": -1}, "epochs -1"),
    (TrainConfig, {"batch_size": 0}, "batch_size 0"),
    (TrainConfig, {"learning_rate": 0.0}, "learning_rate 0.0"),
    (TrainConfig, {"learning_rate": float("nan")}, "learning_rate nan"),
    (TrainConfig, {"patience": -1}, "patience -1"),
    (TrainConfig, {"steps_per_epoch": 0}, "steps_per_epoch 0"),
    (TrainConfig, {"seed": 2 ** 32}, "seed 4294967296"),
    (TrainConfig, {"loss": "bce"}, "loss 'bce'"),
    (TrainConfig, {"lr_schedule": "step"}, "lr_schedule 'step'"),
    (TrainConfig, {"mixed_precision": "float8"}, "mixed_precision 'float8'"),
    (DataConfig, {"tile_size": 0}, "tile_size 0"),
    (DataConfig, {"tiles_per_slice": 0}, "tiles_per_slice 0"),
    (DataConfig, {"foreground_fraction": 1.5}, "foreground_fraction 1.5"),
    (DataConfig, {"ignore_value": -1}, "ignore_value -1"),
    (DataConfig, {"set_weights": (0.0, 0.0)}, "set_weights"),
    (AugmentConfig, {"rotate": "45"}, "rotate '45'"),
    (AugmentConfig, {"scale": (2.0, 0.5)}, "scale"),
    (AugmentConfig, {"poisson": 2.0}, "poisson 2.0"),
    (AugmentConfig, {"contrast": -0.1}, "contrast -0.1"),
])
def test_settings_no_training_can_use_are_refused(klass, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")) as err:
        klass(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kwargs, message", [
    ({"depth": 1}, "depth 1"), ({"base_filters": 0}, "base_filters 0"), ({"dropout": 1.0}, "dropout 1.0"),
    ({"mixstyle": 1.5}, "mixstyle 1.5"), ({"input_blur": float("nan")}, "input_blur nan"),
])
def test_architectures_no_network_can_be_built_from_are_refused(kwargs, message):
    # Checked by train (tests/test_audit_train.py), not on construction: a foreign .keras file's
    # graph-inferred ModelConfig must load far enough to be refused with its own reason.
    config = ModelConfig(**kwargs)
    with pytest.raises(ValueError, match=f"model settings: {message}"):
        check_model_config(config)
    check_model_config(ModelConfig())


def test_a_hand_edited_config_names_the_file_and_the_setting(tmp_path):
    d = Config().to_dict()
    d["train"]["learning_rate"] = 0
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match=r"config.json\['train'\]: training settings: learning_rate 0"):
        Config.load(path)


def test_every_default_preset_and_shipped_config_is_still_valid():
    for aug in (AugmentConfig.preset("em"), AugmentConfig.preset("basic")):
        aug.without(*AugmentConfig.COMPONENTS)
    shipped = [p for p in ROOT.rglob("config.json") if ".venv" not in p.parts and "model" in p.read_text()]
    assert shipped
    for p in shipped:
        d = json.loads(p.read_text())
        if isinstance(d, dict) and {"model", "train"} <= set(d):
            Config.from_dict(d, str(p))
