"""Bad input, each kind its own test, through the API and the CLI: exit code 2 (InputError),
a message naming the file and the problem, and the project byte-identical before and after.

Every scenario adds a valid new image in the same call as the bad one, so the
tests also prove that an add is all-or-nothing.
"""
import re
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import tree_hash

from ALSegLib.errors import InputError


def _write(img, path):
    sitk.WriteImage(img, str(path), path.name.endswith(".gz"))
    return path


def _like(template, arr):
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(template)
    return img


class Scenario:
    """Builds one bad input beside a good new image (``fresh``) in ``tmp``."""

    def __init__(self, tmp, phantom_dir):
        self.tmp = tmp
        self.src = tmp / "in"
        self.ref = tmp / "ref"
        self.src.mkdir(parents=True)
        self.ref.mkdir()
        self.image = sitk.ReadImage(str(phantom_dir / "images" / "phantom_ct_000.nii.gz"))
        self.label = sitk.ReadImage(str(phantom_dir / "labels" / "phantom_ct_000.nii.gz"))
        _write(self.image, self.src / "fresh.nii.gz")
        _write(self.label, self.ref / "fresh.nii.gz")
        self.case_id = None
        self.use_reference = True

    def images(self, bad):
        return [self.src / "fresh.nii.gz", bad]


def truncated_nii_gz(s):
    good = _write(s.image, s.tmp / "whole.nii.gz")
    data = good.read_bytes()
    bad = s.src / "cut.nii.gz"
    bad.write_bytes(data[: len(data) // 2])
    _write(s.label, s.ref / "cut.nii.gz")
    return s.images(bad), "cut.nii.gz", "truncated or corrupt gzip"


def corrupt_header(s):
    good = _write(s.image, s.tmp / "whole.nii")
    raw = bytearray(good.read_bytes())
    raw[0:4] = b"\x13\x37\x00\x00"
    bad = s.src / "hdr.nii"
    bad.write_bytes(bytes(raw))
    _write(s.label, s.ref / "hdr.nii.gz")
    return s.images(bad), "hdr.nii", "corrupt NIfTI header"


def corrupt_nrrd(s):
    bad = s.src / "garbled.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: float\ndimension: three\n\n\x00\x01")
    _write(s.label, s.ref / "garbled.nii.gz")
    return s.images(bad), "garbled.nrrd", "cannot read image"


def empty_file(s):
    bad = s.src / "empty.nii.gz"
    bad.write_bytes(b"")
    _write(s.label, s.ref / "empty.nii.gz")
    return s.images(bad), "empty.nii.gz", "empty file"


def geometry_mismatch(s):
    bad = _write(s.image, s.src / "shifted.nii.gz")
    lab = sitk.Image(s.label)
    lab.SetOrigin(tuple(o + 5.0 for o in lab.GetOrigin()))
    _write(lab, s.ref / "shifted.nii.gz")
    return s.images(bad), "ref/shifted.nii.gz", "label geometry does not match its image: origin"


def label_size_mismatch(s):
    bad = _write(s.image, s.src / "small.nii.gz")
    _write(sitk.Image([8, 8, 8], sitk.sitkUInt8), s.ref / "small.nii.gz")
    return s.images(bad), "ref/small.nii.gz", "size"


def non_integer_label(s):
    bad = _write(s.image, s.src / "frac.nii.gz")
    arr = sitk.GetArrayFromImage(s.label).astype(np.float32)
    arr[arr == 3] = 2.5
    _write(_like(s.label, arr), s.ref / "frac.nii.gz")
    return s.images(bad), "ref/frac.nii.gz", r"label values must be integers; found 2\.5"


def unknown_label_value(s):
    bad = _write(s.image, s.src / "extra.nii.gz")
    arr = sitk.GetArrayFromImage(s.label)
    arr[0, 0, :2] = [7, 42]
    _write(_like(s.label, arr), s.ref / "extra.nii.gz")
    return s.images(bad), "ref/extra.nii.gz", r"label values \[7, 42\] are not in the label table"


def nan_image(s):
    arr = sitk.GetArrayFromImage(s.image).astype(np.float32)
    arr[3, 4, 5] = np.nan
    bad = _write(_like(s.image, arr), s.src / "nan.nii.gz")
    _write(s.label, s.ref / "nan.nii.gz")
    return s.images(bad), "nan.nii.gz", r"non-finite voxels \(NaN\)"


def inf_image_nrrd(s):
    arr = sitk.GetArrayFromImage(s.image).astype(np.float32)
    arr[1, 1, 1] = np.inf
    bad = _write(_like(s.image, arr), s.src / "inf.nrrd")
    _write(s.label, s.ref / "inf.nii.gz")
    return s.images(bad), "inf.nrrd", r"non-finite voxels \(Inf\)"


def image_2d(s):
    bad = _write(sitk.Image(32, 32, sitk.sitkInt16), s.src / "flat.nii.gz")
    _write(s.label, s.ref / "flat.nii.gz")
    return s.images(bad), "flat.nii.gz", "image is 2D"


def image_4d(s):
    bad = _write(sitk.Image([8, 8, 8, 3], sitk.sitkInt16), s.src / "cine.nii.gz")
    _write(s.label, s.ref / "cine.nii.gz")
    return s.images(bad), "cine.nii.gz", "image is 4D"


def vector_image(s):
    bad = _write(sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3), s.src / "rgb.mha")
    _write(s.label, s.ref / "rgb.nii.gz")
    return s.images(bad), "rgb.mha", "3 components"


def case_id_escapes(s):
    s.case_id = "../escape"
    s.use_reference = False
    return [s.src / "fresh.nii.gz"], "../escape", r"must not contain path separators, '\.\.'"


def absolute_case_id(s):
    s.case_id = "/etc/passwd"
    s.use_reference = False
    return [s.src / "fresh.nii.gz"], "/etc/passwd", "absolute path"


def duplicate_case_id(s):
    bad = _write(s.image, s.src / "phantom_ct_003.mha")
    _write(s.label, s.ref / "phantom_ct_003.nii.gz")
    return s.images(bad), "phantom_ct_003.mha", "case id 'phantom_ct_003' already exists"


def missing_label_file(s):
    bad = _write(s.image, s.src / "unlabelled.nii.gz")
    return s.images(bad), "ref", "missing label file for 1 image.*unlabelled"


def nonexistent_image(s):
    return s.images(s.src / "ghost.nii.gz"), "ghost.nii.gz", "file not found"


def unsupported_type(s):
    bad = s.src / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n")
    return s.images(bad), "scan.png", "unsupported file type"


def folder_without_images(s):
    bad = s.tmp / "dicomish"
    bad.mkdir()
    (bad / "IM0001.dcm").write_bytes(b"\x00" * 200 + b"not dicom")
    return s.images(bad), "dicomish", "no images"


SCENARIOS = [
    truncated_nii_gz, corrupt_header, corrupt_nrrd, empty_file, geometry_mismatch, label_size_mismatch,
    non_integer_label, unknown_label_value, nan_image, inf_image_nrrd, image_2d, image_4d, vector_image,
    case_id_escapes, absolute_case_id, duplicate_case_id, missing_label_file, nonexistent_image,
    unsupported_type, folder_without_images,
]


@pytest.fixture
def rich_project(project):
    """The phantom project with a human label and a pseudo label too."""
    project.add_human_label("phantom_ct_001", project.read_label("phantom_ct_001", "reference"), author="dr_a")
    project.write_label("phantom_ct_002", "pseudo", project.read_label("phantom_ct_002", "reference"), source="sam")
    return project


@pytest.mark.parametrize("make", SCENARIOS, ids=[f.__name__ for f in SCENARIOS])
def test_api(make, rich_project, tmp_path, phantom_dir):
    s = Scenario(tmp_path / "bad", phantom_dir)
    images, where, problem = make(s)
    before = tree_hash(rich_project.root)
    with pytest.raises(InputError) as err:
        rich_project.add_cases(
            images,
            reference_dir=s.ref if s.use_reference else None,
            case_ids=[s.case_id] if s.case_id else None,
        )
    message = str(err.value)
    assert where in message
    assert re.search(problem, message), message
    assert tree_hash(rich_project.root) == before


@pytest.mark.parametrize("make", SCENARIOS, ids=[f.__name__ for f in SCENARIOS])
def test_cli(make, rich_project, tmp_path, phantom_dir, run_cli):
    s = Scenario(tmp_path / "bad", phantom_dir)
    images, where, problem = make(s)
    before = tree_hash(rich_project.root)
    args = ["add", rich_project.root, *images]
    if s.use_reference:
        args += ["--reference", s.ref]
    if s.case_id:
        args += ["--case-id", s.case_id]
    code, out, err = run_cli(*args)
    assert code == 2, err
    assert err.startswith("alseg: error: ") and where in err and re.search(problem, err), err
    assert out == ""
    assert tree_hash(rich_project.root) == before


def test_the_good_image_alone_is_added(rich_project, tmp_path, phantom_dir):
    """Control: the scenarios fail because of the bad input, not the good one beside it."""
    s = Scenario(tmp_path / "bad", phantom_dir)
    assert rich_project.add_cases([s.src / "fresh.nii.gz"], reference_dir=s.ref) == ["fresh"]


def test_bad_label_import_leaves_project_untouched(rich_project, tmp_path, run_cli):
    arr = sitk.GetArrayFromImage(rich_project.read_label("phantom_ct_000", "reference"))
    arr[0, 0, 0] = 9
    lab = _like(rich_project.read_label("phantom_ct_000", "reference"), arr)
    folder = tmp_path / "imports"
    folder.mkdir()
    _write(rich_project.read_label("phantom_ct_001", "reference"), folder / "phantom_ct_001.nii.gz")
    _write(lab, folder / "phantom_ct_000.nii.gz")
    before = tree_hash(rich_project.root)
    code, _, err = run_cli("import-labels", rich_project.root, folder, "--kind", "human")
    assert code == 2 and "phantom_ct_000.nii.gz" in err and "[9]" in err
    assert tree_hash(rich_project.root) == before
    shutil.rmtree(folder)


@pytest.mark.parametrize("content, problem", [
    ('{"budget": "2", "stratgy": "random"}', "unknown round settings: stratgy"),
    ('{"budget": "2", "strategy": "nosuch"}', "strategy"),
    ('{"budget": "2", "pseudo": {"source": "sam", "from": "/x"}}', "takes no from_dir"),
    ('{"budget": "2", "filtermatch": {"drop_fraction": 2}}', "drop fraction"),
    ('["budget"]', "must hold a JSON object"),
])
def test_a_bad_round_settings_file_is_refused_naming_it_and_nothing_is_written(project, run_cli, tmp_path, content,
                                                                                problem):
    settings = tmp_path / "settings.json"
    settings.write_text(content)
    before = tree_hash(project.root)
    code, _, err = run_cli("round", project.root, "--settings", settings)
    assert code == 2 and problem in err and str(settings) in err
    assert tree_hash(project.root) == before


@pytest.mark.parametrize("option, value", [("--epochs", "0"), ("--iters", "0"), ("--epochs", "-1"), ("--val-iters", "0"),
                                           ("--batch-size", "0")])
def test_a_zero_or_negative_training_budget_is_refused_and_leaves_no_trace(project, run_cli, option, value):
    """'--epochs 0 --iters 0' once fell back to the default budget and trained; '--epochs -1' was refused
    but left a model record 'training' behind that every later run of that name tripped over."""
    before = tree_hash(project.root)
    code, _, err = run_cli("train", project.root, "--mode", "pretrain", "--name", "m", option, value)
    assert code == 2 and option in err and "at least 1" in err
    assert tree_hash(project.root) == before
    code, _, err = run_cli("round", project.root, "--budget", "1", option, value, "--pseudo-source", "degraded-reference")
    assert code == 2 and option in err
    assert tree_hash(project.root) == before


def test_the_demo_refuses_a_zero_budget_before_it_makes_its_folder(run_cli, tmp_path):
    code, _, err = run_cli("demo", "--dir", tmp_path / "demo", "--epochs", "0")
    assert code == 2 and "--epochs" in err and not (tmp_path / "demo").exists()
