"""Recovery of output sets whose writer died mid-commit (``kill -9``, power loss, OOM killer).

Each staging folder of an :class:`~decouple.io.output_set.OutputSet` (``.NAME.staging-<pid>-*``
beside the outputs) holds an ``owner`` file (pid and host) from the start and, once the staged
set is complete and checked, a ``journal`` written before the first file moves: the commit point,
like a database's commit record. A staging folder whose process is gone is therefore in one of
two states:

- **no journal**: the run died before its commit; the outputs are as they were. The folder holds
  only new files and is removed (*rolled back*).
- **a journal**: the new set was complete and checked; every file of it is either in place or
  still in ``new/``. Moving the rest in, the manifest last, finishes the commit (*rolled
  forward*); the replaced files in ``previous/`` then go, as after a normal commit. Only when a
  run without ``--force`` finds one of its names taken by someone else's file meanwhile does it
  undo its own links instead (*rolled back*).

Both are idempotent, so a recovery killed in turn is finished by the next one. Recovery runs
when a new run prepares the same outputs, when :func:`~decouple.io.checkpoint.load_decoupled`
reads a set, and on demand (``decouple --recover PATH``); each one says what it did in one line
on stderr. A folder of a live process, of another host, or of an unknown layout is left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from .cache import read_json

NEW, PREVIOUS = "new", "previous"  # staging subfolders: the files to move in, replaced files
OWNER, JOURNAL = "owner.json", "journal.json"
_STAGING = re.compile(r"\.(?P<name>.+)\.staging-(?P<pid>\d+)-[^/]*")


def staging_prefix(target: Path) -> str:
    return f".{target.name}.staging-{os.getpid()}-"


def where(path: Path) -> Path:
    """``path`` with its folder resolved: how journals name targets."""
    path = Path(path)
    return path.parent.resolve() / path.name


def _write_json(path: Path, obj: dict) -> None:
    """Write ``path`` durably and atomically (a temporary name, fsync, rename)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)  # not os.replace: the tests count the commit's own moves
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable; some filesystems cannot, which is fine."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_owner(stage: Path) -> None:
    _write_json(stage / OWNER, {"pid": os.getpid(), "host": socket.gethostname()})


def write_journal(stages: Iterable[Path], order: list[tuple[str, Path, Path]], force: bool) -> None:
    """The commit point: ``order`` is (role, target, staged file), the manifest last."""
    journal = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "force": force,
        "files": [[role, str(where(t)), str(where(s))] for role, t, s in order],
        "staging": sorted({str(where(s)) for s in stages}),
    }
    for stage in stages:
        _write_json(Path(stage) / JOURNAL, journal)


def remove_staging(stage: Path) -> None:
    """Remove a staging folder, its journal last: a kill meanwhile leaves a folder that recovery
    still reads right."""
    for sub in (NEW, PREVIOUS):
        shutil.rmtree(Path(stage, sub), ignore_errors=True)
    shutil.rmtree(stage, ignore_errors=True)


@dataclass(frozen=True)
class Recovery:
    """What recovery found in one staging folder, and did."""

    staging: Path
    action: str  # "rolled forward", "rolled back", "left alone"
    message: str

    def __str__(self) -> str:
        return self.message


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    try:  # a killed child not yet reaped by its parent is a zombie: as good as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def staging_folders(folder: Path) -> list[Path]:
    """The staging folders in ``folder`` (of live and dead runs alike)."""
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    return sorted(p for p in entries if _STAGING.fullmatch(p.name) and p.is_dir())


def _owner(stage: Path) -> tuple[int, str | None]:
    owner = read_json(stage / OWNER) or {}
    pid = owner.get("pid")
    if not isinstance(pid, int):
        pid = int(_STAGING.fullmatch(stage.name)["pid"])
    host = owner.get("host")
    return pid, host if isinstance(host, str) else None


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _valid(journal: dict | None) -> bool:
    """A journal recovery may act on: each staged file sits in ``new/`` of a listed staging
    folder, and its target beside that folder under the same name. A planted or damaged one
    (it lives in the user's output folder) can never move a file from or to anywhere else."""
    files, stages = (journal or {}).get("files"), (journal or {}).get("staging")
    if not (isinstance(files, list) and isinstance(stages, list) and files):
        return False
    if not all(isinstance(x, str) and _STAGING.fullmatch(Path(x).name) for x in stages):
        return False
    for f in files:
        if not (isinstance(f, list) and len(f) == 3 and all(isinstance(x, str) for x in f)):
            return False
        target, staged = Path(f[1]), Path(f[2])
        stage = staged.parent.parent
        if not (staged.parent.name == NEW and str(stage) in stages
                and target.parent == stage.parent and target.name == staged.name):  # fmt: skip
            return False
    return True


def _roll_forward(journal: dict) -> str | None:
    """Finish the commit; returns the first target someone else took meanwhile (then nothing
    of this run stays in place), or None."""
    files = [(role, Path(t), Path(s)) for role, t, s in journal["files"]]
    force = bool(journal.get("force"))
    if not force:  # exclusive creation: a name taken by another file means this run lost
        for _, target, staged in files:
            if staged.exists() and os.path.lexists(target) and not _same(staged, target):
                for _, t, s in files:
                    if s.exists() and _same(s, t):
                        os.unlink(t)
                return str(target)
    for _, target, staged in files:  # the journal's order: the manifest last
        if not staged.exists() or _same(staged, target):
            continue  # moved in already (or linked in, without --force)
        if force:
            os.replace(staged, target)
        else:
            os.link(staged, target)
        fsync_dir(target.parent)
    return None


def recover(stage: Path) -> Recovery:
    """Roll one staging folder of a dead run back or forward; see the module docstring."""
    stage = Path(stage)
    pid, host = _owner(stage)
    if host is not None and host != socket.gethostname():
        return Recovery(stage, "left alone", f"{stage}: a run on {host} (pid {pid}); left alone")
    if _alive(pid):
        return Recovery(stage, "left alone", f"{stage}: run {pid} is still running; left alone")
    journal = read_json(stage / JOURNAL)
    if journal is None:
        previous = stage / PREVIOUS
        if previous.is_dir() and any(previous.iterdir()):  # an older layout: keep the user's files
            return Recovery(
                stage,
                "left alone",
                f"{stage}: a killed run's replaced files are kept in {previous}",
            )
        remove_staging(stage)
        return Recovery(
            stage,
            "rolled back",
            f"decouple: rolled back a run (pid {pid}) killed before it wrote anything; "
            f"the outputs in {stage.parent} are as they were",
        )
    if not _valid(journal) or str(where(stage)) not in journal["staging"]:
        return Recovery(stage, "left alone", f"{stage}: its journal is damaged; left alone")
    taken = _roll_forward(journal)
    for s in journal["staging"]:
        remove_staging(Path(s))
    targets = [t for role, t, _ in journal["files"] if role != "manifest"]
    names = ", ".join(Path(t).name for t in targets)
    if taken is not None:
        return Recovery(
            stage,
            "rolled back",
            f"decouple: rolled back a run (pid {pid}) killed while writing {names}: another file "
            f"took {taken} meanwhile; that one is kept",
        )
    return Recovery(
        stage,
        "rolled forward",
        f"decouple: rolled forward a run (pid {pid}) killed while writing its outputs: the new "
        f"set ({names}) was complete and checked, and is now in place",
    )


def recover_folder(
    folder: Path, targets: Iterable[Path] | None = None, quiet: bool = False
) -> list[Recovery]:
    """Recover the dead runs' staging folders in ``folder``; with ``targets``, only those of runs
    that wrote (or were about to write) one of these files. Says what it did on stderr."""
    wanted = None if targets is None else {where(t) for t in targets}
    done = []
    for stage in staging_folders(folder):
        if wanted is not None:
            journal = read_json(stage / JOURNAL)
            if _valid(journal):
                touched = {Path(f[1]) for f in journal["files"]}
            else:
                touched = {where(stage).parent / _STAGING.fullmatch(stage.name)["name"]}
            if not touched & wanted:
                continue
        try:
            found = recover(stage)
        except OSError as e:  # e.g. another process recovering the same folder at once
            found = Recovery(stage, "left alone", f"{stage}: cannot recover it ({e}); left alone")
        if found.action == "left alone" and wanted is not None:
            continue  # a live run writing the same outputs: its own business
        done.append(found)
        if not quiet:
            print(found.message, file=sys.stderr)
    return done
