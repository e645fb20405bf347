"""``degraded-reference``: simulated pseudo-labels for the oracle experiment only.

Without a foundation-model checkpoint, the experiment still needs pseudo-labels
of foundation-model quality. This source takes a case's *reference* label and
corrupts it, with the errors zero-shot models make, until its mean foreground
Dice against the reference reaches a target (e.g. 0.75):

- boundary errors: each structure's surface moves in or out (one direction per
  structure) by a distance that grows with the severity (a distance transform,
  so the shift is continuous, not whole voxels);
- missed slices: slices that contain a structure lose it, starting at one end of
  the structure (where propagated prompts fail first), then at random slices;
- spurious blobs: small blobs of a structure's label appear outside it;
- merged labels: with two or more structures, part of one takes a neighbour's label.

Every random draw of a case is fixed by its seed and the severity only scales
them, so Dice falls (nearly) monotonically with severity; a bisection finds the
severity that meets the target. The labels are stored with source
``degraded-reference`` and ``"simulated": true`` in their provenance: they are
made from references and must never stand in for a real model's output outside
the experiment.
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..progress import track
from ..project import Project

SOURCE = "degraded-reference"
MAX_SEVERITY = 3.0


@dataclass(frozen=True)
class Degraded:
    label: np.ndarray
    dice: float
    severity: float


def mean_dice(a: np.ndarray, ref: np.ndarray, values: Sequence[int]) -> float:
    """Mean Dice over the ``values`` present in ``ref`` (1.0 when none is)."""
    scores = []
    for v in values:
        r = ref == v
        if not r.any():
            continue
        p = a == v
        scores.append(2.0 * np.logical_and(p, r).sum() / (p.sum() + r.sum()))
    return float(np.mean(scores)) if scores else 1.0


class _Draws:
    """The random choices of one case, fixed before any severity is tried."""

    def __init__(self, ref: np.ndarray, values: Sequence[int], seed: int):
        rng = np.random.default_rng(seed)
        self.present = [v for v in values if (ref == v).any()]
        self.grow = {v: bool(rng.integers(2)) for v in self.present}
        self.axis = int(np.argmax(ref.shape)) if ref.ndim == 3 and len(set(ref.shape)) > 1 else 0
        self.slices = {}
        for v in self.present:
            idx = np.flatnonzero((ref == v).any(axis=tuple(a for a in range(ref.ndim) if a != self.axis)))
            ends = idx if rng.integers(2) else idx[::-1]
            # half the missed slices come off one end, the rest at random
            self.slices[v] = (list(ends), list(rng.permutation(idx)))
        self.dither = rng.random(ref.shape, dtype=np.float32)  # partial voxel layers: a continuous shift
        self.blob_at = rng.random(ref.shape) if ref.size <= 2**24 else None
        self.blob_class = {i: self.present[int(rng.integers(len(self.present)))] for i in range(8)} if self.present else {}
        self.merge_normal = rng.normal(size=ref.ndim)
        self.merge_pair = {v: self.present[(i + 1) % len(self.present)] for i, v in enumerate(self.present)}
        self.seed = seed
        # what does not depend on the severity, computed once for the bisection's 14 tries
        # (0.8 s -> 0.1 s per 48^3 phantom); skipped for volumes too large to hold it
        small = ref.size <= 2**24
        self._shift = {v: self._distance(ref, v) for v in self.present} if small else {}
        self.blob_order = np.argsort(self.blob_at, axis=None) if self.blob_at is not None else None
        self._merge = {}
        if small and len(self.present) > 1:
            coords = np.indices(ref.shape).reshape(ref.ndim, -1).T
            for v in self.present:
                mask = (ref == v).ravel()
                self._merge[v] = (np.flatnonzero(mask), coords[mask] @ self.merge_normal)

    def _distance(self, ref: np.ndarray, v: int) -> np.ndarray:
        """Distance of each voxel from the surface it would move past, less its dither."""
        mask = ref == v
        return ndimage.distance_transform_edt(~mask if self.grow[v] else mask) - self.dither

    def shift(self, ref: np.ndarray, v: int) -> np.ndarray:
        return self._shift[v] if v in self._shift else self._distance(ref, v)

    def merge_projection(self, ref: np.ndarray, v: int) -> tuple[np.ndarray, np.ndarray]:
        """The flat indices of structure ``v`` and their projections on the merge plane's normal."""
        if v in self._merge:
            return self._merge[v]
        mask = (ref == v).ravel()
        coords = np.indices(ref.shape).reshape(ref.ndim, -1).T
        return np.flatnonzero(mask), coords[mask] @ self.merge_normal


def degrade(ref: np.ndarray, values: Sequence[int], severity: float, draws: _Draws) -> np.ndarray:
    """The reference corrupted at ``severity`` (0: unchanged) with the case's fixed draws."""
    out = ref.copy()
    s = max(0.0, float(severity))
    if s == 0 or not draws.present:
        return out
    # 1. boundaries: shift each surface by s * 1.5 voxels, out or in (a voxel at distance d
    #    moves once d - u < 1.5 s, u its fixed uniform draw: layers are taken gradually)
    for v in draws.present:
        moved = draws.shift(ref, v) < 1.5 * s
        if draws.grow[v]:
            out[moved & (out == 0)] = v
        else:
            out[moved & (ref == v)] = 0
    # 2. missed slices: a fraction 0.15 * s of the structure's slices
    for v in draws.present:
        ends, shuffled = draws.slices[v]
        n_missed = round(min(1.0, 0.15 * s) * len(ends))
        chosen = set(ends[: (n_missed + 1) // 2])
        for i in shuffled:
            if len(chosen) >= n_missed:
                break
            chosen.add(i)
        for i in chosen:
            sl = [slice(None)] * out.ndim
            sl[draws.axis] = i
            part = out[tuple(sl)]
            part[part == v] = 0
    # 3. spurious blobs: up to 8 blobs, each about 0.2 * s of the structure's equivalent radius
    if draws.blob_at is not None:
        n_blobs = int(min(8, np.floor(2 * s)))
        background = ref == 0
        flat = draws.blob_order[:n_blobs * 16]
        placed = 0
        for f in flat:
            if placed >= n_blobs:
                break
            centre = np.unravel_index(f, ref.shape)
            if not background[centre]:
                continue
            v = draws.blob_class[placed]
            radius = max(1.0, 0.2 * s * (3 * (ref == v).sum() / (4 * np.pi)) ** (1 / 3))
            lo = [max(0, int(c - radius)) for c in centre]
            hi = [min(n, int(c + radius) + 1) for c, n in zip(centre, ref.shape)]
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            grid = np.ogrid[box]
            ball = sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius ** 2
            region = out[box]
            region[ball & (region == 0)] = v
            placed += 1
    # 4. merged labels: the part of a structure beyond a plane takes its neighbour's label
    if len(draws.present) > 1:
        frac = min(0.5, 0.12 * s)
        for v in draws.present:
            where, proj = draws.merge_projection(ref, v)
            if where.size < 2:
                continue
            cut = np.quantile(proj, 1 - frac)
            idx = where[proj > cut]
            flat_out = out.reshape(-1)
            keep = flat_out[idx] == v
            flat_out[idx[keep]] = draws.merge_pair[v]
    return out


def degrade_to_dice(ref: np.ndarray, values: Sequence[int], target: float, seed: int = 0, steps: int = 14) -> Degraded:
    """The reference corrupted until its mean Dice is as close to ``target`` as the
    bisection over the severity gets (within about 0.01 for ordinary structures)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target Dice must be in (0, 1], not {target}")
    draws = _Draws(ref, values, seed)
    if target >= 1.0 or not draws.present:
        return Degraded(ref.copy(), 1.0, 0.0)
    lo, hi = 0.0, MAX_SEVERITY
    best = None
    for _ in range(steps):
        mid = (lo + hi) / 2
        cand = degrade(ref, values, mid, draws)
        dice = mean_dice(cand, ref, values)
        if best is None or abs(dice - target) < abs(best.dice - target):
            best = Degraded(cand, dice, mid)
        if dice > target:
            lo = mid
        else:
            hi = mid
    return best


def case_seed(case: str, seed: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{case}".encode()).digest()[:8], "little")


def pseudolabel_degraded(project: Project, cases: Sequence[str] | None = None, *, target_dice: float = 0.75,
                         seed: int = 0) -> list[dict]:
    """Store simulated pseudo-labels for ``cases`` (default: every case with a reference)."""
    if not 0.0 < target_dice <= 1.0:
        raise InputError("--target-dice", f"must be in (0, 1], not {target_dice}")
    have = set(project.labeled_cases("reference"))
    if cases is None and not have:
        raise InputError(project.root, "no case has a reference label to degrade; degraded-reference "
                         "pseudo-labels exist only for the oracle experiment")
    cases = list(cases) if cases is not None else sorted(have)
    missing = [c for c in cases if c not in have]
    if missing:
        raise InputError(f"case {missing[0]!r}", f"has no reference label to degrade ({len(missing)} such case(s)); "
                         "degraded-reference pseudo-labels exist only for the oracle experiment")
    values = project.labels.values
    out = []
    for case in track(cases, desc="degrading references"):
        ref_img = project.read_label(case, "reference")
        result = degrade_to_dice(sitk.GetArrayFromImage(ref_img), values, target_dice, case_seed(case, seed))
        img = sitk.GetImageFromArray(result.label.astype(sitk.GetArrayViewFromImage(ref_img).dtype))
        img.CopyInformation(ref_img)
        produced_by = {"simulated": True, "from": "reference", "target_dice": target_dice,
                       "dice": round(result.dice, 4), "severity": round(result.severity, 4), "seed": seed}
        project.write_label(case, "pseudo", img, source=SOURCE, produced_by=produced_by)
        out.append({"case": case, "dice": round(result.dice, 4), "severity": round(result.severity, 4)})
    return out
