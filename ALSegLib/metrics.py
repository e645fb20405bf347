"""Overlap and surface metrics per class, in millimetres (voxel spacing respected).

Conventions (documented because they change averages):
- Dice and IoU: both masks empty -> 1.0 (nothing to find, nothing found);
  exactly one empty -> 0.0.
- HD95 and ASD: both empty -> 0.0; exactly one empty -> NaN (undefined; written
  as ``null`` in JSON and left out of means, which report how many cases count).
- Surface voxels: voxels of the mask with at least one 6-neighbour outside it
  (voxels on the image border count as surface).
- HD95 = max of the two directed 95th percentiles of surface-to-surface
  distances (A->B and B->A); ASD = mean of all those distances, both directions
  pooled (average symmetric surface distance).
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

METRICS = ("dice", "iou", "hd95", "asd")
_STRUCT = ndimage.generate_binary_structure(3, 1)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_STRUCT, border_value=0)


def _crop(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Crop both masks to the bounding box of their union plus one voxel."""
    union = a | b
    sl = []
    for axis in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != axis)
        idx = np.flatnonzero(union.any(axis=other))
        sl.append(slice(max(int(idx[0]) - 1, 0), int(idx[-1]) + 2))
    return a[tuple(sl)], b[tuple(sl)]


def surface_distances(a: np.ndarray, b: np.ndarray, spacing: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances (mm) from each surface voxel of ``a`` to the surface of ``b``, and back.

    Both masks must be non-empty. ``spacing`` is in array axis order.
    """
    a, b = _crop(a, b)
    sa, sb = _surface(a), _surface(b)
    dist_to_b = ndimage.distance_transform_edt(~sb, sampling=spacing)
    dist_to_a = ndimage.distance_transform_edt(~sa, sampling=spacing)
    return dist_to_b[sa], dist_to_a[sb]


def binary_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Dice, IoU, HD95 and ASD of two boolean masks (spacing in array axis order)."""
    pred = np.asarray(pred, dtype=bool)
    ref = np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: {pred.shape} vs {ref.shape}")
    n_pred, n_ref = int(pred.sum()), int(ref.sum())
    if n_pred == 0 and n_ref == 0:
        return {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "asd": 0.0}
    inter = int(np.count_nonzero(pred & ref))
    dice = 2.0 * inter / (n_pred + n_ref)
    iou = inter / (n_pred + n_ref - inter)
    if n_pred == 0 or n_ref == 0:
        return {"dice": dice, "iou": iou, "hd95": math.nan, "asd": math.nan}
    d_ab, d_ba = surface_distances(pred, ref, spacing)
    hd95 = max(float(np.percentile(d_ab, 95)), float(np.percentile(d_ba, 95)))
    asd = float((d_ab.sum() + d_ba.sum()) / (d_ab.size + d_ba.size))
    return {"dice": dice, "iou": iou, "hd95": hd95, "asd": asd}


def label_metrics(
    pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], labels: Mapping[str, int]
) -> dict[str, dict[str, float]]:
    """Per-class metrics of two label maps: ``{class name: {metric: value}}``."""
    return {name: binary_metrics(pred == value, ref == value, spacing) for name, value in labels.items()}


def summarize(per_case: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean, standard deviation and count of defined values per class and metric over cases.

    Adds a ``"mean"`` pseudo-class: for each case the mean over classes, then
    averaged over cases (only classes where the metric is defined).
    """
    if not per_case:
        return {}
    classes = list(next(iter(per_case.values())).keys())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for cls in classes + ["mean"]:
        out[cls] = {}
        for metric in METRICS:
            if cls == "mean":
                vals = [_nanmean([case[c][metric] for c in classes]) for case in per_case.values()]
            else:
                vals = [case[cls][metric] for case in per_case.values()]
            defined = np.array([v for v in vals if not math.isnan(v)], dtype=float)
            out[cls][metric] = {
                "mean": float(defined.mean()) if defined.size else math.nan,
                "std": float(defined.std()) if defined.size else math.nan,
                "n": int(defined.size),
            }
    return out


def foreground_dice(per_case: Mapping[str, Mapping[str, Mapping[str, float]]],
                    both_empty: Mapping[str, Sequence[str]]) -> float:
    """The foreground Dice nnU-Net's evaluation (and nnActive) report: per class the mean Dice over
    the cases where the reference or the prediction holds that class (a class absent from both is
    left out, not counted as 1.0), then the mean over classes. ``both_empty``: case -> classes
    absent from both masks."""
    if not per_case:
        return math.nan
    classes = list(next(iter(per_case.values())).keys())
    per_class = [_nanmean([case[c]["dice"] for name, case in per_case.items() if c not in both_empty.get(name, ())])
                 for c in classes]
    return _nanmean(per_class)


def _nanmean(values: Sequence[float]) -> float:
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else math.nan

