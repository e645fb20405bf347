"""The event log (``events.jsonl``): one JSON object per line, appended, never rewritten."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .. import atomic
from ..errors import InputError
from .files import now_iso, user_name


class EventLog:
    def __init__(self, path: Path):
        self.path = path

    def append(self, event: str, **details) -> None:
        """One line: time, event, pid, user and ``details`` (the caller holds the project lock)."""
        record = {"time": now_iso(), "event": event, "pid": os.getpid(), "user": user_name(), **details}
        atomic.append_line(self.path, json.dumps(record, sort_keys=True, default=str))

    def read(self) -> list[dict]:
        """All events; a torn last line (writer killed mid-append) is skipped."""
        if not self.path.exists():
            return []
        out = []
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if i != len(lines) - 1:
                    raise InputError(self.path, f"line {i + 1} is not valid JSON (the event log was edited by hand?)") from None
        return out
