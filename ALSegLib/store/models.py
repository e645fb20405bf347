"""Model records: ``models/<name>/model.json`` (what a training was, its budget, status, the
digest of the weights it finished with; the weights themselves are nnU-Net's checkpoint under
``nnunet/results``). Read without torch, so ``alseg models`` and the rounds' bookkeeping stay light;
:mod:`ALSegLib.nnunet.train` writes them."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import atomic
from ..errors import InputError
from .files import read_json_object

if TYPE_CHECKING:  # the store sits below Project: it reads the project's layout only
    from ..project import Project

RECORD = "model.json"


def model_dir(project: Project, name: str) -> Path:
    return project.layout.model(name)


def read_model(project: Project, name: str) -> dict:
    path = model_dir(project, name) / RECORD
    if not path.is_file():
        known = ", ".join(list_models(project)) or "none"
        raise InputError(f"model {name!r}", f"not found in {project.root} (models: {known})")
    return read_json_object(path)


def list_models(project: Project) -> list[str]:
    folder = project.layout.models
    return sorted(p.name for p in folder.iterdir() if (p / RECORD).is_file()) if folder.is_dir() else []


def finished(project: Project, name: str) -> bool:
    """Whether model ``name`` exists and finished training."""
    return name in list_models(project) and read_model(project, name)["status"] == "done"


def write_model(project: Project, record: dict, event: str) -> None:
    """Store a model record under the project lock and log ``event``."""
    with project.lock(f"record model {record['name']}"):
        atomic.write_json(model_dir(project, record["name"]) / RECORD, record)
        project.log_event(event, model=record["name"], mode=record["mode"], status=record["status"])
