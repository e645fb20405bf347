"""Past one machine (issue 23): ``--ray`` against the single-machine path, side by side in one run.

On ``--cases`` shared MSD Hippocampus cases (default 40, drawn with --split-seed), each path is one
``alseg`` command in a fresh process, timed from start to exit (what a user waits for: Ray's start,
the workers' model loading and the driver's writes included):

- ``pseudolabels``: the built-in LiteMedSAM (real weights), ``--prompts-from-reference --boxes`` boxes per
  structure from the expert label, slicing ``--axis``, ``--no-cache`` on every path (the Ray workers keep no
  embedding cache: the same work on each path). Every path starts from its own copy of the project
  with the ONNX encoder graph already exported (the export is a one-off, not what is compared).
- ``predict``: an nnU-Net model (``--configuration``, pretrained for a few steps on simulated
  pseudo-labels: its speed, not its Dice, is measured here) predicting every case with probabilities
  and bottleneck features.

Paths: ``local`` (no Ray: torch on all cores), ``ray_1x1`` (``--ray --ray-workers 1 --ray-threads 1``),
``ray_2x1`` (2 workers of 1 thread). Goals: ``speedup_2_vs_1`` = ray_1x1 / ray_2x1 >= 1.7;
``overhead_vs_local`` = ray_2x1 (``--ray`` with all cores of this machine) / local <= 1.1. The stored
labels of every path are compared byte for byte (``identical``).

- ``contention`` (added to the file with ``--merge``): LiteMedSAM's encoder (ONNX Runtime, one thread) in one
  process alone, then in two processes at once, no Ray: what two busy cores cost each other on this machine,
  the ceiling of any two-worker fan-out (``ceiling_2_vs_1``: the median of ``--contention-repeats`` turns,
  with their range: this machine's speed drifts by more than the goals' margins from minute to minute).

Run alone on the machine (benchmarks sharing the 2 cores with tests doubled their times here); the
recorded run (about 40 minutes on 2 cores), then the contention part added to it:
  .venv/bin/python Testing/Benchmarks/bench_distributed.py
  .venv/bin/python Testing/Benchmarks/bench_distributed.py --parts contention --merge
Where a GPU machine is lent (workers per GPU, the experiment's trainings across GPUs):
  python Testing/Benchmarks/bench_distributed.py --device cuda --parts pseudolabels predict simulate \
      --workers 1 2 4 --name distributed_gpu
Writes Testing/Benchmarks/results/NAME.json (fields: cases, seconds {part: {path: s}}, speedup_2_vs_1 {part},
overhead_vs_local {part}, identical {part}, goals, settings, commit, machine).
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from common import shared_data, write_results  # noqa: E402

WORK = Path(os.environ.get("ALSEG_BENCH_DIR", "/tmp/alseg-bench-distributed"))
ALSEG = [sys.executable, "-m", "ALSegLib"]


def source_project(args):
    from ALSegLib import Project

    data = shared_data() / "hippocampus"
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (data / "imagesTr").glob("*.nii.gz"))
    chosen = sorted(random.Random(args.split_seed).sample(cases, args.cases))
    root = WORK / "source"
    if root.exists():
        shutil.rmtree(root)
    project = Project.create(root, {"anterior": 1, "posterior": 2}, "MRI")
    project.add_cases([data / "imagesTr" / f"{c}.nii.gz" for c in chosen],
                      references=[data / "labelsTr" / f"{c}.nii.gz" for c in chosen], case_ids=chosen)
    return project


def paths(args) -> dict[str, list[str]]:
    out = {"local": []}
    for n in args.workers:
        out[f"ray_{n}x{args.threads}"] = ["--ray", *([args.address] if args.address else []), "--ray-workers", str(n),
                                         "--ray-threads", str(args.threads)]
    return out


def timed(cmd: list[str], log: Path) -> tuple[float, dict]:
    """One ``alseg`` command in a fresh process: its wall seconds and its --json output."""
    t = time.perf_counter()
    with open(log, "w") as err:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE.parents[1])
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed ({proc.returncode}); see {log}")
    return round(seconds, 1), json.loads(proc.stdout)


def same_files(projects: dict, kind: str) -> bool:
    first, *others = projects.values()
    return all(p.label_path(c, kind).read_bytes() == first.label_path(c, kind).read_bytes()
               for p in others for c in first.cases())


def part_pseudolabels(args, source) -> dict:
    from ALSegLib.pseudolabels.sam import load_checkpoint, use_onnx_encoder

    onnx = WORK / "onnx"
    loaded = load_checkpoint(None)
    note = use_onnx_encoder(loaded, onnx, 1, "auto")  # exported once, copied into every path's project
    seconds, projects, made = {}, {}, {}
    for name, extra in paths(args).items():
        project = source.copy_to(WORK / f"pseudo-{name}")
        if onnx.is_dir():
            shutil.copytree(onnx, project.layout.sam_cache / "onnx", dirs_exist_ok=True)
        cmd = [*ALSEG, "pseudolabel", str(project.root), "--source", "sam", "--prompts-from-reference", str(args.boxes),
               "--axis", args.axis, "--no-cache", "--device", args.device, "--json", *extra]
        seconds[name], out = timed(cmd, WORK / f"pseudo-{name}.log")
        projects[name] = project
        made[name] = out["cases"]
        print(f"pseudolabels {name}: {seconds[name]} s", flush=True)
    local = made["local"]
    slices = sum(c["encoder"]["slices_encoded"] for c in local)
    return {"seconds": seconds, "identical": same_files(projects, "pseudo"), "slices_encoded": slices,
            "s_per_slice": {k: round(v / slices, 3) for k, v in seconds.items()},
            "workers_seen": {k: len({c.get("worker") for c in v if c.get("worker")}) for k, v in made.items()},
            "onnx": note or "onnxruntime"}


def part_predict(args, source) -> dict:
    from ALSegLib.nnunet.plan import plan
    from ALSegLib.nnunet.train import train
    from ALSegLib.pseudolabels.degraded import pseudolabel_degraded

    project = source.copy_to(WORK / "predict")
    pseudolabel_degraded(project, target_dice=0.8)  # simulated pseudo-labels: the model is trained only to exist
    plan(project, configurations=(args.configuration,), batch_size=args.batch_size or None, device=args.device)
    train(project, "pretrain", validate=False, epochs=1, iterations=args.train_iters, val_iterations=1,
          device=args.device)
    seconds, labels = {}, {}
    for name, extra in paths(args).items():
        cmd = [*ALSEG, "predict", str(project.root), "--model", "pretrain", "--probabilities", "--device", args.device,
               "--json", *extra]
        seconds[name], _ = timed(cmd, WORK / f"predict-{name}.log")
        labels[name] = {c: project.label_path(c, "predicted").read_bytes() for c in project.cases()}
        print(f"predict {name}: {seconds[name]} s", flush=True)
    first = labels["local"]
    return {"seconds": seconds, "identical": all(v == first for v in labels.values()),
            "configuration": args.configuration, "s_per_case": {k: round(v / len(first), 3) for k, v in seconds.items()}}


def part_simulate(args, source) -> dict:
    """The experiment's trainings fanned out (meant for a GPU machine): a tiny experiment sequentially and with --ray."""
    seconds = {}
    for name, extra in {"local": [], "ray": ["--ray", *([args.address] if args.address else [])]}.items():
        cmd = [*ALSEG, "simulate", str(source.root), "--out", str(WORK / f"simulate-{name}"), "--arms", "random+finetune",
               "hybrid+finetune", "pseudo-only", "--rounds", "1", "--budget", "2", "--seeds", "0", "1",
               "--pseudo-source", "degraded-reference", "--configuration", args.configuration, "--device", args.device,
               "--pretrain-epochs", "2", "--pretrain-iters", "50", "--epochs", "2", "--iters", "50", "--json", *extra]
        seconds[name], _ = timed(cmd, WORK / f"simulate-{name}.log")
        print(f"simulate {name}: {seconds[name]} s", flush=True)
    return {"seconds": seconds, "speedup": round(seconds["local"] / seconds["ray"], 3)}


ENCODE = """
import os, sys, time
import torch
torch.set_num_threads(1)
from ALSegLib.pseudolabels import litemedsam
from ALSegLib.pseudolabels.sam import load_checkpoint
loaded = load_checkpoint(None)
enc = litemedsam.OnnxEncoder(None, loaded.sha256, sys.argv[1], 1, 1)
x = torch.rand(1, 3, 256, 256)
enc(x)
t = time.perf_counter()
for _ in range(int(sys.argv[2])):
    enc(x)
print((time.perf_counter() - t) / int(sys.argv[2]))
"""


def part_contention(args, source) -> dict:
    """What two busy cores cost each other here, without Ray: LiteMedSAM's encoder (ONNX Runtime, one
    thread) on one process alone, then on two processes at once; the ceiling of any 2-vs-1 fan-out."""
    from ALSegLib.pseudolabels.sam import load_checkpoint, use_onnx_encoder

    onnx = WORK / "onnx"
    use_onnx_encoder(load_checkpoint(None), onnx, 1, "auto")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", ENCODE, str(onnx), str(args.contention_slices)]

    def run(n: int) -> list[float]:
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                  cwd=HERE.parents[1]) for _ in range(n)]
        return [round(float(p.communicate()[0].strip().splitlines()[-1]), 4) for p in procs]

    runs = []
    for _ in range(args.contention_repeats):  # alone and two at once, in turn: this machine's speed drifts
        alone, together = run(1)[0], run(2)
        runs.append({"alone_s_per_slice": alone, "two_at_once_s_per_slice": together,
                     "ceiling_2_vs_1": round(2 * alone / (sum(together) / 2), 3)})
    ceilings = sorted(r["ceiling_2_vs_1"] for r in runs)
    return {"runs": runs, "ceiling_2_vs_1": ceilings[len(ceilings) // 2], "ceiling_range": [ceilings[0], ceilings[-1]],
            "slices": args.contention_slices}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--split-seed", type=int, default=0)
    ap.add_argument("--parts", nargs="+", default=["pseudolabels", "predict"],
                    choices=["pseudolabels", "predict", "simulate", "contention"])
    ap.add_argument("--contention-slices", type=int, default=30, help="contention: slices encoded per process")
    ap.add_argument("--contention-repeats", type=int, default=5, help="contention: alone / two at once, this many times")
    ap.add_argument("--merge", action="store_true", help="add the parts run now to the results file already there "
                    "(their fields replaced, the others kept)")
    ap.add_argument("--boxes", type=int, default=3, help="boxes per structure drawn from the reference (default 3)")
    ap.add_argument("--axis", default="sagittal")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="--ray-workers values compared (default 1 2)")
    ap.add_argument("--threads", type=int, default=1, help="--ray-threads (default 1)")
    ap.add_argument("--address", help="a Ray cluster's address (default: a local instance)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--configuration", default="3d_fullres")
    ap.add_argument("--batch-size", type=int, default=2, help="0: the planned batch size")
    ap.add_argument("--train-iters", type=int, default=5, help="the predicting model's training steps (default 5)")
    ap.add_argument("--name", default="distributed")
    args = ap.parse_args()
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        raise SystemExit("the shared Hippocampus data is not here (../shared/data/hippocampus): nothing to measure")
    WORK.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    source = source_project(args)
    parts = {}
    for part in args.parts:
        parts[part] = {"pseudolabels": part_pseudolabels, "predict": part_predict, "simulate": part_simulate,
                       "contention": part_contention}[part](args, source)
    if args.merge:
        merge(args, parts, time.perf_counter() - started)
        return
    two, one = f"ray_2x{args.threads}", f"ray_1x{args.threads}"
    figures = {
        "cases": args.cases,
        "seconds": {p: r["seconds"] for p, r in parts.items()},
        "speedup_2_vs_1": {p: round(r["seconds"][one] / r["seconds"][two], 3) for p, r in parts.items()
                           if one in r["seconds"] and two in r["seconds"]},
        "overhead_vs_local": {p: round(r["seconds"][two] / r["seconds"]["local"], 3) for p, r in parts.items()
                              if two in r["seconds"]},
        "identical": {p: r["identical"] for p, r in parts.items() if "identical" in r},
        "parts": parts,
        "settings": {k: v for k, v in vars(args).items() if k != "name"},
        "wall_s": None,
    }
    figures["goals"] = {
        "speedup_2_vs_1 >= 1.7": {p: v >= 1.7 for p, v in figures["speedup_2_vs_1"].items()},
        "overhead_vs_local <= 1.1": {p: v <= 1.1 for p, v in figures["overhead_vs_local"].items()},
    }
    figures["wall_s"] = round(time.perf_counter() - started)
    write_results(args.name, figures)


def merge(args, parts: dict, seconds: float) -> None:
    """The parts run now added to the results file there (each with the commit it ran at)."""
    from common import commit

    path = HERE / "results" / f"{args.name}.json"
    record = json.loads(path.read_text())
    for part, figures in parts.items():
        record.setdefault("parts", {})[part] = {**figures, "commit": commit(), "wall_s": round(seconds)}
    if "contention" in parts:
        record["ceiling_2_vs_1"] = parts["contention"]["ceiling_2_vs_1"]
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({p: record["parts"][p] for p in parts}, indent=2))


if __name__ == "__main__":
    main()
