"""A whole round's compute, forecast before it starts from what this machine has measured.

Each training: ``--minutes``, or a time probe an earlier training of the same plans stored
(:mod:`.estimate`) times the training's budget; the predictions: the cases' sliding-window
tiles (from their image headers and the plans) times the probe's tile time. A part nothing has
measured yet is named as such rather than guessed.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from ..progress import duration
from .estimate import PROBES_FILE, JobShape, TrainingProbe, machine, training_seconds


def stored_probe(nnunet_root: Path, trainer: str, plans_digest: str | None, configuration: str,
                 device: torch.device, batch: int | None = None) -> TrainingProbe | None:
    """A probe stored for this trainer, plans, configuration, batch and device on this machine."""
    try:
        stored = json.loads((nnunet_root / PROBES_FILE).read_text())
    except (OSError, ValueError):
        return None
    for key, value in stored.items():
        parts = key.split("|")
        if (len(parts) >= 6 and parts[0] == trainer and parts[1] == (plans_digest or "")[:16] and parts[2] == configuration
                and (batch is None or parts[3] == str(batch)) and parts[4] == str(device) and parts[5] == machine(device)
                and isinstance(value, dict)):
            probe = TrainingProbe.from_json(value)
            probe.cached = True
            return probe
    return None


def round_estimate(project, settings, trainings: Sequence[str], cases: Sequence[str],
                   pseudo_missing: int = 0) -> tuple[float | None, str]:
    """A round's compute from what has been measured on this machine: each training (``--minutes``,
    or a stored probe of these plans times its budget) and the predictions (tiles x the probe's tile
    time). Returns the seconds (None while a part is not measured yet) and the sentence that says so."""
    from ..devices import resolve_device
    from .env import folders
    from .modes import MODES, default_budget
    from .plan import project_plans

    dev = resolve_device(settings.device)
    record = project_plans(project)
    root = folders(project.root).preprocessed.parent
    configuration = settings.configuration or (record["configurations"][0] if record else "3d_fullres")
    trainer = MODES[settings.mode].trainer_class().__name__
    batch = settings.batch_size or ((record or {}).get("batch_size") or {}).get(configuration)
    probe = stored_probe(root, "ALSegTrainer", record.get("plans_digest"), configuration, dev, batch) if record else None
    d_epochs, d_iters = default_budget(dev)
    parts, unknown, total = [], [], 0.0
    for name in trainings:
        first = name in ("pretrain", "bootstrap")  # the bootstrap model trains on pretraining's budget
        epochs = settings.pretrain_epochs if first else settings.epochs
        iters = settings.pretrain_iterations if first else settings.iterations
        if settings.minutes is not None and not (epochs and iters):
            seconds = settings.minutes * 60.0
            parts.append(f"training {name} {duration(seconds)} (--minutes)")
        else:
            own = probe if first or trainer == "ALSegTrainer" else (
                stored_probe(root, trainer, record.get("plans_digest"), configuration, dev, batch) if record else None)
            if own is None:
                unknown.append(f"training {name} (its probe runs when it starts)")
                continue
            e, i = epochs or d_epochs, iters or d_iters
            seconds = training_seconds(own, JobShape(), e, i, settings.val_iterations)
            parts.append(f"training {name} about {duration(seconds)} ({e} x {i} at {own.step_s:.3g} s)")
            if not first and settings.mode == "filtermatch":
                unknown.append("FilterMatch's unlabeled steps and filter passes (measured when it starts)")
        total += seconds
    if cases:
        if probe is None:
            unknown.append(f"predicting {len(cases)} case(s) (timed by the first training's probe)")
        else:
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            from .plan import PLANS

            plans = json.loads((folders(project.root).preprocessed / record["dataset"] / f"{PLANS}.json").read_text())
            pm = PlansManager(plans)
            cm = pm.get_configuration(configuration)
            from .estimate import recalled
            from .predict import OVERHEAD_KEY, image_tiles, image_voxels

            tiles = sum(image_tiles(project, c, pm, cm) for c in cases)
            per_voxel, _ = recalled(OVERHEAD_KEY)
            seconds = tiles * probe.tile_s + per_voxel * sum(image_voxels(project, c) for c in cases)
            total += seconds
            parts.append(f"predicting {len(cases)} case(s) about {duration(seconds)} ({tiles} tiles)")
    if pseudo_missing:
        unknown.insert(0, f"pseudo-labels of {pseudo_missing} case(s) (timed by their own probe when they start)")
    text = "; ".join(parts) if parts else "nothing measured yet"
    if unknown:
        text += "; not measured yet: " + ", ".join(unknown)
    else:
        text = f"about {duration(total)} of compute: " + text
    return (None if unknown else total), text
