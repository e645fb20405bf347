"""Pseudo-labels that never hurt (issue 35): the demo on the built-in LiteMedSAM's pseudo-labels, and
an ablation of the round's recipe on the same pseudo-labels, each change alone and together.

Parts (``--parts``; each writes its own section of ``results/pseudo_trust.json``, merged with what
the file already holds, so parts run in separate sessions add up):

- ``ablation``: per seed, one phantom project as ``alseg demo`` makes it (24 phantoms of 48³, 6
  held out) with LiteMedSAM pseudo-labels from one box per structure per case (made once, then
  copied: every arm sees the very same pseudo-labels); the demo's two rounds of 2 hybrid-selected
  cases under each arm's recipe, each arm's pretraining shared with the arms of the same trust
  setting (the pretraining is where the prior decides); per arm pseudo-only, round 1, round 2 and
  a from-scratch model on round 2's human labels (``supervised-only``, 40 x 25 steps, what the
  demo gives it), per class, and the effort (voxels corrected / drawn from scratch).
- ``demo``: ``alseg demo --pseudo-source sam --seed S --json`` end to end per seed, wall seconds.
- ``cardiac``: LiteMedSAM on the shared ACDC cine-MRI volumes from one box per structure, the first
  patients' references stored as human labels, and the trust table: does it mark the myocardium?

Run alone on the machine (sharing the 2 cores doubles the times); the budget of one ablation
seed is about 50 min here (pretraining 2 x 750 steps, up to 2 x 1000 fine-tuning steps per arm,
one supervised-only model per distinct set of human labels), plus 15 min of LiteMedSAM:
  .venv/bin/python Testing/Benchmarks/bench_pseudo_trust.py --parts ablation --seeds 0
  .venv/bin/python Testing/Benchmarks/bench_pseudo_trust.py --parts demo --seeds 0 1 2
The same at nnU-Net's budget on a GPU (the arms' steps scale with --scale):
  python Testing/Benchmarks/bench_pseudo_trust.py --parts ablation --seeds 0 1 2 --device cuda --scale 10
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, write_results  # noqa: E402

RESULTS = HERE / "results" / "pseudo_trust.json"

# arm -> the round settings it changes from the demo's (trust_dice None: every pseudo-label taken whole)
ARMS = {
    "trust + steps": {"trust_dice": 0.5, "epochs": 40},
    "before (trust off, 10x25)": {"trust_dice": None, "epochs": 10},
    "steps (40x25)": {"trust_dice": None, "epochs": 40},
    "trust": {"trust_dice": 0.5, "epochs": 10},
    "trust + steps + from previous round": {"trust_dice": 0.5, "epochs": 40, "finetune_from": "previous"},
    "trust + steps, human labels only": {"trust_dice": 0.5, "epochs": 40, "pseudo_share": 0.0},
    "trust + steps + lr 1e-3": {"trust_dice": 0.5, "epochs": 40, "learning_rate": 1e-3},
    "trust 0.2 + steps": {"trust_dice": 0.2, "epochs": 40},
    "steps + from previous round": {"trust_dice": None, "epochs": 40, "finetune_from": "previous"},
    "steps + lr 1e-3": {"trust_dice": None, "epochs": 40, "learning_rate": 1e-3},
    "steps, human labels only": {"trust_dice": None, "epochs": 40, "pseudo_share": 0.0},
    "trust + steps, pseudo share 0.25": {"trust_dice": 0.5, "epochs": 40, "pseudo_share": 0.25},
}
SUPERVISED_STEPS = 1000  # 40 x 25: what the demo's supervised-only row trains


def source_project(folder: Path, seed: int):
    """The demo's phantom project for ``seed`` with LiteMedSAM pseudo-labels on its training cases (made once)."""
    from ALSegLib.demo import DemoSettings, demo_pseudo_source, phantom_project
    from ALSegLib.loop import make_pseudolabels
    from ALSegLib.project import Project

    done = folder / "source.done"
    if done.is_file():
        return Project.open(folder / "project"), json.loads(done.read_text())
    if folder.exists():
        import shutil

        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    project = phantom_project(folder, 24, "CT", seed)
    cases = project.cases()
    test = sorted(random.Random(seed).sample(cases, max(1, round(0.25 * len(cases)))))
    t = time.perf_counter()
    spec = demo_pseudo_source(DemoSettings(pseudo_source="sam"))
    make_pseudolabels(project, [c for c in cases if c not in test], {**spec, "exclude": test})
    info = {"test": test, "litemedsam_s": round(time.perf_counter() - t, 1)}
    done.write_text(json.dumps(info))
    return project, info


def metrics_row(metrics: dict) -> dict:
    from ALSegLib.report import curve_point

    point = curve_point(metrics, 0)
    return {"mean_dice": round(point["mean_dice"], 4), "dice": {k: round(v, 4) for k, v in point["per_class"].items()},
            "hd95": metrics["summary"]["mean"]["hd95"]["mean"]}


def ablation(seed: int, work: Path, arms: list[str], scale: int, device: str) -> dict:
    from ALSegLib.demo import demo_round
    from ALSegLib.evaluation import evaluate
    from ALSegLib.loop import prepare, run_round, score_held_out
    from ALSegLib.nnunet.train import train
    from ALSegLib.project import Project
    from ALSegLib.rounds import RoundRecord, review_effort
    from ALSegLib.simulate import SimulatedAnnotator

    source, info = source_project(work / "source", seed)
    test = info["test"]
    train_cases = [c for c in source.cases() if c not in test]
    pseudo_dice = evaluate(source, "pseudo", train_cases)["summary"]
    earlier = json.loads(RESULTS.read_text()).get("ablation", {}).get(str(seed), {}) if RESULTS.is_file() else {}
    out = {"seed": seed, "litemedsam_s": info["litemedsam_s"], "test_cases": test,
           "pseudo_label_dice": {k: round(v["dice"]["mean"], 4) for k, v in pseudo_dice.items()},
           "arms": dict(earlier.get("arms", {}))}  # arms run before (same pseudo-labels) are kept
    base_round = demo_round().with_changes(exclude=test, seed=seed, device=device,
                                           pretrain_epochs=demo_round().pretrain_epochs * scale)
    bases = {}
    supervised = {tuple(a["human_cases"]): a["supervised_only"] for a in out["arms"].values()}
    for arm in arms:
        changes = dict(ARMS[arm])
        changes["epochs"] = changes["epochs"] * scale
        settings = base_round.with_changes(**changes)
        # one pretrained base with trust, one without (before any human label the threshold plays no part),
        # each kept for a later run of more arms
        key = "on" if settings.trust_dice is not None else "off"
        if key not in bases:
            folder, marker = work / f"base-trust-{key}", work / f"base-trust-{key}.json"
            if marker.is_file():
                kept = json.loads(marker.read_text())
                bases[key] = (Project.open(folder), kept["metrics"], kept["seconds"])
            else:
                t = time.perf_counter()
                base = source.copy_to(folder)
                metrics = prepare(base, settings)["pretrain"]["metrics"]
                bases[key] = (base, metrics, round(time.perf_counter() - t, 1))
                marker.write_text(json.dumps({"metrics": metrics, "seconds": bases[key][2]}))
        base, pretrained, base_s = bases[key]
        t = time.perf_counter()
        project = base.copy_to(work / f"arm-{list(ARMS).index(arm)}")
        annotator = SimulatedAnnotator(test)
        records = [RoundRecord(run_round(project, settings, annotator=annotator)) for _ in range(2)]
        arm_s = round(time.perf_counter() - t, 1)
        human = tuple(sorted(project.labeled_cases("human")))
        if human not in supervised:
            copy = project.copy_to(work / f"supervised-{hashlib.sha1(' '.join(human).encode()).hexdigest()[:8]}")
            iterations = settings.iterations
            train(copy, "supervised", name="supervised-only", epochs=SUPERVISED_STEPS * scale // iterations,
                  iterations=iterations, val_iterations=settings.val_iterations, device=device, validate=False,
                  exclude_cases=test, seed=seed)
            supervised[human] = metrics_row(score_held_out(copy, "supervised-only", test, test, device))
        effort = review_effort(project)
        trust = records[-1].data["stages"]["train"].get("trust")
        out["arms"][arm] = {
            "settings": changes, "pretrain_shared_s": base_s, "rounds_s": arm_s,
            "pseudo_only": metrics_row(pretrained), "round1": metrics_row(records[0].metrics),
            "round2": metrics_row(records[1].metrics), "supervised_only": supervised[human],
            "human_cases": list(human),
            "effort": {k: effort[k] for k in ("accepted", "voxels_changed", "voxels_from_scratch", "corrected_fraction")},
            "trust_at_round2": None if trust is None else {r["name"]: {k: r[k] for k in ("state", "mean", "cases")}
                                                           for r in trust["classes"]},
        }
        a = out["arms"][arm]
        print(f"[seed {seed}] {arm}: pseudo-only {a['pseudo_only']['mean_dice']:.3f} -> r1 {a['round1']['mean_dice']:.3f}"
              f" -> r2 {a['round2']['mean_dice']:.3f} {a['round2']['dice']}; supervised-only "
              f"{a['supervised_only']['mean_dice']:.3f}; {arm_s:.0f} s", flush=True)
        merge({"ablation": {str(seed): out}})
    return out


def cardiac(work: Path, humans: int) -> dict:
    """LiteMedSAM on the shared cardiac cine-MRI set (ACDC: Bernard et al., IEEE TMI 2018), one box per
    structure per slice-stack from the references along the short axis; then the references of the
    first ``humans`` patients (both frames) stored as human labels, as the oracle's annotator does, and
    the trust table the project reads from them. What is measured: whether trust marks the class the
    model fails on (the myocardium ring) and keeps the others."""
    import shutil

    from common import shared_data

    from ALSegLib.evaluation import evaluate
    from ALSegLib.loop import make_pseudolabels
    from ALSegLib.project import LabelTable, Project
    from ALSegLib.simulate import SimulatedAnnotator
    from ALSegLib.trust import TRUST_DICE, trust_table

    data = shared_data()
    if data is None or not (data / "acdc" / "imagesTr").is_dir():
        return {"skipped": "../shared/data/acdc is not present"}
    if work.exists():
        shutil.rmtree(work)
    table = LabelTable.from_mapping({"right_ventricle": 1, "myocardium": 2, "left_ventricle": 3})
    project = Project.create(work / "project", table, "MRI", name="acdc")
    project.add_cases([data / "acdc" / "imagesTr"], reference_dir=data / "acdc" / "labelsTr")
    cases = project.cases()
    t = time.perf_counter()
    make_pseudolabels(project, cases, {"source": "sam", "prompts_from_reference": 1})
    seconds = round(time.perf_counter() - t, 1)
    per_class = evaluate(project, "pseudo", cases)["summary"]
    patients = sorted({c.split("_")[0] for c in cases})[:humans]
    annotator = SimulatedAnnotator([])
    for case in cases:
        if case.split("_")[0] in patients:
            annotator(project, case, {"case": case, "open_with": "pseudo"})
    out = {"cases": len(cases), "litemedsam_s": seconds, "human_patients": patients,
           "pseudo_label_dice": {k: round(v["dice"]["mean"], 4) for k, v in per_class.items()}}
    for threshold in sorted({TRUST_DICE, 0.2, 0.5}):
        trust = trust_table(project, threshold)
        out[f"trust_at_{threshold}"] = {r["name"]: {k: r[k] for k in ("state", "mean", "std", "min", "cases")}
                                        for r in trust["classes"]}
    print(json.dumps(out, indent=1), flush=True)
    return out


def run_demo(seed: int, folder: Path, device: str) -> dict:
    env = dict(os.environ, nnUNet_def_n_proc=os.environ.get("nnUNet_def_n_proc", "1"),
               nnUNet_compile=os.environ.get("nnUNet_compile", "f"))
    cmd = [str(REPO / ".venv" / "bin" / "alseg"), "--progress", "off", "demo", "--dir", str(folder), "--seed", str(seed),
           "--pseudo-source", "sam", "--device", device, "--json"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = round(time.perf_counter() - t, 1)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: alseg demo exited {done.returncode}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    rows = {("supervised_only" if r["model"].startswith("supervised") else
             ("pseudo_only" if r["round"] == 0 else f"round{r['round']}")): r for r in result["rows"]}
    return {"seed": seed, "pseudo_only": rows["pseudo_only"]["mean_dice"], "round1": rows["round1"]["mean_dice"],
            "round2": rows["round2"]["mean_dice"], "supervised_only": rows["supervised_only"]["mean_dice"],
            "round2_per_class": rows["round2"]["dice"], "supervised_only_per_class": rows["supervised_only"]["dice"],
            "pseudo_label_dice": result["pseudo_label_dice"], "wall_s": wall}


def merge(section: dict) -> None:
    """Add ``section`` to the results file (other parts' sections kept)."""
    old = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    figures = {k: v for k, v in old.items() if k not in ("benchmark", "commit", "machine", "time")}
    for key, value in section.items():
        if isinstance(value, dict) and isinstance(figures.get(key), dict):
            figures[key] = {**figures[key], **value}
        else:
            figures[key] = value
    write_results("pseudo_trust", figures)


ORACLE_ARMS = ["hybrid+finetune", "random+finetune", "hybrid+filtermatch", "pseudo-only", "supervised-only",
               "full supervision"]


def oracle(args) -> dict:
    """The Hippocampus oracle on LiteMedSAM's pseudo-labels with the round recipe of the defaults (trust
    0.2, fine-tuning from the pretrained weights at nnU-Net's learning rate): ``--oracle-cases`` cases
    drawn with split seed 0, 40 held out, the rest the pool; 2 rounds of ``--oracle-budget`` cases (with
    an 80-case pool, 2 x 2: 2.5 % then 5 %); one experiment folder per seed under --dir (a stopped run
    resumes: every job is stored whole). Per fraction and arm the Dice of each seed, full supervision per
    seed, and the effort (cumulative voxels corrected / drawn from scratch) per arm at the last fraction."""
    import random as _random

    from common import commit, shared_data

    from ALSegLib.project import Project
    from ALSegLib.settings import PseudoSource, RoundSettings
    from ALSegLib.simulate import ExperimentSettings, simulate

    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found: the oracle part measured nothing")
        return {}
    hippo = data / "hippocampus"
    work = Path(args.dir) / "oracle"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (hippo / "imagesTr").glob("*.nii.gz"))
    chosen = sorted(_random.Random(0).sample(cases, args.oracle_cases))
    test = sorted(_random.Random(1).sample(chosen, 40))
    root = work / "source"
    if (root / "alseg.json").is_file():
        source = Project.open(root)
    else:
        source = Project.create(root, {"anterior": 1, "posterior": 2}, "MRI")
        source.add_cases([hippo / "imagesTr" / f"{c}.nii.gz" for c in chosen],
                         references=[hippo / "labelsTr" / f"{c}.nii.gz" for c in chosen], case_ids=chosen)
    rounds = RoundSettings(
        budget=str(args.oracle_budget), configuration="2d", batch_size=12,
        pseudo=PseudoSource("sam", prompts_from_reference=args.oracle_boxes, axis="sagittal"),
        pretrain_epochs=args.oracle_pretrain_epochs, pretrain_iterations=100, epochs=args.oracle_epochs, iterations=100,
        val_iterations=10, device=args.device,
        # FilterMatch's schedule scaled to a 10-epoch round as nnFilterMatch's 20/100/100 is to 1000 epochs
        filtermatch={"warmup_epochs": 1, "filter_start": 3, "filter_every": 3})
    old = json.loads(RESULTS.read_text()).get("oracle", {}) if RESULTS.is_file() else {}
    per_seed = dict(old.get("per_seed", {}))  # seeds run in earlier sessions are kept
    for seed in args.seeds:
        t = time.perf_counter()
        results = simulate(source, work / f"seed{seed}", ExperimentSettings(
            rounds=2, seeds=[seed], test=test, arms=args.oracle_arms, round=rounds))
        row: dict = {"seconds": round(time.perf_counter() - t, 1), "pseudo_label_dice": results.get("pseudo_label_dice"),
                     "fractions": {}, "per_class": {}, "effort": {}, "commit": commit()}
        for arm, data_ in results["arms"].items():
            for point in data_["points"]:
                dice = round(point["mean_dice"], 4)
                if arm == "full supervision":
                    row["full"] = dice
                    continue
                fraction = f"{point['fraction']:.3g}"
                row["fractions"].setdefault(fraction, {})[arm] = dice
                row["per_class"].setdefault(fraction, {})[arm] = {c: round(v, 4) for c, v in point["per_class"].items()}
            last = data_["points"][-1]
            if arm not in ("pseudo-only", "full supervision") and last.get("corrected_fraction") is not None:
                row["effort"][arm] = round(last["corrected_fraction"], 4)
        per_seed[str(seed)] = row
        print(json.dumps({"seed": seed, "dice": results["dice"]}), flush=True)
    seeds = sorted(per_seed, key=int)
    fractions: dict = {}
    for seed in seeds:
        for fraction, arms in per_seed[seed]["fractions"].items():
            for arm, dice in arms.items():
                fractions.setdefault(fraction, {}).setdefault(arm, []).append(dice)
    efforts: dict = {}
    for seed in seeds:
        for arm, value in per_seed[seed]["effort"].items():
            efforts.setdefault(arm, []).append(value)
    out = {"per_seed": per_seed, "seeds_run": [int(x) for x in seeds], "fractions": fractions,
           "full": [per_seed[x].get("full") for x in seeds],
           "effort": {arm: round(float(sum(v) / len(v)), 4) for arm, v in efforts.items()}}
    out.update(pool=len(chosen) - len(test), test=len(test), arms=args.oracle_arms,
               pseudo_source=f"LiteMedSAM (built in), {args.oracle_boxes} boxes per structure per case from the "
                             "reference (simulated prompts), sagittal slices",
               compute=f"2d, batch 12, {args.device}; pretraining {args.oracle_pretrain_epochs} x 100 steps; each round "
                       f"{args.oracle_epochs} x 100 from the pretrained weights (trust 0.2, lr 1e-2); each from-scratch "
                       "baseline pretraining + one round's steps; FilterMatch warm-up 1, filter from epoch 3 every 3",
               rerun_on_gpu="python Testing/Benchmarks/bench_pseudo_trust.py --parts oracle --seeds 0 1 2 --device cuda "
                            "--oracle-pretrain-epochs 1000 --oracle-epochs 250")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["ablation"], choices=("ablation", "demo", "cardiac", "oracle"))
    ap.add_argument("--oracle-cases", type=int, default=120, help="Hippocampus cases drawn (40 held out, the rest the pool)")
    ap.add_argument("--oracle-budget", type=int, default=2, help="cases per round (2 x 2 = 2.5 %% then 5 %% of 80)")
    ap.add_argument("--oracle-boxes", type=int, default=3, help="boxes per structure per case (simulated prompts)")
    ap.add_argument("--oracle-pretrain-epochs", type=int, default=20, help="x 100 steps")
    ap.add_argument("--oracle-epochs", type=int, default=10, help="each round's fine-tuning, x 100 steps")
    ap.add_argument("--oracle-arms", nargs="+", default=ORACLE_ARMS, choices=ORACLE_ARMS)
    ap.add_argument("--cardiac-humans", type=int, default=2, help="patients whose references become human labels")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--scale", type=int, default=1, help="multiply every training's steps (GPU: 10)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="/tmp/alseg-bench-trust")
    args = ap.parse_args()
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    os.environ.setdefault("ALSEG_PROGRESS", "off")
    if "cardiac" in args.parts:
        merge({"cardiac": cardiac(Path(args.dir) / "cardiac", args.cardiac_humans)})
    if "oracle" in args.parts:
        figures = oracle(args)
        if figures:
            merge({"oracle": {k: v for k, v in figures.items() if k != "effort"}, "effort": figures["effort"]})
    for seed in args.seeds:
        if "ablation" in args.parts:
            ablation(seed, Path(args.dir) / f"ablation-seed{seed}", args.arms, args.scale, args.device)
        if "demo" in args.parts:
            row = run_demo(seed, Path(args.dir) / f"demo-seed{seed}", args.device)
            print(json.dumps(row), flush=True)
            old = json.loads(RESULTS.read_text()).get("demo", {}) if RESULTS.is_file() else {}
            per_seed = [r for r in old.get("per_seed", []) if r["seed"] != seed] + [row]
            merge({"demo": {"pseudo_source": "sam (built-in LiteMedSAM, 1 box per structure per case from the references)",
                            "per_seed": sorted(per_seed, key=lambda r: r["seed"])}})


if __name__ == "__main__":
    main()
