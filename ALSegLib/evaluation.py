"""Evaluate stored labels of one kind against the reference labels, per case and per class."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from . import metrics
from .errors import InputError
from .progress import track
from .project import LABEL_KINDS, Project


def evaluate(project: Project, kind: str = "predicted", cases: Sequence[str] | None = None) -> dict:
    """Metrics of ``kind`` labels (human: latest version) against ``reference``.

    Cases without both labels are skipped when ``cases`` is not given, and listed.
    """
    if kind not in LABEL_KINDS:
        raise InputError("--kind", f"unknown label kind {kind!r}; one of {', '.join(LABEL_KINDS)}")
    references = set(project.labeled_cases("reference"))
    available = set(project.labeled_cases(kind))
    if cases is None:
        chosen = sorted(references & available)
    else:
        chosen = list(cases)
        for case in chosen:
            if not project.has_case(case):
                raise InputError(f"case {case!r}", f"no such case in project {project.root}")
            if case not in references or case not in available:
                missing = "reference" if case not in references else kind
                raise InputError(f"case {case!r}", f"has no {missing} label to evaluate")
    labels = project.labels.mapping
    per_case: dict[str, dict] = {}
    both_empty: dict[str, list[str]] = {}
    for case in track(chosen, desc=f"evaluating {kind}"):
        ref = project.read_label(case, "reference")
        pred = project.read_label(case, kind)
        spacing_zyx = tuple(reversed(ref.GetSpacing()))
        p, r = sitk.GetArrayViewFromImage(pred), sitk.GetArrayViewFromImage(ref)
        per_case[case] = metrics.label_metrics(p, r, spacing_zyx, labels)
        # the values either label holds, counted in O(n) (np.unique would sort a CT's voxels)
        present = {int(v) for a in (p, r) for v in np.flatnonzero(np.bincount(np.ravel(a)))}
        if absent := [name for name, value in labels.items() if value not in present]:
            both_empty[case] = absent
    return {
        "kind": kind,
        "against": "reference",
        "cases": len(per_case),
        "skipped_without_reference": sorted(available - references) if cases is None else [],
        "summary": metrics.summarize(per_case),
        # nnU-Net's convention (nnActive's figure): a class absent from reference and prediction is left out
        "foreground_dice": metrics.foreground_dice(per_case, both_empty),
        "per_case": per_case,
    }
