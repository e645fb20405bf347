"""Feature vectors, one per case: ``features/nnunet/<model>/<case>.npy`` (written by the
prediction pass) and ``features/sam/<case>.npy`` (written by the SAM pseudo-label pass),
float32, 1-d, no pickles. Selection reads them (:mod:`ALSegLib.selection.features`)."""
from __future__ import annotations

import io
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import atomic
from ..errors import InputError

if TYPE_CHECKING:  # the store sits below Project: it reads the project's layout only
    from ..project import Project


def nnunet_features_path(project: Project, model: str, case: str) -> Path:
    return project.layout.nnunet_features(model, case)


def sam_features_path(project: Project, case: str) -> Path:
    """Written by ``alseg pseudolabel --source sam`` (with a ``.json`` sidecar)."""
    return project.layout.sam_features(case)


def write_vector(path: Path, vector: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(vector, dtype=np.float32), allow_pickle=False)
    atomic.write_bytes(path, buffer.getvalue())


def read_vector(path: Path) -> np.ndarray:
    try:
        vec = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise InputError(path, f"not a readable feature vector ({exc})") from None
    if vec.ndim != 1 or not np.isfinite(vec).all():
        raise InputError(path, f"a feature vector must be one finite 1-d array, got shape {vec.shape}")
    return vec.astype(np.float32)
