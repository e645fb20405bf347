"""Agreement between two label maps of one case, per label value: the Dice a pseudo-label reaches
against a human label (what trust in pseudo-labels is measured from, :mod:`.trust`), and the effort of
turning a proposal into the accepted label (voxels changed against voxels drawn from scratch). numpy
only: the Slicer module's review glue uses it in Slicer's own Python.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _foreground_box(*arrays: np.ndarray) -> tuple[slice, ...]:
    """The box around every non-zero voxel of any of ``arrays`` (empty slices when there is none)."""
    foreground = np.zeros(arrays[0].shape, bool)
    for a in arrays:
        foreground |= a != 0
    return tuple(slice(int(i[0]), int(i[-1]) + 1) if i.size else slice(0, 0)
                 for i in (np.flatnonzero(foreground.any(axis=tuple(a for a in range(foreground.ndim) if a != d)))
                           for d in range(foreground.ndim)))


def class_dice(a: np.ndarray, b: np.ndarray, values: Sequence[int], mask: np.ndarray | None = None) -> dict[int, float | None]:
    """Dice of each label value between two label maps (within ``mask`` when given: a sparse human
    label's annotated voxels); ``None`` for a value neither map holds (nothing to agree on). Counted in
    the box around the foreground of either map, so a large CT with a small structure stays cheap."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"label shapes differ: {a.shape} vs {b.shape}")
    if mask is not None:
        a, b = np.where(mask, a, 0), np.where(mask, b, 0)
    box = _foreground_box(a, b)
    a, b = a[box].ravel().astype(np.int64), b[box].ravel().astype(np.int64)
    n = int(max(values, default=0)) + 1
    count_a, count_b = (np.bincount(x[x < n], minlength=n)[:n] for x in (a, b))
    same = np.bincount(a[(a == b) & (a < n)], minlength=n)[:n]
    return {int(v): (float(2.0 * same[v] / (count_a[v] + count_b[v])) if count_a[v] + count_b[v] else None)
            for v in values}


def edit_effort(proposal: np.ndarray | None, accepted: np.ndarray, values: Sequence[int],
                seconds: float | None = None) -> dict:
    """What turning ``proposal`` (the label a reviewer was shown; None: an empty start) into
    ``accepted`` took: voxels whose value changed, against the voxels drawn from scratch (the
    accepted label's foreground), their ratio, the Dice per label value and its mean over the values
    present in either (1.0 when both are empty), and the seconds from open to accept when a person
    did it (``None``: the oracle's simulated annotator, which takes no time)."""
    accepted = np.asarray(accepted)
    before = np.zeros(accepted.shape, accepted.dtype) if proposal is None else np.asarray(proposal)
    changed = int(np.count_nonzero(before != accepted))
    scratch = int(np.count_nonzero(accepted))
    per_value = class_dice(before, accepted, values)
    dices = [d for d in per_value.values() if d is not None]
    out = {"voxels_changed": changed, "voxels_from_scratch": scratch,
           "corrected_fraction": round(changed / scratch, 4) if scratch else None,
           "unchanged": changed == 0, "dice_to_proposal": round(float(np.mean(dices)), 4) if dices else 1.0,
           "dice_per_value": {str(v): None if d is None else round(d, 4) for v, d in per_value.items()},
           "started_empty": proposal is None}
    if seconds is not None:
        out = {"seconds": round(float(seconds), 1), **out}
    return out
