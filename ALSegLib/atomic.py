"""Crash-safe writes: temporary file in the destination folder, flush + fsync, rename.

A reader sees either the old file or the new one, never a torn mix, even if the
writer is killed at any moment (the temporary file is then left behind under a
hidden ``.tmp-`` name and removed by :func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import errno
import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import StorageError

TMP_PREFIX = ".tmp-"
# a full disk, a quota, a read-only mount, no permission: the user's to fix, not a bug
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG}
_HINTS = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space", errno.EROFS: "use a writable folder",
          errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions"}


def storage_error(exc: OSError, where: str | Path, outcome: str | None = None) -> StorageError:
    """A clear error for a failed write: the file, the system's reason, what happened, what to do."""
    reason = (os.strerror(exc.errno) if exc.errno else str(exc)).lower()
    hint = _HINTS.get(exc.errno, "check the disk")
    said = f"{outcome}; " if outcome else ""
    return StorageError(where, f"cannot write: {reason} ({said}{hint} and run again)", errno=exc.errno)


def _failed_write(folder: Path) -> OSError | None:
    """Why a library writer (ITK reports only 'failed to write') could not write into
    ``folder``: a read-only mount or a full disk, read from the file system itself."""
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, os.strerror(errno.EROFS))
    if st.f_bavail * st.f_frsize < (1 << 20):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def fsync_path(path: Path) -> None:
    """Flush a file's data, or a folder's entries (a rename into it), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temporary_path(final: Path) -> Path:
    """A unique hidden path beside ``final`` that keeps its (possibly double) extension."""
    name = final.name
    ext = "".join(final.suffixes[-2:]) if name.endswith((".nii.gz", ".seg.nrrd")) else final.suffix
    return final.with_name(f"{TMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-{name[: len(name) - len(ext)]}{ext}")


def make_dirs(folder: Path) -> list[Path]:
    """Create ``folder`` and missing parents, making each new entry durable in its parent;
    returns the folders created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_path(new.parent)
    return missing[::-1]


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        try:
            folder.rmdir()
        except OSError:  # not empty (another file arrived) or already gone
            break


def _place_exclusive(tmp: Path, final: Path) -> None:
    """Move ``tmp`` to ``final`` only if ``final`` does not exist.

    A hard link fails atomically if ``final`` exists. File systems without hard
    links (exFAT, some network shares) fall back to check-then-rename, which is
    safe because project writers hold the project lock.
    """
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError:
        if final.exists():
            raise FileExistsError(final) from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


@contextmanager
def atomic_path(final: str | Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically.

    ``exclusive=True`` never replaces an existing file (raises FileExistsError):
    used for versions of human labels.
    """
    final = Path(final)
    tmp = temporary_path(final)
    created: list[Path] = []
    placed = False
    try:
        created = make_dirs(final.parent)
        yield tmp
        fsync_path(tmp)
        if exclusive:
            _place_exclusive(tmp, final)
        else:
            os.replace(tmp, final)
        placed = True
        fsync_path(final.parent)
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:
            raise storage_error(exc, final) from None
        raise
    except RuntimeError:  # a library's writer (SimpleITK) failing on a full or read-only disk
        cause = _failed_write(final.parent)
        if cause is not None:
            raise storage_error(cause, final) from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
        if not placed:  # a failed write leaves no new empty folders behind
            _remove_empty(created)


def write_bytes(final: str | Path, data: bytes, *, exclusive: bool = False) -> None:
    with atomic_path(final, exclusive=exclusive) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def write_json(final: str | Path, obj, *, exclusive: bool = False) -> None:
    write_bytes(final, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode(), exclusive=exclusive)


def write_with(final: str | Path, writer: Callable[[Path], None], *, exclusive: bool = False) -> None:
    """Atomic write through a library that only writes to a path (e.g. SimpleITK)."""
    with atomic_path(final, exclusive=exclusive) as tmp:
        writer(tmp)


def append_line(path: str | Path, line: str) -> None:
    """Append one line and fsync (the event log).

    A crash can only tear the last line; such a torn tail (no final newline) is
    cut off before the next append, so it never ends up inside the log.
    """
    try:
        with open(path, "ab+") as fh:
            size = fh.seek(0, os.SEEK_END)
            if size:
                fh.seek(size - 1)
                if fh.read(1) != b"\n":
                    fh.truncate(_end_of_last_line(fh, size))
            fh.write((line.rstrip("\n") + "\n").encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno in STORAGE_ERRNOS:  # the change it records was made; only its log line is missing
            raise storage_error(exc, path, "the change was stored but not logged") from None
        raise


def _end_of_last_line(fh, size: int, block: int = 1 << 16) -> int:
    """Offset just past the last newline of an open binary file (0 if none)."""
    end = size
    while end > 0:
        start = max(end - block, 0)
        fh.seek(start)
        chunk = fh.read(end - start)
        at = chunk.rfind(b"\n")
        if at >= 0:
            return start + at + 1
        end = start
    return 0


def remove_stale_temporaries(folder: Path, recursive: bool = True) -> int:
    """Remove temporary files left by a killed writer (call under the writers' lock); returns how many."""
    n = 0
    for p in (folder.rglob if recursive else folder.glob)(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n
