"""Boxes for a few cases (issue 37): how much is lost when only 10 % or 25 % of the pool is prompted
and a round bootstraps the rest (``ALSegLib.bootstrap``), against prompting every case.

Hippocampus (the shared MSD cases) with the oracle's split and recipe of ``bench_pseudo_trust.py
--parts oracle``: 120 cases drawn with split seed 0, 40 held out (seed 1), 80 the pool; LiteMedSAM
from 3 boxes per structure (simulated from the references, sagittal slices) on the prompted cases,
drawn from the pool with the run's seed; the others bootstrapped (``--bootstrap``, default the
round's); then the hybrid+finetune arm's two rounds of 2 cases (2.5 % then 5 %). Per fraction and
seed: boxes drawn, the pool's pseudo-label Dice (prompted and bootstrapped together), the
bootstrapped cases' own, and the held-out Dice after each round. ``--compare K``: on the first
fraction's base, the two bootstrap methods on the same K unprompted cases (the bootstrap model's
prediction as the pseudo-label, or LiteMedSAM prompted by its outlines): their pseudo-label Dice,
the measurement the default method is chosen by.

LiteMedSAM's pseudo-labels of the pool are made once (about 28 min here) or taken from the oracle's
base where ``bench_pseudo_trust.py --parts oracle`` left one (same request: same model, boxes, axis).
Budget here (2 CPU cores, alone): about 30 min per fraction below 100 %, 25 min for 100 %, plus
``--compare``'s LiteMedSAM (about 20 s a case). Results merge into ``results/few_prompts.json``
(fractions and seeds run in different sessions add up).
  .venv/bin/python Testing/Benchmarks/bench_few_prompts.py --fractions 0.1 0.25 1.0 --seeds 0 --compare 20
At nnU-Net's budget on a GPU:
  python Testing/Benchmarks/bench_few_prompts.py --fractions 0.1 0.25 1.0 --seeds 0 1 2 --device cuda \
      --pretrain-epochs 1000 --epochs 250
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import commit, shared_data, write_results  # noqa: E402

RESULTS = HERE / "results" / "few_prompts.json"
BOXES = 3
# provenance fields every stored label has (Project._provenance): the rest is the source's own
STANDARD = {"kind", "case", "source", "produced_by", "time", "tool", "user", "host", "label_values_present",
            "file_sha256", "matches_file"}


def split(hippo: Path) -> tuple[list[str], list[str]]:
    """The oracle's cases and held-out cases (bench_pseudo_trust.py's oracle)."""
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (hippo / "imagesTr").glob("*.nii.gz"))
    chosen = sorted(random.Random(0).sample(cases, 120))
    return chosen, sorted(random.Random(1).sample(chosen, 40))


def source_project(root: Path, hippo: Path, chosen: list[str]):
    from ALSegLib.project import Project

    if (root / "alseg.json").is_file():
        return Project.open(root)
    project = Project.create(root, {"anterior": 1, "posterior": 2}, "MRI")
    project.add_cases([hippo / "imagesTr" / f"{c}.nii.gz" for c in chosen],
                      references=[hippo / "labelsTr" / f"{c}.nii.gz" for c in chosen], case_ids=chosen)
    return project


def lite_cache(work: Path, source, pool: list[str], lite_from: Path | None, device: str):
    """A project holding LiteMedSAM's pseudo-labels of every pool case (3 boxes per structure, sagittal)."""
    from ALSegLib.project import Project
    from ALSegLib.pseudolabels.run import pseudolabel_with_sam

    if lite_from is not None and (lite_from / "alseg.json").is_file():
        cache = Project.open(lite_from)
        if set(pool) <= set(cache.labeled_cases("pseudo")):
            return cache
    root = work / "litemedsam"
    if (root / "alseg.json").is_file():
        cache = Project.open(root)
    else:
        cache = source.copy_to(root)
    todo = [c for c in pool if cache.label_path(c, "pseudo") is None]
    if todo:
        pseudolabel_with_sam(cache, None, prompts_from_reference=BOXES, axis="sagittal", cases=todo, device=device,
                             exclude=[c for c in cache.cases() if c not in set(pool)])
    return cache


def copy_pseudo(cache, dest, case: str) -> None:
    prov = cache.provenance(case, "pseudo", check_file=False)
    dest.write_label(case, "pseudo", cache.read_label(case, "pseudo"), source=prov["source"],
                     produced_by=prov["produced_by"], **{k: v for k, v in prov.items() if k not in STANDARD})


def round_settings(args, unprompted: list[str]):
    from ALSegLib.settings import PseudoSource, RoundSettings

    return RoundSettings(
        budget="2", configuration="2d", batch_size=12,
        pseudo=PseudoSource("sam", prompts_from_reference=BOXES, axis="sagittal", exclude=tuple(unprompted)),
        pretrain_epochs=args.pretrain_epochs, pretrain_iterations=100, epochs=args.epochs, iterations=100,
        val_iterations=10, device=args.device, **({"bootstrap": args.bootstrap} if args.bootstrap else {}))


def dice(project, cases: list[str]) -> float | None:
    from ALSegLib.evaluation import evaluate

    return round(evaluate(project, "pseudo", cases)["summary"]["mean"]["dice"]["mean"], 4) if cases else None


def compare_methods(base, work: Path, unprompted: list[str], k: int, device: str) -> dict:
    """The two bootstrap methods on the same ``k`` unprompted cases of a base: the bootstrap model's
    prediction (the base's pseudo-label) against LiteMedSAM prompted by its outlines."""
    import shutil

    from ALSegLib.bootstrap import MODEL
    from ALSegLib.pseudolabels.run import pseudolabel_with_sam

    cases = [c for c in unprompted if base.label_path(c, "pseudo") is not None][:k]
    copy = base.copy_to(work / "compare")
    priors = work / "compare-priors"
    shutil.rmtree(priors, ignore_errors=True)
    priors.mkdir(parents=True)
    for case in cases:
        shutil.copyfile(copy.label_path(case, "pseudo"), priors / f"{case}.nrrd")
    before = dice(copy, cases)
    t = time.perf_counter()
    pseudolabel_with_sam(copy, None, from_labels=priors, axis="sagittal", cases=cases, device=device,
                         provenance={"bootstrapped_from": "compare", "bootstrap": {"method": "sam", "model": MODEL}})
    return {"cases": len(cases), "predict": before, "sam": dice(copy, cases),
            "sam_seconds_per_case": round((time.perf_counter() - t) / max(1, len(cases)), 1)}


def run_fraction(args, fraction: float, seed: int, source, cache, pool: list[str], test: list[str], work: Path) -> dict:
    from ALSegLib.bootstrap import prompt_effort
    from ALSegLib.project import Project
    from ALSegLib.simulate import ExperimentSettings, simulate

    n = max(1, round(fraction * len(pool)))
    prompted = sorted(random.Random(seed).sample(pool, n))
    unprompted = [c for c in pool if c not in set(prompted)]
    folder = work / f"seed{seed}" / f"f{fraction:g}"
    src_root = folder / "source"
    if (src_root / "alseg.json").is_file():
        src = Project.open(src_root)
    else:
        src = source.copy_to(src_root)
        for case in prompted:
            copy_pseudo(cache, src, case)
    t = time.perf_counter()
    settings = ExperimentSettings(rounds=2, seeds=[seed], test=test, arms=["hybrid+finetune", "pseudo-only"],
                                  round=round_settings(args, unprompted))
    results = simulate(src, folder / "run", settings)
    base = Project.open(folder / "run" / f"seed{seed}" / "base")
    boot = [c for c in unprompted if base.label_path(c, "pseudo") is not None]
    points = results["arms"]["hybrid+finetune"]["points"]
    row = {"seconds": round(time.perf_counter() - t, 1), "prompted_cases": n, "boxes": prompt_effort(base, pool)["boxes"],
           "pseudo_label_dice": results.get("pseudo_label_dice"), "bootstrapped_cases": len(boot),
           "bootstrapped_dice": dice(base, boot), "prompted_dice": dice(base, prompted),
           "dice_by_fraction": {f"{p['fraction']:.3g}": round(p["mean_dice"], 4) for p in points},
           "final_dice": round(points[-1]["mean_dice"], 4), "commit": commit(),
           "method": round_settings(args, unprompted).bootstrap if unprompted else None}
    if "pseudo-only" in results["arms"]:  # the pretrained model alone (on prompted + bootstrapped pseudo-labels)
        row["pretrained_dice"] = round(results["arms"]["pseudo-only"]["points"][0]["mean_dice"], 4)
    if args.compare and unprompted and "compare" not in args.done_compare:
        row["compare"] = compare_methods(base, folder, unprompted, args.compare, args.device)
        args.done_compare.add("compare")
    return row


def from_oracle(seed: int, pool: list[str], oracle_base: Path | None) -> dict | None:
    """100 % prompted as bench_pseudo_trust.py's oracle measured it (same split, recipe and pseudo-labels)."""
    from ALSegLib.bootstrap import prompt_effort
    from ALSegLib.project import Project

    trust = (HERE / "results" / "pseudo_trust").with_suffix(".json")  # bench_pseudo_trust.py's results file
    row = json.loads(trust.read_text()).get("oracle", {}).get("per_seed", {}).get(str(seed)) if trust.is_file() else None
    if not row or "hybrid+finetune" not in row["fractions"].get("0.05", {}):
        return None
    boxes = prompt_effort(Project.open(oracle_base), pool)["boxes"] if oracle_base and oracle_base.is_dir() else None
    return {"prompted_cases": len(pool), "boxes": boxes, "pseudo_label_dice": row["pseudo_label_dice"],
            "bootstrapped_cases": 0, "dice_by_fraction": {f: a["hybrid+finetune"] for f, a in row["fractions"].items()
                                                          if "hybrid+finetune" in a},
            "pretrained_dice": row["fractions"].get("0", {}).get("pseudo-only"),
            "final_dice": row["fractions"]["0.05"]["hybrid+finetune"], "commit": row["commit"],
            "measured_by": "bench_pseudo_trust.py --parts oracle (its results' oracle.per_seed): same split, "
                           "recipe and pseudo-labels; not rerun here"}


def merge(per_seed_rows: dict, args) -> None:
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    per = old.get("per_seed", {})
    for key, row in per_seed_rows.items():
        per[key] = row
    fractions: dict = {}
    for key in sorted(per, key=lambda k: (float(k.split("/")[0]), int(k.split("/")[1]))):
        fraction, seed = key.split("/")
        row = per[key]
        entry = fractions.setdefault(fraction, {"seeds": [], "boxes": [], "pseudo_label_dice": [], "final_dice": [],
                                                "bootstrapped_dice": []})
        entry["seeds"].append(int(seed))
        for field in ("boxes", "pseudo_label_dice", "final_dice", "bootstrapped_dice"):
            entry[field].append(row.get(field))
    compare = next((r["compare"] for r in per.values() if "compare" in r), old.get("bootstrap_methods"))
    goal = {}
    for seed in {k.split("/")[1] for k in per}:
        ten, full = per.get(f"0.1/{seed}"), per.get(f"1/{seed}")
        if ten and full:
            goal[seed] = {"final_dice_gap": round(full["final_dice"] - ten["final_dice"], 4),
                          "boxes_ratio": round(ten["boxes"] / full["boxes"], 4) if ten["boxes"] and full["boxes"] else None,
                          "met": bool(full["final_dice"] - ten["final_dice"] <= 0.02)}
    write_results("few_prompts", {
        "prompted_fraction": fractions, "per_seed": per, "bootstrap_methods": compare, "goal_10_percent": goal,
        "goal": "10 % prompted ends within 0.02 Dice of 100 % prompted, with a tenth of the boxes",
        "setup": f"Hippocampus, 80 pool / 40 held out (oracle split seed 0); LiteMedSAM from {BOXES} boxes per structure "
                 "(simulated from references, sagittal) on the prompted cases; the rest bootstrapped; hybrid+finetune, "
                 "2 rounds x 2 cases (2.5 % then 5 %)",
        "compute": f"2d, batch 12, {args.device}; bootstrap model and pretraining {args.pretrain_epochs} x 100 steps each; "
                   f"each round {args.epochs} x 100 from the pretrained weights (trust 0.2, lr 1e-2)",
        "rerun_on_gpu": "python Testing/Benchmarks/bench_few_prompts.py --fractions 0.1 0.25 1.0 --seeds 0 1 2 "
                        "--device cuda --pretrain-epochs 1000 --epochs 250"})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25, 1.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--bootstrap", choices=("predict", "sam"), help="the method (default: the round's)")
    ap.add_argument("--compare", type=int, default=0, help="compare the bootstrap methods on K unprompted cases")
    ap.add_argument("--full-from-oracle", action="store_true",
                    help="100 %%: take bench_pseudo_trust.py's oracle run of the same seed instead of running it")
    ap.add_argument("--pretrain-epochs", type=int, default=10, help="x 100 steps (the bootstrap model's too)")
    ap.add_argument("--epochs", type=int, default=10, help="each round's fine-tuning, x 100 steps")
    ap.add_argument("--lite-from", default="/tmp/alseg-bench-trust/oracle/seed0/seed0/base",
                    help="a project with LiteMedSAM's pseudo-labels of the pool (the oracle's base)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="/tmp/alseg-bench-few")
    args = ap.parse_args()
    args.done_compare = set()
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("ALSEG_PROGRESS", "off")
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found: nothing measured")
        return
    hippo = data / "hippocampus"
    work = Path(args.dir)
    chosen, test = split(hippo)
    pool = [c for c in chosen if c not in set(test)]
    source = source_project(work / "source", hippo, chosen)
    lite_from = Path(args.lite_from) if args.lite_from else None
    cache = None
    for seed in args.seeds:
        for fraction in args.fractions:
            if fraction >= 1.0 and args.full_from_oracle:
                row = from_oracle(seed, pool, lite_from)
                if row is None:
                    print(f"seed {seed}: no oracle run to take 100 % from; run it without --full-from-oracle")
                    continue
            else:
                cache = cache or lite_cache(work, source, pool, lite_from, args.device)
                row = run_fraction(args, fraction, seed, source, cache, pool, test, work)
            print(json.dumps({"fraction": fraction, "seed": seed, **row}), flush=True)
            merge({f"{fraction:g}/{seed}": row}, args)


if __name__ == "__main__":
    main()
