"""Boxes for a few cases, not all of them: a round whose pseudo-label source covers some cases only
bootstraps the others from them (real nnU-Net on phantoms with small budgets; LiteMedSAM's real
weights for the ``sam`` method), with provenance saying which case was prompted and which bootstrapped."""
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from ALSegLib import Project, cli, phantoms, run_round
from ALSegLib.bootstrap import MODEL, SOURCE, _as_pseudo, prompt_effort, prompted, unlabeled
from ALSegLib.errors import InputError
from ALSegLib.loop import source_cases
from ALSegLib.nnunet.train import read_model
from ALSegLib.project import LabelTable
from ALSegLib.settings import RoundSettings
from ALSegLib.simulate import SimulatedAnnotator

# the bootstrap model trains on pretraining's budget: 30 steps, enough for it to find the phantoms' organs
SMALL = dict(device="cpu", configuration="3d_fullres", batch_size=2, pretrain_epochs=3, pretrain_iterations=10,
             epochs=2, iterations=2, val_iterations=1)


def phantom_project(root, n, size=32) -> Project:
    images, labels = phantoms.write_dataset(root / "src", n=n, modality="CT", size=size)
    project = Project.create(root / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    return project


def label_folder(project: Project, cases, folder):
    """Another model's labels for ``cases`` only (here: the references), as files named after the cases."""
    folder.mkdir()
    for case in cases:
        shutil.copyfile(project.label_path(case, "reference"), folder / f"{case}.nrrd")
    return folder


def test_a_round_bootstraps_the_cases_its_source_does_not_cover_and_says_which_were_which(tmp_path, run_cli):
    project = phantom_project(tmp_path, 7)
    cases = project.cases()
    test, given, rest = cases[-2:], cases[:2], cases[2:5]
    source = {"source": "import", "from": str(label_folder(project, given, tmp_path / "other-model"))}
    record = run_round(project, budget="1", exclude=test, pseudo=source, annotator=SimulatedAnnotator(test), **SMALL)
    boot = record["stages"]["bootstrap"]
    assert (boot["method"], boot["prompted"], boot["unprompted"]) == ("predict", 2, 3)
    assert boot["bootstrapped"] >= 1 and boot["bootstrapped"] + len(boot["empty"]) == 3
    assert record["stages"]["pseudolabels"] == {**record["stages"]["pseudolabels"], "made": 2, "without": 3}
    made = [c for c in rest if project.label_path(c, "pseudo") is not None]
    assert len(made) == boot["bootstrapped"] and boot["cases"] == made and boot["without"] == 3 - len(made)
    for case in made:
        prov = project.provenance(case, "pseudo")
        assert prov["source"] == SOURCE and prov["bootstrapped_from"] == sorted(given)
        assert prov["bootstrap"] == {"method": "predict", "model": MODEL} and prov["produced_by"]["model"] == MODEL
    for case in given:
        prov = project.provenance(case, "pseudo")
        assert prov["source"] == "import" and "bootstrapped_from" not in prov
    assert prompted(project, cases) == sorted(given) and unlabeled(project, rest) == sorted(set(rest) - set(made))
    assert read_model(project, MODEL)["labeled_cases"] == 2  # learned from the prompted cases only
    assert read_model(project, "pretrain")["labeled_cases"] == 2 + len(made)  # pretraining: all of them
    assert 0.0 <= boot["bootstrapped_dice"] <= 1.0 and boot["pseudo_label_cases"] == 2 + len(made)
    assert not set(test) & set(project.labeled_cases("pseudo"))  # held-out cases: never a pseudo-label
    page = (project.root / record["stages"]["report"]["files"]["markdown"]).read_text()
    assert (f"2 case(s) with their own pseudo-label (0 boxes drawn); {len(made)} of 3 without one bootstrapped from "
            "them (method predict)") in page
    code, out, _ = run_cli("status", project.root, "--json")
    origins = json.loads(out)["pseudo_origins"]
    assert code == 0 and (origins["prompted"], origins["bootstrapped"], origins["other"]) == (0, len(made), 2)  # imports
    # later rounds: pretrained already, nothing bootstrapped again (and the stored pseudo-labels kept)
    before = {c: project.provenance(c, "pseudo")["file_sha256"] for c in made}
    second = run_round(project, budget="1", exclude=test, pseudo=source, annotator=SimulatedAnnotator(test), **SMALL)
    assert second["stages"]["bootstrap"]["skipped"] == "pretrained already"
    assert {c: project.provenance(c, "pseudo")["file_sha256"] for c in made} == before


def test_bootstrap_off_leaves_the_unprompted_cases_to_the_humans(tmp_path):
    project = phantom_project(tmp_path, 5)
    cases = project.cases()
    source = {"source": "import", "from": str(label_folder(project, cases[:2], tmp_path / "other-model"))}
    record = run_round(project, budget="1", exclude=cases[-1:], pseudo=source, bootstrap="off",
                       annotator=SimulatedAnnotator(cases[-1:]), **SMALL)
    boot = record["stages"]["bootstrap"]
    assert (boot["bootstrapped"], boot["unprompted"], boot["without"]) == (0, 2, 2)
    assert read_model(project, "pretrain")["labeled_cases"] == 2
    assert sorted(project.labeled_cases("pseudo")) == sorted(cases[:2])


def test_an_empty_prediction_is_not_stored_as_a_pseudo_label(project):
    case = project.cases()[0]
    empty = sitk.Image(project.read_image(case).GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(project.read_image(case))
    project.write_label(case, "predicted", empty, source="nnunet", produced_by={"model": MODEL})
    assert _as_pseudo(project, [case], {"bootstrapped_from": ["x"]}) == []
    assert project.label_path(case, "pseudo") is None


def test_which_cases_a_source_covers(project, tmp_path):
    cases = project.cases()
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"space": "index", "axis": "axial",
                                   "cases": {cases[1]: {"organ": [{"box": [[4, 4, 10], [20, 20, 10]]}]}}}))
    assert source_cases(project, {"source": "sam", "prompts": str(prompts)}, cases) == [cases[1]]
    assert source_cases(project, {"source": "sam", "prompts_from_reference": 3, "exclude": cases[:2]}, cases) == cases[2:]
    assert source_cases(project, {"source": "sam", "auto": True, "exclude": [cases[0]]}, cases) == cases[1:]
    folder = label_folder(project, cases[2:4], tmp_path / "labels")
    assert source_cases(project, {"source": "import", "from": str(folder)}, cases) == cases[2:4]
    assert source_cases(project, {"source": "sam", "from_labels": str(folder)}, cases[:3]) == [cases[2]]
    assert source_cases(project, {"source": "degraded-reference", "target_dice": 0.7}, cases) == cases
    for spec in ({"source": "import", "from": str(tmp_path / "nowhere")}, {"source": "sam", "from_labels": "nowhere"}):
        with pytest.raises(InputError, match="folder of label files not found"):
            source_cases(project, spec, cases)


def test_the_bootstrap_option_and_its_bad_values(run_cli, tmp_path):
    args = cli.build_parser().parse_args(["round", "p", "--budget", "2", "--bootstrap", "sam"])
    assert cli._round_settings(args).bootstrap == "sam"
    assert cli._round_settings(cli.build_parser().parse_args(["round", "p", "--budget", "2"])).bootstrap == "predict"
    with pytest.raises(InputError, match="--bootstrap"):
        RoundSettings(bootstrap="everything")
    code, _, err = run_cli("round", tmp_path / "p", "--budget", "2", "--bootstrap", "everything")
    assert code == 2 and "--bootstrap" in err and "predict" in err


def test_bootstrap_sam_prompts_litemedsam_with_the_first_model_s_outlines(tmp_path, run_cli):
    """The real LiteMedSAM: two phantoms prompted by one simulated box per structure, one bootstrapped
    through the foundation model from the bootstrap model's outlines (prior boxes per slice)."""
    project = phantom_project(tmp_path, 4)
    cases = project.cases()
    test, given, rest = cases[-1:], cases[:2], cases[2]
    source = {"source": "sam", "prompts_from_reference": 1, "exclude": [rest]}
    record = run_round(project, budget="1", exclude=test, pseudo=source, bootstrap="sam", **SMALL)
    assert record.get("waiting")  # stopped at review: everything before it ran
    boot = record["stages"]["bootstrap"]
    assert (boot["method"], boot["prompted"], boot["unprompted"]) == ("sam", 2, 1)
    effort = prompt_effort(project, given)
    assert effort == {"prompted_cases": 2, "boxes": 6, "point_prompts": 0, "simulated": True}  # 1 box x 3 structures x 2
    assert (boot["boxes"], boot["simulated"]) == (6, True)
    assert boot["bootstrapped"] == 1  # the bootstrap model found the organs for LiteMedSAM to segment
    prov = project.provenance(rest, "pseudo")
    assert prov["source"] == "sam" and prov["mode"] == "prior" and prov["bootstrapped_from"] == sorted(given)
    assert prov["bootstrap"] == {"method": "sam", "model": MODEL}
    assert prov["prior_file"] == str((project.layout.bootstrap_priors / f"{rest}.nrrd").resolve())
    prior = sitk.GetArrayFromImage(sitk.ReadImage(prov["prior_file"]))
    pseudo = sitk.GetArrayFromImage(project.read_label(rest, "pseudo"))
    assert prior.any() and 0 < np.count_nonzero(pseudo) < pseudo.size  # LiteMedSAM's masks, inside the prior's boxes
    assert prompt_effort(project, [rest])["boxes"] == 0  # a bootstrapped case: no box was drawn for it
    code, out, _ = run_cli("status", project.root)
    assert code == 0 and "Pseudo    2 prompted (6 boxes, simulated), 1 bootstrapped from them, 0 other" in out
