"""The oracle experiment on the shared Hippocampus: every arm at <= 5 % of the pool annotated.

Pool and test cases are split by --split-seed (default: 160 pool, 40 test; the test
cases are never pseudo-labeled for training, selected or trained on). Pseudo-labels
are ``degraded-reference`` (references corrupted to --target-dice: simulated) unless a
SAM checkpoint is given. Per seed: pretraining on the pool's pseudo-labels, then
--rounds rounds of --budget cases for random/hybrid x finetune/filtermatch, and the
baselines pseudo-only, supervised-only (the hybrid arm's labeled cases, from scratch)
and full supervision (every pool reference). Same compute per arm: the from-scratch
baselines get as many steps as an arm's model (pretraining + one round's training).

CPU run (the recorded one):  .venv/bin/python Testing/Benchmarks/bench_al_round.py
nnU-Net's default budget on a GPU (the comparison the goals are about):
  python Testing/Benchmarks/bench_al_round.py --device cuda --configuration 3d_fullres --batch-size 0 \\
      --pretrain-epochs 1000 --pretrain-iters 250 --epochs 1000 --iters 250 --val-iters 50 --seeds 0 1 2 \\
      --warmup 20 --filter-start 100 --filter-every 100
Writes Testing/Benchmarks/results/al_round.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")

import argparse  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from bench_nnunet import split  # noqa: E402
from common import shared_data, write_results  # noqa: E402

from ALSegLib.project import LabelTable, Project  # noqa: E402
from ALSegLib.simulate import BASELINES, ExperimentSettings, alseg_arms, baseline_budget, simulate  # noqa: E402


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
    ap.add_argument("--pretrain-epochs", type=int, default=5)
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
    args = ap.parse_args()
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found: nothing measured")
        return 0
    hippo = data / "hippocampus"
    pool, test = split(hippo, args.pool, args.test, args.split_seed)
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="alseg-bench-al-"))
    try:
        source = Project.create(work / "source", LabelTable.parse("anterior=1,posterior=2"), "MRI", name="hippocampus")
        images = pool + test
        source.add_cases(images, references=[hippo / "labelsTr" / p.name for p in images],
                         case_ids=[p.name[: -len(".nii.gz")] for p in images])
        settings = ExperimentSettings(
            rounds=args.rounds, budget_per_round=args.budget, seeds=args.seeds,
            test=[p.name[: -len(".nii.gz")] for p in test], arms=args.arms,
            pseudo={"source": "degraded-reference", "target_dice": args.target_dice},
            configuration=args.configuration, batch_size=args.batch_size or None,
            pretrain_epochs=args.pretrain_epochs, pretrain_iterations=args.pretrain_iters, epochs=args.epochs,
            iterations=args.iters, val_iterations=args.val_iters, device=args.device,
            filtermatch={"warmup_epochs": args.warmup, "filter_start": args.filter_start, "filter_every": args.filter_every},
            sweep=args.sweep or None, pseudo_share=args.pseudo_share)
        start = time.perf_counter()
        results = simulate(source, work / "experiment", settings)
        seconds = time.perf_counter() - start
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    arms = results["arms"]
    alseg = {a: d["final"]["mean_dice"] for a, d in arms.items() if "+" in a}
    best = max(alseg, key=alseg.get) if alseg else None
    full = arms.get("full supervision", {}).get("final", {}).get("mean_dice")
    figures = {
        "fraction": results["fraction"],
        "dice": results["dice"],
        "ratio_to_full": results["ratio_to_full"],
        "pseudo_label_dice": results["pseudo_label_dice"],
        "per_seed": {a: d["final"]["per_seed"] for a, d in arms.items()},
        "curves": {a: d["points"] for a, d in arms.items()},
        "sweep": results.get("sweep"),
        "best_alseg_arm": best,
        "goals": {
            "best_alseg_ratio_to_full": results["ratio_to_full"].get(best) if best else None,
            "best_alseg_at_least_0.97_of_full": bool(best and full and alseg[best] >= 0.97 * full),
            "hybrid_at_least_random": {m: (arms[f"hybrid+{m}"]["final"]["mean_dice"] >= arms[f"random+{m}"]["final"]["mean_dice"])
                                       for m in ("finetune", "filtermatch") if f"hybrid+{m}" in arms and f"random+{m}" in arms},
        },
        "budget": {"device": args.device, "configuration": args.configuration, "batch_size": args.batch_size,
                   "pretrain": f"{args.pretrain_epochs} x {args.pretrain_iters}", "each_training": f"{args.epochs} x {args.iters}",
                   "each_baseline": "{} x {}".format(*baseline_budget(settings)),
                   "filtermatch": {"warmup": args.warmup, "filter_start": args.filter_start, "filter_every": args.filter_every},
                   "pseudo_share": args.pseudo_share, "training_split": "every label (no validation split)",
                   "rounds": args.rounds, "cases_per_round": args.budget, "seeds": args.seeds,
                   "pool": len(pool), "test": len(test), "split_seed": args.split_seed, "seconds": round(seconds, 1)},
    }
    write_results(args.name, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
