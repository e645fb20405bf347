"""The active-learning round end to end on tiny phantoms (real nnU-Net, tiny budgets):
resume after SIGKILL at every stage boundary, the simulated annotator, reports, the
oracle experiment and the demo; simulated pseudo-labels reach their target Dice."""
import json
import os
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import run_until, tree_hash

from ALSegLib import Project, RoundSettings, cli, phantoms, rounds, run_round
from ALSegLib.errors import InputError
from ALSegLib.loop import current_round
from ALSegLib.nnunet.train import read_model
from ALSegLib.project import LabelTable
from ALSegLib.pseudolabels.degraded import (
    SOURCE,
    degrade_to_dice,
    mean_dice,
    pseudolabel_degraded,
)
from ALSegLib.rounds import STAGES
from ALSegLib.simulate import (
    ExperimentSettings,
    SimulatedAnnotator,
    check_no_test_revealed,
    simulate,
)

TINY = dict(device="cpu", configuration="3d_fullres", batch_size=2, pretrain_epochs=2, pretrain_iterations=2,
            epochs=2, iterations=2, val_iterations=1)
CLI_TINY = ["--device", "cpu", "--configuration", "3d_fullres", "--batch-size", "2", "--pretrain-epochs", "2",
            "--pretrain-iters", "2", "--epochs", "2", "--iters", "2", "--val-iters", "1"]


def phantom_project(root, n=12, size=32) -> Project:
    images, labels = phantoms.write_dataset(root / "src", n=n, modality="CT", size=size)
    project = Project.create(root / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    return project


# --- simulated pseudo-labels ----------------------------------------------------------------

@pytest.mark.parametrize("target", [0.9, 0.75, 0.5])
def test_degraded_reference_reaches_its_target_dice_deterministically(target):
    _, lab = phantoms.make_phantom(3, "CT", size=48)
    ref = sitk.GetArrayFromImage(lab)
    a = degrade_to_dice(ref, [1, 2, 3], target, seed=4)
    assert abs(a.dice - target) < 0.02 and abs(mean_dice(a.label, ref, [1, 2, 3]) - a.dice) < 1e-9
    b = degrade_to_dice(ref, [1, 2, 3], target, seed=4)
    assert np.array_equal(a.label, b.label)
    assert not np.array_equal(a.label, degrade_to_dice(ref, [1, 2, 3], target, seed=5).label)
    assert set(np.unique(a.label)) <= {0, 1, 2, 3}


def test_degraded_pseudo_labels_are_named_simulated_and_need_references(project):
    out = pseudolabel_degraded(project, project.cases()[:2], target_dice=0.8, seed=1)
    assert all(abs(o["dice"] - 0.8) < 0.03 for o in out)
    prov = project.provenance(project.cases()[0], "pseudo")
    assert prov["source"] == SOURCE and prov["produced_by"]["simulated"] is True
    bare = Project.create(project.root.parent / "bare", project.labels, "CT")
    bare.add_cases([project.image_path(project.cases()[0])])
    with pytest.raises(InputError, match="reference label to degrade"):
        pseudolabel_degraded(bare)
    with pytest.raises(InputError, match="target"):
        pseudolabel_degraded(project, target_dice=1.5)


def test_simulated_annotator_never_reveals_a_test_case(project):
    test = project.cases()[:2]
    annotator = SimulatedAnnotator(test)
    with pytest.raises(RuntimeError, match="held-out"):
        annotator(project, test[0])
    annotator(project, project.cases()[3])
    assert project.provenance(project.cases()[3], "human")["source"] == "simulated"
    check_no_test_revealed(project, test)
    project.add_human_label(test[1], project.read_label(test[1], "reference"), source="simulated")
    with pytest.raises(AssertionError):
        check_no_test_revealed(project, test)


# --- the round ------------------------------------------------------------------------------

def run_round_cli(project: Project, extra: list[str], kill_after: str | None) -> list[dict]:
    """``alseg round`` in a subprocess; SIGKILL right after the ``stage-done`` event of ``kill_after``."""
    cmd = [sys.executable, "-m", "ALSegLib", "--progress", "jsonl", "round", str(project.root), *extra]
    return run_until(cmd, lambda e: e["event"] == "stage-done" and e["stage"] == kill_after)


def stage_times(project: Project, number: int) -> dict:
    return {k: (v["started"], v["done"]) for k, v in rounds.read_round(project, number)["stages"].items()}


def test_round_killed_at_every_stage_boundary_resumes_without_redoing_finished_stages(tmp_path, capsys):
    project = phantom_project(tmp_path)
    test = project.cases()[-3:]
    start = ["--budget", "2", "--exclude", *test, "--pseudo-source", "degraded-reference", "--target-dice", "0.75", *CLI_TINY]
    seen: dict = {}
    for i, stage in enumerate(STAGES):
        events = run_round_cli(project, start if i == 0 else [], stage)
        done = [e["stage"] for e in events if e["event"] == "stage-done"]
        if stage == "review":  # the round stops for human labels: a person (here the references) labels them
            assert any(e["event"] == "round-waiting" for e in events) and "review" not in done
            record = rounds.read_round(project, 1)
            assert record["waiting"]["cases"] == [q["case"] for q in record["queue"]]
            # asked again (here as `alseg round --json`), the round still waits and says for which cases
            assert cli.main(["round", str(project.root), "--json"]) == 0
            answer = json.loads(capsys.readouterr().out)
            assert answer["waiting"]["cases"] == record["waiting"]["cases"] and "review" not in answer["stages"]
            for case in record["waiting"]["cases"]:
                project.add_human_label(case, project.read_label(case, "reference"), source="simulated")
            events = run_round_cli(project, [], stage)
            done = [e["stage"] for e in events if e["event"] == "stage-done"]
        assert done == [stage], (stage, done)  # exactly the next unfinished stage ran
        times = stage_times(project, 1)
        assert all(times[s] == t for s, t in seen.items()), stage  # finished stages were not redone
        seen = times
    record = rounds.read_round(project, 1)
    assert set(record["stages"]) == set(STAGES)
    assert current_round(project) is None
    assert record["model"] == "round0001-finetune" and record["metrics"]["cases"] == test
    assert not {q["case"] for q in record["queue"]} & set(test)
    assert (project.root / record["stages"]["report"]["files"]["html"]).is_file()
    # a finished round is not run again: a new one needs a budget
    assert cli.main(["round", str(project.root)]) == 2


def test_rounds_through_the_console_api_with_reports_and_learning_curve(tmp_path):
    project = phantom_project(tmp_path)
    test = project.cases()[-3:]
    settings = dict(budget="2", strategy="hybrid", mode="finetune", exclude=test,
                    pseudo={"source": "degraded-reference", "target_dice": 0.75}, **TINY)
    annotator = SimulatedAnnotator(test)
    first = run_round(Project(project.root), annotator=annotator, **settings)
    assert first["round"] == 1 and "waiting" not in first
    assert set(first["stages"]) == set(STAGES)
    pseudo = first["stages"]["pseudolabels"]
    assert pseudo["made"] == 9 and abs(pseudo["pseudo_label_dice"] - 0.75) < 0.03
    assert first["stages"]["pretrain"]["metrics"]["annotated"] == 0  # the pseudo-only model is scored
    second = run_round(Project(project.root), annotator=annotator, **settings)
    assert second["round"] == 2 and second["stages"]["pretrain"]["reused"] is True
    assert second["stages"]["predict-pool"]["model"] == "round0001-finetune"
    assert second["metrics"]["annotated"] == 4 and second["metrics"]["of"] == 9
    # fine-tuned on the 4 human labels and the 5 unreviewed cases' pseudo-labels, test cases never
    trained = second["stages"]["train"]
    assert (trained["labeled_cases"], trained["training_cases"], trained["pseudo_share"]) == (4, 9, 0.5)
    model = read_model(project, "round0002-finetune")
    assert model["policy"] == "human+pseudo" and model["excluded_cases"] == sorted(test)
    assert model["validation_split"] is False
    labeled = set(project.labeled_cases("human"))
    assert len(labeled) == 4 and not labeled & set(test) and set(annotator.revealed) == labeled
    assert all(project.provenance(c, "human")["source"] == "simulated" for c in labeled)
    curve = json.loads((project.root / "reports" / "learning_curve.json").read_text())["points"]
    assert [p["round"] for p in curve] == [0, 1, 2] and [p["annotated"] for p in curve] == [0, 2, 4]
    png = (project.root / "reports" / "learning_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (rounds.round_dir(project, 2) / "report.md").read_text()
    assert "Held-out evaluation" in md and "round0002-finetune" in md and "| mean |" in md
    html = (rounds.round_dir(project, 2) / "report.html").read_text()
    assert html.startswith("<!doctype html>") and "learning_curve.png" in html


def test_round_waits_for_review_and_refuses_conflicting_settings(tmp_path, capsys):
    project = phantom_project(tmp_path, n=8)
    test = project.cases()[-2:]
    settings = RoundSettings(budget="1", exclude=test, pseudo={"source": "degraded-reference", "target_dice": 0.8}, **TINY)
    record = run_round(project, settings)
    assert record["waiting"]["cases"] and "review" not in record["stages"] and "select" in record["stages"]
    with pytest.raises(InputError, match="other settings"):
        run_round(project, RoundSettings(**{**settings.to_json(), "strategy": "random"}))
    again = run_round(project)  # nothing labeled yet: still waiting, nothing redone
    assert again["waiting"]["cases"] == record["waiting"]["cases"]
    assert again["stages"]["select"] == record["stages"]["select"]
    capsys.readouterr()
    assert cli.main(["round", str(project.root), "--json"]) == 0  # a script reads "waiting" (docs/rounds.md)
    printed = json.loads(capsys.readouterr().out)
    assert printed["waiting"]["waiting"] is True and printed["waiting"]["cases"] == record["waiting"]["cases"]
    bare = Project.create(tmp_path / "bare", project.labels, "CT")
    with pytest.raises(InputError, match="no cases"):
        run_round(bare, budget="1")
    bare.add_cases([project.image_path(c) for c in project.cases()[:3]])
    before = tree_hash(bare.root)
    with pytest.raises(InputError, match="no case has a pseudo-label to pretrain on"):
        run_round(bare, budget="1")
    assert tree_hash(bare.root) == before  # refused before anything was written
    for share in (1.0, -0.1, "half"):
        with pytest.raises(InputError, match="pseudo-share"):
            RoundSettings(budget="1", pseudo_share=share)


# --- the experiment and the demo -------------------------------------------------------------

def test_oracle_experiment_runs_every_kind_of_arm_and_never_reveals_test_cases(tmp_path):
    source = phantom_project(tmp_path, n=10)
    before = sorted(p.relative_to(source.root) for p in source.root.rglob("*"))
    settings = ExperimentSettings(rounds=1, seeds=[0], test_fraction=0.3,
                                  arms=["random+finetune", "hybrid+filtermatch", "pseudo-only", "supervised-only",
                                        "full supervision"],
                                  round=RoundSettings(budget="2", pseudo={"source": "degraded-reference", "target_dice": 0.75},
                                                      filtermatch={"warmup_epochs": 1, "filter_start": 1, "filter_every": 1},
                                                      **TINY))
    results = simulate(source, tmp_path / "experiment", settings)
    assert sorted(p.relative_to(source.root) for p in source.root.rglob("*")) == before  # the source is untouched
    test = results["setup"]["test_cases"]
    assert len(test) == 3 and results["setup"]["pool"] == 7
    arms = results["arms"]
    assert set(arms) == set(settings.arms)
    assert arms["pseudo-only"]["final"]["fraction"] == 0 and arms["full supervision"]["final"]["fraction"] == 1
    for arm in ("random+finetune", "hybrid+filtermatch", "supervised-only"):
        assert arms[arm]["final"]["annotated"] == 2 and 0 <= arms[arm]["final"]["mean_dice"] <= 1
    assert results["ratio_to_full"]["full supervision"] == 1.0
    assert abs(results["pseudo_label_dice"] - 0.75) < 0.03
    for arm in ("random-finetune", "hybrid-filtermatch"):
        p = Project(tmp_path / "experiment" / "seed0" / arm)
        check_no_test_revealed(p, test)
        first = rounds.read_round(p, 1)
        assert first["settings"]["exclude"] == test
        # the base's pool prediction with the same pretrained weights is reused, not redone
        assert first["stages"]["predict-pool"]["reused"] == first["stages"]["predict-pool"]["cases"] == 7
    for ext in ("md", "html", "json", "png"):
        assert (tmp_path / "experiment" / f"experiment.{ext}").is_file()
    assert "ratio to full" in (tmp_path / "experiment" / "experiment.md").read_text()
    # same compute per arm: the from-scratch baselines get the pretraining's steps plus one round's
    full = read_model(Project(tmp_path / "experiment" / "seed0" / "full"), "full")["budget"]
    assert full["epochs"] * full["iterations"] == 2 * 2 + 2 * 2


def test_demo_runs_two_simulated_rounds_and_prints_the_table(tmp_path, run_cli):
    code, out, err = run_cli("demo", "--dir", tmp_path / "demo", "--cases", "8", "--size", "32", "--budget", "1",
                             "--pretrain-epochs", "1", "--epochs", "1", "--iters", "2", "--device", "cpu",
                             "--pseudo-source", "degraded-reference")
    assert code == 0, err
    assert "pseudo-labels only" in out and "round 1" in out and "round 2" in out and "Report:" in out
    report = out.split("Report: ")[1].split()[0]
    assert os.path.isfile(report)
    project = Project(tmp_path / "demo" / "project")
    assert len(project.labeled_cases("human")) == 2 and len(rounds.list_rounds(project)) == 2
    # the supervised-only row: from scratch on the same human labels, in a copy beside the project,
    # with the steps of a round's training (1 x 2)
    assert "supervised only (round 2's human labels, from scratch)" in out
    sup = Project(tmp_path / "demo" / "supervised-only")
    budget = read_model(sup, "supervised-only")["budget"]
    assert budget["epochs"] * budget["iterations"] == 2 and read_model(sup, "supervised-only")["mode"] == "supervised"
    assert sorted(sup.labeled_cases("human")) == sorted(project.labeled_cases("human"))
    assert not (project.root / "models" / "supervised-only").exists()
    code, out, err = run_cli("demo", "--dir", tmp_path / "demo", "--rounds", "0")
    assert code == 2 and "--rounds" in err and (tmp_path / "demo" / "project").is_dir()  # refused before replacing
    code, out, err = run_cli("demo", "--dir", tmp_path / "demo", "--pseudo-share", "1.5")
    assert code == 2 and "--pseudo-share" in err and (tmp_path / "demo" / "supervised-only").is_dir()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    code, out, err = run_cli("demo", "--dir", tmp_path / "other")
    assert code == 2 and "not made by 'alseg demo'" in err and (tmp_path / "other" / "keep.txt").read_text() == "x"


def test_the_demo_defaults_to_litemedsam_and_rounds_that_train_as_long_as_a_model_from_scratch():
    """``alseg demo``'s defaults (issue 35): the built-in LiteMedSAM's pseudo-labels (one box per structure
    per case from the references), each round's fine-tuning as many steps as the supervised-only row's
    model from scratch (and more than pretraining: 250 could not move the pretrained model), pseudo-labels
    learned only where the human labels trust them."""
    from ALSegLib.cli import build_parser
    from ALSegLib.demo import DemoSettings, demo_pseudo_source, demo_round
    from ALSegLib.trust import TRUST_DICE

    args = build_parser().parse_args(["demo"])
    assert args.pseudo_source == DemoSettings().pseudo_source == "sam"
    assert demo_pseudo_source(DemoSettings()) == {"source": "sam", "prompts_from_reference": 1}
    r = demo_round()
    assert r.epochs * r.iterations == 1000 > r.pretrain_epochs * r.pretrain_iterations
    assert args.trust_dice == r.trust_dice == TRUST_DICE and r.finetune_from == "pretrain"
    assert build_parser().parse_args(["demo", "--pseudo-source", "degraded-reference"]).pseudo_source == "degraded-reference"


def test_simulate_sweep_reports_final_dice_against_pseudo_label_dice(tmp_path, run_cli):
    """``alseg simulate --sweep``: one base and one arm per pseudo-label quality, through the CLI (--json)."""
    source = phantom_project(tmp_path, n=8)
    code, out, err = run_cli("simulate", source.root, "--out", tmp_path / "exp", "--arms", "random+finetune",
                             "--rounds", "1", "--budget", "2", "--seeds", "0", "--test-fraction", "0.25",
                             "--sweep", "0.5", "0.9", "--json", *CLI_TINY)
    assert code == 0, err
    results = json.loads(out)
    sweep = results["sweep"]
    assert [row["target"] for row in sweep] == [0.5, 0.9]
    for row in sweep:
        assert abs(row["pseudo_label_dice"] - row["target"]) < 0.03 and 0 <= row["final_dice"] <= 1
        assert row["arm"] == "random+finetune" and row["seed"] == 0
    # each sweep point is its own base (pseudo-labels of that quality) and arm, the test cases held out there too
    for target in ("0.50", "0.90"):
        arm = Project(tmp_path / "exp" / f"sweep-{target}" / "random-finetune")
        check_no_test_revealed(arm, results["setup"]["test_cases"])
    assert "Final Dice vs pseudo-label Dice" in (tmp_path / "exp" / "experiment.md").read_text()


def test_learning_curve_plot_ignores_style_changes_made_by_other_libraries(tmp_path):
    """nnU-Net's progress plot sets seaborn (font_scale 2.5) globally in the training process;
    the learning curve drawn afterwards must look the same as in a fresh process."""
    import matplotlib

    from ALSegLib.report import plot_curves

    curves = {"mean": [(0.0, 0.7), (0.025, 0.76), (0.05, 0.78)], "anterior": [(0.0, 0.72), (0.05, 0.8)]}
    clean = plot_curves(curves, tmp_path / "clean.png", "hippocampus: learning curve").read_bytes()
    with matplotlib.rc_context({"font.size": 30, "axes.facecolor": "#eaeaf2", "axes.grid": True}):
        styled = plot_curves(curves, tmp_path / "styled.png", "hippocampus: learning curve").read_bytes()
    assert styled == clean
