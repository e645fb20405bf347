"""Class probabilities a model predicted: ``predictions/<model>/<case>.npz``, compressed float16
(``probabilities``: classes x z x y x on the image grid; ``class_values``: the project label value
of each channel, 0 first; ``weights_digest``, ``mirroring`` and ``tile_step``: the weights and
settings that made them). Selection's uncertainty and the Slicer overlay read them; the prediction
pass (:mod:`ALSegLib.nnunet.predict`) writes them. numpy only, no pickles."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError

if TYPE_CHECKING:  # the store sits below Project: it reads the project's layout only
    from ..project import Project


def probabilities_path(project: Project, model: str, case: str) -> Path:
    return project.layout.prediction(model, case)


def load_probabilities(project: Project, model: str, case: str) -> tuple[np.ndarray, list[int]]:
    """(probabilities as float32 C x z x y x, project label value of each channel)."""
    path = probabilities_path(project, model, case)
    if not path.is_file():
        raise InputError(path, "no stored probabilities for this case and model")
    with np.load(path, allow_pickle=False) as npz:
        return npz["probabilities"].astype(np.float32), [int(v) for v in npz["class_values"]]


def stored_with(project: Project, model: str, case: str, digest: str, mirroring: bool = False,
                tile_step: float = 0.5) -> bool:
    """Whether the case's stored probabilities were made by these weights with these settings
    (probabilities stored before the settings were recorded count as unmirrored, step 0.5)."""
    path = probabilities_path(project, model, case)
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "weights_digest" not in npz.files or str(npz["weights_digest"]) != digest:
                return False
            stored_mirroring = bool(npz["mirroring"]) if "mirroring" in npz.files else False
            stored_step = float(npz["tile_step"]) if "tile_step" in npz.files else 0.5
            return stored_mirroring == bool(mirroring) and abs(stored_step - tile_step) < 1e-9
    except (OSError, ValueError):
        return False
