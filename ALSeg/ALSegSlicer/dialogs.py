"""Errors of the panel's actions, shown once and ended there.

``slicer.util.tryWithErrorDisplay`` shows an error dialog and then **re-raises** the exception
(Base/Python/slicer/util.py, v5.10.0 line 3409 and main line 3733: ``raise`` at the end of its
``except`` block; under ``--testing`` it shows nothing and re-raises). A panel slot that relies on
it alone lets the exception escape into Qt, which prints a traceback after the dialog, and any
code after the ``with`` block (a ``return False``, a refresh) never runs. :func:`errors_shown`
is that context manager with the exception ended after the dialog: the caller reads
``outcome.failed``. Under ``--testing`` (no dialog) it re-raises, so a self-test fails where the
error happened. No Qt at module level (it imports on slicer-core and in tests).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

log = logging.getLogger("ALSeg")


@dataclass
class Outcome:
    failed: bool = False
    error: BaseException | None = None


@contextlib.contextmanager
def errors_shown(message: str, wait_cursor: bool = False) -> Iterator[Outcome]:
    """Run the block; an exception is shown by Slicer's own dialog (with its traceback as the
    details), logged, and ends here: ``outcome.failed`` tells the caller."""
    import slicer

    outcome = Outcome()
    try:
        with slicer.util.tryWithErrorDisplay(message, waitCursor=wait_cursor):
            yield outcome
    except Exception as exc:  # noqa: BLE001 - shown by tryWithErrorDisplay, which re-raises it
        outcome.failed, outcome.error = True, exc
        log.info("%s %s", message, exc)
        if _testing(slicer):  # no dialog under --testing: the self-test sees the error where it happened
            raise


def _testing(slicer) -> bool:
    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())
