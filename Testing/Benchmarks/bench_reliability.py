"""Reliability at the issue's counts: SIGKILL trials, the bad-input catalogue, fuzzing,
untrusted checkpoints, concurrent writers, training resumed after kills, full disk and
read-only folders. Writes Testing/Benchmarks/results/reliability.json.

    .venv/bin/python Testing/Benchmarks/bench_reliability.py            # ~15 min on 2 cores
    .venv/bin/python Testing/Benchmarks/bench_reliability.py --kill-trials 20 --fuzz-examples 100 --resume-trials 2

Goal: 0 lost or torn files, every bad input a clean error (exit 2, file and problem named,
project byte-identical), no fuzzed input other than a result or a clean error.
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")
os.environ.setdefault("nnUNet_compile", "f")
os.environ.setdefault("ALSEG_PROGRESS", "off")

import argparse  # noqa: E402
import random  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import xml.etree.ElementTree as ET  # noqa: E402
from pathlib import Path  # noqa: E402

from common import REPO, write_results  # noqa: E402

sys.path.insert(0, str(REPO / "Testing" / "Python"))

import reliability  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from ALSegLib import phantoms  # noqa: E402
from ALSegLib.project import LabelTable, Project  # noqa: E402

TESTS = REPO / "Testing" / "Python"
CATALOGUE = ["test_bad_input.py", "test_bad_input_catalogue.py",
             "test_nnunet.py::test_checkpoint_of_another_architecture_is_a_clear_error",
             "test_nnunet.py::test_weights_changed_under_a_model_are_refused_before_predicting_or_fine_tuning"]
UNTRUSTED = ["test_pseudolabels.py::test_checkpoint_with_pickled_code_is_refused_and_never_run",
             "test_nnunet.py::test_malicious_checkpoint_is_refused_never_run",
             "test_bad_input_catalogue.py::test_api[checkpoint_with_pickled_code]",
             "test_bad_input_catalogue.py::test_cli[checkpoint_with_pickled_code]"]
STORAGE = ["test_reliability.py::test_full_disk_gives_a_clear_error_and_tears_nothing",
           "test_reliability.py::test_read_only_folder_gives_a_clear_error",
           "test_reliability.py::test_event_log_on_a_full_disk_is_a_clear_error"]


def phantom_project(folder: Path, n: int = 6) -> Project:
    images, labels = phantoms.write_dataset(folder / "src", n=n, modality="CT", seed=0, size=32)
    project = Project.create(folder / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    return project


def pytest_results(selection: list[str], folder: Path) -> list[tuple[str, bool, str]]:
    """(test id, passed, message) of each test in ``selection``, run by pytest in a subprocess."""
    xml = folder / f"junit-{time.time_ns()}.xml"
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={xml}",
                    *[str(TESTS / s) for s in selection]], cwd=REPO, capture_output=True, text=True)
    out = []
    for case in ET.parse(xml).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        skipped = case.find("skipped") is not None
        message = (bad.get("message") or "")[:300] if bad is not None else ("skipped" if skipped else "")
        out.append((f"{case.get('classname')}::{case.get('name')}", bad is None and not skipped, message))
    return out


def kinds_of(results: list[tuple[str, bool, str]]) -> dict[str, list[str]]:
    """A kind is a scenario id shared by its API and CLI tests, or a standalone test."""
    kinds: dict[str, list[str]] = {}
    for test_id, passed, message in results:
        name = test_id.split("::")[-1]
        if name == "test_the_good_image_alone_is_added":  # a control, not a kind
            continue
        kind = name[name.index("[") + 1 : -1] if "[" in name and name.startswith(("test_api", "test_cli")) else name
        kinds.setdefault(kind, [])
        if not passed:
            kinds[kind].append(f"{name}: {message}")
    return kinds


def fuzz(examples: int, folder: Path) -> dict:
    from fuzz_targets import TARGETS

    out = {}
    for name, (strategy, target) in sorted(TARGETS.items()):
        outcomes: list[str] = []
        work = folder / f"fuzz-{name}"
        work.mkdir()

        @settings(max_examples=examples, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value):
            outcomes.append(target(value, work))  # noqa: B023 - run() is called below, within this iteration

        start = time.perf_counter()
        try:
            run()
            failure = None
        except Exception as exc:  # noqa: BLE001 - a finding, reported
            failure = f"{type(exc).__name__}: {str(exc)[:300]}"
        out[name] = {"examples": len(outcomes), "clean_errors": outcomes.count("error"), "failure": failure,
                     "seconds": round(time.perf_counter() - start, 1)}
        print(f"fuzz {name}: {out[name]}", flush=True)
    return out


def resume(trials: int, folder: Path, seed: int) -> dict:
    from ALSegLib.nnunet.plan import plan

    project = phantom_project(folder, n=12)
    for case in project.cases():
        project.write_label(case, "pseudo", project.read_label(case, "reference"), source="reference copy (harness)")
    for case in project.cases()[:3]:
        project.add_human_label(case, project.read_label(case, "reference"), source="simulated")
    plan(project, configurations=("3d_fullres",), batch_size=2)
    os.environ["nnUNet_n_proc_DA"] = "0"
    rng = random.Random(seed)
    epochs = 5
    rows, problems = [], []
    for t in range(trials):
        mode = ("supervised", "filtermatch")[t % 2]
        kill_after = rng.randint(1, epochs - 1)
        start = time.perf_counter()
        found = reliability.resume_trial(project.root, mode, f"resume{t}", epochs, kill_after)
        rows.append({"mode": mode, "killed_after_epoch": kill_after, "problems": found,
                     "seconds": round(time.perf_counter() - start, 1)})
        problems += found
        print(f"resume trial {t}: {rows[-1]}", flush=True)
    return {"trials": rows, "problems": problems}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kill-trials", type=int, default=200)
    ap.add_argument("--concurrent-trials", type=int, default=10)
    ap.add_argument("--resume-trials", type=int, default=6)
    ap.add_argument("--fuzz-examples", type=int, default=2000, help="per target")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    figures: dict = {}
    timings: dict = {}
    with tempfile.TemporaryDirectory(prefix="alseg-reliability-") as tmp:
        tmp = Path(tmp)

        start = time.perf_counter()
        project = phantom_project(tmp / "kill")
        kills = reliability.kill_trials(project.root, args.kill_trials, seed=args.seed)
        timings["kill"] = round(time.perf_counter() - start, 1)
        print(f"kill trials: {kills}", flush=True)

        start = time.perf_counter()
        concurrent = []
        for t in range(args.concurrent_trials):
            p = phantom_project(tmp / f"concurrent{t}")
            concurrent.append(reliability.concurrent_trial(p.root, 9, tmp / f"concurrent{t}" / "src" / "labels"))
        lost = [x for c in concurrent for x in c["lost_updates"]]
        timings["concurrent"] = round(time.perf_counter() - start, 1)
        print(f"concurrent trials: {len(concurrent)}, lost updates {lost}", flush=True)

        start = time.perf_counter()
        catalogue = kinds_of(pytest_results(CATALOGUE, tmp))
        untrusted = pytest_results(UNTRUSTED, tmp)
        storage = pytest_results(STORAGE, tmp)
        timings["catalogue_untrusted_storage"] = round(time.perf_counter() - start, 1)

        start = time.perf_counter()
        fuzzed = fuzz(args.fuzz_examples, tmp)
        timings["fuzz"] = round(time.perf_counter() - start, 1)

        start = time.perf_counter()
        resumed = resume(args.resume_trials, tmp / "resume", args.seed)
        timings["resume"] = round(time.perf_counter() - start, 1)

    figures.update({
        "kill_trials": kills["kill_trials"],
        "torn": kills["torn"],
        "kill_details": {k: v for k, v in kills.items() if k not in ("kill_trials", "torn")},
        "bad_input_kinds": len(catalogue),
        "bad_input_failures": sum(bool(v) for v in catalogue.values()),
        "bad_input_failed": {k: v for k, v in catalogue.items() if v},
        "bad_input_kind_names": sorted(catalogue),
        "untrusted_checkpoint_tests": len(untrusted),
        "untrusted_checkpoint_failures": [t for t, ok, m in untrusted if not ok],
        "storage_tests": len(storage),
        "storage_failures": [f"{t}: {m}" for t, ok, m in storage if not ok],
        "fuzz_examples": sum(v["examples"] for v in fuzzed.values()),
        "fuzz_failures": sum(v["failure"] is not None for v in fuzzed.values()),
        "fuzz_targets": fuzzed,
        "concurrent_trials": len(concurrent),
        "lost_updates": len(lost),
        "lost_update_details": lost[:20],
        "resume_trials": len(resumed["trials"]),
        "resume_failures": sum(bool(r["problems"]) for r in resumed["trials"]),
        "resume_details": resumed["trials"],
        "seconds": timings,
    })
    write_results("reliability", figures)
    ok = (figures["torn"] == 0 and figures["bad_input_failures"] == 0 and figures["fuzz_failures"] == 0
          and figures["lost_updates"] == 0 and figures["resume_failures"] == 0 and not figures["storage_failures"]
          and not figures["untrusted_checkpoint_failures"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
