"""k-center greedy (core-set) selection with a running min-distance vector.

Each step adds the candidate farthest from everything already covered (the
labeled cases given as ``seeds`` and the centers chosen so far), then updates
every candidate's distance to its nearest center with one matrix-vector
product: O(k·N·d) time, O(N·d) memory, never an N×N matrix. Seeds are folded
in by chunks so their N×|S| distances stay bounded too. Everything is float32.

Cosine distance is 1 − cos (rows L2-normalised once; an all-zero row is at
distance 1 from everything); Euclidean uses ‖x‖² − 2x·c + ‖c‖² clipped at 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METRICS = ("cosine", "euclidean")
CHUNK_BYTES = 64 * 2**20  # bound on the N x chunk block of seed distances


@dataclass(frozen=True)
class Center:
    index: int  # row of the candidate matrix
    distance: float  # its distance to the nearest covered case when it was picked (inf: nothing covered yet)


def prepare(features: np.ndarray, metric: str) -> np.ndarray:
    """float32 (N, d) copy ready for :func:`distances_to` (rows normalised for cosine)."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, not {metric!r}")
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be a (cases, dimensions) matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    if metric == "cosine":
        norms = np.linalg.norm(x, axis=1, keepdims=True)
        x = np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
    return np.ascontiguousarray(x)


def distances_to(x: np.ndarray, sq_norms: np.ndarray, centers: np.ndarray, metric: str) -> np.ndarray:
    """Distances (N, m) from prepared rows ``x`` to prepared ``centers`` (m, d)."""
    dots = x @ centers.T
    if metric == "cosine":
        return np.maximum(1.0 - dots, 0.0, dtype=np.float32)
    d2 = sq_norms[:, None] - 2.0 * dots + (centers * centers).sum(axis=1)[None, :]
    return np.sqrt(np.maximum(d2, 0.0), dtype=np.float32)


def min_distances(x: np.ndarray, seeds: np.ndarray, metric: str, sq_norms: np.ndarray | None = None) -> np.ndarray:
    """Each row's distance to its nearest seed, in chunks of seeds (inf without seeds)."""
    out = np.full(x.shape[0], np.inf, dtype=np.float32)
    if seeds is None or len(seeds) == 0:
        return out
    sq = (x * x).sum(axis=1) if sq_norms is None else sq_norms
    chunk = max(1, CHUNK_BYTES // (4 * max(1, x.shape[0])))
    for start in range(0, len(seeds), chunk):
        np.minimum(out, distances_to(x, sq, seeds[start:start + chunk], metric).min(axis=1), out=out)
    return out


def k_center_greedy(
    candidates: np.ndarray,
    k: int,
    *,
    seeds: np.ndarray | None = None,
    metric: str = "cosine",
    weights: np.ndarray | None = None,
    first: int | None = None,
) -> list[Center]:
    """Pick ``k`` candidate rows by k-center greedy.

    ``seeds``: features of cases already covered (labeled); without any, the
    first center is ``first`` (default: the highest weight, else row 0).
    ``weights`` (N,), non-negative: pick the argmax of distance × weight instead
    of distance (uncertainty-weighted coverage). Ties go to the lowest row, so
    the result is deterministic for a given row order.
    """
    x = prepare(candidates, metric)
    n = x.shape[0]
    k = max(0, min(int(k), n))
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != (n,) or not np.isfinite(weights).all() or (weights < 0).any():
            raise ValueError("weights must be one finite non-negative value per candidate")
    sq = (x * x).sum(axis=1)
    covered = None if seeds is None or len(seeds) == 0 else prepare(seeds, metric)
    if covered is not None and covered.shape[1] != x.shape[1]:
        raise ValueError(f"seed features have {covered.shape[1]} dimensions, candidates {x.shape[1]}")
    nearest = min_distances(x, covered, metric, sq)
    chosen = np.zeros(n, dtype=bool)
    picks: list[Center] = []
    for step in range(k):
        if step == 0 and covered is None:
            i = first if first is not None else (int(np.argmax(weights)) if weights is not None else 0)
            if not 0 <= i < n:
                raise ValueError(f"first center {i} is not a candidate row (0..{n - 1})")
        else:
            score = nearest * weights if weights is not None else nearest.copy()
            score[chosen] = -np.inf
            i = int(np.argmax(score))
        picks.append(Center(i, float(nearest[i])))
        chosen[i] = True
        np.minimum(nearest, distances_to(x, sq, x[i:i + 1], metric)[:, 0], out=nearest)
    return picks


TYPICALITY_NEIGHBOURS = 20
TYPICALITY_REFERENCES = 2048
TYPICALITY_CHUNK_BYTES = 16 * 2**20  # bound on the rows x references block


def typicality(features: np.ndarray, metric: str = "cosine", neighbours: int = TYPICALITY_NEIGHBOURS,
               references: int = TYPICALITY_REFERENCES) -> np.ndarray:
    """How typical each row is of the set: 1 / (mean distance to its ``neighbours`` nearest rows).

    High in dense regions, low for isolated rows (outliers, rare acquisitions). The
    neighbours are looked up among at most ``references`` rows, evenly spaced in row
    order (every row when there are fewer), so the cost is O(N·references·d) and the
    result deterministic; rows go in blocks of at most 16 MiB of distances. A row is never its own
    neighbour. Fewer than two rows: all ones.
    """
    x = prepare(features, metric)
    n = x.shape[0]
    if n < 2:
        return np.ones(n, dtype=np.float32)
    ref_idx = np.arange(n) if n <= references else np.linspace(0, n - 1, references).round().astype(np.int64)
    ref = x[ref_idx]
    m = max(1, min(int(neighbours), len(ref_idx) - 1))
    sq = (x * x).sum(axis=1)
    column = np.full(n, -1, dtype=np.int64)  # each row's column among the references (-1: not one)
    column[ref_idx] = np.arange(len(ref_idx))
    out = np.empty(n, dtype=np.float32)
    chunk = max(1, TYPICALITY_CHUNK_BYTES // (4 * len(ref_idx)))
    for start in range(0, n, chunk):
        rows = np.arange(start, min(n, start + chunk))
        dist = distances_to(x[rows], sq[rows], ref, metric)
        own = column[rows] >= 0
        dist[np.flatnonzero(own), column[rows][own]] = np.inf  # not its own neighbour
        dist.partition(m - 1, axis=1)
        out[rows] = 1.0 / (dist[:, :m].mean(axis=1) + 1e-12)
    return out
