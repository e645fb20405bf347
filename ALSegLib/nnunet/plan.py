"""nnU-Net self-configuration for a project: fingerprint, experiment planning, preprocessing.

The project is planned once, on its first (normally pseudo-labeled) dataset.
ALSeg keeps nnU-Net's ``nnUNetPlans.json`` untouched and writes its own
``ALSegPlans.json`` beside it (optionally with a smaller batch for a CPU).
Every later dataset of the project (human labels, later rounds) gets these
same plans moved over, so architecture, patch size and normalisation stay the
same and weights carry over from one model to the next.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Sequence
from pathlib import Path

from .. import atomic
from ..errors import InputError
from ..progress import announce, emit
from ..project import Project
from ..store.files import now_iso
from .dataset import Dataset, export_dataset, find_dataset
from .env import folders, nnunet_environment, resolve_device, scratch_environment
from .modes import CPU_BUDGET

PLANS = "ALSegPlans"
RECORD = "alseg_plans.json"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")


def default_processes() -> int:
    """Worker processes for fingerprinting and preprocessing: half the cores, 1 to 4."""
    return max(1, min(4, (os.cpu_count() or 2) // 2))


def project_plans(project: Project) -> dict | None:
    """The project's plans record (planning dataset, configurations), or None before planning."""
    path = folders(project.root).plans_record
    return json.loads(path.read_text()) if path.is_file() else None


def _unique_tag(project: Project, base: str) -> str:
    tag, n = base, 1
    while find_dataset(project, tag) is not None:
        n += 1
        tag = f"{base}{n}"
    return tag


def plan(
    project: Project,
    *,
    policy: str = "pseudo",
    configurations: Sequence[str] = ("3d_fullres",),
    batch_size: int | None = None,
    num_processes: int | None = None,
    force: bool = False,
    preprocess_dataset: bool = True,
    device: str = "auto",
) -> dict:
    """Plan and preprocess the project on its ``policy`` labels; returns the plans record.

    Does nothing if the project is already planned, unless ``force``.
    ``preprocess_dataset=False`` plans without preprocessing the planning dataset:
    a round trains on datasets of its own (each preprocessed when trained), so
    preprocessing this one too cost the demo 9 s for nothing.

    On a CPU, without ``batch_size``, each configuration's batch is chosen from measured steps
    so that a round's training fits the hour (:func:`cpu_batch`); nnU-Net's own plan stays in
    ``nnUNetPlans.json`` beside ALSeg's for a later GPU run, and the record says what was chosen and why.
    """
    for c in configurations:
        if c not in CONFIGURATIONS:
            raise InputError("--configuration", f"must be one of {', '.join(CONFIGURATIONS)}, not {c!r}")
    if batch_size is not None and batch_size < 1:
        raise InputError("--batch-size", f"must be at least 1, not {batch_size}")
    existing = project_plans(project)
    if existing is not None and not force:
        return existing
    nproc = num_processes or default_processes()
    dataset = export_dataset(project, policy, _unique_tag(project, f"plan-{policy.replace('+', '-')}"))
    f = folders(project.root)
    emit("stage", stage="plan", dataset=dataset.name, cases=len(dataset.cases))
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprints,
        plan_experiments,
    )

    with nnunet_environment(project.root, log=f.logs / "plan.log"):
        extract_fingerprints([dataset.id], num_processes=nproc, check_dataset_integrity=True, clean=True, verbose=False)
        plan_experiments([dataset.id])
        base = json.loads((f.preprocessed / dataset.name / "nnUNetPlans.json").read_text())
        missing = [c for c in configurations if c not in base["configurations"]]
        if missing:
            raise InputError(project.root, f"nnU-Net planned no {', '.join(missing)} configuration for these images "
                             f"(available: {', '.join(base['configurations'])})")
        plans = _alseg_plans(base, configurations, batch_size)
    cpu_plans = {}
    dev = resolve_device(device)
    if batch_size is None and dev.type == "cpu":
        dataset_json = json.loads((f.preprocessed / dataset.name / "dataset.json").read_text())
        for c in configurations:
            cpu_plans[c] = _cpu_batch_once(project, base, plans, c, dataset_json, dev)
            plans["configurations"][c]["batch_size"] = cpu_plans[c]["batch_size"]
            announce("plan", f"plan: {c}: {cpu_plans[c]['reason']}", configuration=c, **{
                k: v for k, v in cpu_plans[c].items() if k != "reason"})
    atomic.write_json(f.preprocessed / dataset.name / f"{PLANS}.json", plans)
    record = {
        "dataset": dataset.name,
        "policy": policy,
        "plans": PLANS,
        "plans_digest": plans_digest(plans),
        "configurations": list(configurations),
        "batch_size": {c: plans["configurations"][c]["batch_size"] for c in configurations},
        "nnunet_batch_size": {c: base["configurations"][c]["batch_size"] for c in configurations},
        "nnunet_plans": str((f.preprocessed / dataset.name / "nnUNetPlans.json").relative_to(project.root)),
        "cpu_plan": cpu_plans or None,
        "patch_size": {c: plans["configurations"][c]["patch_size"] for c in configurations},
        "normalization": plans["configurations"][configurations[0]]["normalization_schemes"],
        "time": now_iso(),
    }
    for c in configurations if preprocess_dataset else ():
        preprocess(project, dataset, c, nproc)
    with project.lock("record nnU-Net plans"):
        atomic.write_json(f.plans_record, record)
        project.log_event("nnunet_planned", **{k: record[k] for k in ("dataset", "configurations", "batch_size", "patch_size")})
    return record


CPU_ROUND_S = 3600  # a round on a CPU should fit an hour ...
CPU_TRAINING_SHARE = 0.75  # ... its training three quarters of it (the rest: predicting the pool, selecting)
MIN_BATCH = 2  # nnU-Net's smallest: its foreground oversampling forces the last third of a batch, none of batch 1


def _cpu_batch_once(project: Project, base: dict, plans: dict, configuration: str, dataset_json: dict, dev) -> dict:
    """:func:`cpu_batch`, chosen once per nnU-Net plan and machine: planning the same data again here
    gives the same batch (and plans digest), not one that timing noise moved."""
    from . import estimate as est

    key = (f"cpu batch, {configuration}, nnU-Net plans {plans_digest(base)[:16]}, round target "
           f"{CPU_ROUND_S * CPU_TRAINING_SHARE:g} s")
    earlier = est.machine_choice(key, dev)
    if isinstance(earlier, dict) and isinstance(earlier.get("batch_size"), int):
        return {**earlier, "reason": f"as chosen on this machine before: {earlier['reason']}", "reused": True}
    chosen = cpu_batch(project, plans, configuration, dataset_json, dev)
    est.keep_machine_choice(key, chosen, dev)
    return chosen


def cpu_batch(project: Project, plans: dict, configuration: str, dataset_json: dict, dev) -> dict:
    """The batch (at most nnU-Net's) whose training step, measured here on random data, lets a
    round's training at the CPU budget fit :data:`CPU_TRAINING_SHARE` of an hour; what was measured and why."""
    from . import estimate as est
    from .trainers import ALSegTrainer

    nnunet = int(plans["configurations"][configuration]["batch_size"])
    steps = CPU_BUDGET[0] * CPU_BUDGET[1]
    target = CPU_ROUND_S * CPU_TRAINING_SHARE / steps
    trial = json.loads(json.dumps(plans))
    trial["continue_training"] = False
    times: dict[int, float] = {}
    with scratch_environment(project.root, dev):
        trainer = ALSegTrainer(trial, configuration, 0, dataset_json, dev)
        sample = est.sample_bytes(trainer)
        room, why = est.headroom(dev)
        fits = max(1, room // max(1, sample))
        top = max(1, min(nnunet, fits))
        times[top] = est.synthetic_step_seconds(trainer, top)
        chosen = top
        if times[top] > target and top > MIN_BATCH:
            times[MIN_BATCH] = est.synthetic_step_seconds(trainer, MIN_BATCH)
            slope = (times[top] - times[MIN_BATCH]) / (top - MIN_BATCH)
            chosen = MIN_BATCH + int((target - times[MIN_BATCH]) // slope) if slope > 0 else MIN_BATCH
            chosen = min(top, max(MIN_BATCH, chosen))
            while chosen not in times:
                times[chosen] = est.synthetic_step_seconds(trainer, chosen)
                if times[chosen] > target and chosen > MIN_BATCH:
                    chosen -= 1
    step = times[chosen]
    training = step * steps
    said = f"batch {chosen}" + (f" instead of nnU-Net's {nnunet}" if chosen != nnunet else " (nnU-Net's own)")
    reason = (f"{said}: a training step on this machine takes {step:.2g} s at batch {chosen}"
              + (f" ({times[nnunet]:.2g} s at {nnunet})" if nnunet in times and nnunet != chosen else "")
              + f" (network only, random data), so a round's training at the CPU budget ({CPU_BUDGET[0]} x "
              f"{CPU_BUDGET[1]} steps) takes about {est.duration(training)}")
    if top < nnunet:
        reason += f"; nnU-Net's batch {nnunet} would not fit the memory ({why}: {est.gib(room)})"
    if step > target:
        reason += (f"; that is over {est.duration(CPU_ROUND_S * CPU_TRAINING_SHARE)} even at the smallest batch: give "
                   "--minutes to bound each training" + ("" if configuration == "2d" or "2d" not in plans["configurations"]
                                                        else ", or plan the 2d configuration (smaller patch)"))
    reason += ("; nnU-Net's own plan is kept in nnUNetPlans.json" + (f" (on a GPU, --batch-size {nnunet} trains at its "
               "batch)" if chosen != nnunet else ""))
    return {"batch_size": chosen, "nnunet_batch_size": nnunet, "step_s": {str(b): round(t, 4) for b, t in sorted(times.items())},
            "target_step_s": round(target, 3), "round_training_s": round(training, 1), "sample_bytes": int(sample),
            "reason": reason}


def plans_digest(plans: dict) -> str:
    """SHA-256 of the plans' configurations (architecture, patch, spacing, normalisation):
    weights trained under one digest do not fit a network planned under another."""
    return hashlib.sha256(json.dumps(plans["configurations"], sort_keys=True).encode()).hexdigest()


def _alseg_plans(base: dict, configurations: Sequence[str], batch_size: int | None) -> dict:
    plans = json.loads(json.dumps(base))
    plans["plans_name"] = PLANS
    for name, cfg in plans["configurations"].items():
        if "data_identifier" in cfg:
            cfg["data_identifier"] = f"{PLANS}_{name}"
        if batch_size is not None and name in configurations:
            cfg["batch_size"] = int(batch_size)
    return plans


def preprocess(project: Project, dataset: Dataset, configuration: str, num_processes: int | None = None,
               hold_out: bool = True) -> None:
    """Preprocess ``dataset`` with the project's plans (moved over first if needed); idempotent.
    ``hold_out``: keep nnU-Net's 20 % validation split out of training (see :func:`write_split`)."""
    record = project_plans(project)
    f = folders(project.root)
    target = f.preprocessed / dataset.name
    if not (target / f"{PLANS}.json").is_file():
        if record is None:
            raise InputError(project.root, "the project has no nnU-Net plans yet; run 'alseg plan' first")
        from nnunetv2.experiment_planning.plans_for_pretraining.move_plans_between_datasets import (
            move_plans_between_datasets,
        )

        target.mkdir(parents=True, exist_ok=True)
        # nnU-Net's fingerprinting normally puts dataset.json here; moved plans need it too
        atomic.write_bytes(target / "dataset.json", (dataset.folder / "dataset.json").read_bytes())
        # ... and the trainer copies the fingerprint the plans were made from
        fingerprint = f.preprocessed / record["dataset"] / "dataset_fingerprint.json"
        atomic.write_bytes(target / "dataset_fingerprint.json", fingerprint.read_bytes())
        with nnunet_environment(project.root, log=f.logs / "plan.log"):
            move_plans_between_datasets(record["dataset"], dataset.name, PLANS, PLANS)
    plans = json.loads((target / f"{PLANS}.json").read_text())
    if configuration not in plans["configurations"]:
        raise InputError("--configuration", f"the project's plans have no {configuration!r} configuration "
                         f"(planned: {', '.join(plans['configurations'])})")
    marker = target / f".alseg-preprocessed-{configuration}"
    if not marker.is_file():
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess as nn_preprocess

        emit("stage", stage="preprocess", dataset=dataset.name, configuration=configuration)
        with nnunet_environment(project.root, log=f.logs / "plan.log"):
            nn_preprocess([dataset.id], PLANS, [configuration], [num_processes or default_processes()])
        atomic.write_bytes(marker, now_iso().encode())
    write_split(target, dataset.cases, hold_out=hold_out)


def write_split(preprocessed: Path, cases: Sequence[str], seed: int = 12345, hold_out: bool = True) -> None:
    """Fold 0 of ``splits_final.json``: a seeded 80/20 train/validation split from 5
    cases up; below that, or without ``hold_out``, every case is used for both
    (nnU-Net's 'all': a model scored on other cases, as in a round, trains on every label)."""
    cases = sorted(cases)
    if hold_out and len(cases) >= 5:
        shuffled = cases[:]
        random.Random(seed).shuffle(shuffled)
        n_val = max(1, round(0.2 * len(cases)))
        split = {"train": sorted(shuffled[n_val:]), "val": sorted(shuffled[:n_val])}
    else:
        split = {"train": cases, "val": cases}
    path = preprocessed / "splits_final.json"
    if not path.is_file() or json.loads(path.read_text()) != [split]:
        atomic.write_json(path, [split])
