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


@contextmanager
def atomic_path(final: str | Path, *, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``final`` atomically.

    ``exclusive=True`` never replaces an existing file (hard link, which fails if
    ``final`` exists): used for versions of human labels.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(final)
    try:
        yield tmp
        fsync_path(tmp)
        if exclusive:
            os.link(tmp, final)  # raises FileExistsError instead of overwriting
            os.unlink(tmp)
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
    """Append one line and fsync (the event log). A crash can only tear the last line."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line.rstrip("\n") + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def remove_stale_temporaries(folder: Path, recursive: bool = True) -> int:
    """Remove temporary files left by a killed writer (call under the writers' lock); returns how many."""
    n = 0
    for p in (folder.rglob if recursive else folder.glob)(f"{TMP_PREFIX}*"):
        if p.is_file():
            p.unlink()
            n += 1
    return n
