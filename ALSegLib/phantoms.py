"""Deterministic synthetic CT- and MR-like phantoms with known labels.

The embedded data for the demo and the tests: a body with a fat layer, a
deformed "organ", a "lesion" inside it and a curved "vessel" (three labels),
plus an unlabelled spine. Shape, position, size and contrast change from case
to case; noise and a smooth bias field are added. The same (index, modality,
seed) always gives the same volume.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from . import volumes

LABELS = {"organ": 1, "vessel": 2, "lesion": 3}
COLORS = {"organ": (0.85, 0.55, 0.45), "vessel": (0.8, 0.2, 0.2), "lesion": (0.95, 0.9, 0.3)}
SPACING = {"CT": (1.5, 1.5, 2.5), "MRI": (1.2, 1.2, 1.2)}  # x, y, z in mm


def _smooth_field(rng: np.random.Generator, size: int, coarse: int = 5) -> np.ndarray:
    """A smooth random field in [-1, 1]: coarse noise spread by separable Gaussian kernels."""
    t = np.linspace(0, 1, size)
    centres = np.linspace(0, 1, coarse)
    w = np.exp(-(((t[:, None] - centres[None, :]) * (coarse - 1)) ** 2))
    w /= w.sum(axis=1, keepdims=True)
    field = np.einsum("abc,ia,jb,kc->ijk", rng.standard_normal((coarse,) * 3), w, w, w, optimize=True)
    return (field / (np.abs(field).max() + 1e-8)).astype(np.float32)


def make_phantom(index: int, modality: str = "CT", seed: int = 0, size: int = 64) -> tuple[sitk.Image, sitk.Image]:
    """One phantom case: (image, label) with identical geometry."""
    modality = modality.upper()
    if modality not in SPACING:
        raise ValueError(f"modality must be CT or MRI, not {modality!r}")
    rng = np.random.default_rng([seed, index, 0 if modality == "CT" else 1])
    # normalised coordinates in [-1, 1], array order z, y, x
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, size, dtype=np.float32),) * 3, indexing="ij")

    body = (x / rng.uniform(0.8, 0.92)) ** 2 + (y / rng.uniform(0.6, 0.72)) ** 2 < 1
    fat = body & ~ndimage.binary_erosion(body, iterations=int(rng.integers(2, 5)))
    spine = ((x - 0) ** 2 + (y - 0.42) ** 2 < 0.1**2) & body

    c = rng.uniform(-0.22, 0.22, 3) * np.array([0.5, 0.6, 1.0])
    r = rng.uniform(0.3, 0.5, 3)
    ellipsoid = ((z - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((x - c[2]) / r[2]) ** 2
    organ = (ellipsoid + 0.35 * _smooth_field(rng, size) < 1) & body & ~spine

    label = np.zeros((size,) * 3, np.uint8)
    label[organ] = LABELS["organ"]

    # the lesion sits inside the organ (centre at least 3 voxels in): a hypodense lesion at the organ's edge
    # would look like the soft tissue around it, and the organ's outline would be lost
    inner = ndimage.binary_erosion(organ, iterations=3)
    coords = np.argwhere(inner if inner.any() else organ)
    if len(coords):
        centre = coords[rng.integers(len(coords))] / (size - 1) * 2 - 1
        radius = rng.uniform(0.15, 0.24)
        lesion = ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 < radius**2) & organ
        label[lesion] = LABELS["lesion"]

    amp, freq, phase = rng.uniform(0.1, 0.3), rng.uniform(1.5, 3.5), rng.uniform(0, 2 * np.pi)
    vx = rng.uniform(-0.45, 0.45) + amp * np.sin(freq * z + phase)
    vy = rng.uniform(-0.3, 0.2) + amp * np.cos(freq * z + phase)
    vessel = ((x - vx) ** 2 + (y - vy) ** 2 < rng.uniform(0.05, 0.09) ** 2) & body & ~spine
    label[vessel] = LABELS["vessel"]

    bias = _smooth_field(rng, size, coarse=3)
    if modality == "CT":
        img = np.full(label.shape, -1000.0, np.float32)
        img[body] = 40.0
        img[fat] = -100.0
        img[spine] = 700.0
        organ_hu = rng.uniform(70, 110)
        img[label == LABELS["organ"]] = organ_hu
        img[label == LABELS["lesion"]] = organ_hu - rng.uniform(40, 70)  # hypodense, as most liver lesions
        img[label == LABELS["vessel"]] = rng.uniform(150, 260)
        img = ndimage.gaussian_filter(img, 0.7)
        img += 8.0 * bias * body + rng.normal(0, rng.uniform(8, 20), img.shape)
        arr = np.clip(np.round(img), -1024, 3071).astype(np.int16)
    else:
        img = np.zeros(label.shape, np.float32)
        img[body] = 300.0
        img[fat] = 800.0
        img[spine] = 150.0
        organ_si = rng.uniform(380, 520)
        img[label == LABELS["organ"]] = organ_si
        img[label == LABELS["lesion"]] = organ_si * rng.uniform(1.3, 1.7)
        img[label == LABELS["vessel"]] = rng.uniform(60, 120)  # flow void
        img = ndimage.gaussian_filter(img, 0.7)
        img *= np.exp(0.3 * bias)
        noise = rng.uniform(10, 25)
        img = np.abs(img + rng.normal(0, noise, img.shape) + 1j * rng.normal(0, noise, img.shape))  # Rician
        arr = img.astype(np.float32)

    spacing = SPACING[modality]
    origin = tuple(-0.5 * (size - 1) * s for s in spacing)
    image = sitk.GetImageFromArray(arr)
    lab = sitk.GetImageFromArray(label)
    for im in (image, lab):
        im.SetSpacing(spacing)
        im.SetOrigin(origin)
    return image, lab


def case_id(index: int, modality: str) -> str:
    return f"phantom_{modality.lower()}_{index:03d}"


def write_dataset(folder: str | Path, n: int = 24, modality: str = "CT", seed: int = 0, size: int = 64) -> tuple[Path, Path]:
    """Write ``n`` phantoms as ``images/<id>.nii.gz`` and ``labels/<id>.nii.gz``; returns both folders."""
    folder = Path(folder)
    images, labels = folder / "images", folder / "labels"
    for i in range(n):
        image, label = make_phantom(i, modality, seed, size)
        volumes.write_image(image, images / f"{case_id(i, modality)}.nii.gz")
        volumes.write_image(label, labels / f"{case_id(i, modality)}.nii.gz")
    return images, labels
