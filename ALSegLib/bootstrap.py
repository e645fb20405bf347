"""Pseudo-labels for the cases nobody prompted, from the cases somebody did.

A radiologist draws boxes for some cases only (the panel says how many are enough); the round's
pseudo-label stage makes those cases' pseudo-labels with the foundation model, and this stage (the
round's ``bootstrap``, between ``plan`` and ``pretrain``, first round only) the others':

1. ``bootstrap``: an nnU-Net trained on the pseudo-labels there are (the prompted cases'), with
   pretraining's budget, on the round's device;
2. it predicts every trainable case that has neither a pseudo-label nor a human label;
3. ``predict``: that prediction is the case's pseudo-label; ``sam``: its outline on each slice is
   the box the foundation model segments from (``alseg pseudolabel --from-labels``), and the
   foundation model's masks are the pseudo-label. ``off``: the unprompted cases get none (they are
   learned only once a human labels them).

The default is the method ``Testing/Benchmarks/bench_few_prompts.py`` measured better
(``results/few_prompts.json``). A bootstrapped pseudo-label's provenance names its method, the model
and the cases it learned from (``bootstrapped_from``); a prompted one's holds its prompts. Both are
``pseudo`` labels: the trust of :mod:`.trust` judges them against the human labels alike, and a
human label is never touched.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence

from . import atomic, progress
from .errors import InputError
from .project import Project
from .settings import PseudoSource, RoundSettings

MODEL = "bootstrap"
SOURCE = "bootstrap"  # the provenance source of a pseudo-label the `predict` method stored
# the fewest prompted cases the panel asks for: a tenth, at least ENOUGH_MIN (few_prompts.json, Hippocampus: 10 % of an
# 80-case pool ended 0.04-0.05 Dice below prompting every case after two rounds, 25 % 0.03 below; fewer than 8
# prompted cases was not measured)
ENOUGH_FRACTION = 0.10
ENOUGH_MIN = 5


def enough_prompts(cases: int) -> int:
    """The fewest prompted cases the panel asks for in a project of ``cases`` cases (the rest are bootstrapped)."""
    import math

    return min(cases, max(ENOUGH_MIN, math.ceil(ENOUGH_FRACTION * cases)))


def unlabeled(project: Project, cases: Sequence[str]) -> list[str]:
    """Of ``cases``, those with neither a pseudo-label nor a human label: what bootstrapping is for."""
    have = set(project.labeled_cases("pseudo")) | set(project.labeled_cases("human"))
    return [c for c in cases if c not in have]


def bootstrapped(project: Project, cases: Sequence[str]) -> list[str]:
    """Of ``cases``, those whose pseudo-label this stage made (their provenance names ``bootstrapped_from``)."""
    have = set(project.labeled_cases("pseudo"))
    return [c for c in cases if c in have and "bootstrapped_from" in project.provenance(c, "pseudo", check_file=False)]


def prompted(project: Project, cases: Sequence[str]) -> list[str]:
    """Of ``cases``, those whose pseudo-label was not bootstrapped (made from prompts, a prior or an import)."""
    have = set(project.labeled_cases("pseudo"))
    boot = set(bootstrapped(project, cases))
    return [c for c in cases if c in have and c not in boot]


def prompt_effort(project: Project, cases: Sequence[str]) -> dict:
    """What a person drew for the pseudo-labels of ``cases``: boxes and point-only prompts (each entry of a
    prompt file is one; a simulated run's boxes from the references count alike, named ``simulated``)."""
    boxes = points = 0
    prompted_cases = 0
    simulated = False
    for case in cases:
        if project.label_path(case, "pseudo") is None:
            continue
        prov = project.provenance(case, "pseudo", check_file=False)
        if prov.get("mode") not in ("prompts", "reference") or not isinstance(prov.get("prompts"), dict):
            continue
        prompted_cases += 1
        simulated = simulated or prov.get("mode") == "reference"
        for entries in prov["prompts"].values():
            for p in entries:
                if "box" in p:
                    boxes += 1
                elif p.get("points"):
                    points += 1
    return {"prompted_cases": prompted_cases, "boxes": boxes, "point_prompts": points, "simulated": simulated}


def pseudo_origins(project: Project) -> dict:
    """Where the project's pseudo-labels came from: prompted (a prompt file, or simulated boxes), bootstrapped,
    other (imported, a prior label, automatic prompts, simulated); with the boxes drawn (``alseg status``)."""
    cases = project.labeled_cases("pseudo")
    boot = bootstrapped(project, cases)
    effort = prompt_effort(project, [c for c in cases if c not in set(boot)])
    return {"prompted": effort["prompted_cases"], "bootstrapped": len(boot),
            "other": len(cases) - len(boot) - effort["prompted_cases"], "boxes": effort["boxes"],
            "point_prompts": effort["point_prompts"], "simulated": effort["simulated"]}


def bootstrap(project: Project, settings: RoundSettings, trainable: Sequence[str], *, round_id: str, ray=None,
              num_gpus: int = 1) -> dict:
    """Pseudo-labels for the trainable cases that have none (the first round, before pretraining);
    returns the stage's details: method, the cases bootstrapped (``cases``) and how many they were
    learned from, empty predictions."""
    from .store.models import finished

    cases = unlabeled(project, trainable)
    learned_from = prompted(project, trainable)
    out: dict = {"method": settings.bootstrap, "prompted": len(learned_from), "unprompted": len(cases),
                 **prompt_effort(project, learned_from)}
    if not cases or settings.bootstrap == "off":
        return {**out, "bootstrapped": 0}
    if not learned_from:
        raise InputError(project.root, "no case has a pseudo-label to bootstrap the others from; prompt a few cases "
                                       "(or import another model's labels) first")
    method = settings.bootstrap
    spec = settings.pseudo
    if method == "sam" and (spec is None or spec.source != "sam"):
        method = "predict"  # the foundation model is the round's source; without one the prediction is the label
        out["note"] = "bootstrap sam needs the round's pseudo-label source to be sam: the predictions are stored"
    from .nnunet.predict import predict
    from .nnunet.train import train

    s = settings
    if not finished(project, MODEL):
        progress.announce("bootstrap", f"bootstrap: an nnU-Net on the {len(learned_from)} prompted case(s)' pseudo-labels "
                          f"for the {len(cases)} unprompted", prompted=len(learned_from), unprompted=len(cases))
        rec = train(project, "pretrain", name=MODEL, epochs=s.pretrain_epochs, iterations=s.pretrain_iterations,
                    val_iterations=s.val_iterations, device=s.device, validate=False, exclude_cases=s.exclude,
                    seed=s.seed, minutes=s.minutes, num_gpus=num_gpus, trust_dice=s.trust_dice)
        out["seconds_training"] = rec["seconds"]
    predict(project, MODEL, cases, probabilities=False, features=False, device=s.device, round_id=round_id, ray=ray)
    stamp = {"bootstrapped_from": sorted(learned_from), "bootstrap": {"method": method, "model": MODEL}}
    made = _as_pseudo(project, cases, stamp) if method == "predict" else _with_sam(project, cases, spec, s.device, stamp)
    return {**out, "method": method, "bootstrapped": len(made), "cases": made, "empty": sorted(set(cases) - set(made))}


def _as_pseudo(project: Project, cases: Sequence[str], stamp: dict) -> list[str]:
    """The bootstrap model's predictions stored as the cases' pseudo-labels (an empty one is not stored)."""
    import SimpleITK as sitk

    made = []
    for case in progress.track(cases, desc="bootstrapped pseudo-labels"):
        label = project.read_label(case, "predicted")
        if not sitk.GetArrayViewFromImage(label).any():
            continue
        prov = project.provenance(case, "predicted", check_file=False)
        project.write_label(case, "pseudo", label, source=SOURCE, produced_by=prov.get("produced_by", {"model": MODEL}),
                            **stamp)
        made.append(case)
    return made


def _with_sam(project: Project, cases: Sequence[str], spec: PseudoSource, device: str, stamp: dict) -> list[str]:
    """The foundation model of the round's source, prompted by the bootstrap model's predictions
    (copied to ``bootstrap/priors``: the prior files the provenance names)."""
    from .pseudolabels.run import pseudolabel_with_sam

    folder = project.layout.bootstrap_priors
    with project.lock("bootstrap priors"):
        if folder.exists():
            shutil.rmtree(folder)
        for case in cases:
            src = project.label_path(case, "predicted")
            atomic.write_with(folder / f"{case}{''.join(src.suffixes)}", lambda tmp, src=src: shutil.copyfile(src, tmp))
    # the source's model and slicing, its prompts replaced by the priors
    prior = spec.with_options(prompts=None, prompts_from_reference=None, auto=None, auto_settings=None,
                              settings_file=None, exclude=(), from_labels=str(folder))
    label_settings = None
    if spec.prompts:  # the prompt file's label settings (windows, relations, holes), every part the prior shows kept
        label_settings = _prior_settings(project, spec.prompts)
    options = prior.options()
    options.setdefault("device", device)  # one device rule: the round's, unless the source names one
    out = pseudolabel_with_sam(project, options.pop("checkpoint", None), cases=cases, provenance=stamp,
                               label_settings=label_settings, **options)
    return [o["case"] for o in out if o.get("status") == "written"]


def _prior_settings(project: Project, prompts: str) -> dict:
    from dataclasses import replace

    from .pseudolabels import prompts as pr

    pf = pr.read_prompt_file(prompts, list(project.labels.mapping), project.cases())
    return {n: replace(s, post=replace(s.post, keep_components=0)) for n, s in pf.labels.items()}
