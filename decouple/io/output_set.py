"""Writing a set of output files as one transaction: nothing lost, nothing half-done.

:meth:`OutputSet.prepare` checks the targets (no input overwritten, no special file replaced,
nothing existing replaced without ``force``) and makes a staging folder in each target folder
(``.NAME.staging-<pid>-<random>/``, same filesystem), so an unwritable folder fails before any
heavy work. :meth:`OutputSet.write` writes every file into its ``new/``, then the manifest
(:mod:`decouple.io.manifest`), runs the caller's check on the staged files, and moves them in:
the recipe first (it names the manifest, so from then on a set without its manifest is refused),
then the other files, the manifest last.

Without ``force`` each file goes in by exclusive creation (a hard link that fails if the target
exists): of two runs racing for the same outputs one wins, the other undoes its links and fails.
With ``force`` each existing target is first hard-linked into ``previous/`` of the staging
folder, then the old manifest is removed (a half-replaced set never verifies), then the files are
replaced; an exception puts the old files back, the manifest last.

Before the first move, once the staged set is complete and checked, a journal goes into each
staging folder: the commit point. What a ``kill -9`` leaves, at any point:

- before the journal: the old files untouched, plus a staging folder of new files only;
- after it: a set that :func:`~decouple.io.checkpoint.load_decoupled` refuses (its manifest is
  missing) or the old set unchanged; every file the user had is still at its place or, if already
  replaced, in ``previous/`` of the staging folder, and every new file in place or in ``new/``.

:mod:`decouple.io.recovery` turns either into one whole set: the next run on the same outputs,
``load_decoupled`` and ``decouple --recover`` roll the first back and the second forward.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import InputError
from .manifest import make_manifest, manifest_path_for
from .recovery import (
    NEW,
    PREVIOUS,
    fsync_dir,
    recover_folder,
    remove_staging,
    staging_prefix,
    write_journal,
    write_owner,
)

MANIFEST = "manifest"
FIRST = ("recipe",)  # moved in before the rest: it names the manifest
# Where hard links are not supported, exclusive creation falls back to a placeholder.
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK}


def _why(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def _write_new(path: Path, data: bytes) -> None:
    """Create ``path`` (never an existing file) honouring the umask, write it and fsync it."""
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _link_new(staged: Path, target: Path) -> os.stat_result:
    """Put ``staged`` at ``target`` only if nothing is there (FileExistsError otherwise)."""
    try:
        os.link(staged, target)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # claim the name
        os.replace(staged, target)
    return os.lstat(target)


def _backup(target: Path, backup: Path) -> None:
    try:
        os.link(target, backup, follow_symlinks=False)
    except OSError as e:
        if e.errno not in _NO_HARD_LINKS:
            raise
        shutil.copy2(target, backup, follow_symlinks=False)


class OutputSet:
    """A set of output files written all or nothing; see the module docstring.

    Make one with :meth:`prepare`; use it as a context manager (or call :meth:`discard`) so the
    staging folders go away whatever happens.
    """

    def __init__(self, force: bool, manifest: bool) -> None:
        self.force = force
        self._manifest = manifest
        self._paths: dict[str, Path] = {}
        self._inputs: list[Path] = []
        self._staging: dict[Path, Path] = {}  # target folder (resolved) -> staging folder
        self._created: list[Path] = []  # folders made for the outputs, outermost first
        self._committed = False
        self._keep = False  # a failed restore: the staging folder holds the user's files

    @classmethod
    def prepare(
        cls,
        paths: Mapping[str, Path],
        inputs: Sequence[str | os.PathLike] = (),
        force: bool = False,
        *,
        manifest: bool = True,
    ) -> OutputSet:
        """Check the targets and make the staging folders, or raise :class:`InputError`.

        Parameters
        ----------
        paths : mapping of str to Path
            Each output's role and target. With ``manifest``, ``paths["manifest"]`` is where the
            manifest goes (default: beside ``paths["model"]``, see ``manifest_path_for``).
        inputs : sequence of path-like
            Files and folders the run reads: no output may be one of them, a link to one, or
            inside an input folder.
        force : bool
            Replace existing outputs; otherwise any existing target is an error.
        manifest : bool
            Write a manifest of the set, last.
        """
        self = cls(force, manifest)
        self._inputs = [Path(i) for i in inputs]
        paths = {k: Path(p) for k, p in paths.items()}
        if manifest and MANIFEST not in paths:
            paths[MANIFEST] = manifest_path_for(paths["model"])
        # A run killed mid-commit on these outputs: finish or undo it first (one line each).
        for folder in {p.parent for p in paths.values() if p.parent.is_dir()}:
            recover_folder(folder, paths.values())
        try:
            for what, p in paths.items():
                self.add(what, p)
        except BaseException:
            self.discard()
            raise
        return self

    @property
    def paths(self) -> dict[str, Path]:
        """Every output's role and target, the manifest last."""
        rest = {k: p for k, p in self._paths.items() if k != MANIFEST}
        return {**rest, **({MANIFEST: self._paths[MANIFEST]} if MANIFEST in self._paths else {})}

    def add(self, what: str, path: Path) -> None:
        """One more output (e.g. a file only known after an export), checked like the others."""
        path = Path(path)
        self._check(what, path)
        self._paths[what] = path
        self._stage_folder(path)

    def _check(self, what: str, p: Path) -> None:
        real = p.resolve()
        for given in self._inputs:
            i = given.resolve()
            if real == i or (p.exists() and given.exists() and os.path.samefile(p, given)):
                raise InputError(f"the {what} output {p} would overwrite the input {given}")
            if i.is_dir() and real.is_relative_to(i):
                raise InputError(f"the {what} output {p} is inside the input folder {given}")
        for other, q in self._paths.items():
            if q.resolve() == real:
                raise InputError(f"the {what} and {other} outputs would both be written to {p}")
        ancestor = p.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise InputError(f"cannot create {p}: {ancestor} is not a directory")
        try:
            st = os.stat(p)
        except FileNotFoundError:
            st = None
        except OSError as e:
            raise InputError(f"cannot use {p} as the {what} output: {_why(e)}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise InputError(f"the {what} output {p} is a directory")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise InputError(
                f"the {what} output {p} is not a regular file (a FIFO, device or socket); "
                "refusing to replace it"
            )
        if os.path.lexists(p) and not self.force:
            raise InputError(f"output exists: {p}; pass --force to overwrite")

    def _stage_folder(self, target: Path) -> None:
        folder = target.parent.absolute()
        missing = []
        while not folder.exists():
            missing.append(folder)
            folder = folder.parent
        for d in reversed(missing):
            try:
                d.mkdir()
            except FileExistsError:
                continue
            except OSError as e:
                raise InputError(f"cannot write to {d.parent}: {_why(e)}") from None
            self._created.append(d)
        key = target.parent.resolve()
        if key in self._staging:
            return
        try:
            stage = tempfile.mkdtemp(prefix=staging_prefix(target), dir=key)
            self._staging[key] = Path(stage)
            write_owner(Path(stage))
            for sub in (NEW, PREVIOUS):
                os.mkdir(Path(stage, sub))
        except OSError as e:
            raise InputError(f"cannot write to {target.parent}: {_why(e)}") from None

    def _staged(self, what: str) -> Path:
        target = self._paths[what]
        return self._staging[target.parent.resolve()] / NEW / target.name

    def write(
        self,
        payloads: Mapping[str, bytes],
        verify: Callable[[Mapping[str, Path]], object] | None = None,
    ) -> None:
        """Write every output (all roles but the manifest) and commit the set.

        ``verify`` gets the staged files (role -> path, the manifest included) before anything
        is moved in; whatever it raises aborts the write with nothing changed. A target that
        appeared meanwhile fails the write without ``force`` (:class:`InputError`), as does any
        :class:`OSError` (disk full...); the outputs are then as they were.
        """
        if self._committed:
            raise RuntimeError("this output set was written already")
        roles = [k for k in self._paths if k != MANIFEST]
        if set(payloads) != set(roles):
            raise ValueError(f"payloads for {sorted(payloads)}, outputs are {sorted(roles)}")
        try:
            for what in roles:
                self._stage(what, payloads[what])
            if self._manifest:
                files = {w: (self._paths[w], payloads[w]) for w in roles}
                self._stage(MANIFEST, make_manifest(files, self._paths[MANIFEST]))
            if verify is not None:
                verify({w: self._staged(w) for w in self._paths})
            order = [w for w in FIRST if w in roles] + [w for w in roles if w not in FIRST]
            order += [MANIFEST] if self._manifest else []
            self._journal(order)  # the commit point: from here on a kill is rolled forward
            if self.force:
                self._replace_all(order)
            else:
                self._link_all(order)
            self._committed = True
        finally:
            self.discard()

    def _stage(self, what: str, data: bytes) -> None:
        try:
            _write_new(self._staged(what), data)
        except OSError as e:
            raise InputError(f"cannot write {self._paths[what]}: {_why(e)}") from None

    def _journal(self, order: list[str]) -> None:
        files = [(w, self._paths[w], self._staged(w)) for w in order]
        try:
            write_journal(self._staging.values(), files, self.force)
        except OSError as e:
            raise InputError(f"cannot write to {self._paths[order[0]].parent}: {_why(e)}") from None

    def _sync(self) -> None:
        for folder in {p.parent for p in self._paths.values()}:
            fsync_dir(folder)

    def _link_all(self, order: list[str]) -> None:
        linked: list[tuple[Path, os.stat_result]] = []
        target = None
        try:
            for what in order:
                target = self._paths[what]
                if what == MANIFEST:
                    self._sync()  # the files' names are durable before the manifest's
                linked.append((target, _link_new(self._staged(what), target)))
            self._sync()
        except BaseException as e:
            for path, st in reversed(linked):
                try:  # only what this run put there: another run may own the name by now
                    if os.path.samestat(os.lstat(path), st):
                        os.unlink(path)
                except OSError:
                    pass
            if isinstance(e, FileExistsError):
                raise InputError(f"output exists: {target}; pass --force to overwrite") from None
            if isinstance(e, OSError):
                raise InputError(f"cannot write {target}: {_why(e)}; nothing written") from None
            raise

    def _replace_all(self, order: list[str]) -> None:
        backups: dict[str, Path] = {}
        done: list[str] = []
        target = None
        try:
            for what in order:
                target = self._paths[what]
                if os.path.lexists(target):
                    backups[what] = self._staged(what).parent.with_name(PREVIOUS) / target.name
                    _backup(target, backups[what])
            if MANIFEST in backups:  # first: a set being replaced has no manifest
                os.unlink(self._paths[MANIFEST])
                done.append(MANIFEST)
                fsync_dir(self._paths[MANIFEST].parent)
            for what in order:
                target = self._paths[what]
                if what == MANIFEST:
                    self._sync()
                os.replace(self._staged(what), target)
                if what not in done:
                    done.append(what)
            self._sync()
        except BaseException as e:
            self._restore(done, backups)
            if isinstance(e, OSError):
                raise InputError(f"cannot write {target}: {_why(e)}; nothing changed") from None
            raise

    def _restore(self, done: list[str], backups: dict[str, Path]) -> None:
        """Put the old files back, the manifest last; on failure keep them in staging."""
        order = [w for w in reversed(done) if w != MANIFEST] + [w for w in done if w == MANIFEST]
        try:
            for what in order:
                if what in backups:
                    os.replace(backups[what], self._paths[what])
                else:
                    os.unlink(self._paths[what])
        except OSError as e:
            self._keep = True
            kept = ", ".join(sorted({str(b.parent) for b in backups.values()}))
            raise InputError(
                f"cannot restore the previous outputs ({_why(e)}); they are in {kept}"
            ) from None

    def discard(self) -> None:
        """Remove the staging folders (and, before a commit, the folders made for outputs)."""
        if not self._keep:
            for stage in self._staging.values():
                remove_staging(stage)
            self._staging.clear()
        if not self._committed:
            for d in reversed(self._created):
                try:
                    d.rmdir()
                except OSError:  # not empty: something else was put there
                    pass
            self._created.clear()

    def __enter__(self) -> OutputSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.discard()


def write_files_atomically(payloads: Mapping[Path, bytes]) -> None:
    """Write files all or nothing, replacing existing ones (no manifest): an :class:`OutputSet`
    with ``force=True``."""
    paths = {str(i): Path(p) for i, p in enumerate(payloads)}
    with OutputSet.prepare(paths, force=True, manifest=False) as out:
        out.write({k: payloads[p] for k, p in zip(paths, payloads, strict=True)})
