"""Phantoms: deterministic, varied, realistic intensity ranges, all labels present."""
import numpy as np
import pytest
import SimpleITK as sitk

from ALSegLib import phantoms


def arrays(i, modality="CT", seed=0):
    img, lab = phantoms.make_phantom(i, modality, seed)
    return sitk.GetArrayFromImage(img), sitk.GetArrayFromImage(lab), img, lab


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_deterministic(modality):
    a1, l1, *_ = arrays(3, modality)
    a2, l2, *_ = arrays(3, modality)
    np.testing.assert_array_equal(a1, a2)
    np.testing.assert_array_equal(l1, l2)
    a3, l3, *_ = arrays(3, modality, seed=1)
    assert not np.array_equal(l1, l3)


def test_cases_vary_in_shape_position_size_and_contrast():
    sizes, centres, contrasts = [], [], []
    for i in range(8):
        a, lab, *_ = arrays(i)
        organ = lab == phantoms.LABELS["organ"]
        sizes.append(organ.sum())
        centres.append(np.argwhere(organ).mean(axis=0))
        contrasts.append(a[organ].mean() - a[(lab == 0) & (a > -500) & (a < 300)].mean())
    assert np.std(sizes) / np.mean(sizes) > 0.1
    assert np.ptp(np.array(centres), axis=0).max() > 3  # voxels
    assert np.ptp(contrasts) > 10  # HU


@pytest.mark.parametrize("modality", ["CT", "MRI"])
def test_labels_geometry_and_intensity_ranges(modality):
    for i in range(6):
        a, lab, img, labimg = arrays(i, modality)
        assert a.shape == lab.shape == (64, 64, 64)
        assert set(np.unique(lab)) == {0, 1, 2, 3}
        assert img.GetSpacing() == labimg.GetSpacing() == phantoms.SPACING[modality]
        assert img.GetOrigin() == labimg.GetOrigin()
        if modality == "CT":
            assert a.dtype == np.int16 and a.min() <= -950 and 500 < a.max() < 3072
            assert abs(np.median(a[lab == 2]) - 200) < 80  # contrast-filled vessel
        else:
            assert a.dtype == np.float32 and a.min() >= 0
            assert np.median(a[lab == 2]) < np.median(a[lab == 1])  # flow void darker than organ


@pytest.mark.parametrize("i", range(3))
def test_noise_and_bias_present(i):
    a, lab, *_ = arrays(i, "MRI")
    assert a[lab == 1].std() > 5  # noise inside a uniform structure
    # The smooth bias field makes the same tissue brighter in some octants than others
    # by far more than the noise could (thousands of voxels per octant).
    tissue = (lab == 0) & (a > 150) & (a < 500)
    idx = np.indices(a.shape) // 32
    means = [a[tissue & (idx[0] == z) & (idx[1] == y) & (idx[2] == x)].mean() for z in (0, 1) for y in (0, 1) for x in (0, 1)]
    assert max(means) / min(means) > 1.04


def test_write_dataset(tmp_path):
    images, labels = phantoms.write_dataset(tmp_path, n=3, modality="MRI", size=32)
    assert sorted(p.name for p in images.iterdir()) == [f"phantom_mri_00{i}.nii.gz" for i in range(3)]
    assert sorted(p.name for p in labels.iterdir()) == [f"phantom_mri_00{i}.nii.gz" for i in range(3)]


def test_unknown_modality():
    with pytest.raises(ValueError):
        phantoms.make_phantom(0, "PET")
