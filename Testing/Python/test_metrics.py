"""Metrics against values worked out by hand, and against a brute-force surface distance."""
import math

import numpy as np
import pytest
from scipy import ndimage
from scipy.spatial.distance import cdist

from ALSegLib import metrics


def blank(shape=(12, 12, 12)):
    return np.zeros(shape, bool)


def test_identical_masks_are_perfect():
    a = blank()
    a[3:8, 2:9, 4:6] = True
    assert metrics.binary_metrics(a, a, (1, 1, 1)) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}


def test_empty_conventions():
    a, b = blank(), blank()
    assert metrics.binary_metrics(a, b, (1, 1, 1)) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
    b[5, 5, 5] = True
    m = metrics.binary_metrics(a, b, (1, 1, 1))
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert math.isnan(m["hd95"]) and math.isnan(m["asd"])


def test_cube_shifted_by_one_voxel_overlap():
    # 4x4x4 cubes, one shifted by a voxel: intersection 4*4*3 = 48 of 64 each.
    a, b = blank(), blank()
    a[2:6, 2:6, 2:6] = True
    b[2:6, 2:6, 3:7] = True
    m = metrics.binary_metrics(a, b, (1, 1, 1))
    assert m["dice"] == pytest.approx(96 / 128)
    assert m["iou"] == pytest.approx(48 / 80)


@pytest.mark.parametrize("axis,spacing,expected_mm",
                         [(0, (2.0, 1.0, 1.0), 6.0), (1, (2.0, 1.0, 1.0), 3.0), (2, (1.0, 1.0, 0.5), 1.5)])
def test_single_voxels_distance_in_millimetres(axis, spacing, expected_mm):
    # Two single voxels three voxels apart along one axis: every surface distance is 3 voxels.
    a, b = blank(), blank()
    a[5, 5, 5] = True
    idx = [5, 5, 5]
    idx[axis] = 8
    b[tuple(idx)] = True
    m = metrics.binary_metrics(a, b, spacing)
    assert m["dice"] == 0.0 and m["iou"] == 0.0
    assert m["hd95"] == pytest.approx(expected_mm)
    assert m["asd"] == pytest.approx(expected_mm)


def test_hd95_is_max_of_directed_percentiles_and_asd_pools_both_directions():
    # A = {p}; B = {p, q} with q ten voxels from p.
    # d(A->B) = [0]; d(B->A) = [0, 10]; P95 of [0, 10] (linear) = 9.5; ASD = (0 + 0 + 10) / 3.
    a, b = blank((30, 5, 5)), blank((30, 5, 5))
    a[2, 2, 2] = True
    b[2, 2, 2] = True
    b[12, 2, 2] = True
    m = metrics.binary_metrics(a, b, (1, 1, 1))
    assert m["dice"] == pytest.approx(2 / 3)
    assert m["iou"] == pytest.approx(1 / 2)
    assert m["hd95"] == pytest.approx(9.5)
    assert m["asd"] == pytest.approx(10 / 3)


def _brute_force(a, b, spacing):
    struct = ndimage.generate_binary_structure(3, 1)
    sa = a & ~ndimage.binary_erosion(a, struct, border_value=0)
    sb = b & ~ndimage.binary_erosion(b, struct, border_value=0)
    pa = np.argwhere(sa) * np.asarray(spacing)
    pb = np.argwhere(sb) * np.asarray(spacing)
    d = cdist(pa, pb)
    dab, dba = d.min(axis=1), d.min(axis=0)
    return max(np.percentile(dab, 95), np.percentile(dba, 95)), (dab.sum() + dba.sum()) / (dab.size + dba.size)


@pytest.mark.parametrize("seed", range(5))
def test_surface_metrics_match_brute_force_on_random_blobs(seed):
    rng = np.random.default_rng(seed)
    shape = (20, 24, 18)
    a = ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.05
    b = ndimage.gaussian_filter(rng.standard_normal(shape), 2) > 0.05
    spacing = (2.5, 0.8, 1.1)
    hd95, asd = _brute_force(a, b, spacing)
    m = metrics.binary_metrics(a, b, spacing)
    assert m["hd95"] == pytest.approx(hd95, rel=1e-9)
    assert m["asd"] == pytest.approx(asd, rel=1e-9)


def test_label_metrics_per_class_and_summary():
    ref = np.zeros((10, 10, 10), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    ref[6:9, 6:9, 6:9] = 2
    pred = ref.copy()
    pred[pred == 2] = 0  # class 2 missed entirely
    per_class = metrics.label_metrics(pred, ref, (1, 1, 1), {"a": 1, "b": 2})
    assert per_class["a"]["dice"] == 1.0
    assert per_class["b"]["dice"] == 0.0 and math.isnan(per_class["b"]["hd95"])
    summary = metrics.summarize({"c1": per_class, "c2": metrics.label_metrics(ref, ref, (1, 1, 1), {"a": 1, "b": 2})})
    assert summary["b"]["dice"]["mean"] == pytest.approx(0.5)
    assert summary["b"]["hd95"]["n"] == 1  # undefined HD95 left out, and counted
    assert summary["mean"]["dice"]["mean"] == pytest.approx((0.5 + 1.0) / 2)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        metrics.binary_metrics(blank((3, 3, 3)), blank((3, 3, 4)), (1, 1, 1))
