"""Sparse human labels: a version that covers only some slices of a case (or any annotated mask).

A sparse version is stored like any human version (``labels/human/<case>/v0003.nrrd``, never
overwritten) with its annotated mask beside it (``v0003.annotated.nrrd``, 1 where a person
labeled, 0 elsewhere; the label is 0 outside the mask) and the annotated slices in its
provenance (``annotated``: ``{"axis": 0, "slices": [12, 30], "voxels": ...}``). The mask is
written before the label: a version whose label exists always has its mask, so a crash can
never turn a sparse version into a whole-case one. Array axes are the image's (k, j, i)
index axes: axis 0 is the slice index ``k``.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volumes import Geometry

MASK_SUFFIX = ".annotated"  # v0003.annotated.nrrd beside v0003.nrrd
AXIS_NAMES = ("k", "j", "i")  # array axis 0, 1, 2 of a (k, j, i) voxel array


def acquisition_axis(spacing_xyz: Sequence[float]) -> int:
    """The array axis along which the case was acquired: the one with the largest spacing (the
    thickest slices); on a tie (isotropic), axis 0 (``k``)."""
    spacing_kji = list(spacing_xyz)[::-1]
    top = max(spacing_kji)
    return next(a for a, s in enumerate(spacing_kji) if s >= top * (1 - 1e-6))


def case_slices(geometry: Geometry) -> tuple[int, int]:
    """(acquisition axis, slices along it) of a case, from its image geometry (size is x, y, z)."""
    axis = acquisition_axis(geometry.spacing)
    return axis, int(geometry.size[::-1][axis])


@dataclass(frozen=True)
class SliceSet:
    """Whole slices ``indices`` along array ``axis`` (0 = k, 1 = j, 2 = i)."""

    axis: int
    indices: tuple[int, ...]

    @classmethod
    def of(cls, axis: int, indices: Sequence[int]) -> SliceSet:
        return cls(int(axis), tuple(sorted({int(i) for i in indices})))

    def check(self, shape: Sequence[int], where: object) -> SliceSet:
        """Refuse an axis or slice outside the image (naming ``where``), or no slice at all."""
        if self.axis not in (0, 1, 2):
            raise InputError(where, f"slice axis must be 0 (k), 1 (j) or 2 (i), not {self.axis}")
        if not self.indices:
            raise InputError(where, "a sparse label needs at least one annotated slice")
        n = int(shape[self.axis])
        bad = [i for i in self.indices if not 0 <= i < n]
        if bad:
            raise InputError(where, f"slice(s) {bad[:8]} along {AXIS_NAMES[self.axis]} are outside the image "
                                    f"(0..{n - 1})")
        return self

    def mask(self, shape: Sequence[int]) -> np.ndarray:
        out = np.zeros(tuple(int(s) for s in shape), bool)
        index = [slice(None)] * 3
        index[self.axis] = list(self.indices)
        out[tuple(index)] = True
        return out

    def to_json(self) -> dict:
        return {"axis": self.axis, "axis_name": AXIS_NAMES[self.axis], "slices": list(self.indices)}


def slice_coverage(mask: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(fully annotated, partly annotated) per slice of ``mask`` along ``axis``: two bool vectors."""
    other = tuple(a for a in range(mask.ndim) if a != axis)
    return mask.all(axis=other), mask.any(axis=other)


def slices_of_mask(mask: np.ndarray) -> SliceSet | None:
    """The slice set a mask is made of (whole slices along one axis), or None for any other mask."""
    for axis in (0, 1, 2):
        full, any_ = slice_coverage(mask, axis)
        if np.array_equal(full, any_) and any_.any():
            return SliceSet.of(axis, np.flatnonzero(full).tolist())
    return None


def mask_array(annotated, label: sitk.Image, where: object) -> np.ndarray:
    """The annotated mask (bool, k, j, i) of a sparse label: from a :class:`SliceSet`, or from a
    mask image on the label's grid (values 0/1; another grid, other values or an empty mask are
    refused, naming ``where``)."""
    shape = sitk.GetArrayViewFromImage(label).shape
    if isinstance(annotated, SliceSet):
        return annotated.check(shape, where).mask(shape)
    if not isinstance(annotated, sitk.Image):
        raise InputError(where, f"the annotated region must be slices or a mask image, not {type(annotated).__name__}")
    differences = Geometry.of(label).differences(Geometry.of(annotated))
    if differences:
        raise InputError(where, "the annotated mask is not on the label's grid: " + "; ".join(differences))
    values = sitk.GetArrayFromImage(annotated)
    odd = sorted(set(np.unique(values).tolist()) - {0, 1})
    if odd:
        raise InputError(where, f"the annotated mask must hold 0 and 1 only; found {odd[:8]}")
    if not values.any():
        raise InputError(where, "the annotated mask is empty: a sparse label needs annotated voxels")
    return values.astype(bool)


def annotation_record(mask: np.ndarray) -> dict:
    """What the provenance says of a sparse version's annotated region."""
    slices = slices_of_mask(mask)
    return {**(slices.to_json() if slices is not None else {"axis": None, "slices": None}),
            "voxels": int(np.count_nonzero(mask)), "of_voxels": int(mask.size)}
