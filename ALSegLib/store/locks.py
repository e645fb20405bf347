"""The project's locks.

- :class:`WriterLock` (``alseg.lock``): every write to the folder happens under it. Between
  processes a file lock the OS drops when its holder dies; between threads of one process a
  re-entrant lock. The holder's pid, host and purpose are written into the file while held
  and erased on a clean release, so a holder line found on acquiring names a writer that was
  killed holding it: the caller's ``on_acquire`` gets that line to clean up after it.
- :func:`exclusive_run`: a non-waiting lock for a long job (a training, a round), so that a
  second process is told who is busy instead of waiting an hour.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import atomic
from ..errors import InputError, ProjectLockedError
from .files import now_iso

DEFAULT_LOCK_TIMEOUT_S = 60.0


def lock_timeout() -> float:
    """Seconds a writer waits for the lock: ``ALSEG_LOCK_TIMEOUT`` or 60."""
    text = os.environ.get("ALSEG_LOCK_TIMEOUT")
    if text is None:
        return DEFAULT_LOCK_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise InputError("ALSEG_LOCK_TIMEOUT", f"must be a number of seconds, not {text!r}") from None
    if value < 0:
        raise InputError("ALSEG_LOCK_TIMEOUT", f"must not be negative ({text})")
    return value


class WriterLock:
    """The re-entrant writer lock on ``path``; ``on_acquire(stale_holder)`` runs each time it is
    taken from free (``stale_holder``: the line a killed holder left, or ``""``)."""

    def __init__(self, path: Path, on_acquire: Callable[[str], None] | None = None):
        self.path = path
        self.on_acquire = on_acquire
        self._thread_lock = threading.RLock()  # threads of this process using this object
        self._owner: int | None = None  # the thread holding the lock
        self._depth = 0

    @property
    def held(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._depth > 0 and self._owner == threading.get_ident()

    @contextmanager
    def hold(self, purpose: str = "write", timeout: float | None = None) -> Iterator[None]:
        """Hold the lock, waiting up to ``timeout`` seconds (``ALSEG_LOCK_TIMEOUT``, default 60)
        for another writer, process or thread, then :class:`ProjectLockedError` naming the holder."""
        timeout = lock_timeout() if timeout is None else timeout
        deadline = time.monotonic() + timeout
        if not self._thread_lock.acquire(timeout=timeout):
            raise ProjectLockedError(self.path, "project is busy: another thread of this process writes; "
                                                f"waited {timeout:g} s")
        try:
            if self._depth:
                self._depth += 1
                try:
                    yield
                finally:
                    self._depth -= 1
                return
            fd = _open_lock_file(self.path)
            while not _try_lock(fd):
                if time.monotonic() >= deadline:
                    holder = _read_holder(self.path)
                    os.close(fd)
                    raise ProjectLockedError(
                        self.path, f"project is busy: another writer holds the lock ({holder}); waited {timeout:g} s"
                    )
                time.sleep(0.05)
            self._depth, self._owner = 1, threading.get_ident()
            try:
                # a holder line left in the file: its writer died holding the lock (a clean
                # release empties it); the OS has dropped that lock, so it is ours now
                os.lseek(fd, 0, os.SEEK_SET)  # (not os.pread: Windows has none)
                stale = os.read(fd, 4096).decode("utf-8", "replace").strip()
                holder = f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()} for {purpose}"
                try:
                    os.ftruncate(fd, 0)
                    os.lseek(fd, 0, os.SEEK_SET)
                    os.write(fd, holder.encode())
                except OSError as exc:
                    if exc.errno in atomic.STORAGE_ERRNOS:
                        raise atomic.storage_error(exc, self.path) from None
                    raise
                if self.on_acquire is not None:
                    self.on_acquire(stale)
                yield
            finally:
                self._depth, self._owner = 0, None
                os.ftruncate(fd, 0)
                _unlock(fd)
                os.close(fd)
        finally:
            self._thread_lock.release()


@contextmanager
def exclusive_run(path: Path, busy: str) -> Iterator[None]:
    """Hold a non-waiting lock on ``path`` for a long job (a training, a round): a second
    process gets a :class:`ProjectLockedError` with ``busy`` and the holder, not a wait.
    The OS drops the lock when its holder dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock_file(path)
    if not _try_lock(fd):
        holder = path.read_text(errors="replace").strip() or "another process"
        os.close(fd)
        raise ProjectLockedError(path, f"{busy} ({holder})")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {now_iso()}".encode())
        yield
    finally:
        os.ftruncate(fd, 0)
        _unlock(fd)
        os.close(fd)


def _try_lock(fd: int) -> bool:
    if os.name == "nt":  # pragma: no cover - Slicer on Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _unlock(fd: int) -> None:
    if os.name == "nt":  # pragma: no cover
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _open_lock_file(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        if exc.errno in atomic.STORAGE_ERRNOS:
            raise atomic.storage_error(exc, path) from None
        raise


def _read_holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        text = ""
    return text or "holder unknown"
