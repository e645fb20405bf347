"""Long engine work as a background ``alseg`` process whose progress arrives as JSON lines.

The core is plain Python and runs anywhere: :func:`engine_command` builds the
command line, :class:`ProgressParser` turns output lines into events and a
progress state (stage, epoch, loss, time left), :func:`kill_tree` ends a
process and everything it started, and :class:`SubprocessJob` runs a command
with a reader thread whose lines are handed over on the caller's thread by
:meth:`SubprocessJob.poll` (Qt-safe).

Inside Slicer, :func:`start_in_slicer` starts the same command with
``slicer.util.launchConsoleProcess(blocking=False, ...)`` (Slicer >= 5.12,
callbacks on the main thread) or, on older Slicer, a ``qt.QProcess``; both
feed the same parser and cancel through :func:`kill_tree`.
"""
from __future__ import annotations

import inspect
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENGINE_DIR = Path(__file__).resolve().parents[1]  # next to ALSeg.py in Slicer; ALSeg/ in a checkout
CHECKOUT_ROOT = Path(__file__).resolve().parents[2]


def engine_path() -> Path:
    """The folder that holds the ``ALSegLib`` package: bundled beside the module, or a checkout's root."""
    for folder in (ENGINE_DIR, CHECKOUT_ROOT):
        if (folder / "ALSegLib" / "__init__.py").is_file():
            return folder
    raise RuntimeError(f"the ALSeg engine (ALSegLib) was found neither in {ENGINE_DIR} nor in {CHECKOUT_ROOT}")


def python_executable() -> str:
    """Slicer's ``PythonSlicer`` when running inside Slicer (it sets up Slicer's libraries; Slicer puts
    it on PATH), else this Python."""
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.is_file() else sys.executable


def engine_command(*args: str, python: str | None = None) -> list[str]:
    """``alseg ARGS`` as a command line with JSON-lines progress."""
    return [python or python_executable(), "-m", "ALSegLib", "--progress", "jsonl", *map(str, args)]


def engine_environment(base: dict | None = None) -> dict[str, str]:
    """Environment for the engine process: the engine on PYTHONPATH, JSON progress, and the
    nnU-Net settings that keep a desktop responsive (callers may override)."""
    env = dict(os.environ if base is None else base)
    parts = [str(engine_path())] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    env["ALSEG_PROGRESS"] = "jsonl"
    env.setdefault("nnUNet_compile", "f")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


# --- progress -------------------------------------------------------------------------------


@dataclass
class Progress:
    """What the progress bar shows."""
    stage: str = ""
    done: int | None = None
    total: int | None = None
    epoch: int | None = None
    epochs: int | None = None
    loss: float | None = None
    epoch_seconds: list[float] = field(default_factory=list)
    engine_left: float | None = None  # the engine's own estimate of the time left (estimate and epoch events) ...
    engine_left_at: float = 0.0  # ... and when it came

    @property
    def fraction(self) -> float | None:
        if self.epoch and self.epochs:
            return min(1.0, self.epoch / self.epochs)
        if self.done is not None and self.total:
            return min(1.0, self.done / self.total)
        return None

    @property
    def seconds_left(self) -> float | None:
        """The engine's latest estimate less the time since it came (from the first minute: the
        engine measures before it starts), else the recent epochs' mean times the epochs left."""
        if self.engine_left is not None:
            return max(0.0, self.engine_left - (time.monotonic() - self.engine_left_at))
        if self.epoch and self.epochs and self.epoch_seconds:
            recent = self.epoch_seconds[-5:]
            return (self.epochs - self.epoch) * sum(recent) / len(recent)
        return None

    def text(self) -> str:
        parts = [self.stage] if self.stage else []
        if self.epoch and self.epochs:
            parts.append(f"epoch {self.epoch}/{self.epochs}")
        elif self.done is not None and self.total:
            parts.append(f"{self.done}/{self.total}")
        if self.loss is not None:
            parts.append(f"loss {self.loss:.3f}")
        left = self.seconds_left
        if left is not None:
            parts.append(f"{int(left // 60)} min {int(left % 60):02d} s left")
        return " · ".join(parts)


class ProgressParser:
    """Feed it output lines; it keeps the events, the progress state and the recent text."""

    def __init__(self, on_event: Callable[[dict], None] | None = None, tail_lines: int = 200):
        self.on_event = on_event
        self.events: list[dict] = []
        self.progress = Progress()
        self.tail: deque[str] = deque(maxlen=tail_lines)

    def feed(self, line: str) -> dict | None:
        line = line.rstrip("\r\n")
        event = _as_event(line)
        if event is None:
            if line.strip():
                self.tail.append(line)
            return None
        self.events.append(event)
        self._update(event)
        if self.on_event is not None:
            self.on_event(event)
        return event

    def _update(self, e: dict) -> None:
        p = self.progress
        kind = e["event"]
        if kind == "stage":
            p.stage, p.done, p.total, p.epoch, p.epochs, p.loss = str(e.get("stage", "")), None, None, None, None, None
            p.epoch_seconds.clear()
            p.engine_left = None
        elif kind == "estimate":
            left = e.get("seconds_left", e.get("estimated_s"))
            if isinstance(left, (int, float)):
                p.engine_left, p.engine_left_at = float(left), time.monotonic()
        elif kind == "progress":
            p.done, p.total = e.get("done"), e.get("total")
            if e.get("stage") and not p.stage:
                p.stage = str(e["stage"])
        elif kind == "epoch":
            p.epoch, p.epochs = e.get("epoch"), e.get("epochs")
            loss = e.get("train_loss")
            p.loss = float(loss) if isinstance(loss, (int, float)) else p.loss
            if isinstance(e.get("seconds"), (int, float)) and e["seconds"] >= 0:
                p.epoch_seconds.append(float(e["seconds"]))
            if isinstance(e.get("seconds_left"), (int, float)):
                p.engine_left, p.engine_left_at = float(e["seconds_left"]), time.monotonic()

    def error_text(self, returncode: int) -> str:
        """What went wrong, for the user: the engine's own ``alseg: ...`` lines, else the last output."""
        lines = list(self.tail)
        own = [ln for ln in lines if ln.startswith("alseg:")]
        body = "\n".join(own or lines[-15:]) or "(no output)"
        if returncode < 0:
            return f"the job was ended by signal {-returncode}\n{body}"
        return f"the job failed (exit code {returncode})\n{body}"


def _as_event(line: str) -> dict | None:
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) and isinstance(value.get("event"), str) else None


# --- processes ------------------------------------------------------------------------------


PROC = Path("/proc")


def process_table() -> dict[int, tuple[int, bool]]:
    """Every process as ``pid -> (parent pid, exited-but-unreaped)``, from psutil where it is
    installed, else Linux's /proc, else ``ps`` (macOS and other Unix: Slicer ships no psutil)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        out = {}
        for p in psutil.process_iter(["pid", "ppid", "status"]):
            info = p.info
            out[info["pid"]] = (info["ppid"] or 0, info["status"] == psutil.STATUS_ZOMBIE)
        return out
    if PROC.is_dir():
        out = {}
        for entry in PROC.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            out[int(entry.name)] = (int(fields[1]), fields[0] == "Z")
        return out
    return _ps_table()


def _ps_table() -> dict[int, tuple[int, bool]]:
    done = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,stat="], capture_output=True, text=True, check=False)
    out = {}
    for line in done.stdout.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = (int(parts[1]), len(parts) > 2 and parts[2].startswith("Z"))
    return out


def descendants(pid: int, table: dict[int, tuple[int, bool]] | None = None) -> list[int]:
    """Every process started (transitively) by ``pid``, on every platform but Windows (where
    ``taskkill /T`` walks the tree itself)."""
    table = process_table() if table is None else table
    children: dict[int, list[int]] = {}
    for child, (parent, _zombie) in table.items():
        children.setdefault(parent, []).append(child)
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out and child != pid:
                out.append(child)
                todo.append(child)
    return out


def terminate_tree(pid: int) -> list[int]:
    """SIGTERM to a process and all its descendants (found before any is signalled, so that
    children re-parented when their parent exits are not missed); returns the pids signalled."""
    if pid <= 0:  # os.kill(0, ...) would signal the caller's own process group
        raise ValueError(f"not a process id: {pid}")
    if os.name == "nt":
        subprocess.run(["taskkill", "/PID", str(pid), "/T", "/F"], capture_output=True, check=False)
        return [pid]
    pids = [pid, *descendants(pid)]
    _signal(pids, signal.SIGTERM)
    return pids


def _signal(pids: Sequence[int], sig) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def finish_kill(pids: Sequence[int], grace: float = 3.0) -> None:
    """Wait up to ``grace`` seconds for terminated processes to end, then SIGKILL what is left."""
    if os.name == "nt":
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(is_running(p) for p in pids):
        time.sleep(0.05)
    left = [p for p in pids if is_running(p)]
    if left:
        _signal(left, signal.SIGKILL)


def kill_tree(pid: int, grace: float = 3.0) -> None:
    """End a process and all its descendants: terminate, wait up to ``grace`` seconds, then kill."""
    finish_kill(terminate_tree(pid), grace)


def is_running(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process not yet reaped, a zombie, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not _exited(pid)


def _exited(pid: int) -> bool:
    """Whether a pid that still answers signals is a zombie (exited, not yet reaped) or just gone."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True
    if PROC.is_dir():
        try:
            return (PROC / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return True
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True, check=False).stdout.strip()
    return not state or state.startswith("Z")


def output_bytes(data) -> bytes:
    """The bytes of one process read: ``qt.QProcess.readAllStandardOutput()`` returns PythonQt's
    wrapped ``QByteArray``, which has no buffer protocol, ``__bytes__`` or sequence slots
    (PythonQt's PythonQtInstanceWrapper.cpp: ``tp_as_buffer`` is null; PythonQtConversion.cpp
    no longer converts QByteArray to ``bytes``): ``bytes(data)`` raises; its ``data()`` (added by
    PythonQt's typesystem_core.xml) gives the bytes, as Slicer's own code reads it
    (DICOMLib/DICOMExportScene.py: ``dumpByteArray.data()``). Plain ``bytes``/``bytearray``/
    ``memoryview`` (a subprocess pipe, a test) pass through."""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data)
    read = getattr(data, "data", None)
    if callable(read):
        value = read()
        if isinstance(value, str):  # PythonQt builds for Python 2 gave str
            return value.encode("utf-8", "surrogateescape")
        return bytes(value)
    if data is None:
        return b""
    raise TypeError(f"not a process read (bytes or a QByteArray): {type(data).__name__}")


class LineBuffer:
    """Bytes as they arrive from a process (a read can end in the middle of a line, or of a
    UTF-8 character) -> whole lines; :meth:`flush` gives the last unterminated line at the end."""

    def __init__(self):
        self._pending = b""

    def feed(self, data) -> list[str]:
        """``data``: bytes, or a PythonQt ``QByteArray`` (:func:`output_bytes`)."""
        self._pending += output_bytes(data)
        *lines, self._pending = self._pending.split(b"\n")
        return [ln.rstrip(b"\r").decode("utf-8", "replace") for ln in lines]

    def flush(self) -> list[str]:
        rest, self._pending = self._pending, b""
        return [rest.rstrip(b"\r").decode("utf-8", "replace")] if rest.strip() else []


class Job:
    """What both launchers share: the parser, the end, the error text, cancel."""

    pid: int

    def __init__(self, args: Sequence[str], on_event=None, on_line=None, on_done=None):
        self.args = list(args)
        self.parser = ProgressParser(on_event)
        self.on_line: Callable[[str], None] | None = on_line
        self.on_done: Callable[[int, str | None], None] | None = on_done
        self.returncode: int | None = None
        self.error: str | None = None
        self.cancelled = False

    @property
    def running(self) -> bool:
        return self.returncode is None

    def _line(self, line: str) -> None:
        line = line.rstrip("\n")
        self.parser.feed(line)
        if self.on_line is not None:
            self.on_line(line)

    def _finish(self, returncode: int, error: str | None = None) -> None:
        if self.returncode is not None:  # Qt may report a crash twice (errorOccurred, then finished)
            return
        self.returncode = returncode
        if returncode != 0:
            self.error = "cancelled" if self.cancelled else error or self.parser.error_text(returncode)
        if self.on_done is not None:
            self.on_done(returncode, self.error)

    def cancel(self, wait: bool = False) -> None:
        """End the job and every process it started: SIGTERM to the whole tree now, SIGKILL to
        what is left after a grace period, waited for in a background thread unless ``wait``
        (the GUI never blocks on it); the job's end arrives as usual."""
        if self.running and getattr(self, "pid", 0) > 0:  # pid 0 would signal Slicer's own process group
            self.cancelled = True
            pids = terminate_tree(self.pid)
            if wait:
                finish_kill(pids)
            else:
                threading.Thread(target=finish_kill, args=(pids,), daemon=True, name="alseg-cancel").start()


class SubprocessJob(Job):
    """Run a command in the background; :meth:`poll` delivers its lines and end on the calling thread."""

    def __init__(self, args: Sequence[str], *, env: dict | None = None, cwd: str | None = None,
                 on_event: Callable[[dict], None] | None = None, on_line: Callable[[str], None] | None = None,
                 on_done: Callable[[int, str | None], None] | None = None):
        super().__init__(args, on_event, on_line, on_done)
        self._lines: queue.Queue = queue.Queue()
        self.process = subprocess.Popen(
            self.args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, errors="replace", bufsize=1, start_new_session=(os.name != "nt"))
        self.pid = self.process.pid
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self._lines.put(("line", line))
        self.process.wait()
        self._lines.put(("done", self.process.returncode))

    def poll(self) -> bool:
        """Hand over what arrived; True while the job runs."""
        while True:
            try:
                kind, value = self._lines.get_nowait()
            except queue.Empty:
                return self.running
            if kind == "line":
                self._line(value)
            else:
                self._finish(value)
                return False

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll():
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"{self.args[:4]} still running after {timeout} s")
            time.sleep(0.02)
        return self.returncode


# --- inside Slicer --------------------------------------------------------------------------


class SlicerJob(Job):
    """An engine job in Slicer: Slicer's process launcher, callbacks on the main thread."""

    def __init__(self, args: Sequence[str], *, on_event=None, on_line=None, on_done=None, env: dict | None = None,
                 qprocess: bool = False):
        """``qprocess``: the ``qt.QProcess`` path even where Slicer's launcher could run it (the
        self-test covers both on Slicer >= 5.12)."""
        import slicer

        super().__init__(args, on_event, on_line, on_done)
        environment = engine_environment(env)
        launcher = slicer.util.launchConsoleProcess
        if not qprocess and "blocking" in inspect.signature(launcher).parameters:  # Slicer >= 5.12
            self.process = launcher(self.args, useStartupEnvironment=False, updateEnvironment=environment,
                                    blocking=False, logCallback=self._line, completedCallback=self._finish)
            self.pid = self.process.pid
        else:
            self.process = self._qprocess(environment)

    def _qprocess(self, environment: dict):
        """Slicer < 5.12: a ``qt.QProcess``. Its signals are connected by their full signatures:
        PythonQt would otherwise hand ``finished`` to Qt 5's deprecated one-argument overload."""
        import qt

        process = qt.QProcess()
        process.setProcessChannelMode(qt.QProcess.MergedChannels)
        qenv = qt.QProcessEnvironment()
        for key, value in environment.items():
            qenv.insert(key, value)
        process.setProcessEnvironment(qenv)
        self._buffer = LineBuffer()
        process.connect("readyReadStandardOutput()", lambda: self._on_output(process.readAllStandardOutput()))
        process.connect("finished(int,QProcess::ExitStatus)",
                        lambda code, status: self._on_finished(code, status == qt.QProcess.NormalExit))
        process.connect("errorOccurred(QProcess::ProcessError)",
                        lambda err: self._on_error(err == qt.QProcess.FailedToStart, process.errorString()))
        process.start(self.args[0], self.args[1:])
        self.pid = int(process.processId())
        return process

    def _on_output(self, data) -> None:
        for line in self._buffer.feed(data):
            self._line(line)

    def _on_finished(self, code: int, normal_exit: bool) -> None:
        try:
            if self.process is not None:  # what is still unread, then the last unterminated line
                self._on_output(self.process.readAllStandardOutput())
            for line in self._buffer.flush():
                self._line(line)
        finally:  # the job ends even when its last output cannot be read: never "running" forever
            self._finish(int(code) if normal_exit else -int(signal.SIGKILL))

    def _on_error(self, failed_to_start: bool, text: str) -> None:
        """A process that could not start never sends ``finished``: end the job here, from the event
        loop (Qt may report it inside ``start()``, before the caller holds the job)."""
        if failed_to_start:
            message = f"the engine could not be started ({self.args[0]}): {text}"
            try:
                import qt

                qt.QTimer.singleShot(0, lambda: self._finish(127, message))
            except (ImportError, AttributeError):
                self._finish(127, message)


def start_in_slicer(*alseg_args: str, on_event=None, on_line=None, on_done=None, env: dict | None = None,
                    qprocess: bool = False) -> SlicerJob:
    """Run ``alseg ALSEG_ARGS`` in the background from Slicer (``qprocess``: see :class:`SlicerJob`)."""
    return SlicerJob(engine_command(*alseg_args), on_event=on_event, on_line=on_line, on_done=on_done, env=env,
                     qprocess=qprocess)


def start(*alseg_args: str, on_event=None, on_line=None, on_done=None, env: dict | None = None,
          python: str | None = None) -> SubprocessJob:
    """Run ``alseg ALSEG_ARGS`` in the background outside Slicer (scripts, tests)."""
    return SubprocessJob(engine_command(*alseg_args, python=python), env=engine_environment(env),
                         on_event=on_event, on_line=on_line, on_done=on_done)
