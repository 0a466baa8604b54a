"""How a run ends: the exit statuses, SIGTERM taken like Ctrl-C, and ``--recover``.

0 written; 2 bad input; 3 (:data:`MISSED`) a target out of reach or a plan that would wreck the
model, nothing written; 130 interrupted; 143 terminated. Every failure is one line on stderr.
"""

from __future__ import annotations

import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path


class NotWritten(Exception):
    """A target out of reach, or a plan that would wreck the model: exit :data:`MISSED`."""


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, a scheduler, a container stop), raised like Ctrl-C so that
    every ``with`` block on the way out cleans up."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated


@contextmanager
def sigterm_as_exception():
    """While the run lasts, SIGTERM unwinds the stack (staging folders go) instead of killing."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers belong to the main thread
        return
    before = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


MISSED = 3  # the exit status of a target out of reach: nothing written


def fail(message: str, status: int = 2) -> int:
    lines = message.strip().splitlines() or ["failed"]
    print(f"decouple: error: {lines[0]}", file=sys.stderr)
    return status


def recover(path: str) -> int:
    """``--recover PATH``: finish or undo the killed runs' commits in PATH's folder."""
    from ..io.recovery import recover_folder, staging_folders

    folder = Path(path) if Path(path).is_dir() else Path(path).parent
    if not folder.is_dir():
        return fail(f"--recover: no such folder: {folder}")
    if not staging_folders(folder):
        print(f"decouple: nothing to recover in {folder}", file=sys.stderr)
        return 0
    recover_folder(folder)  # one line each on stderr
    return 0
