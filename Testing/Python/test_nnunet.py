"""nnU-Net inside the engine, end to end on a tiny phantom project (real nnunetv2, tiny budgets).

plan -> pretrain on degraded pseudo-labels -> fine-tune from those weights -> predict with
probabilities -> evaluate; resume after SIGKILL; the caller's environment is never changed.
"""
import json
import os
import pickle
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import run_until
from scipy import ndimage

from ALSegLib import phantoms
from ALSegLib.errors import InputError
from ALSegLib.evaluation import evaluate
from ALSegLib.nnunet import dataset as ds
from ALSegLib.nnunet.env import folders, nnunet_environment
from ALSegLib.nnunet.plan import PLANS, plan, project_plans
from ALSegLib.nnunet.predict import load_probabilities, predict
from ALSegLib.nnunet.train import read_model, train
from ALSegLib.nnunet.trainers import load_checkpoint_safely
from ALSegLib.project import LabelTable, Project
from ALSegLib.volumes import Geometry

BUDGET = dict(epochs=2, iterations=2, val_iterations=1, device="cpu")


def env_now() -> dict:
    """The process environment, less pytest's own bookkeeping variable."""
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def degraded(ref: np.ndarray, i: int) -> np.ndarray:
    """A stand-in for a foundation model's pseudo-label: the organ eroded or dilated."""
    organ = ref == 1
    changed = ndimage.binary_dilation(organ) if i % 2 else ndimage.binary_erosion(organ)
    out = np.where(organ, 0, ref)
    out[changed & (out == 0)] = 1
    return out.astype(np.uint8)


def ensure_human_labels(project: Project, n: int = 2) -> None:
    if not project.labeled_cases("human"):
        for case in project.cases()[:n]:
            project.add_human_label(case, project.read_label(case, "reference"), source="simulated")


def train_until_killed(project: Project, mode: str, name: str, kill_after_epoch: int, *options: str) -> list[dict]:
    """Run ``alseg train`` in a subprocess and SIGKILL it right after an epoch's event; returns the events seen."""
    cmd = [sys.executable, "-m", "ALSegLib", "--progress", "jsonl", "train", str(project.root), "--mode", mode,
           "--name", name, "--device", "cpu", "--no-validate", *options]
    return run_until(cmd, lambda e: e["event"] == "epoch" and e["epoch"] == kill_after_epoch)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Thirteen 32^3 CT phantoms with degraded pseudo-labels, planned and pretrained."""
    root = tmp_path_factory.mktemp("nnunet")
    images, labels = phantoms.write_dataset(root / "src", n=13, modality="CT", size=32)
    project = Project.create(root / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    for i, case in enumerate(project.cases()):
        ref = project.read_label(case, "reference")
        pseudo = sitk.GetImageFromArray(degraded(sitk.GetArrayFromImage(ref), i))
        pseudo.CopyInformation(ref)
        project.write_label(case, "pseudo", pseudo, source="degraded-reference")
    env = env_now()
    planned = plan(project, configurations=("3d_fullres",), batch_size=2)
    assert env_now() == env
    pretrained = train(project, "pretrain", validate=False, **BUDGET)
    assert env_now() == env
    return {"project": project, "plans": planned, "pretrain": pretrained}


def test_export_policies_remap_values_and_link_images(tmp_path, phantom_dir):
    p = Project.create(tmp_path / "p", LabelTable.parse("liver=5,tumor=2"), "MRI")
    p.add_cases([phantom_dir / "images"])
    cases = p.cases()
    grid = p.read_image(cases[0])

    def label(value):
        arr = np.zeros(sitk.GetArrayViewFromImage(grid).shape, np.uint8)
        arr[4:9, 4:9, 4:9] = value
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(grid)
        return img

    p.write_label(cases[0], "pseudo", label(5), source="sam")
    p.write_label(cases[1], "pseudo", label(2), source="sam")
    p.add_human_label(cases[1], label(5))
    p.add_human_label(cases[2], label(2), source="simulated")
    mixed = ds.export_dataset(p, "human+pseudo", "mixed")
    assert mixed.cases == cases[:3] and mixed.pool == cases[3:]
    assert mixed.sources == {cases[0]: "pseudo", cases[1]: "human v0001", cases[2]: "human v0001 (simulated)"}
    dj = json.loads((mixed.folder / "dataset.json").read_text())
    assert dj["channel_names"] == {"0": "MRI"} and dj["labels"] == {"background": 0, "tumor": 1, "liver": 2}
    assert dj["file_ending"] == ".nrrd" and dj["numTraining"] == 3
    # value 5 (liver) becomes nnU-Net's 2; the human label wins over the pseudo-label
    lab = sitk.GetArrayFromImage(sitk.ReadImage(str(mixed.folder / "labelsTr" / f"{cases[1]}.nrrd")))
    assert set(np.unique(lab)) == {0, 2}
    assert os.stat(mixed.folder / "imagesTr" / f"{cases[0]}_0000.nrrd").st_ino == os.stat(p.image_path(cases[0])).st_ino
    human = ds.export_dataset(p, "human", "humanonly")
    assert human.cases == cases[1:3] and human.id == mixed.id + 1
    assert ds.export_dataset(p, "human", "humanonly").id == human.id  # a snapshot: same tag, same dataset
    with pytest.raises(InputError, match="nothing to train on"):
        ds.export_dataset(Project.create(tmp_path / "q", LabelTable.parse("a=1"), "CT"), "pseudo", "none")


def test_environment_restored_even_on_error(tmp_path):
    before = env_now()
    with pytest.raises(RuntimeError):
        with nnunet_environment(tmp_path, training_on_cpu=True):
            assert os.environ["nnUNet_raw"] == str(tmp_path / "nnunet" / "raw")
            raise RuntimeError("boom")
    assert env_now() == before


def test_plan_records_alseg_plans(tiny):
    project, planned = tiny["project"], tiny["plans"]
    assert planned["policy"] == "pseudo" and planned["batch_size"] == {"3d_fullres": 2}
    assert planned["normalization"] == ["CTNormalization"]
    pre = folders(project.root).preprocessed / planned["dataset"]
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    assert plans["plans_name"] == PLANS and plans["configurations"]["3d_fullres"]["batch_size"] == 2
    assert json.loads((pre / "nnUNetPlans.json").read_text())["plans_name"] == "nnUNetPlans"  # nnU-Net's own, untouched
    assert project_plans(project) == planned
    assert plan(project) == planned  # already planned: nothing redone


def test_pretrain_record(tiny):
    rec = tiny["pretrain"]
    assert rec["status"] == "done" and rec["mode"] == "pretrain" and rec["epochs_done"] == 2
    assert rec["dataset"] == tiny["plans"]["dataset"]  # trained on the planning (pseudo) dataset
    assert len(rec["train_losses"]) == 2 and all(np.isfinite(rec["train_losses"]))
    assert (tiny["project"].root / rec["checkpoint"]).is_file()
    # nnU-Net's progress plot is still drawn after the last epoch (ALSeg skips it after the others: 1.3 s each)
    progress = (tiny["project"].root / rec["checkpoint"]).parent / "progress.png"
    assert progress.is_file() and progress.stat().st_size > 1000


def test_finetune_starts_from_the_pretrained_weights_then_predicts(tiny, run_cli):
    project, env = tiny["project"], env_now()
    ensure_human_labels(project)
    rec = train(project, "finetune", **BUDGET)
    assert env_now() == env
    assert rec["init_from"]["model"] == "pretrain"
    # the weights right after loading equal the pretrained checkpoint's, bit for bit
    assert rec["init_weights_digest"] == tiny["pretrain"]["final_weights_digest"]
    assert rec["final_weights_digest"] != rec["init_weights_digest"]  # and training moved them
    assert rec["policy"] == "human" and rec["labeled_cases"] == 2
    assert set(rec["validation"]["dice"]) == {"organ", "vessel", "lesion"}
    # same plans (architecture, patch, normalisation) on the human dataset
    pre = folders(project.root).preprocessed
    a = json.loads((pre / tiny["plans"]["dataset"] / f"{PLANS}.json").read_text())
    b = json.loads((pre / rec["dataset"] / f"{PLANS}.json").read_text())
    assert a["configurations"] == b["configurations"] and b["dataset_name"] == rec["dataset"]

    cases = project.cases()[3:6]
    out = predict(project, "finetune", cases, round_id="0001", device="cpu")
    assert env_now() == env
    assert [o["case"] for o in out] == cases
    for case in cases:
        probs, values = load_probabilities(project, "finetune", case)
        image = sitk.GetArrayViewFromImage(project.read_image(case))
        assert values == [0, 1, 2, 3] and probs.shape == (4, *image.shape)
        assert np.abs(probs.sum(axis=0) - 1).max() < 5e-3
        label = sitk.GetArrayFromImage(project.read_label(case, "predicted"))
        assert (np.array(values)[probs.argmax(axis=0)] == label).mean() > 0.999
        assert project.geometry(case) == Geometry.of(project.read_label(case, "predicted"))
        prov = project.provenance(case, "predicted")
        assert prov["source"] == "nnunet" and prov["produced_by"]["model"] == "finetune"
        assert prov["produced_by"]["round"] == "0001" and prov["probabilities"].endswith(f"{case}.npz")
    result = evaluate(project, "predicted")
    assert result["cases"] == 3 and 0 <= result["summary"]["mean"]["dice"]["mean"] <= 1

    code, outp, _ = run_cli("models", project.root, "--json")
    assert code == 0 and {m["name"] for m in json.loads(outp)} >= {"pretrain", "finetune"}
    code, outp, _ = run_cli("predict", project.root, "--model", "finetune", "--case", cases[0], "--device", "cpu", "--json")
    assert code == 0 and json.loads(outp)["predicted"][0]["case"] == cases[0]
    code, _, err = run_cli("predict", project.root, "--model", "nope")
    assert code == 2 and "model 'nope'" in err


def test_finetune_with_pseudo_share_mixes_labels_and_weights_the_human_ones(tiny):
    """Fine-tuning on the human labels plus the other cases' pseudo-labels: a human label
    replaces its case's pseudo-label, human cases are listed so that they make up about
    half the draws, and a model scored elsewhere (validate=False) trains on every case."""
    from ALSegLib.nnunet.train import sample_repeats
    from ALSegLib.nnunet.trainers import ALSegTrainer

    project = tiny["project"]
    ensure_human_labels(project)
    human = set(project.labeled_cases("human"))
    rec = train(project, "finetune", name="mixed", validate=False, pseudo_share=0.5, **BUDGET)
    assert rec["policy"] == "human+pseudo" and rec["pseudo_share"] == 0.5 and rec["validation_split"] is False
    assert rec["labeled_cases"] == 13 and rec["human_cases"] == len(human) == 2
    assert rec["init_weights_digest"] == tiny["pretrain"]["final_weights_digest"]
    meta = ds.Dataset.load(folders(project.root).raw / rec["dataset"])
    assert {c for c, src in meta.sources.items() if src.startswith("human")} == human
    pre = folders(project.root).preprocessed / rec["dataset"]
    split = json.loads((pre / "splits_final.json").read_text())
    assert split == [{"train": sorted(project.cases()), "val": sorted(project.cases())}]

    repeats = sample_repeats(meta.sources, 0.5)
    assert repeats == {c: 6 for c in human}  # 11 pseudo-labeled vs 2 x 6 human listings: about half each
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    plans["continue_training"] = False
    with nnunet_environment(project.root, training_on_cpu=True):
        trainer = ALSegTrainer(plans, "3d_fullres", 0, json.loads((pre / "dataset.json").read_text()), torch.device("cpu"))
        trainer.case_repeats = repeats
        listed, _ = trainer.get_tr_and_val_datasets()
    counts = {c: listed.identifiers.count(c) for c in project.cases()}
    assert all(counts[c] == (6 if c in human else 1) for c in counts)
    share = sum(counts[c] for c in human) / len(listed.identifiers)
    assert 0.45 < share < 0.55
    assert sample_repeats(meta.sources, 0.0) == {} and sample_repeats({"a": "pseudo"}, 0.5) == {}
    assert sample_repeats({"a": "human v0001", "b": "pseudo"}, 0.9) == {"a": 1}  # never below once

    with pytest.raises(InputError, match="pseudo-share"):
        train(project, "supervised", name="bad-share", pseudo_share=0.5, **BUDGET)
    with pytest.raises(InputError, match="pseudo-share"):
        train(project, "finetune", name="bad-share", pseudo_share=1.0, **BUDGET)


def test_an_untrusted_class_is_merged_with_background_on_pseudo_labeled_cases_never_taught_as_background(tiny):
    """With the organ's pseudo-labels below the trust threshold (degraded organ; vessel and lesion
    exact), fine-tuning with pseudo-labels records the trust table it used and merges the organ with
    background on every pseudo-labeled case (and only there); the real nnU-Net training runs through
    the partial-label loss, whose folded classes follow the batch's cases."""
    from ALSegLib.nnunet.train import _make_trainer, training_mode
    from ALSegLib.nnunet.trainers import PartialLabelLoss

    project = tiny["project"]
    ensure_human_labels(project)
    human = set(project.labeled_cases("human"))
    rec = train(project, "finetune", name="partial", validate=False, pseudo_share=0.5, trust_dice=1.0, **BUDGET)
    rows = {r["name"]: r for r in rec["partial_labels"]["trust"]["classes"]}
    assert rows["organ"]["state"] == "untrusted" and rows["organ"]["mean"] < 1.0
    assert rows["vessel"]["state"] == rows["lesion"]["state"] == "trusted"
    pseudo = sorted(set(project.cases()) - human)
    assert rec["partial_labels"]["unknown"] == {c: [1] for c in pseudo}
    assert rec["status"] == "done" and np.isfinite(rec["final_train_loss"])

    meta = ds.Dataset.load(folders(project.root).raw / rec["dataset"])
    with nnunet_environment(project.root, training_on_cpu=True):
        trainer, _ = _make_trainer(project, training_mode("finetune"), meta, "3d_fullres", None,
                                   {"epochs": 1, "iterations": 1, "val_iterations": 1}, torch.device("cpu"), 0.5, None,
                                   fresh=True, unknown=rec["partial_labels"]["unknown"])
        trainer.initialize()
    assert isinstance(trainer.loss, PartialLabelLoss)
    folded = trainer.folded_classes([pseudo[0], sorted(human)[0]])
    assert folded.tolist() == [[False, True, False, False], [False, False, False, False]]
    assert trainer.folded_classes(sorted(human)) is None

    off = train(project, "finetune", name="whole", validate=False, pseudo_share=0.5, trust_dice=None, **BUDGET)
    assert off["partial_labels"] == {"trust": None, "unknown": {}, "off": True}


def test_training_resumes_after_sigkill(tiny):
    project = tiny["project"]
    ensure_human_labels(project)
    events = train_until_killed(project, "supervised", "resumed", 2, "--epochs", "4", "--iters", "2", "--val-iters", "1")
    seen = [e for e in events if e["event"] == "epoch"]
    assert all(set(e) >= {"epoch", "train_loss", "pseudo_dice", "seconds"} for e in seen)
    assert [e["epoch"] for e in seen] == [1, 2]
    assert read_model(project, "resumed")["status"] == "training"
    rec = train(project, "supervised", name="resumed", epochs=4, iterations=2, val_iterations=1, device="cpu", validate=False)
    assert rec["status"] == "done" and rec["resumed_at_epochs"] == [2] and rec["epochs_done"] == 4
    assert len(rec["train_losses"]) == 4  # the log of the killed run was restored from its checkpoint
    assert rec["train_losses"][:2] == pytest.approx([round(e["train_loss"], 5) for e in seen], abs=1e-5)


class _Planted:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_checkpoint_is_refused_never_run(tmp_path):
    sentinel = tmp_path / "pwned"
    bad = tmp_path / "checkpoint_final.pth"
    with open(bad, "wb") as fh:
        pickle.dump({"network_weights": {}, "payload": _Planted(sentinel)}, fh)
    torch.save({"network_weights": {"w": torch.zeros(2)}, "payload": _Planted(sentinel)}, tmp_path / "torch.pth")
    for path in (bad, tmp_path / "torch.pth"):
        with pytest.raises(InputError, match="refused to load checkpoint"):
            load_checkpoint_safely(path)
    assert not sentinel.exists()


def test_checkpoint_of_another_architecture_is_a_clear_error(tiny, run_cli):
    """A model's checkpoint replaced by one of another network (here: one stage wider): prediction
    through the API and the CLI refuses it by name; the project is byte-identical. (The record names
    the new weights here, as if re-recorded: otherwise the digest check refuses them first.)"""
    from conftest import tree_hash

    from ALSegLib.nnunet.trainers import weights_digest

    project = tiny["project"]
    path = project.root / tiny["pretrain"]["checkpoint"]
    record_file = project.root / "models" / "pretrain" / "model.json"
    saved, saved_record = path.read_bytes(), record_file.read_text()
    try:
        checkpoint = load_checkpoint_safely(path)
        name = next(k for k in checkpoint["network_weights"] if k.endswith("conv.weight"))
        w = checkpoint["network_weights"][name]
        checkpoint["network_weights"][name] = torch.zeros((w.shape[0] * 2, *w.shape[1:]))
        torch.save(checkpoint, path)
        record = json.loads(saved_record)
        record["final_weights_digest"] = weights_digest(checkpoint["network_weights"])
        record_file.write_text(json.dumps(record))
        before = tree_hash(project.root)
        with pytest.raises(InputError, match=r"weights do not fit this network .* another architecture") as err:
            predict(project, "pretrain", project.cases()[:1], device="cpu")
        assert str(path) in str(err.value) and name in str(err.value)
        code, out, err_text = run_cli("predict", project.root, "--model", "pretrain", "--case", project.cases()[0],
                                      "--device", "cpu")
        assert code == 2 and path.name in err_text and "another architecture" in err_text and out == ""
        assert tree_hash(project.root) == before
    finally:
        path.write_bytes(saved)
        record_file.write_text(saved_record)


def test_filtermatch_end_to_end_records_its_filter_decisions(tiny):
    from ALSegLib.nnunet.filtermatch import FilterMatchConfig

    project = tiny["project"]
    ensure_human_labels(project)
    labeled = project.labeled_cases("human")
    config = FilterMatchConfig(warmup_epochs=1, filter_start=0, filter_every=1, drop_fraction=0.4,
                               confidence=0.6, unlabeled_batch=1)
    held_out = project.cases()[-1]  # a test case: never seen, not even unlabeled
    rec = train(project, "filtermatch", name="fm", epochs=3, iterations=2, val_iterations=1, device="cpu",
                validate=False, filtermatch=config, init_from="pretrain", exclude_cases=[held_out])
    assert rec["status"] == "done" and rec["trainer"] == "ALSegFilterMatchTrainer"
    assert rec["init_weights_digest"] == tiny["pretrain"]["final_weights_digest"]
    fm = rec["filtermatch"]
    assert fm["config"]["confidence"] == 0.6 and fm["config"]["unlabeled_batch"] == 1
    pool = sorted(set(project.cases()) - set(labeled) - {held_out})
    assert fm["unlabeled_cases"] == len(pool) == 10  # 2 labeled, 10 unlabeled
    assert rec["excluded_cases"] == [held_out]
    log = fm["filter_log"]
    assert [d["epoch"] for d in log] == [1, 2]  # after epochs 1 and 2; never after the last (3)
    first = log[0]
    assert sorted(first["entropy"]) == pool
    lowest = sorted(first["entropy"], key=lambda c: (first["entropy"][c], c))[:4]  # floor(0.4 * 10) = 4
    assert [d["case"] for d in first["dropped"]] == lowest
    assert len(log[1]["dropped"]) == 2 and fm["remaining"] == 4  # floor(0.4 * 6) = 2
    assert not {d["case"] for d in log[1]["dropped"]} & set(lowest)
    out = predict(project, "fm", project.cases()[:1], device="cpu", probabilities=False)
    assert out[0]["case"] == project.cases()[0]


def test_filtermatch_resume_restores_pool_and_teacher(tiny):
    """SIGKILL a FilterMatch run (EMA teacher) after epoch 2: the resumed run starts from the
    filtered pool and the saved teacher, and ends on the planned schedule."""
    from ALSegLib.nnunet.filtermatch import FilterMatchConfig

    project = tiny["project"]
    ensure_human_labels(project)
    events = train_until_killed(
        project, "filtermatch", "fm-resume", 2, "--epochs", "3", "--iters", "2", "--val-iters", "1", "--warmup", "1",
        "--filter-start", "0", "--filter-every", "1", "--drop-fraction", "0.4", "--teacher", "ema", "--ema-decay", "0.9")
    filters = [e for e in events if e["event"] == "filter"]
    assert [f["epoch"] for f in filters] == [1, 2]
    latest = next((project.root / "nnunet" / "results").glob("*_fm-resume/*/fold_0/checkpoint_latest.pth"))
    state = json.loads(latest.with_suffix(".filtermatch.json").read_text())
    assert state["pool"] and len(state["filter_log"]) == 2 and latest.with_suffix(".teacher.pth").is_file()
    config = FilterMatchConfig(warmup_epochs=1, filter_start=0, filter_every=1, drop_fraction=0.4, teacher="ema", ema_decay=0.9)
    rec = train(project, "filtermatch", name="fm-resume", epochs=3, iterations=2, val_iterations=1, device="cpu",
                validate=False, filtermatch=config)
    assert rec["status"] == "done" and rec["resumed_at_epochs"] == [2] and rec["epochs_done"] == 3
    fm = rec["filtermatch"]
    assert fm["filter_log"] == state["filter_log"]  # restored, and no filter after the last epoch
    assert fm["remaining"] == len(state["pool"]) and fm["config"]["teacher"] == "ema"


def test_prediction_pass_stores_bottleneck_features_and_hybrid_selection_uses_them(tiny, run_cli):
    from ALSegLib import rounds
    from ALSegLib.selection.features import case_features, nnunet_features_path, read_vector

    project = tiny["project"]
    ensure_human_labels(project)
    labeled = project.labeled_cases("human")
    cases = [c for c in project.cases() if c not in labeled]
    out = predict(project, "pretrain", cases, device="cpu")
    assert all(o["features"] == str(nnunet_features_path(project, "pretrain", o["case"]).relative_to(project.root))
               for o in out)
    vectors = {c: read_vector(nnunet_features_path(project, "pretrain", c)) for c in cases}
    dims = {v.shape for v in vectors.values()}
    net = load_checkpoint_safely(project.root / tiny["pretrain"]["checkpoint"])["network_weights"]
    last_stage = max(int(k.split(".")[2]) for k in net if k.startswith("encoder.stages."))
    channels = net[f"encoder.stages.{last_stage}.0.convs.1.conv.weight"].shape[0]
    assert dims == {(channels,)}  # one value per bottleneck channel
    assert len({v.tobytes() for v in vectors.values()}) == len(cases)  # cases differ
    predict(project, "pretrain", cases[:2], device="cpu")  # the same pass again: the same features
    assert all(np.array_equal(read_vector(nnunet_features_path(project, "pretrain", c)), vectors[c]) for c in cases[:2])
    source, _ = case_features(project, cases, "auto", model="pretrain")
    assert source == "nnunet"

    code, text, err = run_cli("select", project.root, "--budget", "3", "--model", "pretrain", "--exclude", cases[-1], "--json")
    assert code == 0, err
    record = json.loads(text)
    queue = record["queue"]
    assert record["selection"]["features"] == "nnunet" and record["selection"]["model"] == "pretrain"
    assert record["selection"]["features_computed_for"] == labeled  # the labeled cases' features, made on demand
    assert len(queue) == 3 and not {q["case"] for q in queue} & (set(labeled) | {cases[-1]})
    assert all(q["open_with"] == "pseudo" and 0 <= q["uncertainty"]["disagreement"] <= 1 for q in queue)
    assert all("uncertainty" in q["reason"] and "Dice" in q["reason"] for q in queue)
    assert rounds.pending_cases(project) == {q["case"] for q in queue}


def test_finished_training_is_not_redone_and_pretrain_resumes_on_its_own_dataset(tiny):
    """A model killed after its final checkpoint (e.g. during validation) is completed, not
    retrained; and the pretraining model keeps its dataset when run again."""
    project = tiny["project"]
    rec = tiny["pretrain"]
    record_file = project.root / "models" / "pretrain" / "model.json"
    saved = record_file.read_text()
    interrupted = json.loads(saved)
    interrupted["status"] = "training"
    record_file.write_text(json.dumps(interrupted))
    try:
        again = train(project, "pretrain", validate=False, device="cpu")
        assert again["dataset"] == rec["dataset"] and again["epochs_done"] == rec["epochs_done"]
        assert again["final_weights_digest"] == rec["final_weights_digest"]  # the same weights: nothing retrained
        assert again["budget"]["epochs"] == rec["budget"]["epochs"]  # the previous budget is kept
    finally:
        record_file.write_text(saved)
    assert not list((project.root / "nnunet" / "results").glob("**/.tmp-*"))  # atomic checkpoints leave no temporaries


def test_ema_teacher_follows_the_student_during_warm_up(tiny):
    """All epochs warm-up: the teacher must still have moved away from the starting weights."""
    from ALSegLib.nnunet.filtermatch import FilterMatchConfig
    from ALSegLib.nnunet.trainers import weights_digest

    project = tiny["project"]
    ensure_human_labels(project)
    config = FilterMatchConfig(warmup_epochs=5, filter_start=10, filter_every=10, teacher="ema", ema_decay=0.5)
    rec = train(project, "filtermatch", name="fm-warm-teacher", epochs=2, iterations=2, val_iterations=1, device="cpu",
                validate=False, filtermatch=config, init_from="pretrain")
    teacher = torch.load(project.root / rec["checkpoint"].replace(".pth", ".teacher.pth"), map_location="cpu", weights_only=True)
    assert rec["init_weights_digest"] == tiny["pretrain"]["final_weights_digest"]
    assert weights_digest(teacher) not in (rec["init_weights_digest"], rec["final_weights_digest"])
def test_a_model_name_with_a_foreign_dataset_snapshot_is_refused(tiny):
    project = tiny["project"]
    ds.export_dataset(project, "pseudo", "reused-name")  # left behind, e.g. by a deleted pretraining model
    with pytest.raises(InputError, match="exists for another kind of model"):
        train(project, "filtermatch", name="reused-name", **BUDGET)
    assert not (project.root / "models" / "reused-name" / "model.json").exists()


def test_init_from_weights_of_other_plans_is_refused(tiny):
    """After re-planning, a model's weights no longer fit the network: fine-tuning from it is refused."""
    project = tiny["project"]
    ensure_human_labels(project)
    assert tiny["pretrain"]["plans_digest"] == project_plans(project)["plans_digest"]
    record_file = folders(project.root).root / "alseg_plans.json"
    saved = record_file.read_text()
    replanned = json.loads(saved)
    replanned["plans_digest"] = "0" * 64  # what `alseg plan --force` with other settings leaves
    record_file.write_text(json.dumps(replanned))
    try:
        with pytest.raises(InputError, match="other plans"):
            train(project, "finetune", name="stale-init", **BUDGET)
    finally:
        record_file.write_text(saved)


def test_a_seeded_training_is_reproduced_and_another_seed_is_not(tiny):
    """nnU-Net seeds nothing: the demo's rounds came out differently from run to run. With a seed,
    the same data and budget give the same weights; another seed gives other weights."""
    project = tiny["project"]
    runs = {name: train(project, "pretrain", name=name, validate=False, seed=seed, **BUDGET)
            for name, seed in (("seeded-a", 7), ("seeded-b", 7), ("seeded-c", 8))}
    assert runs["seeded-a"]["seed"] == 7 and read_model(project, "seeded-a")["seed"] == 7
    assert runs["seeded-a"]["final_weights_digest"] == runs["seeded-b"]["final_weights_digest"]
    assert runs["seeded-a"]["train_losses"] == runs["seeded-b"]["train_losses"]
    assert runs["seeded-c"]["final_weights_digest"] != runs["seeded-a"]["final_weights_digest"]


def test_weights_changed_under_a_model_are_refused_before_predicting_or_fine_tuning(tiny, tmp_path, run_cli):
    """nnUNetv2_train on an engine model's dataset once overwrote its checkpoint_final.pth; 'alseg predict'
    then used the new weights and recorded the old digest. Now the digest is checked first."""
    from conftest import tree_hash

    copy = tiny["project"].copy_to(tmp_path / "copy")
    ensure_human_labels(copy)
    path = copy.root / read_model(copy, "pretrain")["checkpoint"]
    checkpoint = load_checkpoint_safely(path)
    first = next(iter(checkpoint["network_weights"]))
    checkpoint["network_weights"][first] = checkpoint["network_weights"][first] + 1
    torch.save(checkpoint, path)
    before = tree_hash(copy.root)
    code, _, err = run_cli("predict", copy.root, "--model", "pretrain", "--case", copy.cases()[0], "--device", "cpu")
    assert code == 2 and "changed after it finished training" in err and str(path) in err
    code, _, err = run_cli("train", copy.root, "--mode", "finetune", "--name", "ft", "--epochs", "1", "--iters", "1",
                           "--device", "cpu", "--no-validate")
    assert code == 2 and "changed after it finished training" in err
    assert tree_hash(copy.root) == before


def test_a_case_predicted_again_never_leaves_stale_probabilities_for_selection(tiny, tmp_path):
    """'alseg predict --mirroring' without --probabilities once left the earlier unmirrored .npz, stamped
    with the same weights' digest, for selection to read. Now it is removed (and logged), and stored
    probabilities are reused only when made with the same mirroring and tile step."""
    from ALSegLib.nnunet.predict import probabilities_path, stored_with
    from ALSegLib.store.features import nnunet_features_path

    copy = tiny["project"].copy_to(tmp_path / "copy")
    case = copy.cases()[0]
    digest = read_model(copy, "pretrain")["final_weights_digest"]
    predict(copy, "pretrain", [case], probabilities=True, device="cpu")
    assert stored_with(copy, "pretrain", case, digest) and not stored_with(copy, "pretrain", case, digest, mirroring=True)
    assert predict(copy, "pretrain", [case], probabilities=True, device="cpu", reuse=True) == [{"case": case, "reused": True}]
    again = predict(copy, "pretrain", [case], probabilities=True, mirroring=True, device="cpu", reuse=True)
    assert "reused" not in again[0]  # other settings: predicted again
    assert stored_with(copy, "pretrain", case, digest, mirroring=True)
    predict(copy, "pretrain", [case], probabilities=False, device="cpu")
    assert not probabilities_path(copy, "pretrain", case).exists()
    assert not nnunet_features_path(copy, "pretrain", case).exists()
    assert "prediction_output_discarded" in {e["event"] for e in copy.events()}


def test_the_models_table_has_column_headers(tiny, run_cli):
    code, out, _ = run_cli("models", tiny["project"].root)
    header, *rows = out.splitlines()
    assert code == 0 and header.split() == ["model", "mode", "status", "config", "epochs", "labeled", "val", "Dice"]
    assert any(row.split()[:3] == ["pretrain", "pretrain", "done"] for row in rows)


def test_a_model_applied_to_any_image_and_exported_for_nnunets_own_predictor(tiny, tmp_path, run_cli):
    """`alseg apply` predicts an image that is not a case and gives what
    `alseg predict` gives for the same image; `alseg export-model` writes an nnU-Net results folder that
    nnunetv2's own predictor (what nnUNetv2_predict and SlicerNNUNet run) loads and predicts the same with."""
    import shutil

    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    project, model = tiny["project"], tiny["pretrain"]["name"]
    case = project.cases()[0]
    from ALSegLib.volumes import image_extension

    image = tmp_path / f"scan{image_extension(project.image_path(case))}"
    shutil.copy(project.image_path(case), image)
    out = tmp_path / "scan-label.nii.gz"
    code, stdout, err = run_cli("apply", project.root, "--model", model, "--image", image, "--out", out, "--device", "cpu")
    assert code == 0 and str(out.resolve()) in stdout, err
    applied = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    predict(project, model, [case], probabilities=False, device="cpu")
    assert np.array_equal(applied, sitk.GetArrayFromImage(project.read_label(case, "predicted")))
    assert applied.any()
    # bad input: exit 2, named, nothing written
    assert run_cli("apply", project.root, "--model", model, "--image", image, "--out", out)[0] == 2  # exists
    code, _, err = run_cli("apply", project.root, "--model", model, "--image", tmp_path / "none.nii.gz", "--out",
                           tmp_path / "x.nii.gz")
    assert code == 2 and "none.nii.gz" in err and not (tmp_path / "x.nii.gz").exists()
    code, _, err = run_cli("apply", project.root, "--model", model, "--image", image, "--out", project.root / "x.nii.gz")
    assert code == 2 and "inside the project" in err
    assert run_cli("apply", project.root, "--model", "nosuch", "--image", image, "--out", tmp_path / "y.nii.gz")[0] == 2
    seg_out = tmp_path / "scan.seg.nrrd"  # Slicer's segmentation file, with the project's names
    assert run_cli("apply", project.root, "--model", model, "--image", image, "--out", seg_out, "--json")[0] == 0
    assert "Segment0_Name:=organ" in seg_out.read_bytes()[:4000].decode("latin-1")

    export = tmp_path / "export"
    code, stdout, _ = run_cli("export-model", project.root, "--model", model, "--to", export, "--json")
    assert code == 0
    result = json.loads(stdout)
    folder = export / json.loads(stdout)["folder"].split(str(export.resolve()) + "/")[1]
    assert folder.parent.name.startswith("Dataset") and folder.name == f"nnUNetTrainer__{PLANS}__3d_fullres"
    assert {p.name for p in folder.iterdir()} == {"dataset.json", "plans.json", "fold_0", "alseg_model.json"}
    checkpoint = folder / "fold_0" / "checkpoint_final.pth"
    load_checkpoint_safely(checkpoint)  # plain tensors and containers: loads with weights_only=True
    theirs = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=torch.device("cpu"),
                             perform_everything_on_device=False, allow_tqdm=False)
    theirs.initialize_from_trained_model_folder(str(folder), use_folds=(0,), checkpoint_name="checkpoint_final.pth")
    img = sitk.ReadImage(str(image))
    seg = theirs.predict_single_npy_array(sitk.GetArrayFromImage(img).astype(np.float32)[None],
                                          {"spacing": list(img.GetSpacing())[::-1]}, None, None, False)
    values = np.array(json.loads((folder / "alseg_model.json").read_text())["label_values"])
    assert np.array_equal(values[np.asarray(seg)], applied)
    assert result["trainer"] == "nnUNetTrainer" and result["fold"] == 0
    # again: refused without --force, replaced with it; a non-empty foreign folder is refused
    assert run_cli("export-model", project.root, "--model", model, "--to", export)[0] == 2
    assert run_cli("export-model", project.root, "--model", model, "--to", export, "--force")[0] == 0
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert run_cli("export-model", project.root, "--model", model, "--to", tmp_path / "busy")[0] == 2
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]
