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


@pytest.fixture(params=["psutil", "proc", "ps"])
def process_table_source(request, monkeypatch, tmp_path):
    """Where the process tree comes from: psutil (installed here), Linux's /proc, or ``ps`` alone
    (macOS: Slicer ships no psutil and there is no /proc)."""
    if request.param != "psutil":
        monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil raises ImportError
    if request.param == "ps":
        monkeypatch.setattr(jobs, "PROC", tmp_path / "no-proc")
    return request.param


def test_cancel_ends_the_whole_process_tree(process_table_source):
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
    started = time.monotonic()
    job.cancel()  # returns at once: the SIGKILL after the grace period waits in a thread, not in the GUI
    assert time.monotonic() - started < 1.0
    assert job.wait(timeout=30) != 0 and job.error == "cancelled"
    deadline = time.monotonic() + 10
    while jobs.is_running(child):  # the grandchild is gone too (at most a zombie waiting for init to reap it)
        assert time.monotonic() < deadline, f"the engine's child {child} survived the cancel ({process_table_source})"
        time.sleep(0.05)


def test_a_process_that_ignores_sigterm_is_killed_after_the_grace_period():
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(120)"
    lines = []
    job = jobs.SubprocessJob([sys.executable, "-c", script], on_line=lines.append)
    while "ready" not in lines:
        job.poll()
        time.sleep(0.02)
    job.cancel(wait=True)
    assert job.wait(timeout=30) == -9 and job.error == "cancelled"


def test_line_buffer_keeps_lines_cut_across_reads():
    buffer = jobs.LineBuffer()
    line = json.dumps({"event": "epoch", "epoch": 3, "message": "Dice 0.91 · 12 min"}).encode()
    assert buffer.feed(b"plain\r\n" + line[:17]) == ["plain"]
    middle = "·".encode()  # a UTF-8 character cut in two
    assert buffer.feed(line[17:30]) == [] and buffer.feed(line[30:] + b"\nlast " + middle[:1]) == [line.decode()]
    assert buffer.feed(middle[1:]) == [] and buffer.flush() == ["last ·"] and buffer.flush() == []


class _Signal:
    def __init__(self):
        self.slots = []

    def emit(self, *args):
        for slot in self.slots:
            slot(*args)


class StandInQByteArray:
    """What PythonQt hands Python for a ``QByteArray`` a slot returns: a wrapped instance, not
    ``bytes``. PythonQtConversion.cpp (ConvertQtValueToPythonInternal) has the QByteArray -> bytes
    case commented out ("implicit conversion from QByteArray to str has been removed"), the
    wrapper has no buffer protocol (PythonQtInstanceWrapper.cpp: ``tp_as_buffer`` null), no
    ``__bytes__``, no ``__len__``/``__getitem__`` (operator[] is removed), and ``str()`` gives
    ``b'...'``'s repr; ``data()`` (typesystem_core.xml) returns the bytes."""

    def __init__(self, raw: bytes):
        self._raw = bytes(raw)

    def data(self) -> bytes:
        return self._raw

    def __str__(self):
        return repr(self._raw)

    def __iter__(self):  # no sequence protocol: bytes(qba) fails as it does in PythonQt
        raise TypeError("'QByteArray' object is not iterable")


def test_a_process_read_is_bytes_from_a_pythonqt_qbytearray_or_from_plain_bytes():
    raw = "epoch 3 · Dice 0.91\n".encode()
    with pytest.raises(TypeError):
        bytes(StandInQByteArray(raw))  # what jobs.py did before: every read raised inside Slicer 5.10
    assert jobs.output_bytes(StandInQByteArray(raw)) == raw
    assert jobs.output_bytes(raw) == raw and jobs.output_bytes(bytearray(raw)) == raw
    assert jobs.output_bytes(memoryview(raw)) == raw and jobs.output_bytes(StandInQByteArray(b"")) == b""
    with pytest.raises(TypeError, match="QByteArray"):
        jobs.output_bytes(12)
    buffer = jobs.LineBuffer()
    assert buffer.feed(StandInQByteArray(raw[:5])) == [] and buffer.feed(StandInQByteArray(raw[5:])) == [raw.decode().strip()]


class StandInQProcess:
    """The part of PythonQt's ``qt.QProcess`` the job uses, run by a real subprocess: output arrives in
    chunks cut anywhere, and a connection is made only by a full signal signature (as PythonQt needs for
    an overloaded signal such as ``finished``). Where the code reads return values, they are what
    PythonQt gives: a QByteArray wrapper for a read (StandInQByteArray), a Python ``int`` for
    ``processId()`` (qint64) and a ``str`` for ``errorString()`` (QString; PythonQtConversion.cpp
    converts both), and a failed start reports ``errorOccurred(FailedToStart)`` possibly from inside
    ``start()`` (Qt's QProcess docs), which the job handles either way."""

    MergedChannels, NormalExit, CrashExit, FailedToStart, Crashed = 1, 0, 1, 0, 1
    SIGNATURES = ("readyReadStandardOutput()", "finished(int,QProcess::ExitStatus)", "errorOccurred(QProcess::ProcessError)")

    def __init__(self):
        self.signals = {name: _Signal() for name in self.SIGNATURES}
        self.pending = b""
        self.popen = None

    def setProcessChannelMode(self, mode):
        pass

    def setProcessEnvironment(self, env):
        self.env = env.values

    def connect(self, signature, slot):
        assert signature in self.signals, f"not a full signal signature: {signature!r}"
        self.signals[signature].slots.append(slot)

    def start(self, program, args):
        import subprocess

        try:
            self.popen = subprocess.Popen([program, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          env=self.env)
        except OSError:
            self.signals["errorOccurred(QProcess::ProcessError)"].emit(self.FailedToStart)

    def processId(self):
        return self.popen.pid if self.popen else 0

    def errorString(self):
        return "No such file or directory"

    def readAllStandardOutput(self):
        out, self.pending = self.pending, b""
        return StandInQByteArray(out)  # a wrapped QByteArray, as PythonQt returns it

    def run_event_loop(self, chunk=7):
        """Deliver the output in chunks of ``chunk`` bytes, then the end."""
        data = self.popen.stdout.read()
        for i in range(0, len(data), chunk):
            self.pending += data[i:i + chunk]
            self.signals["readyReadStandardOutput()"].emit()
        code = self.popen.wait()
        self.signals["finished(int,QProcess::ExitStatus)"].emit(code, self.NormalExit)


class StandInEnvironment:
    def __init__(self):
        self.values = {}

    def insert(self, key, value):
        self.values[key] = value


def test_the_qprocess_launcher_connects_by_signature_and_keeps_every_line(monkeypatch):
    import types

    qt = types.SimpleNamespace(QProcess=StandInQProcess, QProcessEnvironment=StandInEnvironment)
    monkeypatch.setitem(sys.modules, "qt", qt)
    events, done = [], []
    job = jobs.SlicerJob.__new__(jobs.SlicerJob)
    jobs.Job.__init__(job, [sys.executable, "-c", SCRIPT], on_event=events.append,
                      on_done=lambda code, err: done.append(code))
    job.process = job._qprocess(jobs.engine_environment())
    job.process.run_event_loop(chunk=7)  # every JSON line arrives cut in pieces
    assert done == [0] and not job.running
    assert [e["event"] for e in events] == ["stage", "epoch", "epoch", "epoch", "stage", "progress"]
    assert "{not json" in job.parser.tail  # the last line too
    failed = jobs.SlicerJob.__new__(jobs.SlicerJob)
    jobs.Job.__init__(failed, ["/no/such/PythonSlicer", "-m", "ALSegLib"], on_done=lambda code, err: done.append(err))
    failed.process = failed._qprocess({})
    assert not failed.running and "could not be started" in done[-1] and "/no/such/PythonSlicer" in done[-1]


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


def test_a_job_whose_last_read_fails_still_ends():
    """Before, a read that raised in ``finished`` left the job "starting..." forever and every later
    job refused; the job now ends whatever its last read does (the error still surfaces)."""
    class Broken:  # a fault injected at the last read: the real QProcess read returns a QByteArray (see
        # StandInQByteArray); whatever a read raises, the job must still end
        def readAllStandardOutput(self):
            raise RuntimeError("the process's channel is gone")

    done = []
    job = jobs.SlicerJob.__new__(jobs.SlicerJob)
    jobs.Job.__init__(job, ["x"], on_done=lambda code, err: done.append(code))
    job.process, job._buffer = Broken(), jobs.LineBuffer()
    with pytest.raises(RuntimeError, match="channel is gone"):
        job._on_finished(0, True)
    assert done == [0] and not job.running
