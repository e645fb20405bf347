"""The Slicer module's glue (ALSeg/ALSegSlicer) on Slicer's real MRML core (slicer-core, no Qt)."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import REPO
from test_volumes import OBLIQUE, ORIGIN, SPACING, oblique_image

slicer = pytest.importorskip("slicer")
sys.path.insert(0, str(REPO / "ALSeg"))

from ALSegLib import volumes  # noqa: E402
from ALSegLib.errors import InputError  # noqa: E402
from ALSegLib.project import LabelClass, LabelTable, Project  # noqa: E402
from ALSegLib.selection.run import select_cases  # noqa: E402
from ALSegSlicer import scene as glue  # noqa: E402
from ALSegSlicer.review import ReviewSession  # noqa: E402

# values that are neither 1..N nor in the order of the names: a mapping by order would be caught
TABLE = LabelTable([LabelClass("liver", 5, (0.9, 0.4, 0.3)), LabelClass("spleen", 2, (0.1, 0.8, 0.2)),
                    LabelClass("tumor", 7, (0.2, 0.3, 0.95))])


def labeled_oblique():
    arr = np.zeros((5, 7, 6), np.uint8)
    arr[1:3, 2:5, 1:4] = 5
    arr[3:5, 0:2, 4:6] = 7
    arr[0, 0, 0:2] = 2
    return oblique_image(arr)


def segment_voxels(scene, seg_node, reference, name):
    """Voxels of one segment on the reference grid, through Slicer's exporter."""
    import vtk

    ids = vtk.vtkStringArray()
    ids.InsertNextValue(seg_node.GetSegmentation().GetSegmentIdBySegmentName(name))
    out = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg_node, ids, out, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY)
    arr = glue.voxels(out)
    scene.RemoveNode(out)
    return arr


def paint(scene, seg_node, reference, name, mask):
    """Replace one segment's voxels, as a Segment Editor effect would."""
    import vtk

    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.CopyInformation(glue.image_from_volume_node(reference))
    temporary = glue.volume_node_from_image(scene, image, "paint", labelmap=True)
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(seg_node.GetSegmentation().GetSegmentIdBySegmentName(name))
    assert slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, seg_node, ids)
    scene.RemoveNode(temporary)


def test_volume_node_keeps_exact_oblique_anisotropic_geometry(tmp_path):
    scene = slicer.vtkMRMLScene()
    img = oblique_image()
    node = glue.volume_node_from_image(scene, img, "ct")
    back = glue.image_from_volume_node(node)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    np.testing.assert_allclose(back.GetDirection(), OBLIQUE, atol=1e-12)
    np.testing.assert_allclose(back.GetSpacing(), SPACING, atol=1e-12)
    np.testing.assert_allclose(back.GetOrigin(), ORIGIN, atol=1e-9)
    # Slicer's own reader of the same file gives the node the same IJK-to-RAS matrix
    path = tmp_path / "ct.nii.gz"
    volumes.write_image(img, path)
    theirs = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(theirs)
    np.testing.assert_allclose(glue.node_ijk_to_ras(theirs), glue.node_ijk_to_ras(node), atol=1e-5)
    assert np.array_equal(glue.voxels(theirs), sitk.GetArrayFromImage(img))


def test_segmentation_takes_names_colors_and_values_from_the_label_table():
    scene = slicer.vtkMRMLScene()
    label = labeled_oblique()
    arr = sitk.GetArrayFromImage(label)
    arr[arr == 2] = 0  # spleen absent: its segment must still exist, empty, to draw in
    label = _like(label, arr)
    volume = glue.volume_node_from_image(scene, oblique_image(), "img")
    seg = glue.segmentation_node_from_label(scene, label, volume, TABLE, "seg")
    segmentation = seg.GetSegmentation()
    got = [(segmentation.GetNthSegment(i).GetName(), tuple(round(c, 6) for c in segmentation.GetNthSegment(i).GetColor()))
           for i in range(segmentation.GetNumberOfSegments())]
    assert got == [(c.name, tuple(round(v, 6) for v in c.color)) for c in TABLE.classes]
    for c in TABLE.classes:
        assert np.array_equal(segment_voxels(scene, seg, volume, c.name) > 0, arr == c.value), c.name
    # unknown values are refused, naming them
    bad = arr.copy()
    bad[0, 0, 0] = 9
    with pytest.raises(InputError, match=r"\[9\]"):
        glue.segmentation_node_from_label(scene, _like(label, bad), volume, TABLE, "bad")


def _like(ref, arr):
    out = sitk.GetImageFromArray(arr)
    out.CopyInformation(ref)
    return out


def test_export_maps_segments_by_name_not_order():
    scene = slicer.vtkMRMLScene()
    label = labeled_oblique()
    volume = glue.volume_node_from_image(scene, oblique_image(), "img")
    seg = glue.segmentation_node_from_label(scene, label, volume, TABLE, "seg")
    back = glue.label_from_segmentation(scene, seg, volume, TABLE)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
    np.testing.assert_allclose(back.GetDirection(), OBLIQUE, atol=1e-12)
    # reorder the segments (tumor first) and rename one's case: values still follow the names
    segmentation = seg.GetSegmentation()
    segmentation.SetSegmentIndex(segmentation.GetSegmentIdBySegmentName("tumor"), 0)
    segmentation.GetSegment(segmentation.GetSegmentIdBySegmentName("liver")).SetName("Liver")
    assert segmentation.GetNthSegment(0).GetName() == "tumor"
    back = glue.label_from_segmentation(scene, seg, volume, TABLE)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
    # no transient nodes left behind
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    # a segment the table does not know is an error naming it
    segmentation.AddEmptySegment("extra", "my new structure", [1, 1, 1])
    with pytest.raises(InputError, match="my new structure"):
        glue.label_from_segmentation(scene, seg, volume, TABLE)


def test_seg_nrrd_round_trip_through_slicers_writer_and_reader(tmp_path):
    scene = slicer.vtkMRMLScene()
    label = labeled_oblique()
    volume = glue.volume_node_from_image(scene, oblique_image(), "img")
    seg = glue.segmentation_node_from_label(scene, label, volume, TABLE, "seg")
    path = glue.save_segmentation(seg, tmp_path / "case.seg.nrrd")
    other = slicer.vtkMRMLScene()
    volume2 = glue.volume_node_from_image(other, oblique_image(), "img")
    loaded = glue.load_segmentation(other, path)
    names = [loaded.GetSegmentation().GetNthSegment(i).GetName() for i in range(loaded.GetSegmentation().GetNumberOfSegments())]
    assert names == ["liver", "spleen", "tumor"]
    back = glue.label_from_segmentation(other, loaded, volume2, TABLE)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
    # and the engine's own .seg.nrrd writer (alseg export) reads back the same through Slicer
    engine = tmp_path / "engine.seg.nrrd"
    volumes.write_label_file(label, engine, TABLE.segments())
    back = glue.label_from_segmentation(other, glue.load_segmentation(other, engine), volume2, TABLE)
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(label))
    with pytest.raises(InputError, match="no such segmentation file"):
        glue.load_segmentation(other, tmp_path / "missing.seg.nrrd")


def test_volumes_in_the_scene_become_project_cases(tmp_path):
    scene = slicer.vtkMRMLScene()
    project = Project.create(tmp_path / "p", TABLE, "CT")
    node = glue.volume_node_from_image(scene, oblique_image(), "scene_volume")
    assert glue.add_volume_nodes(project, [node]) == ["scene_volume"]
    stored = project.read_image("scene_volume")
    np.testing.assert_allclose(stored.GetDirection(), OBLIQUE, atol=1e-6)
    np.testing.assert_allclose(stored.GetSpacing(), SPACING, atol=1e-6)
    assert np.array_equal(sitk.GetArrayFromImage(stored), sitk.GetArrayFromImage(oblique_image()))


def test_case_ids_come_from_node_names_as_from_file_names(tmp_path):
    scene = slicer.vtkMRMLScene()
    project = Project.create(tmp_path / "p", TABLE, "CT")
    dicom = glue.volume_node_from_image(scene, oblique_image(), "3: CT chest")  # as Slicer's DICOM module names them
    other = glue.volume_node_from_image(scene, oblique_image(), "CT/abdomen (2)")
    assert glue.add_volume_nodes(project, [dicom, other]) == ["3__CT_chest", "CT_abdomen__2_"]
    same = glue.volume_node_from_image(scene, oblique_image(), "3: CT?chest")
    fresh = glue.volume_node_from_image(scene, oblique_image(), "fresh")
    with pytest.raises(InputError, match="'3: CT\\?chest'.*3__CT_chest"):
        glue.add_volume_nodes(project, [fresh, same])  # clashes with a case already there: nothing is added
    assert project.cases() == ["3__CT_chest", "CT_abdomen__2_"]
    twins = [glue.volume_node_from_image(scene, oblique_image(), n) for n in ("a b", "a:b")]
    with pytest.raises(InputError, match="'a:b'.*as volume 'a b' does"):
        glue.add_volume_nodes(project, twins)
    assert project.cases() == ["3__CT_chest", "CT_abdomen__2_"]
    # the volume the review opened for a case is that case, not a new one
    opened = ReviewSession(project, scene).open("3__CT_chest")
    with pytest.raises(InputError, match="is case '3__CT_chest' of the project, opened for review"):
        glue.add_volume_nodes(project, [opened.volume])
    assert project.cases() == ["3__CT_chest", "CT_abdomen__2_"]


def _pseudo_without_lesion(project):
    for case in project.cases():
        ref = project.read_label(case, "reference")
        arr = sitk.GetArrayFromImage(ref)
        arr[arr == 3] = 0
        project.write_label(case, "pseudo", _like(ref, arr), source="test")


def test_accept_records_the_reviewers_effort_and_the_round_report_sums_it(project):
    from ALSegLib import report, rounds

    _pseudo_without_lesion(project)
    record = select_cases(project, 2, "random", seed=3)
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene)
    first = session.open_next()
    reference = sitk.GetArrayFromImage(project.read_label(first.case, "reference"))
    proposal = sitk.GetArrayFromImage(project.read_label(first.case, "pseudo"))
    paint(scene, first.segmentation, first.volume, "lesion", reference == 3)
    version, second = session.accept_and_next()
    effort = project.provenance(first.case, "human", version)["effort"]
    assert effort["voxels_changed"] == int(np.count_nonzero(proposal != reference)) > 0
    lesion_free = [v for v in (1, 2) if (proposal == v).any() or (reference == v).any()]
    assert effort["dice_to_proposal"] == pytest.approx(np.mean([1.0] * len(lesion_free) + [0.0]), abs=1e-4)
    assert effort["unchanged"] is False and effort["seconds"] >= 0 and effort["started_empty"] is False
    session.accept()  # the second one as proposed
    effort2 = project.provenance(second.case, "human", 1)["effort"]
    assert effort2 == {**effort2, "voxels_changed": 0, "unchanged": True, "dice_to_proposal": 1.0}
    summary = rounds.review_effort(project, record["round"])
    assert (summary["accepted"], summary["unchanged"]) == (2, 1)
    assert summary["mean_dice_to_proposal"] == pytest.approx((effort["dice_to_proposal"] + 1.0) / 2, abs=1e-4)
    assert rounds.review_effort(project, record["round"] + 1)["accepted"] == 0
    assert "1/2 accepted unchanged" in rounds.effort_text(summary)
    paths = report.write_round_report(project, rounds.read_round(project, record["round"]))
    text = (project.root / paths["markdown"]).read_text()
    assert "Annotation effort" in text and "1/2 accepted unchanged" in text and first.case in text
    stored = json.loads((project.root / paths["json"]).read_text())["effort"]
    assert (stored["accepted"], stored["unchanged"]) == (2, 1)
    # the model's quality without references: the reviewers' corrections by round, in the report and the panel
    assert "The model against what the reviewers accepted, by round" in text
    review = json.loads((project.root / paths["json"]).read_text())["review_curve"]
    assert [r["round"] for r in review["rounds"]] == [record["round"]] and not review["done"]
    from ALSegSlicer.facade import Session

    session = Session(scene)
    session.open(project.root)
    header, rows, verdict = session.review_curve_rows()
    model_dice = review["rounds"][0]["mean_model_dice"]
    assert rows == [[str(record["round"]), "2", "" if model_dice is None else f"{model_dice:.3f}", "1",
                     f"{summary['mean_dice_to_proposal']:.3f}", f"{review['rounds'][0]['corrected_fraction']:.3f}"]]
    assert verdict.startswith("not done") and "2 rounds running" in verdict


def test_revert_throws_the_edits_away_and_keeps_every_stored_label(project):
    _pseudo_without_lesion(project)
    select_cases(project, 1, "random", seed=0)
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene)
    opened = session.open_next()
    proposal = sitk.GetArrayFromImage(project.read_label(opened.case, "pseudo"))
    paint(scene, opened.segmentation, opened.volume, "organ", np.zeros(proposal.shape, bool))
    old = opened.segmentation
    reverted = session.revert()
    assert old.GetScene() is None and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    label = glue.label_from_segmentation(scene, reverted.segmentation, reverted.volume, project.labels)
    assert np.array_equal(sitk.GetArrayFromImage(label), proposal) and reverted.started_from == "pseudo"
    # a case opened from a human version reverts to its machine label; the human version stays
    session.accept()
    again = session.open(opened.case)
    assert again.started_from == "human v0001"
    assert session.revert().started_from == "pseudo" and project.human_versions(opened.case) == [1]
    bare = Project.create(project.root.parent / "bare", project.labels, "CT")
    bare.add_cases([project.image_path(opened.case)])
    lonely = ReviewSession(bare, scene)
    lonely.open(bare.cases()[0])
    with pytest.raises(InputError, match="no machine label"):
        lonely.revert()


def test_the_next_case_is_read_ahead_and_read_again_when_its_files_changed(project):
    _pseudo_without_lesion(project)
    queued = [q["case"] for q in select_cases(project, 3, "random", seed=2)["queue"]]
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene)
    session.open_next()
    state, future = session._ahead
    assert state[0] == queued[1]
    files = future.result(timeout=60)
    assert files.started_from == "pseudo" and np.array_equal(files.voxels,
                                                             sitk.GetArrayFromImage(project.read_image(queued[1])))
    session.accept()
    second = session.open_next()  # from the read-ahead
    assert second.case == queued[1]
    assert np.array_equal(second.proposal, sitk.GetArrayFromImage(project.read_label(queued[1], "pseudo")))
    # the third case's pseudo-label is replaced after it was read ahead: the open reads the new one
    session._ahead[1].result(timeout=60)
    ref = project.read_label(queued[2], "reference")
    project.write_label(queued[2], "pseudo", ref, source="a newer model")
    session.accept()
    third = session.open_next()
    assert np.array_equal(third.proposal, sitk.GetArrayFromImage(ref))


def test_a_closed_scene_forgets_the_open_case(project):
    _pseudo_without_lesion(project)
    select_cases(project, 2, "random", seed=0)
    scene = slicer.vtkMRMLScene()
    from ALSegSlicer.facade import Session

    session = Session(scene)
    session.open(project.root)
    first = session.open_next()
    scene.Clear(0)  # File > Close Scene: every node is gone
    session.scene_closed()
    assert session.current_case() is None
    with pytest.raises(InputError, match="no case is open"):
        session.revert()
    reopened = session.open_next()  # opens on the new scene, touching none of the removed nodes
    assert reopened.case == first.case and reopened.volume.GetScene() is scene


def test_review_opens_the_queue_in_order_and_accept_stores_new_human_versions(project):
    for case in project.cases():  # pseudo-labels: the reference with the lesion removed
        arr = sitk.GetArrayFromImage(project.read_label(case, "reference"))
        arr[arr == 3] = 0
        ref = project.read_label(case, "reference")
        project.write_label(case, "pseudo", _like(ref, arr), source="test")
    record = select_cases(project, 2, "random", seed=1)
    queued = [q["case"] for q in record["queue"]]
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene, author="dr test")
    assert [q["case"] for q in session.queue()] == queued

    opened = session.open_next()
    assert opened.case == queued[0] and opened.started_from == "pseudo" and opened.round == record["round"]
    reference = sitk.GetArrayFromImage(project.read_label(opened.case, "reference"))
    # the radiologist draws the missing lesion, then accepts
    paint(scene, opened.segmentation, opened.volume, "lesion", reference == 3)
    version, nxt = session.accept_and_next()
    assert version == 1
    stored = project.read_label(queued[0], "human", 1)
    assert np.array_equal(sitk.GetArrayFromImage(stored), reference)
    prov = project.provenance(queued[0], "human", 1)
    assert prov["source"] == "human" and prov["author"] == "dr test" and prov["produced_by"]["started_from"] == "pseudo"
    # the next case opens; the first one's nodes are gone from the scene
    assert nxt.case == queued[1] and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1

    # skipping puts a case last; with one case left it comes straight back
    assert session.skip().case == queued[1]
    # re-opening an accepted case starts from its latest human version; accepting again adds v0002, v0001 stays
    again = session.open(queued[0])
    assert again.started_from == "human v0001"
    paint(scene, again.segmentation, again.volume, "lesion", np.zeros_like(reference, bool))
    assert session.accept() == 2
    assert np.array_equal(sitk.GetArrayFromImage(project.read_label(queued[0], "human", 1)), reference)
    assert (sitk.GetArrayFromImage(project.read_label(queued[0], "human", 2)) == 3).sum() == 0

    session.open_next()
    session.accept()
    assert session.open_next() is None and session.queue() == []
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_accept_refuses_an_unknown_segment_and_stores_nothing(project):
    select_cases(project, 1, "random", seed=0)
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene)
    opened = session.open_next()
    assert opened.started_from is None  # no pseudo-label, no prediction: empty segments to draw in
    opened.segmentation.GetSegmentation().AddEmptySegment("x", "Segment_1", [1, 0, 0])
    with pytest.raises(InputError, match="Segment_1"):
        session.accept()
    assert project.human_versions(opened.case) == []


# --- the logic facade (what ALSegLogic calls) ----------------------------------------------

def test_prompts_placed_as_markups_reach_sam_on_the_right_voxels(tmp_path, phantom_dir):
    from ALSegLib.pseudolabels.prompts import case_prompts, read_prompt_file
    from ALSegLib.pseudolabels.slices import volume_slices
    from ALSegSlicer.facade import Session

    scene = slicer.vtkMRMLScene()
    session = Session(scene)
    project = session.create(tmp_path / "p", "organ=1,vessel=2,lesion=3", "CT")
    case = session.add_files([phantom_dir / "images"])[0]
    image = project.read_image(case)
    volume = glue.volume_node_from_image(scene, image, case)
    # a point and a box placed on voxel (i, j, k) = (10, 12, 7), in RAS as Slicer's markups hold them
    ijk_to_ras = glue.node_ijk_to_ras(volume)
    ras = (ijk_to_ras @ np.array([10, 12, 7, 1.0]))[:3]
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
    points.AddControlPointWorld(vtk_point(ras))
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(*ras)
    roi.SetSizeWorld(6.0, 9.0, 3.0)
    path = session.add_prompt(case, "organ", points=points, roi=roi)
    pf = read_prompt_file(path, list(project.labels.mapping), project.cases())
    (prompt,) = case_prompts(pf, case, image, volume_slices(image, "axial"))["organ"]
    assert prompt.slice == 7 and prompt.points == [(pytest.approx(10.0), pytest.approx(12.0))]
    x0, y0, x1, y1 = prompt.box
    assert (x0 + x1) / 2 == pytest.approx(10.0) and (y0 + y1) / 2 == pytest.approx(12.0)
    assert x1 - x0 == pytest.approx(6.0 / image.GetSpacing()[0]) and y1 - y0 == pytest.approx(9.0 / image.GetSpacing()[1])
    # a deep ROI is a 3D box: the middle slice, propagated only through the ROI's slices
    roi.SetSizeWorld(6.0, 9.0, 5 * image.GetSpacing()[2])
    path = session.add_prompt(case, "vessel", roi=roi)
    pf = read_prompt_file(path, list(project.labels.mapping), project.cases())
    (deep,) = case_prompts(pf, case, image, volume_slices(image, "axial"))["vessel"]
    lo, hi = deep.range
    assert 4 <= hi - lo <= 6 and lo <= 7 <= hi and deep.slice == (lo + hi) // 2
    with pytest.raises(InputError, match="not in the label table"):
        session.add_prompt(case, "spleen", points=points)
    # the panel says how many prompted cases are enough (the round bootstraps the others)
    n = len(project.cases())  # the six phantoms, one prompted
    assert session.prompt_coverage_text().startswith(f"Prompts for 1 of {n} cases. Prompt at least 5 (10%): a round "
                                                     "labels the others from them; more prompted cases end closer")
    text = project.layout.slicer_prompts.read_text()
    project.layout.slicer_prompts.write_text(text[:-3])  # cut short by hand: said in the panel, nothing raised
    assert session.prompt_coverage_text().startswith(f"The prompt file {project.layout.slicer_prompts} cannot be read")
    project.layout.slicer_prompts.write_text(text)


def test_each_prompt_case_label_and_kind_gets_its_own_markups_node(tmp_path, phantom_dir):
    """Points placed for case B never land in the node of case A's stored prompt, and a node placed
    for one case cannot be stored as another's."""
    from ALSegLib.pseudolabels.prompts import read_prompt_file
    from ALSegSlicer.facade import Session

    scene = slicer.vtkMRMLScene()
    session = Session(scene)
    project = session.create(tmp_path / "p", "organ=1,vessel=2,lesion=3", "CT")
    a, b = session.add_files([phantom_dir / "images"])[:2]
    assert session.prompt_markups(a, "organ", "positive", create=False) is None
    points_a = session.prompt_markups(a, "organ", "positive")
    assert points_a.GetName() == f"{a} organ positive" and points_a.IsA("vtkMRMLMarkupsFiducialNode")
    assert session.prompt_markups(a, "organ", "positive") is points_a  # found again, not made twice
    box_a = session.prompt_markups(a, "organ", "box")
    assert box_a.IsA("vtkMRMLMarkupsROINode") and box_a is not points_a
    points_a.AddControlPointWorld(vtk_point(glue.node_ijk_to_ras(
        glue.volume_node_from_image(scene, project.read_image(a), a))[:3, 3]))
    points_b = session.prompt_markups(b, "organ", "positive")
    assert points_b is not points_a and points_b.GetNumberOfControlPoints() == 0
    assert session.prompt_markups(a, "vessel", "positive") not in (points_a, points_b)  # per label too
    with pytest.raises(InputError, match=f"placed as positive for {a}/organ, not as positive for {b}/organ"):
        session.add_prompt(b, "organ", points=points_a)
    with pytest.raises(InputError, match="not as negative"):
        session.add_prompt(a, "organ", negative=points_a)  # a positive node given as negative
    path = session.add_prompt(a, "organ", points=points_a)
    pf = read_prompt_file(path, list(project.labels.mapping), project.cases())
    assert list(pf.cases) == [a]
    assert points_a.GetLocked() and points_a.GetAttribute("ALSeg.PromptStored") == "1"
    with pytest.raises(InputError, match="stored already"):
        session.add_prompt(a, "organ", points=points_a)
    fresh = session.prompt_markups(a, "organ", "positive")  # the next prompt of a starts a new node
    assert fresh is not points_a and fresh.GetNumberOfControlPoints() == 0
    # the panel's "parts kept per structure" goes to every label of the prompt file SAM reads
    assert session.set_keep_components(2) == path
    pf = read_prompt_file(path, list(project.labels.mapping), project.cases())
    assert {n: s.post.keep_components for n, s in pf.labels.items()} == {"organ": 2, "vessel": 2, "lesion": 2}
    assert list(pf.cases) == [a]  # the prompts stay
    with pytest.raises(InputError, match="whole number"):
        session.set_keep_components(-1)
    with pytest.raises(InputError, match="kind"):
        session.prompt_markups(a, "organ", "circle")


def test_an_unset_folder_field_is_refused_not_read_as_the_working_directory(tmp_path, monkeypatch):
    """An untouched path field reads "" ("." from an unset pathlib.Path parameter): Create and Open
    say to choose a folder, and nothing is made in Slicer's working directory."""
    from ALSegSlicer.facade import Session

    monkeypatch.chdir(tmp_path)
    session = Session(slicer.vtkMRMLScene())
    for folder in ("", ".", "  "):
        with pytest.raises(InputError, match="none chosen: choose the folder to create the project in"):
            session.create(folder, "organ=1", "CT")
        with pytest.raises(InputError, match="none chosen: choose the folder to open"):
            session.open(folder)
    assert list(tmp_path.iterdir()) == []


def test_pseudo_label_this_case_now_runs_litemedsam_on_the_stored_prompt(tmp_path, phantom_dir):
    """The panel's "Pseudo-label this case now": a box placed as a markups ROI, stored, then the real
    `alseg pseudolabel` (built-in LiteMedSAM weights) as a background job on that case alone; the result
    opens as the case's segmentation to correct."""
    from ALSegLib import metrics
    from ALSegSlicer import jobs
    from ALSegSlicer.facade import Session

    scene = slicer.vtkMRMLScene()
    session = Session(scene)
    project = session.create(tmp_path / "p", "organ=1,vessel=2,lesion=3", "CT")
    cases = session.add_files([phantom_dir / "images"], reference_dir=phantom_dir / "labels")
    case = cases[0]
    with pytest.raises(InputError, match="no stored prompt"):
        session.pseudolabel_case_args(case)
    reference = sitk.GetArrayFromImage(project.read_label(case, "reference"))
    organ = np.isin(reference, (1, 3))
    k = int(np.argmax(organ.sum(axis=(1, 2))))
    rows, cols = np.flatnonzero(organ[k].any(1)), np.flatnonzero(organ[k].any(0))
    volume = glue.volume_node_from_image(scene, project.read_image(case), case)
    m = glue.node_ijk_to_ras(volume)
    corners = [(m @ np.array([i, j, k, 1.0]))[:3] for i, j in ((cols[0], rows[0]), (cols[-1], rows[-1]))]
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    roi.SetCenterWorld(*((corners[0] + corners[1]) / 2))
    sx, sy, _ = np.abs(corners[1] - corners[0])
    roi.SetSizeWorld(float(sx), float(sy), 0.0)  # a box on slice k
    session.add_prompt(case, "organ", roi=roi)
    args = session.pseudolabel_case_args(case, device="cpu")
    assert args[:4] == ["pseudolabel", str(project.root), "--source", "sam"] and args[args.index("--case") + 1] == case
    job = jobs.start(*args, python=sys.executable)
    assert job.wait(timeout=600) == 0, job.error
    assert project.label_path(case, "pseudo") is not None and project.label_path(cases[1], "pseudo") is None
    opened = session.open_case(case, start_with="pseudo")
    assert opened.started_from == "pseudo"
    got = glue.label_from_segmentation(scene, opened.segmentation, opened.volume, project.labels)
    dice = metrics.binary_metrics(sitk.GetArrayFromImage(got) == 1, organ, (1, 1, 1))["dice"]
    assert dice > 0.5, dice


def vtk_point(p):
    import vtk

    return vtk.vtkVector3d(*map(float, p))


def test_round_settings_become_a_settings_file_the_engine_reads(project):
    """The panel writes its settings as the engine's RoundSettings (rounds/next-settings.json) and runs
    ``alseg round --settings FILE``: what the engine reads is what the panel set, with nothing mapped by hand."""
    from ALSegLib import cli
    from ALSegLib.errors import InputError
    from ALSegLib.settings import RoundSettings
    from ALSegSlicer.facade import RoundOptions, Session

    session = Session(slicer.vtkMRMLScene())
    session.open(project.root)
    args = session.round_args(RoundOptions(budget="10%", strategy="coreset", mode="filtermatch", device="cpu",
                                           pseudo_source="import", import_folder="/data/totalseg", epochs=3))
    path = project.root / "rounds" / "next-settings.json"
    assert args == ["round", str(project.root), "--settings", str(path)]
    read = cli._settings_file(cli.build_parser().parse_args(args))
    assert isinstance(read, RoundSettings)
    assert (read.budget, read.strategy, read.mode, read.device, read.epochs, read.pseudo.source, read.pseudo.from_dir) == (
        "10%", "coreset", "filtermatch", "cpu", 3, "import", "/data/totalseg")
    # SAM without a checkpoint file: the built-in LiteMedSAM (no checkpoint), with the scene's prompts
    read = cli._settings_file(cli.build_parser().parse_args(session.round_args(RoundOptions(budget="2", pseudo_source="sam"))))
    assert read.pseudo.source == "sam" and read.pseudo.checkpoint is None
    assert read.pseudo.prompts == str(project.root / "prompts" / "slicer.json")
    args = session.round_args(RoundOptions(budget="2", pseudo_source="sam", checkpoint="/w/sam_vit_b.pth"))
    assert cli._settings_file(cli.build_parser().parse_args(args)).pseudo.checkpoint == "/w/sam_vit_b.pth"
    args = session.round_args(RoundOptions(budget="2", pseudo_source="sam", bootstrap="off"))
    assert cli._settings_file(cli.build_parser().parse_args(args)).bootstrap == "off"
    # options given on the command line as well override the file's (the module's self-test shrinks the budget so)
    read = cli._settings_file(cli.build_parser().parse_args([*args, "--iters", "2", "--strategy", "random"]))
    assert (read.iterations, read.strategy, read.budget) == (2, "random", "2")
    # a choice the engine does not know is refused before the file is written
    before = path.read_text()
    with pytest.raises(InputError, match="strategy"):
        session.round_args(RoundOptions(budget="2", strategy="nosuch"))
    assert path.read_text() == before
    # the panel's query unit: slices, in slabs, with a slice strategy; a slice-only strategy on cases is refused
    with pytest.raises(InputError, match="for --unit case"):
        session.round_args(RoundOptions(budget="2", strategy="random-fg"))
    assert path.read_text() == before
    read = cli._settings_file(cli.build_parser().parse_args(
        session.round_args(RoundOptions(budget="40", strategy="random-fg", unit="slice", slab=2))))
    assert (read.unit, read.slab, read.strategy, read.budget) == ("slice", 2, "random-fg", "40")


def test_a_round_from_scene_volumes_then_review_and_accept_in_the_scene(tmp_path):
    """What the module's self-test does inside Slicer, on slicer-core: a project from volumes in the
    scene, a tiny real round (engine in a background job), open the proposed case, edit, accept."""
    from ALSegLib import phantoms
    from ALSegSlicer import jobs
    from ALSegSlicer.facade import RoundOptions, Session

    scene = slicer.vtkMRMLScene()
    session = Session(scene)
    project = session.create(tmp_path / "p", "organ=1,vessel=2,lesion=3", "CT")
    nodes, labels = [], {}
    for i in range(5):
        image, label = phantoms.make_phantom(i, "CT", size=32)
        nodes.append(glue.volume_node_from_image(scene, image, f"scan{i}"))
        labels[f"scan{i}"] = label
    assert session.add_volumes(nodes) == ["scan0", "scan1", "scan2", "scan3", "scan4"]
    for case, label in labels.items():  # another model's labels as pseudo-labels; scan4 held out with a reference
        project.write_label(case, "pseudo", label, source="import")
    project.write_label("scan4", "reference", labels["scan4"], source="test")
    # the panel's status line counts each kind of label (it once read a key status() never had: always blank)
    assert session.summary_text().endswith("(CT): 5 cases; labels: 5 pseudo, 1 reference")
    args = session.round_args(RoundOptions(budget="1", strategy="random", device="cpu", configuration="3d_fullres",
                                           epochs=1, pretrain_epochs=1, exclude=("scan4",)))
    seen = []
    job = jobs.start(*args, "--batch-size", "2", "--iters", "2", "--pretrain-iters", "2", "--val-iters", "1",
                     python=sys.executable, on_event=seen.append)
    assert job.wait(timeout=900) == 0, job.error
    assert "stage" in {e["event"] for e in seen} and "round-waiting" in {e["event"] for e in seen}
    assert session.rounds_waiting() == [1]
    assert session.summary_text().endswith("1 reference; round(s) 1 wait for review")
    (case, score, reason), = session.queue_rows()
    opened = session.open_next()
    assert opened.case == case and opened.started_from == "pseudo"
    # the uncertainty overlay: voxel entropy of the probabilities the selection used, on the case's grid
    overlay = session.review.uncertainty_volume(session.review.uncertainty_map())  # the map: off the GUI thread
    entropy = glue.voxels(overlay)
    assert entropy.shape == glue.voxels(opened.volume).shape and 0 <= entropy.min() and entropy.max() <= 1 and entropy.max() > 0
    np.testing.assert_allclose(glue.node_ijk_to_ras(overlay), glue.node_ijk_to_ras(opened.volume), atol=1e-6)
    # toggled again: the same node (not one more per toggle), on a heat colormap from 0 to 1
    assert session.review.uncertainty_volume() is overlay and scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 7
    assert overlay.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileInferno.txt"
    # the training chart: the pretraining's epochs from the job's own events, in MRML table and plot nodes
    from ALSegSlicer.charts import TrainingCurves

    curves = TrainingCurves()
    for event in seen:
        curves.feed(event)
    epochs = [e for e in seen if e["event"] == "epoch"]
    assert epochs and len(curves.current.rows) == len(epochs)
    view = curves.update_nodes(scene)
    table = scene.GetFirstNodeByName("ALSeg training")
    assert table.GetNumberOfRows() == len(curves.current.rows)
    assert table.GetTable().GetValue(0, 1).ToDouble() == pytest.approx(epochs[0]["train_loss"])
    assert view.GetPlotChartNode().GetNumberOfPlotSeriesNodes() == 3
    curves.update_nodes(scene)  # again: the same nodes
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1
    paint(scene, opened.segmentation, opened.volume, "lesion", np.ones(sitk.GetArrayFromImage(labels[case]).shape, bool))
    version, nxt = session.accept_and_next()
    assert version == 1 and nxt is None
    assert overlay.GetScene() is None  # closed with its case
    assert (project.root / "labels" / "human" / case / "v0001.nrrd").is_file()
    assert session.rounds_waiting() == []
    assert "labels: 1 human, 5 pseudo" in session.summary_text() and "wait" not in session.summary_text()
    # the round continues (same settings) to its report; the results table has the pseudo-only and round-1 rows
    job = jobs.start(*session.round_args(RoundOptions()), python=sys.executable)
    assert job.wait(timeout=900) == 0, job.error
    header, rows = session.result_rows()
    assert header[:4] == ["round", "model", "annotated", "mean Dice"] and [r[0] for r in rows] == ["pseudo-only", "1"]
    assert session.learning_curve_png() is not None
    assert session.latest_report() == project.root / "rounds" / "0001" / "report.html"
    assert "0/1 accepted unchanged" in session.effort_text()
    # the accepted label measured the case's pseudo-label (the proposal it opened with, not read again):
    # a lesion painted over the whole case makes the lesion's pseudo-labels untrusted
    agreement = project.provenance(case, "human", 1)["pseudo_agreement"]
    assert agreement["pseudo_sha256"] == project.provenance(case, "pseudo")["file_sha256"]
    header, rows = session.trust_rows()
    assert header[:2] == ["class", "state"] and [r[0] for r in rows] == list(project.labels.mapping)
    lesion = rows[list(project.labels.mapping).index("lesion")]
    assert lesion[1].startswith("untrusted") and lesion[2] == "1"
    assert float(lesion[3]) == pytest.approx(agreement["dice"]["3"], abs=5e-4)  # shown to 3 decimals
    # a model on a volume in the scene (a background job): the label, as a segmentation on the volume, is the
    # prediction the round stored for that case with the same model (the pool's: the pretrained one)
    model = project.provenance("scan0", "predicted")["produced_by"]["model"]
    assert session.latest_model() != model  # the round's fine-tuned model finished later: that one is exported
    args, out = session.apply_model_args(nodes[0], model, device="cpu")
    job = jobs.start(*args, python=sys.executable)
    assert job.wait(timeout=300) == 0, job.error
    applied = session.load_applied(out, nodes[0], model)
    assert applied.GetSegmentation().GetNumberOfSegments() == 3
    predicted = sitk.GetArrayFromImage(project.read_label("scan0", "predicted"))
    assert np.array_equal(sitk.GetArrayFromImage(glue.label_from_segmentation(scene, applied, nodes[0], project.labels)),
                          predicted)
    job = jobs.start(*session.export_model_args(tmp_path / "export"), python=sys.executable)
    assert job.wait(timeout=300) == 0, job.error
    assert list((tmp_path / "export").glob("Dataset*/nnUNetTrainer__*__3d_fullres/fold_0/checkpoint_final.pth"))


def test_the_logic_class_builds_as_slicer_builds_it(project):
    """ALSegLogic(ScriptedLoadableModuleLogic, Session): Slicer's logic base calls super().__init__()
    with no arguments (Base/Python/slicer/ScriptedLoadableModule.py), which reaches Session first."""
    from ALSegSlicer.facade import Session

    class ScriptedLoadableModuleLogic:  # its __init__ as in Slicer's source (ScriptedLoadableModule.py, main, l.296-308)
        def __init__(self, parent=None):
            super().__init__()
            self.moduleName = self.__class__.__name__
            if self.moduleName.endswith("Logic"):
                self.moduleName = self.moduleName[:-5]
            self.isSingletonParameterNode = True

    class ALSegLogic(ScriptedLoadableModuleLogic, Session):  # as in ALSeg.py
        def __init__(self, scene=None):
            ScriptedLoadableModuleLogic.__init__(self)
            Session.__init__(self, scene)

    scene = slicer.vtkMRMLScene()
    logic = ALSegLogic(scene)
    assert logic.scene is scene and logic.moduleName == "ALSeg" and not logic.has_project
    logic.open(project.root)
    assert logic.has_project
    source = (REPO / "ALSeg" / "ALSeg.py").read_text()
    assert "class ALSegLogic(ScriptedLoadableModuleLogic, Session):" in source


def test_a_case_that_cannot_be_opened_moves_to_the_end_and_the_next_opens(project):
    _pseudo_without_lesion(project)
    queued = [q["case"] for q in select_cases(project, 3, "random", seed=5)["queue"]]
    project.label_path(queued[0], "pseudo").write_bytes(b"not an image")  # a corrupt file on disk
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene)
    opened = session.open_next()
    assert opened.case == queued[1] and queued[0] in session.failed and session.queue()[-1]["case"] == queued[0]
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1  # no node left behind by the failed one
    assert session.machine_kind() == "pseudo"
    session.accept()
    assert session.open_next().case == queued[2]
    session.accept()
    assert session.open_next() is None  # only the broken one is left, and it does not open


def test_apply_files_are_removed_and_pid_zero_is_never_signalled(tmp_path):
    from ALSegSlicer import jobs
    from ALSegSlicer.facade import discard_apply_files

    folder = tmp_path / "alseg-apply-x"
    folder.mkdir()
    (folder / "volume.nii").write_bytes(b"x")
    discard_apply_files(folder / "label.nii.gz")
    assert not folder.exists()
    keep = tmp_path / "mine"
    keep.mkdir()
    discard_apply_files(keep / "label.nii.gz")  # not a folder apply_model_args made: left alone
    assert keep.is_dir()
    with pytest.raises(ValueError):
        jobs.terminate_tree(0)


def test_the_training_chart_releases_the_collections_the_scene_hands_it():
    """``GetNodesByClassByName`` returns a collection the caller must delete (vtkMRMLScene.h); the
    chart's lookups leave only Python's own reference on each, so it goes with the last use."""
    from ALSegSlicer.charts import TrainingCurves

    scene = slicer.vtkMRMLScene()
    handed = []

    class Recording:  # the real scene; only the collections it returns are noted
        def __getattr__(self, name):
            return getattr(scene, name)

        def GetNodesByClassByName(self, cls, name):
            collection = scene.GetNodesByClassByName(cls, name)
            handed.append(collection)
            return collection

    curves = TrainingCurves()
    curves.feed({"event": "stage", "stage": "training", "model": "m"})
    curves.feed({"event": "epoch", "epoch": 1, "epochs": 2, "train_loss": 0.5, "model": "m"})
    curves.update_nodes(Recording())
    curves.update_nodes(Recording())  # found again by name: still one table, chart and view
    assert len(handed) == 6 and all(c.GetReferenceCount() == 1 for c in handed)
    assert scene.GetNumberOfNodesByClass("vtkMRMLPlotChartNode") == 1


def test_an_error_of_a_panel_action_is_shown_once_and_ends_there(monkeypatch):
    """Slicer's ``tryWithErrorDisplay`` (slicer-core's real util.py) shows the dialog and re-raises;
    ``errors_shown`` ends the exception after the dialog, so the code after the block runs (a
    ``return False``, the refresh after a job)."""
    import types

    from ALSegSlicer.dialogs import errors_shown

    shown = []
    # slicer.app: only what tryWithErrorDisplay reads -- `if show and not slicer.app.testingEnabled()`
    # (Base/Python/slicer/util.py, v5.10.0 l.3395-3409, main l.3719-3733; testingEnabled() is a method of
    # qSlicerCoreApplication); errorDisplay: records what the modal dialog would show and returns None, as
    # util.errorDisplay does once the dialog closes. The re-raise itself is slicer-core's real code.
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: False), raising=False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: shown.append((text, kw.get("detailedText"))))
    with pytest.raises(InputError):  # the real helper re-raises after the dialog
        with slicer.util.tryWithErrorDisplay("Could not store the prompt."):
            raise InputError("case 'x'", "not in project /p")
    assert len(shown) == 1

    def ready():
        with errors_shown("Could not install ALSeg's Python packages."):
            raise RuntimeError("pip failed: no network")
        return False

    assert ready() is False
    assert shown[-1][0].startswith("Could not install ALSeg's Python packages.") and "pip failed" in shown[-1][0]
    assert "Traceback" in shown[-1][1] and len(shown) == 2
    with errors_shown("fine") as outcome:
        value = 3
    assert not outcome.failed and value == 3 and len(shown) == 2
    with errors_shown("bad") as outcome:
        raise ValueError("x")
    assert outcome.failed and isinstance(outcome.error, ValueError)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    with pytest.raises(ValueError, match="under test"):  # --testing shows no dialog: the error reaches the test
        with errors_shown("bad"):
            raise ValueError("under test")
    assert len(shown) == 3  # the "bad" block's dialog; none under --testing
