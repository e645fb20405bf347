"""Modest hardware: measured estimates, --minutes budgets, memory refusals and CPU-sized plans.

The probes run real nnU-Net steps on tiny phantom plans; a slower machine is stood in for by a
larger patch (bigger phantoms), never by patching the clock."""
import json
import re

import pytest

from ALSegLib import phantoms
from ALSegLib.errors import InputError
from ALSegLib.nnunet import estimate as est
from ALSegLib.nnunet import plan as plan_module
from ALSegLib.nnunet.dataset import find_dataset
from ALSegLib.nnunet.plan import plan
from ALSegLib.nnunet.predict import predict
from ALSegLib.nnunet.train import train
from ALSegLib.project import LabelTable, Project

ALSEG_JOBS = "ALSeg/ALSegSlicer"


def pseudo_project(root, n: int, size: int) -> Project:
    images, labels = phantoms.write_dataset(root / "src", n=n, modality="CT", size=size)
    project = Project.create(root / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    for case in project.cases():
        project.write_label(case, "pseudo", project.read_label(case, "reference"), source="degraded-reference")
    return project


@pytest.fixture(scope="module")
def timed(tmp_path_factory):
    """Six 24^3 phantoms planned at batch 2 (3d_fullres)."""
    project = pseudo_project(tmp_path_factory.mktemp("timed"), 6, 24)
    plan(project, configurations=("3d_fullres",), batch_size=2, device="cpu")
    return project


def events_of(err: str) -> list[dict]:
    return [json.loads(line) for line in err.splitlines() if line.startswith("{")]


# --- arithmetic on a probe (fast) ---------------------------------------------------------------


def a_probe(step_s: float, **changes) -> est.TrainingProbe:
    fields = dict(trainer="ALSegTrainer", configuration="3d_fullres", batch_size=2, patch_size=[32, 32, 32],
                  device="cpu", machine=est.machine(), setup_s=1.0, step_s=step_s, val_step_s=step_s / 3,
                  checkpoint_s=0.1, tile_s=step_s / 4, sample_bytes=2**20, peak_bytes=2**21, steps=3)
    return est.TrainingProbe(**{**fields, **changes})


def test_minutes_fit_fewer_epochs_on_a_slower_step_and_explicit_budgets_win():
    shape = est.JobShape(validation_tiles=20)
    fast = est.budget_for_minutes(a_probe(0.2), shape, 5, default_iterations=50)
    slow = est.budget_for_minutes(a_probe(0.8), shape, 5, default_iterations=50)
    assert fast.iterations == slow.iterations == 50 and slow.epochs < fast.epochs
    for b, p in ((fast, a_probe(0.2)), (slow, a_probe(0.8))):
        assert b.estimated_s <= 300  # it fits ...
        assert est.training_seconds(p, shape, b.epochs + 1, b.iterations) > 300  # ... and one more epoch would not
    given = est.budget_for_minutes(a_probe(0.8), shape, 5, epochs=3, iterations=7)
    assert (given.epochs, given.iterations) == (3, 7) and "win" in given.chosen_from
    fitted = est.budget_for_minutes(a_probe(0.8), shape, 5, epochs=3)
    assert fitted.epochs == 3 and fitted.estimated_s <= 300
    assert est.training_seconds(a_probe(0.8), shape, 3, fitted.iterations + 1) > 300
    tight = est.budget_for_minutes(a_probe(0.8), shape, 0.2, default_iterations=50)  # not even one epoch of 50 fits
    assert tight.epochs == 1 and tight.iterations < 50 and tight.estimated_s <= 12


def test_spent_time_and_filtermatch_phases_count_in_the_estimate():
    probe = a_probe(0.5, unlabeled_step_s=1.5)
    plain = est.training_seconds(probe, est.JobShape(), 10, 10)
    semi = est.JobShape(unlabeled_from=4, filter_start=5, filter_every=3, filter_tiles=40)
    # 6 epochs at the unlabeled step's cost, filter passes after epochs 5 and 8
    assert est.training_seconds(probe, semi, 10, 10) == pytest.approx(plain + 6 * 10 * 1.0 + 2 * 40 * probe.tile_s)
    assert (est.budget_for_minutes(probe, est.JobShape(), 2, spent_s=60).epochs
            < est.budget_for_minutes(probe, est.JobShape(), 2).epochs)


def test_sliding_window_tiles_and_sizes():
    assert est.sliding_window_tiles((40, 56, 40), (40, 56, 40)) == 1
    assert est.sliding_window_tiles((30, 20, 20), (32, 32, 32)) == 1  # padded up to the patch
    assert est.sliding_window_tiles((80, 56, 40), (40, 56, 40)) == 3  # step 0.5: 0, 20, 40
    assert est.sliding_window_tiles((7, 64, 64), (32, 32)) == 7 * 9  # a 2d patch tiles every slice
    assert est.mirror_passes((32, 32, 32), True) == 8 and est.mirror_passes((32, 32), True) == 4
    assert est.parse_bytes("1.5G") == 3 * 2**29 and est.parse_bytes("500M") == 500 * 2**20
    with pytest.raises(InputError, match="ALSEG_MEMORY_LIMIT"):
        est.parse_bytes("lots")
    assert est.duration(7325) == "2 h 02 min" and est.duration(75) == "1 min 15 s" and est.duration(4.4) == "4 s"


def test_bad_minutes_are_refused(run_cli, project):
    for bad in ("0", "-3", "nan"):
        code, _, err = run_cli("train", project.root, "--mode", "pretrain", "--minutes", bad)
        assert code == 2 and "--minutes" in err and "positive number" in err
    assert not (project.root / "models").exists() or not any((project.root / "models").iterdir())


def test_a_memory_limit_that_is_not_a_size_is_refused_before_anything(monkeypatch, project):
    monkeypatch.setenv("ALSEG_MEMORY_LIMIT", "lots")
    with pytest.raises(InputError, match="ALSEG_MEMORY_LIMIT: must be a size such as 8G"):
        train(project, "pretrain", name="m", device="cpu")
    assert not (project.root / "models" / "m").exists() and not (project.root / "nnunet").exists()


def test_the_slicer_progress_uses_the_engines_estimate_from_the_first_minute():
    import sys

    sys.path.insert(0, ALSEG_JOBS.rsplit("/", 1)[0])
    from ALSegSlicer.jobs import ProgressParser

    parser = ProgressParser()
    parser.feed(json.dumps({"event": "stage", "stage": "train"}))
    parser.feed(json.dumps({"event": "estimate", "job": "train", "estimated_s": 600.0}))
    left = parser.progress.seconds_left
    assert left is not None and 595 < left <= 600  # before any epoch has finished
    parser.feed(json.dumps({"event": "epoch", "epoch": 1, "epochs": 10, "seconds": 50.0, "seconds_left": 480.0}))
    assert 475 < parser.progress.seconds_left <= 480 and "left" in parser.progress.text()


# --- real probes on phantom plans (slow) ----------------------------------------------------------


def test_a_training_announces_its_measured_estimate_and_records_it(timed, monkeypatch, capsys):
    monkeypatch.setenv("ALSEG_PROGRESS", "jsonl")
    record = train(timed, "pretrain", name="probed", epochs=2, iterations=3, val_iterations=1, device="cpu",
                   validate=False)
    events = events_of(capsys.readouterr().err)
    kinds = [e["event"] for e in events]
    announced = next(e for e in events if e["event"] == "estimate" and e["job"] == "train")
    assert kinds.index("estimate") < kinds.index("epoch")  # before the first epoch
    probe = record["estimate"]["probe"]
    assert probe["steps"] == 3 and len(probe["step_times_s"]) == 3 and probe["step_s"] > 0 and probe["tile_s"] > 0
    assert probe["batch_size"] == 2 and probe["patch_size"] and probe["sample_bytes"] > 0 and not probe["cached"]
    assert announced["estimated_s"] == record["estimate"]["estimated_s"] > 0
    assert record["estimate"]["actual_s"] > 0 and record["budget"]["epochs"] == 2
    epochs = [e for e in events if e["event"] == "epoch"]
    assert all("seconds_left" in e for e in epochs) and epochs[-1]["seconds_left"] < epochs[0]["seconds_left"] + 1e-6
    # the probe left nothing in the project's results, and a second model reuses its figures
    again = train(timed, "pretrain", name="probed-again", epochs=1, iterations=2, val_iterations=1, device="cpu",
                  validate=False)
    assert again["estimate"]["probe"]["cached"] and again["estimate"]["probe"]["step_s"] == probe["step_s"]
    # a prediction announces its tiles and their measured time before the first case
    predict(timed, "probed", timed.cases()[:2], probabilities=False, device="cpu")
    events = events_of(capsys.readouterr().err)
    told = next(e for e in events if e["event"] == "estimate" and e["job"] == "predict")
    assert told["tiles"] >= 2 and told["tile_s"] > 0 and told["estimated_s"] > 0
    # the next prediction adds what this one took besides its tiles (reading, resampling, writing)
    predict(timed, "probed", timed.cases()[2:4], probabilities=False, device="cpu")
    again = next(e for e in events_of(capsys.readouterr().err) if e["event"] == "estimate" and e["job"] == "predict")
    assert again["overhead_s_per_voxel"] > 0 and re.search(r"as the last \d+ predictions here took", again["message"])


def test_minutes_choose_fewer_iterations_for_a_larger_patch(timed, tmp_path):
    big = pseudo_project(tmp_path, 6, 56)
    plan(big, configurations=("3d_fullres",), batch_size=2, device="cpu")
    small_record = train(timed, "pretrain", name="fit-small", epochs=1, minutes=1, device="cpu", validate=False)
    big_record = train(big, "pretrain", name="fit-big", epochs=1, minutes=1, device="cpu", validate=False)
    small_probe, big_probe = small_record["estimate"]["probe"], big_record["estimate"]["probe"]
    assert big_probe["patch_size"] != small_probe["patch_size"] and big_probe["step_s"] > small_probe["step_s"]
    assert big_record["budget"]["iterations"] < small_record["budget"]["iterations"]
    for r in (small_record, big_record):
        assert r["budget"]["epochs"] == 1  # --epochs given: the iterations were fitted
        assert r["estimate"]["time_budget"]["minutes"] == 1 and "fit" in r["estimate"]["time_budget"]["chosen"]
        assert r["estimate"]["spent_s"] + r["estimate"]["estimated_s"] <= 60 + 1e-6
    explicit = train(timed, "pretrain", name="fit-explicit", epochs=1, iterations=2, minutes=0.05, device="cpu",
                     validate=False)
    assert explicit["budget"]["iterations"] == 2 and "win" in explicit["estimate"]["time_budget"]["chosen"]


def test_a_deadline_refits_the_epochs_to_the_epochs_own_pace(timed):
    import time

    import torch

    from ALSegLib.nnunet.env import folders, scratch_environment
    from ALSegLib.nnunet.plan import project_plans
    from ALSegLib.nnunet.trainers import ALSegTrainer

    pre = folders(timed.root).preprocessed / project_plans(timed)["dataset"]
    plans = json.loads((pre / "ALSegPlans.json").read_text())
    plans["continue_training"] = False
    with scratch_environment(timed.root, torch.device("cpu")):
        trainer = ALSegTrainer(plans, "3d_fullres", 0, json.loads((pre / "dataset.json").read_text()), torch.device("cpu"))

    def refit(seconds_to_deadline: float) -> int:
        now = time.time()
        trainer.logger = type(trainer.logger)(trainer.output_folder, False)
        trainer.logger.log("epoch_start_timestamps", now - 20, 0)
        trainer.logger.log("epoch_start_timestamps", now - 10, 1)  # epochs of 10 s; the second ends now
        trainer.num_epochs, trainer.current_epoch, trainer.deadline = 10, 1, now + seconds_to_deadline
        trainer._refit_to_deadline()
        return trainer.num_epochs

    assert refit(35) == 5  # 3 more epochs fit in 35 s, less a quarter of an epoch for this one's checkpoints
    assert refit(5) == 2  # no time for another: this epoch is the last
    assert refit(1000) == 101  # the probe was too slow: the time left is used, up to max_epochs
    trainer.max_epochs = 50
    assert refit(1000) == 50 and trainer.refits[-1] == {"after_epoch": 2, "epochs": 50, "epoch_s": 10.0}


def test_a_batch_that_cannot_fit_memory_is_refused_before_anything_is_written(timed, monkeypatch, run_cli):
    monkeypatch.setenv("ALSEG_MEMORY_LIMIT", "1M")
    models = timed.root / "models"
    before = sorted(p.name for p in models.iterdir()) if models.is_dir() else []
    code, _, err = run_cli("train", timed.root, "--mode", "pretrain", "--name", "too-big", "--device", "cpu",
                           "--epochs", "1", "--iters", "1")
    assert code == 2 and "--batch-size 2" in err and "ALSEG_MEMORY_LIMIT=1M" in err and "per sample" in err
    assert (sorted(p.name for p in models.iterdir()) if models.is_dir() else []) == before
    assert find_dataset(timed, "too-big") is None
    with pytest.raises(InputError, match="not even one sample fits"):
        train(timed, "pretrain", name="too-big", epochs=1, iterations=1, device="cpu")


def test_cpu_plans_choose_a_smaller_batch_when_a_round_would_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_module, "CPU_ROUND_S", 1.0)  # an hour's round on a far slower machine
    project = pseudo_project(tmp_path, 6, 32)
    record = plan(project, configurations=("2d",), device="cpu")
    chosen = record["cpu_plan"]["2d"]
    nnunet = record["nnunet_batch_size"]["2d"]
    assert nnunet > 2 and chosen["batch_size"] == record["batch_size"]["2d"] == 2 < nnunet
    assert chosen["step_s"][str(nnunet)] > 0 and chosen["step_s"]["2"] > 0
    assert "instead of nnU-Net's" in chosen["reason"] and "nnUNetPlans.json" in chosen["reason"]
    nnunet_plans = json.loads((project.root / record["nnunet_plans"]).read_text())
    assert nnunet_plans["configurations"]["2d"]["batch_size"] == nnunet  # nnU-Net's own plan kept for a GPU
