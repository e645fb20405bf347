"""Errors that the CLI turns into exit codes: bad input is 2, anything else 1."""
from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input from the user: names the file (or item) and what is wrong with it.

    Raised before anything in a project is changed, so the project stays as it was.
    """

    def __init__(self, where: str | Path | None, problem: str):
        self.where = str(where) if where is not None else None
        self.problem = problem
        super().__init__(f"{self.where}: {problem}" if self.where else problem)


class ProjectLockedError(InputError):
    """Another writer holds the project lock and did not release it in time."""


class StorageError(InputError):
    """The disk is full or the folder cannot be written: names the file and the system's
    reason (``errno``). The write it reports was abandoned; no file is left torn."""

    def __init__(self, where: str | Path | None, problem: str, errno: int | None = None):
        super().__init__(where, problem)
        self.errno = errno
