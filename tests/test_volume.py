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

# The pipeline tests share the session-trained tiny model (conftest.blob_run).
pytestmark = pytest.mark.xdist_group("blob_run")


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


def test_parse_planes():
    assert parse_planes("xy,yz,xz") == ("xy", "xz", "yz")
    for bad in ("xz", "xy,ab", ""):
        with pytest.raises(Exception):
            parse_planes(bad)
