"""Grad-CAM and the unified analysis pipeline, with a tiny model trained briefly on synthetic blobs."""

import cv2
import numpy as np
import pandas as pd
import pytest
import tifffile

from xmdl_tf.analyze import OUTPUT_FILES, main as analyze_main
from xmdl_tf.gradcam import GradCamError, energy_inside
from xmdl_tf.predict import load_model

from conftest import blob_image, check_figure_kept_when_saving_fails



@pytest.fixture
def tiny_run(blob_run):
    return blob_run[1]


def test_gradcam_shape_range_and_focus(tiny_run):
    pred = load_model(tiny_run, jit_compile=False)
    img, msk = blob_image(160, seed=7, n=8)
    prob, cam = pred.explain_slice(img, tile=64, overlap=16)
    assert prob.shape == cam.shape == img.shape and cam.dtype == np.float32
    assert cam.min() >= 0 and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(prob, pred.predict_slice(img, tile=64, overlap=16), atol=1e-5)
    mask = prob >= 0.5
    inside = energy_inside(cam, mask)
    rng = np.random.default_rng(0)
    random_mask = np.zeros(mask.size, bool)
    random_mask[rng.choice(mask.size, mask.sum(), replace=False)] = True
    assert inside > energy_inside(cam, random_mask.reshape(mask.shape)) + 0.2
    # Explaining one region concentrates the map there; the bottleneck layer can be chosen by name.
    _, cam_region = pred.explain_slice(img, region=msk.astype(bool) & (np.arange(160)[None, :] < 80), tile=64,
                                       overlap=16)
    assert cam_region[:, :80].sum() > cam_region[:, 80:].sum()
    _, cam_b = pred.explain_slice(img, layer="bottleneck_conv2", tile=64, overlap=16)
    assert cam_b.shape == img.shape and 0 <= cam_b.min() and cam_b.max() <= 1
    with pytest.raises(GradCamError, match="not in the model.*dec1_conv2"):
        pred.explain_slice(img, layer="no_such_layer")


def test_analyze_cli_end_to_end(tiny_run, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    labels = tmp_path / "labels"
    labels.mkdir()
    for i in range(2):
        img, msk = blob_image(128, seed=20 + i)
        cv2.imwrite(str(inp / f"slice{i}.png"), img)
        tifffile.imwrite(labels / f"slice{i}.tif", msk)
    stack = np.stack([blob_image(96, seed=30 + z)[0] for z in range(2)])
    # An ImageJ stack with a 5 nm pixel size in its metadata.
    tifffile.imwrite(inp / "stack.tif", stack, imagej=True, resolution=(200.0, 200.0), metadata={"unit": "um"})
    tifffile.imwrite(labels / "stack.tif", np.stack([blob_image(96, seed=30 + z)[1] for z in range(2)]))
    (inp / "broken.png").write_bytes(b"not a png")
    tifffile.imwrite(labels / "broken.tif", np.zeros((8, 8), np.uint8))
    out = tmp_path / "out"
    rc = analyze_main([str(inp), "--model", str(tiny_run), "--labels", str(labels), "--out", str(out),
                       "--tile", "64", "--overlap", "16", "--faithfulness"])
    assert rc == 1  # broken.png failed, the others were analysed
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["image"]) == ["slice0", "slice1", "stack_z0000", "stack_z0001"]
    objects = pd.read_csv(out / "objects.csv")
    for name in summary["image"]:
        for f in OUTPUT_FILES:
            assert (out / name / f).is_file(), (name, f)
        inst = tifffile.imread(out / name / "instances.tif")
        mask = tifffile.imread(out / name / "mask.tif")
        heat = tifffile.imread(out / name / "gradcam.tif")
        prob = tifffile.imread(out / name / "probability.tif")
        assert inst.dtype in (np.uint16, np.uint32) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
        assert heat.dtype == prob.dtype == np.float32 and 0 <= heat.min() and heat.max() <= 1
        rows = objects[objects["image"] == name]
        count = int(summary.loc[summary["image"] == name, "count"].iloc[0])
        assert count == len(rows) == len(np.unique(inst)) - 1
        assert set(rows["shape_class"]) <= {"round", "elongated", "tubular", "fragmented", "irregular"}
        assert len(pd.read_csv(out / name / "morphometry.csv")) == count
    s0 = summary.set_index("image").loc["slice0"]
    assert 0.7 < s0["f1"] <= 1 and s0["gt_count"] >= 1 and np.isfinite(s0["deletion_ratio"])
    assert np.isnan(s0["pixel_size_nm"])  # PNG without --pixel-size: pixels only
    z0 = summary.set_index("image").loc["stack_z0000"]
    assert z0["pixel_size_nm"] == pytest.approx(5.0)
    zrows = objects[objects["image"] == "stack_z0000"]
    np.testing.assert_allclose(zrows["area_nm2"], zrows["area_px2"] * 25.0)
    # Nothing is overwritten without --overwrite.
    before = (out / "summary.csv").read_bytes()
    assert analyze_main([str(inp / "slice0.png"), "--model", str(tiny_run), "--out", str(out)]) == 2
    assert (out / "summary.csv").read_bytes() == before
    # --overwrite replaces one image's result; with another shape rule it would leave the other
    # rows classified the old way (tests/test_robustness.py: settings never mix in one table).
    again = [str(inp / "slice0.png"), "--model", str(tiny_run), "--out", str(out), "--overwrite", "--tile", "64",
             "--overlap", "16", "--no-figure", "--pixel-size", "5"]  # a pixel size is the input's, not a setting
    assert analyze_main(again + ["--rule", "round_max_aspect=2.0"]) == 2
    assert analyze_main(again) == 0
    assert pd.read_csv(out / "summary.csv")["image"].tolist()[0] == "slice0"


def test_analyze_errors(tiny_run, tmp_path, monkeypatch, capsys):
    import xmdl_tf.analyze as an

    img, _ = blob_image(64)
    cv2.imwrite(str(tmp_path / "a.png"), img)
    import xmdl_tf.pretrained as pretrained

    monkeypatch.setattr(pretrained, "default_model_path", lambda: None)
    assert analyze_main([str(tmp_path / "a.png"), "--out", str(tmp_path / "o")]) == 2
    assert "no default model is installed" in capsys.readouterr().err
    assert analyze_main([str(tmp_path / "missing.png"), "--model", str(tiny_run), "--out", str(tmp_path / "o2")]) == 1
    assert "missing.png" in capsys.readouterr().err
    monkeypatch.undo()
    monkeypatch.setenv("XMDL_MODEL", "nope")  # a lab default naming nothing is named as such
    assert analyze_main([str(tmp_path / "a.png"), "--out", str(tmp_path / "o3")]) == 2
    assert "$XMDL_MODEL=nope: no such model" in capsys.readouterr().err
    monkeypatch.delenv("XMDL_MODEL")
    with pytest.raises(SystemExit):
        analyze_main([str(tmp_path / "a.png"), "--model", str(tiny_run), "--rule", "bogus=1"])
    capsys.readouterr()
    # A rule's value, or its form, is named in one line (was "could not convert string to float").
    for rule, said in (("round_max_aspect=abc", "--rule round_max_aspect: 'abc' is not a number"),
                       ("round_max_aspect", "expected NAME=VALUE")):
        with pytest.raises(SystemExit):
            analyze_main([str(tmp_path / "a.png"), "--model", str(tiny_run), "--rule", rule])
        assert said in capsys.readouterr().err
    (tmp_path / "r.json").write_text("{bad")
    with pytest.raises(SystemExit):
        analyze_main([str(tmp_path / "a.png"), "--model", str(tiny_run), "--rules", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert "r.json: not a JSON object" in err and "Traceback" not in err
    # An array handed over directly (napari, the Python API): a constant one is refused as a file is,
    # not segmented into one image-sized "mitochondrion".
    from xmdl_tf.io import DataError
    from xmdl_tf.volume import analyze_volume

    predictor = load_model(tiny_run)
    with pytest.raises(DataError, match="blank: constant image"):
        an.analyze_image(predictor, np.zeros((64, 64), np.uint16), "blank")
    with pytest.raises(DataError, match="blank: constant volume"):
        analyze_volume(predictor, np.full((3, 64, 64), 9, np.uint8), "blank")


def test_analyze_real_slice(tiny_run, shared_data, tmp_path):
    x = shared_data / "drosophila_vnc_sstem" / "test" / "x" / "im0015.png"
    y = shared_data / "drosophila_vnc_sstem" / "test" / "y" / "seg0015.tif"
    out = tmp_path / "real"
    assert analyze_main([str(x), "--labels", str(y), "--model", str(tiny_run), "--pixel-size", "4.6",
                         "--out", str(out)]) == 0
    s = pd.read_csv(out / "summary.csv").iloc[0]
    assert s["pixel_size_nm"] == 4.6 and s["gt_count"] > 5
    assert (out / "im0015" / "figure.png").stat().st_size > 10_000


def test_analyze_says_once_when_it_assumes_the_models_pixel_size(tiny_run, tmp_path, capsys):
    """Images without a pixel size, for a model that has one: one note per run, naming the first
    such image; none once --pixel-size is given."""
    from dataclasses import replace

    from xmdl_tf.analyze import Settings, analyze
    from xmdl_tf.predict import load_model

    for i in range(2):
        cv2.imwrite(str(tmp_path / f"s{i}.png"), blob_image(64, seed=40 + i)[0])
    pred = load_model(tiny_run)
    pred.config = replace(pred.config, data=replace(pred.config.data, pixel_size_nm=5.0))
    inputs = [str(tmp_path / "s0.png"), str(tmp_path / "s1.png")]
    fast = {"tile": 64, "overlap": 16}
    res = analyze(inputs, pred, tmp_path / "o1", settings=Settings(inference=fast, figure=False))
    assert len(res["analysed"]) == 2
    err = capsys.readouterr().err
    assert err.count("states no pixel size") == 1 and "s0.png states no pixel size" in err and "5 nm" in err
    analyze(inputs, pred, tmp_path / "o2", settings=Settings(inference=fast, figure=False, pixel_size_nm=5.0))
    assert "states no pixel size" not in capsys.readouterr().err


def test_a_users_folder_named_like_a_result_is_never_replaced_and_a_killed_swap_keeps_the_old_result(
        tiny_run, tmp_path, capsys):
    # data/a.png analysed into data/: data/a/ is the user's own folder. --resume and --overwrite
    # replace OUT/<name> whole; they would have deleted it.
    img, _ = blob_image(64)
    data = tmp_path / "data"
    (data / "a").mkdir(parents=True)
    cv2.imwrite(str(data / "a.png"), img)
    (data / "a" / "notes.txt").write_text("mine")
    base = [str(data / "a.png"), "--model", str(tiny_run), "--no-figure", "--no-tta"]
    for flags in ([], ["--resume"], ["--overwrite"]):
        assert analyze_main(base + ["--out", str(data)] + flags) == 2
        err = capsys.readouterr().err
        assert "data/a: exists and is not a result of analyze (holds notes.txt)" in err and "Traceback" not in err
    assert sorted(p.name for p in data.iterdir()) == ["a", "a.png"] and (data / "a" / "notes.txt").is_file()
    # A kill between the two renames of the result swap leaves the old result aside only: the next
    # run puts it back (and --resume skips the image) instead of deleting it.
    out = tmp_path / "out"
    assert analyze_main(base + ["--out", str(out)]) == 0
    before = (out / "a" / "morphometry.csv").read_bytes()
    (out / "a").rename(out / ".a.replaced")
    assert analyze_main(base + ["--out", str(out), "--resume"]) == 0
    assert "1 image(s) already done" in capsys.readouterr().out
    assert (out / "a" / "morphometry.csv").read_bytes() == before and not (out / ".a.replaced").exists()
    (out / "a" / ".DS_Store").write_bytes(b"")  # what a file browser adds is no reason to keep the folder
    assert analyze_main(base + ["--out", str(out), "--overwrite"]) == 0


# ----------------------------------------------------------------------------
# The unified figure, drawn from synthetic arrays (no model)


def _figure_inputs(h, w, n=12, seed=0, review_every=0):
    rng = np.random.default_rng(seed)
    inst = np.zeros((h, w), np.uint16)
    for i in range(1, n + 1):
        cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
        inst[max(cy - 6, 0):cy + 6, max(cx - 9, 0):cx + 9] = i
    ids = np.unique(inst[inst > 0])
    classes = ("round", "elongated", "tubular", "fragmented", "irregular")
    table = pd.DataFrame({"id": ids, "shape_class": [classes[k % 5] for k in range(len(ids))],
                          "area_px2": 200.0, "aspect_ratio": 1.5, "solidity": 0.9, "circularity": 0.8,
                          "needs_review": [bool(review_every) and k % review_every == 0 for k in range(len(ids))]})
    image = (rng.normal(30000, 40, (h, w)) - 200 * (inst > 0)).astype(np.uint16)  # 16-bit, narrow grey range
    heat = (inst > 0).astype(np.float32)
    return image, inst, table, heat


def _draw(h, w, pixel_size_nm=5.0, **kw):
    import matplotlib.pyplot as plt

    from xmdl_tf.figure import draw_unified

    image, inst, table, heat = _figure_inputs(h, w, review_every=kw.pop("review_every", 0))
    table = kw.pop("table", table)
    fig, info = draw_unified(image, inst, table, heat, summary={"pixel_size_nm": pixel_size_nm, **kw.pop("summary", {})},
                             **kw)
    plt.close(fig)
    return fig, info


def test_scale_bar_lengths_and_labels():
    from xmdl_tf.figure import scale_bar

    assert scale_bar(1024, 5.0) == (200.0, "1 \u00b5m")
    assert scale_bar(1024, None) == (200.0, "200 px")
    assert scale_bar(64, 5.0) == (10.0, "50 nm")
    assert scale_bar(4096, 5.0) == (400.0, "2 \u00b5m")
    assert scale_bar(1000, 0.5) == (200.0, "100 nm")
    for width in (16, 64, 500, 1024, 3000, 4096, 20000):
        for px in (None, 0.37, 1.0, 5.0, 8.0, 30.0, 200.0):
            length, label = scale_bar(width, px)
            value, unit = label.split()
            nm = float(value) * {"nm": 1.0, "\u00b5m": 1000.0, "px": px or 1.0}[unit]
            assert nm / (px or 1.0) == pytest.approx(length)  # the label says the bar's true length
            assert value[0] in "125" and set(value[1:]) <= set("0.")  # 1, 2 or 5 x 10^k
            if width * 0.2 * (px or 1) >= (px or 1):
                assert 0.08 * width <= length <= 0.2 * width + 1e-9, (width, px, length)


def test_figure_scale_bar_drawn_at_its_length_after_display_downsampling():
    for (h, w), step in (((1024, 1024), 1), ((4096, 4096), 4), ((512, 4096), 4)):
        fig, info = _draw(h, w)
        assert info["step"] == step
        bar = [a for a in fig.axes[0].artists if a.get_gid() == "scale_bar"]
        assert len(bar) == 1
        drawn = bar[0].size_bar.get_children()[0].get_width()  # in the displayed image's pixels
        assert drawn * step == pytest.approx(info["scale_bar"][2])
        assert info["scale_bar"][1] == ("2 \u00b5m" if w == 4096 else "1 \u00b5m")
    _, info = _draw(1024, 1024, pixel_size_nm=None)
    assert info["scale_bar"][1] == "200 px"


def test_figure_legend_explains_review_marking_and_titles_every_panel():
    fig, info = _draw(512, 512, review_every=3, true_mask=np.zeros((512, 512), bool),
                      uncertainty=np.zeros((512, 512), np.float32))
    assert info["legend"][:5] == ["round (3)", "elongated (3)", "tubular (2)", "fragmented (2)", "irregular (2)"]
    assert info["legend"][5] == "needs review (4)"
    assert info["panels"][0] == "input" and info["panels"][1] == "true mask" and "needs review" in info["panels"][2]
    assert len(info["panels"]) == 5 and all(ax.get_title() for ax in fig.axes[:5])
    assert fig.axes[2].collections  # the review outlines
    _, info = _draw(512, 512)  # nothing flagged and no confidence model: no review entry
    assert len(info["legend"]) == 5 and info["panels"][1] == "predicted, by shape class"


def test_figure_classes_colours_told_apart_with_colour_blindness():
    from matplotlib.colors import to_rgb
    from skimage.color import rgb2lab

    from xmdl_tf.figure import CLASS_COLORS, CLASS_COLORS_3D

    sims = [np.eye(3),  # Machado et al. 2009, severity 1: protanopia, deuteranopia, tritanopia
            np.array([[0.152286, 1.052583, -0.204868], [0.114503, 0.786281, 0.099216], [-0.003882, -0.048116, 1.051998]]),
            np.array([[0.367322, 0.860646, -0.227968], [0.280085, 0.672501, 0.047413], [-0.011820, 0.042940, 0.968881]]),
            np.array([[1.255528, -0.076749, -0.178779], [-0.078411, 0.930809, 0.147602], [0.004733, 0.691367, 0.303900]])]
    for palette in (CLASS_COLORS, CLASS_COLORS_3D):
        rgb = np.array([to_rgb(c) for c in palette.values()])
        lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
        for m in sims:
            sim = np.clip(lin @ m.T, 0, 1)
            lab = rgb2lab(np.where(sim <= 0.0031308, 12.92 * sim, 1.055 * sim ** (1 / 2.4) - 0.055)[None])[0]
            dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
            assert dist[np.triu_indices(len(lab), 1)].min() > 12  # the old tab10 palette: 4.6 (protanopia)


def test_figure_panels_keep_their_shape_for_wide_tall_tiny_and_huge_slices():
    for h, w in ((1024, 1024), (512, 4096), (4096, 512), (64, 64), (4096, 4096), (1000, 1900)):
        fig, info = _draw(h, w, uncertainty=np.zeros((h, w), np.float32), true_mask=np.zeros((h, w), bool))
        fw, fh = info["size"]
        assert fw * 100 <= 2400 and fh * 100 <= 1800, (h, w, info["size"])  # pixels at 100 dpi
        for ax in fig.axes[:5]:
            bw, bh = ax.get_position().width * fw, ax.get_position().height * fh
            assert bw / bh == pytest.approx(w / h, rel=0.02)
            assert min(bw, bh) >= 0.8, (h, w, bw, bh)  # no strip


def test_figure_edge_cases_zero_one_many_objects_and_huge_ids(tmp_path):
    from xmdl_tf.figure import _class_rgba, unified_figure

    image, inst, table, heat = _figure_inputs(256, 256, n=0)
    assert len(table) == 0
    unified_figure(image, inst, table, heat, tmp_path / "zero.png", summary={})
    image, inst, table, heat = _figure_inputs(1024, 1024, n=2000)
    unified_figure(image, inst, table, heat, tmp_path / "many.png", summary={"pixel_size_nm": 5.0})
    big = np.zeros((64, 64), np.uint64)
    big[10:20, 10:20] = 2 ** 40  # ids are not indices: no 2**40-row colour table
    rgba = _class_rgba(big, {2 ** 40: "round"})
    assert rgba.shape == (64, 64, 4) and rgba[15, 15, 3] > 0 and rgba[0, 0, 3] == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.png", "zero.png"]


def test_figure_written_atomically_and_closed_when_drawing_fails(tmp_path, monkeypatch):
    from xmdl_tf.figure import unified_figure

    image, inst, table, heat = _figure_inputs(128, 128)
    out = check_figure_kept_when_saving_fails(lambda out: unified_figure(image, inst, table, heat, out), tmp_path,
                                              monkeypatch, "xmdl_tf.figure._class_rgba")
    unified_figure(image, inst, table, heat, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["figure.png"]


def test_a_padded_section_is_segmented_as_the_section(tiny_run):
    """A section set into a black canvas (registration, rotation): the padding is left out of the
    normalisation and predicted 0, so the section's objects are those of the section alone, and an
    object cut by the padding is marked as touching the border."""
    from xmdl_tf.analyze import Settings, analyze_image
    from xmdl_tf.sampling import padding_mask

    pred = load_model(tiny_run, jit_compile=False)
    img, _ = blob_image(128, seed=5)
    img = np.clip(img.astype(int), 30, 255).astype(np.uint8)  # tissue never reaches 0
    canvas = np.zeros((256, 256), np.uint8)
    canvas[64:192, 48:176] = img
    assert padding_mask(img) is None and padding_mask(canvas).sum() == 256 * 256 - 128 * 128
    s = Settings(inference={"tile": 64, "overlap": 16, "tta": False, "zoom_search": "off"}, figure=False)
    alone, padded = analyze_image(pred, img, "a", s), analyze_image(pred, canvas, "p", s)
    assert padded.summary["padding_fraction"] == pytest.approx(0.75)
    assert (padded.probability[canvas == 0] == 0).all()
    inner = padded.probability[64:192, 48:176]
    assert np.mean((inner >= 0.5) == (alone.probability >= 0.5)) > 0.98
    assert padded.summary["count"] == alone.summary["count"]
    # The section's edge is the image's: an object reaching it is marked as cut there.
    import cv2

    near = cv2.dilate((canvas == 0).astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
    cut = set(np.unique(padded.instances[near])) - {0}
    marked = set(padded.table.loc[padded.table["touches_border"], "id"])
    assert cut == marked and padded.summary["n_touching_border"] == len(cut)


def test_isolated_saturated_pixels_on_the_edge_are_no_padding():
    from xmdl_tf.sampling import padding_mask

    image = blob_image(64, seed=3)[0]
    image[::9, ::7] = 255  # hot pixels, some on the edge rows and columns
    image[4::11, 3::5] = 0
    assert padding_mask(image) is None
    image[:, :6] = 0  # a real margin: 6 columns of exactly the minimum
    assert padding_mask(image)[:, :6].all() and padding_mask(image).sum() == 64 * 6
