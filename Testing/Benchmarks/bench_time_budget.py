"""Estimated vs actual durations, `--minutes`, and the CPU plan, on this machine (issue 25).

For three data sets (phantoms, the shared Hippocampus MRI, the shared CT example) it runs a
short nnU-Net training, a pool prediction and LiteMedSAM pseudo-labels of a few cases, each
announcing its estimate before it starts (the engine's own ``estimate`` events and model
records), and times what they really took. Then `alseg train --minutes 10` on Hippocampus,
timed from outside as a user runs it, and the CT example's CPU plan: the batch it chose and a
real training step at that batch and at nnU-Net's own.

Run alone (the 2 cores shared with anything else double the times; --quick: phantoms and Hippocampus only,
shorter trainings, no CT, no --minutes run):
    .venv/bin/python Testing/Benchmarks/bench_time_budget.py            # about 45 min on 2 cores
    .venv/bin/python Testing/Benchmarks/bench_time_budget.py --quick --name time_budget_quick  # about 10 min
    .venv/bin/python Testing/Benchmarks/bench_time_budget.py --only-minutes --name time_budget_minutes  # about 12 min
Writes Testing/Benchmarks/results/time_budget.json. Goal: every estimate within +-25 % of the
actual; `--minutes 10` finishes in 10 +- 2 min. On a GPU the same command measures the GPU
(`--device cuda --minutes-asked 60` for nnU-Net-sized budgets).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from common import shared_data, write_results

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")

from ALSegLib import phantoms  # noqa: E402
from ALSegLib.nnunet.plan import plan  # noqa: E402
from ALSegLib.nnunet.predict import predict  # noqa: E402
from ALSegLib.nnunet.train import train  # noqa: E402
from ALSegLib.project import LabelTable, Project  # noqa: E402
from ALSegLib.pseudolabels.run import pseudolabel_with_sam  # noqa: E402


@contextlib.contextmanager
def engine_events():
    """The engine's JSON-lines events of the calls inside (captured from stderr)."""
    buffer, saved = io.StringIO(), os.environ.get("ALSEG_PROGRESS")
    os.environ["ALSEG_PROGRESS"] = "jsonl"
    events: list[dict] = []
    try:
        with contextlib.redirect_stderr(buffer):
            yield events
    finally:
        if saved is None:
            os.environ.pop("ALSEG_PROGRESS", None)
        else:
            os.environ["ALSEG_PROGRESS"] = saved
        events.extend(json.loads(line) for line in buffer.getvalue().splitlines() if line.startswith("{"))


def first_estimate(events: list[dict], job: str) -> dict:
    return next(e for e in events if e["event"] == "estimate" and e.get("job") == job)


def ratio(entry: dict) -> dict:
    entry["ratio"] = round(entry["estimated_s"] / entry["actual_s"], 3) if entry["actual_s"] else None
    entry["within_25_percent"] = entry["ratio"] is not None and 0.75 <= entry["ratio"] <= 1.25
    return entry


def three_jobs(project: Project, tag: str, device: str, epochs: int, iters: int, predict_cases: list[str],
               sam_project: Project | None, sam_cases: list[str], configuration: str = "3d_fullres") -> dict:
    """A validated training, a pool prediction and LiteMedSAM pseudo-labels: estimated vs actual."""
    out = {}
    rec = train(project, "pretrain", name=f"{tag}-timed", epochs=epochs, iterations=iters, device=device,
                configuration=configuration, validate=True)
    e = rec["estimate"]
    out[f"{tag}_training"] = ratio({"estimated_s": e["estimated_s"], "actual_s": e["actual_s"],
                                    "budget": f"{epochs} x {iters}", "step_s": e["probe"]["step_s"],
                                    "batch": e["probe"]["batch_size"], "patch": e["probe"]["patch_size"],
                                    "probe_s": e["probe"]["probe_s"], "spent_before_s": e["spent_s"],
                                    "finish_overhead": e["finish_overhead_from"], "validated": True})
    print(f"{tag} training: {out[f'{tag}_training']}", flush=True)
    with engine_events() as events:
        start = time.time()
        predict(project, f"{tag}-timed", predict_cases, probabilities=True, device=device)
        end = time.time()
    told = first_estimate(events, "predict")
    out[f"{tag}_prediction"] = ratio({"estimated_s": told["estimated_s"], "actual_s": round(end - told["time"], 1),
                                      "spent_before_s": round(told["time"] - start, 1), "call_s": round(end - start, 1),
                                      "cases": len(predict_cases), "tiles": told["tiles"], "tile_s": told["tile_s"],
                                      "said": told["message"]})
    print(f"{tag} prediction: {out[f'{tag}_prediction']}", flush=True)
    if sam_project is not None:
        with engine_events() as events:
            start = time.time()
            done = pseudolabel_with_sam(sam_project, None, prompts_from_reference=1, cases=sam_cases, device=device,
                                        cache=False)
            end = time.time()
        told = first_estimate(events, "pseudolabels")
        out[f"{tag}_litemedsam"] = ratio({"estimated_s": told["estimated_s"], "actual_s": round(end - told["time"], 1),
                                          "spent_before_s": round(told["time"] - start, 1), "call_s": round(end - start, 1),
                                          "cases": len(sam_cases), "slices_expected": told["slices"],
                                          "slices_encoded": sum(d["encoder"]["slices_encoded"] for d in done),
                                          "slice_s": told["slice_s"]})
        print(f"{tag} LiteMedSAM: {out[f'{tag}_litemedsam']}", flush=True)
    return out


def with_pseudo_from_reference(project: Project) -> None:
    for case in project.cases():
        project.write_label(case, "pseudo", project.read_label(case, "reference"), source="degraded-reference")


def phantom_part(work: Path, device: str, budget: tuple[int, int]) -> tuple[dict, dict]:
    images, labels = phantoms.write_dataset(work / "phantoms-src", n=12, modality="CT", size=48)
    project = Project.create(work / "phantoms", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    with_pseudo_from_reference(project)
    planned = plan(project, configurations=("3d_fullres",), device=device)
    return three_jobs(project, "phantoms", device, *budget, project.cases()[:6], project, project.cases()[:2]), planned


def hippocampus_project(work: Path, hippo: Path, n: int) -> Project:
    images = sorted((hippo / "imagesTr").glob("*.nii.gz"))[:n]
    src = work / "hippo-src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir(parents=True)
    for image in images:
        shutil.copy(image, src / "images" / image.name)
        shutil.copy(hippo / "labelsTr" / image.name, src / "labels" / image.name)
    project = Project.create(work / "hippocampus", LabelTable.from_mapping({"anterior": 1, "posterior": 2}), "MRI")
    project.add_cases([src / "images"], reference_dir=src / "labels")
    with_pseudo_from_reference(project)
    return project


def ct_projects(work: Path, ct: Path, copies: int) -> tuple[Project, Project]:
    """The CT example for nnU-Net (``copies`` cases of the full 112-slice volume, labelled by
    thresholds: body and bone; identical copies, for timing only) and, for LiteMedSAM, its
    30-slice crop with five organs of the model-made multi-organ label."""
    image = sitk.ReadImage(str(ct / "example_ct.nii.gz"))
    hu = sitk.GetArrayFromImage(image)
    label = np.where(hu > 250, 2, np.where(hu > -300, 1, 0)).astype(np.uint8)
    src = work / "ct-src"
    (src / "images").mkdir(parents=True)
    (src / "labels").mkdir(parents=True)
    lab = sitk.GetImageFromArray(label)
    lab.CopyInformation(image)
    for i in range(copies):
        shutil.copy(ct / "example_ct.nii.gz", src / "images" / f"ct{i}.nii.gz")
        sitk.WriteImage(lab, str(src / "labels" / f"ct{i}.nii.gz"))
    nn = Project.create(work / "ct", LabelTable.from_mapping({"body": 1, "bone": 2}), "CT")
    nn.add_cases([src / "images"], reference_dir=src / "labels")
    with_pseudo_from_reference(nn)
    organs = {"spleen": 1, "kidney_right": 2, "kidney_left": 3, "liver": 5, "stomach": 6}
    seg = sitk.ReadImage(str(ct / "example_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    kept = sitk.GetImageFromArray(np.where(np.isin(arr, list(organs.values())), arr, 0).astype(np.uint8))
    kept.CopyInformation(seg)
    (src / "sm-images").mkdir()
    (src / "sm-labels").mkdir()
    shutil.copy(ct / "example_ct_sm.nii.gz", src / "sm-images" / "ctsm.nii.gz")
    sitk.WriteImage(kept, str(src / "sm-labels" / "ctsm.nii.gz"))
    sam = Project.create(work / "ct-sam", LabelTable.from_mapping(organs), "CT")
    sam.add_cases([src / "sm-images"], reference_dir=src / "sm-labels")
    return nn, sam


def cpu_plan_part(project: Project, planned: dict, device: str) -> dict:
    """A real training step (the probe of a one-iteration training) at the CPU plan's batch and at nnU-Net's."""
    out = {}
    for c in planned["configurations"]:
        chosen, nnunet = planned["batch_size"][c], planned["nnunet_batch_size"][c]
        at_cpu = train(project, "pretrain", name=f"ct-{c}-cpu-batch", configuration=c, epochs=1, iterations=1,
                       val_iterations=1, device=device, validate=False)["estimate"]["probe"]
        at_nnunet = at_cpu if nnunet == chosen else train(
            project, "pretrain", name=f"ct-{c}-nnunet-batch", configuration=c, batch_size=nnunet, epochs=1, iterations=1,
            val_iterations=1, device=device, validate=False)["estimate"]["probe"]
        out[c] = {"batch": chosen, "nnunet_batch": nnunet, "step_s": at_cpu["step_s"], "default_step_s": at_nnunet["step_s"],
                  "step_ratio": round(at_cpu["step_s"] / at_nnunet["step_s"], 3), "patch": at_cpu["patch_size"],
                  "peak_bytes": at_cpu["peak_bytes"], "default_peak_bytes": at_nnunet["peak_bytes"],
                  "reason": (planned.get("cpu_plan") or {}).get(c, {}).get("reason")}
        print(f"CT cpu plan {c}: {out[c]}", flush=True)
    return out


def minutes_part(work: Path, project: Project, minutes: float, device: str) -> dict:
    """`alseg train --minutes N` as a user runs it: a fresh process, timed from outside."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ALSegLib", "train", str(project.root), "--mode", "pretrain", "--name",
                           "minutes-budget", "--minutes", str(minutes), "--device", device, "--json"],
                          capture_output=True, text=True)
    actual = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    record = json.loads(done.stdout)
    told = [line for line in done.stderr.splitlines() if line.startswith(("estimate:", "warning:"))]
    return {"asked_min": minutes, "actual_min": round(actual / 60, 2), "within_2_min": abs(actual / 60 - minutes) <= 2,
            "budget": record["budget"], "estimated_s": record["estimate"]["estimated_s"],
            "spent_before_s": record["estimate"]["spent_s"], "chosen": record["estimate"]["time_budget"]["chosen"],
            "refits": record["estimate"]["time_budget"].get("refits", []), "epochs_done": record.get("epochs_done"),
            "said": told}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="phantoms and Hippocampus only, 2 x 10 trainings (no CT, "
                        "no --minutes run, no CPU plan)")
    parser.add_argument("--only-minutes", action="store_true", help="only `alseg train --minutes` on Hippocampus")
    parser.add_argument("--name", default="time_budget", help="the results file's name (default time_budget)")
    parser.add_argument("--minutes-asked", type=float, default=10.0)
    args = parser.parse_args()
    data = shared_data()
    work = Path(tempfile.mkdtemp(prefix="alseg-time-"))
    t0 = time.perf_counter()
    from ALSegLib.nnunet.estimate import machine_file

    machine_file_state = "present" if machine_file().is_file() else "absent (first run on this machine)"
    estimates: dict = {}
    figures: dict = {"device": args.device}
    try:
        if args.only_minutes:
            if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
                print("shared Hippocampus data not found; nothing measured")
                return 0
            hippo = hippocampus_project(work, data / "hippocampus", 24)
            plan(hippo, configurations=("3d_fullres",), device=args.device)
            figures["minutes_budget"] = minutes_part(work, hippo, args.minutes_asked, args.device)
            figures["machine_file_at_start"] = machine_file_state
            write_results(args.name, {**figures, "seconds": round(time.perf_counter() - t0, 1),
                                      "notes": "alseg train --minutes in a fresh process on a freshly planned project "
                                               "(its probe measured in that process)"})
            return 0
        part, phantom_plan = phantom_part(work, args.device, (2, 10) if args.quick else (4, 25))
        estimates.update(part)
        figures["phantom_plan"] = phantom_plan.get("cpu_plan")
        hippo = None
        if data is not None and (data / "hippocampus" / "imagesTr").is_dir():
            hippo = hippocampus_project(work, data / "hippocampus", 24)
            plan(hippo, configurations=("3d_fullres",), device=args.device)
            estimates.update(three_jobs(hippo, "hippocampus", args.device, *((2, 10) if args.quick else (4, 25)),
                                        hippo.cases()[:10], hippo, hippo.cases()[:3]))
        else:
            figures["hippocampus"] = "not measured: the shared Hippocampus data is absent"
        if args.quick:
            figures["ct"] = "not measured: --quick"
        elif data is not None and (data / "ct_example" / "example_ct.nii.gz").is_file():
            ct, ct_sam = ct_projects(work, data / "ct_example", 4)
            planned = plan(ct, configurations=("3d_fullres", "2d"), device=args.device)
            estimates.update(three_jobs(ct, "ct", args.device, 2, 5, ct.cases()[:2], ct_sam, ct_sam.cases()))
            figures["cpu_plan"] = cpu_plan_part(ct, planned, args.device)
        else:
            figures["ct"] = "not measured: the shared CT example is absent"
        if not args.quick and hippo is not None:
            figures["minutes_budget"] = minutes_part(work, hippo, args.minutes_asked, args.device)
            print(f"--minutes: {figures['minutes_budget']}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    within = [v["within_25_percent"] for v in estimates.values()]
    write_results(args.name, {
        "estimates": estimates, **figures,
        "estimates_within_25_percent": f"{sum(within)} of {len(within)}",
        "seconds": round(time.perf_counter() - t0, 1),
        "notes": "estimated_s: what the engine announced before the job started (training: after its probe; the probe "
                 "and preprocessing are in spent_before_s); actual_s: the job's own time (training: from its start to "
                 "the end of validation; prediction and pseudo-labels: from the estimate's announcement, the 'time' of "
                 "the engine's estimate event, to the call's end; what came before it (loading the model, the probe) "
                 "is spent_before_s, the whole call call_s). The machine's own figures "
                 "(what follows a training's last epoch, a prediction's work besides its tiles) start empty and "
                 "are learnt as the benchmark runs: the phantoms' training and prediction are estimated without "
                 "them, the later data sets with them (finish_overhead, the prediction's message).",
        "machine_file_at_start": machine_file_state,
    })
    return 0


if __name__ == "__main__":
    sys.exit(main())
