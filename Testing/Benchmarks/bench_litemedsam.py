"""LiteMedSAM, built in: pseudo-label Dice on real volumes, speed against ``SamPredictor.set_image``, and the
oracle experiment on LiteMedSAM's pseudo-labels.

Parts (``--parts``, default all; each part updates its own fields of the results file, with its commit):
- ``speed``: 8 axial slices of the shared CT example through the image encoder, each arm in a fresh
  process (its own peak memory, ``ru_maxrss``): ALSeg's encoder (ONNX Runtime, batch 1; torch, batch 1
  and 4; all in inference mode) and segment-anything's ``SamPredictor.set_image`` per slice on the same
  model. Ratio = set_image seconds per slice / ALSeg's.
- ``hippocampus``: the shared MSD Hippocampus, ``--cases`` cases drawn with ``--split-seed`` (default 120),
  ``--test`` of them held out (default 40: they never get pseudo-labels); on the other (the pool)
  ``alseg pseudolabel --prompts-from-reference N`` for N = 1 and 3 (3D boxes from the reference: the
  structure's slices, the box on the slice of largest area, 5 input pixels of margin), slicing
  ``--axis`` (default sagittal), propagation between boxes by the previous mask or by interpolating the
  boxes. Dice per class against the expert labels. The first variant encodes every slice once; the others
  read the embeddings from the cache (decoder only). Seconds per slice and encoder calls per slice from
  the first variant's provenance.
- ``ct``: the shared CT example (``example_ct_sm``, 30 slices) and its multi-organ label, which a model
  made (TotalSegmentator), not an expert: the five largest structures, axial, soft-tissue window.
- ``memory``: the pseudo-label process alone, in a fresh process, on ``--memory-cases`` Hippocampus cases
  (default 4 and 12: does it grow with the cases?), every slice encoded; resident memory sampled every 20 ms.
- ``oracle``: ``alseg simulate`` on the Hippocampus project of the ``hippocampus`` part (same pool and
  test cases), pseudo-labels from LiteMedSAM with ``--oracle-boxes`` boxes per structure (from the cache),
  arms pseudo-only, hybrid+finetune, random+finetune, supervised-only, full supervision; 2 rounds of
  ``--oracle-budget`` cases (5 % of an 80-case pool: 2 x 2).
- ``share``: after ``oracle``, on its pretrained base (same pseudo-labels, same pretrained weights, same test
  cases): the hybrid+finetune arm again with each ``--shares`` value of the pseudo-label share of fine-tuning
  (the oracle part ran ``--pseudo-share``, default 0.5). Does mixing LiteMedSAM's pseudo-labels into
  fine-tuning help or hurt against human labels alone?

Run alone on the machine (benchmarks sharing the 2 cores with tests doubled their times here):
  .venv/bin/python Testing/Benchmarks/bench_litemedsam.py --parts speed hippocampus ct
  .venv/bin/python Testing/Benchmarks/bench_litemedsam.py --parts oracle --pretrain-epochs 10 --epochs 3 --iters 100
At nnU-Net's budget on a GPU:
  .venv/bin/python Testing/Benchmarks/bench_litemedsam.py --parts oracle --device cuda --configuration 3d_fullres \
      --batch-size 0 --pretrain-epochs 1000 --pretrain-iters 250 --epochs 1000 --iters 250 --val-iters 50
Writes Testing/Benchmarks/results/litemedsam.json (fields: pseudo_label_dice {dataset: {boxes: {class: value}}},
s_per_slice, speedup_vs_set_image, encoder_calls_per_slice, peak_gib, oracle {...}, commit, machine).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from common import commit, machine, shared_data  # noqa: E402

RESULTS = HERE / "results" / "litemedsam.json"
WORK = Path(os.environ.get("ALSEG_BENCH_DIR", "/tmp/alseg-bench-litemedsam"))


def peak_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)  # Linux: KiB


# ---------------------------------------------------------------------------------------
# speed: one arm per process


def ct_slices(n: int) -> np.ndarray:
    import SimpleITK as sitk

    from ALSegLib.pseudolabels.slices import CT_WINDOWS, Window, to_uint8

    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(shared_data() / "ct_example" / "example_ct.nii.gz")))
    ks = np.linspace(arr.shape[0] * 0.3, arr.shape[0] * 0.7, n).astype(int)
    return to_uint8(arr[ks], Window("window", *CT_WINDOWS["soft_tissue"]))


def speed_arm(arm: str, n: int) -> dict:
    import torch

    from ALSegLib.pseudolabels.sam import SliceEmbeddings, load_checkpoint, use_onnx_encoder

    slices = ct_slices(n)
    loaded = load_checkpoint(None)
    if arm == "set_image":
        from segment_anything import SamPredictor

        pred = SamPredictor(loaded.model)
        rgb = np.repeat(slices[0][..., None], 3, axis=2)
        pred.set_image(rgb)  # warm-up
        t = time.perf_counter()
        for s in slices:
            pred.set_image(np.repeat(s[..., None], 3, axis=2))
        dt = time.perf_counter() - t
        return {"arm": arm, "s_per_slice": dt / n, "peak_gib": peak_gib(), "threads": torch.get_num_threads()}
    backend, batch = arm.split("-b")
    batch = int(batch)
    export_s = None
    if backend == "onnx":  # a fresh graph folder: the first run's export (in a child process) is part of the arm
        shutil.rmtree(WORK / "onnx-speed", ignore_errors=True)
        t = time.perf_counter()
        note = use_onnx_encoder(loaded, WORK / "onnx-speed", batch, "onnx")
        export_s = round(time.perf_counter() - t, 1)
        assert note is None and loaded.backend == "onnxruntime"
    emb = SliceEmbeddings(loaded, slices[:batch], (0.8, 0.8), batch=batch)
    emb.encode(range(batch))  # warm-up (and, for ONNX, the export or the cached graph's load)
    emb = SliceEmbeddings(loaded, slices, (0.8, 0.8), batch=batch)
    t = time.perf_counter()
    emb.encode(range(n))
    dt = time.perf_counter() - t
    children = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 3)
    return {"arm": arm, "s_per_slice": dt / n, "peak_gib": peak_gib(), "threads": torch.get_num_threads(),
            "encoder_calls_per_slice": max(emb.encoder_calls.values()),
            **({"export_s": export_s, "export_child_peak_gib": children} if export_s is not None else {})}


def part_speed(args) -> dict:
    arms = ["onnx-b1", "torch-b1", "torch-b4", "set_image"]
    out = {}
    for arm in arms:
        proc = subprocess.run([sys.executable, __file__, "--speed-arm", arm, "--slices", str(args.slices)],
                              capture_output=True, text=True, check=True)
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        out[arm] = rec
        print(f"  {arm}: {rec['s_per_slice']:.3f} s/slice, peak {rec['peak_gib']:.2f} GiB", flush=True)
    best = min(("onnx-b1", "torch-b1", "torch-b4"), key=lambda a: out[a]["s_per_slice"])
    return {"speed": {"slices": args.slices, "workload": "axial slices of the shared CT example (122 x 101 px), "
                      "soft-tissue window, encoder input 256 x 256", "arms": out, "fastest": best,
                      "encoder_s_per_slice": round(out[best]["s_per_slice"], 3),
                      "speedup_vs_set_image": round(out["set_image"]["s_per_slice"] / out[best]["s_per_slice"], 2),
                      "peak_gib": max(out[a]["peak_gib"] for a in out)}}


# ---------------------------------------------------------------------------------------
# Hippocampus


def hippocampus_project(args):
    from ALSegLib import Project

    root = WORK / "hippocampus"
    data = shared_data() / "hippocampus"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (data / "imagesTr").glob("*.nii.gz"))
    chosen = sorted(random.Random(args.split_seed).sample(cases, args.cases))
    test = sorted(random.Random(args.split_seed + 1).sample(chosen, args.test))
    pool = [c for c in chosen if c not in set(test)]
    if (root / "alseg.json").is_file():
        project = Project.open(root)
        if sorted(project.cases()) == chosen:
            return project, pool, test
        shutil.rmtree(root)
    project = Project.create(root, {"anterior": 1, "posterior": 2}, "MRI")
    project.add_cases([data / "imagesTr" / f"{c}.nii.gz" for c in chosen],
                      references=[data / "labelsTr" / f"{c}.nii.gz" for c in chosen], case_ids=chosen)
    return project, pool, test


def dice_per_class(project, cases) -> dict:
    from ALSegLib.evaluation import evaluate

    summary = evaluate(project, "pseudo", cases)["summary"]
    return {k: round(v["dice"]["mean"], 4) for k, v in summary.items() if isinstance(v, dict) and "dice" in v}


def run_variant(project, cases, exclude, n, axis, between, settings_extra=None) -> tuple[dict, list[dict], float]:
    from ALSegLib.pseudolabels.run import pseudolabel_with_sam

    labels = {name: {"between": between, **(settings_extra or {})} for name in project.labels.mapping}
    settings = WORK / f"settings-{project.root.name}.json"
    settings.write_text(json.dumps({"labels": labels}))
    t = time.perf_counter()
    summaries = pseudolabel_with_sam(project, None, prompts_from_reference=n, cases=cases, exclude=exclude,
                                     axis=axis, settings_file=settings)
    return dice_per_class(project, cases), summaries, time.perf_counter() - t


def encoder_figures(summaries: list[dict], seconds: float) -> dict:
    slices = sum(s["encoder"]["slices_encoded"] for s in summaries)
    return {"slices_encoded": slices, "seconds": round(seconds, 1),
            "s_per_slice": round(seconds / slices, 3) if slices else None,
            "encoder_calls_per_slice": max((s["encoder"]["max_calls_per_slice"] for s in summaries), default=None),
            "s_per_volume": round(seconds / len(summaries), 2)}


def part_dataset(project, pool, exclude, axis, dataset: str, variants) -> dict:
    out: dict = {"cases": len(pool), "axis": axis, "variants": {}}
    first = None
    for n, between in variants:
        dice, summaries, seconds = run_variant(project, pool, exclude, n, axis, between)
        boxes = [sum(len(p) for p in json.loads((project.root / "labels" / "pseudo" / f"{s['case']}.json").read_text())
                     ["prompts"].values()) for s in summaries if s["status"] == "written"]
        rec = {"boxes_per_structure": n, "between": between, "dice": dice, "seconds": round(seconds, 1),
               "boxes_per_case": round(float(np.mean(boxes)), 2) if boxes else None}
        if first is None:
            first = encoder_figures(summaries, seconds)
            rec["encoding"] = first
        out["variants"][f"{n}-{between}"] = rec
        print(f"  {dataset} {n} box(es), between {between}: {dice} ({seconds:.0f} s)", flush=True)
    out["encoding"] = first
    return out


def part_hippocampus(args) -> dict:
    project, pool, test = hippocampus_project(args)
    variants = [(1, "mask"), (3, "mask"), (3, "interpolate")]
    res = part_dataset(project, pool, test, args.axis, "hippocampus", variants)
    res.update(test_cases=len(test), split_seed=args.split_seed, peak_gib=peak_gib(),
               reference="expert labels (MSD Task04)")
    return {"hippocampus": res}


def part_ct(args) -> dict:
    import SimpleITK as sitk

    from ALSegLib import Project

    src = shared_data() / "ct_example"
    root = WORK / "ct"
    shutil.rmtree(root, ignore_errors=True)
    seg = sitk.ReadImage(str(src / "example_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    counts = np.bincount(arr.ravel())
    values = [int(v) for v in np.argsort(-counts) if v != 0 and counts[v] > 0][:5]
    keep = np.where(np.isin(arr, values), arr, 0).astype(np.uint8)
    ref = sitk.GetImageFromArray(keep)
    ref.CopyInformation(seg)
    root.mkdir(parents=True)
    sitk.WriteImage(ref, str(root / "ct_label.nrrd"))
    project = Project.create(root / "project", {f"value{v}": v for v in values}, "CT")
    project.add_cases([src / "example_ct_sm.nii.gz"], references=[root / "ct_label.nrrd"], case_ids=["example_ct_sm"])
    res = part_dataset(project, ["example_ct_sm"], [], "axial", "ct", [(1, "mask"), (3, "mask"), (3, "interpolate")])
    res.update(values=values, voxels={str(v): int(counts[v]) for v in values},
               reference="multi-organ label made by a model (TotalSegmentator), not an expert: values by voxel count")
    return {"ct": res}


# ---------------------------------------------------------------------------------------
# memory of the pseudo-label process itself


def memory_arm(n: int, root: Path) -> dict:
    """In a fresh process: ``pseudolabel_with_sam`` on ``n`` Hippocampus cases, every slice encoded (no
    cache), 3 reference boxes per structure; resident memory sampled every 20 ms by a thread (what
    ``ru_maxrss`` gives too), so the peak is the process's own, not a benchmark's that ran more."""
    import threading

    samples = {"peak": 0.0}

    def rss_gib() -> float:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS")) / 2**20

    def sample() -> None:
        while True:
            samples["peak"] = max(samples["peak"], rss_gib())
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    from ALSegLib import Project
    from ALSegLib.pseudolabels.run import pseudolabel_with_sam

    data = shared_data() / "hippocampus"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (data / "imagesTr").glob("*.nii.gz"))[:n]
    shutil.rmtree(root, ignore_errors=True)
    project = Project.create(root, {"anterior": 1, "posterior": 2}, "MRI")
    project.add_cases([data / "imagesTr" / f"{c}.nii.gz" for c in cases],
                      references=[data / "labelsTr" / f"{c}.nii.gz" for c in cases], case_ids=cases)
    after_setup = rss_gib()
    t = time.perf_counter()
    pseudolabel_with_sam(project, None, prompts_from_reference=3, axis="sagittal", cache=False)
    seconds = time.perf_counter() - t
    time.sleep(0.05)
    return {"cases": n, "peak_gib": round(max(samples["peak"], rss_gib()), 3), "ru_maxrss_gib": peak_gib(),
            "after_imports_and_project_gib": round(after_setup, 3), "seconds": round(seconds, 1)}


def part_memory(args) -> dict:
    runs = []
    for n in args.memory_cases:
        done = subprocess.run([sys.executable, __file__, "--memory-arm", str(n)], capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"memory arm ({n} cases) failed:\n{done.stderr[-2000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  {n} cases: peak {runs[-1]['peak_gib']:.2f} GiB", flush=True)
    return {"memory": {"runs": runs, "peak_gib": max(r["peak_gib"] for r in runs),
                       "grows_with_cases": runs[-1]["peak_gib"] - runs[0]["peak_gib"] > 0.1 if len(runs) > 1 else None,
                       "what": "the pseudo-label process alone (fresh process, every slice encoded through ONNX Runtime, "
                               "3 boxes per structure); the one-time ONNX export runs in its own child process, "
                               "measured in the speed part"}}


# ---------------------------------------------------------------------------------------
# the oracle experiment on LiteMedSAM's pseudo-labels


def oracle_rounds(args, pseudo_share: float):
    """The rounds' settings of the oracle part and of the share part (the same but for the share)."""
    from ALSegLib.settings import PseudoSource, RoundSettings

    return RoundSettings(
        budget=str(args.oracle_budget), configuration=args.configuration, batch_size=args.batch_size or None,
        pseudo=PseudoSource("sam", prompts_from_reference=args.oracle_boxes, axis=args.axis),
        pretrain_epochs=args.pretrain_epochs, pretrain_iterations=args.pretrain_iters, epochs=args.epochs,
        iterations=args.iters, val_iterations=args.val_iters, device=args.device, pseudo_share=pseudo_share)


def part_oracle(args) -> dict:
    from ALSegLib.simulate import ExperimentSettings, simulate

    project, pool, test = hippocampus_project(args)
    arms = ["hybrid+finetune", "random+finetune", "pseudo-only", "supervised-only", "full supervision"]
    settings = ExperimentSettings(rounds=2, seeds=[0], test=test, arms=arms, round=oracle_rounds(args, args.pseudo_share))
    out = WORK / "oracle"
    t = time.perf_counter()
    results = simulate(project, out, settings)
    seconds = time.perf_counter() - t
    per_class = {arm: d["final"].get("per_class") for arm, d in results["arms"].items()}
    best = max((a for a in results["dice"] if "+" in a), key=lambda a: results["dice"][a], default=None)
    return {"oracle": {"fraction": results["fraction"], "dice": results["dice"], "ratio_to_full": results["ratio_to_full"],
                       "best_alseg_arm": best, "best_alseg_ratio_to_full": results["ratio_to_full"].get(best) if best else None,
                       "goal_0.97": ((results["ratio_to_full"][best] >= 0.97)
                                     if best and results["ratio_to_full"].get(best) else None),
                       "per_class": per_class, "points": {a: d["points"] for a, d in results["arms"].items()},
                       "pseudo_source": f"litemedsam (built in), {args.oracle_boxes} box(es) per structure per case from "
                       f"the reference (simulated prompts), {args.axis} slices",
                       "pseudo_label_dice": results.get("pseudo_label_dice"), "pool": len(pool), "test": len(test),
                       "seconds": round(seconds), "report": str(out / "experiment.html"),
                       "compute": results["setup"]["compute"], "pseudo_share": args.pseudo_share}}


def part_share(args) -> dict:
    from ALSegLib import Project
    from ALSegLib.simulate import ExperimentSettings, _alseg_arm

    base_dir = WORK / "oracle" / "seed0" / "base"
    if not (base_dir / "models" / "pretrain").is_dir():
        raise SystemExit(f"{base_dir}: no pretrained base; run --parts oracle first")
    base = Project.open(base_dir)
    _, pool, test = hippocampus_project(args)
    runs = {}
    for share in args.shares:
        settings = ExperimentSettings(rounds=2, seeds=[0], test=test, arms=["hybrid+finetune"],
                                      round=oracle_rounds(args, share))
        t = time.perf_counter()
        points, labeled = _alseg_arm(base, WORK / "oracle" / "seed0" / f"hybrid-finetune-share{share:g}",
                                     "hybrid+finetune", settings, test, 0)
        runs[f"{share:g}"] = {"points": points, "final_dice": points[-1]["mean_dice"],
                              "labeled": labeled[-1], "seconds": round(time.perf_counter() - t)}
        print(f"  share {share:g}: final Dice {points[-1]['mean_dice']:.4f}", flush=True)
    return {"oracle_share": {"arm": "hybrid+finetune", "runs": runs, "pool": len(pool), "test": len(test),
                             "what": "fine-tuning from the oracle part's pretrained weights with this share of each "
                                     "batch's draws from pseudo-labeled cases (0: human labels only)"}}


# ---------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", nargs="+", default=["speed", "hippocampus", "ct", "memory", "oracle", "share"],
                    choices=("speed", "hippocampus", "ct", "memory", "oracle", "share"))
    ap.add_argument("--speed-arm", help=argparse.SUPPRESS)
    ap.add_argument("--memory-arm", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--memory-cases", type=int, nargs="+", default=[4, 12])
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--cases", type=int, default=120)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--axis", default="sagittal")
    ap.add_argument("--oracle-boxes", type=int, default=3)
    ap.add_argument("--oracle-budget", type=int, default=2)
    ap.add_argument("--configuration", default="2d")
    ap.add_argument("--batch-size", type=int, default=12)
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--pretrain-iters", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--val-iters", type=int, default=10)
    ap.add_argument("--pseudo-share", type=float, default=0.5)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.0])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.speed_arm:
        print(json.dumps(speed_arm(args.speed_arm, args.slices)))
        return
    if args.memory_arm:
        print(json.dumps(memory_arm(args.memory_arm, WORK / "memory")))
        return
    if shared_data() is None:
        print("shared data not found (../shared/data or ALSEG_SHARED_DATA): nothing measured")
        return
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    os.environ.setdefault("nnUNet_compile", "f")
    WORK.mkdir(parents=True, exist_ok=True)
    record = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"benchmark": "litemedsam"}
    parts = {"speed": part_speed, "hippocampus": part_hippocampus, "ct": part_ct, "memory": part_memory,
             "oracle": part_oracle, "share": part_share}
    for name in args.parts:
        print(f"[{name}]", flush=True)
        t = time.perf_counter()
        figures = parts[name](args)
        if RESULTS.is_file():  # another part may have run meanwhile in another process: keep its fields
            record = json.loads(RESULTS.read_text())
        for key, value in figures.items():
            value["commit"], value["wall_s"] = commit(), round(time.perf_counter() - t)
            record[key] = value
        record["machine"] = machine()
        record["commit"] = commit()
        summarize(record)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record.get(k) for k in ("pseudo_label_dice", "s_per_slice", "speedup_vs_set_image",
                                                   "encoder_calls_per_slice", "peak_gib")}, indent=2))


def summarize(record: dict) -> None:
    """The headline fields the issue names, from the parts measured so far."""
    pld = {}
    for ds in ("hippocampus", "ct"):
        if ds in record:
            pld[ds] = {}
            for key, v in record[ds]["variants"].items():
                n, between = key.split("-")
                if between == "mask" or f"{n}-mask" not in record[ds]["variants"]:
                    pld[ds][n] = v["dice"]
                pld[ds].setdefault("by_variant", {})[key] = v["dice"]
    record["pseudo_label_dice"] = pld
    enc = record.get("hippocampus", {}).get("encoding") or {}
    record["s_per_slice"] = enc.get("s_per_slice")
    record["encoder_calls_per_slice"] = enc.get("encoder_calls_per_slice")
    if "speed" in record:
        record["speedup_vs_set_image"] = record["speed"]["speedup_vs_set_image"]
    # the goal is about ALSeg's processes: the encoder arms and the pseudo-label process (memory part); the
    # hippocampus part's figure is the whole benchmark process's (120-case project built, every variant run)
    peaks = [record[k].get("peak_gib") for k in ("speed", "memory") if k in record]
    record["peak_gib"] = max(p for p in peaks if p is not None) if any(p is not None for p in peaks) else None


if __name__ == "__main__":
    main()
