"""Pseudo-label trust measured against the human labels, the partial-label loss that keeps untrusted
classes from being taught (as background or otherwise), and the oracle annotator's effort."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from scipy import ndimage

from ALSegLib import rounds, trust
from ALSegLib.agreement import class_dice, edit_effort
from ALSegLib.nnunet.trainers import PartialLabelLoss, fold_logits, fold_target
from ALSegLib.simulate import SimulatedAnnotator


def nnunet_loss(batch_dice: bool) -> torch.nn.Module:
    """nnU-Net's own loss as its trainer builds it for a 2d configuration with deep supervision."""
    inner = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1,
                           weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    return DeepSupervisionWrapper(inner, [0.6667, 0.3333])


def batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = [torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 4, 8, 8, generator=g)]
    target = [torch.randint(0, 4, (2, 1, 16, 16), generator=g).float(), torch.randint(0, 4, (2, 1, 8, 8), generator=g).float()]
    return logits, target


def shift_between(logits: torch.Tensor, sample: int, a: int, b: int, fraction: float) -> torch.Tensor:
    """The same logits with the probability of classes ``a`` and ``b`` of one sample redistributed
    (their sum, so every other class's probability, unchanged)."""
    out = logits.clone()
    total = torch.logsumexp(torch.stack([out[sample, a], out[sample, b]]), dim=0)
    out[sample, a] = total + np.log(fraction)
    out[sample, b] = total + np.log(1 - fraction)
    return out


@pytest.mark.parametrize("batch_dice", [True, False])
def test_the_partial_label_loss_is_nnunets_loss_when_every_class_is_known(batch_dice):
    logits, target = batch()
    plain = nnunet_loss(batch_dice)(logits, target)
    nothing = torch.zeros(2, 4, dtype=torch.bool)
    folded = nnunet_loss(batch_dice)([fold_logits(x, nothing) for x in logits], [fold_target(t, nothing) for t in target])
    assert torch.allclose(plain, folded, atol=1e-6)
    wrapped = PartialLabelLoss(nnunet_loss(batch_dice))
    assert torch.allclose(wrapped(logits, target), plain)
    wrapped.folded = nothing
    assert torch.allclose(wrapped(logits, target), plain)


@pytest.mark.parametrize("batch_dice", [True, False])
def test_an_unknown_class_of_a_pseudo_labeled_sample_teaches_nothing_while_a_human_sample_still_teaches_it(batch_dice):
    """Sample 0 is pseudo-labeled with class 2 unknown, sample 1 human-labeled: moving probability
    between background and class 2 in sample 0 leaves the loss as it was; in sample 1 it changes it."""
    logits, target = batch(1)
    loss = PartialLabelLoss(nnunet_loss(batch_dice))
    loss.folded = torch.tensor([[False, False, True, False], [False, False, False, False]])
    before = loss(logits, target)
    for fraction in (0.05, 0.5, 0.95):
        moved = [shift_between(x, 0, 0, 2, fraction) for x in logits]
        assert torch.allclose(loss(moved, target), before, atol=1e-5)
        human = [shift_between(x, 1, 0, 2, fraction) for x in logits]
        assert not torch.allclose(loss(human, target), before, atol=1e-3)
    # the pseudo-label's class-2 voxels are read as "background or class 2", not as class 2
    assert (fold_target(target[0], loss.folded)[0] == 2).sum() == 0
    assert torch.equal(fold_target(target[0], loss.folded)[1], target[0][1])
    # and the network still learns class 2 from the human sample: its logits get a gradient
    x = [t.clone().requires_grad_(True) for t in logits]
    loss(x, target).backward()
    assert x[0].grad[1, 2].abs().sum() > 0


def write(project, case: str, kind: str, array: np.ndarray, **extra) -> None:
    ref = project.read_label(case, "reference")
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.CopyInformation(ref)
    if kind == "human":
        project.add_human_label(case, image, source="simulated")
    else:
        project.write_label(case, kind, image, source=extra.pop("source", "test"), **extra)


def reference(project, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(project.read_label(case, "reference"))


def worse(ref: np.ndarray) -> np.ndarray:
    """Organ exact, vessel eroded away where thin, lesion missing: a foundation model's typical miss."""
    out = np.where(ref == 3, 0, ref)
    vessel = ref == 2
    out[vessel & ~ndimage.binary_erosion(vessel)] = 0
    return out.astype(np.uint8)


def test_trust_is_measured_when_a_human_label_is_stored_with_exact_dice_values(project):
    cases = project.cases()[:3]
    for case in cases:
        write(project, case, "pseudo", worse(reference(project, case)))
    write(project, cases[0], "human", reference(project, cases[0]))
    write(project, cases[1], "human", reference(project, cases[1]))
    expected = {c: class_dice(worse(reference(project, c)), reference(project, c), [1, 2, 3]) for c in cases[:2]}
    record = project.provenance(cases[0], "human")["pseudo_agreement"]
    assert record["pseudo_sha256"] == project.provenance(cases[0], "pseudo")["file_sha256"]
    ref0 = reference(project, cases[0])
    vessel = ref0 == 2
    kept = int((vessel & ndimage.binary_erosion(vessel)).sum())
    assert record["dice"] == {"1": 1.0, "2": round(2 * kept / (kept + vessel.sum()), 4), "3": 0.0}

    table = trust.trust_table(project, 0.5)
    rows = {r["name"]: r for r in table["classes"]}
    assert table["cases"] == 2
    assert rows["organ"]["state"] == "trusted" and rows["organ"]["mean"] == 1.0 and rows["organ"]["cases"] == 2
    vessel_dices = [expected[c][2] for c in cases[:2]]
    assert rows["vessel"]["mean"] == round(float(np.mean(vessel_dices)), 4)
    assert rows["vessel"]["std"] == round(float(np.std(vessel_dices)), 4)
    assert rows["vessel"]["min"] == round(min(vessel_dices), 4)
    assert rows["vessel"]["state"] == ("trusted" if np.mean(vessel_dices) >= 0.5 else "untrusted")
    assert rows["lesion"]["state"] == "untrusted" and rows["lesion"]["mean"] == 0.0
    assert trust.untaught(table) >= {3}
    # what training takes from it: the lesion is never learned from a pseudo-label, as background or otherwise
    unknown = trust.unknown_classes(project, [cases[2]], table)
    assert 3 in unknown[cases[2]] and 1 not in unknown[cases[2]]
    assert any("lesion" in line and "untrusted" in line for line in trust.table_text(table))


def test_trust_uses_the_current_pseudo_label_and_labels_stored_before_it_was_recorded(project):
    case = project.cases()[0]
    ref = reference(project, case)
    write(project, case, "human", ref)  # no pseudo-label yet: nothing recorded
    assert "pseudo_agreement" not in project.provenance(case, "human")
    write(project, case, "pseudo", worse(ref))
    assert trust.measurements(project)[case][3] == 0.0  # measured now, from the files
    write(project, case, "pseudo", ref)  # made again, now right: the stored record would be stale
    assert trust.measurements(project)[case] == {1: 1.0, 2: 1.0, 3: 1.0}


def test_before_any_human_label_a_prompted_class_returned_empty_in_most_cases_is_suspect(project):
    cases = project.cases()
    for i, case in enumerate(cases):
        ref = reference(project, case)
        pseudo = np.where(ref == 3, 0, ref) if i < 4 else ref  # the lesion prompted everywhere, found in 2 of 6
        prompts = {"organ": [{"box": [0, 0, 4, 4]}], "lesion": [{"box": [0, 0, 4, 4]}]}  # the vessel never prompted
        write(project, case, "pseudo", pseudo, source="sam", prompts=prompts)
    rows = {r["name"]: r for r in trust.trust_table(project)["classes"]}
    assert rows["lesion"] == {**rows["lesion"], "state": "suspect", "prompted": 6, "empty": 4, "taught": False}
    assert rows["organ"]["state"] == "unmeasured" and rows["organ"]["taught"]
    assert rows["vessel"]["state"] == "unmeasured" and rows["vessel"]["prompted"] == 0
    unknown = trust.unknown_classes(project, cases, trust.trust_table(project))
    # never prompted (vessel) and suspect (lesion) in every case; the organ is taught
    assert all(unknown[c] == [2, 3] for c in cases)


def test_the_oracle_annotator_records_the_voxels_it_corrects_against_drawing_from_scratch(project):
    case = project.cases()[0]
    ref = reference(project, case)
    pseudo = worse(ref)
    write(project, case, "pseudo", pseudo)
    SimulatedAnnotator([])(project, case, {"case": case, "open_with": "pseudo", "round": 1})
    prov = project.provenance(case, "human")
    effort = prov["effort"]
    assert prov["produced_by"]["started_from"] == "pseudo" and prov["produced_by"]["round"] == 1
    assert effort["voxels_changed"] == int((pseudo != ref).sum())
    assert effort["voxels_from_scratch"] == int((ref != 0).sum())
    assert effort["corrected_fraction"] == round(int((pseudo != ref).sum()) / int((ref != 0).sum()), 4)
    assert "seconds" not in effort  # nobody spent any
    summary = rounds.review_effort(project, 1)
    assert summary["accepted"] == 1 and summary["corrected_fraction"] == effort["corrected_fraction"]
    assert "drawn from scratch" in rounds.effort_text(summary)
    other = project.cases()[1]  # nothing to open with: drawn from scratch
    SimulatedAnnotator([])(project, other, {"case": other, "round": 1})
    assert project.provenance(other, "human")["effort"]["corrected_fraction"] == 1.0
    # the from-scratch baselines' annotator is shown nothing, though a pseudo-label exists; the
    # pseudo-label's agreement still goes to the trust record
    third = project.cases()[2]
    write(project, third, "pseudo", worse(reference(project, third)))
    SimulatedAnnotator([], from_scratch=True)(project, third, {"case": third, "round": 1})
    prov = project.provenance(third, "human")
    assert prov["effort"]["corrected_fraction"] == 1.0 and prov["effort"]["started_empty"]
    assert prov["produced_by"]["started_from"] is None and prov["pseudo_agreement"]["dice"]


def test_edit_effort_counts_per_value_dice_within_the_foreground_box():
    before = np.zeros((4, 5, 6), np.uint8)
    after = before.copy()
    before[1, 1:3, 1:3] = 1
    after[1, 1:3, 1:4] = 1
    after[2, 2, 2] = 2
    e = edit_effort(before, after, [1, 2, 3])
    assert e["voxels_changed"] == 3 and e["voxels_from_scratch"] == 7
    assert e["dice_per_value"] == {"1": round(2 * 4 / 10, 4), "2": 0.0, "3": None}
    assert e["dice_to_proposal"] == round((0.8 + 0.0) / 2, 4)
    assert class_dice(before, after, [1], mask=np.zeros_like(before, bool)) == {1: None}


def test_the_settings_default_is_the_trust_modules():
    from ALSegLib.settings import TRUST_DICE, RoundSettings

    assert TRUST_DICE == trust.TRUST_DICE == RoundSettings().trust_dice


def test_a_sparse_human_labels_pseudo_fill_obeys_the_trust(project):
    """``--sparse-fill pseudo`` fills a sparse human label's unannotated voxels from the pseudo-label:
    with the lesion untrusted, only the trusted classes' voxels fill in there, never its background
    (which may hide the lesion): the rest stays nnU-Net's ignore label."""
    from ALSegLib.nnunet.dataset import export_dataset
    from ALSegLib.store.layout import STORE_EXT
    from ALSegLib.store.sparse import SliceSet

    cases = project.cases()
    for case in cases:
        write(project, case, "pseudo", worse(reference(project, case)))
    write(project, cases[1], "human", reference(project, cases[1]))  # measures the lesion: 0.0, untrusted
    sparse = cases[0]
    project.add_human_slices(sparse, project.read_label(sparse, "reference"), SliceSet.of(0, [10, 11]), source="simulated")
    table = trust.trust_table(project, 0.2)
    assert 3 in trust.untaught(table)
    unknown = trust.unknown_classes(project, project.labeled_cases("pseudo"), table)
    ds = export_dataset(project, "human+pseudo", "fill", sparse_fill="pseudo", fill_unknown=unknown)
    exported = sitk.GetArrayFromImage(sitk.ReadImage(str(ds.folder / "labelsTr" / f"{sparse}{STORE_EXT}")))
    pseudo = sitk.GetArrayFromImage(project.read_label(sparse, "pseudo"))
    outside = np.ones(exported.shape, bool)
    outside[10:12] = False
    ignore = 4
    assert set(np.unique(exported[outside])) <= {1, 2, ignore}  # no background, no lesion from the pseudo-label
    assert np.array_equal(exported[outside] == 1, pseudo[outside] == 1)
    assert np.array_equal(exported[10:12], reference(project, sparse)[10:12])  # the human slices as drawn


def test_the_model_against_what_reviewers_accepted_by_round_says_when_it_is_done(project):
    """Without reference labels the quality is measured against the reviewers' labels: at each accept
    the case's stored prediction (the model that proposed it) is scored against the accepted label;
    per round its mean Dice, done once at least 0.95 two consecutive rounds. Exact Dice values from
    the stored records; the proposal shown (here the pseudo-label) is measured beside it."""
    cases = project.cases()
    annotator = SimulatedAnnotator([])
    values = project.labels.values
    curve = rounds.review_curve(project)
    assert curve["rounds"] == [] and not curve["done"] and curve["verdict"] == "no reviewed case yet"

    def same(r):
        return r

    plan = {1: [(cases[0], worse), (cases[1], same)], 2: [(cases[2], same)], 3: [(cases[3], same)]}
    expected = {}
    for number, items in plan.items():
        dices = []
        for case, make in items:
            ref = reference(project, case)
            write(project, case, "predicted", make(ref), source="nnunet", produced_by={"model": f"model-{number}"})
            write(project, case, "pseudo", worse(ref))  # the proposal the panel opens: always the poor pseudo-label
            annotator(project, case, {"case": case, "open_with": "pseudo", "round": number})
            per = [d for d in class_dice(make(ref), ref, values).values() if d is not None]
            dices.append(float(np.mean(per)))
        expected[number] = float(np.mean(dices))
    curve = rounds.review_curve(project)
    got = {r["round"]: r["mean_model_dice"] for r in curve["rounds"]}
    assert got == {n: pytest.approx(d, abs=1e-4) for n, d in expected.items()}
    assert [r["model"] for r in curve["rounds"]] == ["model-1", "model-2", "model-3"]
    proposal = [r["mean_dice_to_proposal"] for r in curve["rounds"]]
    assert all(p is not None and p < 0.95 for p in proposal)  # the pseudo-labels shown did not get better
    assert expected[1] < 0.95 and curve["done"] and "rounds 2, 3" in curve["verdict"]
    assert [r["accepted"] for r in curve["rounds"]] == [2, 1, 1]
    # a round that skipped review (no row) breaks "consecutive"; a poor round after it: not done
    later = cases[4]
    ref = reference(project, later)
    write(project, later, "predicted", ref, source="nnunet", produced_by={"model": "model-5"})
    annotator(project, later, {"case": later, "round": 5})
    gap = rounds.review_curve(project)
    assert [r["round"] for r in gap["rounds"]][-2:] == [3, 5] and not gap["done"]
    assert gap["verdict"].startswith("not done: in round 5")
