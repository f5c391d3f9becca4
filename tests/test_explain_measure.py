"""Explanation and measurement checks a user relies on: Grad-CAM layer choice, the deletion check's
numbers, the shape-rules file's errors and morphometry against brute-force references."""

import json
import math

import numpy as np
import pytest

from xmdl_tf.gradcam import GradCamError, deletion_check, explain_function
from xmdl_tf.morphometry import ShapeRules, classify, measure

# Grad-CAM


def test_gradcam_refuses_a_layer_after_the_logits_up_front():
    """`--gradcam-layer softmax` was accepted, then every image failed deep in TensorFlow
    ("None values not supported"); it is refused when the explainer is built, naming the valid layers."""
    from xmdl_tf.model import build_model

    model = build_model(depth=2, base_filters=2)
    with pytest.raises(GradCamError, match="'softmax' comes after the logits.*dec1_conv2"):
        explain_function(model, "softmax")
    x = np.zeros((1, 16, 16, 2), np.float32)
    x[..., 0] = np.random.default_rng(0).random((16, 16))
    x[..., 1] = -1.0
    for layer in ("dec1_conv2", "logits", "bottleneck_relu2"):  # any layer the logits depend on works
        out = np.asarray(explain_function(model, layer)(x))
        assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def _disc_scene(size=64, r=10):
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size // 2) ** 2 + (xx - size // 2) ** 2 <= r * r
    image = np.where(disc, 50, 200).astype(np.uint8)
    cam = disc * (1.0 - np.hypot(yy - size // 2, xx - size // 2) / (2 * r))  # hottest at the centre
    return image, disc, cam.astype(np.float32)


def test_deletion_check_areas_all_come_from_the_predict_function():
    """`analyze` hands over the test-time-augmented probability but predicts the blanked slices without
    TTA: the difference between the two was counted as area lost (on the sample slice, random blanking
    'lost' -2256 px, and deletion_ratio came out as 53618, a pixel count)."""
    image, disc, cam = _disc_scene()

    def predict(im):  # dark pixels are mitochondria
        return (im < 100).astype(np.float32)

    check = deletion_check(predict, image, cam, threshold=0.5, seed=0)
    area = int(disc.sum())
    assert check["area_before"] == area == check["pixels"]
    assert check["area_lost_heat"] == area  # the n hottest pixels are the disc
    rnd = np.random.default_rng(0).choice(image.size, area, replace=False)
    assert check["area_lost_random"] == int(disc.ravel()[rnd].sum())
    assert check["ratio"] == pytest.approx(area / check["area_lost_random"])


def test_deletion_ratio_is_nan_or_inf_where_no_ratio_exists():
    image, disc, cam = _disc_scene()
    nothing = deletion_check(lambda im: np.zeros(im.shape, np.float32), image, cam, threshold=0.5)
    assert nothing["area_before"] == 0 and math.isnan(nothing["ratio"])  # was 0.0: "heat no better than random"

    def centre_only(im):  # the object is found only while its centre is dark
        return disc.astype(np.float32) * (im[32, 32] < 100)

    seed = next(s for s in range(20)  # a draw of random pixels that misses the centre
                if 32 * 64 + 32 not in np.random.default_rng(s).choice(image.size, int(disc.sum()), replace=False))
    only_heat = deletion_check(centre_only, image, cam, threshold=0.5, seed=seed)
    assert only_heat["area_lost_heat"] == disc.sum() and only_heat["area_lost_random"] == 0
    assert only_heat["ratio"] == math.inf  # was disc.sum(): a pixel count posing as a ratio


# Shape rules file


@pytest.mark.parametrize(
    "text, message",
    [
        ("{bad json", "not a JSON object of ShapeRules thresholds"),
        ('{"round_max_aspect": "abc"}', "round_max_aspect must be a finite number"),
        ('{"round_max_aspect": 4}', "round_max_aspect <= elongated_max_aspect"),
        ('{"tubular_min_aspect": 3}', "unknown ShapeRules rule"),
    ],
)
def test_rules_file_errors_are_one_line_naming_the_file(tmp_path, text, message):
    path = tmp_path / "my_rules.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as err:
        ShapeRules.from_json(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_rules_file_missing_names_the_file(tmp_path):
    with pytest.raises(ValueError, match="nope.json: no such ShapeRules file"):
        ShapeRules.from_json(tmp_path / "nope.json")


# Morphometry against brute force


def test_measurements_match_brute_force_at_several_pixel_sizes():
    """Sub-pixel-placed discs and tilted ellipses: area, centroid, axes and orientation from the
    pixels directly, nm columns = px columns x pixel size (squared for areas), classes in nm."""
    rng = np.random.default_rng(3)
    labels = np.zeros((160, 200), np.int32)
    yy, xx = np.mgrid[:160, :200]
    shapes = {1: (40.3, 40.7, 18, 18, 0.0), 2: (100.2, 120.6, 30, 9, 35.0), 3: (60.5, 160.1, 20, 6, -70.0)}
    for k, (cy, cx, a, b, deg) in shapes.items():
        t = math.radians(deg)
        u = (xx - cx) * math.cos(t) - (yy - cy) * math.sin(t)  # y down: +deg is counter-clockwise as displayed
        v = (xx - cx) * math.sin(t) + (yy - cy) * math.cos(t)
        labels[(u / a) ** 2 + (v / b) ** 2 <= 1] = k
    for px in (1.0, 4.6, 12.5):
        table = measure(labels, pixel_size_nm=px).set_index("id")
        for k, (cy, cx, a, b, deg) in shapes.items():
            ys, xs = np.nonzero(labels == k)
            row = table.loc[k]
            assert row["area_px2"] == len(ys) == pytest.approx(math.pi * a * b, rel=0.02)
            assert row["area_nm2"] == pytest.approx(len(ys) * px * px)
            assert (row["centroid_y_px"], row["centroid_x_px"]) == pytest.approx((ys.mean(), xs.mean()))
            assert row["centroid_x_nm"] == pytest.approx(xs.mean() * px)
            assert row["major_axis_length_px"] == pytest.approx(2 * a, rel=0.02)
            assert row["minor_axis_length_px"] == pytest.approx(2 * b, rel=0.03)
            assert row["major_axis_length_nm"] == pytest.approx(row["major_axis_length_px"] * px)
            assert row["equivalent_diameter_nm"] == pytest.approx(math.sqrt(4 * len(ys) / math.pi) * px)
            if a != b:
                assert row["orientation_deg"] == pytest.approx(deg, abs=1.0)
            assert row["perimeter_nm"] == pytest.approx(row["perimeter_px"] * px)
            assert not row["touches_border"] and row["n_branches"] == 1
        # fragmented by area in nm^2 (< 50,000): at 1 nm every object, at 12.5 nm none (the smallest,
        # 377 px, is 58,900 nm^2), at 4.6 nm those under 2363 px
        fragmented = classify(table.reset_index(), ShapeRules()).to_numpy() == "fragmented"
        assert list(fragmented) == list(table["area_px2"].to_numpy() * px * px < 50_000)
        assert fragmented.all() if px == 1.0 else (not fragmented.any() if px == 12.5 else fragmented.any())
    # objects.csv rows carry their pixel size: classify reads it row by row
    mixed = measure(labels, pixel_size_nm=12.5)
    assert list(classify(mixed)) == list(classify(mixed, pixel_size_nm=12.5))


def test_figure_text_leaves_out_a_nan_gradcam_energy():
    """A slice with nothing predicted has no mask to hold the heat: no 'energy ... : nan' line."""
    import pandas as pd

    from xmdl_tf.figure import _table_text

    empty = pd.DataFrame({"area_px2": [], "aspect_ratio": [], "solidity": [], "circularity": []})
    assert "Grad-CAM energy" not in _table_text(empty, {"gradcam_energy_in_mask": float("nan")})
    assert "Grad-CAM energy inside the predicted mask: 0.75" in _table_text(empty, {"gradcam_energy_in_mask": 0.75})
