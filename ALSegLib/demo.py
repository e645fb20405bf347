"""``alseg demo``: the whole loop on built-in data, two simulated rounds on a CPU budget.

A project of synthetic phantoms (or an ``imagesTr``/``labelsTr`` folder given with ``--data``)
with reference labels; a quarter of the cases are held out as the test set. Pseudo-labels come
from the built-in LiteMedSAM, one box per structure per case drawn from the references (simulated
prompts, real model); or, with ``pseudo_source="degraded-reference"``, from the references
corrupted to a target Dice (simulated, and named so; no model runs). Then :func:`..loop.run_round`
twice with the simulated annotator revealing the selected cases' references; the table shows
Dice on the held-out cases for the pseudo-label-only model, after each round, and for a model
trained from scratch on the last round's human labels alone (what the pseudo-labels buy).

The default budget (2d, batch 6, 750 pretraining steps, 1000 per round) comes from measurements
(Testing/Benchmarks/README.md): with 250 pretraining steps at batch 12 the pretrained model had
learned neither the vessel nor the lesion; with 250 fine-tuning steps a round could not move the
pretrained model off the vessel and the lesion it had learned as background from LiteMedSAM's
pseudo-labels (both stayed at Dice 0.00), with 1000 both reached 0.84-0.85 (pseudo_trust.json,
ablation); ``bench_demo.py`` and ``bench_pseudo_trust.py`` run it over seeds.
"""
from __future__ import annotations

import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .loop import RoundSettings, run_round, score_held_out
from .project import Project
from .report import curve_point
from .rounds import RoundRecord
from .simulate import SimulatedAnnotator, check_no_test_revealed
from .store.ids import derive_case_id, expand_sources
from .store.labels import LabelTable

MARKER = ".alseg-demo"


def demo_round() -> RoundSettings:
    """The demo's rounds: 2 cases each, hybrid selection, fine-tuning; nnU-Net 2d at batch 6 (a step
    costs its samples here: batch 12 0.36 s, 6 0.19 s on 2 cores alone); 750 pretraining steps (at 250
    the pretrained model had learned neither vessel nor lesion), 1000 fine-tuning steps a round (as
    many as the supervised-only row trains from scratch; at 250 the rounds left the vessel and the
    lesion at 0.00 on LiteMedSAM's pseudo-labels: pseudo_trust.json); one validation step per epoch
    (the rounds score the held-out cases themselves)."""
    return RoundSettings(budget="2", strategy="hybrid", mode="finetune", configuration="2d", batch_size=6,
                         pretrain_epochs=30, pretrain_iterations=25, epochs=40, iterations=25, val_iterations=1,
                         pseudo_share=0.5)


DEMO_ROUND = demo_round()  # the defaults the command line shows


@dataclass
class DemoSettings:
    """The demo: how many rounds, the held-out share, where its pseudo-labels come from, the
    supervised-only row; ``round``: the settings of its rounds (the pseudo-label source is set
    from ``pseudo_source``, the held-out cases from the split)."""

    rounds: int = 2
    test_fraction: float = 0.25
    pseudo_source: str = "sam"  # the built-in LiteMedSAM, boxes from the references; or "degraded-reference"
    target_dice: float = 0.75
    reference_boxes: int = 1
    supervised_only: bool = True  # the from-scratch row on the same human labels
    round: RoundSettings = field(default_factory=demo_round)


def prepare_folder(folder: Path) -> None:
    """An empty folder, or one made by an earlier demo (replaced); anything else is refused."""
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise InputError(folder, "exists and was not made by 'alseg demo'; choose another --dir")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).touch()


def phantom_project(folder: Path, cases: int, modality: str, seed: int, size: int = 48) -> Project:
    from . import phantoms  # scipy: kept out of the command line's start (the parser reads DemoSettings)

    images, labels = phantoms.write_dataset(folder / "source", n=cases, modality=modality, seed=seed, size=size)
    project = Project.create(folder / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), modality,
                             name="alseg-demo")
    project.add_cases([images], reference_dir=labels)
    return project


def data_project(folder: Path, data: Path, modality: str, labels: str | None, cases: int | None) -> Project:
    """A project from an ``imagesTr``/``labelsTr`` folder (nnU-Net/MSD layout; ``_0000`` suffixes allowed)."""
    images_dir, labels_dir = data / "imagesTr", data / "labelsTr"
    for d in (images_dir, labels_dir):
        if not d.is_dir():
            raise InputError(data, f"needs {d.name}/ (an nnU-Net / Medical Segmentation Decathlon layout)")
    images = [p for p in expand_sources([images_dir]) if not p.name.startswith(".")]
    if not images:
        raise InputError(images_dir, "holds no images")
    pairs = []
    for img in sorted(images):
        case = derive_case_id(img)
        case = case.removesuffix("_0000")
        label = next((labels_dir / f"{case}{ext}" for ext in (".nii.gz", ".nii", ".nrrd", ".mha")
                      if (labels_dir / f"{case}{ext}").is_file()), None)
        if label is None:
            raise InputError(img, f"no label file for case {case!r} in {labels_dir}")
        pairs.append((case, img, label))
    if cases:
        pairs = pairs[:cases]
    if labels:
        table = LabelTable.parse(labels)
    else:  # every value found in the labels, named by value
        values = set()
        for _, _, label in pairs:
            values |= {int(v) for v in np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(label)))) if v}
        if not values:
            raise InputError(labels_dir, "the label files hold no foreground value")
        table = LabelTable.from_mapping({f"label{v}": v for v in sorted(values)})
    project = Project.create(folder / "project", table, modality, name=f"alseg-demo-{data.name}")
    project.add_cases([str(p[1]) for p in pairs], references=[p[2] for p in pairs], case_ids=[p[0] for p in pairs])
    return project


def run_demo(project: Project, settings: DemoSettings) -> dict:
    """Two (``settings.rounds``) simulated rounds; returns the rows of the table and the report."""
    cases = project.cases()
    n_test = max(1, round(settings.test_fraction * len(cases)))
    test = sorted(random.Random(settings.round.seed).sample(cases, n_test))
    if len(cases) - n_test < 2:
        raise InputError(project.root, f"{len(cases)} cases are too few for a demo (held out {n_test})")
    annotator = SimulatedAnnotator(test)
    round_settings = settings.round.with_changes(exclude=test, pseudo=demo_pseudo_source(settings))
    records = [RoundRecord(run_round(project, round_settings, annotator=annotator)) for _ in range(settings.rounds)]
    check_no_test_revealed(project, test)
    rows = []
    classes = list(project.labels.mapping)
    if pre := records[0].pretrained_metrics:
        rows.append(_row("pseudo-labels only (pretrained)", 0, pre))
    for record in records:
        rows.append(_row(f"round {record.number} ({round_settings.strategy}, {round_settings.mode})", record.number,
                         record.metrics))
    if settings.supervised_only:
        last = records[-1].number
        rows.append(_row(f"supervised only (round {last}'s human labels, from scratch)", last,
                         supervised_only(project, settings, test)))
    files = records[-1].report_files
    return {"test_cases": test, "pseudo_label_dice": records[0].pseudo_label_dice,
            "classes": classes, "rows": rows, "report": str(project.layout.resolve(files["html"])),
            "learning_curve": str(project.layout.resolve(files["learning_curve"])),
            "selected": {r.number: r.queued_cases for r in records}}


def supervised_only(project: Project, settings: DemoSettings, test: list[str]) -> dict:
    """The baseline that shows what the pseudo-labels buy: a model trained from scratch on the
    human labels alone (the cases the rounds had labeled), with as many optimizer steps as a round's
    training (1000 by default: enough for 4 cases to converge here), scored on the same held-out
    cases. It trains in a copy of the project next to it, so the project's own predictions and
    models stay those of the rounds."""
    from .nnunet.train import train
    copy = project.copy_to(project.root.parent / "supervised-only")
    r = settings.round
    minutes = r.minutes if r.epochs is None else None  # under --minutes: a round's time, the epochs fitted to it
    epochs = r.epochs
    train(copy, "supervised", name="supervised-only", epochs=epochs, iterations=r.iterations, minutes=minutes,
          val_iterations=r.val_iterations, device=r.device, validate=False, exclude_cases=test, seed=r.seed)
    return score_held_out(copy, "supervised-only", test, test, r.device)


def demo_pseudo_source(settings: DemoSettings) -> dict:
    if settings.pseudo_source == "degraded-reference":
        return {"source": "degraded-reference", "target_dice": settings.target_dice, "seed": settings.round.seed}
    if settings.pseudo_source == "sam":
        return {"source": "sam", "prompts_from_reference": settings.reference_boxes}
    raise InputError("--pseudo-source", f"the demo takes degraded-reference or sam, not {settings.pseudo_source!r}")


def _row(name: str, number: int, metrics: dict) -> dict:
    point = curve_point(metrics, number)
    return {"model": name, "round": number, "annotated": point["annotated"], "of": point["of"],
            "percent": round(100 * point["fraction"], 1), "mean_dice": point["mean_dice"], "dice": point["per_class"],
            "hd95": metrics["summary"]["mean"]["hd95"]["mean"]}
