"""FilterMatch vs supervised-only vs full supervision on real MRI, same iteration budget.

Data: shared MSD Hippocampus; a seeded split into a training pool (80) and test
cases (40). For each labeled fraction (5 %, 10 % of the pool) the labeled cases'
references are revealed as simulated human labels. Arms, each 2d, batch 12,
the same epochs x iterations on the CPU:
- supervised: the labeled cases only;
- filtermatch: the labeled cases + the rest of the pool unlabeled, as the reference
  (the network labels its own unlabeled batch, lambda_u = 1 switched on after warm-up);
- filtermatch_alseg: ALSeg's options on top: an EMA teacher (decay 0.99) makes the
  pseudo-labels, voxels below ``--confidence`` top-class probability are ignored,
  lambda_u is ramped up over ``--ramp`` epochs and the unlabeled batch is
  ``--unlabeled-batch`` (half the labeled batch by default);
- full: the whole pool labeled (upper bound, once).
The test cases are excluded from every model (FilterMatch never sees them, not
even unlabeled).
Test Dice is the mean over both classes and the test cases. The step-time ratio
compares post-warm-up FilterMatch epochs without a filter pass to supervised epochs
(``step_ratio``: the reference configuration; ``step_ratio_alseg``: ALSeg's options).

Run: .venv/bin/python Testing/Benchmarks/bench_filtermatch.py [--epochs 8 --iters 100]
Writes Testing/Benchmarks/results/filtermatch.json.
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

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from bench_nnunet import mean_dice, split  # noqa: E402
from common import shared_data, write_results  # noqa: E402

from ALSegLib.nnunet.filtermatch import FilterMatchConfig  # noqa: E402
from ALSegLib.nnunet.plan import plan  # noqa: E402
from ALSegLib.nnunet.predict import predict  # noqa: E402
from ALSegLib.nnunet.train import train  # noqa: E402
from ALSegLib.nnunet.trainers import load_checkpoint_safely  # noqa: E402
from ALSegLib.project import LabelTable, Project  # noqa: E402


def make_project(root: Path, hippo: Path, pool, test, labeled) -> Project:
    project = Project.create(root, LabelTable.parse("anterior=1,posterior=2"), "MRI")
    images = pool + test
    project.add_cases(images, references=[hippo / "labelsTr" / p.name for p in images],
                      case_ids=[p.name[: -len(".nii.gz")] for p in images])
    for p in labeled:
        case = p.name[: -len(".nii.gz")]
        project.add_human_label(case, project.read_label(case, "reference"), source="simulated")
    return project


def epoch_seconds(project: Project, record: dict) -> list[float]:
    log = load_checkpoint_safely(project.root / record["checkpoint"])["logging"]
    return [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]


def post_warmup_step(project: Project, record: dict, args) -> float:
    """Seconds per iteration over the post-warm-up epochs without a filter pass."""
    filtered = {d["epoch"] - 1 for d in record["filtermatch"]["filter_log"]}
    secs = epoch_seconds(project, record)
    plain = [s for e, s in enumerate(secs) if e >= args.warmup and e not in filtered]
    return float(np.mean(plain)) / (args.iters + args.val_iters)


def run_arm(project, mode, name, args, test_ids, **kw) -> tuple[float, dict, float]:
    t = time.perf_counter()
    record = train(project, mode, name=name, epochs=args.epochs, iterations=args.iters, val_iterations=args.val_iters,
                   device="cpu", configuration="2d", validate=False, exclude_cases=test_ids, **kw)
    assert record["excluded_cases"] == sorted(test_ids)
    seconds = time.perf_counter() - t
    predict(project, name, test_ids, probabilities=False, device="cpu")
    dice = mean_dice(project, test_ids, lambda c: sitk.GetArrayFromImage(project.read_label(c, "predicted")))
    print(f"{project.root.name} {name}: Dice {dice:.4f} in {seconds:.0f} s", flush=True)
    return dice, record, seconds


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--val-iters", type=int, default=5)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--pool", type=int, default=80)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.10])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--filter-start", type=int, default=3)
    ap.add_argument("--filter-every", type=int, default=2)
    ap.add_argument("--drop", type=float, default=0.15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ramp", type=int, default=2, help="lambda_u ramp-up epochs of the alseg arm")
    ap.add_argument("--confidence", type=float, default=0.9, help="pseudo-label confidence threshold of the alseg arm")
    ap.add_argument("--unlabeled-batch", type=int, default=None, help="unlabeled batch of the alseg arm (default: batch / 2)")
    ap.add_argument("--no-alseg", action="store_true", help="skip the arm with ALSeg's options")
    args = ap.parse_args()
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found; nothing measured")
        return 0
    hippo = data / "hippocampus"
    pool, test = split(hippo, args.pool, args.test, args.seed)
    test_ids = [p.name[: -len(".nii.gz")] for p in test]
    fm_config = FilterMatchConfig(warmup_epochs=args.warmup, filter_start=args.filter_start,
                                  filter_every=args.filter_every, drop_fraction=args.drop)
    alseg_config = FilterMatchConfig(warmup_epochs=args.warmup, filter_start=args.filter_start,
                                     filter_every=args.filter_every, drop_fraction=args.drop, teacher="ema",
                                     ema_decay=0.99, ramp_epochs=args.ramp, confidence=args.confidence,
                                     unlabeled_batch=args.unlabeled_batch or max(1, args.batch // 2))
    work = Path(tempfile.mkdtemp(prefix="alseg-bench-fm-"))
    results: dict = {}
    step = {}
    start = time.perf_counter()
    try:
        full = make_project(work / "full", hippo, pool, test, pool)
        plan(full, policy="human", configurations=("2d",), batch_size=args.batch)
        full_dice, full_rec, _ = run_arm(full, "supervised", "full", args, test_ids)
        step["supervised"] = float(np.mean(epoch_seconds(full, full_rec))) / (args.iters + args.val_iters)
        for fraction in args.fractions:
            n = max(1, round(fraction * len(pool)))
            project = make_project(work / f"f{int(round(fraction * 100)):02d}", hippo, pool, test, pool[:n])
            plan(project, policy="human", configurations=("2d",), batch_size=args.batch)
            sup, _, _ = run_arm(project, "supervised", "sup", args, test_ids)
            fm, fm_rec, _ = run_arm(project, "filtermatch", "fm", args, test_ids, filtermatch=fm_config)
            step.setdefault("filtermatch", []).append(post_warmup_step(project, fm_rec, args))
            fm_alseg = None
            if not args.no_alseg:
                fm_alseg, alseg_rec, _ = run_arm(project, "filtermatch", "fm-alseg", args, test_ids,
                                                 filtermatch=alseg_config)
                step.setdefault("filtermatch_alseg", []).append(post_warmup_step(project, alseg_rec, args))
            results[f"{fraction:.2f}"] = {"labeled": n, "unlabeled": len(pool) - n, "supervised": round(sup, 4),
                                          "filtermatch": round(fm, 4),
                                          "filtermatch_alseg": None if fm_alseg is None else round(fm_alseg, 4),
                                          "full": round(full_dice, 4),
                                          "filter_log": [{"epoch": d["epoch"], "dropped": len(d["dropped"]),
                                                          "remaining": d["remaining"]}
                                                         for d in fm_rec["filtermatch"]["filter_log"]]}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_results("filtermatch", {
        "data": "MSD Task04 Hippocampus (shared): seeded split, pool references revealed as simulated human labels",
        "split": {"pool": args.pool, "test": args.test, "seed": args.seed},
        "configuration": "2d",
        "budget": {"epochs": args.epochs, "iterations_per_epoch": args.iters, "val_iterations_per_epoch": args.val_iters,
                   "batch_size": args.batch, "device": "cpu", "same_for_every_arm": True},
        "filtermatch": {"warmup_epochs": args.warmup, "filter_start": args.filter_start,
                        "filter_every": args.filter_every, "drop_fraction": args.drop, "teacher": "none",
                        "unlabeled_weight": 1.0, "ramp_epochs": 0},
        "filtermatch_alseg": None if args.no_alseg else {
            "teacher": "ema", "ema_decay": 0.99, "ramp_epochs": args.ramp, "confidence": args.confidence,
            "unlabeled_batch": alseg_config.unlabeled_batch, "otherwise": "as filtermatch"},
        "test_cases_excluded_from_training": True,
        "fractions": results,
        "step_s": {arm: round(float(np.mean(v)), 3) for arm, v in step.items()},
        "step_ratio": round(float(np.mean(step["filtermatch"])) / step["supervised"], 3),
        "step_ratio_alseg": None if args.no_alseg else round(
            float(np.mean(step["filtermatch_alseg"])) / step["supervised"], 3),
        "total_s": round(time.perf_counter() - start, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
