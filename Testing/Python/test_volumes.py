"""Reading, validation, geometry-exact writing and Slicer's reading of our .seg.nrrd."""
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ALSegLib import volumes
from ALSegLib.errors import InputError

OBLIQUE = Rotation.from_euler("xyz", [17, -23, 41], degrees=True).as_matrix().flatten().tolist()
SPACING = (0.7, 1.3, 3.1)
ORIGIN = (-123.456789012, 45.6789, 901.2345)


def oblique_image(arr=None):
    arr = np.arange(6 * 7 * 5, dtype=np.float32).reshape(5, 7, 6) if arr is None else arr
    img = sitk.GetImageFromArray(arr)
    img.SetDirection(OBLIQUE)
    img.SetSpacing(SPACING)
    img.SetOrigin(ORIGIN)
    return img


@pytest.mark.parametrize("ext", [".nrrd", ".mha"])
def test_geometry_preserved_exactly(tmp_path, ext):
    img = oblique_image()
    path = tmp_path / f"img{ext}"
    volumes.write_image(img, path)
    back = volumes.read_image(path)
    np.testing.assert_allclose(back.GetDirection(), OBLIQUE, rtol=0, atol=1e-14)
    np.testing.assert_allclose(back.GetSpacing(), SPACING, rtol=1e-14)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN, rtol=1e-15)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))


def test_write_is_atomic_and_leaves_no_temporaries(tmp_path):
    volumes.write_image(oblique_image(), tmp_path / "a.nrrd")
    volumes.write_image(oblique_image() * 2, tmp_path / "a.nrrd")  # replaces
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.nrrd"]
    assert sitk.GetArrayFromImage(volumes.read_image(tmp_path / "a.nrrd")).max() == 2 * (6 * 7 * 5 - 1)


def test_exclusive_write_never_replaces(tmp_path):
    volumes.write_image(oblique_image(), tmp_path / "v0001.nrrd", exclusive=True)
    before = (tmp_path / "v0001.nrrd").read_bytes()
    with pytest.raises(FileExistsError):
        volumes.write_image(oblique_image() * 3, tmp_path / "v0001.nrrd", exclusive=True)
    assert (tmp_path / "v0001.nrrd").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["v0001.nrrd"]


def test_label_values_checked_and_listed(tmp_path):
    arr = np.zeros((4, 5, 6), np.int16)
    arr[0, 0, :3] = [1, 7, 9]
    path = tmp_path / "lab.nrrd"
    volumes.write_image(sitk.GetImageFromArray(arr), path)
    with pytest.raises(InputError) as err:
        volumes.read_label(path, label_values=[1, 2])
    assert "lab.nrrd" in str(err.value) and "[7, 9]" in str(err.value)


def test_non_integer_label_values_listed(tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[0, 0, :2] = [1.0, 1.5]
    path = tmp_path / "lab.nii.gz"
    volumes.write_image(sitk.GetImageFromArray(arr), path)
    with pytest.raises(InputError, match=r"lab\.nii\.gz: label values must be integers; found 1\.5"):
        volumes.read_label(path, label_values=[1])


def test_float_label_with_integral_values_is_accepted_as_uint8(tmp_path):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[1, 1, 1] = 2.0
    path = tmp_path / "lab.nii.gz"
    volumes.write_image(sitk.GetImageFromArray(arr), path)
    lab = volumes.read_label(path, label_values=[1, 2])
    assert lab.GetPixelID() == sitk.sitkUInt8 and sitk.GetArrayFromImage(lab).max() == 2


@pytest.mark.parametrize(
    "change,word",
    [
        (lambda im: im.SetSpacing((0.7, 1.3, 3.2)), "spacing"),
        (lambda im: im.SetOrigin((-123.4, 45.6789, 901.2345)), "origin"),
        (lambda im: im.SetDirection(np.eye(3).flatten().tolist()), "direction"),
    ],
)
def test_label_geometry_must_match(tmp_path, change, word):
    image = oblique_image()
    label = oblique_image(np.zeros((5, 7, 6), np.uint8))
    change(label)
    path = tmp_path / "lab.nrrd"
    volumes.write_image(label, path)
    with pytest.raises(InputError, match=rf"lab\.nrrd: label geometry does not match its image: {word}"):
        volumes.read_label(path, label_values=[1], geometry=volumes.Geometry.of(image))


def test_label_size_must_match(tmp_path):
    path = tmp_path / "lab.nrrd"
    volumes.write_image(oblique_image(np.zeros((5, 7, 7), np.uint8)), path)
    with pytest.raises(InputError, match="size"):
        volumes.read_label(path, label_values=[1], geometry=volumes.Geometry.of(oblique_image()))


def test_label_within_tolerance_gets_the_image_geometry(tmp_path):
    image = oblique_image()
    label = oblique_image(np.ones((5, 7, 6), np.uint8))
    label.SetOrigin(tuple(o + 1e-5 for o in ORIGIN))  # NIfTI-sized rounding
    path = tmp_path / "lab.nrrd"
    volumes.write_image(label, path)
    out = volumes.read_label(path, label_values=[1], geometry=volumes.Geometry.of(image))
    assert out.GetOrigin() == image.GetOrigin()


def test_2d_4d_and_vector_images_refused(tmp_path):
    sitk.WriteImage(sitk.Image(8, 9, sitk.sitkFloat32), str(tmp_path / "flat.nrrd"))
    sitk.WriteImage(sitk.Image([4, 5, 6, 3], sitk.sitkFloat32), str(tmp_path / "four.nrrd"))
    sitk.WriteImage(sitk.Image([4, 5, 6], sitk.sitkVectorFloat32, 3), str(tmp_path / "vec.nrrd"))
    with pytest.raises(InputError, match=r"flat\.nrrd: image is 2D"):
        volumes.read_image(tmp_path / "flat.nrrd")
    with pytest.raises(InputError, match=r"four\.nrrd: image is 4D"):
        volumes.read_image(tmp_path / "four.nrrd")
    with pytest.raises(InputError, match=r"vec\.nrrd: image has 3 components"):
        volumes.read_image(tmp_path / "vec.nrrd")


def test_3d_with_singleton_fourth_axis_is_squeezed(tmp_path):
    sitk.WriteImage(sitk.Image([4, 5, 6, 1], sitk.sitkInt16), str(tmp_path / "one.nii.gz"))
    assert volumes.read_image(tmp_path / "one.nii.gz").GetSize() == (4, 5, 6)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_images_refused(tmp_path, bad):
    arr = np.zeros((4, 5, 6), np.float32)
    arr[2, 2, 2] = bad
    volumes.write_image(sitk.GetImageFromArray(arr), tmp_path / "nan.nii.gz")
    with pytest.raises(InputError, match=r"nan\.nii\.gz: image has 1 non-finite voxels"):
        volumes.read_image(tmp_path / "nan.nii.gz")


def test_truncated_and_corrupt_nifti(tmp_path):
    volumes.write_image(oblique_image(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32)), tmp_path / "ok.nii.gz")
    volumes.write_image(volumes.read_image(tmp_path / "ok.nii.gz"), tmp_path / "ok.nii")
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    raw = (tmp_path / "ok.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) // 2])
    (tmp_path / "hdr.nii").write_bytes(b"\x00" * 348 + raw[348:])
    with pytest.raises(InputError, match=r"cut\.nii\.gz: truncated or corrupt gzip"):
        volumes.read_image(tmp_path / "cut.nii.gz")
    with pytest.raises(InputError, match=r"cut\.nii: truncated NIfTI file"):
        volumes.read_image(tmp_path / "cut.nii")
    with pytest.raises(InputError, match=r"hdr\.nii: corrupt NIfTI header"):
        volumes.read_image(tmp_path / "hdr.nii")


def test_unsupported_missing_and_empty(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "empty.nrrd").write_bytes(b"")
    with pytest.raises(InputError, match="unsupported file type"):
        volumes.read_image(tmp_path / "notes.txt")
    with pytest.raises(InputError, match="file not found"):
        volumes.read_image(tmp_path / "nope.nii.gz")
    with pytest.raises(InputError, match=r"empty\.nrrd: empty file"):
        volumes.read_image(tmp_path / "empty.nrrd")
    with pytest.raises(InputError, match="no DICOM series"):
        volumes.read_image(tmp_path)


def test_ct_dicom_series_is_read(shared_data):
    folder = shared_data / "ct_example" / "example_ct_dicom"
    if not folder.is_dir():
        pytest.skip("no shared DICOM series")
    img = volumes.read_image(folder)
    assert img.GetSize() == (512, 512, 20)
    assert img.GetSpacing()[0] == pytest.approx(0.98, abs=0.01)
    assert img.GetSpacing()[2] == pytest.approx(2.0, abs=0.05)
    arr = sitk.GetArrayViewFromImage(img)
    assert arr.min() <= -900 and arr.max() > 300  # Hounsfield units: air and bone


def test_seg_nrrd_is_read_by_slicer(tmp_path):
    """Slicer's own segmentation reader (vtkMRMLSegmentationStorageNode, from slicer-core)
    gets names, label values, colors, voxels and the oblique geometry right."""
    slicer = pytest.importorskip("slicer")
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    arr = np.zeros((5, 7, 6), np.uint8)
    arr[1:3, 2:5, 1:4] = 1
    arr[3:5, 0:2, 4:6] = 3
    label = oblique_image(arr)
    segments = [volumes.Segment("liver", 1, (1.0, 0.0, 0.0)), volumes.Segment("spleen", 2, (0.0, 1.0, 0.0)),
                volumes.Segment("tumor", 3, (0.0, 0.0, 1.0))]
    path = tmp_path / "case.seg.nrrd"
    volumes.write_label_file(label, path, segments)

    scene = slicer.vtkMRMLScene()
    node = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(node)
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node) == 1
    seg = node.GetSegmentation()
    got = {seg.GetNthSegment(i).GetName(): (seg.GetNthSegment(i).GetLabelValue(), seg.GetNthSegment(i).GetColor())
           for i in range(seg.GetNumberOfSegments())}
    assert got == {"liver": (1, (1.0, 0.0, 0.0)), "spleen": (2, (0.0, 1.0, 0.0)), "tumor": (3, (0.0, 0.0, 1.0))}

    rep = seg.GetSegment(seg.GetSegmentIdBySegmentName("tumor")).GetRepresentation("Binary labelmap")
    dims = rep.GetDimensions()
    voxels = vtk_to_numpy(rep.GetPointData().GetScalars()).reshape(dims[::-1])
    assert (voxels == 3).sum() == (arr == 3).sum() and (voxels == 1).sum() == (arr == 1).sum()
    m = vtk.vtkMatrix4x4()
    rep.GetImageToWorldMatrix(m)
    ijk_to_ras = np.array([[m.GetElement(i, j) for j in range(4)] for i in range(3)])
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    expected = lps_to_ras @ (np.array(OBLIQUE).reshape(3, 3) * np.array(SPACING))
    np.testing.assert_allclose(ijk_to_ras[:, :3], expected, atol=1e-6)
    np.testing.assert_allclose(ijk_to_ras[:, 3], lps_to_ras @ np.array(ORIGIN), atol=1e-6)


def test_export_extension_checked(tmp_path):
    with pytest.raises(InputError, match="unsupported export type"):
        volumes.write_label_file(oblique_image(np.zeros((5, 7, 6), np.uint8)), tmp_path / "x.png", [])
