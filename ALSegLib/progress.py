"""One progress stream: a tqdm bar on a terminal, JSON lines for Slicer and scripts.

Set ``ALSEG_PROGRESS=jsonl`` (the Slicer module does) to get one JSON object per
step on stderr: ``{"event": "progress", "stage": ..., "done": i, "total": n}``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def mode() -> str:
    return os.environ.get("ALSEG_PROGRESS", "auto")


def emit(event: str, **fields) -> None:
    """Write one JSON-lines event to stderr (only in jsonl mode)."""
    if mode() == "jsonl":
        sys.stderr.write(json.dumps({"event": event, "time": time.time(), **fields}) + "\n")
        sys.stderr.flush()


def duration(seconds: float) -> str:
    """``2 h 05 min``, ``12 min 30 s``, ``45 s``."""
    s = int(round(max(0.0, seconds)))
    if s >= 3600:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    if s >= 60:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s} s"


def announce(event: str, text: str, **fields) -> None:
    """Tell the user something before or while work runs (an estimate, a warning, a choice made):
    a line on stderr, or a JSON-lines event carrying the same text as ``message``."""
    if mode() == "jsonl":
        emit(event, message=text, **fields)
    elif mode() != "off":
        sys.stderr.write(f"{text}\n")
        sys.stderr.flush()


def track(items: Sequence[T] | Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """Iterate with progress: tqdm on a terminal (stderr), JSON lines in jsonl mode, else silent."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if mode() == "jsonl":
        for i, item in enumerate(items):
            yield item
            emit("progress", stage=desc, done=i + 1, total=total)
        return
    from tqdm import tqdm  # here: the engine's console API imports in a bare Slicer Python

    disable = mode() == "off" or not sys.stderr.isatty()
    yield from tqdm(items, desc=desc, total=total, disable=disable, leave=False)


class Counter:
    """Progress the caller counts (work that ends in any order, on Ray workers): the same
    ``progress`` events as :func:`track` in jsonl mode (with the caller's fields: ``case``,
    ``worker``), the same tqdm bar on a terminal."""

    def __init__(self, desc: str, total: int | None):
        self.desc, self.total, self.done = desc, total, 0
        self.bar = None
        if mode() not in ("jsonl", "off") and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, total=total, leave=False)

    def step(self, **fields) -> None:
        self.done += 1
        emit("progress", stage=self.desc, done=self.done, total=self.total, **fields)
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
