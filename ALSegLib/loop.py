"""One round of the active-learning loop, as ordered stages that resume where they stopped.

    pseudolabels → plan → bootstrap → pretrain → predict-pool → select → review → train → predict → evaluate → report

- **pseudolabels**: cases that may be trained on and have no pseudo-label get
  one from the round's pseudo-label source (SAM, imported labels, or for the
  oracle experiment only, degraded references) where it can make one (a prompt
  file's cases; every case for references); nothing to do if all have one.
- **plan**: nnU-Net plan + preprocess on the pseudo-labels (first time only).
- **bootstrap**: the cases nobody prompted get theirs from a first nnU-Net
  trained on the prompted cases' pseudo-labels (:mod:`.bootstrap`; first round
  only, before pretraining).
- **pretrain**: the ``pretrain`` model on pseudo-labels (first round only; later
  rounds reuse it).
- **predict-pool**: the current model (the last round's, else ``pretrain``)
  predicts the unlabeled pool with probabilities and bottleneck features.
- **select**: the strategy fills the round's review queue (``alseg select``).
- **review**: waits until every queued case has a human label. A person accepts
  them in Slicer (or ``alseg import-labels --kind human``); in the oracle experiment an annotator
  callback reveals references. Until then the round stops here and says so.
- **train**: ``finetune`` from the pretrained weights, or ``filtermatch``, on all
  human labels so far; the model is ``round<NNNN>-<mode>``. Fine-tuning also keeps
  the pseudo-labels of the cases not yet reviewed, drawn ``pseudo_share`` of the
  time (default half; 0 trains on the human labels alone). Round models train on
  every label (no validation split held out): the held-out cases score them.
- **predict** / **evaluate**: the held-out cases (the excluded ones with a
  reference label) are predicted and scored: Dice, IoU, HD95 per class.
- **report**: the round's page (markdown, HTML, JSON) and the project's
  learning curve (:mod:`.report`).

Each stage records its start, end and details in ``rounds/<NNNN>/round.json``
(written under the project lock) as soon as it completes; running the round
again skips the finished stages, so a killed round resumes at the first
unfinished one, and each stage is itself resumable (training from its last
checkpoint). One round runs at a time per project (``rounds/round.lock``).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from . import rounds
from .errors import InputError
from .nnunet.modes import MODES as TRAINING_MODES
from .progress import announce, emit
from .project import Project
from .settings import MODES, PSEUDO_SOURCES, PseudoSource, RoundSettings  # noqa: F401 (the loop's public names)
from .store.files import now_iso
from .store.locks import exclusive_run
from .store.models import finished

PRETRAIN = "pretrain"

Annotator = Callable[[Project, str, dict], None]  # (project, case, queue item with its round)


def model_name(number: int, mode: str) -> str:
    return f"round{number:04d}-{mode}"


def annotated_fraction(project: Project, exclude: Sequence[str]) -> tuple[int, int]:
    """(human-labeled cases, cases that could be labeled) outside ``exclude``."""
    held = set(exclude)
    total = [c for c in project.cases() if c not in held]
    labeled = set(project.labeled_cases("human")) - held
    return len(labeled), len(total)


def annotated_slices(project: Project, exclude: Sequence[str]) -> dict:
    """What the human labels outside ``exclude`` cover, counted as the protocol counts a budget:
    slices along each case's acquisition axis (a slice with any annotated voxel counts; a whole-case
    label counts all of its case's slices) and voxels, each of the total the cases hold."""
    import numpy as np

    from .store.sparse import case_slices, slice_coverage

    held = set(exclude)
    labeled = set(project.labeled_cases("human"))
    out = {"slices": 0, "slices_of": 0, "voxels": 0, "voxels_of": 0}
    for case in project.cases():
        if case in held:
            continue
        geometry = project.geometry(case)
        axis, n_slices = case_slices(geometry)
        n_voxels = int(np.prod(geometry.size))
        out["slices_of"] += n_slices
        out["voxels_of"] += n_voxels
        if case not in labeled:
            continue
        mask = project.annotation_mask(case)
        if mask is None:
            out["slices"] += n_slices
            out["voxels"] += n_voxels
        else:
            out["slices"] += int(np.count_nonzero(slice_coverage(mask, axis)[1]))
            out["voxels"] += int(np.count_nonzero(mask))
    out["slice_fraction"] = round(out["slices"] / out["slices_of"], 5) if out["slices_of"] else 0.0
    return out


def held_out_metrics(project: Project, model: str, cases: Sequence[str], exclude: Sequence[str]) -> dict:
    """Metrics of the stored ``predicted`` labels of ``cases`` (made by ``model``) and how much was
    annotated then (cases, and slices and voxels: :func:`annotated_slices`; the voxels the annotators
    corrected, against drawing those labels from scratch: :func:`.rounds.review_effort`): what a
    round, the experiment and the reports record."""
    from .evaluation import evaluate

    result = evaluate(project, "predicted", cases)
    done, total = annotated_fraction(project, exclude)
    effort = rounds.review_effort(project)  # every label so far: the curve's x as voxels corrected, too
    return {"model": model, "cases": list(cases), "summary": result["summary"],
            "foreground_dice": result["foreground_dice"], "annotated": done, "of": total,
            "fraction": round(done / total, 4) if total else 0.0, **annotated_slices(project, exclude),
            "voxels_corrected": effort["voxels_changed"], "voxels_from_scratch": effort["voxels_from_scratch"],
            "corrected_fraction": effort["corrected_fraction"]}


def score_held_out(project: Project, model: str, cases: Sequence[str], exclude: Sequence[str], device: str,
                   round_id: str | None = None, ray=None) -> dict:
    """Predict ``cases`` with ``model``, then :func:`held_out_metrics` of those predictions: how a round,
    the experiment's baselines and the demo's supervised-only row each score a model."""
    from .nnunet.predict import predict

    predict(project, model, cases, probabilities=False, features=False, device=device, round_id=round_id, ray=ray)
    return held_out_metrics(project, model, cases, exclude)


def current_round(project: Project) -> dict | None:
    """The last round if it has not finished (its report stage not done), else None."""
    numbers = rounds.list_rounds(project)
    if not numbers:
        return None
    record = rounds.read_round(project, numbers[-1])
    return None if "report" in record["stages"] else record


def _previous_model(project: Project, number: int) -> str:
    """The model of the latest finished earlier round, else the pretrained one."""
    for n in reversed([m for m in rounds.list_rounds(project) if m < number]):
        record = rounds.read_round(project, n)
        if "train" in record["stages"] and record.get("model"):
            return record["model"]
    return PRETRAIN


class Round:
    """Runs the stages of one round over a project."""

    def __init__(self, project: Project, record: dict, settings: RoundSettings, annotator: Annotator | None,
                 ray=None, num_gpus: int = 1):
        self.project, self.record, self.settings, self.annotator = project, record, settings, annotator
        self.ray = ray  # a cluster.RaySpec: the round's predictions on Ray workers (not a setting: same results)
        self.num_gpus = num_gpus  # the round's trainings on this many GPUs of this node (nnU-Net's multi-GPU training)
        self.number = record["round"]

    # bookkeeping --------------------------------------------------------------------------

    def _save(self) -> None:
        with self.project.lock("record round"):
            rounds.write_round(self.project, self.record)

    def _run(self, stage: str, fn: Callable[[], dict | None]) -> bool:
        """Run one stage unless done; False when the round has to stop here (waiting)."""
        if stage in self.record["stages"]:
            return True
        emit("stage", stage=stage, round=self.number)
        started, t = now_iso(), time.perf_counter()
        details = fn()
        if details is not None and details.get("waiting"):
            self.record["waiting"] = details
            self._save()
            emit("round-waiting", round=self.number, stage=stage, **{k: v for k, v in details.items() if k != "waiting"})
            return False
        self.record.pop("waiting", None)
        self.record["stages"][stage] = {"started": started, "done": now_iso(),
                                        "seconds": round(time.perf_counter() - t, 2), **(details or {})}
        self._save()
        with self.project.lock("log round stage"):
            self.project.log_event("round_stage_done", round=self.number, stage=stage)
        emit("stage-done", stage=stage, round=self.number)
        return True

    def steps(self) -> list[tuple[str, Callable[[], dict | None]]]:
        """The stages in order, each the method named after it (``rounds.STAGES`` is the one list)."""
        return [(stage, getattr(self, stage.replace("-", "_"))) for stage in rounds.STAGES]

    def run(self) -> dict:
        if not self.record.get("stages", {}).get("train"):
            self._announce_estimate()
        for stage, fn in self.steps():
            if not self._run(stage, fn):
                break
        return self.record

    def _announce_estimate(self) -> None:
        """The round's compute before it starts: its trainings (fitted to --minutes, or from the time
        probe an earlier training of these plans measured) and its predictions (tiles x a measured
        tile); what nothing has measured yet is said to be so."""
        from .bootstrap import MODEL as BOOTSTRAP
        from .bootstrap import unlabeled
        from .nnunet.forecast import round_estimate

        trainings = [m for m in (PRETRAIN, model_name(self.number, self.settings.mode)) if not finished(self.project, m)]
        # the pool's prediction, and the held-out cases scored by each model the round trains
        cases = self.pool() + self.evaluation_cases() * max(1, len(trainings))
        try:
            without = unlabeled(self.project, self.trainable())
            covered = source_cases(self.project, self.settings.pseudo, without) if self.settings.pseudo else []
            unprompted = [c for c in without if c not in set(covered)]
            if unprompted and self.settings.bootstrap != "off" and not finished(self.project, PRETRAIN):
                cases += unprompted  # the bootstrap model predicts them (its training counted as a pretraining)
                if not finished(self.project, BOOTSTRAP):
                    trainings.insert(0, BOOTSTRAP)
            seconds, text = round_estimate(self.project, self.settings, trainings, cases, len(covered))
        except Exception as exc:  # noqa: BLE001 - a forecast must never stop the round it forecasts
            announce("warning", f"warning: round {self.number}: no estimate ({type(exc).__name__}: {exc})",
                     job="round", round=self.number)
            return
        announce("estimate", f"estimate: round {self.number}: {text}", job="round", round=self.number,
                 estimated_s=None if seconds is None else round(seconds, 1))

    # what the stages work on --------------------------------------------------------------

    def trainable(self) -> list[str]:
        held = set(self.settings.exclude)
        return [c for c in self.project.cases() if c not in held]

    def evaluation_cases(self) -> list[str]:
        refs = set(self.project.labeled_cases("reference"))
        return [c for c in self.settings.exclude if c in refs]

    def pool(self) -> list[str]:
        """The cases selection may propose from: without a human label and not waiting for review;
        for slice units, every case not labeled whole (its free slices are the candidates)."""
        if self.settings.unit == "slice":
            whole = {c for c in self.project.labeled_cases("human") if self.project.annotation_mask(c) is None}
            return [c for c in self.trainable() if c not in whole]
        taken = set(self.project.labeled_cases("human")) | rounds.pending_cases(self.project)
        return [c for c in self.trainable() if c not in taken]

    # stages ---------------------------------------------------------------------------------

    def pseudolabels(self) -> dict:
        have = set(self.project.labeled_cases("pseudo"))
        missing = [c for c in self.trainable() if c not in have]
        made = 0
        covered = source_cases(self.project, self.settings.pseudo, missing) if self.settings.pseudo is not None else []
        if covered:
            made = len(make_pseudolabels(self.project, covered, self.settings.pseudo, device=self.settings.device))
        elif missing and not have:
            raise InputError(self.project.root, "no case has a pseudo-label to pretrain on; give the round a "
                             "pseudo-label source (SAM checkpoint and prompts for some cases, or another model's "
                             "labels), or make them first with 'alseg pseudolabel'")
        out: dict = {"made": made, "without": len(missing) - made}
        out.update(self._pseudo_dice())
        return out

    def _pseudo_dice(self, bootstrapped: Sequence[str] = ()) -> dict:
        """The pseudo-labels' own quality, where references exist (the experiment); the ``bootstrapped``
        cases' alone too, from the same per-case figures."""
        refs = set(self.project.labeled_cases("reference")) & set(self.project.labeled_cases("pseudo"))
        scored = [c for c in self.trainable() if c in refs]
        if not scored:
            return {}
        from .evaluation import evaluate
        from .metrics import summarize

        result = evaluate(self.project, "pseudo", scored)
        out = {"pseudo_label_dice": result["summary"]["mean"]["dice"]["mean"], "pseudo_label_cases": len(scored)}
        boot = {c: m for c, m in result["per_case"].items() if c in set(bootstrapped)}
        if boot:
            out["bootstrapped_dice"] = summarize(boot)["mean"]["dice"]["mean"]
        return out

    def bootstrap(self) -> dict:
        from .bootstrap import bootstrap, unlabeled

        if finished(self.project, PRETRAIN):  # pretrained already: the pseudo-labels it learned are the round's
            return {"skipped": "pretrained already"}
        out = bootstrap(self.project, self.settings, self.trainable(), round_id=f"{self.number:04d}", ray=self.ray,
                        num_gpus=self.num_gpus)
        if out.get("bootstrapped"):
            out.update(self._pseudo_dice(out["cases"]))
        out["without"] = len(unlabeled(self.project, self.trainable()))
        return out

    def plan(self) -> dict:
        from .nnunet.plan import plan, project_plans

        existing = project_plans(self.project)
        if existing is not None:
            return {"reused": existing["dataset"]}
        record = plan(self.project, policy="pseudo", configurations=(self.settings.configuration or "3d_fullres",),
                      batch_size=self.settings.batch_size, preprocess_dataset=False, device=self.settings.device)
        return {"dataset": record["dataset"], "configurations": record["configurations"]}

    def pretrain(self) -> dict:
        from .nnunet.train import train

        if finished(self.project, PRETRAIN):
            return {"model": PRETRAIN, "reused": True}
        s = self.settings
        rec = train(self.project, "pretrain", name=PRETRAIN, epochs=s.pretrain_epochs, iterations=s.pretrain_iterations,
                    val_iterations=s.val_iterations, device=s.device, validate=False, exclude_cases=s.exclude, seed=s.seed,
                    minutes=s.minutes, num_gpus=self.num_gpus, trust_dice=s.trust_dice)
        out = {"model": PRETRAIN, "seconds_training": rec["seconds"], "epochs": rec["epochs_done"]}
        partial = rec.get("partial_labels") or {}
        if partial.get("trust"):  # what pretraining took from the pseudo-labels (before any human label: the priors)
            out.update(trust=partial["trust"], partial_cases=len(partial.get("unknown", {})))
        metrics = self._score(PRETRAIN)  # the pseudo-only model: the curve's starting point
        if metrics:
            out["metrics"] = metrics
        return out

    def _score(self, model: str) -> dict | None:
        """Predict and evaluate the held-out cases with ``model`` (None without any)."""
        cases = self.evaluation_cases()
        if not cases:
            return None
        return score_held_out(self.project, model, cases, self.settings.exclude, self.settings.device, f"{self.number:04d}",
                              ray=self.ray)

    def predict_pool(self) -> dict:
        from .nnunet.predict import predict

        model = _previous_model(self.project, self.number)
        pool = self.pool()
        out = predict(self.project, model, pool, probabilities=True, features=True, device=self.settings.device,
                      round_id=f"{self.number:04d}", reuse=True, ray=self.ray) if pool else []
        return {"model": model, "cases": len(pool), "reused": sum(1 for o in out if o.get("reused"))}

    def select(self) -> dict:
        from .selection.run import choose_cases

        s = self.settings
        model = self.record["stages"]["predict-pool"]["model"]
        if s.unit == "slice":
            return self._select_slices(model)
        selection = choose_cases(self.project, s.budget, s.strategy, seed=s.seed + self.number, model=model,
                                 features=s.features, exclude=s.exclude)
        self.record = rounds.store_selection(self.project, selection, self.record)
        return {"cases": selection.cases}

    def _select_slices(self, model: str) -> dict:
        """Slice units of the pool (:mod:`.selection.slices`) as the review queue."""
        from .selection.slices import score_units, select_slices

        s = self.settings
        scored = score_units(self.project, model, self.pool(), slab=s.slab)
        names = {c.value: c.name for c in self.project.labels.classes}
        picks = select_slices(scored, s.budget, s.strategy, seed=s.seed + self.number, labels=names)
        queue = [{"rank": i, **pick} for i, pick in enumerate(picks, 1)]
        details = {"unit": "slice", "strategy": s.strategy, "budget": s.budget, "slab": s.slab, "model": model,
                   "seed": s.seed + self.number, "free_slices": len(scored.units) * s.slab,
                   "slices": sum(len(p["slices"]) for p in picks)}
        self.record = rounds.store_selection(self.project, rounds.Selection(details, queue), self.record)
        return {"cases": sorted({p["case"] for p in picks}), "units": len(picks), "slices": details["slices"]}

    def review(self) -> dict:
        def pending() -> list[dict]:
            labeled = set(self.project.labeled_cases("human"))
            return [q for q in self.record.get("queue", []) if rounds.item_pending(self.project, q, labeled)]

        items = pending()
        if items and self.annotator is not None:
            for item in items:  # the queue item: which slices (a slice unit), what the panel opens it with, the round
                self.annotator(self.project, item["case"], {**item, "round": self.number})
            items = pending()
        waiting = list(dict.fromkeys(q["case"] for q in items))
        if waiting:
            return {"waiting": True, "cases": waiting,
                    "message": f"{len(waiting)} case(s) wait for review: {', '.join(waiting)}. Accept their labels "
                               "(Slicer's ALSeg module, or 'alseg import-labels PROJECT DIR --kind human'), "
                               "then run the round again."}
        done, total = annotated_fraction(self.project, self.settings.exclude)
        return {"labeled": done, "of": total, "fraction": round(done / total, 4) if total else 0.0}

    def train(self) -> dict:
        from .nnunet.train import train

        s = self.settings
        name = model_name(self.number, s.mode)
        config = s.filtermatch if s.mode == "filtermatch" else None
        start = PRETRAIN if s.finetune_from == "pretrain" else _previous_model(self.project, self.number)
        rec = train(self.project, s.mode, name=name, epochs=s.epochs, iterations=s.iterations, learning_rate=s.learning_rate,
                    val_iterations=s.val_iterations, device=s.device, init_from=start, validate=False,
                    filtermatch=config, exclude_cases=s.exclude, seed=s.seed + self.number,
                    pseudo_share=s.pseudo_share if TRAINING_MODES[s.mode].mixes_pseudo else 0.0, minutes=s.minutes,
                    sparse_fill=s.sparse_fill, num_gpus=self.num_gpus, trust_dice=s.trust_dice)
        self.record["model"] = name
        human = rec.get("human_cases", rec["labeled_cases"])
        partial = rec.get("partial_labels") or {}
        return {"model": name, "mode": s.mode, "init_from": start, "labeled_cases": human, "training_cases": rec["labeled_cases"],
                "pseudo_share": rec.get("pseudo_share", 0.0), "seconds_training": rec["seconds"],
                **({"trust": partial["trust"], "partial_cases": len(partial.get("unknown", {}))}
                   if partial.get("trust") else {})}

    def predict(self) -> dict:
        from .nnunet.predict import predict

        cases = self.evaluation_cases()
        if cases:
            predict(self.project, self.record["model"], cases, probabilities=False, features=False,
                    device=self.settings.device, round_id=f"{self.number:04d}", ray=self.ray)
        return {"cases": len(cases)}

    def evaluate(self) -> dict:
        cases = self.evaluation_cases()
        if not cases:
            return {"skipped": "no held-out case with a reference label (exclude cases that have one to score rounds)"}
        self.record["metrics"] = held_out_metrics(self.project, self.record["model"], cases, self.settings.exclude)
        return {"mean_dice": self.record["metrics"]["summary"]["mean"]["dice"]["mean"]}

    def report(self) -> dict:
        from .report import write_round_report

        return {"files": write_round_report(self.project, self.record)}


BEFORE_SELECTION = rounds.STAGES[: rounds.STAGES.index("select")]


def prepare(project: Project, settings: RoundSettings) -> dict:
    """The stages a first round runs before selection (pseudo-labels, plans, pretraining and its
    held-out score, the pool's prediction), without a round record: the oracle experiment's shared
    base, which each arm's first round then finds done. Returns each stage's details."""
    start = Round(project, rounds.new_round(1), settings, None)
    return {stage: fn() for stage, fn in start.steps() if stage in BEFORE_SELECTION}


def source_cases(project: Project, spec: PseudoSource | Mapping, cases: Sequence[str]) -> list[str]:
    """Of ``cases``, those the source can make a pseudo-label for: a prompt file's cases, a label folder's
    (``--from-labels``, import), every case with a reference (simulated prompts outside the source's
    ``exclude``, degraded references), every case (``--auto``). The others are the round's to bootstrap."""
    from .store.ids import label_index

    spec = PseudoSource.from_json(spec)
    held = set(spec.exclude)
    folder = spec.from_dir if spec.source == "import" else spec.from_labels
    if folder is not None and not Path(folder).is_dir():
        raise InputError(folder, "folder of label files not found")
    if spec.source == "import":
        index = label_index(Path(spec.from_dir))
        return [c for c in cases if c in index]
    if spec.source == "degraded-reference" or spec.prompts_from_reference is not None:
        refs = set(project.labeled_cases("reference"))
        return [c for c in cases if c in refs and c not in held]
    if spec.prompts is not None:
        from .pseudolabels.prompts import read_prompt_file

        pf = read_prompt_file(spec.prompts, list(project.labels.mapping), project.cases())
        return [c for c in cases if pf.cases.get(c) and c not in held]
    if spec.from_labels is not None:
        index = label_index(Path(spec.from_labels))
        return [c for c in cases if c in index and c not in held]
    return [c for c in cases if c not in held]  # automatic prompts: every case


def make_pseudolabels(project: Project, cases: Sequence[str], spec: PseudoSource | Mapping,
                      device: str | None = None) -> list[dict]:
    """Pseudo-labels for ``cases`` from the source ``spec`` names (a mapping is read as a :class:`PseudoSource`).
    ``device``: the round's, for a foundation model whose source names none (one device rule for
    every stage: ``auto`` is the GPU when there is one, for LiteMedSAM as for nnU-Net)."""
    spec = PseudoSource.from_json(spec)
    options = spec.options()
    if spec.source == "sam" and spec.device is None and device is not None:
        options["device"] = device
    if spec.source == "degraded-reference":
        from .pseudolabels.degraded import pseudolabel_degraded

        return pseudolabel_degraded(project, cases, **options)
    if spec.source == "import":
        from .pseudolabels.imported import import_pseudolabels

        return import_pseudolabels(project, options.pop("from_dir"), options.pop("map", None), cases=cases, **options)
    from .pseudolabels.run import pseudolabel_with_sam

    # no 'checkpoint': the built-in LiteMedSAM
    return pseudolabel_with_sam(project, options.pop("checkpoint", None), cases=cases, **options)


def _check_gpus(settings: RoundSettings, num_gpus: int) -> None:
    """The round's trainings on ``num_gpus`` GPUs: possible here, or a clear error before they start."""
    if num_gpus == 1:
        return
    from .devices import resolve_device
    from .nnunet.train import check_num_gpus

    check_num_gpus(num_gpus, resolve_device(settings.device), settings.minutes, settings.batch_size, settings.mode)


def run_round(project: Project, settings: RoundSettings | None = None, *, annotator: Annotator | None = None,
              ray=None, num_gpus: int = 1, **options) -> dict:
    """Run (or continue) the project's current round; returns its record.

    An unfinished round continues with its stored settings (``settings``, if
    given, must equal them); otherwise a new round starts with ``settings``
    (default :class:`RoundSettings`), given as one or as its fields in keywords
    (``budget="5%", strategy="hybrid", mode="finetune", exclude=[...]``).
    ``annotator(project, case, item)`` stores a human label for a queued case (the
    oracle experiment); without it the round stops at review: the record then has
    ``waiting``. ``ray``: a :class:`.cluster.RaySpec` to run the round's predictions (the pool's,
    the held-out cases') on Ray workers; the results and the record are those of a run without it.
    ``num_gpus``: the round's trainings on this many GPUs of this node (nnU-Net's multi-GPU training).
    """
    if settings is not None and options:
        raise TypeError("give either a RoundSettings or its fields as keywords, not both")
    if options:
        settings = RoundSettings(**options)
    if settings is not None and current_round(project) is None:
        _check(project, settings)  # refused before anything is written, the lock file included
    if settings is not None:
        _check_gpus(settings, num_gpus)
    with exclusive_run(project.layout.round_lock, "a round of this project is running already"):
        record = current_round(project)
        if record is not None and "settings" in record:
            stored = RoundSettings.from_json(record["settings"], str(rounds.round_dir(project, record["round"])))
            if settings is not None and settings.to_json() != stored.to_json():
                changed = sorted(k for k, v in settings.to_json().items() if stored.to_json()[k] != v)
                raise InputError(f"round {record['round']}", f"is unfinished and was started with other settings "
                                 f"({', '.join(changed)}); run it again without new settings to finish it")
            settings = stored
            _check_gpus(settings, num_gpus)  # a continued round: its stored settings
        else:
            settings = settings or RoundSettings()
            _check(project, settings)
            _check_gpus(settings, num_gpus)
            with project.lock("start round"):
                if record is None:  # a round left by 'alseg select' alone is taken over
                    numbers = rounds.list_rounds(project)
                    record = rounds.new_round(numbers[-1] + 1 if numbers else 1)
                record["settings"] = settings.to_json()
                rounds.write_round(project, record)
                project.log_event("round_started", round=record["round"], strategy=settings.strategy, mode=settings.mode)
        return Round(project, record, settings, annotator, ray, num_gpus).run()


def _check(project: Project, settings: RoundSettings) -> None:
    """Refuse settings that cannot work before anything is written."""
    from .selection.strategies import make_strategy, parse_budget

    if not project.cases():
        raise InputError(project.root, "the project has no cases; add images first ('alseg add')")
    for case in settings.exclude:
        if not project.has_case(case):
            raise InputError(f"--exclude {case}", f"not a case of {project.root}")
    held = set(settings.exclude)
    if settings.pseudo is None and not (set(project.labeled_cases("pseudo")) - held):
        if not finished(project, PRETRAIN):
            raise InputError(project.root, "no case has a pseudo-label to pretrain on; give the round a pseudo-label "
                             "source (SAM checkpoint and prompts, or another model's labels), or make them first "
                             "with 'alseg pseudolabel'")
    try:
        if settings.unit == "case":  # slice strategies: checked by RoundSettings
            make_strategy(settings.strategy)
        parse_budget(settings.budget, len(project.cases()))
    except ValueError as exc:
        raise InputError("round settings", str(exc)) from None
