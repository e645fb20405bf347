"""The oracle experiment on the shared Hippocampus: every arm at <= 5 % of the pool annotated.

Pool and test cases are split by --split-seed (default: 160 pool, 40 test; the test
cases are never pseudo-labeled for training, selected or trained on). Pseudo-labels
are ``degraded-reference`` (references corrupted to --target-dice: simulated) unless a
SAM checkpoint is given. Per seed: pretraining on the pool's pseudo-labels, then
--rounds rounds of --budget cases for random/hybrid x finetune/filtermatch, and the
baselines pseudo-only, supervised-only (the hybrid arm's labeled cases, from scratch)
and full supervision (every pool reference). Same compute per arm: the from-scratch
baselines get as many steps as an arm's model (pretraining + one round's training).

The recorded CPU run (results/al_round.json): one seed per invocation (each about 45 min
on 2 cores), then the runs pooled:
  for s in 0 1; do .venv/bin/python Testing/Benchmarks/bench_al_round.py --seeds $s \
      --arms hybrid+finetune random+finetune pseudo-only supervised-only "full supervision" \
      --name al_round_seed$s; done
  .venv/bin/python Testing/Benchmarks/bench_al_round.py --name al_round \
      --merge Testing/Benchmarks/results/al_round_seed0.json Testing/Benchmarks/results/al_round_seed1.json
(the recorded per-seed files were named al_round_mixed.json (seed 0) and al_round_mixed_seed1.json).
nnU-Net's default budget on a GPU (the comparison the goals are about):
  python Testing/Benchmarks/bench_al_round.py --device cuda --configuration 3d_fullres --batch-size 0 \
      --pretrain-epochs 1000 --pretrain-iters 250 --epochs 1000 --iters 250 --val-iters 50 --seeds 0 1 2 \
      --warmup 20 --filter-start 100 --filter-every 100
Writes Testing/Benchmarks/results/NAME.json (--name, default al_round).
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")

import argparse  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from bench_nnunet import case_id, hippocampus_source, split  # noqa: E402
from common import shared_data, write_results  # noqa: E402

from ALSegLib.settings import RoundSettings  # noqa: E402
from ALSegLib.simulate import (  # noqa: E402
    BASELINES,
    ExperimentSettings,
    alseg_arms,
    baseline_budget,
    compare_arms,
    simulate,
)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=160)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--budget", default="4", help="cases per round (2 x 4 = 8 = 5 %% of 160)")
    ap.add_argument("--target-dice", type=float, default=0.75)
    ap.add_argument("--sweep", type=float, nargs="*", default=None)
    ap.add_argument("--arms", nargs="+", default=[*alseg_arms(), *BASELINES])
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--batch-size", type=int, default=12, help="0: the planned batch size")
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--pretrain-iters", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--val-iters", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--filter-start", type=int, default=2)
    ap.add_argument("--filter-every", type=int, default=2)
    ap.add_argument("--pseudo-share", type=float, default=0.5,
                    help="finetune arms: share of draws from pseudo-labeled cases (0: human labels only)")
    ap.add_argument("--name", default="al_round", help="results file name (default: al_round -> results/al_round.json)")
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
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="alseg-bench-al-"))
    try:
        source = hippocampus_source(work / "source", hippo, pool + test)
        rounds = RoundSettings(
            budget=args.budget, pseudo={"source": "degraded-reference", "target_dice": args.target_dice},
            configuration=args.configuration, batch_size=args.batch_size or None,
            pretrain_epochs=args.pretrain_epochs, pretrain_iterations=args.pretrain_iters, epochs=args.epochs,
            iterations=args.iters, val_iterations=args.val_iters, device=args.device,
            filtermatch={"warmup_epochs": args.warmup, "filter_start": args.filter_start, "filter_every": args.filter_every},
            pseudo_share=args.pseudo_share)
        settings = ExperimentSettings(rounds=args.rounds, seeds=args.seeds, test=[case_id(p) for p in test],
                                      arms=args.arms, sweep=args.sweep or None, round=rounds)
        start = time.perf_counter()
        results = simulate(source, work / "experiment", settings)
        seconds = time.perf_counter() - start
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    budget = {"device": args.device, "configuration": args.configuration, "batch_size": args.batch_size,
              "pretrain": f"{args.pretrain_epochs} x {args.pretrain_iters}", "each_training": f"{args.epochs} x {args.iters}",
              "each_baseline": "{} x {}".format(*baseline_budget(settings)),
              "filtermatch": {"warmup": args.warmup, "filter_start": args.filter_start, "filter_every": args.filter_every},
              "pseudo_share": args.pseudo_share, "training_split": "every label (no validation split)",
              "rounds": args.rounds, "cases_per_round": args.budget, "seeds": args.seeds,
              "pool": len(pool), "test": len(test), "split_seed": args.split_seed, "seconds": round(seconds, 1)}
    figures = summarize(results["arms"], results, results["pseudo_label_dice"], results.get("sweep"), budget)
    write_results(args.name, figures)
    return 0


def summarize(arms: dict[str, dict], headline: dict, pseudo_label_dice: float | None, sweep, budget: dict) -> dict:
    """The results file's figures: ``headline`` (fraction, dice, ratio_to_full from
    :func:`compare_arms`), each arm's curve and per-seed Dice, and the goals."""
    dice, ratio = headline["dice"], headline["ratio_to_full"]
    full = dice.get("full supervision")
    alseg = {a: v for a, v in dice.items() if "+" in a}
    best = max(alseg, key=alseg.get) if alseg else None
    return {
        **{k: headline[k] for k in ("fraction", "dice", "ratio_to_full")},
        "pseudo_label_dice": pseudo_label_dice,
        "per_seed": {a: d["final"]["per_seed"] for a, d in arms.items()},
        "curves": {a: d["points"] for a, d in arms.items()},
        "sweep": sweep,
        "best_alseg_arm": best,
        "goals": {
            "best_alseg_ratio_to_full": ratio[best] if best else None,
            # None where the run had no full-supervision arm to compare with
            "best_alseg_at_least_0.97_of_full": (alseg[best] >= 0.97 * full) if best and full else None,
            "hybrid_at_least_random": {m: dice[f"hybrid+{m}"] >= dice[f"random+{m}"]
                                       for m in ("finetune", "filtermatch") if f"hybrid+{m}" in dice and f"random+{m}" in dice},
        },
        "budget": budget,
    }


def merge(paths: list[str]) -> dict:
    """One results file from runs of the same setup on different seeds (one seed per run when a
    run takes hours): each arm's per-seed Dice pooled, means and ratios recomputed."""
    runs = [json.loads(Path(p).read_text()) for p in paths]

    def setup(run):
        return {k: v for k, v in run["budget"].items() if k not in ("seeds", "seconds")}

    for path, run in zip(paths, runs, strict=True):
        if setup(run) != setup(runs[0]):
            raise SystemExit(f"{path}: another setup than {paths[0]} ({setup(run)} != {setup(runs[0])})")
        if run["commit"] != runs[0]["commit"]:
            raise SystemExit(f"{path}: measured at commit {run['commit']}, {paths[0]} at {runs[0]['commit']}: not pooled")
        if list(run["curves"]) != list(runs[0]["curves"]):
            raise SystemExit(f"{path}: other arms than {paths[0]}")
    seeds = [s for run in runs for s in run["budget"]["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"a seed is in more than one run: {seeds}")
    arms = {}
    for arm in runs[0]["curves"]:
        points = []
        for group in zip(*(run["curves"][arm] for run in runs), strict=True):
            seeds_in = [len(p["per_seed"]) for p in group]  # each run's point is a mean over its seeds
            per_seed = [d for p in group for d in p["per_seed"]]
            points.append({"round": group[0]["round"],
                           "fraction": float(np.average([p["fraction"] for p in group], weights=seeds_in)),
                           "annotated": float(np.average([p["annotated"] for p in group], weights=seeds_in)),
                           "mean_dice": float(np.mean(per_seed)),
                           "per_class": {c: float(np.average([p["per_class"][c] for p in group], weights=seeds_in))
                                         for c in group[0]["per_class"]},
                           "per_seed": per_seed})
        arms[arm] = {"points": points, "final": dict(points[-1])}
    weights = [len(run["budget"]["seeds"]) for run in runs]
    budget = {**runs[0]["budget"], "seeds": seeds, "seconds": round(sum(run["budget"]["seconds"] for run in runs), 1)}
    pseudo = [run["pseudo_label_dice"] for run in runs]
    figures = summarize(arms, compare_arms(arms), None if None in pseudo else float(np.average(pseudo, weights=weights)),
                        runs[0].get("sweep"), budget)
    figures["merged_runs"] = [{"file": Path(p).name, "commit": run["commit"], "time": run["time"],
                               "seeds": run["budget"]["seeds"]} for p, run in zip(paths, runs, strict=True)]
    return figures


if __name__ == "__main__":
    raise SystemExit(main())
