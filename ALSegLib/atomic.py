"""Crash-safe writes: temporary file in the destination folder, flush + fsync, rename.

A reader sees either the old file or the new one, never a torn mix, even if the
writer is killed at any moment (the temporary file is then left behind under a
hidden ``.tmp-`` name and removed by :func:`remove_stale_temporaries`).
"""
from __future__ import annotations

import json
import os
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_PREFIX = ".tmp-"


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


def make_dirs(folder: Path) -> None:
    """Create ``folder`` and missing parents, making each new entry durable in its parent."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        new.mkdir(exist_ok=True)
        fsync_path(new.parent)


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
    make_dirs(final.parent)
    tmp = temporary_path(final)
    try:
        yield tmp
        fsync_path(tmp)
        if exclusive:
            _place_exclusive(tmp, final)
        else:
            os.replace(tmp, final)
        fsync_path(final.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


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
    with open(path, "ab+") as fh:
        size = fh.seek(0, os.SEEK_END)
        if size:
            fh.seek(size - 1)
            if fh.read(1) != b"\n":
                fh.truncate(_end_of_last_line(fh, size))
        fh.write((line.rstrip("\n") + "\n").encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())


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
