"""Sparse human labels (issue 22): versions covering some slices, stored with their mask, exported
through nnU-Net's ignore label (or filled from the pseudo-label), and a training that takes no loss
from the ignored voxels."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from ALSegLib.errors import InputError
from ALSegLib.nnunet.dataset import export_dataset
from ALSegLib.store.sparse import SliceSet, acquisition_axis, slices_of_mask


def _files(project, case):
    folder = project.layout.human_versions(case)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_a_sparse_version_stores_exactly_its_slices_and_mask(project):
    case = project.cases()[0]
    reference = project.read_label(case, "reference")
    ref = sitk.GetArrayFromImage(reference)
    version = project.add_human_label(case, reference, annotated=SliceSet.of(0, [9, 5, 9]), author="dr sparse")
    assert version == 1
    stored = sitk.GetArrayFromImage(project.read_label(case, "human", 1))
    assert np.array_equal(stored[[5, 9]], ref[[5, 9]]) and ref[[5, 9]].any()
    assert not np.delete(stored, [5, 9], axis=0).any()  # nothing outside the annotated slices
    mask = project.annotation_mask(case, 1)
    assert mask.shape == ref.shape and mask[[5, 9]].all() and mask.sum() == 2 * ref[0].size
    prov = project.provenance(case, "human", 1)
    assert prov["annotated"]["axis"] == 0 and prov["annotated"]["slices"] == [5, 9]
    assert prov["annotated"]["voxels"] == 2 * ref[0].size and prov["matches_file"]
    # a later whole-case version: no mask; the mask files are not versions
    assert project.add_human_label(case, reference) == 2
    assert project.annotation_mask(case) is None and project.annotation_mask(case, 1) is not None
    assert project.human_versions(case) == [1, 2]
    assert _files(project, case) == ["v0001.annotated.nrrd", "v0001.json", "v0001.nrrd", "v0002.json", "v0002.nrrd"]
    # a mask image (any region) works as well, on another axis too
    box = np.zeros(ref.shape, np.uint8)
    box[:, 3:7, :] = 1
    mask_image = sitk.GetImageFromArray(box)
    mask_image.CopyInformation(reference)
    assert project.add_human_label(case, reference, annotated=mask_image) == 3
    assert project.provenance(case, "human", 3)["annotated"]["axis"] == 1
    assert slices_of_mask(project.annotation_mask(case, 3)) == SliceSet.of(1, range(3, 7))


def test_bad_sparse_input_is_refused_by_name_and_nothing_is_stored(project):
    case = project.cases()[1]
    reference = project.read_label(case, "reference")
    shape = sitk.GetArrayViewFromImage(reference).shape
    with pytest.raises(InputError, match=rf"{case}.*slice\(s\) \[{shape[0]}\] along k are outside the image"):
        project.add_human_label(case, reference, annotated=SliceSet.of(0, [2, shape[0]]))
    with pytest.raises(InputError, match="at least one annotated slice"):
        project.add_human_label(case, reference, annotated=SliceSet.of(0, []))
    other = sitk.Image([s + 1 for s in reference.GetSize()], sitk.sitkUInt8)
    with pytest.raises(InputError, match=r"annotated mask is not on the label's grid: size"):
        project.add_human_label(case, reference, annotated=other)
    twos = sitk.GetImageFromArray(np.full(shape, 2, np.uint8))
    twos.CopyInformation(reference)
    with pytest.raises(InputError, match=r"0 and 1 only; found \[2\]"):
        project.add_human_label(case, reference, annotated=twos)
    empty = sitk.GetImageFromArray(np.zeros(shape, np.uint8))
    empty.CopyInformation(reference)
    with pytest.raises(InputError, match="empty"):
        project.add_human_label(case, reference, annotated=empty)
    assert project.human_versions(case) == [] and _files(project, case) == []


def test_the_acquisition_axis_is_the_thickest_one():
    assert acquisition_axis((0.8, 0.8, 5.0)) == 0  # axial slices: k
    assert acquisition_axis((1.0, 4.0, 1.0)) == 1
    assert acquisition_axis((3.0, 1.0, 1.0)) == 2
    assert acquisition_axis((1.0, 1.0, 1.0)) == 0


def _sparse_project(project):
    """Case 0 sparse (two slices), case 1 whole, every case with a pseudo-label (the reference, its
    lesion removed)."""
    for case in project.cases():
        ref = project.read_label(case, "reference")
        arr = sitk.GetArrayFromImage(ref)
        arr[arr == 3] = 0
        pseudo = sitk.GetImageFromArray(arr)
        pseudo.CopyInformation(ref)
        project.write_label(case, "pseudo", pseudo, source="test")
    sparse_case, whole_case = project.cases()[:2]
    project.add_human_label(sparse_case, project.read_label(sparse_case, "reference"), annotated=SliceSet.of(0, [10, 20]))
    project.add_human_label(whole_case, project.read_label(whole_case, "reference"))
    return sparse_case, whole_case


def test_export_puts_the_ignore_label_exactly_on_unannotated_voxels(project):
    sparse_case, whole_case = _sparse_project(project)
    dataset = export_dataset(project, "human", "sparse-ignore")
    meta = json.loads((dataset.folder / "dataset.json").read_text())
    ignore = meta["labels"]["ignore"]
    assert ignore == 1 + max(v for k, v in meta["labels"].items() if k != "ignore") == 4  # nnU-Net: the highest
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.folder / "labelsTr" / f"{sparse_case}.nrrd")))
    mask = project.annotation_mask(sparse_case)
    ref = sitk.GetArrayFromImage(project.read_label(sparse_case, "reference"))
    assert np.array_equal(exported == ignore, ~mask)
    assert np.array_equal(exported[mask], ref[mask])  # the phantoms' values are 1..3 already: nnU-Net's own
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.folder / "labelsTr" / f"{whole_case}.nrrd")))
    assert not (whole == ignore).any()
    record = json.loads((dataset.folder / "alseg_dataset.json").read_text())
    assert record["sparse"][sparse_case]["ignored_voxels"] == int((~mask).sum())
    # filled from the pseudo-label instead: no ignore at all, the pseudo-label outside the annotated slices
    filled = export_dataset(project, "human", "sparse-pseudo", sparse_fill="pseudo")
    assert "ignore" not in json.loads((filled.folder / "dataset.json").read_text())["labels"]
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(filled.folder / "labelsTr" / f"{sparse_case}.nrrd")))
    pseudo = sitk.GetArrayFromImage(project.read_label(sparse_case, "pseudo"))
    assert np.array_equal(arr[~mask], pseudo[~mask]) and np.array_equal(arr[mask], ref[mask])
    with pytest.raises(InputError, match="sparse fill"):
        export_dataset(project, "human", "sparse-bad", sparse_fill="zeros")


def test_a_training_through_the_ignore_label_takes_no_loss_from_ignored_voxels(project):
    """A real supervised nnU-Net training on a sparse and a whole case (through the ignore label), then the
    loss of ALSeg's trainer on that dataset: changing the network's output on ignored voxels changes nothing,
    on annotated voxels it does."""
    import torch

    from ALSegLib.nnunet.env import folders, nnunet_environment
    from ALSegLib.nnunet.plan import PLANS, plan
    from ALSegLib.nnunet.train import train
    from ALSegLib.nnunet.trainers import ALSegTrainer

    sparse_case, _ = _sparse_project(project)
    plan(project, configurations=("3d_fullres",), batch_size=2)
    record = train(project, "supervised", name="sparse", epochs=1, iterations=2, val_iterations=1, device="cpu",
                   validate=False)
    assert record["status"] == "done" and record["sparse_fill"] == "ignore" and record["labeled_cases"] == 2
    pre = folders(project.root).preprocessed / record["dataset"]
    dataset_json = json.loads((pre / "dataset.json").read_text())
    plans = {**json.loads((pre / f"{PLANS}.json").read_text()), "continue_training": False}
    with nnunet_environment(project.root):
        trainer = ALSegTrainer(plans, "3d_fullres", 0, dataset_json, device=torch.device("cpu"))
        trainer.enable_deep_supervision = False
        loss = trainer._build_loss()
    assert trainer.label_manager.has_ignore_label and trainer.label_manager.ignore_label == 4
    patch = trainer.configuration_manager.patch_size
    torch.manual_seed(0)
    target = torch.randint(0, 4, (2, 1, *patch))
    target[:, :, : patch[0] // 2] = 4  # the first half: not annotated
    logits = torch.randn(2, 4, *patch)
    base = float(loss(logits, target))
    changed = logits.clone()
    changed[:, :, : patch[0] // 2] = torch.randn_like(changed[:, :, : patch[0] // 2]) * 10
    assert float(loss(changed, target)) == pytest.approx(base, abs=1e-6)
    annotated = logits.clone()
    annotated[:, :, patch[0] // 2:] += torch.randn_like(annotated[:, :, patch[0] // 2:]) * 10
    assert abs(float(loss(annotated, target)) - base) > 1e-3


# --- slice-level selection -----------------------------------------------------------------------

def _store_probabilities(project, model, rng, drop: tuple[int, ...] = ()):
    """Class probabilities for every case as the prediction pass stores them (float16 npz): the
    reference (less the values ``drop``) made soft, with a random share of slices made uncertain
    (test data)."""
    from ALSegLib import atomic
    from ALSegLib.store.predictions import probabilities_path

    values = [0, *project.labels.values]
    for case in project.cases():
        ref = sitk.GetArrayFromImage(project.read_label(case, "reference"))
        ref[np.isin(ref, drop)] = 0
        probs = np.stack([(ref == v).astype(np.float32) for v in values]) * 0.9 + 0.1 / len(values)
        noisy = rng.random(ref.shape[0]) < (0.0 if drop else 0.3)
        probs[:, noisy] = rng.dirichlet(np.ones(len(values)), size=(int(noisy.sum()), *ref.shape[1:])).transpose(3, 0, 1, 2)
        path = probabilities_path(project, model, case)
        path.parent.mkdir(parents=True, exist_ok=True)
        import io

        buffer = io.BytesIO()
        np.savez_compressed(buffer, probabilities=probs.astype(np.float16), class_values=np.array(values, np.int32))
        atomic.write_bytes(path, buffer.getvalue())


def test_slice_strategies_are_deterministic_and_never_propose_annotated_or_waiting_slices(project):
    from ALSegLib import rounds
    from ALSegLib.selection.slices import score_units, select_slices

    _store_probabilities(project, "m", np.random.default_rng(0))
    cases = project.cases()
    whole, sparse_case = cases[0], cases[1]
    project.add_human_label(whole, project.read_label(whole, "reference"))
    project.add_human_label(sparse_case, project.read_label(sparse_case, "reference"), annotated=SliceSet.of(0, [3, 4]))
    # a queued unit waiting for review: slices 7 and 8 of case 2
    record = rounds.new_round(1)
    record["queue"] = [{"rank": 1, "case": cases[2], "axis": 0, "slices": [7, 8], "score": 0.5, "reason": "test"}]
    with project.lock("test queue"):
        rounds.write_round(project, record)
    scored = score_units(project, "m", cases)
    free = {(u.case, u.start) for u in scored.units}
    assert not any(c == whole for c, _ in free)
    assert (sparse_case, 3) not in free and (sparse_case, 4) not in free and (sparse_case, 5) in free
    assert (cases[2], 7) not in free and (cases[2], 8) not in free and (cases[2], 6) in free
    total = sum(1 for _ in scored.units)
    for strategy in ("random", "random-fg", "uncertainty", "hybrid"):
        a = select_slices(scored, 9, strategy, seed=4, labels={1: "organ", 2: "vessel", 3: "lesion"})
        b = select_slices(scored, 9, strategy, seed=4, labels={1: "organ", 2: "vessel", 3: "lesion"})
        assert a == b and len(a) == 9 and len({(p["case"], p["slices"][0]) for p in a}) == 9
        assert all((p["case"], p["slices"][0]) in free for p in a)
        assert all(p["case"] in p["reason"] and "focused entropy" in p["reason"] for p in a)
    assert select_slices(scored, 9, "random", seed=4) != select_slices(scored, 9, "random", seed=5)
    # uncertainty: exactly the nine highest focused entropies
    picked = {(p["case"], p["slices"][0]) for p in select_slices(scored, 9, "uncertainty")}
    top = {(scored.units[i].case, scored.units[i].start) for i in np.argsort(-scored.entropy, kind="stable")[:9]}
    assert picked == top
    # a percentage of the free slices (rounded half up, as the case budget is)
    assert len(select_slices(scored, "10%", "random")) == int(np.floor(0.1 * total + 0.5))
    with pytest.raises(InputError, match="slice-level strategies"):
        select_slices(scored, 3, "coreset")


def test_random_fg_draws_two_thirds_from_predicted_foreground(project):
    from ALSegLib.selection.slices import score_units, select_slices

    _store_probabilities(project, "m", np.random.default_rng(1), drop=(2,))  # no vessel: it runs through every slice
    scored = score_units(project, "m", project.cases())
    share = float(scored.foreground.mean())
    assert 0.2 < share < 0.8, share  # the organ and the lesion cover some of the slices
    by_unit = {(u.case, u.start): bool(f) for u, f in zip(scored.units, scored.foreground, strict=True)}
    for seed in range(5):
        picks = select_slices(scored, 12, "random-fg", seed=seed)
        fg_draws = [p for p in picks if "where the model predicts foreground" in p["reason"]]
        assert len(fg_draws) == 8 and all(by_unit[(p["case"], p["slices"][0])] for p in fg_draws)  # 2/3 of 12
        assert sum(by_unit[(p["case"], p["slices"][0])] for p in picks) >= 8  # the 4 others at random
    slabs = score_units(project, "m", project.cases(), slab=3)
    assert all(u.size == 3 and u.start % 3 == 0 for u in slabs.units)
    assert all(len(p["slices"]) == 3 for p in select_slices(slabs, 9, "hybrid"))  # 9 slices: 3 slabs
    assert len(select_slices(slabs, 9, "hybrid")) == 3


# --- slice units through review and the simulated annotator ------------------------------------

def test_slices_added_later_merge_with_the_earlier_sparse_version(project):
    case = project.cases()[2]
    ref = project.read_label(case, "reference")
    arr = sitk.GetArrayFromImage(ref)
    assert project.add_human_slices(case, ref, SliceSet.of(0, [5])) == 1
    other = sitk.GetImageFromArray(np.where(arr > 0, 1, 0).astype(np.uint8))  # another drawing, for slice 9
    other.CopyInformation(ref)
    assert project.add_human_slices(case, other, SliceSet.of(0, [9])) == 2
    v2 = sitk.GetArrayFromImage(project.read_label(case, "human", 2))
    assert np.array_equal(v2[5], arr[5]) and np.array_equal(v2[9], (arr[9] > 0).astype(v2.dtype))
    assert slices_of_mask(project.annotation_mask(case, 2)) == SliceSet.of(0, [5, 9])
    assert slices_of_mask(project.annotation_mask(case, 1)) == SliceSet.of(0, [5])  # v0001 as it was
    project.add_human_label(case, ref)  # whole: slices added after it keep the version whole
    assert project.add_human_slices(case, other, SliceSet.of(0, [9])) == 4 and project.annotation_mask(case) is None


def test_the_simulated_annotator_reveals_only_the_queued_slices(project):
    from ALSegLib import rounds
    from ALSegLib.simulate import SimulatedAnnotator

    case = project.cases()[3]
    item = {"case": case, "axis": 0, "slices": [4, 6], "rank": 1, "score": 0.4, "reason": "test"}
    record = rounds.new_round(1)
    record["queue"] = [item, {**item, "slices": [8], "rank": 2}]
    with project.lock("test queue"):
        rounds.write_round(project, record)
    assert [q["status"] for q in rounds.queue_items(project)] == ["pending", "pending"]
    annotator = SimulatedAnnotator(test=[project.cases()[0]])
    annotator(project, case, item)
    stored = sitk.GetArrayFromImage(project.read_label(case, "human"))
    ref = sitk.GetArrayFromImage(project.read_label(case, "reference"))
    assert np.array_equal(stored[[4, 6]], ref[[4, 6]]) and not np.delete(stored, [4, 6], axis=0).any()
    assert [q["status"] for q in rounds.queue_items(project)] == ["labeled", "pending"]
    assert case in rounds.pending_cases(project)
    annotator(project, case, record["queue"][1])
    assert [q["status"] for q in rounds.queue_items(project)] == ["labeled", "labeled"]
    assert slices_of_mask(project.annotation_mask(case)) == SliceSet.of(0, [4, 6, 8])
    assert project.provenance(case, "human")["source"] == "simulated"
    with pytest.raises(RuntimeError, match="held-out"):
        annotator(project, project.cases()[0], {**item, "case": project.cases()[0]})


def test_review_of_a_slice_unit_stores_those_slices_only(project):
    slicer = pytest.importorskip("slicer")
    import sys

    from conftest import REPO

    sys.path.insert(0, str(REPO / "ALSeg"))
    from ALSegLib import rounds
    from ALSegSlicer import scene as glue
    from ALSegSlicer.review import ReviewSession

    case = project.cases()[4]
    ref = sitk.GetArrayFromImage(project.read_label(case, "reference"))
    pseudo = np.where(ref == 3, 0, ref).astype(np.uint8)  # the lesion missing
    image = sitk.GetImageFromArray(pseudo)
    image.CopyInformation(project.read_label(case, "reference"))
    project.write_label(case, "pseudo", image, source="test")
    lesion_slices = [int(k) for k in np.flatnonzero((ref == 3).any(axis=(1, 2)))[:2]]
    record = rounds.new_round(1)
    record["queue"] = [{"case": case, "axis": 0, "slices": lesion_slices, "rank": 1, "score": 0.5, "reason": "test"}]
    with project.lock("test queue"):
        rounds.write_round(project, record)
    scene = slicer.vtkMRMLScene()
    session = ReviewSession(project, scene)
    opened = session.open_next()
    assert opened.case == case and opened.slices == lesion_slices and opened.axis == 0
    centre = glue.slice_center_ras(opened.volume, 0, lesion_slices[0])
    dims = opened.volume.GetImageData().GetDimensions()
    expected = glue.node_ijk_to_ras(opened.volume) @ np.array([(dims[0] - 1) / 2, (dims[1] - 1) / 2, lesion_slices[0], 1])
    np.testing.assert_allclose(centre, expected[:3], atol=1e-6)
    # the reviewer draws the whole reference (every slice): only the unit's slices are stored
    from test_slicer_glue import paint

    paint(scene, opened.segmentation, opened.volume, "lesion", ref == 3)
    version = session.accept()
    stored = sitk.GetArrayFromImage(project.read_label(case, "human", version))
    assert np.array_equal(stored[lesion_slices], ref[lesion_slices])
    assert not np.delete(stored, lesion_slices, axis=0).any()
    effort = project.provenance(case, "human", version)["effort"]
    assert effort["voxels_changed"] == int((ref[lesion_slices] == 3).sum())  # counted on the unit's slices only
    assert rounds.queue_items(project)[0]["status"] == "labeled" and session.open_next() is None


def test_two_slice_level_rounds_through_the_console_api(tmp_path):
    """`--unit slice`: each round queries slices, the simulated annotator reveals only those, the
    fine-tuning trains through the ignore label, and the next round never proposes a slice again."""
    from ALSegLib import phantoms, rounds
    from ALSegLib.loop import run_round
    from ALSegLib.nnunet.train import read_model
    from ALSegLib.project import LabelTable, Project
    from ALSegLib.simulate import SimulatedAnnotator

    images, labels = phantoms.write_dataset(tmp_path / "src", n=10, modality="CT", size=32)
    project = Project.create(tmp_path / "p", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    test = project.cases()[-2:]
    settings = dict(budget="6", strategy="random-fg", unit="slice", slab=2, mode="finetune", exclude=test,
                    pseudo={"source": "degraded-reference", "target_dice": 0.75}, device="cpu",
                    configuration="3d_fullres", batch_size=2, pretrain_epochs=1, pretrain_iterations=2, epochs=1,
                    iterations=2, val_iterations=1, pseudo_share=0.0)
    annotator = SimulatedAnnotator(test)
    first = run_round(Project(project.root), annotator=annotator, **settings)
    queue = rounds.read_round(project, 1)["queue"]
    assert len(queue) == 3 and all(len(q["slices"]) == 2 and q["axis"] == 0 for q in queue)  # 6 slices, slabs of 2
    assert first["stages"]["select"]["slices"] == 6 and first["stages"]["select"]["units"] == 3
    for q in queue:
        mask = project.annotation_mask(q["case"])
        assert mask is not None and mask[q["slices"]].all()
    assert not set(project.labeled_cases("human")) & set(test)
    model = read_model(project, "round0001-finetune")
    assert model["sparse_fill"] == "ignore" and model["policy"] == "human"
    dataset = json.loads((project.root / "nnunet" / "raw" / model["dataset"] / "dataset.json").read_text())
    assert "ignore" in dataset["labels"]
    run_round(Project(project.root), annotator=annotator, **settings)
    second = rounds.read_round(project, 2)["queue"]
    first_units = {(q["case"], s) for q in queue for s in q["slices"]}
    assert not first_units & {(q["case"], s) for q in second for s in q["slices"]}  # never a slice twice
    annotated = sum(int(project.annotation_mask(c).any(axis=(1, 2)).sum()) for c in project.labeled_cases("human"))
    assert annotated == 12  # two rounds of 6 slices
    # the protocol's figures: slices counted on the held-out metrics, the learning curve's AUBC over them
    metrics = [rounds.read_round(project, n)["metrics"] for n in (1, 2)]
    assert [m["slices"] for m in metrics] == [6, 12] and metrics[0]["slices_of"] == 8 * 32
    assert metrics[1]["voxels"] == 12 * 32 * 32 and 0 <= metrics[1]["foreground_dice"] <= 1
    curve = json.loads((project.layout.reports / "learning_curve.json").read_text())
    assert curve["aubc_over"] == "slice_fraction" and 0 <= curve["aubc"] <= 1
    report = json.loads((project.root / "rounds" / "0002" / "report.json").read_text())
    assert [p["slices"] for p in report["learning_curve"]] == [0, 6, 12] and report["aubc"] == curve["aubc"]


def test_annotated_slices_count_sparse_and_whole_labels_along_the_acquisition_axis(project):
    from ALSegLib.loop import annotated_slices

    a, b, held = project.cases()[:3]
    shapes = {c: sitk.GetArrayViewFromImage(project.read_label(c, "reference")).shape for c in project.cases()}
    empty = annotated_slices(project, [held])
    assert empty["slices"] == empty["voxels"] == 0
    assert empty["slices_of"] == sum(s[0] for c, s in shapes.items() if c != held)  # isotropic phantoms: axis k
    project.add_human_label(a, project.read_label(a, "reference"), annotated=SliceSet.of(0, [3, 9]))
    project.add_human_label(b, project.read_label(b, "reference"))
    project.add_human_label(held, project.read_label(held, "reference"))  # held out: never counted
    got = annotated_slices(project, [held])
    assert got["slices"] == 2 + shapes[b][0]
    assert got["voxels"] == 2 * shapes[a][1] * shapes[a][2] + int(np.prod(shapes[b]))
    assert got["slice_fraction"] == round(got["slices"] / got["slices_of"], 5)


def test_aubc_and_the_foreground_dice_of_nnunets_convention():
    from ALSegLib.metrics import foreground_dice
    from ALSegLib.report import aubc, common_budget

    points = [{"slice_fraction": 0.0, "mean_dice": 0.5}, {"slice_fraction": 0.05, "mean_dice": 0.7},
              {"slice_fraction": 0.1, "mean_dice": 0.7}]
    assert aubc(points) == pytest.approx(((0.5 + 0.7) / 2 * 0.05 + 0.7 * 0.05) / 0.1)
    assert aubc(points[::-1]) == aubc(points)  # order of the points does not matter
    assert aubc(points[:1]) is None and aubc([*points, {"slice_fraction": 0.2, "mean_dice": None}]) is None
    assert aubc([*points, {"slice_fraction": None, "mean_dice": 0.7}]) is None
    assert aubc([*points, {"slice_fraction": 0.2, "mean_dice": float("nan")}]) is None
    # one span for every arm: up to 0.075, the last segment interpolated (0.7 at 0.075)
    assert aubc(points, upto=0.075) == pytest.approx(((0.5 + 0.7) / 2 * 0.05 + 0.7 * 0.025) / 0.075)
    assert aubc(points, upto=0.2) is None  # beyond the curve: not extrapolated
    curves = [points, [{"slice_fraction": 0.0, "mean_dice": 0.5}, {"slice_fraction": 0.08, "mean_dice": 0.6}]]
    assert common_budget(curves) == 0.08 and common_budget([points, None]) == 0.1
    per_case = {"c1": {"a": {"dice": 0.8}, "b": {"dice": 1.0}}, "c2": {"a": {"dice": 0.6}, "b": {"dice": 0.4}}}
    # c1 holds no b at all (reference and prediction empty): left out, not counted as a perfect 1.0
    assert foreground_dice(per_case, {"c1": ["b"]}) == pytest.approx((0.7 + 0.4) / 2)
    assert foreground_dice(per_case, {}) == pytest.approx((0.7 + 0.7) / 2)


def test_simulate_runs_slice_arms_on_the_whole_case_arms_slice_budget(tmp_path, run_cli):
    """`alseg simulate` with slice arms: each gets as many slices a round as the case budget holds on
    average, the simulated annotator reveals slices only, and the results carry slices and AUBC."""
    from ALSegLib import phantoms
    from ALSegLib.project import LabelTable, Project
    from ALSegLib.simulate import check_no_test_revealed

    images, labels = phantoms.write_dataset(tmp_path / "src", n=8, modality="CT", size=32)
    source = Project.create(tmp_path / "p", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    source.add_cases([images], reference_dir=labels)
    code, out, err = run_cli("simulate", source.root, "--out", tmp_path / "exp", "--arms", "hybrid+finetune",
                             "slice-random-fg+finetune", "slice-hybrid+finetune", "--rounds", "1", "--budget", "1",
                             "--seeds", "0", "--test-fraction", "0.25", "--json", "--device", "cpu",
                             "--configuration", "3d_fullres", "--batch-size", "2", "--pretrain-epochs", "1",
                             "--pretrain-iters", "2", "--epochs", "1", "--iters", "2", "--val-iters", "1",
                             "--pseudo-share", "0")
    assert code == 0, err
    results = json.loads(out)
    assert results["setup"]["slices_per_round"] == 32  # one case of 32 slices
    assert results["setup"]["aubc_span"] == [pytest.approx(32 / (6 * 32), abs=1e-4)]  # the span every arm reached
    arms = results["arms"]
    for arm in ("hybrid+finetune", "slice-random-fg+finetune", "slice-hybrid+finetune"):
        assert arms[arm]["final"]["slices"] == 32
        assert 0 <= arms[arm]["aubc"] <= 1 and len(arms[arm]["aubc_per_seed"]) == 1
    assert arms["hybrid+finetune"]["final"]["annotated"] == 1
    sliced = Project(tmp_path / "exp" / "seed0" / "slice-hybrid-finetune")
    check_no_test_revealed(sliced, results["setup"]["test_cases"])
    assert all(sliced.annotation_mask(c) is not None for c in sliced.labeled_cases("human"))  # slices, never whole
    assert rounds_unit(sliced) == "slice"
    assert "Area under the budget curve" in (tmp_path / "exp" / "experiment.md").read_text()


def rounds_unit(project):
    from ALSegLib import rounds

    return rounds.read_round(project, 1)["settings"]["unit"]
