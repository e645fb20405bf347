"""Selection strategies: which unlabeled cases a radiologist should label next, and why.

Each strategy is a small object with one method, ``select(pool, k, rng)``, that
returns ``[Pick(case, score, reason)]`` best first, deterministic for a given
seed. The pool only ever holds cases that may be proposed (no human label, not
waiting for review, not excluded); the labeled cases are there as what is
already covered.

- ``random``: a seeded shuffle (the baseline every other strategy must beat).
- ``uncertainty``: the highest combined uncertainty score (see :mod:`.uncertainty`).
- ``coreset``: k-center greedy on the features, seeded with the labeled cases.
- ``hybrid`` (default): uncertain, representative and diverse. Candidates are the
  top ``max(3k, 25 %)`` most uncertain among the cases that are typical of the pool
  (typicality, the inverse mean distance to the 20 nearest cases, at least the
  pool's lower quartile: isolated cases such as rare acquisitions are left out);
  among them k-center greedy with each distance weighted by typicality, so each
  pick covers what is not yet covered without spending a label on an outlier.
  With a handful of labels, coverage alone picks outliers (measured on the
  Hippocampus pool: ``results/selection.json``); typical-first selection is
  what works at small budgets (Hacohen et al. 2022, TypiClust).
- ``hybrid-weighted``: k-center greedy over the whole pool, each candidate's
  distance multiplied by its uncertainty score.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np

from .coreset import k_center_greedy, min_distances, prepare, typicality
from .uncertainty import Uncertainty


class Pick(NamedTuple):
    case: str
    score: float
    reason: str


@dataclass
class Pool:
    """What a strategy sees. ``candidates`` in a fixed order (sorted case ids);
    ``features`` rows align with ``candidates``, ``labeled_features`` with ``labeled``."""

    candidates: list[str]
    labeled: list[str] = field(default_factory=list)
    features: np.ndarray | None = None
    labeled_features: np.ndarray | None = None
    uncertainty: Mapping[str, Uncertainty] | None = None
    metric: str = "cosine"

    def need_features(self, strategy: str) -> None:
        if self.features is None or len(self.features) != len(self.candidates):
            raise ValueError(f"strategy {strategy!r} needs one feature vector per candidate case")

    def need_uncertainty(self, strategy: str) -> np.ndarray:
        missing = [c for c in self.candidates if self.uncertainty is None or c not in self.uncertainty]
        if missing:
            raise ValueError(f"strategy {strategy!r} needs model probabilities for every candidate; "
                             f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        return np.array([self.uncertainty[c].score for c in self.candidates], dtype=np.float32)


def parse_budget(budget: str | float, total: int) -> int:
    """Cases to propose: a count (``12``) or a percentage of ``total`` cases (``"5%"``),
    rounded half up; any positive percentage of a non-empty project proposes at least one."""
    text = str(budget).strip()
    try:
        if text.endswith("%"):
            pct = float(text[:-1])
            if not 0 <= pct <= 100:
                raise ValueError
            if pct == 0 or total == 0:
                return 0
            return max(1, math.floor(pct * total / 100 + 0.5))
        count = float(text)
        if count < 0 or count != int(count):
            raise ValueError
        return int(count)
    except ValueError:
        raise ValueError(f"budget must be a whole count (e.g. 10) or a percentage in 0-100 (e.g. 5%), not {budget!r}") from None


def _percent_rank(values: np.ndarray) -> np.ndarray:
    """For each value, the share of the pool scoring at least as high, in percent (1 = the top)."""
    order = np.sort(values)[::-1]
    at_least = np.searchsorted(-order, -values, side="right")
    return 100.0 * at_least / len(values)


def _uncertainty_words(u: Uncertainty, top: float) -> str:
    words = f"uncertainty {u.score:.2f} (top {max(1, math.ceil(top))} %): entropy around the structure {u.focused_entropy:.2f}"
    if u.disagreement is not None:
        words += f", model vs pseudo-label Dice {1 - u.disagreement:.2f}"
    return words


def _distance_words(distance: float, typical: float | None, first: str) -> str:
    if not math.isfinite(distance):
        return f"first pick, no labeled case yet ({first})"
    if typical and typical > 0:
        ratio = distance / typical
        where = "far from every case already covered" if ratio >= 1.5 else (
            "away from the cases already covered" if ratio >= 0.75 else "close to cases already covered")
        return f"{where} (distance {distance:.3g}, {ratio:.1f}x the pool's median)"
    return f"distance {distance:.3g} to the nearest labeled or chosen case"


class RandomStrategy:
    name = "random"

    def select(self, pool: Pool, k: int, rng: np.random.Generator) -> list[Pick]:
        order = rng.permutation(len(pool.candidates))[: min(k, len(pool.candidates))]
        return [Pick(pool.candidates[i], 0.0, "random pick (baseline)") for i in order]


class UncertaintyStrategy:
    name = "uncertainty"

    def select(self, pool: Pool, k: int, rng: np.random.Generator) -> list[Pick]:
        scores = pool.need_uncertainty(self.name)
        top = _percent_rank(scores)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], pool.candidates[i]))[:k]
        return [Pick(pool.candidates[i], float(scores[i]), _uncertainty_words(pool.uncertainty[pool.candidates[i]], top[i]))
                for i in order]


def _typical_distance(pool: Pool) -> float | None:
    """The yardstick a pick's distance is read against: the median distance of a candidate
    to its nearest labeled case; without labeled cases, to its nearest other candidate
    (None with a single candidate and nothing labeled)."""
    x = prepare(pool.features, pool.metric)
    if pool.labeled_features is not None and len(pool.labeled_features):
        return float(np.median(min_distances(x, prepare(pool.labeled_features, pool.metric), pool.metric)))
    if len(x) < 2:
        return None
    nearest = [float(np.delete(min_distances(x, x[i:i + 1], pool.metric), i).min()) for i in range(len(x))] \
        if len(x) <= 512 else None
    if nearest is None:  # a large pool: a seeded sample of rows is enough for a median
        rows = np.random.default_rng(0).choice(len(x), 512, replace=False)
        nearest = []
        for i in rows:
            d = min_distances(x, x[i:i + 1], pool.metric)
            d[i] = np.inf
            nearest.append(float(d.min()))
    return float(np.median(nearest))


def _first_index(pool: Pool, rng: np.random.Generator, scores: np.ndarray | None) -> int | None:
    """Without labeled cases k-center needs a first center: the most uncertain case, else a seeded draw."""
    if pool.labeled_features is not None and len(pool.labeled_features):
        return None
    return int(np.argmax(scores)) if scores is not None else int(rng.integers(len(pool.candidates)))


class CoresetStrategy:
    name = "coreset"

    def select(self, pool: Pool, k: int, rng: np.random.Generator) -> list[Pick]:
        pool.need_features(self.name)
        centers = k_center_greedy(pool.features, k, seeds=pool.labeled_features, metric=pool.metric,
                                  first=_first_index(pool, rng, None))
        typical = _typical_distance(pool)
        return [Pick(pool.candidates[c.index], c.distance if math.isfinite(c.distance) else 0.0,
                     _distance_words(c.distance, typical, "a seeded draw")) for c in centers]


class HybridStrategy:
    """k-center greedy among the most uncertain typical cases, distances weighted by
    typicality (``variant="top"``), or over the whole pool with distances weighted by
    uncertainty (``variant="weighted"``)."""

    def __init__(self, variant: str = "top", top_factor: int = 3, top_fraction: float = 0.25,
                 typical_quantile: float = 0.25):
        if variant not in ("top", "weighted"):
            raise ValueError(f"hybrid variant must be 'top' or 'weighted', not {variant!r}")
        self.variant, self.top_factor, self.top_fraction = variant, top_factor, top_fraction
        self.typical_quantile = typical_quantile
        self.name = "hybrid" if variant == "top" else "hybrid-weighted"

    def select(self, pool: Pool, k: int, rng: np.random.Generator) -> list[Pick]:
        scores = pool.need_uncertainty(self.name)
        pool.need_features(self.name)
        n = len(pool.candidates)
        top = _percent_rank(scores)
        typical = _typical_distance(pool)
        typical_words = {}
        if self.variant == "top":
            every = pool.features if pool.labeled_features is None or not len(pool.labeled_features) else \
                np.vstack([pool.features, pool.labeled_features])
            typ = typicality(every, pool.metric)[:n]
            floor = float(np.quantile(typ, self.typical_quantile))
            eligible = [i for i in range(n) if typ[i] >= floor]
            if len(eligible) < k:
                eligible = list(range(n))
            m = min(len(eligible), max(self.top_factor * k, math.ceil(self.top_fraction * n)))
            rows = np.array(sorted(eligible, key=lambda i: (-scores[i], pool.candidates[i]))[:m])
            weight = typ[rows] / max(float(typ.max()), 1e-12)
            first = _first_index(pool, rng, scores[rows])
            centers = k_center_greedy(pool.features[rows], k, seeds=pool.labeled_features, metric=pool.metric,
                                      weights=weight, first=first)
            picked = [(int(rows[c.index]), c.distance) for c in centers]
            typical_rank = _percent_rank(typ)
            typical_words = {i: f"typical of the pool (top {max(1, math.ceil(typical_rank[i]))} % by typicality)"
                             for i, _ in picked}
        else:
            first = _first_index(pool, rng, scores)
            centers = k_center_greedy(pool.features, k, seeds=pool.labeled_features, metric=pool.metric,
                                      weights=scores, first=first)
            picked = [(c.index, c.distance) for c in centers]
        out = []
        for i, distance in picked:
            case = pool.candidates[i]
            reason = (f"{_uncertainty_words(pool.uncertainty[case], top[i])}; "
                      f"{_distance_words(distance, typical, 'the most uncertain')}")
            if i in typical_words:
                reason += f"; {typical_words[i]}"
            out.append(Pick(case, float(scores[i]), reason))
        return out


STRATEGIES = {
    "random": RandomStrategy,
    "uncertainty": UncertaintyStrategy,
    "coreset": CoresetStrategy,
    "hybrid": lambda: HybridStrategy("top"),
    "hybrid-weighted": lambda: HybridStrategy("weighted"),
}


def make_strategy(name: str):
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]()


def needs(name: str) -> tuple[bool, bool]:
    """(needs features, needs uncertainty) of a strategy."""
    return name in ("coreset", "hybrid", "hybrid-weighted"), name in ("uncertainty", "hybrid", "hybrid-weighted")


def select(strategy: str, pool: Pool, k: int, seed: int = 0) -> list[Pick]:
    """Run ``strategy`` for ``k`` picks (capped at the pool size); deterministic for ``seed``."""
    if k < 0:
        raise ValueError("the number of cases to pick cannot be negative")
    chosen = make_strategy(strategy)
    if k == 0 or not pool.candidates:
        return []
    return chosen.select(centred(pool), min(k, len(pool.candidates)), np.random.default_rng(seed))


def centred(pool: Pool) -> Pool:
    """The pool with its feature vectors centred on their common mean (candidates and
    labeled cases together), for the cosine metric.

    Pooled network activations share a large common component: on the demo's phantoms
    every channel's mean over the pool was 0.36 in magnitude against a spread of 0.013
    between cases, so every pair of cases was at cosine distance 0.0003-0.0017 and a pick
    "away from the labeled cases" was 0.000 away. Centred, the same vectors are 0.3-1.7
    apart and the distances rank cases by how they differ, not by the shared offset.
    Euclidean distances do not change with a shift, so they are left as they are."""
    if pool.metric != "cosine" or pool.features is None or not len(pool.features):
        return pool
    every = pool.features if pool.labeled_features is None or not len(pool.labeled_features) else \
        np.vstack([pool.features, pool.labeled_features])
    mean = np.asarray(every, dtype=np.float64).mean(axis=0)
    spread = np.abs(np.asarray(every, dtype=np.float64) - mean).max()
    if spread <= 1e-6 * max(np.abs(mean).max(), 1e-30):  # identical vectors: centring would only magnify noise
        return pool
    mean = mean.astype(np.float32)
    labeled = None if pool.labeled_features is None else np.asarray(pool.labeled_features, np.float32) - mean
    return replace(pool, features=np.asarray(pool.features, np.float32) - mean, labeled_features=labeled)


def summarize(picks: Sequence[Pick]) -> list[dict]:
    return [{"rank": r, "case": p.case, "score": round(p.score, 6), "reason": p.reason} for r, p in enumerate(picks, 1)]
