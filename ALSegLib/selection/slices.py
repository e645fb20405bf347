"""Slice-level selection: the query unit is a slab of ``slab`` slices of a case along its
acquisition axis (:func:`ALSegLib.store.sparse.acquisition_axis`), the budget counted in slices.

Every unit is scored from the model's stored class probabilities of its case (one prediction pass
over the pool, as the case-level strategies use): its *focused entropy* (the voxel entropy over
the slab's predicted foreground dilated by a band, plus voxels that may be foreground; the slab's
mean entropy where there is none), whether the model predicts foreground in it, and a small
feature vector (the slab's mean class probabilities, its foreground share, its focused entropy)
for diversity. Units already annotated (a whole-case human label, or the slices of a sparse
version) or waiting in a review queue are never proposed.

Strategies (deterministic for a seed, each pick with its reason):

- ``random``: uniform over the units;
- ``random-fg``: two thirds of the draws among units where the model predicts foreground (the
  field's strongest baseline, nnActive), the rest uniform;
- ``uncertainty``: the highest focused entropy;
- ``hybrid``: k-center greedy over the features of the most uncertain units (3 k, or the top
  quarter), distances weighted by the units' uncertainty.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError
from ..progress import track
from ..project import Project
from ..store.sparse import AXIS_NAMES, acquisition_axis, slice_coverage
from .coreset import k_center_greedy
from .strategies import parse_budget
from .uncertainty import MAYBE_FOREGROUND, entropy_map

SLICE_STRATEGIES = ("random", "random-fg", "uncertainty", "hybrid")
FOREGROUND_SHARE = 2 / 3


@dataclass(frozen=True)
class SliceUnit:
    case: str
    axis: int
    start: int
    size: int

    @property
    def indices(self) -> list[int]:
        return list(range(self.start, self.start + self.size))

    def words(self) -> str:
        name = AXIS_NAMES[self.axis]
        span = f"{name}={self.start}" if self.size == 1 else f"{name}={self.start}..{self.start + self.size - 1}"
        return f"{self.case} {span}"


@dataclass
class ScoredUnits:
    units: list[SliceUnit]
    entropy: np.ndarray  # focused entropy per unit, 0..1
    foreground: np.ndarray  # bool: the model predicts foreground in the unit
    features: np.ndarray  # one row per unit
    classes: list[list[int]]  # label values predicted in the unit


def taken_slices(project: Project, case: str, axis: int) -> set[int] | None:
    """Slices of ``case`` along ``axis`` no unit may propose: every slice (None) when a whole-case
    human label exists, else those of its sparse versions along this axis and those waiting in a
    review queue."""
    from .. import rounds

    taken: set[int] = set()
    for version in project.human_versions(case):
        mask = project.annotation_mask(case, version)
        if mask is None:
            return None
        taken |= set(np.flatnonzero(slice_coverage(mask, axis)[1]).tolist())
    for item in rounds.queue_items(project):
        if item["case"] != case or item["status"] != "pending":
            continue
        if item.get("slices") is None:
            return None  # the whole case waits for review
        if item.get("axis", axis) == axis:
            taken |= set(int(i) for i in item["slices"])
    return taken


def score_units(project: Project, model: str, cases: Sequence[str], slab: int = 1, band: int = 2) -> ScoredUnits:
    """Every free unit of ``cases`` with its scores from ``model``'s stored probabilities."""
    from ..store.predictions import load_probabilities

    if slab < 1:
        raise InputError("--slab", f"must be at least 1 slice, not {slab}")
    units, entropy, foreground, features, classes = [], [], [], [], []
    for case in track(list(cases), desc="slice uncertainty"):
        probs, values = load_probabilities(project, model, case)
        axis = acquisition_axis(project.geometry(case).spacing)
        taken = taken_slices(project, case, axis)
        if taken is None:
            continue
        h = entropy_map(probs)
        predicted = probs.argmax(axis=0)
        region = predicted != 0
        if band > 0 and region.any():
            region = ndimage.binary_dilation(region, ndimage.generate_binary_structure(3, 1), iterations=band)
        region |= (1.0 - probs[0]) > MAYBE_FOREGROUND
        n = probs.shape[1 + axis]
        for start in range(0, n - slab + 1, slab):
            if taken & set(range(start, start + slab)):
                continue
            index = [slice(None)] * 3
            index[axis] = slice(start, start + slab)
            index = tuple(index)
            hs, rs, ps = h[index], region[index], probs[(slice(None), *index)]
            focused = float(hs[rs].mean()) if rs.any() else float(hs.mean())
            fg = predicted[index] != 0
            units.append(SliceUnit(case, axis, start, slab))
            entropy.append(focused)
            foreground.append(bool(fg.any()))
            present = sorted({int(values[c]) for c in np.unique(predicted[index]).tolist() if c != 0})
            classes.append(present)
            features.append(np.concatenate([ps.reshape(ps.shape[0], -1).mean(axis=1), [fg.mean(), focused]]))
    width = max((len(f) for f in features), default=0)
    rows = np.array([np.pad(f, (0, width - len(f))) for f in features], np.float32) if features else np.zeros((0, 0))
    return ScoredUnits(units, np.array(entropy, np.float32), np.array(foreground, bool), rows, classes)


def select_slices(scored: ScoredUnits, budget: str | int, strategy: str, seed: int = 0,
                  labels: dict[int, str] | None = None) -> list[dict]:
    """Pick ``budget`` slices (a count or a percentage of the free slices) as units; one dict per
    unit: case, axis, slices, score, reason."""
    if strategy not in SLICE_STRATEGIES:
        raise InputError("--strategy", f"slice-level strategies are {', '.join(SLICE_STRATEGIES)}, not {strategy!r}")
    n = len(scored.units)
    if not n:
        raise InputError("slice selection", "no free slice to propose: every slice is annotated or waiting")
    size = scored.units[0].size
    k = min(n, max(1, math.ceil(parse_budget(budget, n * size) / size)))
    rng = np.random.default_rng(seed)
    order = np.argsort(-scored.entropy, kind="stable")
    rank = np.empty(n, int)
    rank[order] = np.arange(n)
    if strategy == "random":
        rows = [int(i) for i in rng.choice(n, size=k, replace=False)]
        why = {i: "drawn at random" for i in rows}
    elif strategy == "random-fg":
        fg = np.flatnonzero(scored.foreground)
        k_fg = min(len(fg), round(FOREGROUND_SHARE * k))
        rows = [int(i) for i in rng.choice(fg, size=k_fg, replace=False)] if k_fg else []
        rest = np.setdiff1d(np.arange(n), rows)
        rows += [int(i) for i in rng.choice(rest, size=k - len(rows), replace=False)]
        why = {i: ("drawn at random among the slices where the model predicts foreground" if n_i < k_fg
                   else "drawn at random among all slices") for n_i, i in enumerate(rows)}
    elif strategy == "uncertainty":
        rows = [int(i) for i in order[:k]]
        why = {i: "among the most uncertain" for i in rows}
    else:  # hybrid
        m = min(n, max(3 * k, math.ceil(0.25 * n)))
        top = order[:m]
        feats = scored.features[top]
        feats = (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-6)
        centers = k_center_greedy(feats, k, metric="euclidean", weights=scored.entropy[top], first=0)
        rows = [int(top[c.index]) for c in centers]
        why = {int(top[c.index]): ("the most uncertain" if j == 0 else "unlike the slices chosen before it")
               for j, c in enumerate(centers)}
    names = labels or {}
    out = []
    for i in rows:
        unit = scored.units[i]
        found = ", ".join(names.get(v, str(v)) for v in scored.classes[i]) or "no foreground"
        reason = (f"{unit.words()}: {why[i]}; focused entropy {scored.entropy[i]:.3f} (rank {rank[i] + 1} of {n} "
                  f"free slices); predicted: {found}")
        out.append({"case": unit.case, "axis": unit.axis, "slices": unit.indices, "score": float(scored.entropy[i]),
                    "reason": reason})
    return out
