"""The Slicer module's background-job core (ALSeg/ALSegSlicer/jobs.py) with real subprocesses."""
from __future__ import annotations

import json
import os
import sys
import textwrap
import time

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "ALSeg"))

from ALSegSlicer import jobs  # noqa: E402

SCRIPT = textwrap.dedent("""
    import json, sys, time
    def event(**e):
        sys.stderr.write(json.dumps({"time": time.time(), **e}) + "\\n"); sys.stderr.flush()
    print("plain output line", flush=True)
    event(event="stage", stage="pretrain")
    for i in range(1, 4):
        event(event="epoch", epoch=i, epochs=10, train_loss=1.0 / i, seconds=2.0)
    event(event="stage", stage="predict")
    event(event="progress", stage="predict", done=3, total=4)
    print("{not json", flush=True)
""")


def test_events_drive_the_progress_state():
    seen = []
    job = jobs.SubprocessJob([sys.executable, "-c", SCRIPT], on_event=seen.append)
    assert job.wait(timeout=60) == 0 and job.error is None
    kinds = [e["event"] for e in seen]
    assert kinds == ["stage", "epoch", "epoch", "epoch", "stage", "progress"]
    p = job.parser.progress
    assert p.stage == "predict" and p.fraction == 0.75 and p.text() == "predict · 3/4"
    assert "plain output line" in job.parser.tail and "{not json" in job.parser.tail


def test_epoch_progress_gives_loss_and_time_left():
    parser = jobs.ProgressParser()
    parser.feed(json.dumps({"event": "stage", "stage": "train"}))
    for i, seconds in enumerate([10.0, 12.0], 1):
        parser.feed(json.dumps({"event": "epoch", "epoch": i, "epochs": 10, "train_loss": -0.5, "seconds": seconds}))
    p = parser.progress
    assert p.fraction == 0.2 and p.seconds_left == pytest.approx(8 * 11.0)
    assert p.text() == "train · epoch 2/10 · loss -0.500 · 1 min 28 s left"
    parser.feed(json.dumps({"event": "stage", "stage": "predict"}))  # a new stage resets the counters
    assert parser.progress.fraction is None and parser.progress.loss is None


def test_cancel_ends_the_whole_process_tree():
    script = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        print(f"child {child.pid}", flush=True)
        time.sleep(120)
    """)
    lines = []
    job = jobs.SubprocessJob([sys.executable, "-c", script], on_line=lines.append)
    deadline = time.monotonic() + 30
    while not any(ln.startswith("child ") for ln in lines):
        job.poll()
        assert time.monotonic() < deadline, "the job never started its child"
        time.sleep(0.05)
    child = int(next(ln for ln in lines if ln.startswith("child ")).split()[1])
    assert child in jobs.descendants(job.process.pid)
    job.cancel()
    assert job.wait(timeout=30) != 0 and job.error == "cancelled"
    assert not jobs.is_running(child)  # the grandchild is gone too (at most a zombie waiting for init to reap it)


def test_a_failed_job_shows_the_engines_error_text():
    script = ("import sys; print('working', flush=True); "
              "sys.stderr.write('alseg: error: /data/ct.nii.gz: truncated file\\n'); sys.exit(2)")
    done = []
    job = jobs.SubprocessJob([sys.executable, "-c", script], on_done=lambda code, err: done.append((code, err)))
    assert job.wait(timeout=60) == 2
    assert done == [(2, job.error)]
    assert job.error.startswith("the job failed (exit code 2)") and "/data/ct.nii.gz: truncated file" in job.error
    assert "working" not in job.error  # the engine's own message, not the noise before it


def test_the_real_engine_runs_as_a_job(tmp_path, project):
    """``alseg`` through the same command line and environment the module uses."""
    job = jobs.start("status", str(project.root), "--json", python=sys.executable)
    out = []
    job.on_line = out.append
    assert job.wait(timeout=120) == 0, job.error
    status = json.loads("\n".join(ln for ln in out if not ln.startswith('{"event"')))
    assert status["cases"] == 6
    bad = jobs.start("add", str(project.root), str(tmp_path / "missing.nii.gz"), python=sys.executable)
    assert bad.wait(timeout=120) == 2
    assert "missing.nii.gz" in bad.error
    env = jobs.engine_environment({})
    assert env["ALSEG_PROGRESS"] == "jsonl" and env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO)
    assert jobs.engine_command("round", "p", python="py")[:5] == ["py", "-m", "ALSegLib", "--progress", "jsonl"]
