"""The project folder: creation, cases, label kinds and versions, provenance, lock, events."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from ALSegLib import atomic, phantoms, volumes
from ALSegLib.errors import InputError, ProjectLockedError
from ALSegLib.project import LabelTable, Project, check_case_id, derive_case_id


def test_create_writes_config_and_event(tmp_path, table):
    p = Project.create(tmp_path / "p", table, "mri")
    cfg = json.loads((tmp_path / "p" / "alseg.json").read_text())
    assert cfg["schema"] == 1 and cfg["modality"] == "MRI" and cfg["name"] == "p"
    assert cfg["labels"][0] == {"name": "organ", "value": 1, "color": list(phantoms.COLORS["organ"])}
    assert [e["event"] for e in p.events()] == ["project_created"]
    reopened = Project.open(tmp_path / "p")
    assert reopened.labels.mapping == phantoms.LABELS


def test_create_refuses_non_empty_folder_and_existing_project(tmp_path, table):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(InputError, match="not empty"):
        Project.create(tmp_path / "full", table, "CT")
    Project.create(tmp_path / "p", table, "CT")
    with pytest.raises(InputError, match="already an ALSeg project"):
        Project.create(tmp_path / "p", table, "CT")
    with pytest.raises(InputError, match="must be CT or MRI"):
        Project.create(tmp_path / "q", table, "PET")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("liver=1,spleen=1", "duplicate label value 1"),
        ("liver=1,Liver=2", "duplicate label name"),
        ("liver=0", "reserved for background"),
        ("liver=1.5", "must be an integer"),
        ("liver", "expected NAME=VALUE"),
        ("liver=70000", "outside 1..65535"),
        ("liver=1:#zz0000", "#RRGGBB"),
        ("mean=1", "reserved"),
        ("background=1", "reserved"),
        ("a|b=1", "invalid label name"),
    ],
)
def test_label_table_errors(spec, message):
    with pytest.raises(InputError, match=message):
        LabelTable.parse(spec)


def test_label_table_colors():
    t = LabelTable.parse("liver=1:#ff8000, kidney=5")
    assert t.classes[0].color == (1.0, 128 / 255, 0.0) and t.mapping == {"liver": 1, "kidney": 5}


def test_add_cases_with_references(project, phantom_dir):
    ids = [f"phantom_ct_00{i}" for i in range(6)]
    assert project.cases() == ids
    assert project.labeled_cases("reference") == ids
    meta = json.loads(project.image_path(ids[0]).with_suffix(".json").read_text())
    assert meta["source"].endswith("phantom_ct_000.nii.gz") and len(meta["source_sha256"]) == 64
    prov = project.provenance(ids[0], "reference")
    assert prov["source"] == "import" and prov["kind"] == "reference" and prov["label_values_present"] == [1, 2, 3]
    assert prov["produced_by"]["file"].endswith("labels/phantom_ct_000.nii.gz")
    for key in ("time", "tool", "file_sha256"):
        assert prov[key]
    # stored label equals the input label
    src = sitk.GetArrayFromImage(sitk.ReadImage(str(phantom_dir / "labels" / "phantom_ct_002.nii.gz")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(project.read_label("phantom_ct_002", "reference")), src)
    assert project.events()[-1]["event"] == "cases_added"


def test_case_ids_are_safe_and_stable(tmp_path):
    f = tmp_path / "My Scan (2).nii.gz"
    f.write_bytes(b"")
    assert derive_case_id(f) == derive_case_id(f) == "My_Scan__2_"
    g = tmp_path / "..hidden..name.nrrd"
    g.write_bytes(b"")
    assert derive_case_id(g) == "hidden.name"
    for bad in ["../x", "/etc/passwd", "a/b", "a\\b", "..", ".", "", "-x", "a..b", "trailing.", "CON", "nul.txt", "com1"]:
        with pytest.raises(InputError):
            check_case_id(bad)


def test_duplicate_case_ids_refused(project, phantom_dir, tmp_path):
    with pytest.raises(InputError, match="already exists"):
        project.add_cases([phantom_dir / "images" / "phantom_ct_001.nii.gz"])
    other = tmp_path / "other"
    other.mkdir()
    img = sitk.ReadImage(str(phantom_dir / "images" / "phantom_ct_001.nii.gz"))
    volumes.write_image(img, other / "NEW.nrrd")
    volumes.write_image(img, other / "new.nii.gz")
    with pytest.raises(InputError, match="also derived from"):
        project.add_cases([other])
    assert len(project.cases()) == 6


def test_geometry_kept_exactly_in_the_project(tmp_path, table):
    arr = np.random.default_rng(1).normal(size=(8, 9, 10)).astype(np.float32)
    img = sitk.GetImageFromArray(arr)
    direction = Rotation.from_euler("zyx", [33, 12, -70], degrees=True).as_matrix().flatten().tolist()
    img.SetDirection(direction)
    img.SetSpacing((0.6, 0.9, 4.5))
    img.SetOrigin((12.3456789, -98.7654321, 3.14159265))
    src = tmp_path / "oblique.mha"
    sitk.WriteImage(img, str(src), True)
    lab = sitk.GetImageFromArray((arr > 1).astype(np.uint8))
    lab.CopyInformation(img)
    ref_dir = tmp_path / "refs"
    ref_dir.mkdir()
    sitk.WriteImage(lab, str(ref_dir / "oblique.nii.gz"))  # NIfTI: float32 header, within tolerance
    p = Project.create(tmp_path / "p", table, "CT")
    p.add_cases([src], reference_dir=ref_dir)
    stored, stored_label = p.read_image("oblique"), p.read_label("oblique", "reference")
    for s in (stored, stored_label):
        np.testing.assert_allclose(s.GetDirection(), direction, rtol=0, atol=1e-15)
        np.testing.assert_allclose(s.GetSpacing(), img.GetSpacing(), rtol=1e-15)
        np.testing.assert_allclose(s.GetOrigin(), img.GetOrigin(), rtol=1e-15)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(stored), arr)


def test_human_labels_are_versioned_and_never_overwritten(project):
    case = "phantom_ct_003"
    ref = project.read_label(case, "reference")
    edited = sitk.BinaryThreshold(ref, 1, 1, 1, 0)  # organ only
    assert project.add_human_label(case, ref, author="dr_a") == 1
    first = project.label_path(case, "human", 1).read_bytes()
    assert project.add_human_label(case, edited, author="dr_b") == 2
    assert project.human_versions(case) == [1, 2]
    assert project.label_path(case, "human", 1).read_bytes() == first
    assert project.label_path(case, "human") == project.label_path(case, "human", 2)
    prov = project.provenance(case, "human")
    assert prov["version"] == 2 and prov["author"] == "dr_b" and prov["source"] == "human"
    assert prov["label_values_present"] == [1]
    assert project.provenance(case, "human", 1)["author"] == "dr_a"


def test_machines_cannot_write_human_labels(project):
    ref = project.read_label("phantom_ct_000", "reference")
    with pytest.raises(InputError, match="add_human_label"):
        project.write_label("phantom_ct_000", "human", ref, source="nnunet")
    with pytest.raises(InputError, match="human labels come from"):
        project.add_human_label("phantom_ct_000", ref, source="nnunet")
    assert project.human_versions("phantom_ct_000") == []


def test_machine_labels_replace_reference_does_not(project):
    case = "phantom_ct_001"
    ref = project.read_label(case, "reference")
    empty = sitk.Image(ref.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(ref)
    project.write_label(case, "pseudo", ref, source="sam", produced_by={"model": "vit_b"})
    project.write_label(case, "pseudo", empty, source="sam", produced_by={"model": "vit_b"})
    assert sitk.GetArrayFromImage(project.read_label(case, "pseudo")).max() == 0
    assert project.provenance(case, "pseudo")["produced_by"] == {"model": "vit_b"}
    with pytest.raises(InputError, match="reference label already exists"):
        project.write_label(case, "reference", empty, source="import")
    assert sitk.GetArrayFromImage(project.read_label(case, "reference")).max() == 3


def test_label_checked_against_stored_image(project):
    ref = project.read_label("phantom_ct_000", "reference")
    moved = sitk.Image(ref)
    moved.SetOrigin((0.0, 0.0, 0.0))
    with pytest.raises(InputError, match="origin"):
        project.add_human_label("phantom_ct_000", moved)
    arr = sitk.GetArrayFromImage(ref)
    arr[0, 0, 0] = 9
    bad = sitk.GetImageFromArray(arr)
    bad.CopyInformation(ref)
    with pytest.raises(InputError, match=r"\[9\]"):
        project.write_label("phantom_ct_000", "predicted", bad, source="nnunet")


def test_import_labels_as_pseudo_and_human(project, phantom_dir):
    done = project.import_labels([phantom_dir / "labels" / "phantom_ct_004.nii.gz"], "pseudo", source="totalseg")
    assert done == [("phantom_ct_004", None)]
    assert project.provenance("phantom_ct_004", "pseudo")["source"] == "totalseg"
    done = project.import_labels([phantom_dir / "labels" / "phantom_ct_004.nii.gz"], "human", author="dr_c")
    assert done == [("phantom_ct_004", 1)]
    assert project.provenance("phantom_ct_004", "human")["source"] == "human-import"


def test_status_counts(project):
    project.add_human_label("phantom_ct_000", project.read_label("phantom_ct_000", "reference"))
    project.add_human_label("phantom_ct_000", project.read_label("phantom_ct_000", "reference"))
    project.write_label("phantom_ct_001", "pseudo", project.read_label("phantom_ct_001", "reference"), source="sam")
    s = project.status()
    assert s["cases"] == 6 and s["label_counts"] == {"reference": 6, "pseudo": 1, "human": 1, "predicted": 0}
    assert s["human_versions"] == 2 and s["unlabeled"] == 4
    rows = {r["case"]: r for r in project.case_table()}
    assert rows["phantom_ct_000"]["human_versions"] == 2 and rows["phantom_ct_001"]["pseudo"]


def test_event_log_skips_a_torn_last_line_and_cuts_it_before_appending(project):
    n = len(project.events())
    with open(project.root / "events.jsonl", "a") as fh:
        fh.write('{"event": "half-writ')
    assert len(project.events()) == n
    project.add_human_label("phantom_ct_000", project.read_label("phantom_ct_000", "reference"))
    events = project.events()  # would raise if the torn line were now inside the log
    assert len(events) == n + 1 and events[-1]["event"] == "human_label_added"
    assert "half-writ" not in (project.root / "events.jsonl").read_text()


def test_label_names_with_newlines_refused():
    with pytest.raises(InputError, match="invalid label name"):
        LabelTable.from_mapping({"a\nb": 1})


def test_threads_sharing_a_project_object_are_serialised(project):
    import threading

    ref = project.read_label("phantom_ct_005", "reference")
    versions, errors = [], []

    def accept():
        try:
            for _ in range(3):
                versions.append(project.add_human_label("phantom_ct_005", ref))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=accept) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sorted(versions) == list(range(1, 13)) and project.human_versions("phantom_ct_005") == list(range(1, 13))
    assert [e["version"] for e in project.events() if e["event"] == "human_label_added"] == list(range(1, 13))


def test_human_versions_without_hard_links(project, monkeypatch):
    """File systems without hard links (exFAT, some shares) still never overwrite a version."""
    import errno

    def no_links(src, dst):
        raise OSError(errno.EPERM, "hard links not supported")

    monkeypatch.setattr(os, "link", no_links)
    ref = project.read_label("phantom_ct_004", "reference")
    assert project.add_human_label("phantom_ct_004", ref) == 1
    assert project.add_human_label("phantom_ct_004", ref) == 2
    first = project.label_path("phantom_ct_004", "human", 1)
    before = first.read_bytes()
    with pytest.raises(FileExistsError):
        volumes.write_image(ref, first, exclusive=True)
    assert first.read_bytes() == before


def test_add_after_a_crash_mid_commit(project, phantom_dir, tmp_path):
    """A crash between renames leaves files of a case whose image is not in place:
    the case does not exist, and adding it again replaces the leftovers."""
    src = tmp_path / "src"
    src.mkdir()
    img = sitk.ReadImage(str(phantom_dir / "images" / "phantom_ct_000.nii.gz"))
    volumes.write_image(img, src / "late.nii.gz")
    leftover = project.root / "labels" / "reference" / "late.nrrd"
    leftover.write_bytes(b"left by a killed add")
    assert "late" not in project.cases() and "late" not in project.labeled_cases("reference")
    assert project.add_cases([src]) == ["late"]
    assert not leftover.exists() and "late" not in project.labeled_cases("reference")


def test_import_labels_checks_all_before_storing(project, phantom_dir, tmp_path):
    folder = tmp_path / "labels"
    folder.mkdir()
    lab = sitk.ReadImage(str(phantom_dir / "labels" / "phantom_ct_000.nii.gz"))
    volumes.write_image(lab, folder / "phantom_ct_000.nii.gz")
    volumes.write_image(sitk.ReadImage(str(phantom_dir / "labels" / "phantom_ct_001.nii.gz")), folder / "phantom_ct_001.nrrd")
    volumes.write_image(lab, tmp_path / "phantom_ct_000.nrrd")
    with pytest.raises(InputError, match="already has a reference label"):
        project.import_labels([folder], "reference")
    with pytest.raises(InputError, match="gives the same case"):
        project.import_labels([folder, tmp_path / "phantom_ct_000.nrrd"], "pseudo")
    assert project.labeled_cases("pseudo") == []


def test_provenance_flags_a_sidecar_that_does_not_match(project):
    case = "phantom_ct_002"
    assert project.provenance(case, "reference")["matches_file"] is True
    path = project.label_path(case, "reference")
    sitk.WriteImage(sitk.BinaryThreshold(sitk.ReadImage(str(path)), 1, 1, 1, 0), str(path), True)
    assert project.provenance(case, "reference")["matches_file"] is False


def test_stale_temporaries_removed_under_lock(project):
    stale = project.root / "labels" / "reference" / f"{atomic.TMP_PREFIX}999-dead-phantom_ct_000.nrrd"
    stale.write_bytes(b"partial")
    staging = project.root / ".staging-dead"
    staging.mkdir()
    with project.lock("test"):
        pass
    assert not stale.exists() and not staging.exists()


def _hold_lock_script(root, seconds):
    return textwrap.dedent(f"""
        import sys, time
        from ALSegLib.project import Project
        p = Project.open({str(root)!r})
        with p.lock("held by test"):
            print("locked", flush=True)
            time.sleep({seconds})
    """)


def test_second_writer_waits_then_fails_naming_the_holder(project):
    holder = subprocess.Popen([sys.executable, "-c", _hold_lock_script(project.root, 30)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        other = Project.open(project.root)
        start = time.monotonic()
        with pytest.raises(ProjectLockedError) as err:
            with other.lock("second", timeout=0.5):
                pass
        assert time.monotonic() - start >= 0.5
        assert f"pid {holder.pid}" in str(err.value) and "held by test" in str(err.value)
    finally:
        holder.kill()
        holder.wait()


def test_lock_of_a_killed_writer_is_released(project):
    holder = subprocess.Popen([sys.executable, "-c", _hold_lock_script(project.root, 60)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with Project.open(project.root).lock("after kill", timeout=2):
        pass


def test_second_writer_that_waits_gets_the_lock(project):
    holder = subprocess.Popen([sys.executable, "-c", _hold_lock_script(project.root, 1)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        v = Project.open(project.root).add_human_label("phantom_ct_000", project.read_label("phantom_ct_000", "reference"))
        assert v == 1
    finally:
        holder.wait()


def test_open_errors(tmp_path, project):
    with pytest.raises(InputError, match="project folder not found"):
        Project.open(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="alseg.json missing"):
        Project.open(tmp_path / "empty")
    cfg = project.root / "alseg.json"
    good = cfg.read_text()
    cfg.write_text("{not json")
    with pytest.raises(InputError, match=r"alseg\.json: malformed JSON"):
        Project.open(project.root)
    cfg.write_text(good.replace('"schema": 1', '"schema": 99'))
    with pytest.raises(InputError, match="newer than this ALSeg"):
        Project.open(project.root)


def test_dicom_series_added_as_a_case(tmp_path, table, shared_data):
    folder = shared_data / "ct_example" / "example_ct_dicom"
    if not folder.is_dir():
        pytest.skip("no shared DICOM series")
    p = Project.create(tmp_path / "p", table, "CT")
    assert p.add_cases([folder]) == ["example_ct_dicom"]
    assert p.read_image("example_ct_dicom").GetSize() == (512, 512, 20)


def test_the_lock_belongs_to_the_thread_that_took_it(project):
    """A write checks that *its* thread holds the writer lock: another thread of the same
    process, while the lock is held, is refused instead of writing unserialised."""
    import threading

    seen = []

    def other_thread():
        try:
            project.require_lock()
            seen.append("allowed")
        except RuntimeError as exc:
            seen.append(str(exc))

    with project.lock("test"):
        project.require_lock()  # the holder itself may write
        worker = threading.Thread(target=other_thread)
        worker.start()
        worker.join()
    assert seen == ["project write outside the project lock"]
    with pytest.raises(RuntimeError):
        project.require_lock()  # released


def test_nnunet_named_images_find_their_labels_and_values_are_mapped(tmp_path, table):
    """nnU-Net/MSD layout: imagesTr/case_0000.nii.gz with labelsTr/case.nii.gz is one case 'case'; a
    reference in another tool's values comes in through a mapping (unmapped values: background)."""
    images, labels = tmp_path / "imagesTr", tmp_path / "labelsTr"
    images.mkdir()
    labels.mkdir()
    image, label = phantoms.make_phantom(0, "CT", size=24)
    sitk.WriteImage(image, str(images / "liver_007_0000.nii.gz"))
    other = sitk.GetArrayFromImage(label).astype(np.uint8)
    other[other == 1] = 5  # the other tool calls the organ 5
    other[other == 2] = 9  # and has a class the project does not (the vessel), not mapped
    relabeled = sitk.GetImageFromArray(other)
    relabeled.CopyInformation(label)
    sitk.WriteImage(relabeled, str(labels / "liver_007.nii.gz"))
    project = Project.create(tmp_path / "p", table, "CT")
    with pytest.raises(InputError, match="not in the label table|not label values"):
        project.add_cases([images], reference_dir=labels)
    assert project.cases() == []
    assert project.add_cases([images], reference_dir=labels, reference_map="5=1,3=3") == ["liver_007"]
    stored = sitk.GetArrayFromImage(project.read_label("liver_007", "reference"))
    ref = sitk.GetArrayFromImage(label)
    assert ((stored == 1) == (ref == 1)).all() and not (stored == 2).any() and ((stored == 3) == (ref == 3)).all()
    prov = project.provenance("liver_007", "reference")["produced_by"]
    assert prov["value_map"] == {"5": 1, "3": 3} and "9" in prov["dropped_values"]


def test_import_labels_maps_values_and_replaces_a_reference_only_when_asked(project, tmp_path, run_cli):
    case = project.cases()[0]
    ref = project.read_label(case, "reference")
    arr = sitk.GetArrayFromImage(ref).astype(np.uint8)
    arr[arr == 1] = 7
    other = sitk.GetImageFromArray(arr)
    other.CopyInformation(ref)
    folder = tmp_path / "totalseg"
    folder.mkdir()
    sitk.WriteImage(other, str(folder / f"{case}.nii.gz"))
    code, _, err = run_cli("import-labels", project.root, folder, "--kind", "pseudo")
    assert code == 2 and "--map" in err
    code, _, _ = run_cli("import-labels", project.root, folder, "--kind", "pseudo", "--map", "7=1,2=2,3=3")
    assert code == 0
    np.testing.assert_array_equal(sitk.GetArrayFromImage(project.read_label(case, "pseudo")), sitk.GetArrayFromImage(ref))
    # a reference is replaced only with --replace, and the event log keeps the replaced file's checksum
    before = (project.root / "labels" / "reference" / f"{case}.nrrd").read_bytes()
    code, _, err = run_cli("import-labels", project.root, folder, "--kind", "reference", "--map", "7=2")
    assert code == 2 and "--replace" in err
    assert (project.root / "labels" / "reference" / f"{case}.nrrd").read_bytes() == before
    code, _, _ = run_cli("import-labels", project.root, folder, "--kind", "reference", "--map", "7=2", "--replace")
    assert code == 0 and (sitk.GetArrayFromImage(project.read_label(case, "reference")) == 2).any()
    replaced = [e for e in project.events() if e["event"] == "reference_replaced"]
    assert len(replaced) == 1 and replaced[0]["case"] == case and len(replaced[0]["replaced_sha256"]) == 64
    code, _, err = run_cli("import-labels", project.root, folder, "--kind", "human", "--replace")
    assert code == 2 and "versioned, never replaced" in err


def test_known_structures_get_slicer_s_anatomy_colours_by_default():
    """The liver once got grey-green: names Slicer's GenericAnatomyColors knows take its colour."""
    table = LabelTable.parse("liver=1,kidney_left=2,Spleen=3,myocardium=4,tumor=5:#ff0000")
    colors = {c.name: tuple(round(255 * v) for v in c.color) for c in table.classes}
    assert colors["liver"] == (221, 130, 101) and colors["kidney_left"] == (185, 102, 83)
    assert colors["Spleen"] == (157, 108, 162)
    assert colors["tumor"] == (255, 0, 0)  # a colour given wins
    assert colors["myocardium"] != colors["liver"]  # unknown: the palette
