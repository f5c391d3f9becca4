"""3-D: instances linked across slices, MitoEM-style scores, and `analyze` / `evaluate --volume` end to end."""
import json
import tracemalloc

import numpy as np
import pandas as pd
import pytest
import tifffile

from xmdl_tf.instances import average_precision
from xmdl_tf.instances3d import min_volume_vox, volume_instances
from xmdl_tf.volume import ground_truth_instances_3d, parse_planes, score_volume

from conftest import check_figure_kept_when_saving_fails


def _ball(shape, centre, radius_nm, voxel=(1.0, 1.0, 1.0)):
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    return sum(((g - c) * v) ** 2 for g, c, v in zip((z, y, x), centre, voxel)) <= radius_nm**2


# ----------------------------------------------------------------------------
# 3-D instances


def test_tube_across_30_slices_is_one_object():
    z, y, x = np.mgrid[:40, :48, :48]
    # A tube that drifts in y and x as it crosses the slices, so no single column links them.
    tube = ((y - (12 + 0.6 * z)) ** 2 + (x - (10 + 0.4 * z)) ** 2 <= 25) & (z >= 5) & (z < 35)
    labels = volume_instances(tube, (10.0, 10.0, 10.0))
    assert labels.max() == 1
    assert set(np.unique(labels[tube])) == {1}
    assert np.ptp(np.nonzero(labels)[0]) == 29  # one id through all 30 slices


@pytest.mark.parametrize("voxel", [(10.0, 10.0, 10.0), (30.0, 10.0, 10.0)])
def test_two_touching_spheres_are_two(voxel):
    shape = (int(round(700 / voxel[0])), 60, 80)
    cz = shape[0] // 2
    a = _ball(shape, (cz, 30, 22), 150, voxel)
    b = _ball(shape, (cz, 30, 53), 150, voxel)  # centres 310 nm apart: face to face
    assert (a & b).sum() == 0 and volume_instances(a | b, voxel, separate=False).max() == 1
    labels = volume_instances(a | b, voxel)
    assert labels.max() == 2
    for ball in (a, b):  # each sphere is (almost all) one id
        ids, counts = np.unique(labels[ball], return_counts=True)
        assert counts.max() / ball.sum() > 0.95


def test_anisotropic_neck_is_judged_in_nm():
    # Two 45 nm-thick sections of two bodies 4.6 nm pixels: the same geometry in nm gives
    # the same split whatever the voxel size, i.e. the rule does not see voxels as cubes.
    voxel = (45.0, 4.6, 4.6)
    shape = (16, 120, 200)
    a = _ball(shape, (8, 60, 60), 240, voxel)
    b = _ball(shape, (8, 60, 140), 240, voxel)
    bridge = np.zeros(shape, bool)
    bridge[7:9, 58:62, 60:140] = True  # a thin neck between them
    labels = volume_instances(a | b | bridge, voxel)
    assert labels.max() == 2
    # A long ellipsoid (a tube-like body) is not cut anywhere.
    z, y, x = np.ogrid[:16, :120, :200]
    ell = ((z - 8) * 45 / 300) ** 2 + ((y - 60) * 4.6 / 150) ** 2 + ((x - 100) * 4.6 / 420) ** 2 <= 1
    assert volume_instances(ell, voxel).max() == 1


def test_one_slice_stack_and_min_volume():
    img = np.zeros((1, 40, 40), np.float32)
    img[0, 5:15, 5:15] = 0.9
    img[0, 30:32, 30:32] = 0.9  # 4 voxels
    assert volume_instances(img, (10, 5, 5)).max() == 2
    keep = min_volume_vox(5 * 10 * 5 * 5, (10, 5, 5))
    assert keep == 5
    assert volume_instances(img, (10, 5, 5), min_size_vox=keep).max() == 1
    with pytest.raises(ValueError, match="3-D"):
        volume_instances(img[0])
    with pytest.raises(ValueError, match="voxel_size_nm"):
        volume_instances(img, (10, 5))


def test_cavity_is_filled_but_objects_in_it_kept():
    shape = (30, 30, 30)
    shell = _ball(shape, (15, 15, 15), 12) & ~_ball(shape, (15, 15, 15), 8)
    inner = _ball(shape, (15, 15, 15), 3)
    labels = volume_instances(shell | inner, separate=False)
    assert labels.max() == 2
    assert (labels > 0).sum() == (shell | _ball(shape, (15, 15, 15), 8)).sum()  # cavity filled...
    assert len(np.unique(labels[inner])) == 1 and labels[inner][0] != labels[shell][0]  # ...around the inner one


def test_memory_stays_below_a_float64_copy():
    # 16 M voxels of a volume with many objects: the labelling must never hold a
    # float64 (8 bytes / voxel) or int64 copy of it.
    rng = np.random.default_rng(0)
    shape = (64, 512, 512)
    mask = np.zeros(shape, bool)
    for _ in range(150):
        c = rng.integers((12, 12, 12), (52, 500, 500))
        r = rng.integers(4, 11)
        sl = tuple(slice(ci - r, ci + r + 1) for ci in c)
        zz, yy, xx = np.ogrid[-r : r + 1, -r : r + 1, -r : r + 1]
        mask[sl] |= zz**2 + yy**2 + xx**2 <= r * r
    tracemalloc.start()
    try:
        labels = volume_instances(mask, (8.0, 8.0, 8.0))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert labels.dtype == np.uint16 and labels.max() >= 100
    assert peak < 8 * mask.size, f"peak {peak / mask.size:.2f} bytes per voxel"


# ----------------------------------------------------------------------------
# Scores


def test_average_precision_hand_computed():
    true = np.zeros((2, 20, 20), int)
    true[:, 0:4, 0:4] = 1
    true[:, 10:14, 10:14] = 2
    true[:, 0:2, 15:20] = 3
    pred = np.zeros_like(true)
    pred[:, 0:4, 0:4] = 1  # exact (32 voxels)
    pred[:, 10:14, 10:13] = 2  # IoU 24/32 = 0.75 exactly
    pred[:, 5:9, 0:9] = 3  # false positive, the largest (72 voxels): ranked first by size
    ap = average_precision(pred, true)
    # Ranked: FP, TP(1), TP(2) at 0.5 -> precision 0, 1/2, 2/3 at recall 0, 1/3, 2/3;
    # interpolated precision 2/3 for recall <= 2/3 (67 of the 101 points), 0 beyond.
    assert ap["ap50"] == pytest.approx(67 * (2 / 3) / 101)
    # At 0.75 object 2 (IoU exactly 0.75) still counts; raise it just above and it does not.
    assert ap["ap75"] == pytest.approx(ap["ap50"])
    ap_hi = average_precision(pred, true, (0.76,))
    assert ap_hi["ap76"] == pytest.approx(34 * 0.5 / 101)  # one TP at rank 2: precision 1/2 up to recall 1/3
    # Scores reorder the ranking: the false positive last.
    ap_sc = average_precision(pred, true, (0.5,), scores={1: 0.9, 2: 0.8, 3: 0.1})
    assert ap_sc["ap50"] == pytest.approx(67 / 101)
    assert np.isnan(average_precision(pred, np.zeros_like(true))["ap50"])


def test_score_volume_hand_computed():
    label = np.zeros((3, 10, 10), np.uint8)
    label[:, 1:5, 1:5] = 1  # one object through 3 slices (binary label -> 3-D components)
    label[1, 7:9, 7:9] = 1
    prob = np.zeros(label.shape, np.float32)
    prob[:, 1:5, 1:5] = 0.9
    prob[0, 7:9, 1:3] = 0.8  # a false positive
    inst = volume_instances(prob, min_size_vox=0)
    s = score_volume(prob, inst, label, 0.5)
    assert (s["tp"], s["fp"], s["fn"]) == (48, 4, 4)
    assert s["f1"] == pytest.approx(96 / 104)
    assert (s["count"], s["gt_count"], s["count_error"]) == (2, 2, 0)
    assert s["instance_f1_iou50"] == pytest.approx(0.5)
    # Ranked by size: the TP first (48 voxels) then the FP: precision 1 up to recall 1/2.
    assert s["ap50"] == pytest.approx(51 / 101)
    ids = ground_truth_instances_3d(np.where(label > 0, np.arange(label.size).reshape(label.shape) % 2 + 1, 0))
    assert ids.max() == 2  # instance ids are kept as they are
    # A 0/1 mask whose unlabelled voxels are 255: the mask's two objects, not one (255 is no id).
    masked = label.copy()
    masked[2, 8:, :] = 255
    ids = ground_truth_instances_3d(masked, ignore_value=255)
    assert ids.max() == 2 and (ids[masked == 255] == 0).all()
    assert score_volume(prob, inst, masked, 0.5, ignore_value=255)["gt_count"] == 2


def test_parse_planes():
    assert parse_planes("xy,yz,xz") == ("xy", "xz", "yz")
    for bad in ("xz", "xy,ab", ""):
        with pytest.raises(Exception):
            parse_planes(bad)


# ----------------------------------------------------------------------------
# The pipeline, with the suite's tiny model (trained on dark discs)


def blob_volume(shape=(24, 96, 96), seed=0, n=5):
    """Dark balls on a bright textured background: (uint8 (Z, Y, X), uint16 ids)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[: shape[0], : shape[1], : shape[2]]
    ids = np.zeros(shape, np.uint16)
    k = 0
    while k < n:
        r = int(rng.integers(7, 11))
        c = rng.integers((r, r, r), (shape[0] - r, shape[1] - r, shape[2] - r))
        ball = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= r * r
        grown = (z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 <= (r + 4) ** 2
        if (ids[grown] > 0).any():
            continue
        k += 1
        ids[ball] = k
    background = 170 + 25 * np.sin(x / 5.0) * np.cos(y / 7.0) + rng.normal(0, 12, shape)
    image = np.where(ids > 0, 70 + rng.normal(0, 12, shape), background)
    return np.clip(image, 0, 255).astype(np.uint8), ids


@pytest.fixture
def tiny_run(blob_run):
    return blob_run[1]


def _write_stack(path, arr, voxel=None):
    from xmdl_tf.volume_io import write_volume_tiff

    write_volume_tiff(path, arr, voxel)
    return path


def test_analyze_volume_end_to_end(tiny_run, tmp_path):
    from xmdl_tf.analyze import main
    from xmdl_tf.volume_io import open_volume

    image, ids = blob_volume()
    stack = _write_stack(tmp_path / "stack.tif", image, (20.0, 10.0, 10.0))
    labels = _write_stack(tmp_path / "labels.tif", ids)
    out = tmp_path / "out"
    args = [str(stack), "--volume", "--model", str(tiny_run), "--out", str(out), "--labels", str(labels),
            "--tile", "64", "--overlap", "16", "--meshes", "ply"]
    assert main(args) == 0
    folder = out / "stack"
    for f in ("probability.tif", "mask.tif", "instances.tif", "gradcam.tif", "objects.csv", "figure.png", "meshes.ply"):
        assert (folder / f).is_file(), f
    inst = open_volume(folder / "instances.tif", kind="label")
    assert inst.shape == image.shape and inst.voxel_size_nm == pytest.approx((20.0, 10.0, 10.0))
    assert tifffile.imread(folder / "instances.tif").dtype in (np.uint16, np.uint32)
    summary = pd.read_csv(out / "summary.csv")
    objects = pd.read_csv(out / "objects.csv")
    assert len(summary) == 1 and summary.loc[0, "volume"] == "stack"
    # Each ball is one 3-D object through all its slices (the tiny model adds a few small false
    # positives, ranked last by size, so AP50 stays high).
    assert summary.loc[0, "count"] == len(objects) and summary.loc[0, "gt_count"] == ids.max()
    assert summary.loc[0, "instance_recall_iou50"] == 1.0 and summary.loc[0, "ap50"] >= 0.9
    found = tifffile.imread(folder / "instances.tif")
    for k in range(1, ids.max() + 1):
        hit, n = np.unique(found[ids == k], return_counts=True)
        assert n[hit > 0].max() > 0.8 * (ids == k).sum()
        best = objects.set_index("id").loc[hit[hit > 0][np.argmax(n[hit > 0])]]
        assert best["z_extent_slices"] >= np.ptp(np.nonzero(ids == k)[0]) - 1
        assert best["volume_nm3"] == pytest.approx((found == best.name).sum() * 2000.0)
    # Existing results are not overwritten silently; --resume skips the finished volume.
    assert main(args) == 2
    assert main(args + ["--resume"]) == 0
    assert main(args + ["--resume", "--threshold", "0.9"]) == 2  # its rows were made with another threshold


def test_a_blank_section_is_named(tiny_run):
    """A missing section (one grey value) cuts every object through it: the user is told which."""
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import VolumeSettings, analyze_volume

    image, _ = blob_volume((24, 64, 64), n=2)
    image[5] = 0
    settings = VolumeSettings(inference={"tile": 64, "overlap": 16}, figure=False)
    import warnings

    # Said before any slice is predicted (the warning, raised here as an error, stops the run there).
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(UserWarning, match=r"v: slice\(s\) 5 \(from 0\) hold a single grey value"):
            analyze_volume(load_model(tiny_run, jit_compile=False), image, "v", settings)


def test_analyze_volume_bad_inputs(tiny_run, tmp_path, capsys):
    from xmdl_tf.analyze import main

    image, ids = blob_volume((24, 64, 64), n=2)
    stack = _write_stack(tmp_path / "stack.tif", image)
    wrong = _write_stack(tmp_path / "wrong.tif", ids[:5])
    flat = tmp_path / "flat.tif"
    tifffile.imwrite(flat, image[0])
    base = ["--volume", "--model", str(tiny_run), "--tile", "64"]
    cases = [
        ([str(stack), "--labels", str(wrong), "--out", str(tmp_path / "a")], "label"),
        ([str(flat), "--out", str(tmp_path / "b")], "2-D"),
        ([str(stack), "--voxel-size", "10", "10", "--out", str(tmp_path / "c")], "voxel-size"),
        ([str(stack), "--pixel-size", "5", "--out", str(tmp_path / "d")], "--voxel-size"),
        ([str(stack), "--planes", "xy,xz", "--voxel-size", "40", "5", "5", "--out", str(tmp_path / "e")], "isotropic"),
        ([str(stack), "--planes", "xy,xz", "--out", str(tmp_path / "f")], "voxel size is unknown"),
    ]
    for argv, needle in cases:
        capsys.readouterr()
        try:
            rc = main(argv + base)
        except SystemExit as err:
            rc = err.code
        err = capsys.readouterr().err
        assert rc != 0, argv
        assert needle in err and "Traceback" not in err, (argv, err)
    assert not any((tmp_path / d).exists() for d in "acdef")  # nothing written for bad input
    # An output folder OUT/<stem> that is the input itself (a slice folder analysed into its parent) or
    # holds it would be replaced on --resume/--overwrite: refused, the slices kept.
    import cv2

    folder = tmp_path / "res" / "slices"
    folder.mkdir(parents=True)
    for z in range(4):
        cv2.imwrite(str(folder / f"im{z:04d}.png"), image[z])
    for flags in ([], ["--resume"], ["--overwrite"]):
        assert main([str(folder), "--out", str(tmp_path / "res"), *flags, *base]) == 2
        assert "would replace the input" in capsys.readouterr().err
    assert len(list(folder.iterdir())) == 4
    with pytest.raises(SystemExit):
        main([str(stack), "--voxel-size", "5", "5", "5", "--model", str(tiny_run)])  # needs --volume


def test_evaluate_volume_matches_a_hand_computed_case(tiny_run, tmp_path):
    import cv2

    from xmdl_tf.evaluate import evaluate_volume

    image, ids = blob_volume((24, 96, 96), seed=3, n=4)
    root = tmp_path / "set"
    for d in ("x", "y"):
        (root / "test" / d).mkdir(parents=True)
    for z in range(len(image)):
        cv2.imwrite(str(root / "test" / "x" / f"im{z:04d}.png"), image[z])
        tifffile.imwrite(root / "test" / "y" / f"seg{z:04d}.tif", (ids[z] > 0).astype(np.uint8))
    r = evaluate_volume(tiny_run, str(root), "test", tmp_path / "ev", tile=64, overlap=16, min_volume_vox=50)
    assert r["n_slices"] == 24 and r["gt_count"] == 4
    assert r["f1"] > 0.8 and r["ap50"] > 0.5
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["ap50"] == pytest.approx(r["ap50"]) and saved["split"] == "test"
    # The same scores from the written probability through score_volume directly.
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import predict_volume

    pred = load_model(tiny_run, jit_compile=False)
    from xmdl_tf.config import resolve_inference

    ic = resolve_inference(pred, {"tile": 64, "overlap": 16, "min_volume_vox": 50})
    prob, _ = predict_volume(pred, image, ic, gradcam=False)
    direct = score_volume(prob, volume_instances(prob, None, ic.threshold, 50), (ids > 0).astype(np.uint8), 0.5)
    assert direct["f1"] == pytest.approx(r["f1"]) and direct["ap50"] == pytest.approx(r["ap50"])
    assert r["voxel_size_nm"] is None
    # A converted set of every 2nd 30-nm section: dataset.json gives the voxel size, z = 2 x 30 nm.
    (root / "dataset.json").write_text(json.dumps({"pixel_size_nm": 8.0, "section_thickness_nm": 30.0, "z_step": 2}))
    r = evaluate_volume(pred, str(root), "test", None, tile=64, overlap=16, min_volume_vox=50)
    assert r["voxel_size_nm"] == [60.0, 8.0, 8.0] and r["voxel_size_from"] == "dataset.json"
    with pytest.warns(UserWarning, match="2 sections apart"):  # a --voxel-size that says otherwise is warned about
        r = evaluate_volume(pred, str(root), "test", None, voxel_size_nm=(30, 8, 8), tile=64, overlap=16,
                            min_volume_vox=50)
    assert r["voxel_size_nm"] == [30.0, 8.0, 8.0] and r["voxel_size_from"] == "--voxel-size"


@pytest.mark.parametrize("voxel", [(10.0, 10.0, 10.0), (30.0, 10.0, 10.0)])
def test_shape_classes_recovered_through_3d_separation(voxel):
    # The synthetic volume's mask (touching objects included) -> volume_instances -> measure3d
    # -> classify3d: >= 90% of the drawn objects come back as one object of their class.
    from data_prep.synthetic3d import generate_volume, touching_pairs
    from xmdl_tf.morphometry3d import classify3d, measure3d

    ok = total = touching = 0
    for seed in (1, 2):
        g = generate_volume(shape=(int(480 / voxel[0]), 256, 256), seed=seed, voxel_size_nm=voxel)
        truth = g["instances"]
        touching += len(touching_pairs(truth))
        found = volume_instances(truth > 0, voxel)
        table = measure3d(found, voxel)
        cls = dict(zip(table["id"].astype(int), classify3d(table)))
        for k, c in g["classes"].items():
            ids, n = np.unique(found[truth == k], return_counts=True)
            j = ids[np.argmax(n)]
            iou = n.max() / np.count_nonzero((found == j) | (truth == k))
            ok += j > 0 and iou >= 0.5 and cls.get(int(j)) == c
            total += 1
    assert touching > 0  # the separation had something to split
    assert ok / total >= 0.9, f"{ok}/{total}"


def test_analyze_one_slice_stack(tiny_run, tmp_path):
    from xmdl_tf.analyze import main

    image, _ = blob_volume((24, 96, 96), seed=5, n=3)
    stack = _write_stack(tmp_path / "one.tif", image[12:13], (30.0, 10.0, 10.0))
    assert main([str(stack), "--volume", "--model", str(tiny_run), "--out", str(tmp_path / "o"), "--tile", "64",
                 "--min-volume", "0"]) == 0
    objects = pd.read_csv(tmp_path / "o" / "objects.csv")
    assert len(objects) >= 1 and (objects["z_extent_slices"] == 1).all()
    assert np.isfinite(objects["volume_nm3"]).all() and np.isfinite(objects["surface_area_nm2"]).all()


def test_pieces_joined_by_a_corner_stay_with_their_object():
    # Two bodies (a neck between them) and a small piece touching one of them only by a
    # corner: the watershed floods face neighbours, so the piece must still get an id
    # (it used to take the previous object's id in memory, and none in chunks).
    vol = np.zeros((12, 40, 60), bool)
    vol |= _ball(vol.shape, (6, 20, 15), 9)
    vol |= _ball(vol.shape, (6, 20, 42), 9)
    vol[5:7, 19:21, 15:42] = True
    vol[6, 20, 52] = False
    vol[7, 21, 52] = True  # corner contact with the second ball's surface voxel below
    vol[7, 21, 53] = True
    labels = volume_instances(vol, (10.0, 10.0, 10.0))
    assert (labels[vol] > 0).all()
    assert labels.max() == 2
    assert labels[7, 21, 52] == labels[7, 21, 53] == labels[6, 20, 51] != labels[6, 20, 15]


def test_a_set_of_every_nth_section_warns_about_the_z_voxel_size(tmp_path):
    from xmdl_tf.evaluate import _warn_z_step

    (tmp_path / "dataset.json").write_text(json.dumps({"z_step": 3, "section_thickness_nm": 30.0}))
    with pytest.warns(UserWarning, match=r"3 sections apart .* \(90 nm\); --voxel-size gives z = 30 nm"):
        _warn_z_step(tmp_path, (30.0, 8.0, 8.0))
    (tmp_path / "dataset.json").write_text(json.dumps({"z_step": 1}))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _warn_z_step(tmp_path, None)


def test_resume_or_overwrite_never_replaces_a_folder_it_did_not_write(tiny_run, tmp_path, capsys):
    # data/stack.tif analysed into data/: OUT/stack is the user's folder of the same slices. --resume
    # and --overwrite replace OUT/<stem> whole; they used to delete it.
    import cv2

    from xmdl_tf.analyze import main

    image, _ = blob_volume((24, 64, 64), n=1)
    data = tmp_path / "data"
    (data / "stack").mkdir(parents=True)
    _write_stack(data / "stack.tif", image[:4])
    for z in range(3):
        cv2.imwrite(str(data / "stack" / f"im{z}.png"), image[z])
    base = [str(data / "stack.tif"), "--volume", "--model", str(tiny_run), "--tile", "64", "--no-figure"]
    for flags in ([], ["--resume"], ["--overwrite"]):
        assert main(base + ["--out", str(data)] + flags) == 2
        err = capsys.readouterr().err
        assert "is not a result of analyze (holds im0.png and 2 more)" in err and "Traceback" not in err
    assert sorted(p.name for p in (data / "stack").iterdir()) == ["im0.png", "im1.png", "im2.png"]
    assert sorted(p.name for p in data.iterdir()) == ["stack", "stack.tif"]
    # Its own earlier result is replaced on --overwrite as before.
    out = tmp_path / "out"
    assert main(base + ["--out", str(out)]) == 0
    assert main(base + ["--out", str(out), "--overwrite"]) == 0


def test_a_run_killed_while_swapping_a_result_in_keeps_the_old_one(tiny_run, tmp_path):
    # atomic_replace_dir renames OUT/<stem> to .<stem>.replaced, then the new folder into place: a kill
    # between the two leaves only the old result, aside. The next run must put it back, not delete it.
    from xmdl_tf.predict import load_model
    from xmdl_tf.volume import VolumeSettings, analyze_volumes

    image, _ = blob_volume((24, 64, 64), n=1)
    stack = _write_stack(tmp_path / "stack.tif", image[:4], (20.0, 10.0, 10.0))
    out = tmp_path / "out"
    model = load_model(tiny_run, jit_compile=False)
    settings = VolumeSettings(inference={"tile": 64}, figure=False)
    assert analyze_volumes([str(stack)], model, out, settings=settings, verbose=False)["analysed"] == ["stack"]
    before = (out / "stack" / "objects.csv").read_bytes()
    (out / "stack").rename(out / ".stack.replaced")
    r = analyze_volumes([str(stack)], model, out, settings=settings, resume=True, verbose=False)
    assert r["skipped"] == ["stack"] and r["analysed"] == []
    assert (out / "stack" / "objects.csv").read_bytes() == before and not (out / ".stack.replaced").exists()


# ----------------------------------------------------------------------------
# The volume figure, drawn from synthetic arrays (no model)


def _volume_figure_inputs(shape, n=12, seed=0, size=(3, 9, 13), id_offset=0):
    """Cuboid objects and a table with the `measure3d` columns the figure reads."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    ids = np.zeros(shape, np.uint64 if id_offset else np.uint16)
    for k in range(1, n + 1):
        c = [int(rng.integers(0, s)) for s in shape]
        ids[tuple(slice(max(p - h // 2, 0), p + h - h // 2) for p, h in zip(c, size))] = id_offset + k
    rows = []
    compact = np.unique(ids, return_inverse=True)[1].reshape(shape)
    for index, box in enumerate(ndi.find_objects(compact)):
        if box is None:
            continue
        where = np.nonzero(compact[box] == index + 1)
        row = {"id": int(ids[box][where][0]), "volume_vox": len(where[0])}
        for a, sl, w in zip("zyx", box, where):
            row.update({f"centroid_{a}_vox": sl.start + w.mean(), f"bbox_{a}0": sl.start, f"bbox_{a}1": sl.stop})
        rows.append(row)
    classes = ("globular", "elongated", "tubular", "branched", "fragmented")
    table = pd.DataFrame(rows, columns=["id", "volume_vox"] + [f"{c}_{a}{s}" for a in "zyx"
                                                                for c, s in (("centroid", "_vox"), ("bbox", "0"),
                                                                             ("bbox", "1"))])
    table["shape_class"] = [classes[k % 5] for k in range(len(table))]
    image = (rng.normal(30000, 40, shape) - 200 * (ids > 0)).astype(np.uint16)
    return image, ids, table


def _draw_volume(shape, voxel=(30.0, 8.0, 8.0), **kw):
    import matplotlib.pyplot as plt

    from xmdl_tf.figure import draw_volume

    image, ids, table = _volume_figure_inputs(shape, **{k: kw.pop(k) for k in ("n", "size", "id_offset") if k in kw})
    fig, info = draw_volume(image, ids, table, voxel, **kw)
    plt.close(fig)
    return fig, info, table


def _box(info, key):
    pos, (fw, fh) = info["axes"][key].get_position(), info["size"]
    return pos.width * fw, pos.height * fh


def test_volume_figure_scale_bars_in_nm_um_or_voxels_and_along_z():
    from xmdl_tf.figure import scale_bar

    _, info, _ = _draw_volume((16, 256, 256))
    bars = info["scale_bars"]
    assert bars["XY"] == (25.0, "200 nm", 25.0) and bars["XZ"] == bars["XY"]  # x: same scale in both
    assert bars["YZ"][1] == "z: 50 nm"
    # along z the bar is in slices of the physical z size, drawn with the stretch
    assert bars["YZ"][2] == pytest.approx(50 / 30) and bars["YZ"][0] >= bars["YZ"][2]
    fig, info, _ = _draw_volume((8, 128, 2048))  # wide: shown downsampled in x, never in z
    length, label = scale_bar(2048, 8.0)
    assert info["scale_bars"]["XY"] == (length / 2, label, length) and label == "2 \u00b5m"
    drawn = [a for a in info["axes"]["XY"].artists if a.get_gid() == "scale_bar"][0]
    assert drawn.size_bar.get_children()[0].get_width() * 2 == pytest.approx(length)
    _, info, _ = _draw_volume((16, 256, 256), voxel=None)
    assert info["scale_bars"]["XY"][1] == "50 px" and info["scale_bars"]["YZ"][1].endswith("slices")


@pytest.mark.parametrize("shape, voxel", [((16, 256, 256), (30.0, 8.0, 8.0)), ((16, 256, 256), (40.0, 5.0, 5.0)),
                                          ((16, 256, 256), None), ((8, 128, 2048), (30.0, 8.0, 8.0)),
                                          ((8, 2048, 128), (30.0, 8.0, 8.0)), ((200, 128, 128), (8.0, 8.0, 8.0)),
                                          ((2, 256, 256), (30.0, 8.0, 8.0))])
def test_volume_figure_views_at_one_physical_scale_and_z_stretch_stated(shape, voxel):
    fig, info, _ = _draw_volume(shape, voxel)
    nz, ny, nx = shape
    vz, vy, vx = voxel or (1.0, 1.0, 1.0)
    zx = info["z_stretch"]
    (xy_w, xy_h), (xz_w, xz_h), (yz_w, yz_h) = (_box(info, k) for k in ("XY", "XZ", "YZ"))
    assert xy_w / xy_h == pytest.approx(nx * vx / (ny * vy), rel=0.02)
    assert xz_w == pytest.approx(xy_w, rel=1e-3) and yz_h == pytest.approx(xy_h, rel=1e-3)  # shared axes
    assert xz_h / xz_w == pytest.approx(nz * vz * zx / (nx * vx), rel=0.02)
    assert yz_w / yz_h == pytest.approx(nz * vz * zx / (ny * vy), rel=0.02)
    assert min(xy_w, xy_h, xz_h, yz_w) >= 0.1 and info["size"][0] <= 17 and info["size"][1] <= 18
    said = "to scale" if zx == 1 else f"stretched \u00d7{zx:.3g}"
    assert all(said in t for t in info["panels"][1:]), info["panels"]
    if voxel == (40.0, 5.0, 5.0):  # strongly anisotropic but deep enough: z drawn at its physical size
        assert zx == 1
    elif nz <= 16:  # a shallow stack: z enlarged to a quarter of the smaller side at least
        assert zx > 1 and nz * vz * zx >= 0.25 * min(ny * vy, nx * vx) - 1e-6
    titles = [ax.get_title() for ax in fig.axes[:3]]
    assert all(titles) and titles[0].startswith("XY at z =")


def test_volume_figure_legend_counts_and_edge_cases(tmp_path):
    from xmdl_tf.figure import volume_figure

    _, info, table = _draw_volume((16, 256, 256), n=12)
    counts = table["shape_class"].value_counts()
    assert info["legend"] == [f"{c} ({counts.get(c, 0)})" for c in ("globular", "elongated", "tubular", "branched",
                                                                      "fragmented")]
    _, info, _ = _draw_volume((1, 256, 256))  # one slice: the XY view only, said so
    assert list(info["axes"]) == ["XY"] and "none for a one-slice stack" in info["panels"][-1]
    _, info, _ = _draw_volume((16, 256, 256), n=0)
    assert info["legend"][0] == "globular (0)" and "no objects" in info["panels"][-1]
    _, info, table = _draw_volume((8, 256, 256), n=2000, size=(1, 2, 2))
    assert len(table) > 1000 and f"80 largest of {len(table)}" in info["panels"][-1]
    _, info, _ = _draw_volume((16, 128, 128), n=5, id_offset=2 ** 40)  # ids are not indices: no 2**40 list
    image, ids, table = _volume_figure_inputs((4, 64, 64), n=3)
    volume_figure(image, ids, table, tmp_path / "figure.png", voxel_size_nm=(30.0, 8.0, 8.0), title="t")
    assert (tmp_path / "figure.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_volume_figure_written_atomically_and_closed_when_drawing_fails(tmp_path, monkeypatch):
    from xmdl_tf.figure import volume_figure

    image, ids, table = _volume_figure_inputs((4, 64, 64), n=3)
    check_figure_kept_when_saving_fails(lambda out: volume_figure(image, ids, table, out), tmp_path, monkeypatch,
                                        "xmdl_tf.morphometry3d.object_mesh")
