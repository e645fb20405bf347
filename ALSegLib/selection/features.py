"""One feature vector per case for the diversity half of selection; all deterministic.

Sources, best first:

- ``nnunet``: the model's encoder bottleneck activations, averaged over every
  position of every sliding-window tile, taken at the output of the bottleneck's
  last convolution, before its normalisation: after nnU-Net's instance norm (with
  its affine parameters) and leaky ReLU, every channel's spatial mean is nearly
  the same constant for every input (measured on Hippocampus: 0.389 ± 0.005 in
  every channel), so pooled post-norm activations barely tell cases apart.
  :class:`ALSegLib.nnunet.features.BottleneckPool` hooks the
  network during the prediction pass that writes the probabilities (no second
  pass); ``alseg predict`` stores them in ``features/nnunet/<model>/<case>.npy``
  (paths and files: :mod:`ALSegLib.store.features`).
- ``sam``: pooled SAM image embeddings written by ``alseg pseudolabel --source sam``
  (``features/sam/<case>.npy``).
- ``histogram``: a cheap fallback from the image alone: a 32-bin intensity
  histogram (CT: fixed HU range −1000..1000; MRI: between the case's 1st and 99th
  percentiles) plus the mean and standard deviation in those units.

No random crops anywhere (the reference's crops made its selection irreproducible).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..project import Project
from ..store.features import nnunet_features_path, read_vector, sam_features_path, write_vector  # noqa: F401 (re-exported)

SOURCES = ("nnunet", "sam", "histogram")
HISTOGRAM_BINS = 32
CT_RANGE = (-1000.0, 1000.0)


def histogram_features(image: sitk.Image, modality: str) -> np.ndarray:
    """Intensity histogram (density over 32 bins) + mean and standard deviation, in [0, 1] units."""
    values = sitk.GetArrayViewFromImage(image).astype(np.float32).ravel()
    if modality == "CT":
        lo, hi = CT_RANGE
    else:
        lo, hi = (float(v) for v in np.percentile(values, [1, 99]))
        if hi <= lo:
            hi = lo + 1.0
    scaled = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    hist = np.histogram(scaled, bins=HISTOGRAM_BINS, range=(0.0, 1.0))[0].astype(np.float32)
    hist /= max(1.0, float(hist.sum()))
    return np.concatenate([hist, [scaled.mean(), scaled.std()]]).astype(np.float32)


def available(project: Project, source: str, cases: Sequence[str], model: str | None = None) -> list[str]:
    """The cases among ``cases`` whose stored features of ``source`` exist."""
    if source == "histogram":
        return list(cases)
    if source == "nnunet":
        if model is None:
            return []
        return [c for c in cases if nnunet_features_path(project, model, c).is_file()]
    if source == "sam":
        return [c for c in cases if sam_features_path(project, c).is_file()]
    raise InputError("--features", f"unknown feature source {source!r}; one of {', '.join(SOURCES)} or auto")


def case_features(project: Project, cases: Sequence[str], source: str = "auto",
                  model: str | None = None) -> tuple[str, np.ndarray]:
    """(source used, features (len(cases), d) float32) for ``cases`` in order.

    ``auto`` takes the first source that covers every case: the model's bottleneck
    features, then SAM embeddings, then intensity histograms. A named source must
    cover every case, otherwise the error names what is missing and how to make it.
    """
    cases = list(cases)
    if source == "nnunet" and model is None:
        raise InputError("--features nnunet", "needs --model: the model whose prediction pass stored the features")
    order = [s for s in SOURCES if s != "nnunet" or model is not None] if source == "auto" else [source]
    for s in order:
        have = available(project, s, cases, model)
        if len(have) == len(cases):
            return s, _load(project, s, cases, model)
        if source != "auto":
            missing = sorted(set(cases) - set(have))
            how = (f"run 'alseg predict {project.root} --model {model}'" if s == "nnunet"
                   else "run 'alseg pseudolabel --source sam'")
            raise InputError(f"features ({s})", f"missing for {len(missing)} of {len(cases)} cases "
                             f"(e.g. {', '.join(missing[:3])}); {how} first")
    raise AssertionError("histogram features cover every case")


def _load(project: Project, source: str, cases: Sequence[str], model: str | None) -> np.ndarray:
    if not cases:
        return np.zeros((0, 0), np.float32)
    if source == "histogram":
        rows = [histogram_features(project.read_image(c), project.modality) for c in cases]
    elif source == "nnunet":
        rows = [read_vector(nnunet_features_path(project, model, c)) for c in cases]
    else:
        rows = [read_vector(sam_features_path(project, c)) for c in cases]
    dims = {r.shape[0] for r in rows}
    if len(dims) != 1:
        raise InputError(f"features ({source})", f"vectors of different lengths {sorted(dims)}; recompute them")
    return np.stack(rows)
