"""Wall time of `alseg add` (and evaluate) on the 200 shared Hippocampus MRI cases with references.

Run: .venv/bin/python Testing/Benchmarks/bench_add.py
Writes Testing/Benchmarks/results/add.json. Each command runs as the installed
console script in a fresh process, so start-up cost is included, as a user sees it.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import shared_data, write_results

ALSEG = [sys.executable, "-m", "ALSegLib"]


def timed(args: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    out = subprocess.run(ALSEG + args + ["--json"], capture_output=True, text=True, check=True)
    return time.perf_counter() - start, json.loads(out.stdout)


def main() -> int:
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found; nothing measured")
        return 0
    hippo = data / "hippocampus"
    n_images = len(list((hippo / "imagesTr").glob("*.nii.gz")))
    work = Path(tempfile.mkdtemp(prefix="alseg-bench-"))
    try:
        project = work / "hippo"
        timed(["init", str(project), "--labels", "anterior=1,posterior=2", "--modality", "MRI"])
        add_s, added = timed(["add", str(project), str(hippo / "imagesTr"), "--reference", str(hippo / "labelsTr")])
        status_s, status = timed(["status", str(project)])
        eval_s, result = timed(["evaluate", str(project), "--kind", "reference"])
        size_mb = sum(p.stat().st_size for p in project.rglob("*") if p.is_file()) / 1e6
    finally:
        shutil.rmtree(work)
    write_results("add", {
        "data": "MSD Task04 Hippocampus (shared), imagesTr + labelsTr",
        "cases": len(added["added"]),
        "images_in_folder": n_images,
        "with_reference": added["with_reference"],
        "add_wall_s": round(add_s, 2),
        "add_per_case_ms": round(1000 * add_s / max(len(added["added"]), 1), 1),
        "status_wall_s": round(status_s, 2),
        "evaluate_reference_wall_s": round(eval_s, 2),
        "evaluate_mean_dice": result["summary"]["mean"]["dice"]["mean"],
        "project_size_mb": round(size_mb, 1),
        "status_cases": status["cases"],
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
