"""Selection: speed at 10 000 cases, and which strategy picks the most useful 5 %.

Speed (synthetic features, clustered like case embeddings): N cases x d dims, k
picks, 1 % of N already labeled. Every strategy of ALSeg is timed, with its peak
memory (tracemalloc: numpy allocations included). Two anchors in the same run:
(a) the distance-matrix method (the full N x N cosine matrix, then at every step
the min over the selected columns); (b) the seed's reference loop (Python loops
over candidates and selected cases), timed on a subset and extrapolated by its
k·N·|S| cost. The matrix method's picks are checked to equal ALSeg's coreset picks.

Quality (shared Hippocampus; pool and test split by seed 0, the test cases
excluded from every model and never selectable): per seed, 2 random pool cases
are labeled and a small model is trained on them; it predicts the pool (stored
probabilities + bottleneck features); each strategy then picks the rest of a
5 % budget; a fresh supervised model is trained on those labels (same budget for
every arm) and scored on the test cases (mean Dice of both classes).

Run: .venv/bin/python Testing/Benchmarks/bench_selection.py [--skip-quality]
Writes Testing/Benchmarks/results/selection.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from bench_filtermatch import make_project  # noqa: E402
from bench_nnunet import mean_dice, split  # noqa: E402
from common import shared_data, write_results  # noqa: E402

from ALSegLib.nnunet.plan import plan  # noqa: E402
from ALSegLib.nnunet.predict import predict  # noqa: E402
from ALSegLib.nnunet.train import train  # noqa: E402
from ALSegLib.project import Project  # noqa: E402
from ALSegLib.selection.run import select_cases  # noqa: E402
from ALSegLib.selection.strategies import Pool, centred, select  # noqa: E402
from ALSegLib.selection.uncertainty import Uncertainty  # noqa: E402

STRATEGIES = ("random", "uncertainty", "coreset", "hybrid", "hybrid-weighted")


def synthetic(n: int, d: int, labeled: int, seed: int = 0) -> Pool:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(64, d)).astype(np.float32)
    x = centers[rng.integers(0, 64, n + labeled)] + 0.5 * rng.normal(size=(n + labeled, d)).astype(np.float32)
    cases = [f"case{i:05d}" for i in range(n + labeled)]
    unc = {c: Uncertainty(float(a), float(b), None)
           for c, a, b in zip(cases[labeled:], rng.uniform(0, 0.3, n), rng.uniform(0, 1, n))}
    return Pool(cases[labeled:], cases[:labeled], x[labeled:], x[:labeled], unc)


def measured(fn, memory: bool = True):
    """(result, seconds, peak MiB): timed without tracing, then run again under tracemalloc
    (numpy allocations included) for the peak, so tracing does not slow the timing."""
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    if not memory:
        return out, seconds, None
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def matrix_method(x: np.ndarray, seeds: np.ndarray, k: int) -> list[int]:
    """The full N x N (plus seeds) cosine matrix, then each step the min over the selected columns."""
    pts = np.vstack([x, seeds]).astype(np.float32)
    pts /= np.linalg.norm(pts, axis=1, keepdims=True)
    dist = 1.0 - pts @ pts.T
    n = len(x)
    selected = list(range(n, len(pts)))
    picks = []
    for _ in range(k):
        nearest = dist[:n, selected].min(axis=1)
        nearest[picks] = -np.inf
        i = int(np.argmax(nearest))
        picks.append(i)
        selected.append(i)
    return picks


def reference_loop(x: np.ndarray, seeds: np.ndarray, k: int) -> list[int]:
    """The seed's loop: for every candidate, its distance to every selected case, in Python."""
    def cos_dist(a, b):
        return 1.0 - float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    selected = [s for s in seeds]
    picks = []
    for _ in range(k):
        best, best_d = -1, -1.0
        for i, xi in enumerate(x):
            if i in picks:
                continue
            d = min(cos_dist(xi, s) for s in selected)
            if d > best_d:
                best, best_d = i, d
        picks.append(best)
        selected.append(x[best])
    return picks


def loop_cost(n: int, k: int, labeled: int) -> float:
    """Distance evaluations of the reference loop: sum over steps of candidates x selected."""
    return float(sum((n - t) * (labeled + t) for t in range(k)))


def speed(args) -> dict:
    pool = synthetic(args.n, args.d, args.labeled)
    k = int(round(args.budget * args.n))
    seconds, peak = {}, {}
    picks = {}
    for strategy in STRATEGIES:
        picks[strategy], seconds[strategy], peak[strategy] = measured(lambda s=strategy: select(s, pool, k, seed=0))
        print(f"{strategy:>16}: {seconds[strategy]:.2f} s, peak {peak[strategy]:.0f} MiB", flush=True)
    c = centred(pool)  # the features every strategy reads (cosine on features centred on their mean)
    matrix_picks, matrix_s, matrix_peak = measured(lambda: matrix_method(c.features, c.labeled_features, k))
    same = [pool.candidates[i] for i in matrix_picks] == [p.case for p in picks["coreset"]]
    print(f"  distance matrix: {matrix_s:.2f} s, peak {matrix_peak:.0f} MiB, same picks as coreset: {same}", flush=True)
    sub_n, sub_k, sub_l = args.loop_n, args.loop_k, max(1, args.labeled * args.loop_n // args.n)
    sub = synthetic(sub_n, args.d, sub_l, seed=1)
    sc = centred(sub)
    _, loop_s, _ = measured(lambda: reference_loop(sc.features, sc.labeled_features, sub_k), memory=False)
    loop_full = loop_s * loop_cost(args.n, k, args.labeled) / loop_cost(sub_n, sub_k, sub_l)
    print(f"  reference loop: {loop_s:.2f} s on N={sub_n}, k={sub_k} -> {loop_full:.0f} s extrapolated", flush=True)
    return {"n": args.n, "d": args.d, "k": k, "labeled": args.labeled,
            "seconds": {s: round(v, 3) for s, v in seconds.items()},
            "peak_mib": {s: round(v, 1) for s, v in peak.items()},
            "feature_matrix_mib": round(pool.features.nbytes / 2**20, 1),
            "matrix_method": {"seconds": round(matrix_s, 3), "peak_mib": round(matrix_peak, 1), "same_picks_as_coreset": same},
            "reference_loop": {"subset": {"n": sub_n, "k": sub_k, "labeled": sub_l, "seconds": round(loop_s, 3)},
                               "extrapolated_seconds": round(loop_full, 1)},
            "speedup_vs_matrix": round(matrix_s / seconds["coreset"], 2),
            "speedup_vs_reference_loop": round(loop_full / seconds["coreset"], 1)}


def quality(args, hippo: Path) -> dict:
    pool, test = split(hippo, args.pool, args.test, 0)
    pool_ids = [p.name[: -len(".nii.gz")] for p in pool]
    test_ids = [p.name[: -len(".nii.gz")] for p in test]
    budget = max(1, round(args.quality_budget * len(pool_ids)))
    dice: dict[str, list[float]] = {s: [] for s in args.strategies}
    picked: dict[str, list[list[str]]] = {s: [] for s in args.strategies}
    work = Path(tempfile.mkdtemp(prefix="alseg-bench-sel-"))
    start = time.perf_counter()
    try:
        for seed in args.seeds:
            initial = sorted(random.Random(seed).sample(pool_ids, args.initial))
            base = make_project(work / f"s{seed}", hippo, pool, test, [pool[pool_ids.index(c)] for c in initial])
            plan(base, policy="human", configurations=("2d",), batch_size=args.batch)
            train(base, "supervised", name="initial", epochs=args.initial_epochs, iterations=args.iters,
                  val_iterations=args.val_iters, device="cpu", configuration="2d", validate=False, exclude_cases=test_ids)
            predict(base, "initial", [c for c in pool_ids if c not in initial], device="cpu")
            for strategy in args.strategies:
                project = Project.open(shutil.copytree(base.root, work / f"s{seed}-{strategy}", symlinks=True))
                record = select_cases(project, budget - args.initial, strategy, seed=seed, model="initial",
                                      exclude=test_ids)
                chosen = [q["case"] for q in record["queue"]]
                for case in chosen:
                    project.add_human_label(case, project.read_label(case, "reference"), source="simulated")
                train(project, "supervised", name="final", epochs=args.epochs, iterations=args.iters,
                      val_iterations=args.val_iters, device="cpu", configuration="2d", validate=False,
                      exclude_cases=test_ids)
                predict(project, "final", test_ids, probabilities=False, device="cpu")
                score = mean_dice(project, test_ids, lambda c, p=project: sitk.GetArrayFromImage(p.read_label(c, "predicted")))
                dice[strategy].append(round(score, 4))
                picked[strategy].append(chosen)
                print(f"seed {seed} {strategy}: Dice {score:.4f} ({', '.join(chosen)})", flush=True)
                shutil.rmtree(project.root, ignore_errors=True)
            shutil.rmtree(base.root, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"dice": dice, "mean_dice": {s: round(float(np.mean(v)), 4) for s, v in dice.items()},
            "picked": picked,
            "setup": {"pool": len(pool_ids), "test": len(test_ids), "split_seed": 0, "seeds": args.seeds,
                      "initial_labeled": args.initial, "budget_cases": budget, "budget": f"{args.quality_budget:.0%} of the pool",
                      "configuration": "2d", "batch_size": args.batch,
                      "initial_model": {"epochs": args.initial_epochs, "iterations_per_epoch": args.iters},
                      "final_model": {"epochs": args.epochs, "iterations_per_epoch": args.iters},
                      "device": "cpu", "selection": "model features (nnunet), cosine; uncertainty from the initial model"},
            "quality_seconds": round(time.perf_counter() - start, 1)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--budget", type=float, default=0.05)
    ap.add_argument("--labeled", type=int, default=100)
    ap.add_argument("--loop-n", type=int, default=400)
    ap.add_argument("--loop-k", type=int, default=10)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--keep-quality", action="store_true",
                    help="speed only; keep the quality figures of the existing results file (and say which commit made them)")
    ap.add_argument("--pool", type=int, default=160)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--quality-budget", type=float, default=0.05)
    ap.add_argument("--initial", type=int, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--strategies", nargs="+", default=["random", "coreset", "hybrid"])
    ap.add_argument("--initial-epochs", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--val-iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=12)
    args = ap.parse_args()
    figures = speed(args)
    data = shared_data()
    if args.keep_quality:
        import json

        old = json.loads((Path(__file__).parent / "results" / "selection.json").read_text())
        quality_keys = ("dice", "mean_dice", "picked", "setup", "quality_seconds", "quality")
        figures.update({k: old[k] for k in quality_keys if k in old})
        figures["quality_commit"] = old.get("quality_commit", old["commit"])
    elif args.skip_quality or data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        figures["dice"] = None
        figures["quality"] = "not measured" + ("" if args.skip_quality else " (shared Hippocampus data not found)")
    else:
        figures.update(quality(args, data / "hippocampus"))
    write_results("selection", figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
