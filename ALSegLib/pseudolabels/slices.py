"""Volumes to SAM's slices and masks back onto the exact voxel grid.

A volume is sliced along one array axis (chosen by anatomical name from the
direction matrix, so an oblique or coronally acquired series still gets its
axial slices), its intensities windowed into uint8 (CT: a window per label,
e.g. soft tissue W400/L40; MRI: volume percentiles), and every mask computed on
a slice is written back into a label array of the image's own shape, so
spacing, origin and direction are carried over untouched.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

AXES = ("axial", "coronal", "sagittal")
# (width, level) in HU
CT_WINDOWS = {
    "soft_tissue": (400.0, 40.0), "abdomen": (350.0, 50.0), "liver": (150.0, 30.0), "bone": (1800.0, 400.0),
    "lung": (1500.0, -600.0), "brain": (80.0, 40.0),
}
MRI_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Window:
    """Intensity mapping to 0..255: a CT window (width, level) or MRI percentiles of the volume."""

    kind: str  # "window" or "percentile"
    a: float
    b: float

    def key(self) -> str:
        return f"{self.kind}:{self.a:g}:{self.b:g}"

    def to_json(self):
        return {"width": self.a, "level": self.b} if self.kind == "window" else {"percentile": [self.a, self.b]}


def parse_window(spec, where: str = "window") -> Window:
    """A window from a preset name (``soft_tissue``, ``bone``, …), ``"W,L"``, ``[W, L]``,
    ``{"width": W, "level": L}`` or ``{"percentile": [lo, hi]}``."""
    if isinstance(spec, Window):
        return spec
    if isinstance(spec, str):
        if spec in CT_WINDOWS:
            return Window("window", *CT_WINDOWS[spec])
        if spec in ("mri", "percentile"):
            return Window("percentile", *MRI_PERCENTILES)
        parts = spec.replace("/", ",").split(",")
        try:
            spec = [float(p) for p in parts]
        except ValueError:
            raise InputError(where, f"unknown window {spec!r}; a preset ({', '.join(CT_WINDOWS)}), "
                                    "'WIDTH,LEVEL' or 'percentile'") from None
    if isinstance(spec, dict):
        if "percentile" in spec:
            spec_p = spec["percentile"]
            if not (isinstance(spec_p, list) and len(spec_p) == 2 and all(isinstance(v, (int, float)) for v in spec_p)
                    and 0 <= spec_p[0] < spec_p[1] <= 100):
                raise InputError(where, "percentile must be [low, high] with 0 <= low < high <= 100")
            return Window("percentile", float(spec_p[0]), float(spec_p[1]))
        spec = [spec.get("width"), spec.get("level")]
    if (isinstance(spec, (list, tuple)) and len(spec) == 2
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec)):
        width, level = float(spec[0]), float(spec[1])
        if not width > 0:
            raise InputError(where, f"window width must be positive, not {width:g}")
        return Window("window", width, level)
    raise InputError(where, f"cannot read a window from {spec!r}")


def default_window(modality: str) -> Window:
    return Window("window", *CT_WINDOWS["soft_tissue"]) if modality == "CT" else Window("percentile", *MRI_PERCENTILES)


def to_uint8(volume: np.ndarray, window: Window) -> np.ndarray:
    """Map intensities to 0..255 (uint8) with a CT window or volume percentiles."""
    v = volume.astype(np.float32, copy=False)
    if window.kind == "window":
        lo, hi = window.b - window.a / 2, window.b + window.a / 2
    else:
        finite = v[np.isfinite(v)]
        lo, hi = (np.percentile(finite, [window.a, window.b]) if finite.size else (0.0, 1.0))
        lo, hi = float(lo), float(hi)
    if hi <= lo:
        hi = lo + 1.0
    out = (np.clip(v, lo, hi) - lo) * (255.0 / (hi - lo))
    return np.nan_to_num(np.round(out), nan=0.0).astype(np.uint8)


def slice_axis(image: sitk.Image, axis: str | int) -> int:
    """The numpy array axis (0 = k/z, 1 = j/y, 2 = i/x) to slice along.

    ``axial``/``coronal``/``sagittal`` pick the image axis whose direction is
    closest to the patient's S/A/L axis (LPS physical space), so the choice
    follows anatomy, not the file's index order. An int is an array axis.
    """
    if isinstance(axis, (int, np.integer)) and not isinstance(axis, bool):
        if axis not in (0, 1, 2):
            raise InputError("--axis", f"array axis must be 0, 1 or 2, not {axis}")
        return int(axis)
    if axis not in AXES:
        raise InputError("--axis", f"unknown slicing axis {axis!r}; one of {', '.join(AXES)} or 0, 1, 2")
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)  # columns: index axes i, j, k
    physical = {"axial": 2, "coronal": 1, "sagittal": 0}[axis]
    index_axis = int(np.argmax(np.abs(d[physical, :])))
    return 2 - index_axis


@dataclass
class VolumeSlices:
    """A volume as (n_slices, rows, cols) with the slice axis first."""

    axis: int  # numpy array axis the slices are taken along
    raw: np.ndarray  # float32 intensities, slice axis first
    pixel_spacing: tuple[float, float]  # mm per row, per column
    slice_spacing: float
    shape: tuple[int, int, int]  # the image's array shape (z, y, x)

    @property
    def n(self) -> int:
        return self.raw.shape[0]

    @property
    def size(self) -> tuple[int, int]:
        return self.raw.shape[1], self.raw.shape[2]

    def uint8(self, window: Window) -> np.ndarray:
        return to_uint8(self.raw, window)

    def to_array(self, stack: np.ndarray) -> np.ndarray:
        """A (n_slices, rows, cols) array back in the image's (z, y, x) array order."""
        return np.moveaxis(stack, 0, self.axis)

    def from_array(self, arr: np.ndarray) -> np.ndarray:
        """An array of the image's shape, slice axis first."""
        if arr.shape != self.shape:
            raise ValueError(f"array of shape {arr.shape} does not match the image {self.shape}")
        return np.moveaxis(arr, self.axis, 0)

    def locate(self, array_index: Sequence[float]) -> tuple[int, float, float]:
        """Continuous array index (z, y, x) -> (slice, x = column, y = row) in slice pixels."""
        a = [float(v) for v in array_index]
        k = a[self.axis]
        rest = [a[i] for i in range(3) if i != self.axis]
        return int(round(k)), rest[1], rest[0]


def volume_slices(image: sitk.Image, axis: str | int = "axial") -> VolumeSlices:
    ax = slice_axis(image, axis)
    arr = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    spacing_zyx = image.GetSpacing()[::-1]
    others = [i for i in range(3) if i != ax]
    return VolumeSlices(axis=ax, raw=np.moveaxis(arr, ax, 0), pixel_spacing=(spacing_zyx[others[0]], spacing_zyx[others[1]]),
                        slice_spacing=spacing_zyx[ax], shape=arr.shape)


def physical_to_array_index(image: sitk.Image, point: Sequence[float], space: str) -> tuple[float, float, float]:
    """A point in ``LPS``/``RAS`` millimetres or ``index`` (i, j, k voxels) -> continuous array index (z, y, x)."""
    p = [float(v) for v in point]
    if space == "index":
        i, j, k = p
    else:
        if space == "RAS":
            p = [-p[0], -p[1], p[2]]
        i, j, k = image.TransformPhysicalPointToContinuousIndex(p)
    return k, j, i


def label_image(array_zyx: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label image with exactly the reference image's geometry."""
    out = sitk.GetImageFromArray(np.ascontiguousarray(array_zyx))
    out.CopyInformation(reference)
    return out
