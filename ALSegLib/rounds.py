"""Rounds of the active-learning loop: ``rounds/<NNNN>/round.json``.

A round records its stages as they complete and, once selection has run, the
review queue: the proposed cases, best first, each with its score and the
reason it was picked. A queued case stays *pending* until a human label for it
is stored; pending cases are never proposed again.
"""
from __future__ import annotations

from pathlib import Path

from . import atomic
from .errors import InputError
from .project import Project, check_case_id, now_iso, read_json_object

ROUND_FILE = "round.json"
# a round's stages, in the order they run (ALSegLib.loop runs them; the reports list them)
STAGES = ("pseudolabels", "plan", "pretrain", "predict-pool", "select", "review", "train", "predict", "evaluate", "report")


def round_dir(project: Project, number: int) -> Path:
    return project.layout.round(number)


def list_rounds(project: Project) -> list[int]:
    folder = project.layout.rounds
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / ROUND_FILE).is_file())


def read_round(project: Project, number: int) -> dict:
    path = round_dir(project, number) / ROUND_FILE
    if not path.is_file():
        known = ", ".join(str(n) for n in list_rounds(project)) or "none"
        raise InputError(f"round {number}", f"not found in {project.root} (rounds: {known})")
    record = read_json_object(path)
    if record.get("round") != number or not isinstance(record.get("stages"), dict):
        raise InputError(path, "not a round record (needs 'round' equal to its folder number and 'stages')")
    for stage, done in record["stages"].items():
        if not isinstance(done, dict):
            raise InputError(path, f"stage {stage!r} must be an object, not {type(done).__name__}")
    for key in ("settings", "selection", "metrics", "model"):
        if key in record and not isinstance(record[key], (dict, type(None), str)):
            raise InputError(path, f"{key!r} must be an object, not {type(record[key]).__name__}")
    queue = record.get("queue", [])
    if not isinstance(queue, list):
        raise InputError(path, f"'queue' must be a list, not {type(queue).__name__}")
    for i, item in enumerate(queue):
        if not isinstance(item, dict) or not isinstance(item.get("case"), str):
            raise InputError(path, f"queue item {i} must be an object with a 'case' id")
        try:
            check_case_id(item["case"])
        except InputError as exc:
            raise InputError(path, f"queue item {i}: {exc}") from None
    return record


def write_round(project: Project, record: dict) -> None:
    """Store a round record; the caller holds the project lock."""
    project.require_lock()
    atomic.write_json(round_dir(project, record["round"]) / ROUND_FILE, record)


def new_round(number: int) -> dict:
    return {"round": number, "created": now_iso(), "stages": {}}


def queue_items(project: Project, rounds: list[int] | None = None) -> list[dict]:
    """Every queued case of ``rounds`` (default: all), with its status: ``pending`` until
    a human label exists, then ``labeled``."""
    labeled = set(project.labeled_cases("human"))
    out = []
    for number in rounds if rounds is not None else list_rounds(project):
        for item in read_round(project, number).get("queue", []):
            out.append({"round": number, **item, "status": "labeled" if item["case"] in labeled else "pending"})
    return out


def pending_cases(project: Project) -> set[str]:
    return {item["case"] for item in queue_items(project) if item["status"] == "pending"}
