"""The alseg command line: contract commands, JSON output, exit codes, demo, real data."""
import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ALSegLib import metrics


def test_console_script_help_and_version():
    exe = [sys.executable, "-m", "ALSegLib"]
    out = subprocess.run(exe + ["--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "init" in out.stdout and "evaluate" in out.stdout
    for cmd in ("init", "add", "import-labels", "status", "evaluate", "export", "demo", "round", "simulate"):
        sub = subprocess.run(exe + [cmd, "--help"], capture_output=True, text=True)
        assert sub.returncode == 0 and "usage: alseg " + cmd in sub.stdout
    bad = subprocess.run(exe + ["status"], capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr


def test_contract_round_trip_on_phantoms(tmp_path, phantom_dir, run_cli):
    proj = tmp_path / "p"
    code, out, _ = run_cli("init", proj, "--labels", "organ=1,vessel=2,lesion=3", "--modality", "CT", "--json")
    assert code == 0 and json.loads(out)["modality"] == "CT"
    code, out, _ = run_cli("add", proj, phantom_dir / "images", "--reference", phantom_dir / "labels", "--json")
    added = json.loads(out)
    assert code == 0 and len(added["added"]) == 6 and added["with_reference"] == 6
    code, out, _ = run_cli("status", proj, "--json", "--cases")
    status = json.loads(out)
    assert status["cases"] == 6 and status["label_counts"]["reference"] == 6 and len(status["case_table"]) == 6
    code, out, _ = run_cli("status", proj, "--cases")
    assert code == 0 and "phantom_ct_005" in out

    # a degraded pseudo-label for one case: evaluate must report what metrics.py computes
    ref = sitk.ReadImage(str(phantom_dir / "labels" / "phantom_ct_001.nii.gz"))
    arr = sitk.GetArrayFromImage(ref)
    worse = np.where(ndimage.binary_erosion(arr == 1, iterations=1), 1, np.where(arr == 1, 0, arr)).astype(np.uint8)
    pseudo = sitk.GetImageFromArray(worse)
    pseudo.CopyInformation(ref)
    pdir = tmp_path / "pseudo"
    pdir.mkdir()
    sitk.WriteImage(pseudo, str(pdir / "phantom_ct_001.nii.gz"))
    code, out, _ = run_cli("import-labels", proj, pdir, "--kind", "pseudo", "--source", "eroded", "--json")
    assert code == 0 and json.loads(out)["imported"] == [{"case": "phantom_ct_001", "version": None}]
    code, out, _ = run_cli("evaluate", proj, "--kind", "pseudo", "--json")
    result = json.loads(out)
    expected = metrics.label_metrics(worse, arr, tuple(reversed(ref.GetSpacing())), {"organ": 1, "vessel": 2, "lesion": 3})
    assert result["cases"] == 1
    got = result["per_case"]["phantom_ct_001"]
    assert got["organ"]["dice"] == pytest.approx(expected["organ"]["dice"]) and got["organ"]["dice"] < 0.95
    assert got["organ"]["hd95"] == pytest.approx(expected["organ"]["hd95"])
    assert got["vessel"]["dice"] == 1.0
    code, out, _ = run_cli("evaluate", proj, "--kind", "pseudo", "--per-case")
    assert code == 0 and "phantom_ct_001" in out and "organ" in out

    code, out, _ = run_cli("evaluate", proj, "--kind", "reference", "--json")
    summary = json.loads(out)["summary"]
    assert all(summary[c]["dice"]["mean"] == 1.0 for c in ("organ", "vessel", "lesion", "mean"))


def test_export_nifti_and_seg_nrrd(project, tmp_path, run_cli):
    code, out, _ = run_cli("export", project.root, "phantom_ct_002", "--kind", "reference", "--to", tmp_path / "l.nii.gz",
                           "--json")
    assert code == 0 and json.loads(out)["file"].endswith("l.nii.gz")
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "l.nii.gz")))
    np.testing.assert_array_equal(back, sitk.GetArrayFromImage(project.read_label("phantom_ct_002", "reference")))
    code, _, _ = run_cli("export", project.root, "phantom_ct_002", "--kind", "reference", "--to", tmp_path / "l.seg.nrrd")
    header = (tmp_path / "l.seg.nrrd").read_bytes()[:4000].decode(errors="replace")
    assert code == 0 and "Segment2_Name:=lesion" in header and "Segment2_LabelValue:=3" in header
    code, _, err = run_cli("export", project.root, "phantom_ct_002", "--kind", "human", "--to", tmp_path / "h.nii.gz")
    assert code == 2 and "has no human label" in err
    code, _, _ = run_cli("export", project.root, "phantom_ct_002", "--kind", "image", "--to", tmp_path / "i.nii.gz")
    assert code == 0 and sitk.ReadImage(str(tmp_path / "i.nii.gz")).GetSize() == (32, 32, 32)


def test_export_human_versions(project, tmp_path, run_cli):
    ref = project.read_label("phantom_ct_000", "reference")
    project.add_human_label("phantom_ct_000", ref)
    project.add_human_label("phantom_ct_000", sitk.BinaryThreshold(ref, 1, 1, 1, 0))
    run_cli("export", project.root, "phantom_ct_000", "--kind", "human", "--version", "1", "--to", tmp_path / "v1.nii.gz")
    run_cli("export", project.root, "phantom_ct_000", "--kind", "human", "--to", tmp_path / "latest.nii.gz")
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v1.nii.gz"))).max() == 3
    assert sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "latest.nii.gz"))).max() == 1
    # the version as the file is named on disk; an existing file is kept unless --force
    code, _, _ = run_cli("export", project.root, "phantom_ct_000", "--kind", "human", "--version", "v0001",
                         "--to", tmp_path / "v0001.nii.gz")
    assert code == 0 and sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v0001.nii.gz"))).max() == 3
    before = (tmp_path / "v1.nii.gz").read_bytes()
    code, _, err = run_cli("export", project.root, "phantom_ct_000", "--kind", "human", "--to", tmp_path / "v1.nii.gz")
    assert code == 2 and "exists; give --force" in err and (tmp_path / "v1.nii.gz").read_bytes() == before
    code, _, _ = run_cli("export", project.root, "phantom_ct_000", "--kind", "human", "--to", tmp_path / "v1.nii.gz",
                         "--force")
    assert code == 0 and sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "v1.nii.gz"))).max() == 1
    # a version is refused where there are none (machine labels), not ignored
    code, _, err = run_cli("export", project.root, "phantom_ct_000", "--kind", "reference", "--version", "1",
                           "--to", tmp_path / "r.nii.gz")
    assert code == 2 and "only human labels have versions" in err


def test_a_case_id_that_is_not_there_is_called_no_such_case(project, tmp_path, run_cli):
    """'evaluate --case nosuch' and 'export nosuch' once said 'has no reference label'."""
    code, _, err = run_cli("evaluate", project.root, "--kind", "reference", "--case", "nosuch")
    assert code == 2 and "'nosuch'" in err and "no such case" in err
    code, _, err = run_cli("export", project.root, "nosuch", "--kind", "reference", "--to", tmp_path / "x.nii.gz")
    assert code == 2 and "no such case" in err and not (tmp_path / "x.nii.gz").exists()


def test_planning_without_pseudo_labels_points_to_the_labels_there_are(project, run_cli):
    code, _, err = run_cli("plan", project.root)
    assert code == 2 and "no case has a pseudo label" in err and "alseg pseudolabel" in err
    project.add_human_label("phantom_ct_000", project.read_label("phantom_ct_000", "reference"))
    code, _, err = run_cli("plan", project.root)
    assert code == 2 and "--policy human" in err


def test_busy_project_exit_code_3(project, run_cli, monkeypatch):
    import fcntl
    import os

    fd = os.open(project.root / "alseg.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: a second writer
    try:
        monkeypatch.setenv("ALSEG_LOCK_TIMEOUT", "0.2")
        ref = project.root / "labels" / "reference"
        code, _, err = run_cli("import-labels", project.root, ref / "phantom_ct_000.nrrd", "--kind", "pseudo")
        assert code == 3 and "busy" in err
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def test_real_hippocampus_twenty_cases(tmp_path, hippocampus, run_cli):
    """Machine-checked contract on real MRI: 20 cases with expert labels; reference vs itself is 1.0."""
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir()
    labels.mkdir()
    for f in sorted((hippocampus / "imagesTr").glob("*.nii.gz"))[:20]:
        (images / f.name).symlink_to(f)
        (labels / f.name).symlink_to(hippocampus / "labelsTr" / f.name)
    proj = tmp_path / "hippo"
    assert run_cli("init", proj, "--labels", "anterior=1,posterior=2", "--modality", "MRI", "--json")[0] == 0
    code, out, _ = run_cli("add", proj, images, "--reference", labels, "--json")
    assert code == 0 and len(json.loads(out)["added"]) == 20
    code, out, _ = run_cli("status", proj, "--json")
    assert json.loads(out)["label_counts"]["reference"] == 20
    code, out, _ = run_cli("evaluate", proj, "--kind", "reference", "--json")
    result = json.loads(out)
    assert code == 0 and result["cases"] == 20
    for cls in ("anterior", "posterior", "mean"):
        assert result["summary"][cls]["dice"]["mean"] == 1.0 and result["summary"][cls]["hd95"]["mean"] == 0.0
    img = sitk.ReadImage(str(sorted(images.iterdir())[0]))
    stored = sitk.ReadImage(str(proj / "images" / (sorted(images.iterdir())[0].name.replace(".nii.gz", ".nrrd"))))
    assert stored.GetSpacing() == img.GetSpacing() and stored.GetOrigin() == img.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(img))


def test_export_refuses_project_paths_folders_and_mhd(project, tmp_path, run_cli):
    inside = project.root / "labels" / "reference" / "phantom_ct_001.nrrd"
    before = inside.read_bytes()
    code, _, err = run_cli("export", project.root, "phantom_ct_000", "--kind", "reference", "--to", inside)
    assert code == 2 and "inside the project folder" in err and inside.read_bytes() == before
    code, _, err = run_cli("export", project.root, "phantom_ct_000", "--kind", "reference", "--to", tmp_path)
    assert code == 2 and "is a folder" in err
    code, _, err = run_cli("export", project.root, "phantom_ct_000", "--kind", "reference", "--to", tmp_path / "x.mhd")
    assert code == 2 and "unsupported export type" in err
    code, _, err = run_cli("export", project.root, "phantom_ct_000", "--kind", "reference", "--to", tmp_path / "no" / "x.nii.gz")
    assert code == 2 and "destination folder does not exist" in err


def test_bad_lock_timeout_setting_is_bad_input(project, run_cli, monkeypatch):
    monkeypatch.setenv("ALSEG_LOCK_TIMEOUT", "soon")
    ref = project.root / "labels" / "reference" / "phantom_ct_000.nrrd"
    code, _, err = run_cli("import-labels", project.root, ref, "--kind", "pseudo")
    assert code == 2 and "ALSEG_LOCK_TIMEOUT" in err


def test_a_refused_command_line_names_its_command_once_with_that_command_s_usage(run_cli, tmp_path):
    """Usage errors once read 'alseg: error: alseg: unrecognized arguments' under the top level's usage."""
    code, _, err = run_cli("round", tmp_path, "--bogus")
    assert code == 2 and err.startswith("usage: alseg round") and "alseg round: error: unrecognized arguments: --bogus" in err
    assert "alseg: error: alseg" not in err
    code, _, err = run_cli("round", tmp_path, "--strategy", "nosuch")
    assert code == 2 and "alseg round: error: argument --strategy: invalid choice: 'nosuch'" in err
    code, _, err = run_cli("nosuch")
    assert code == 2 and "alseg: error: argument COMMAND: invalid choice: 'nosuch'" in err
