"""How unsure the model is about a case, from its stored class probabilities.

Three measures, each in [0, 1]:

- ``entropy``: mean voxel entropy divided by log C (C classes, background included).
  Over a whole volume it is dominated by easy background.
- ``focused_entropy``: the same mean restricted to where the structure is or
  might be: the predicted foreground, dilated by a band of ``band`` voxels, plus
  every voxel whose foreground probability exceeds 0.1. Falls back to ``entropy``
  when that region is empty.
- ``disagreement``: 1 − mean Dice between the pseudo-label and the model's
  prediction over the foreground classes present in either (absent: no pseudo-label).

The combined score (what the strategies rank by) is the weighted mean
0.5·focused_entropy + 0.2·entropy + 0.3·disagreement; without a pseudo-label,
the first two weights are renormalised (5/7 and 2/7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

WEIGHTS = {"focused_entropy": 0.5, "entropy": 0.2, "disagreement": 0.3}
MAYBE_FOREGROUND = 0.1


@dataclass(frozen=True)
class Uncertainty:
    entropy: float
    focused_entropy: float
    disagreement: float | None

    @property
    def score(self) -> float:
        parts = {"focused_entropy": self.focused_entropy, "entropy": self.entropy, "disagreement": self.disagreement}
        used = {k: v for k, v in parts.items() if v is not None}
        total = sum(WEIGHTS[k] for k in used)
        return sum(WEIGHTS[k] * v for k, v in used.items()) / total

    def to_json(self) -> dict:
        return {"score": round(self.score, 6), "entropy": round(self.entropy, 6),
                "focused_entropy": round(self.focused_entropy, 6),
                "disagreement": None if self.disagreement is None else round(self.disagreement, 6)}


def entropy_map(probabilities: np.ndarray) -> np.ndarray:
    """Voxel entropy / log C of probabilities (C, ...) as float32; C must be at least 2."""
    p = np.asarray(probabilities, dtype=np.float32)
    if p.ndim < 2 or p.shape[0] < 2:
        raise ValueError(f"probabilities need a class axis of at least 2 classes first, got shape {p.shape}")
    h = np.zeros(p.shape[1:], dtype=np.float32)
    for channel in p:  # one class at a time: no second C-sized copy
        h -= channel * np.log(np.clip(channel, 1e-12, 1.0))
    h /= math.log(p.shape[0])
    # stored probabilities are float16: a near-uniform voxel whose classes sum to slightly over 1 would score
    # above the maximum (1.0000074 was seen); entropy of a distribution is at most log C
    return np.clip(h, 0.0, 1.0, out=h)


def focus_region(probabilities: np.ndarray, band: int = 2) -> np.ndarray:
    """Predicted foreground dilated by ``band`` voxels, plus voxels that may be foreground."""
    p = np.asarray(probabilities)
    foreground = p.argmax(axis=0) != 0
    if band > 0 and foreground.any():
        structure = ndimage.generate_binary_structure(foreground.ndim, 1)
        foreground = ndimage.binary_dilation(foreground, structure, iterations=band)
    return foreground | (1.0 - p[0] > MAYBE_FOREGROUND)


def label_disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """1 − mean Dice over the foreground values present in either label map (0 if both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    values = sorted((set(np.unique(a)) | set(np.unique(b))) - {0})
    if not values:
        return 0.0
    dice = []
    for v in values:
        x, y = a == v, b == v
        dice.append(2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum()))
    return float(1.0 - np.mean(dice))


def case_uncertainty(probabilities: np.ndarray, class_values: list[int] | None = None,
                     pseudo_label: np.ndarray | None = None, band: int = 2) -> Uncertainty:
    """The three measures for one case; ``class_values`` maps channels to label values
    (channel 0 is background) so the prediction can be compared to ``pseudo_label``."""
    h = entropy_map(probabilities)
    region = focus_region(probabilities, band)
    focused = float(h[region].mean()) if region.any() else float(h.mean())
    disagreement = None
    if pseudo_label is not None:
        values = np.asarray(class_values if class_values is not None else range(probabilities.shape[0]))
        if len(values) != probabilities.shape[0]:
            raise ValueError(f"{len(values)} class values for {probabilities.shape[0]} probability channels")
        predicted = values[np.asarray(probabilities).argmax(axis=0)]
        disagreement = label_disagreement(predicted, np.asarray(pseudo_label))
    return Uncertainty(float(h.mean()), focused, disagreement)
