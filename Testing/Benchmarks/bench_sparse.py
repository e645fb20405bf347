"""Slices, not whole volumes (issue 22): every arm annotates the same number of slices on the shared Hippocampus.

Pool and test cases are split by --split-seed (default: 160 pool, 40 test, as in the round benchmark; the test
cases are never pseudo-labeled for training, selected or trained on). Pseudo-labels are ``degraded-reference``
(references corrupted to --target-dice: simulated). Per seed, one shared base (pretraining on the pool's
pseudo-labels and its pool prediction), then --rounds rounds of each arm:

- ``hybrid+finetune``: today's loop, whole cases (--budget cases a round, uncertainty x diversity);
- ``slice-random``, ``slice-random-fg``, ``slice-uncertainty``, ``slice-hybrid`` (each ``+finetune``): slice units
  along each case's acquisition axis, as many slices a round as --budget cases hold on average; the simulated
  annotator reveals those slices only and the fine-tuning trains through nnU-Net's ignore label elsewhere
  (--sparse-fill ignore) or on the pseudo-label there (--sparse-fill pseudo);
- ``pseudo-only``: the pretrained model (no human label), for reference.

Same training per arm: every arm's round fine-tunes from the same pretrained weights for --epochs x --iters steps.
Figures: mean held-out Dice after the last round, foreground Dice (nnU-Net's convention), the area under the
budget curve over the share of slices annotated (AUBC, from the pretrained model to the last round), per-seed
values and their spread, and the paired per-seed differences the goals are about.

The recorded CPU run (results/sparse.json): the three seeds side by side, one torch thread each (2 cores), then
pooled:
  for s in 0 1 2; do OMP_NUM_THREADS=1 .venv/bin/python Testing/Benchmarks/bench_sparse.py --seeds $s \
      --name sparse_seed$s > /tmp/sparse_seed$s.log 2>&1 & done; wait
  .venv/bin/python Testing/Benchmarks/bench_sparse.py --name sparse --merge \
      Testing/Benchmarks/results/sparse_seed0.json Testing/Benchmarks/results/sparse_seed1.json \
      Testing/Benchmarks/results/sparse_seed2.json
nnU-Net's budget on a GPU (the comparison the goals are about; nnActive trains 200 epochs a loop):
  python Testing/Benchmarks/bench_sparse.py --device cuda --configuration 3d_fullres --batch-size 0 \
      --pretrain-epochs 1000 --pretrain-iters 250 --epochs 200 --iters 250 --val-iters 50 --seeds 0 1 2 3 --rounds 5
Writes Testing/Benchmarks/results/NAME.json (--name, default sparse).
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the checkout this script is in, before any install

import numpy as np  # noqa: E402
from bench_nnunet import case_id, hippocampus_source, split  # noqa: E402
from common import shared_data, write_results  # noqa: E402

from ALSegLib.project import Project  # noqa: E402
from ALSegLib.settings import RoundSettings  # noqa: E402
from ALSegLib.simulate import ExperimentSettings, simulate, slice_arms  # noqa: E402

WHOLE = "hybrid+finetune"
ARMS = [WHOLE, *slice_arms(), "pseudo-only"]
GOAL_POINTS = 2.0  # best slice arm >= whole-case + 2 Dice points


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=160)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", default="4", help="whole-case arm: cases per round (2 x 4 = 8 = 5 %% of 160); the slice "
                    "arms get as many slices as that many cases hold on average")
    ap.add_argument("--target-dice", type=float, default=0.75)
    ap.add_argument("--arms", nargs="+", default=ARMS)
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--batch-size", type=int, default=12, help="0: the planned batch size")
    ap.add_argument("--pretrain-epochs", type=int, default=12)
    ap.add_argument("--pretrain-iters", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--val-iters", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--slab", type=int, default=1)
    ap.add_argument("--sparse-fill", default="ignore", choices=("ignore", "pseudo"))
    ap.add_argument("--pseudo-share", type=float, default=0.5,
                    help="share of draws from cases no human has labeled (their pseudo-labels); 0: human labels only")
    ap.add_argument("--name", default="sparse", help="results file name (default: sparse -> results/sparse.json)")
    ap.add_argument("--keep", help="keep the experiment folder here (default: a temporary folder, removed)")
    ap.add_argument("--merge", nargs="+", metavar="RESULTS_JSON",
                    help="run nothing: pool these results files (same setup, other seeds) into results/NAME.json")
    args = ap.parse_args()
    if args.merge:
        write_results(args.name, merge(args.merge))
        return 0
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found: nothing measured")
        return 0
    hippo = data / "hippocampus"
    pool, test = split(hippo, args.pool, args.test, args.split_seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="alseg-bench-sparse-"))
    try:
        source = hippocampus_source(work / "source", hippo, pool + test)
        rounds = RoundSettings(
            budget=args.budget, pseudo={"source": "degraded-reference", "target_dice": args.target_dice},
            configuration=args.configuration, batch_size=args.batch_size or None,
            pretrain_epochs=args.pretrain_epochs, pretrain_iterations=args.pretrain_iters, epochs=args.epochs,
            iterations=args.iters, val_iterations=args.val_iters, device=args.device, pseudo_share=args.pseudo_share,
            slab=args.slab, sparse_fill=args.sparse_fill)
        settings = ExperimentSettings(rounds=args.rounds, seeds=args.seeds, test=[case_id(p) for p in test],
                                      arms=args.arms, round=rounds)
        start = time.perf_counter()
        results = simulate(source, work / "experiment", settings)
        seconds = time.perf_counter() - start
        pool_total = pool_slices(source, [case_id(p) for p in test])
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    per_round = results["setup"]["slices_per_round"]
    budget = {"device": args.device, "configuration": args.configuration, "batch_size": args.batch_size,
              "pretrain": f"{args.pretrain_epochs} x {args.pretrain_iters}", "each_training": f"{args.epochs} x {args.iters}",
              "pseudo_share": args.pseudo_share, "sparse_fill": args.sparse_fill, "slab": args.slab,
              "training_split": "every label (no validation split)", "rounds": args.rounds,
              "cases_per_round": args.budget, "slices_per_round": per_round, "seeds": args.seeds,
              "pool": len(pool), "test": len(test), "split_seed": args.split_seed,
              "pool_slices": pool_total, "threads": os.environ.get("OMP_NUM_THREADS", "torch default"),
              "seconds": round(seconds, 1)}
    raw = {arm: _raw(data, args.seeds) for arm, data in results["arms"].items()}
    write_results(args.name, summarize(raw, results["pseudo_label_dice"], budget))
    return 0


def pool_slices(project: Project, test: list[str]) -> int:
    """The pool's slices along each case's acquisition axis (what a slice budget is a share of)."""
    from ALSegLib.store.sparse import case_slices

    held = set(test)
    return sum(case_slices(project.geometry(c))[1] for c in project.cases() if c not in held)


def _raw(data: dict, seeds: list[int]) -> dict:
    """An arm's per-seed figures from :func:`simulate`'s means (each point keeps its per-seed Dice)."""
    points = data["points"]
    return {"seeds": list(seeds), "rounds": [p.get("round") for p in points],
            "dice": [list(p["per_seed"]) for p in points],
            "slices": [_finite(p.get("slices")) for p in points],
            "slice_fraction": [_finite(p.get("slice_fraction")) for p in points],
            # per seed, per round (a point's slice share is a mean over seeds: per seed only with one seed)
            "slice_fraction_seeds": ([[_finite(p.get("slice_fraction")) for p in points]] if len(seeds) == 1 else None),
            "foreground_dice": [_finite(p.get("foreground_dice")) for p in points],
            "aubc": [_finite(a) for a in data.get("aubc_per_seed", [None] * len(seeds))]}


def _finite(value):
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def _mean(values) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarize(raw: dict[str, dict], pseudo_label_dice: float | None, budget: dict) -> dict:
    """The results file: each arm's final Dice (mean, per seed, spread), AUBC, slices annotated and
    foreground Dice, the learning curves, and the goals as paired per-seed differences in Dice points."""
    final = {arm: r["dice"][-1] for arm, r in raw.items()}
    dice = {arm: _mean(v) for arm, v in final.items()}
    per_seed_aubc, spans = common_span_aubc(raw)
    if per_seed_aubc is None:  # no per-seed slice shares or no pretrained point: the runs' own
        per_seed_aubc = {arm: r["aubc"] for arm, r in raw.items()}
    aubc = {arm: _mean(v) for arm, v in per_seed_aubc.items() if any(a is not None for a in v)}
    slice_arms_run = [a for a in raw if a.startswith("slice-")]
    best = max(slice_arms_run, key=lambda a: dice[a]) if slice_arms_run else None

    def paired(a: str, b: str) -> dict | None:
        if a not in raw or b not in raw or raw[a]["seeds"] != raw[b]["seeds"]:
            return None
        diffs = [100 * (x - y) for x, y in zip(final[a], final[b], strict=True)]
        return {"mean_points": float(np.mean(diffs)), "per_seed_points": diffs,
                "seeds_better": sum(d > 0 for d in diffs), "of_seeds": len(diffs),
                "aubc_points": (100 * (aubc[a] - aubc[b]) if a in aubc and b in aubc else None)}

    vs_whole = paired(best, WHOLE) if best else None
    hybrid_vs_fg = paired("slice-hybrid+finetune", "slice-random-fg+finetune")
    return {
        "slices_budget": budget["slices_per_round"] * budget["rounds"],
        "dice": dice,
        "per_seed": final,
        "spread": {arm: {"std": float(np.std(v)), "min": float(min(v)), "max": float(max(v))} for arm, v in final.items()},
        "aubc": aubc,
        "aubc_per_seed": per_seed_aubc,
        "aubc_span": spans,  # per seed: the share of the pool's slices every arm reached (AUBC from 0 to it)
        "foreground_dice": {arm: r["foreground_dice"][-1] for arm, r in raw.items()},
        "slices_annotated": {arm: r["slices"][-1] for arm, r in raw.items()},
        "pseudo_label_dice": pseudo_label_dice,
        "curves": {arm: [{"round": rnd, "slices": s, "slice_fraction": f, "mean_dice": _mean(d), "per_seed": d,
                          "foreground_dice": fg}
                         for rnd, s, f, d, fg in zip(r["rounds"], r["slices"], r["slice_fraction"], r["dice"],
                                                     r["foreground_dice"], strict=True)]
                   for arm, r in raw.items()},
        "best_slice_arm": best,
        "goals": {
            "best_slice_minus_whole": vs_whole,
            f"best_slice_at_least_whole_plus_{GOAL_POINTS:g}_points": (vs_whole["mean_points"] >= GOAL_POINTS
                                                                       if vs_whole else None),
            "slice_hybrid_minus_random_fg": hybrid_vs_fg,
            "slice_hybrid_at_least_random_fg": (hybrid_vs_fg["mean_points"] >= 0 if hybrid_vs_fg else None),
        },
        "raw": raw,
        "budget": budget,
    }


def common_span_aubc(raw: dict[str, dict]) -> tuple[dict | None, list | None]:
    """Per seed, every ALSeg arm's AUBC over one span: from the pretrained model (``pseudo-only``, no
    slice annotated) to the smallest last slice share of the arms in that seed, interpolated there."""
    from ALSegLib.report import aubc, common_budget

    arms = [a for a in raw if "+" in a]
    if "pseudo-only" not in raw or not arms or any(raw[a].get("slice_fraction_seeds") is None for a in arms):
        return None, None
    seeds = raw["pseudo-only"]["seeds"]
    out: dict[str, list] = {a: [] for a in arms}
    spans = []
    for i, _ in enumerate(seeds):
        start = {"slice_fraction": 0.0, "mean_dice": raw["pseudo-only"]["dice"][0][i]}
        curves = {a: [start, *({"slice_fraction": f, "mean_dice": d[i]}
                               for f, d in zip(raw[a]["slice_fraction_seeds"][i], raw[a]["dice"], strict=True))]
                  for a in arms}
        upto = common_budget(list(curves.values()))
        spans.append(upto)
        for a, curve in curves.items():
            out[a].append(aubc(curve, upto=upto) if upto is not None else None)
    return out, spans


def merge(paths: list[str]) -> dict:
    """One results file from runs of the same setup on different seeds: each arm's per-seed values
    pooled (seed order kept, so the paired differences stay paired), means recomputed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]

    def setup(run):  # pool_slices: earlier runs estimated it from a rounded share (the pool is the split's)
        return {k: v for k, v in run["budget"].items() if k not in ("seeds", "seconds", "pool_slices")}

    for path, run in zip(paths, runs, strict=True):
        if setup(run) != setup(runs[0]):
            raise SystemExit(f"{path}: another setup than {paths[0]} ({setup(run)} != {setup(runs[0])})")
        if run["commit"].removesuffix("-dirty") != runs[0]["commit"].removesuffix("-dirty"):
            raise SystemExit(f"{path}: measured at commit {run['commit']}, {paths[0]} at {runs[0]['commit']}: not pooled")
        if list(run["raw"]) != list(runs[0]["raw"]):
            raise SystemExit(f"{path}: other arms than {paths[0]}")
    seeds = [s for run in runs for s in run["budget"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"a seed is in more than one run: {seeds}")
    weights = [len(run["budget"]["seeds"]) for run in runs]

    def weighted(values):
        pairs = [(v, w) for v, w in zip(values, weights, strict=True) if v is not None]
        return float(np.average([v for v, _ in pairs], weights=[w for _, w in pairs])) if pairs else None

    raw = {}
    for arm in runs[0]["raw"]:
        parts = [run["raw"][arm] for run in runs]
        raw[arm] = {"seeds": seeds, "rounds": parts[0]["rounds"],
                    "dice": [[d for p in parts for d in p["dice"][i]] for i in range(len(parts[0]["rounds"]))],
                    **{k: [weighted([p[k][i] for p in parts]) for i in range(len(parts[0]["rounds"]))]
                       for k in ("slices", "slice_fraction", "foreground_dice")},
                    "aubc": [a for p in parts for a in p["aubc"]],
                    "slice_fraction_seeds": _seed_shares(parts)}
    pseudo = [run["pseudo_label_dice"] for run in runs]
    budget = {**runs[0]["budget"], "seeds": seeds, "seconds": [run["budget"]["seconds"] for run in runs],
              "pool_slices": _split_pool_slices(runs[0]["budget"])}
    figures = summarize(raw, None if None in pseudo else weighted(pseudo), budget)
    figures["merged_runs"] = [{"file": Path(p).name, "commit": run["commit"], "time": run["time"],
                               "seeds": run["budget"]["seeds"]} for p, run in zip(paths, runs, strict=True)]
    return figures


def _seed_shares(parts: list[dict]) -> list | None:
    """Each seed's slice shares per round, from runs of one seed each (or runs that kept them)."""
    out = []
    for p in parts:
        shares = p.get("slice_fraction_seeds")
        if shares is None and len(p["seeds"]) == 1:
            shares = [p["slice_fraction"]]
        if shares is None:
            return None
        out += shares
    return out


def _split_pool_slices(budget: dict) -> int | None:
    """The pool's slices, counted again from the split the runs used (the shared data's headers)."""
    from ALSegLib.store.sparse import case_slices
    from ALSegLib.volumes import Geometry

    data = shared_data()
    if data is None:
        return budget.get("pool_slices")
    pool, _ = split(data / "hippocampus", budget["pool"], budget["test"], budget["split_seed"])
    return sum(case_slices(Geometry.read(p))[1] for p in pool)


if __name__ == "__main__":
    raise SystemExit(main())
