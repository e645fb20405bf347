"""The oracle experiment: reference labels play the annotator.

Starting from a project whose cases all have reference labels, a fixed set of
held-out test cases is excluded from everything (never pseudo-labeled for
training, never selectable, never trained on) and only scored. For each seed:

1. **base**: pseudo-labels for the pool (a SAM checkpoint, another model's
   labels, or ``degraded-reference``: references corrupted to a target Dice,
   named as simulated everywhere), nnU-Net planning, pretraining on them, and
   the pretrained model's pool prediction (shared by every arm's first round).
2. **arms**, each on its own copy of the base:

   - ``pseudo-only``: the pretrained model, no human label (fraction 0);
   - ``<strategy>+<mode>`` (``random``/``hybrid`` × ``finetune``/``filtermatch``):
     ``rounds`` rounds of :func:`..loop.run_round`; at review the annotator
     reveals each selected case's reference as its human label (source
     ``simulated``, so the provenance says so) and refuses a test case;
   - ``supervised-only``: after each round of the first hybrid arm, a model
     trained from scratch on exactly that arm's labeled cases;
   - ``full supervision``: every pool case's reference (the upper bound).

   Same compute per arm: an ALSeg arm's model at any round has had the
   pretraining's steps plus one round's training (each round fine-tunes from
   the pretrained weights); the from-scratch baselines (supervised-only, full
   supervision) get that many steps too (:func:`baseline_budget`), so the
   upper bound is not under-trained next to the arms it bounds.
3. **results**: per arm the mean over seeds of Dice (per class and mean) at each
   % annotated, and its ratio to full supervision; a sweep over pseudo-label
   quality (final Dice vs pseudo-label Dice) when asked for.
"""
from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import rounds
from .agreement import edit_effort
from .errors import InputError
from .loop import prepare, run_round, score_held_out
from .nnunet.modes import MODES as TRAINING_MODES
from .progress import emit
from .project import Project
from .report import aubc, common_budget, curve_point
from .settings import SLICE_STRATEGIES, PseudoSource, RoundSettings
from .store.files import now_iso

SELECTIONS = ("random", "hybrid")
TRAININGS = ("finetune", "filtermatch")
BASELINES = ("pseudo-only", "supervised-only", "full supervision")
SLICE_PREFIX = "slice-"  # slice-random-fg+finetune: slice units, strategy random-fg, fine-tuning


def alseg_arms(selections: Sequence[str] = SELECTIONS, trainings: Sequence[str] = TRAININGS) -> list[str]:
    return [f"{s}+{t}" for s in selections for t in trainings]


def slice_arms(selections: Sequence[str] = SLICE_STRATEGIES, trainings: Sequence[str] = ("finetune",)) -> list[str]:
    """Arms that query slices (:mod:`.selection.slices`), named ``slice-<strategy>+<mode>``."""
    return [f"{SLICE_PREFIX}{s}+{t}" for s in selections for t in trainings]


def arm_parts(arm: str) -> tuple[str, str, str]:
    """(unit, strategy, mode) of an ALSeg arm's name."""
    selection, mode = arm.split("+")
    if selection.startswith(SLICE_PREFIX):
        return "slice", selection[len(SLICE_PREFIX):], mode
    return "case", selection, mode


def experiment_round() -> RoundSettings:
    """The rounds' settings of the experiment unless told otherwise: 2.5 % of the pool a round,
    nnU-Net 3d_fullres, pseudo-labels simulated from the references (target Dice 0.75)."""
    return RoundSettings(budget="2.5%", configuration="3d_fullres",
                         pseudo=PseudoSource("degraded-reference", target_dice=0.75))


@dataclass
class ExperimentSettings:
    """The oracle experiment: its arms, seeds and held-out split, and ``round``, the settings every
    arm's rounds share (budget per round, pseudo-label source, training budget, device, FilterMatch,
    pseudo-label share); each arm sets its own strategy, mode and seed on a copy of it."""

    rounds: int = 2
    seeds: list[int] = field(default_factory=lambda: [0])
    test: list[str] | None = None  # held-out cases; default: test_fraction of the cases, drawn with split_seed
    test_fraction: float = 0.2
    split_seed: int = 0
    arms: list[str] = field(default_factory=lambda: [*alseg_arms(), *BASELINES])
    sweep: list[float] | None = None  # pseudo-label target Dice values: final Dice of the best arm for each
    round: RoundSettings = field(default_factory=experiment_round)
    # slice arms' budget per round (slices, or a % of the pool's slices); default: as many slices as the
    # round's case budget holds on average (the pool's mean slices per case along the acquisition axis)
    slice_budget: str | None = None

    def __post_init__(self):
        known = set(alseg_arms()) | set(slice_arms(trainings=TRAININGS)) | set(BASELINES)
        bad = [a for a in self.arms if a not in known]
        if bad:
            raise InputError("--arms", f"unknown arm(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        if self.rounds < 1:
            raise InputError("--rounds", f"must be at least 1, not {self.rounds}")
        if not self.seeds:
            raise InputError("--seeds", "give at least one seed")
        if not 0 < self.test_fraction < 1:
            raise InputError("--test-fraction", f"must be in (0, 1), not {self.test_fraction}")
        if self.round.pseudo is None:
            raise InputError("pseudo-label source", "the experiment needs one (its pool has no pseudo-labels yet)")
        if self.sweep and self.round.pseudo.source != "degraded-reference":
            raise InputError("--sweep", "the pseudo-label quality sweep needs the degraded-reference source")

    def to_json(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self) if f.name != "round"},
                "round": self.round.to_json()}


class SimulatedAnnotator:
    """Reveals a case's reference as its human label (``simulated``); never a test case. Like a
    reviewer's accept in Slicer, the stored version records the effort: the voxels changed to turn
    the proposal the panel would open (the queue item's ``open_with``, else the pseudo-label, else
    the prediction; an earlier human version first) into the reference, against drawing it from
    scratch (:func:`..metrics.edit_effort`; no seconds: nobody spent any). ``from_scratch``: the
    from-scratch baselines' annotator (supervised-only, full supervision), whose human is shown no
    proposal: every labeled voxel drawn (corrected fraction 1); the pseudo-label's agreement is
    still recorded for the trust table."""

    def __init__(self, test: Sequence[str], from_scratch: bool = False):
        self.test = set(test)
        self.from_scratch = from_scratch
        self.revealed: list[str] = []

    def __call__(self, project: Project, case: str, item: dict | None = None) -> None:
        """Reveal the case's reference; for a slice unit (``item`` with ``axis`` and ``slices``) on
        those slices only, merged into the case's earlier sparse labels."""
        if case in self.test:
            raise RuntimeError(f"the simulated annotator was asked to reveal held-out test case {case!r}")
        reference = project.read_label(case, "reference")
        item = item or {}
        sliced = item.get("slices") is not None  # new slices: their proposal is the machine label, not an earlier
        started_from, proposal = proposal_shown(project, case, item.get("open_with"), machine_only=sliced)  # sparse version
        # read once, for the trust and model-agreement records too
        held = {"pseudo": proposal if started_from == "pseudo" else None,
                "predicted": proposal if started_from == "predicted" else None}
        if self.from_scratch:
            started_from, proposal = None, None
        produced_by = {"simulated": True, "from": "reference", "started_from": started_from,
                       **({"round": item["round"]} if item.get("round") is not None else {})}
        accepted = sitk.GetArrayViewFromImage(reference)
        if sliced:
            from .store.sparse import SliceSet

            index = [slice(None)] * 3
            index[int(item.get("axis", 0))] = list(item["slices"])
            effort = edit_effort(None if proposal is None else proposal[tuple(index)], accepted[tuple(index)],
                                 project.labels.values)
            project.add_human_slices(case, reference, SliceSet.of(int(item.get("axis", 0)), item["slices"]),
                                     source="simulated", produced_by={**produced_by, "slices": list(item["slices"])},
                                     effort=effort, **held)
        else:
            project.add_human_label(case, reference, source="simulated", produced_by=produced_by,
                                    effort=edit_effort(proposal, accepted, project.labels.values), **held)
        self.revealed.append(case)


def proposal_shown(project: Project, case: str, open_with: str | None = None,
                   machine_only: bool = False) -> tuple[str | None, np.ndarray | None]:
    """The label the Slicer panel opens a queued case with (``ALSegSlicer.review``'s order): the latest
    human version (unless ``machine_only``), else ``open_with``, else the pseudo-label, else the
    prediction; (None, None) if none."""
    versions = project.human_versions(case)
    if versions and not machine_only:
        return f"human v{versions[-1]:04d}", sitk.GetArrayFromImage(project.read_label(case, "human"))
    for kind in dict.fromkeys(k for k in (open_with, "pseudo", "predicted") if k and k != "human"):
        if project.label_path(case, kind) is not None:
            return kind, sitk.GetArrayFromImage(project.read_label(case, kind))
    return None, None


def split_test(project: Project, settings: ExperimentSettings) -> list[str]:
    cases = project.cases()
    if settings.test is not None:
        for c in settings.test:
            if not project.has_case(c):
                raise InputError(f"--test {c}", f"not a case of {project.root}")
        return sorted(set(settings.test))
    n = max(1, round(settings.test_fraction * len(cases)))
    return sorted(random.Random(settings.split_seed).sample(cases, n))


def slices_per_round(source: Project, settings: ExperimentSettings, test: Sequence[str]) -> int:
    """The slice arms' budget per round: ``slice_budget`` if given, else the round's case budget times
    the pool's mean number of slices per case along each case's acquisition axis (rounded), so that
    every arm annotates about as many slices."""
    from .selection.strategies import parse_budget
    from .store.sparse import case_slices

    held = set(test) | set(settings.round.exclude)
    counts = [case_slices(source.geometry(c))[1] for c in source.cases() if c not in held]
    if settings.slice_budget is not None:
        return parse_budget(settings.slice_budget, sum(counts))
    return max(1, round(_per_round(settings.round.budget, len(counts)) * float(np.mean(counts))))


def _round_settings(settings: ExperimentSettings, arm: str, test: list[str], seed: int,
                    slices: int | None = None) -> RoundSettings:
    r = settings.round
    unit, strategy, mode = arm_parts(arm)
    per_unit = {"unit": "slice", "budget": str(slices)} if unit == "slice" else {"unit": "case"}
    return r.with_changes(**per_unit, strategy=strategy, mode=mode, seed=seed, exclude=sorted(set(r.exclude) | set(test)),
                          filtermatch=r.filtermatch if mode == "filtermatch" else None,
                          pseudo_share=r.pseudo_share if TRAINING_MODES[mode].mixes_pseudo else 0.0)


def baseline_budget(settings: ExperimentSettings) -> tuple[int, int]:
    """(epochs, iterations) for a from-scratch baseline: as many optimizer steps as an ALSeg
    arm's model has had (pretraining + one round's training), in the rounds' iterations per epoch."""
    from .nnunet.env import resolve_device
    from .nnunet.train import default_budget

    r = settings.round
    d_epochs, d_iters = default_budget(resolve_device(r.device))
    steps = ((r.pretrain_epochs or d_epochs) * (r.pretrain_iterations or d_iters)
             + (r.epochs or d_epochs) * (r.iterations or d_iters))
    iterations = r.iterations or d_iters
    return math.ceil(steps / iterations), iterations


def baseline_minutes(r: RoundSettings) -> float | None:
    """With ``minutes`` (and the epochs not all given), a from-scratch baseline gets the time an arm's
    model had (pretraining + one round's training), not a step count nobody knows beforehand."""
    if r.minutes is None or (r.epochs is not None and r.pretrain_epochs is not None):
        return None
    return 2 * r.minutes


def _train_supervised(project: Project, name: str, settings: ExperimentSettings, test: list[str],
                      seed: int | None = None) -> dict:
    """A from-scratch baseline's model (seeded as the arms' trainings are: the same run gives the same model)."""
    from .nnunet.train import train

    epochs, iterations = baseline_budget(settings)
    minutes = baseline_minutes(settings.round)
    if minutes is not None:
        epochs = None  # the same time as the arm's model had, the epochs fitted to it
    train(project, "supervised", name=name, epochs=epochs, iterations=iterations, minutes=minutes,
          val_iterations=settings.round.val_iterations, device=settings.round.device, validate=False, exclude_cases=test,
          seed=seed)
    return score_held_out(project, name, test, test, settings.round.device)


def make_base(source: Project, folder: Path, settings: ExperimentSettings, test: list[str], seed: int,
              pseudo: PseudoSource | None = None) -> tuple[Project, float | None, dict | None]:
    """The seed's shared start: a copy of ``source`` through the stages a first round runs before
    selection (:func:`..loop.prepare`: pseudo-labels, plans, pretraining, the pool's prediction).
    Returns the base, the pseudo-labels' Dice and the pretrained model's held-out metrics."""
    base = source.copy_to(folder, cache=True)
    spec = pseudo or settings.round.pseudo
    if spec.source == "degraded-reference" and spec.seed is None:
        spec = spec.with_options(seed=seed)
    if spec.source == "sam":
        spec = spec.with_options(exclude=(*spec.exclude, *test))  # held-out cases never get prompts
    done = prepare(base, settings.round.with_changes(exclude=sorted(set(settings.round.exclude) | set(test)), seed=seed,
                                                     pseudo=spec))
    pdice = rounds.RoundRecord({"round": 1, "stages": done}).pseudo_label_dice
    return base, pdice, done["pretrain"].get("metrics")


def _alseg_arm(base: Project, folder: Path, arm: str, settings: ExperimentSettings, test: list[str],
               seed: int, slices: int | None = None) -> tuple[list[dict], list[list[str]]]:
    project = base.copy_to(folder)
    annotator = SimulatedAnnotator(test)
    points, labeled_after = [], []
    for _ in range(settings.rounds):
        record = rounds.RoundRecord(run_round(project, _round_settings(settings, arm, test, seed, slices),
                                              annotator=annotator))
        if record.waiting or record.metrics is None:
            raise RuntimeError(f"arm {arm}: round {record.number} did not finish ({record.waiting})")
        points.append(curve_point(record.metrics, record.number))
        labeled_after.append(sorted(set(project.labeled_cases("human")) - set(test)))
    check_no_test_revealed(project, test)
    return points, labeled_after


def job_base(source_root: str, folder: str, settings: ExperimentSettings, test: list[str], seed: int,
             pseudo: PseudoSource | None = None) -> dict:
    """The experiment's job for a seed's base (or a sweep point's): :func:`make_base` on a copy at ``folder``."""
    emit("stage", stage="experiment-seed", seed=seed)
    base, pdice, pretrained = make_base(Project.open(source_root), Path(folder), _here(settings), test, seed, pseudo)
    return {"base": str(base.root), "pseudo_dice": pdice, "pretrained": pretrained}


def job_arm(base: dict, folder: str, arm: str, settings: ExperimentSettings, test: list[str], seed: int,
            slices: int | None) -> tuple[list[dict], list[list[str]]]:
    """An ALSeg arm's rounds on its own copy of the base at ``folder``."""
    return _alseg_arm(Project.open(base["base"]), Path(folder), arm, _here(settings), test, seed, slices)


def job_supervised(base: dict, folder: str, settings: ExperimentSettings, test: list[str],
                   labeled_rounds: list[list[str]], seed: int | None = None) -> list[dict]:
    """supervised-only: after each round, a model from scratch on exactly that round's labeled cases."""
    settings = _here(settings)
    sup = Project.open(base["base"]).copy_to(Path(folder))
    points = []
    for r, labeled in enumerate(labeled_rounds, 1):
        annotator = SimulatedAnnotator(test, from_scratch=True)
        for case in labeled:
            if not sup.human_versions(case):
                annotator(sup, case)
        points.append(curve_point(_train_supervised(sup, f"supervised-r{r}", settings, test, seed), r))
    return points


def job_full(base: dict, folder: str, settings: ExperimentSettings, test: list[str], pool: list[str],
             seed: int | None = None) -> dict:
    """full supervision: every pool case's reference, a model from scratch (the upper bound)."""
    full = Project.open(base["base"]).copy_to(Path(folder))
    annotator = SimulatedAnnotator(test, from_scratch=True)
    for case in pool:
        annotator(full, case)
    return curve_point(_train_supervised(full, "full", _here(settings), test, seed), None)


def _here(settings: ExperimentSettings) -> ExperimentSettings:
    """The settings as this process runs them: on a Ray worker given one GPU, ``cuda:N`` is its ``cuda:0``."""
    from dataclasses import replace

    from .cluster import worker_device

    device = worker_device(settings.round.device)
    return settings if device == settings.round.device else replace(settings, round=settings.round.with_changes(device=device))


def experiment_jobs(source: Project, out: Path, settings: ExperimentSettings, test: list[str],
                    slices: int | None) -> list:
    """The experiment as jobs (:class:`..cluster.Job`), in the order the sequential run takes them:
    per seed its base, then each arm on its own copy of it, supervised-only (after the first hybrid
    arm, whose labeled cases it trains on) and full supervision; then the sweep's bases and arms.
    Independent jobs (seeds, arms) can run side by side (``simulate --ray``)."""
    from .cluster import Job

    pool = [c for c in source.cases() if c not in set(test)]
    alseg = [a for a in settings.arms if "+" in a]
    jobs = []
    for seed in settings.seeds:
        base = f"seed{seed}/base"
        jobs.append(Job(base, job_base, lambda r, seed=seed: (str(source.root), str(out / f"seed{seed}" / "base"),
                                                              settings, test, seed)))
        for arm in alseg:
            jobs.append(Job(f"seed{seed}/{arm}", job_arm, lambda r, seed=seed, arm=arm, base=base: (
                r[base], str(out / f"seed{seed}" / arm.replace("+", "-")), arm, settings, test, seed, slices),
                (base,)))
        if "supervised-only" in settings.arms:
            hybrid = next((a for a in alseg if a.startswith("hybrid")), None)
            drawn = None
            if hybrid is None:  # no hybrid arm runs: the labels random selection would pick
                rng = random.Random(seed)
                k = _per_round(settings.round.budget, len(source.cases()) - len(test))
                order = rng.sample(pool, len(pool))
                drawn = [sorted(order[: k * (r + 1)]) for r in range(settings.rounds)]
            after = (base,) if hybrid is None else (base, f"seed{seed}/{hybrid}")
            jobs.append(Job(f"seed{seed}/supervised-only", job_supervised, lambda r, seed=seed, base=base,
                            hybrid=hybrid, drawn=drawn: (
                r[base], str(out / f"seed{seed}" / "supervised-only"), settings, test,
                drawn if hybrid is None else r[f"seed{seed}/{hybrid}"][1], seed), after))
        if "full supervision" in settings.arms:
            jobs.append(Job(f"seed{seed}/full supervision", job_full, lambda r, seed=seed, base=base: (
                r[base], str(out / f"seed{seed}" / "full"), settings, test, pool, seed), (base,)))
    if settings.sweep:
        arm = next((a for a in settings.arms if "+" in a), "hybrid+finetune")
        seed = settings.seeds[0]
        sweep_slices = slices_per_round(source, settings, test) if arm_parts(arm)[0] == "slice" else None
        for target in settings.sweep:
            folder = out / f"sweep-{target:.2f}"
            base = f"sweep-{target:.2f}/base"
            jobs.append(Job(base, job_base, lambda r, folder=folder, target=target: (
                str(source.root), str(folder / "base"), settings, test, seed,
                settings.round.pseudo.with_options(target_dice=target))))
            jobs.append(Job(f"sweep-{target:.2f}/{arm}", job_arm, lambda r, folder=folder, base=base: (
                r[base], str(folder / arm.replace("+", "-")), arm, settings, test, seed, sweep_slices), (base,)))
    return jobs


def simulate(source: Project, out: str | Path, settings: ExperimentSettings | None = None, ray=None) -> dict:
    """Run the oracle experiment on ``source`` (left untouched) under ``out``; returns the results
    (also written as ``out/experiment.{md,html,json,png}``). ``ray``: a :class:`..cluster.RaySpec`
    to run the seeds' bases, the arms and the baselines as Ray tasks side by side (``out`` must be
    a folder every node sees); the figures are the sequential run's."""
    from .cluster import run_jobs, run_jobs_here
    from .devices import device_name
    from .report import write_experiment_report

    settings = settings or ExperimentSettings()
    refs = set(source.labeled_cases("reference"))
    missing = [c for c in source.cases() if c not in refs]
    if missing:
        raise InputError(source.root, f"the oracle experiment needs a reference label for every case; "
                         f"{len(missing)} have none (e.g. {', '.join(missing[:3])})")
    if source.labeled_cases("human"):
        raise InputError(source.root, "the oracle experiment starts without human labels; this project has some")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    test = split_test(source, settings)
    pool = [c for c in source.cases() if c not in set(test)]
    start = time.perf_counter()
    alseg = [a for a in settings.arms if "+" in a]
    slices = slices_per_round(source, settings, test) if any(arm_parts(a)[0] == "slice" for a in alseg) else None
    jobs = experiment_jobs(source, out, settings, test, slices)
    done = (run_jobs_here(jobs) if ray is None else
            run_jobs(ray, jobs, gpus=device_name(settings.round.device) != "cpu", desc="experiment jobs"))
    per_seed: dict[str, list[list[dict]]] = {arm: [] for arm in settings.arms}
    pseudo_dice: list[float] = []
    aubcs: dict[str, list[float | None]] = {arm: [] for arm in alseg}
    span: list[float | None] = []
    for seed in settings.seeds:
        base = done[f"seed{seed}/base"]
        pretrained = base["pretrained"]
        pseudo_dice.append(base["pseudo_dice"])
        if "pseudo-only" in settings.arms:
            per_seed["pseudo-only"].append([curve_point(pretrained, 0)])
        curves = {}
        for arm in alseg:
            points, _ = done[f"seed{seed}/{arm}"]
            per_seed[arm].append(points)
            curves[arm] = [curve_point(pretrained, 0), *points] if pretrained else None
        # from the pretrained model (nothing annotated) to the budget every arm reached, against the share
        # of slices annotated: the same span for every arm (the whole-case arm's last share depends on its cases)
        upto = common_budget(list(curves.values()))
        span.append(upto)
        for arm, curve in curves.items():
            aubcs[arm].append(aubc(curve, upto=upto) if curve is not None and upto is not None else None)
        if "supervised-only" in settings.arms:
            per_seed["supervised-only"].append(done[f"seed{seed}/supervised-only"])
        if "full supervision" in settings.arms:
            per_seed["full supervision"].append([done[f"seed{seed}/full supervision"]])
    classes = list(source.labels.mapping)
    arms = {arm: _mean_over_seeds(runs, classes) for arm, runs in per_seed.items() if runs}
    for arm, values in aubcs.items():
        if arm in arms:
            arms[arm]["aubc_per_seed"] = values
            mean = _nanmean(values)
            arms[arm]["aubc"] = None if math.isnan(mean) else mean
    results = {
        "classes": classes, "arms": arms, **compare_arms(arms),
        "pseudo_label_dice": float(np.mean(pseudo_dice)) if pseudo_dice else None,
        "setup": {"pool": len(pool), "test": len(test), "test_cases": test, "seeds": settings.seeds,
                  "rounds": settings.rounds,
                  "budget_per_round": _per_round(settings.round.budget, len(source.cases()) - len(test)),
                  "slices_per_round": slices, "aubc_span": span,
                  "pseudo_source": f"{settings.round.pseudo.source} (simulated)"
                  if settings.round.pseudo.source == "degraded-reference" else settings.round.pseudo.source,
                  "compute": _compute_text(settings), "settings": settings.to_json()},
        "seconds": None, "time": now_iso(),
    }
    if settings.sweep:
        results["sweep"] = _sweep_rows(done, settings)
    results["seconds"] = round(time.perf_counter() - start, 1)
    results["report"] = write_experiment_report(results, out)
    return results


def compare_arms(arms: dict[str, dict]) -> dict:
    """Each arm's points get their ratio to full supervision (in place); returns the headline
    figures: the largest annotated fraction of an ALSeg arm, and each arm's final Dice and ratio."""
    full = arms.get("full supervision", {}).get("final", {}).get("mean_dice")
    for data in arms.values():
        for p in data["points"] + [data["final"]]:
            p["ratio_to_full"] = round(p["mean_dice"] / full, 4) if full else None
    return {  # cases annotated by the whole-case arms (a slice arm touches many cases a slice or two each)
        "fraction": max((p["fraction"] for a, d in arms.items() if "+" in a and arm_parts(a)[0] == "case"
                         for p in d["points"]), default=0.0),
        "slice_fraction": max((p["slice_fraction"] for a, d in arms.items() if "+" in a for p in d["points"]
                               if p.get("slice_fraction") is not None and not math.isnan(p["slice_fraction"])),
                              default=None),
        "dice": {a: d["final"]["mean_dice"] for a, d in arms.items()},
        "ratio_to_full": {a: d["final"]["ratio_to_full"] for a, d in arms.items()},
    }


def _per_round(budget: str, total: int) -> int:
    from .selection.strategies import parse_budget

    return parse_budget(budget, total)


def _compute_text(settings: ExperimentSettings) -> str:
    def budget(e, i):
        return f"{e or 'default'} epochs x {i or 'default'} iterations"
    be, bi = baseline_budget(settings)
    s = settings.round
    if s.minutes is not None:
        baseline = (f"{baseline_minutes(s):g} min" if baseline_minutes(s) is not None
                    else f"{be} epochs x {bi} iterations (the same number of steps)")
        return (f"each training fits {s.minutes:g} min on this machine (epochs fitted to a measured probe, unless given); "
                f"each from-scratch baseline {baseline}; nnU-Net {s.configuration or '3d_fullres'}, "
                f"batch {s.batch_size or 'planned'}, device {s.device}")
    return (f"pretraining {budget(s.pretrain_epochs, s.pretrain_iterations)}; each round's training (from the pretrained "
            f"weights) {budget(s.epochs, s.iterations)}; each from-scratch baseline {be} epochs x {bi} iterations (the same "
            f"number of steps); nnU-Net {s.configuration or '3d_fullres'}, batch {s.batch_size or 'planned'}, device {s.device}")


def _mean_over_seeds(runs: list[list[dict]], classes: Sequence[str]) -> dict:
    """Points averaged over seeds, matched by position (round); final = the last point."""
    n = min(len(r) for r in runs)
    points = []
    for i in range(n):
        group = [r[i] for r in runs]
        points.append({
            "round": group[0]["round"],
            "fraction": float(np.mean([p["fraction"] for p in group])),
            "annotated": float(np.mean([p["annotated"] for p in group])),
            "mean_dice": _nanmean([p["mean_dice"] for p in group]),
            "per_class": {c: _nanmean([p["per_class"].get(c, math.nan) for p in group]) for c in classes},
            "per_seed": [p["mean_dice"] for p in group],
            **{k: _finite_mean([p.get(k) for p in group])
               for k in ("foreground_dice", "slices", "slices_of", "slice_fraction", "voxels", "voxels_corrected",
                         "voxels_from_scratch", "corrected_fraction")},
        })
    return {"points": points, "final": dict(points[-1])}


def _finite_mean(values: Sequence[float | None]) -> float | None:
    """The mean of the values given (None where none is: a record from before slices were counted)."""
    mean = _nanmean(values)
    return None if math.isnan(mean) else mean


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.mean(v)) if v else math.nan


def _sweep_rows(done: dict, settings: ExperimentSettings) -> list[dict]:
    """Final Dice of the first ALSeg arm against the pseudo-labels' quality (first seed): one base and
    one arm per target (:func:`experiment_jobs`)."""
    arm = next((a for a in settings.arms if "+" in a), "hybrid+finetune")
    seed = settings.seeds[0]
    rows = []
    for target in settings.sweep:
        points, _ = done[f"sweep-{target:.2f}/{arm}"]
        rows.append({"target": target, "pseudo_label_dice": done[f"sweep-{target:.2f}/base"]["pseudo_dice"],
                     "final_dice": points[-1]["mean_dice"], "arm": arm, "seed": seed})
    return rows


def check_no_test_revealed(project: Project, test: Sequence[str]) -> None:
    """Raise if any held-out case has a human label or was ever queued for review."""
    bad = set(project.labeled_cases("human")) & set(test)
    queued = {q["case"] for q in rounds.queue_items(project)} & set(test)
    if bad or queued:
        raise AssertionError(f"held-out cases labeled {sorted(bad)} or queued {sorted(queued)}")
