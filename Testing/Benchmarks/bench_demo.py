"""``alseg demo`` (the README's main command) over several seeds: does each round help, is
every class learned, what do the pseudo-labels buy, and how long does it take.

Each seed runs ``alseg demo --seed S --json`` in a fresh folder, in its own process, one after
the other (a seed changes the phantoms, the held-out split and the training's draws). Per
table row (pseudo-labels only, round 1, round 2, supervised only on round 2's human labels)
the mean over seeds of the held-out mean Dice, per-class Dice and HD95, and each seed's own
figures. Goals (issue 19): over the seeds, mean Dice rises from pseudo-only to round 1 to
round 2, every class's mean Dice at the last round is above 0.5, and a seed takes at most
10 minutes on the 2 cores alone. ``--pseudo-source sam`` times the same with the built-in
LiteMedSAM (one seed by default).

Run alone on the machine (sharing the cores doubles the times):
  .venv/bin/python Testing/Benchmarks/bench_demo.py                 # 3 seeds, simulated pseudo-labels
  .venv/bin/python Testing/Benchmarks/bench_demo.py --pseudo-source sam --seeds 0
Writes Testing/Benchmarks/results/demo.json (or demo_sam.json).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import REPO, write_results  # noqa: E402


def run_seed(seed: int, folder: Path, extra: list[str]) -> dict:
    env = dict(os.environ, nnUNet_def_n_proc=os.environ.get("nnUNet_def_n_proc", "1"),
               nnUNet_compile=os.environ.get("nnUNet_compile", "f"))
    cmd = [str(REPO / ".venv" / "bin" / "alseg"), "--progress", "off", "demo", "--dir", str(folder), "--seed", str(seed),
           "--json", *extra]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if done.returncode != 0:
        raise SystemExit(f"seed {seed}: alseg demo exited {done.returncode}\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout)
    result["wall_s"] = round(wall, 1)
    return result


def row_key(row: dict) -> str:
    if row["round"] == 0:
        return "pseudo-only"
    return ("supervised-only r" if row["model"].startswith("supervised") else "round ") + str(row["round"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--pseudo-source", default="degraded-reference", choices=("degraded-reference", "sam"))
    ap.add_argument("--dir", default="/tmp/alseg-bench-demo")
    ap.add_argument("--name", help="results file name (default demo, or demo_sam)")
    args, extra = ap.parse_known_args()  # anything else goes to 'alseg demo' (e.g. --pretrain-epochs 20)
    extra = ["--pseudo-source", args.pseudo_source, *extra]
    per_seed = {}
    for seed in args.seeds:
        print(f"[seed {seed}]", flush=True)
        res = run_seed(seed, Path(args.dir) / f"seed{seed}", extra)
        per_seed[seed] = {"wall_s": res["wall_s"], "seconds": res["seconds"], "pseudo_label_dice": res["pseudo_label_dice"],
                          "rows": {row_key(r): {"mean_dice": r["mean_dice"], "dice": r["dice"], "hd95": r["hd95"],
                                                "annotated": r["annotated"], "of": r["of"]} for r in res["rows"]},
                          "selected": res["selected"], "test_cases": res["test_cases"]}
        print(json.dumps(per_seed[seed]["rows"], indent=1), flush=True)
    classes = list(next(iter(per_seed.values()))["rows"]["round 1"]["dice"])
    keys = list(next(iter(per_seed.values()))["rows"])
    mean = {}
    for key in keys:
        rows = [s["rows"][key] for s in per_seed.values() if key in s["rows"]]
        mean[key] = {"mean_dice": round(float(np.mean([r["mean_dice"] for r in rows])), 4),
                     "dice": {c: round(float(np.mean([r["dice"][c] for r in rows])), 4) for c in classes},
                     "hd95": (round(float(np.mean(h)), 2) if (h := [r["hd95"] for r in rows if r["hd95"] is not None
                                                                        and np.isfinite(r["hd95"])]) else None),
                     "seeds": len(rows)}
    rounds = sorted((k for k in keys if k.startswith("round ")), key=lambda k: int(k.split()[1]))
    chain = ["pseudo-only", *rounds] if "pseudo-only" in mean else rounds
    values = [mean[k]["mean_dice"] for k in chain]
    last = mean[rounds[-1]]
    walls = [s["wall_s"] for s in per_seed.values()]
    goals = {
        "mean_dice_rises_every_round": all(b > a for a, b in zip(values, values[1:])),
        "every_class_above_0.5_at_last_round": all(v > 0.5 for v in last["dice"].values()),
        "at_most_10_min_per_seed": max(walls) <= 600,
    }
    sup = next((k for k in keys if k.startswith("supervised")), None)
    figures = {
        "pseudo_source": args.pseudo_source, "seeds": args.seeds, "extra_arguments": extra, "classes": classes,
        "mean_over_seeds": mean, "chain": dict(zip(chain, values)),
        "pseudo_labels_buy": round(last["mean_dice"] - mean[sup]["mean_dice"], 4) if sup else None,
        "wall_s": {"per_seed": walls, "max": max(walls), "mean": round(float(np.mean(walls)), 1)},
        "goals": goals, "per_seed": per_seed,
        "note": "each seed alone in its own process, one after the other; wall time includes the phantoms and every "
                "stage (pseudo-labels, planning, pretraining, 2 rounds, the supervised-only baseline)",
    }
    write_results(args.name or ("demo" if args.pseudo_source == "degraded-reference" else "demo_sam"), figures)


if __name__ == "__main__":
    main()
