"""Reliability harness: writers killed at random moments, concurrent writers, checks.

Used with small counts by ``test_reliability.py`` and with the issue's counts by
``Testing/Benchmarks/bench_reliability.py``. Every writer is a real ``python``
process working on a real project through the engine's API or the ``alseg`` CLI;
every kill is a SIGKILL (no clean-up code runs).

Run as a script, this module is the writer (``python reliability.py writer ROOT SEED``):
it prints ``ready`` and then stores, in a loop, human labels (a new version each
time), round records and label-table changes until it is killed.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
CASES = 4  # the writers work on the project's first four cases


def tree_hash(folder: Path) -> str:
    """Hash of every path and file content under ``folder``: equal means byte-identical."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def expected_label(reference: np.ndarray, version: int) -> np.ndarray:
    """The content a writer stores as a case's human label version ``version``: the
    reference with the first ``version % depth`` slices cleared, so every version's
    content is known and a torn or mixed file cannot pass for a good one."""
    out = reference.copy()
    out[: version % reference.shape[0]] = 0
    return out


def round_payload(counter: int) -> dict:
    rng = random.Random(counter)
    queue = [{"case": f"c{rng.randrange(10**6)}", "score": rng.random(), "reason": "x" * rng.randrange(2000)}
             for _ in range(rng.randrange(1, 40))]
    return {"counter": counter, "queue": queue, "checksum": _checksum(queue)}


def _checksum(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE), env.get("PYTHONPATH", "")])
    env.setdefault("ALSEG_PROGRESS", "off")
    return env


def start_writer(root: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(Path(__file__)), "writer", str(root), str(seed)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())


def writer(root: Path, seed: int) -> None:
    """Store labels, round records and label-table changes in a loop until killed."""
    from ALSegLib import rounds
    from ALSegLib.project import Project

    project = Project.open(root)
    cases = project.cases()[:CASES]
    templates = {c: project.read_label(c, "reference") for c in cases}
    refs = {c: sitk.GetArrayFromImage(img) for c, img in templates.items()}
    rng = random.Random(seed)
    first = project.labels.classes[0]
    print("ready", flush=True)
    counter = seed * 100000
    while True:
        op = rng.randrange(3)
        counter += 1
        if op == 0:
            case = rng.choice(cases)
            versions = project.human_versions(case)
            version = (versions[-1] if versions else 0) + 1
            img = sitk.GetImageFromArray(expected_label(refs[case], version))
            img.CopyInformation(templates[case])
            got = project.add_human_label(case, img, author="harness", source="simulated")
            assert got == version, (got, version)  # one writer at a time in the crash trials
        elif op == 1:
            with project.lock("harness round"):
                rounds.write_round(project, {"round": 1, "stages": {}, **round_payload(counter)})
        else:
            name = project.labels.classes[0].name
            new = first.name if name != first.name else f"{first.name}-{counter}"
            color = (rng.random(), rng.random(), rng.random())
            project.update_labels(rename={name: new}, colors={name: color})


def _events(root: Path) -> tuple[list[dict], int]:
    """Parsed events and the number of unparseable lines other than the last."""
    path = root / "events.jsonl"
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines() if path.exists() else []
    out, bad = [], 0
    for i, line in enumerate(lines):
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            bad += i != len(lines) - 1 or path.read_bytes().endswith(b"\n")
    return out, bad


class Checker:
    """Verifies a project after a kill; remembers the version files already verified
    (they are written once, exclusively, and never change)."""

    def __init__(self, root: Path):
        from ALSegLib.project import Project

        self.root = root
        project = Project.open(root)
        self.cases = project.cases()[:CASES]
        self.refs = {c: sitk.GetArrayFromImage(project.read_label(c, "reference")) for c in self.cases}
        self.values = project.labels.values
        self.verified: dict[Path, str] = {}

    def problems(self, *, recovered: bool) -> list[str]:
        """What is torn or inconsistent. ``recovered``: after a writer took the lock again,
        every version must have its provenance and its event."""
        from ALSegLib import rounds, volumes
        from ALSegLib.project import Project, sha256_file

        out = []
        try:
            project = Project.open(self.root)  # alseg.json parses, the label table is valid
            if project.labels.values != self.values:
                out.append(f"alseg.json: label values changed to {project.labels.values}")
        except Exception as exc:  # noqa: BLE001 - any failure to open is a finding
            return [f"alseg.json: {exc}"]
        try:
            if rounds.list_rounds(project):
                record = rounds.read_round(project, 1)
                if record.get("checksum") != _checksum(record.get("queue")):
                    out.append("round 1: queue does not match its checksum")
        except Exception as exc:  # noqa: BLE001
            out.append(f"round 1: {exc}")
        events, bad_lines = _events(self.root)
        if bad_lines:
            out.append(f"events.jsonl: {bad_lines} unreadable line(s) before the last")
        logged = {(e.get("case"), e.get("version")) for e in events
                  if e.get("event") in ("human_label_added", "human_label_recovered")}
        for case in self.cases:
            versions = project.human_versions(case)
            if versions != list(range(1, len(versions) + 1)):
                out.append(f"{case}: versions not contiguous {versions}")
            for v in versions:
                path = project.label_path(case, "human", v)
                if path not in self.verified:
                    try:
                        arr = sitk.GetArrayFromImage(volumes.read_label(path, label_values=self.values))
                    except Exception as exc:  # noqa: BLE001
                        out.append(f"{path.name} of {case}: unreadable ({exc})")
                        continue
                    if not np.array_equal(arr, expected_label(self.refs[case], v)):
                        out.append(f"{path.name} of {case}: content is not version {v}'s")
                        continue
                    self.verified[path] = sha256_file(path)
                sidecar = path.with_suffix(".json")
                if sidecar.is_file():
                    try:
                        prov = json.loads(sidecar.read_text())
                        if prov.get("file_sha256") != self.verified[path]:
                            out.append(f"{sidecar.name} of {case}: does not match its label")
                    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                        out.append(f"{sidecar.name} of {case}: torn ({exc})")
                elif recovered or v != versions[-1]:
                    out.append(f"{path.name} of {case}: provenance missing")
                if recovered and (case, v) not in logged:
                    out.append(f"{path.name} of {case}: no event")
            for case_v in logged:
                if case_v[0] == case and case_v[1] not in versions:
                    out.append(f"{case}: event for version {case_v[1]} but no file")
        if recovered:
            left = [p for p in self.root.rglob(".tmp-*")] + list(self.root.glob(".staging-*"))
            if left:
                out.append(f"temporaries left after recovery: {[str(p) for p in left[:3]]}")
        return out


def kill_trials(root: Path, trials: int, seed: int = 0, max_delay: float = 0.4, log=None) -> dict:
    """``trials`` writers, each SIGKILLed after a random delay; after each kill the project
    is checked as the crash left it, then taken over (lock acquired: recovery) and checked
    strictly. Returns counts and the problems found."""
    from ALSegLib.project import Project

    rng = random.Random(seed)
    checker = Checker(root)
    torn, problems, recovered_locks, ops_seen = 0, [], 0, 0
    for t in range(trials):
        proc = start_writer(root, seed * 10000 + t)
        line = proc.stdout.readline().strip()
        if line != "ready":
            proc.kill()
            raise RuntimeError(f"writer did not start: {line!r} {proc.stderr.read()[-2000:]}")
        time.sleep(rng.uniform(0.0, max_delay))
        if proc.poll() is not None:
            raise RuntimeError(f"writer died on its own: {proc.stderr.read()[-2000:]}")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        found = [f"trial {t} (as left): {p}" for p in checker.problems(recovered=False)]
        project = Project.open(root)
        before = len(project.events())
        with project.lock("harness check"):
            pass
        events = project.events()
        recovered_locks += any(e["event"] == "lock_recovered" for e in events[before:])
        found += [f"trial {t} (recovered): {p}" for p in checker.problems(recovered=True)]
        torn += bool(found)
        problems += found
        if log and found:
            log("\n".join(found))
    ops_seen = sum(1 for e in Project.open(root).events() if e["event"] in ("human_label_added", "labels_updated"))
    return {"kill_trials": trials, "torn": torn, "problems": problems[:50], "kills_while_holding_lock": recovered_locks,
            "label_and_config_writes": ops_seen, "human_label_files": len(checker.verified)}


def run_until(cmd: list[str], kill_when) -> list[dict]:
    """Run ``cmd`` (an ``alseg --progress jsonl`` command) and SIGKILL it right after the
    first JSON-lines event for which ``kill_when(event)`` is true; returns the events seen."""
    env = {**_env(), "ALSEG_PROGRESS": "jsonl"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    events = []
    try:
        for line in proc.stderr:
            if line.startswith("{"):
                events.append(json.loads(line))
                if kill_when(events[-1]):
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        proc.wait(timeout=600)
    finally:
        proc.kill()
        proc.wait()
        proc.stderr.close()
    return events


def concurrent_trial(root: Path, n: int, import_dir: Path) -> dict:
    """Two processes on one project at once: one accepts ``n`` human labels and recolors
    'organ' after each; the other runs the import pseudo-label stage and recolors 'vessel'
    through the CLI. Returns what each wrote and the lost updates found afterwards."""
    from ALSegLib.project import Project

    accept = (
        "import sys; from ALSegLib.project import Project; p = Project.open(sys.argv[1]); n = int(sys.argv[2])\n"
        "cases = p.cases()[:3]; got = []\n"
        "for i in range(n):\n"
        "    c = cases[i % 3]; got.append((c, p.add_human_label(c, p.read_label(c, 'reference'), source='simulated')))\n"
        "    p.update_labels(colors={'organ': (i / n, 0.5, 0.5)})\n"
        "print(repr(got))\n")
    stage = ("import sys, subprocess\n"
             "for i in range(int(sys.argv[2])):\n"
             "    subprocess.run([sys.executable, '-m', 'ALSegLib', 'pseudolabel', sys.argv[1], '--source', 'import',"
             " '--from', sys.argv[3]], check=True, capture_output=True)\n"
             "    subprocess.run([sys.executable, '-m', 'ALSegLib', 'labels', sys.argv[1], '--color', "
             "f'vessel=#{i:02x}0000'], check=True, capture_output=True)\n")
    stages = max(1, n // 3)
    before = Project.open(root)
    versions_before = {c: len(before.human_versions(c)) for c in before.cases()}
    events_before = len(before.events())
    a = subprocess.Popen([sys.executable, "-c", accept, str(root), str(n)], stdout=subprocess.PIPE, text=True, env=_env())
    b = subprocess.Popen([sys.executable, "-c", stage, str(root), str(stages), str(import_dir)], env=_env())
    out, _ = a.communicate(timeout=600)
    if a.returncode != 0 or b.wait(timeout=600) != 0:
        raise RuntimeError(f"a writer failed (exit {a.returncode}, {b.returncode})")
    accepted = ast.literal_eval(out.strip())
    project = Project.open(root)
    lost = []
    if len(set(accepted)) != n:
        lost.append(f"version numbers given twice: {accepted}")
    lost += [f"{c} v{v} missing" for c, v in accepted if project.label_path(c, "human", v) is None]
    added = sum(len(project.human_versions(c)) - versions_before[c] for c in project.cases())
    if added != n:
        lost.append(f"{added} new human versions stored, {n} accepted")
    new_events = project.events()[events_before:]
    counts = {e: sum(x["event"] == e for x in new_events) for e in ("human_label_added", "labels_updated")}
    if counts != {"human_label_added": n, "labels_updated": n + stages}:
        lost.append(f"events {counts}, expected {n} labels and {n + stages} label-table updates")
    colors = {c.name: c.color for c in project.labels.classes}
    if not np.allclose(colors["organ"], ((n - 1) / n, 0.5, 0.5)) or not np.allclose(colors["vessel"], ((stages - 1) / 255, 0, 0)):
        lost.append(f"a label-table update was lost: {colors}")
    if len(project.labeled_cases("pseudo")) != len(project.cases()):
        lost.append("pseudo-labels missing")
    return {"accepted": accepted, "lost_updates": lost}


def resume_trial(root: Path, mode: str, name: str, epochs: int, kill_after: int) -> list[str]:
    """Train ``mode`` in a subprocess, SIGKILL it right after epoch ``kill_after``, resume it
    in this process, and check that it ends on the planned schedule: every epoch once,
    the killed run's losses kept, the poly learning-rate schedule unbroken, and (FilterMatch)
    the filtered unlabeled pool restored."""
    from ALSegLib.nnunet.filtermatch import FilterMatchConfig
    from ALSegLib.nnunet.train import read_model, train
    from ALSegLib.nnunet.trainers import load_checkpoint_safely
    from ALSegLib.project import Project

    project = Project.open(root)
    fm = (["--warmup", "1", "--filter-start", "0", "--filter-every", "1", "--drop-fraction", "0.2"]
          if mode == "filtermatch" else [])
    cmd = [sys.executable, "-m", "ALSegLib", "--progress", "jsonl", "train", str(root), "--mode", mode, "--name", name,
           "--device", "cpu", "--no-validate", "--epochs", str(epochs), "--iters", "2", "--val-iters", "1", *fm]
    events = run_until(cmd, lambda e: e["event"] == "epoch" and e["epoch"] == kill_after)
    seen = [e for e in events if e["event"] == "epoch"]
    problems = []
    if [e["epoch"] for e in seen] != list(range(1, kill_after + 1)):
        return [f"{name}: the killed run reported epochs {[e['epoch'] for e in seen]}"]
    if read_model(project, name)["status"] != "training":
        problems.append(f"{name}: not marked as interrupted")
    state = None
    if mode == "filtermatch":
        latest = next((root / "nnunet" / "results").glob(f"*_{name}/*/fold_0/checkpoint_latest.pth"))
        state = json.loads(latest.with_suffix(".filtermatch.json").read_text())
    config = FilterMatchConfig(warmup_epochs=1, filter_start=0, filter_every=1, drop_fraction=0.2) if state else None
    rec = train(project, mode, name=name, epochs=epochs, iterations=2, val_iterations=1, device="cpu", validate=False,
                filtermatch=config)
    if rec["status"] != "done" or rec["epochs_done"] != epochs:
        problems.append(f"{name}: ended {rec['status']} after {rec['epochs_done']} of {epochs} epochs")
    if rec["resumed_at_epochs"] != [kill_after]:
        problems.append(f"{name}: resumed at {rec['resumed_at_epochs']}, killed after {kill_after}")
    if len(rec["train_losses"]) != epochs or not np.allclose(rec["train_losses"][:kill_after],
                                                              [e["train_loss"] for e in seen], atol=1e-4):
        problems.append(f"{name}: the killed run's losses were not kept: {rec['train_losses']}")
    lrs = load_checkpoint_safely(root / rec["checkpoint"])["logging"]["lrs"]
    expected = [lrs[0] * (1 - e / epochs) ** 0.9 for e in range(epochs)]
    if len(lrs) != epochs or not np.allclose(lrs, expected, rtol=1e-6):
        problems.append(f"{name}: learning rates {lrs} are not the poly schedule {expected}")
    if state is not None:
        log = rec["filtermatch"]["filter_log"]
        if log[: len(state["filter_log"])] != state["filter_log"]:
            problems.append(f"{name}: the filter decisions before the kill were not restored")
        kept = set(state["pool"])
        after = {d["case"] for entry in log[len(state["filter_log"]):] for d in entry["dropped"]}
        if rec["filtermatch"]["remaining"] != len(kept - after):
            problems.append(f"{name}: {rec['filtermatch']['remaining']} unlabeled cases remain, expected {len(kept - after)}")
    return problems


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "writer":
        writer(Path(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("usage: reliability.py writer PROJECT SEED")
