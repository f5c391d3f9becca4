"""Adapting to a new microscope: fine-tuning, sparse labels, lineage and pixel-size-aware inference."""

import json

import cv2
import keras
import numpy as np
import pytest
import tifffile

from data_prep.synthetic import generate_slice
from xmdl_tf.analyze import Settings, analyze_image
from xmdl_tf.config import Config
from xmdl_tf.finetune import main as finetune_main
from xmdl_tf.metrics import confusion, scores
from xmdl_tf.predict import ModelError, Predictor, load_model
from xmdl_tf.train import main as train_main

SHIFTED = {"invert": True, "contrast": 0.7, "noise": 14.0}
# One worker runs this module, so `base_run` (module scope) is trained once, not once per worker.
pytestmark = pytest.mark.xdist_group("adapt_base")


def write_synthetic(root, split, seeds, appearance=None, size=256):
    (root / split / "x").mkdir(parents=True, exist_ok=True)
    (root / split / "y").mkdir(parents=True, exist_ok=True)
    for i, seed in enumerate(seeds):
        img, inst, _ = generate_slice(size=size, seed=seed, pixel_size_nm=5.0, appearance=appearance)
        cv2.imwrite(str(root / split / "x" / f"im{i:04d}.png"), img)
        tifffile.imwrite(root / split / "y" / f"seg{i:04d}.tif", inst, compression="zlib")


TRAIN = ["--tile-size", "64", "--depth", "3", "--base-filters", "8", "--batch-size", "8", "--no-jit"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny model trained on synthetic slices of the default look, at 5 nm per pixel."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic(root / "data", "train", [1, 2, 3])
    write_synthetic(root / "data", "val", [4])
    run = root / "base"
    train_main(["--data", str(root / "data"), "--out", str(run), *TRAIN, "--epochs", "10", "--steps-per-epoch", "12",
                "--lr", "3e-3", "--patience", "10", "--pixel-size", "5", "--augment", "basic"])
    return run


def f1_on(pred: Predictor, img: np.ndarray, inst: np.ndarray) -> float:
    return scores(confusion(pred.predict_slice(img, tile=128, overlap=32) >= 0.5, inst > 0))["f1"]


def test_finetune_on_one_slice_adapts_to_a_new_look(base_run, tmp_path):
    test_img, test_inst, _ = generate_slice(size=256, seed=50, pixel_size_nm=5.0, appearance=SHIFTED)
    before = f1_on(load_model(base_run, jit_compile=False), test_img, test_inst)
    write_synthetic(tmp_path / "new", "train", [60], appearance=SHIFTED)  # ONE annotated slice, no val split
    out = tmp_path / "tuned"
    assert finetune_main(["--model", str(base_run), "--data", str(tmp_path / "new"), "--out", str(out),
                          "--tile-size", "64", "--batch-size", "8", "--no-jit", "--epochs", "8",
                          "--steps-per-epoch", "12", "--lr", "2e-3"]) == 0
    after = f1_on(load_model(out, jit_compile=False), test_img, test_inst)
    assert after > before + 0.15 and after > 0.6, (before, after)
    cfg = Config.load(out / "config.json")
    assert cfg.info["lineage"]["model"] == str((base_run / "model.keras").resolve())
    assert cfg.info["data"][0]["train_slices"] == ["im0000"]
    assert "held-back" in cfg.info["data"][0]["validation"]
    assert cfg.model == Config.load(base_run / "config.json").model  # architecture from the parent
    assert cfg.train.learning_rate == 2e-3 and cfg.info["augment_strength"] == 2.0


def test_finetune_defaults_to_a_fixed_budget_of_real_epochs_on_a_few_slices(base_run, tmp_path):
    """One small slice is one step of tiles: fine-tuning makes each epoch at least 40 steps and runs 10
    of them without an early stop on the noise of held-back rows; `train` keeps one pass per epoch."""
    from xmdl_tf.train import build_parser

    write_synthetic(tmp_path / "new", "train", [63], appearance=SHIFTED, size=128)
    argv = ["--model", str(base_run), "--data", str(tmp_path / "new"), "--tile-size", "64", "--batch-size", "4",
            "--no-jit"]
    defaults = build_parser("finetune", finetune=True).parse_args([*argv, "--out", "x"])
    assert (defaults.epochs, defaults.patience, defaults.min_steps_per_epoch) == (10, 10, 40)
    trained = build_parser().parse_args(["--data", "d", "--out", "x"])
    assert (trained.epochs, trained.patience, trained.min_steps_per_epoch) == (50, 5, 1)
    assert finetune_main([*argv, "--out", str(tmp_path / "a"), "--epochs", "1"]) == 0
    cfg = Config.load(tmp_path / "a" / "config.json").train
    assert (cfg.steps_per_epoch, cfg.min_steps_per_epoch, cfg.patience) == (40, 40, 10)
    assert finetune_main([*argv, "--out", str(tmp_path / "b"), "--epochs", "1", "--min-steps-per-epoch", "1"]) == 0
    assert Config.load(tmp_path / "b" / "config.json").train.steps_per_epoch == 1  # 128 px: one pass = 4 tiles
    with pytest.raises(SystemExit) as err:
        finetune_main([*argv, "--out", str(tmp_path / "c"), "--min-steps-per-epoch", "0"])
    assert err.value.code == 2 and not (tmp_path / "c").exists()


def test_frozen_encoder_keeps_encoder_weights(base_run, tmp_path):
    write_synthetic(tmp_path / "new", "train", [61], appearance=SHIFTED, size=128)
    out = tmp_path / "frozen"
    finetune_main(["--model", str(base_run), "--data", str(tmp_path / "new"), "--out", str(out), "--tile-size", "64",
                   "--batch-size", "4", "--no-jit", "--epochs", "1", "--steps-per-epoch", "3", "--freeze-encoder"])
    parent = keras.models.load_model(base_run / "model.keras")
    # The epoch's weights (model.keras keeps the parent's unless the epoch beat it on validation).
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    child = keras.models.load_model(out / "checkpoint" / state["last"])
    np.testing.assert_array_equal(parent.get_layer("enc1_conv1").get_weights()[0],
                                  child.get_layer("enc1_conv1").get_weights()[0])
    assert not np.array_equal(parent.get_layer("dec1_conv2").get_weights()[0],
                              child.get_layer("dec1_conv2").get_weights()[0])


def test_a_fine_tuned_model_is_applied_as_its_tuned_parent(base_run, tmp_path):
    """TTA, threshold, minimum size and the auto-zoom range chosen for the parent carry over to the child."""
    import shutil
    from dataclasses import replace

    parent = tmp_path / "parent"
    shutil.copytree(base_run, parent)
    cfg = Config.load(parent / "config.json")
    tuned = replace(cfg.inference, tta=True, threshold=0.7, min_area_nm2=10_000.0, object_width_px=(20.0, 40.0))
    assert tuned != cfg.inference
    replace(cfg, inference=tuned).save(parent / "config.json")
    write_synthetic(tmp_path / "new", "train", [62], appearance=SHIFTED, size=128)
    argv = ["--model", str(parent), "--data", str(tmp_path / "new"), "--tile-size", "64", "--batch-size", "4",
            "--no-jit", "--epochs", "1", "--steps-per-epoch", "2"]
    assert finetune_main([*argv, "--out", str(tmp_path / "child"), "--pixel-size", "5"]) == 0
    assert Config.load(tmp_path / "child" / "config.json").inference == tuned
    from xmdl_tf.config import resolve_inference

    child = load_model(tmp_path / "child", jit_compile=False)
    assert resolve_inference(child).tta  # analyze and evaluate apply it with TTA, as the parent
    # Slices of unknown pixel size are learnt on their own grid: the parent's object widths no longer
    # say which scale the child knows, so auto zoom waits for `tune` to measure them again.
    assert finetune_main([*argv, "--out", str(tmp_path / "child2")]) == 0
    cfg2 = Config.load(tmp_path / "child2" / "config.json")
    assert cfg2.inference == replace(tuned, object_width_px=None) and "auto-zoom" in cfg2.info["lineage"]["inference"]


def test_ignored_pixels_do_not_change_the_loss(tmp_path):
    from xmdl_tf.config import DataConfig
    from xmdl_tf.data import SliceRegion, validation_dataset
    from xmdl_tf.io import split_pairs
    from xmdl_tf.losses import SegmentationLoss

    img, inst, _ = generate_slice(size=128, seed=3, pixel_size_nm=5.0)
    sparse = (inst > 0).astype(np.uint8)
    sparse[:, 64:] = 255  # only the left half is annotated
    (tmp_path / "val" / "x").mkdir(parents=True)
    (tmp_path / "val" / "y").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "val" / "x" / "im0000.png"), img)
    tifffile.imwrite(tmp_path / "val" / "y" / "seg0000.tif", sparse)
    ds = validation_dataset([SliceRegion(p) for p in split_pairs(tmp_path, "val")], DataConfig(tile_size=128, ignore_value=255), 1)
    _, y = next(iter(ds))
    y = y.numpy()
    assert (y[0, :, 64:] == -1).all() and set(np.unique(y[0, :, :64])) <= {0.0, 1.0}
    rng = np.random.default_rng(0)
    p1 = rng.random((1, 128, 128, 1)).astype(np.float32)
    p2 = p1.copy()
    p2[:, :, 64:] = rng.random((1, 128, 64, 1))  # differ only where labels are ignored
    loss = SegmentationLoss("dice_ce")
    as_probs = lambda p: np.concatenate([1 - p, p], -1)  # noqa: E731
    assert float(loss(y, as_probs(p1))) == pytest.approx(float(loss(y, as_probs(p2))), abs=1e-6)


def test_resampling_round_trip_keeps_objects():
    from skimage.measure import label

    _, inst, objects = generate_slice(size=256, seed=9, pixel_size_nm=5.0)
    mask = (inst > 0).astype(np.float32)
    for factor in (0.5, 2.0, 0.73):
        out = Predictor._at_model_scale(mask, None, factor, lambda img, _r: img[..., None].astype(np.float32))[..., 0]
        back = out >= 0.5
        assert back.shape == mask.shape
        assert abs(label(back).max() - label(mask > 0).max()) <= 1
        iou = (back & (mask > 0)).sum() / (back | (mask > 0)).sum()
        assert iou > 0.9, (factor, iou)


def test_same_slice_at_two_pixel_sizes_gives_same_counts_and_areas(base_run):
    pred = load_model(base_run, jit_compile=False)
    assert pred.pixel_size_nm == 5.0
    img5, inst5, _ = generate_slice(size=384, seed=77, pixel_size_nm=5.0, touching_fraction=0.0)
    img10 = cv2.resize(img5, (192, 192), interpolation=cv2.INTER_AREA)  # the same field at 10 nm per pixel
    # The tiny test model leaves a few specks of false positives below 0.02 um^2; drop them.
    s = Settings(inference={"tile": 128, "overlap": 32, "min_area_nm2": 20_000})
    a5 = analyze_image(pred, img5, "5nm", s, pixel_size_nm=5.0)
    a10 = analyze_image(pred, img10, "10nm", s, pixel_size_nm=10.0)
    assert a10.summary["rescaled_by"] == 2.0 and a5.summary["rescaled_by"] == 1.0
    assert a10.probability.shape == img10.shape  # mapped back to the input's own grid
    # The same mitochondria: the 10-nm mask mapped onto the 5-nm grid covers the 5-nm one...
    up = cv2.resize(a10.mask.astype(np.uint8), img5.shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert (up & (a5.mask > 0)).sum() / (up | (a5.mask > 0)).sum() > 0.85
    # ...and the same count, give or take the one object whose neck or gap to a neighbour is
    # narrower than a 10-nm pixel (this tiny model's soft blobs: which one tips with the CPU's
    # rounding; an AMX host merged two at 10 nm and the watershed split one at 5 nm).
    assert a5.summary["count"] > 0 and abs(a5.summary["count"] - a10.summary["count"]) <= 1
    # One 10-nm pixel of boundary is about 5% of a typical object's area here: allow two.
    assert a10.summary["total_area_nm2"] == pytest.approx(a5.summary["total_area_nm2"], rel=0.1)


def test_clear_errors_when_model_and_data_disagree(base_run, tmp_path, capsys):
    inputs = keras.Input((None, None, 3))
    m = keras.Model(inputs, keras.layers.Conv2D(2, 1, activation="softmax")(inputs))
    m.save(tmp_path / "rgb.keras")
    with pytest.raises(ModelError, match="rgb.keras: model expects 3 channels"):
        load_model(tmp_path / "rgb.keras")
    write_synthetic(tmp_path / "d", "train", [5], size=128)
    # The parent has depth 3: tiles must be multiples of 4.
    assert finetune_main(["--model", str(base_run), "--data", str(tmp_path / "d"), "--out", str(tmp_path / "o"),
                          "--tile-size", "62"]) == 2
    assert "tile size 62 is not divisible by 2**(depth-1) = 4" in capsys.readouterr().err
    (tmp_path / "nolabels" / "train" / "x").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "nolabels" / "train" / "x" / "im0000.png"), generate_slice(size=64, seed=1)[0])
    assert finetune_main(["--model", str(base_run), "--data", str(tmp_path / "nolabels"),
                          "--out", str(tmp_path / "o2")]) == 2
    assert "missing label folder" in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o2").exists()
    # adapt reads every image before its output exists: a constant slice leaves nothing to block a rerun.
    from xmdl_tf.adapt import main as adapt_main
    (tmp_path / "unlabelled").mkdir()
    cv2.imwrite(str(tmp_path / "unlabelled" / "a.png"), generate_slice(size=64, seed=2)[0])
    cv2.imwrite(str(tmp_path / "unlabelled" / "b.png"), np.zeros((64, 64), np.uint8))
    assert adapt_main([str(tmp_path / "unlabelled"), "--model", str(base_run), "--out", str(tmp_path / "ad"),
                       "--zoom-search", "off"]) == 2
    assert "b.png: constant image" in capsys.readouterr().err and not (tmp_path / "ad").exists()
    (tmp_path / "unlabelled" / "b.png").unlink()
    assert adapt_main([str(tmp_path / "unlabelled"), "--model", str(base_run), "--out", str(tmp_path / "ad"),
                       "--zoom-search", "off", "--min-area", "100000", "--rounds", "1"]) == 2
    err = capsys.readouterr().err  # said in adapt's terms (it used to speak of --ignore-value and labels)
    assert "model is sure of no mitochondrion" in err and "--ignore-value" not in err, err
    # ... and its advice can be followed: nothing was left that would refuse the rerun with other settings.
    assert not (tmp_path / "ad").exists()


def test_pseudo_labels_keep_only_sure_pixels_and_objects():
    from xmdl_tf.adapt import IGNORE, pseudo_label

    prob = np.full((40, 40), 0.5, np.float32)
    prob[:10] = 0.02             # sure background
    prob[20:32, 20:32] = 0.97    # a sure mitochondrion of 144 px
    prob[2:4, 30:32] = 0.99      # a sure speck of 4 px inside background: too small to trust
    lab = pseudo_label(prob, 0.1, 0.9, min_area=50)
    assert lab.dtype == np.uint8 and set(np.unique(lab)) == {0, 1, IGNORE}
    assert (lab[20:32, 20:32] == 1).all() and (lab == 1).sum() == 144
    assert (lab[2:4, 30:32] == IGNORE).all()  # neither object nor background
    assert (lab[:10][prob[:10] < 0.1] == 0).all() and (lab[12:18] == IGNORE).all()
    with pytest.raises(ValueError):
        pseudo_label(prob, 0.6, 0.4, 0)


def test_consensus_pseudo_labels_need_every_member_to_be_sure():
    from xmdl_tf.adapt import IGNORE, pseudo_label

    members = np.full((40, 40, 8), 0.02, np.float32)   # background, sure in every member
    members[20:32, 20:32] = 0.97                        # a mitochondrion all members agree on
    members[2:14, 2:14] = 0.97
    members[2:14, 2:14, 3] = 0.6                        # one member doubts this one
    members[30:38, 2:10, 5] = 0.3                       # one member not quite sure of background here
    mean = pseudo_label(members.mean(-1), 0.1, 0.9, min_area=50)
    lab = pseudo_label(members, 0.1, 0.9, min_area=50)
    assert (mean[2:14, 2:14] == 1).all() and (mean[30:38, 2:10] == 0).all()  # the mean hides the doubt
    assert (lab[2:14, 2:14] == IGNORE).all() and (lab[30:38, 2:10] == IGNORE).all()
    assert (lab[20:32, 20:32] == 1).all() and (lab[0:1] == 0).all()
    assert (lab == 1).sum() == 144

def test_adapt_self_trains_on_the_sure_pixels_of_unlabelled_images(blob_run, tmp_path, capsys):
    """`adapt` pseudo-labels unlabelled slices with the model, fine-tunes it on them and leaves an
    adapted model whose lineage names its parent; bad input is refused before anything is written."""
    import json
    import shutil

    import keras
    import tifffile

    from xmdl_tf.adapt import IGNORE, main as adapt_main
    from xmdl_tf.io import read_label

    data, run = blob_run
    out = tmp_path / "adapted"
    argv = [str(data / "test" / "x"), "--out", str(out), "--model", str(run), "--slices", "2", "--epochs", "1",
            "--steps-per-epoch", "2", "--tile-size", "32", "--rounds", "2", "--max-drift", "0"]
    assert adapt_main(argv) == 0
    model = out / "model"
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["info"]["lineage"]["model"] == str((run / "model.keras").resolve())
    assert cfg["data"]["ignore_value"] == IGNORE
    parent = keras.models.load_model(run / "model.keras", compile=False)
    child = keras.models.load_model(model / "model.keras", compile=False)
    assert any(not np.allclose(a, b) for a, b in zip(parent.get_weights(), child.get_weights()))
    labels = sorted((out / "round1" / "pseudo" / "adapted" / "train" / "y").glob("*.tif"))
    truths = sorted((data / "test" / "y").glob("*.tif"))
    assert len(labels) == 2
    for lab_f, truth_f in zip(labels, truths):
        lab, truth = tifffile.imread(lab_f), read_label(truth_f) > 0
        assert set(np.unique(lab)) <= {0, 1, IGNORE} and (lab == 1).any() and (lab == 0).any()
        # The tiny model segments blobs well: what it is sure of is mostly right.
        assert truth[lab == 1].mean() > 0.8 and (~truth[lab == 0]).mean() > 0.95
    rounds = json.loads((out / "adapt.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and rounds[0]["slices"] == 2
    # Without --zoom-search the teacher predicts every slice on the pixel size's grid, and says so.
    assert json.loads((out / "adapt.json").read_text())["recipe"]["zoom_search"] == "off"
    assert set(rounds[0]["zooms"].values()) == {1.0} and len(rounds[0]["zooms"]) == 2
    # The adapted model is the last round's, itself fine-tuned from the original (not from round 1).
    last = keras.models.load_model(out / "round2" / "model" / "model.keras", compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(last.get_weights(), child.get_weights()))
    assert json.loads((out / "round2" / "model" / "config.json").read_text())["info"]["lineage"]["model"] == \
        str((run / "model.keras").resolve())
    capsys.readouterr()
    # A finished adaptation is never overwritten: the same command finds it done, other settings are refused.
    before = (model / "model.keras").stat().st_mtime_ns
    assert adapt_main(argv) == 0 and (model / "model.keras").stat().st_mtime_ns == before
    assert adapt_main([*argv[:-1], "0.5"]) == 2 and "other settings (max_drift)" in capsys.readouterr().err

    # Killed after round 2's labels were written but before they were recorded or trained on, and resumed
    # with the drift stop on: the labels are read back, and against a round 1 that (as recorded here)
    # marked half as much mitochondrion, they stop the adaptation with round 1's model.
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "model")
    shutil.rmtree(resumed / "round2" / "model")
    state = json.loads((resumed / "adapt.json").read_text())
    state["recipe"]["max_drift"] = 0.2
    state["rounds"] = [{**state["rounds"][0], "mitochondrion": state["rounds"][1]["mitochondrion"] / 2}]
    (resumed / "adapt.json").write_text(json.dumps(state))
    assert adapt_main([*argv[:-2], "--max-drift", "0.2", "--out", str(resumed)]) == 0
    state = json.loads((resumed / "adapt.json").read_text())
    assert [r["round"] for r in state["rounds"]] == [1, 2] and "kept round 1's model" in state["stopped"]
    assert state["rounds"][1]["mitochondrion"] == rounds[1]["mitochondrion"]  # read back from the label files
    assert not (resumed / "round2" / "model").exists()
    first = keras.models.load_model(out / "round1" / "model" / "model.keras", compile=False)
    kept = keras.models.load_model(resumed / "model" / "model.keras", compile=False)
    assert all(np.array_equal(a, b) for a, b in zip(first.get_weights(), kept.get_weights()))

    # Bad input leaves nothing behind.
    bad = tmp_path / "bad"
    assert adapt_main([str(tmp_path / "nowhere"), "--out", str(bad), "--model", str(run)]) == 2
    assert "nowhere" in capsys.readouterr().err and not bad.exists()
    with pytest.raises(SystemExit):
        adapt_main([str(data / "test" / "x"), "--out", str(bad), "--model", str(run), "--low", "0.9", "--high", "0.5"])
    assert not bad.exists()
    # --zoom-search needs a model that states its pixel size and, for "ood", its OOD model (ood.npz).
    from dataclasses import replace

    from xmdl_tf.config import Config

    sized = tmp_path / "sized"
    shutil.copytree(run, sized)
    cfg = Config.load(sized / "config.json")
    replace(cfg, data=replace(cfg.data, pixel_size_nm=5.0)).save(sized / "config.json")
    for model_dir, mode, message in ((run, "always", "states no pixel size"), (sized, "ood", "ood.npz is missing")):
        assert adapt_main([str(data / "test" / "x"), "--out", str(bad), "--model", str(model_dir),
                           "--zoom-search", mode]) == 2
        assert message in capsys.readouterr().err and not bad.exists()


def test_drift_round_finds_the_first_round_that_relabels_too_much():
    from xmdl_tf.adapt import drift_round

    assert drift_round([0.050, 0.073, 0.094], 0.2) == 2      # SBEM's drift: +47% in round 2
    assert drift_round([0.021, 0.021, 0.020], 0.2) is None   # a steady teacher runs every round
    assert drift_round([0.10, 0.11, 0.07], 0.2) == 3         # shrinking counts too
    assert drift_round([0.050, 0.073], 0) is None and drift_round([0.050, 0.073], None) is None
    assert drift_round([0.0, 0.0, 0.01], 0.2) == 3 and drift_round([0.05], 0.2) is None


def test_consensus_labels_are_a_subset_of_the_mean_labels(blob_run, tmp_path):
    """With `consensus`, every sure pixel is one the mean of the members is sure of too (a stricter teacher)."""
    import tifffile

    from xmdl_tf.adapt import IGNORE, write_pseudo_set
    from xmdl_tf.io import find_pairs

    data, run = blob_run
    pred, pairs = load_model(run, jit_compile=False), find_pairs(str(data), "test")[:1]
    mean_share = write_pseudo_set(pred, pairs, tmp_path / "mean", None, 0.1, 0.9, 20)
    cons_share = write_pseudo_set(pred, pairs, tmp_path / "cons", None, 0.1, 0.9, 20, consensus=True)
    mean, cons = (tifffile.imread(next((tmp_path / d / "train" / "y").glob("*.tif"))) for d in ("mean", "cons"))
    assert ((cons == 1) <= (mean == 1)).all() and ((cons == 0) <= (mean == 0)).all()
    assert (cons == 1).any() and cons_share["ignored"] > mean_share["ignored"]
    # `adapt --consensus` teaches exactly these labels.
    from xmdl_tf.adapt import main as adapt_main

    out = tmp_path / "adapted"
    assert adapt_main([str(data / "test" / "x"), "--out", str(out), "--model", str(run), "--slices", "1", "--rounds",
                       "1", "--epochs", "1", "--steps-per-epoch", "1", "--tile-size", "32", "--consensus"]) == 0
    taught = tifffile.imread(next((out / "round1" / "pseudo" / "adapted" / "train" / "y").glob("*.tif")))
    # The same labels up to the last bits of another model load: on some CPUs (oneDNN, AMX) those move a pixel
    # that sits on a threshold, and with it a speck across the minimum size (0.6% of this slice on one host).
    assert (taught == cons).mean() > 0.99
    assert (taught == IGNORE).sum() > (mean == IGNORE).sum()  # the consensus rule's extra ignored pixels, not the mean's
