"""``alseg select``: score the pool, pick the budget, write the round's review queue.

The pool is every case without a human label that is not waiting for review in
an earlier round's queue and not excluded (held-out test cases). Percent
budgets are of the project's cases minus the excluded ones.
"""
from __future__ import annotations

from collections.abc import Sequence

from .. import rounds
from ..errors import InputError
from ..progress import track
from ..project import Project
from . import features as feats
from .strategies import Pool, needs, parse_budget, select, summarize
from .uncertainty import Uncertainty, case_uncertainty


def _model_with_probabilities(project: Project, cases: Sequence[str]) -> str:
    """The most recently finished model that has stored probabilities for every case."""
    from ..store.models import list_models, read_model
    from ..store.predictions import probabilities_path

    done = [(r.get("finished", ""), m) for m in list_models(project) if (r := read_model(project, m))["status"] == "done"]
    for _, model in sorted(done, reverse=True):
        if all(probabilities_path(project, model, c).is_file() for c in cases):
            return model
    raise InputError("--model", "no trained model has probabilities for every candidate case; run "
                     f"'alseg predict {project.root} --model NAME' first (or use --strategy random/coreset)")


def _complete_model_features(project: Project, model: str, candidates: Sequence[str], labeled: Sequence[str]) -> list[str]:
    """The model's features usually exist for the predicted pool only; the labeled cases
    (what is already covered) get theirs from one prediction pass here. Returns those cases."""
    from ..nnunet.predict import predict

    if not all(feats.nnunet_features_path(project, model, c).is_file() for c in candidates):
        return []
    missing = [c for c in labeled if not feats.nnunet_features_path(project, model, c).is_file()]
    if missing:
        predict(project, model, missing, probabilities=False, features=True)
    return missing


def pool_uncertainty(project: Project, model: str, cases: Sequence[str], band: int = 2) -> dict[str, Uncertainty]:
    """Uncertainty of each case from the model's stored probabilities (and its pseudo-label, if any)."""
    import SimpleITK as sitk

    from ..store.predictions import load_probabilities

    pseudo = set(project.labeled_cases("pseudo"))
    out = {}
    for case in track(list(cases), desc="uncertainty"):
        probs, values = load_probabilities(project, model, case)
        label = sitk.GetArrayFromImage(project.read_label(case, "pseudo")) if case in pseudo else None
        if label is not None and label.shape != probs.shape[1:]:
            raise InputError(project.label_path(case, "pseudo"),
                             f"pseudo-label shape {label.shape} differs from the stored probabilities {probs.shape[1:]}")
        out[case] = case_uncertainty(probs, values, label, band)
    return out


def choose_cases(
    project: Project,
    budget: str | int,
    strategy: str = "hybrid",
    *,
    seed: int = 0,
    model: str | None = None,
    features: str = "auto",
    metric: str = "cosine",
    exclude: Sequence[str] = (),
) -> rounds.Selection:
    """Pick cases for review: the queue with each case's score and reason, and the selection's
    figures. Writes nothing but features it had to compute; :func:`select_cases` stores the result."""
    for case in exclude:
        if not project.has_case(case):
            raise InputError(f"--exclude {case}", f"not a case of {project.root}")
    try:
        need_features, need_uncertainty = needs(strategy)
    except ValueError as exc:
        raise InputError("--strategy", str(exc)) from None
    excluded = set(exclude)
    labeled = sorted(set(project.labeled_cases("human")) - excluded)
    waiting = rounds.pending_cases(project)
    candidates = sorted(set(project.cases()) - set(labeled) - waiting - excluded)
    try:
        k = min(parse_budget(budget, len(project.cases()) - len(excluded)), len(candidates))
    except ValueError as exc:
        raise InputError("--budget", str(exc)) from None
    pool = Pool(candidates, labeled, metric=metric)
    used_model = None
    if need_uncertainty and candidates:
        used_model = model or _model_with_probabilities(project, candidates)
        pool.uncertainty = pool_uncertainty(project, used_model, candidates)
    source, completed = None, []
    if need_features and candidates:
        feature_model = model or used_model
        if features in ("auto", "nnunet") and feature_model:
            completed = _complete_model_features(project, feature_model, candidates, labeled)
        source, matrix = feats.case_features(project, candidates + labeled, features, feature_model)
        pool.features, pool.labeled_features = matrix[: len(candidates)], matrix[len(candidates):]
    try:
        picks = select(strategy, pool, k, seed)
    except ValueError as exc:
        raise InputError(f"--strategy {strategy}", str(exc)) from None
    pseudo, predicted = set(project.labeled_cases("pseudo")), set(project.labeled_cases("predicted"))
    queue = summarize(picks)
    for item in queue:  # what the case opens with for review: its pseudo-label, else the model's prediction
        case = item["case"]
        item["open_with"] = "pseudo" if case in pseudo else ("predicted" if case in predicted else None)
        if pool.uncertainty is not None:
            item["uncertainty"] = pool.uncertainty[item["case"]].to_json()
    details = {
        "strategy": strategy, "seed": seed, "budget": str(budget), "k": k, "model": used_model,
        "features": source, "metric": metric if need_features else None, "candidates": len(candidates),
        "labeled": len(labeled), "waiting_for_review": len(waiting), "excluded": sorted(excluded),
        "features_computed_for": completed,
    }
    return rounds.Selection(details, queue)


def select_cases(project: Project, budget: str | int, strategy: str = "hybrid", **options) -> dict:
    """Pick cases for review (:func:`choose_cases`) and store them as the open round's queue,
    or a new round's (``alseg select``); returns the round record."""
    return rounds.store_selection(project, choose_cases(project, budget, strategy, **options))

