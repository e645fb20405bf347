"""Clean a pseudo-label per label: small islands, largest 3D components, holes.

The rule: a 3D component that a prompt covers (a box's pixels or a positive point on the prompt's
own slice) is never dropped, whatever its size; ``keep_components`` N (default 1; 0 keeps all)
counts the prompted components first and fills up with the largest others only while fewer than N
are prompted, and ``min_island_mm3`` removes small unprompted ones. Two boxes on the two kidneys keep
both kidneys, a box per focus keeps every focus of a multifocal tumour; a stray blob no prompt
touches goes, even when it is larger than the prompted part.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..errors import InputError

_FULL = np.ones((3, 3, 3), bool)  # 26-connectivity: touching diagonally is one structure


@dataclass(frozen=True)
class PostProcess:
    keep_components: int = 1  # largest N 3D components per label; 0 keeps all
    fill_holes: bool = True  # per slice along the slicing axis, then in 3D
    min_island_mm3: float = 0.0  # components smaller than this are removed

    @classmethod
    def from_json(cls, obj: dict, where: str, base: PostProcess | None = None) -> PostProcess:
        base = base or cls()
        keep = obj.get("keep_components", base.keep_components)
        fill = obj.get("fill_holes", base.fill_holes)
        island = obj.get("min_island_mm3", base.min_island_mm3)
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 0:
            raise InputError(where, f"keep_components must be a whole number >= 0 (0 keeps all), not {keep!r}")
        if not isinstance(fill, bool):
            raise InputError(where, f"fill_holes must be true or false, not {fill!r}")
        if not isinstance(island, (int, float)) or isinstance(island, bool) or island < 0:
            raise InputError(where, f"min_island_mm3 must be a number >= 0, not {island!r}")
        return cls(keep, fill, float(island))


def clean_mask(mask: np.ndarray, voxel_mm3: float, settings: PostProcess, slice_axis: int = 0,
               prompted: np.ndarray | None = None) -> np.ndarray:
    """One label's 3D mask after island removal, component selection and hole filling. ``prompted``:
    the voxels the label's prompts cover; a component touching one is always kept (see the module)."""
    mask = mask.astype(bool, copy=True)
    if not mask.any():
        return mask
    if settings.min_island_mm3 > 0 or settings.keep_components > 0:
        comps, n = ndimage.label(mask, structure=_FULL)
        sizes = np.bincount(comps.ravel(), minlength=n + 1)[1:]
        covered = np.zeros(n, bool)
        if prompted is not None:
            touched = np.unique(comps[prompted & mask])
            covered[touched[touched > 0] - 1] = True
        keep = np.ones(n, bool)
        if settings.min_island_mm3 > 0:
            keep &= sizes * voxel_mm3 >= settings.min_island_mm3
        if settings.keep_components > 0:
            others = max(0, settings.keep_components - int(covered.sum()))  # slots left after the prompted parts
            order = [i for i in np.argsort(-sizes, kind="stable") if not covered[i]]
            allowed = np.zeros(n, bool)
            allowed[order[:others]] = True
            keep &= allowed
        keep |= covered
        mask = np.concatenate([[False], keep])[comps]
    if settings.fill_holes and mask.any():
        moved = np.moveaxis(mask, slice_axis, 0)
        filled = np.stack([ndimage.binary_fill_holes(s) if s.any() else s for s in moved])
        mask = ndimage.binary_fill_holes(np.moveaxis(filled, 0, slice_axis))
    return mask
