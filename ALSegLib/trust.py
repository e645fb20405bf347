"""Trust in the pseudo-labels, per class, measured against the human labels.

A foundation model fails on some structure of almost every task (a ring, a small lesion, a thin
vessel). Whenever a human label is stored for a case that has a pseudo-label, the project records
the pseudo-label's Dice per class against it (:meth:`.project.Project.pseudo_agreement`, in the
human label's provenance). From those records a class is

- ``trusted``: its pseudo-labels agree with the human labels at least ``threshold`` (mean Dice);
- ``untrusted``: they agree less: its pseudo-labels are not taught (see below);
- ``suspect``: no human label measures it yet, but the source was prompted for it and returned
  nothing in most of those cases: not taught until a human label shows otherwise;
- ``unmeasured``: no human label measures it yet and nothing speaks against it: taught.

What is not taught is not taught as background either: :func:`unknown_classes` names, for each
pseudo-labeled training case, the classes whose voxels the trainer merges with background
(a partial-label loss, :class:`.nnunet.trainers.PartialLabelLoss`): those classes are learned from
the human labels alone, while the trusted classes keep their pseudo-labels. A class the source
was not prompted for in a case, or returned empty for there, is unknown in that case too.
"""
from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

import SimpleITK as sitk

from .errors import InputError
from .project import Project
from .store.files import read_json_object

# a class is trusted when its pseudo-labels reach this mean Dice against the human labels. Measured
# (pseudo_trust.json, LiteMedSAM on the demo's phantoms): vessel and lesion pseudo-labels at 0.36 and 0.26
# against the selected cases' human labels still paid when taught (round 2 0.847-0.857 taught, 0.795 when
# 0.5 left them out, supervised-only 0.820); a failed class comes back near 0 (the myocardium ring, ACDC)
TRUST_DICE = 0.2
SUSPECT_EMPTY = 0.5  # before any human label: prompted, but empty in more than this share of the prompted cases
STATES = ("trusted", "untrusted", "suspect", "unmeasured")
TAUGHT = ("trusted", "unmeasured")


@dataclass(frozen=True)
class ClassTrust:
    """One class's line of the trust table."""

    name: str
    value: int
    cases: int  # human-labeled cases where the human label or the pseudo-label holds the class
    mean: float | None  # the pseudo-labels' mean Dice against the human labels over those cases
    std: float | None
    min: float | None
    prompted: int  # pseudo-labeled cases whose source was prompted for the class (None-free: 0 without prompts)
    empty: int  # of those, the cases where the source returned nothing for it
    state: str

    @property
    def taught(self) -> bool:
        return self.state in TAUGHT

    def to_json(self) -> dict:
        return {**asdict(self), "taught": self.taught}


def pseudo_sidecar(project: Project, case: str) -> dict:
    """The case's pseudo-label provenance ({} when it has none or its sidecar is missing)."""
    path = project.label_path(case, "pseudo")
    sidecar = path.with_suffix(".json") if path is not None else None
    return read_json_object(sidecar) if sidecar is not None and sidecar.is_file() else {}


def measurements(project: Project) -> dict[str, dict[int, float]]:
    """case -> {label value: Dice of its current pseudo-label against its latest human label} for the
    values either holds. The record stored with the human label is used when it measured the
    current pseudo-label; otherwise (a label stored before the record existed, a pseudo-label made
    again since) the two are compared now; nothing is written."""
    out: dict[str, dict[int, float]] = {}
    pseudo = set(project.labeled_cases("pseudo"))
    for case in project.labeled_cases("human"):
        if case not in pseudo:
            continue
        record = project.provenance(case, "human", check_file=False).get("pseudo_agreement")
        if not isinstance(record, dict) or record.get("pseudo_sha256") != pseudo_sidecar(project, case).get("file_sha256"):
            try:
                human = sitk.GetArrayFromImage(project.read_label(case, "human"))
                record = project.pseudo_agreement(case, human, project.annotation_mask(case))
            except (OSError, RuntimeError, ValueError, InputError):  # an unreadable label measures nothing
                continue
        out[case] = {int(v): float(d) for v, d in (record or {}).get("dice", {}).items() if d is not None}
    return out


def case_unknown(project: Project, prov: Mapping) -> set[int]:
    """The label values a pseudo-label says nothing about: with a prompted source (boxes), every class
    it was not prompted for in this case, and every class it returned nothing for there; a source
    without prompts (another model's labels, an automatic mode) is taken at its word."""
    prompts = prov.get("prompts")
    if not isinstance(prompts, Mapping):
        return set()
    by_name = project.labels.mapping
    prompted = {by_name[n] for n in prompts if n in by_name}
    present = set(prov.get("label_values_present") or ())
    return {v for v in project.labels.values if v not in prompted or v not in present}


def _priors(project: Project, cases: Iterable[str]) -> dict[int, tuple[int, int]]:
    """value -> (pseudo-labeled cases prompted for it, of those the ones returned empty)."""
    counts = {v: [0, 0] for v in project.labels.values}
    for case in cases:
        prov = pseudo_sidecar(project, case)
        prompts = prov.get("prompts")
        if not isinstance(prompts, Mapping):
            continue
        present = set(prov.get("label_values_present") or ())
        for name in prompts:
            value = project.labels.mapping.get(name)
            if value is not None:
                counts[value][0] += 1
                counts[value][1] += value not in present
    return {v: (p, e) for v, (p, e) in counts.items()}


def trust_table(project: Project, threshold: float = TRUST_DICE) -> dict:
    """Per class: the measured agreement, the source's prompts and empties, and the state (see the
    module text). ``cases``: the human-labeled cases measured."""
    measured = measurements(project)
    priors = _priors(project, project.labeled_cases("pseudo"))
    rows = []
    for c in project.labels.classes:
        dices = [m[c.value] for m in measured.values() if c.value in m]
        prompted, empty = priors[c.value]
        if dices:
            mean = statistics.fmean(dices)
            state = "trusted" if mean >= threshold else "untrusted"
        else:
            mean = None
            state = "suspect" if prompted and empty / prompted > SUSPECT_EMPTY else "unmeasured"
        rows.append(ClassTrust(c.name, c.value, len(dices), None if mean is None else round(mean, 4),
                               round(statistics.pstdev(dices), 4) if dices else None,
                               round(min(dices), 4) if dices else None, prompted, empty, state))
    return {"threshold": threshold, "cases": len(measured), "classes": [r.to_json() for r in rows]}


def untaught(table: Mapping) -> set[int]:
    """The label values a trust table says are not to be learned from pseudo-labels."""
    return {row["value"] for row in table["classes"] if not row["taught"]}


def unknown_classes(project: Project, cases: Iterable[str], table: Mapping) -> dict[str, list[int]]:
    """For each pseudo-labeled training case, the label values the trainer must not learn from its
    pseudo-label, as background or otherwise: the untaught classes of ``table`` and what the case's
    pseudo-label says nothing about (:func:`case_unknown`). Cases with none are left out."""
    never = untaught(table)
    out = {}
    for case in cases:
        unknown = never | case_unknown(project, pseudo_sidecar(project, case))
        if unknown:
            out[case] = sorted(unknown)
    return out


def table_text(table: Mapping) -> list[str]:
    """Lines for a terminal: one per class."""
    lines = [f"pseudo-label trust (mean Dice against {table['cases']} human label(s); trusted at >= {table['threshold']}):"]
    for row in table["classes"]:
        if row["cases"]:
            measured = f"Dice {row['mean']:.3f} ± {row['std']:.3f} (min {row['min']:.3f}) over {row['cases']} case(s)"
        else:
            measured = "not measured yet"
        prior = f"; prompted in {row['prompted']}, empty in {row['empty']}" if row["prompted"] else ""
        lines.append(f"  {row['name']:<16} {row['state']:<10} {measured}{prior}")
    return lines
