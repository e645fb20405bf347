"""Labels made by another model imported as pseudo-labels, with a value mapping."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import tree_hash

from ALSegLib.errors import InputError
from ALSegLib.pseudolabels.imported import import_pseudolabels, parse_mapping


def other_model_labels(project, folder, cases, values=(5, 6, 9)):
    """Write labels as another model would: its own values (5 = organ, 6 = vessel, 9 = something else)."""
    folder.mkdir(exist_ok=True)
    out = {}
    for case in cases:
        ref = sitk.GetArrayFromImage(project.read_label(case, "reference"))
        arr = np.zeros_like(ref, dtype=np.uint16)
        arr[ref == 1] = values[0]
        arr[ref == 2] = values[1]
        arr[ref == 3] = values[2]
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(project.read_image(case))
        sitk.WriteImage(img, str(folder / f"{case}.nii.gz"))
        out[case] = ref
    return out


def test_import_with_mapping_drops_unmapped_values_and_records_them(project, tmp_path):
    cases = project.cases()[:3]
    refs = other_model_labels(project, tmp_path / "ts", cases)
    done = import_pseudolabels(project, tmp_path / "ts", "5=1,6=2", model="totalsegmentator")
    assert [d["case"] for d in done] == cases
    for case in cases:
        got = sitk.GetArrayFromImage(project.read_label(case, "pseudo"))
        expected = np.where(refs[case] == 3, 0, refs[case])
        assert np.array_equal(got, expected)
        prov = project.provenance(case, "pseudo")
        assert prov["source"] == "import" and prov["produced_by"]["model"] == "totalsegmentator"
        assert prov["mapping"] == {"5": 1, "6": 2}
        assert set(prov["dropped_values"]) == ({"9"} if (refs[case] == 3).any() else set())


def test_import_without_mapping_needs_project_values(project, tmp_path):
    other_model_labels(project, tmp_path / "ts", project.cases()[:1])
    before = tree_hash(project.root)
    with pytest.raises(InputError, match=r"ts/.*holds value\(s\) 5, 6.*give --map"):
        import_pseudolabels(project, tmp_path / "ts")
    assert tree_hash(project.root) == before
    other_model_labels(project, tmp_path / "same", project.cases()[:1], values=(1, 2, 3))
    import_pseudolabels(project, tmp_path / "same")
    assert project.labeled_cases("pseudo") == project.cases()[:1]


@pytest.mark.parametrize("mapping, message", [
    ("5=1,,6=2", "cannot read ''"),
    ("5->1", "cannot read '5->1'"),
    ("5=1,5=2", "value 5 is mapped twice"),
    ("5=7", "7 is not a label value of the project"),
    ("0=1", "background"),
    ("42=1", "none of the mapped values"),
])
def test_bad_mapping_is_a_clear_error_and_changes_nothing(project, tmp_path, mapping, message):
    other_model_labels(project, tmp_path / "ts", project.cases()[:2])
    before = tree_hash(project.root)
    with pytest.raises(InputError, match=message):
        import_pseudolabels(project, tmp_path / "ts", mapping)
    assert tree_hash(project.root) == before


def test_labels_on_another_grid_need_resample(project, tmp_path):
    case = project.cases()[0]
    folder = tmp_path / "ts"
    other_model_labels(project, folder, [case], values=(1, 2, 3))
    img = sitk.ReadImage(str(folder / f"{case}.nii.gz"))
    shifted = sitk.GetImageFromArray(sitk.GetArrayFromImage(img))
    shifted.CopyInformation(img)
    shifted.SetOrigin(tuple(o + 0.5 * s for o, s in zip(img.GetOrigin(), img.GetSpacing())))
    sitk.WriteImage(shifted, str(folder / f"{case}.nii.gz"))
    before = tree_hash(project.root)
    with pytest.raises(InputError, match=rf"{case}.nii.gz: grid differs .*origin.*--resample"):
        import_pseudolabels(project, folder)
    assert tree_hash(project.root) == before
    (rec,) = import_pseudolabels(project, folder, resample=True)
    assert rec["resampled"] and project.provenance(case, "pseudo")["resampled"] is True
    got = project.read_label(case, "pseudo")
    assert got.GetOrigin() == project.read_image(case).GetOrigin()


def test_unknown_case_files_and_one_bad_file_stop_the_whole_import(project, tmp_path):
    cases = project.cases()[:2]
    other_model_labels(project, tmp_path / "ts", cases, values=(1, 2, 3))
    (tmp_path / "ts" / "stranger.nii.gz").write_bytes((tmp_path / "ts" / f"{cases[0]}.nii.gz").read_bytes())
    before = tree_hash(project.root)
    with pytest.raises(InputError, match="not in the project: stranger"):
        import_pseudolabels(project, tmp_path / "ts")
    (tmp_path / "ts" / "stranger.nii.gz").unlink()
    (tmp_path / "ts" / f"{cases[1]}.nii.gz").write_bytes(b"broken")
    with pytest.raises(InputError, match=f"{cases[1]}.nii.gz"):
        import_pseudolabels(project, tmp_path / "ts")
    assert tree_hash(project.root) == before  # the good first file was not stored either


def test_parse_mapping():
    assert parse_mapping("5=1, 6 = 2,9=0", [1, 2, 3]) == {5: 1, 6: 2, 9: 0}


def test_cli_import(project, tmp_path, run_cli):
    other_model_labels(project, tmp_path / "ts", project.cases()[:2])
    code, out, err = run_cli("pseudolabel", str(project.root), "--source", "import", "--from", str(tmp_path / "ts"),
                             "--map", "5=1,6=2,9=3", "--model", "earlier-nnunet", "--json")
    assert code == 0, err
    assert [d["case"] for d in json.loads(out)["imported"]] == project.cases()[:2]
    code, _, err = run_cli("pseudolabel", str(project.root), "--source", "import", "--from", str(tmp_path / "ts"),
                           "--map", "5=9")
    assert code == 2 and "9 is not a label value" in err
    code, _, err = run_cli("pseudolabel", str(project.root), "--source", "import", "--from", str(tmp_path / "ts"),
                           "--checkpoint", "x.pth")
    assert code == 2 and "--checkpoint belongs to --source sam" in err


def test_real_totalsegmentator_label_imported_with_mapping(shared_data, tmp_path):
    """The shared CT example's multi-organ label (values 0..117, made by TotalSegmentator): liver and spleen kept."""
    import shutil

    from ALSegLib.project import LabelTable, Project

    ct = shared_data / "ct_example"
    if not (ct / "example_seg.nii.gz").is_file():
        pytest.skip("shared CT example not present")
    project = Project.create(tmp_path / "p", LabelTable.parse("liver=1,spleen=2"), "CT")
    project.add_cases([ct / "example_ct_sm.nii.gz"])
    (tmp_path / "ts").mkdir()
    shutil.copy(ct / "example_seg.nii.gz", tmp_path / "ts" / "example_ct_sm.nii.gz")
    (rec,) = import_pseudolabels(project, tmp_path / "ts", "5=1,1=2", model="TotalSegmentator")
    source = sitk.GetArrayFromImage(sitk.ReadImage(str(ct / "example_seg.nii.gz")))
    got = sitk.GetArrayFromImage(project.read_label("example_ct_sm", "pseudo"))
    assert (got == 1).sum() == (source == 5).sum() > 0 and (got == 2).sum() == (source == 1).sum() > 0
    assert np.array_equal(got == 1, source == 5)
    assert len(rec["dropped_values"]) >= 5 and 5 not in rec["dropped_values"]
