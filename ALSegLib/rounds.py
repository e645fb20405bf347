"""Rounds of the active-learning loop: ``rounds/<NNNN>/round.json``.

A round records its stages as they complete and, once selection has run, the
review queue: the proposed cases, best first, each with its score and the
reason it was picked. A queued case stays *pending* until a human label for it
is stored; pending cases are never proposed again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import atomic
from .errors import InputError
from .progress import emit
from .project import Project
from .store.files import now_iso, read_json_object
from .store.ids import check_case_id

ROUND_FILE = "round.json"
# a round's stages, in the order they run (ALSegLib.loop runs them; the reports list them)
STAGES = ("pseudolabels", "plan", "bootstrap", "pretrain", "predict-pool", "select", "review", "train", "predict",
          "evaluate", "report")


def round_dir(project: Project, number: int) -> Path:
    return project.layout.round(number)


def list_rounds(project: Project) -> list[int]:
    folder = project.layout.rounds
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / ROUND_FILE).is_file())


def trust_dice_in_use(project: Project, default: float) -> float:
    """The trust threshold the project's last round was started with (``default`` without a round, or
    when that round took every pseudo-label whole): what ``alseg status`` and the panel show the table at."""
    numbers = list_rounds(project)
    value = read_round(project, numbers[-1]).get("settings", {}).get("trust_dice", default) if numbers else default
    return default if value is None else float(value)


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


class RoundRecord:
    """A round's record (``round.json``) read through names instead of key paths; ``data`` is the
    stored JSON object itself (what :func:`read_round` returns and ``run_round`` gives back)."""

    def __init__(self, data: dict):
        self.data = data

    @property
    def number(self) -> int:
        return self.data["round"]

    def stage(self, name: str) -> dict:
        """The stage's details once it has run (started, done, seconds, what it made), else ``{}``."""
        if name not in STAGES:
            raise KeyError(f"no stage {name!r} (stages: {', '.join(STAGES)})")
        return self.data["stages"].get(name, {})

    @property
    def stages_done(self) -> list[str]:
        return [s for s in STAGES if s in self.data["stages"]]

    @property
    def finished(self) -> bool:
        return "report" in self.data["stages"]

    @property
    def waiting(self) -> dict | None:
        """What the round waits for (the cases to review, a message), when it stopped at review."""
        return self.data.get("waiting")

    @property
    def queue(self) -> list[dict]:
        return self.data.get("queue", [])

    @property
    def queued_cases(self) -> list[str]:
        return [item["case"] for item in self.queue]

    @property
    def model(self) -> str | None:
        """The model the round trained (after its train stage)."""
        return self.data.get("model")

    @property
    def metrics(self) -> dict | None:
        """The round's model on the held-out cases (after evaluate)."""
        return self.data.get("metrics")

    @property
    def pretrained_metrics(self) -> dict | None:
        """The pseudo-label-only model on the held-out cases (the first round's pretrain stage)."""
        return self.stage("pretrain").get("metrics")

    @property
    def pseudo_label_quality(self) -> dict:
        """The stage that scored the pseudo-labels against the references where there are some (the
        experiment): ``bootstrap`` once it labeled the unprompted cases (every pseudo-label of the pool),
        else ``pseudolabels`` (the prompted ones); ``pseudo_label_dice``, ``pseudo_label_cases``."""
        boot = self.stage("bootstrap")
        return boot if boot.get("pseudo_label_dice") is not None else self.stage("pseudolabels")

    @property
    def pseudo_label_dice(self) -> float | None:
        return self.pseudo_label_quality.get("pseudo_label_dice")

    @property
    def report_files(self) -> dict:
        """The report's files, relative to the project (html, markdown, json, learning curve)."""
        return self.stage("report").get("files", {})


@dataclass
class Selection:
    """What a selection chose, before it is stored: its settings and figures (a round's
    ``selection``) and the review queue, best first (each item: case, score, reason, ...)."""

    details: dict
    queue: list[dict]

    @property
    def cases(self) -> list[str]:
        return [item["case"] for item in self.queue]


def store_selection(project: Project, selection: Selection, record: dict | None = None) -> dict:
    """Store ``selection`` as the review queue of ``record`` (a round being run), else of the
    project's open round, else of a new one; returns the round record. Refused if a chosen case
    was labeled or queued since it was chosen (another writer), with nothing written."""
    whole = {item["case"] for item in selection.queue if item.get("slices") is None}  # slice units: a labeled
    with project.lock("select cases"):                                                 # case may have free slices
        if set(project.labeled_cases("human")) & whole or pending_cases(project) & whole:
            raise InputError(str(project.root), "cases were labeled or queued while selecting; run the selection again")
        if record is None:
            existing = list_rounds(project)
            record = read_round(project, existing[-1]) if existing else None
            if record is None or "select" in record["stages"]:
                record = new_round(existing[-1] + 1 if existing else 1)
        record = {**record, "selection": selection.details, "queue": selection.queue,
                  "stages": {**record["stages"], "select": {"done": now_iso()}}}
        write_round(project, record)
        project.log_event("selected", round=record["round"], strategy=selection.details.get("strategy"),
                          cases=selection.cases)
    emit("selected", round=record["round"], cases=selection.cases)
    return record


def queue_items(project: Project, rounds: list[int] | None = None) -> list[dict]:
    """Every queued case (or slice unit: ``axis`` and ``slices`` in the item) of ``rounds``
    (default: all), with its status: ``pending`` until a human label covers it (for a case, any
    human version; for slices, a version annotated on all of them), then ``labeled``."""
    labeled = set(project.labeled_cases("human"))
    out = []
    for number in rounds if rounds is not None else list_rounds(project):
        for item in read_round(project, number).get("queue", []):
            out.append({"round": number, **item, "status": "pending" if item_pending(project, item, labeled) else "labeled"})
    return out


def item_pending(project: Project, item: dict, labeled: set[str] | None = None) -> bool:
    """Whether a queue item still waits for a human label (``labeled``: the cases with one, if known)."""
    labeled = set(project.labeled_cases("human")) if labeled is None else labeled
    return item["case"] not in labeled or (item.get("slices") is not None and not slices_annotated(project, item))


def slices_annotated(project: Project, item: dict) -> bool:
    """Whether the case's latest human version covers every slice of a slice unit."""
    mask = project.annotation_mask(item["case"])
    if mask is None:
        return True  # a whole-case version
    from .store.sparse import slice_coverage

    covered, _ = slice_coverage(mask, int(item.get("axis", 0)))
    return all(0 <= int(i) < covered.size and covered[int(i)] for i in item["slices"])


def pending_cases(project: Project) -> set[str]:
    """Cases with a queued case or slice unit still waiting for review."""
    return {item["case"] for item in queue_items(project) if item["status"] == "pending"}


def review_effort(project: Project, round_number: int | None = None) -> dict:
    """The reviewers' effort, from the provenance of the human labels accepted in Slicer or revealed
    by the oracle's simulated annotator (each records the Dice between the label it opened with and
    the accepted one, the voxels changed and those a label drawn from scratch takes; Slicer's also
    the seconds from open to accept): accepted n, accepted unchanged, mean proposal-to-accepted
    Dice, median seconds per case, voxels corrected / voxels drawn from scratch. Labels that edited
    an earlier human version again are left out
    (they measure no machine proposal). ``round_number``: only labels accepted for that round's queue."""
    entries = []
    for case in project.labeled_cases("human"):
        for version in project.human_versions(case):
            prov = project.provenance(case, "human", version, check_file=False)
            effort = prov.get("effort")
            if not isinstance(effort, dict):
                continue
            produced_by = prov.get("produced_by") or {}
            if round_number is not None and produced_by.get("round") != round_number:
                continue
            if str(produced_by.get("started_from") or "").startswith("human"):
                continue  # a human version edited again: not the machine's proposal's cost
            model = prov.get("model_agreement") or {}
            model_dices = [d for d in (model.get("dice") or {}).values() if isinstance(d, (int, float))]
            entries.append({"case": case, "version": version, "started_from": produced_by.get("started_from"),
                            "round": produced_by.get("round"), "model": model.get("model"),
                            "model_dice": round(sum(model_dices) / len(model_dices), 4) if model_dices else None,
                            **effort})
    return {**_effort_summary(entries), "round": round_number, "labels": entries}


def _effort_summary(entries: list[dict]) -> dict:
    """The sums and means of effort entries (:func:`review_effort`'s, or one round's of them)."""
    import statistics

    def mean(values):
        return round(statistics.fmean(values), 4) if values else None

    seconds = [e["seconds"] for e in entries if isinstance(e.get("seconds"), (int, float))]
    dices = [e["dice_to_proposal"] for e in entries if isinstance(e.get("dice_to_proposal"), (int, float))
             and not e.get("started_empty")]
    counted = [e for e in entries if isinstance(e.get("voxels_from_scratch"), int)]
    scratch = sum(e["voxels_from_scratch"] for e in counted)
    return {"accepted": len(entries), "unchanged": sum(1 for e in entries if e.get("unchanged")),
            "mean_dice_to_proposal": mean(dices),
            "mean_model_dice": mean([e["model_dice"] for e in entries if isinstance(e.get("model_dice"), (int, float))]),
            "median_seconds": round(statistics.median(seconds), 1) if seconds else None,
            "voxels_changed": sum(int(e.get("voxels_changed", 0)) for e in entries),
            # voxels corrected / voxels drawn from scratch, over the labels that record both
            "voxels_from_scratch": scratch,
            "corrected_fraction": round(sum(int(e["voxels_changed"]) for e in counted) / scratch, 4) if scratch else None}


# "when am I done": the model's predictions of the cases the reviewers labeled agree with what they
# accepted (mean Dice at least DONE_DICE) in DONE_ROUNDS consecutive rounds
DONE_DICE, DONE_ROUNDS = 0.95, 2


def review_curve(project: Project) -> dict:
    """How good the model is without reference labels, from what the reviewers accepted: per round,
    the Dice between the model's stored prediction of each case they labeled (the model that
    proposed the round's cases: ``model_agreement`` in the human label's provenance) and the label
    they accepted; beside it their corrections of the proposal they were shown (its pseudo-label or
    the prediction: labels accepted, accepted unchanged, mean Dice proposal -> accepted, voxels
    corrected / drawn from scratch; :func:`review_effort`). The plain rule: ``done`` once the model's
    mean Dice is at least ``DONE_DICE`` in ``DONE_ROUNDS`` consecutive rounds."""
    by_round: dict[int, list[dict]] = {}
    for entry in review_effort(project)["labels"]:
        if isinstance(entry.get("round"), int):
            by_round.setdefault(entry["round"], []).append(entry)
    rows = []
    for number in sorted(by_round):
        entries = by_round[number]
        summary = _effort_summary(entries)
        rows.append({"round": number, "model": next((e["model"] for e in entries if e.get("model")), None),
                     "predictions": sum(1 for e in entries if isinstance(e.get("model_dice"), (int, float))),
                     **{k: summary[k] for k in ("accepted", "unchanged", "mean_model_dice", "mean_dice_to_proposal",
                                                "corrected_fraction")}})
    last = rows[-DONE_ROUNDS:]
    consecutive = len(last) == DONE_ROUNDS and all(b["round"] == a["round"] + 1 for a, b in zip(last, last[1:]))
    done = consecutive and all(r["mean_model_dice"] is not None and r["mean_model_dice"] >= DONE_DICE for r in last)
    rule = (f"done when the model's predictions of the cases reviewed agree with the accepted labels at a mean Dice of "
            f"at least {DONE_DICE}, {DONE_ROUNDS} rounds running")
    if not rows:
        verdict = "no reviewed case yet"
    elif done:
        figures = ", ".join(format(r["mean_model_dice"], ".3f") for r in last)
        verdict = (f"done by the rule: rounds {', '.join(str(r['round']) for r in last)} model Dice {figures}; more labels "
                   "are unlikely to change much")
    else:
        latest = rows[-1]["mean_model_dice"]
        verdict = (f"not done: in round {rows[-1]['round']} the model's predictions agreed with the accepted labels at "
                   f"mean Dice {'n/a (no stored prediction)' if latest is None else f'{latest:.3f}'}")
    return {"rounds": rows, "done": done, "rule": rule, "verdict": verdict}


def effort_text(effort: dict) -> str:
    """``3 accepted: 1/3 unchanged, mean Dice to the proposal 0.912, median 42 s per case``."""
    if not effort["accepted"]:
        return "no label accepted in Slicer yet"
    parts = [f"{effort['unchanged']}/{effort['accepted']} accepted unchanged"]
    if effort["mean_dice_to_proposal"] is not None:
        parts.append(f"mean Dice proposal -> accepted {effort['mean_dice_to_proposal']:.3f}")
    if effort["median_seconds"] is not None:
        parts.append(f"median {effort['median_seconds']:.0f} s per case")
    if effort.get("corrected_fraction") is not None:
        parts.append(f"voxels corrected / drawn from scratch {effort['corrected_fraction']:.3f}")
    return ", ".join(parts)
