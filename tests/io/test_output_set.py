"""Output sets written as one transaction: faults, kill -9 and races between the moves, checks.

A set here is a real ``digits_cnn`` decoupling (weights, recipe naming its manifest, a report):
version "old" at rank 3 on disk, version "new" at rank 2 being written over it.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from decouple import DecoupleConfig, decouple_, load_decoupled, make_recipe
from decouple.cli.run import main
from decouple.io.errors import InputError
from decouple.io.manifest import name_manifest, verify_manifest
from decouple.io.output_set import OutputSet
from decouple.io.outputs import recipe_path_for, torch_bytes
from decouple.io.recovery import recover_folder
from decouple.models import build_model

NAME = "x.decoupled.pt"
FILES = ("x.decoupled.pt", "x.decoupled.recipe.json", "x.decoupled.report.json")
MANIFEST = "x.decoupled.manifest.json"


def targets(folder: Path) -> dict[str, Path]:
    out = folder / NAME
    return {"model": out, "recipe": recipe_path_for(out), "report": folder / FILES[2]}


def payloads(rank: int) -> dict[str, bytes]:
    """A set's files; the manifest is named relative to the recipe, so any folder takes them."""
    model, config = build_model("digits_cnn"), DecoupleConfig(rank=rank, fold_bn=False)
    recipe = name_manifest(
        make_recipe(decouple_(model, config), config), Path(FILES[1]), Path(MANIFEST)
    )
    return {
        "model": torch_bytes(model.state_dict()),
        "recipe": json.dumps(recipe).encode(),
        "report": f'{{"rank": {rank}}}'.encode(),
    }


@pytest.fixture(scope="module")
def versions() -> dict[str, dict[str, bytes]]:
    return {"old": payloads(3), "new": payloads(2)}


def write(folder: Path, data: dict[str, bytes], force: bool = False, **kw) -> None:
    with OutputSet.prepare(targets(folder), [], force) as out:
        out.write(data, **kw)


def on_disk(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (staging folders included), by relative path."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def load(folder: Path):
    return load_decoupled(build_model("digits_cnn"), folder / NAME)


def assert_loads_one_version_or_refuses(folder: Path, versions) -> None:
    """``load_decoupled`` never loads a mix: it loads the old or the new set, or says why not."""
    try:
        model = load(folder)
    except InputError as e:
        assert "incomplete or mixed output set" in str(e) or "no such file" in str(e), e
        assert "\n" not in str(e)
        return
    files = {k: p.read_bytes() for k, p in targets(folder).items() if k != "report"}
    assert any(files == {k: v[k] for k in files} for v in versions.values()), "a mixed set loaded"
    assert model.conv2.rank in (2, 3)


# --------------------------------------------------------------------------------------------
# a plain write, and what a later load checks


def test_write_makes_a_verified_set_with_the_umask(tmp_path: Path, versions) -> None:
    old = os.umask(0o027)
    try:
        write(tmp_path, versions["new"])
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, MANIFEST])
    for p in tmp_path.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o640, p
    verify_manifest(tmp_path / MANIFEST)
    assert load(tmp_path).conv2.rank == 2
    model = json.loads((tmp_path / MANIFEST).read_text())["files"]["model"]
    assert (model["path"], model["size"]) == (NAME, len(versions["new"]["model"]))


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ("weights from another set", "does not match its manifest"),
        ("recipe from another set", "does not match its manifest"),
        ("manifest missing", "is missing"),
        ("manifest damaged", "is damaged"),
    ],
)
def test_load_refuses_a_mixed_or_incomplete_set(tmp_path, versions, change, why) -> None:
    write(tmp_path, versions["new"])
    if change.startswith("weights"):
        (tmp_path / FILES[0]).write_bytes(versions["old"]["model"])
    elif change.startswith("recipe"):
        (tmp_path / FILES[1]).write_bytes(versions["old"]["recipe"])
    elif change == "manifest missing":
        (tmp_path / MANIFEST).unlink()
    else:
        (tmp_path / MANIFEST).write_text("{not json")
    with pytest.raises(InputError, match="incomplete or mixed output set") as e:
        load(tmp_path)
    assert why in str(e.value) and "--force" in str(e.value) and "\n" not in str(e.value)


def test_an_old_recipe_without_a_manifest_still_loads(tmp_path: Path, versions) -> None:
    recipe = json.loads(versions["new"]["recipe"])
    del recipe["manifest"]
    (tmp_path / FILES[0]).write_bytes(versions["new"]["model"])
    (tmp_path / FILES[1]).write_text(json.dumps(recipe))
    assert load(tmp_path).conv2.rank == 2


def test_a_failed_check_writes_nothing(tmp_path: Path, versions) -> None:
    def refuse(staged):
        assert set(staged) == {"model", "recipe", "report", "manifest"}
        assert load_decoupled(build_model("digits_cnn"), staged["model"], staged["recipe"])
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        write(tmp_path / "new" / "sub", versions["new"], verify=refuse)
    assert list(tmp_path.iterdir()) == [], "files, staging or made folders left behind"


# --------------------------------------------------------------------------------------------
# checks at prepare time


def test_outputs_may_not_touch_any_input(tmp_path: Path) -> None:
    config, data, calib = tmp_path / "c.json", tmp_path / "data", tmp_path / "calib.pt"
    for p in (config, calib):
        p.write_text("{}")
    data.mkdir()
    (tmp_path / "link.json").symlink_to(config)
    os.link(calib, tmp_path / "hard.pt")
    inputs = [tmp_path / "m.pt", config, data, calib]
    cases = {
        config: "would overwrite the input",
        calib: "would overwrite the input",
        tmp_path / "link.json": "would overwrite the input",  # a symlink to an input
        tmp_path / "hard.pt": "would overwrite the input",  # a hard link to one
        data / "x.json": "inside the input folder",
        data / "new" / "x.json": "inside the input folder",
        data: "would overwrite the input",
    }
    before = on_disk(tmp_path)
    for report, expect in cases.items():
        paths = {"model": tmp_path / "o.pt", "report": report}
        with pytest.raises(InputError, match=expect):
            OutputSet.prepare(paths, inputs, force=True)
        assert on_disk(tmp_path) == before and not (data / "new").exists()


@pytest.mark.parametrize("force", [False, True])
def test_a_fifo_is_never_replaced(tmp_path: Path, force: bool) -> None:
    os.mkfifo(tmp_path / FILES[2])
    with pytest.raises(InputError, match="not a regular file"):
        OutputSet.prepare(targets(tmp_path), [], force)
    assert stat.S_ISFIFO(os.lstat(tmp_path / FILES[2]).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == [FILES[2]]


def test_existing_outputs_need_force(tmp_path: Path, versions) -> None:
    write(tmp_path, versions["old"])
    with pytest.raises(InputError, match="output exists: .*--force"):
        OutputSet.prepare(targets(tmp_path), [], force=False)
    write(tmp_path, versions["new"], force=True)
    assert (
        sorted(on_disk(tmp_path)) == sorted([*FILES, MANIFEST]) and load(tmp_path).conv2.rank == 2
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
def test_an_unwritable_folder_fails_at_prepare(tmp_path: Path) -> None:
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(InputError, match="cannot write to .*Permission denied"):
            OutputSet.prepare(targets(tmp_path / "sub"), [], False)
    finally:
        tmp_path.chmod(0o700)


def test_a_failing_staging_folder_is_one_line_at_prepare(tmp_path, monkeypatch) -> None:
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkdtemp", denied)
    with pytest.raises(InputError, match=f"cannot write to {tmp_path}: Permission denied"):
        OutputSet.prepare(targets(tmp_path), [], False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# faults, kills and races between the moves


def moves(monkeypatch, fail_at: int, always: bool) -> list[int]:
    """Make os.link/os.replace fail from their call ``fail_at`` on (once, or ``always``)."""
    calls = [0]

    def patched(real):
        def call(*a, **k):
            calls[0] += 1
            if calls[0] == fail_at + 1 or (always and calls[0] > fail_at):
                raise OSError(errno.EIO, "Input/output error")
            return real(*a, **k)

        return call

    monkeypatch.setattr(os, "link", patched(os.link))
    monkeypatch.setattr(os, "replace", patched(os.replace))
    return calls


N_FORCE, N_NEW = 8, 4  # links and renames of a forced rewrite / of a first write


@pytest.mark.parametrize("always", [False, True], ids=["once", "always"])
@pytest.mark.parametrize("k", range(N_FORCE))
def test_a_fault_between_forced_moves_keeps_the_old_set(tmp_path, versions, monkeypatch, k, always):
    write(tmp_path, versions["old"])
    before = on_disk(tmp_path)
    with monkeypatch.context() as m:
        moves(m, k, always)
        with pytest.raises(InputError):
            write(tmp_path, versions["new"], force=True)
    if always:  # the restore failed too: the old files wait in the staging folder
        assert set(before.values()) <= set(on_disk(tmp_path).values())
        assert_loads_one_version_or_refuses(tmp_path, versions)
    else:
        assert on_disk(tmp_path) == before, "the old set changed or temporaries were left"
        assert load(tmp_path).conv2.rank == 3


@pytest.mark.parametrize("k", range(N_NEW))
def test_a_fault_between_new_moves_writes_nothing(tmp_path, versions, monkeypatch, k) -> None:
    with monkeypatch.context() as m:
        moves(m, k, always=False)
        with pytest.raises(InputError, match="nothing written"):
            write(tmp_path, versions["new"])
    assert list(tmp_path.iterdir()) == []


def test_the_fault_counts_are_all_the_moves(tmp_path, versions, monkeypatch) -> None:
    calls = moves(monkeypatch, 10**6, always=False)
    write(tmp_path / "a", versions["new"])
    assert calls[0] == N_NEW
    write(tmp_path / "a", versions["old"], force=True)
    assert calls[0] == N_NEW + N_FORCE


KILLER = """
import json, os, shutil, sys
from pathlib import Path
from decouple.io.output_set import OutputSet
from decouple.io.recovery import recover_folder
from decouple.io.outputs import recipe_path_for

spec = json.loads(sys.stdin.read())
data = {k: bytes.fromhex(v) for k, v in spec["payloads"].items()}
for folder, k in spec["cases"]:
    pid = os.fork()
    if pid == 0:
        calls = [0]
        def killing(f):
            def call(*a, **kw):
                calls[0] += 1
                if calls[0] == k + 1:
                    os.kill(os.getpid(), 9)
                return f(*a, **kw)
            return call
        # every step of the commit: the owner and journal files' renames, the links and
        # renames of the set, and the clean-up after it (the last kill point: all moved)
        os.link, os.replace, os.rename = map(killing, (os.link, os.replace, os.rename))
        shutil.rmtree = killing(shutil.rmtree)
        out = Path(folder) / "x.decoupled.pt"
        paths = {"model": out, "recipe": recipe_path_for(out), "report": Path(folder) / "x.decoupled.report.json"}
        OutputSet.prepare(paths, [], spec["force"]).write(data)
        os._exit(0)
    print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""
BEFORE_COMMIT = 2  # kill points before the journal is in: the owner file, the journal itself


@pytest.mark.parametrize("force", [True, False], ids=["force", "new"])
def test_kill_9_at_any_step_is_recovered_into_one_whole_set(tmp_path, versions, force, capsys):
    """One process imports once, then forks a writer per kill point (each in its own folder);
    the next run (even kill points) or ``load_decoupled`` (odd ones) rolls it back or forward."""
    n = BEFORE_COMMIT + (N_FORCE if force else N_NEW) + 1
    cases = [(str(tmp_path / f"k{k}"), k) for k in range(n)]
    for folder, _ in cases:
        Path(folder).mkdir()
        if force:
            write(Path(folder), versions["old"])
    new = {k: v.hex() for k, v in versions["new"].items()}
    spec = json.dumps({"payloads": new, "cases": cases, "force": force})
    run = [sys.executable, "-c", KILLER]
    proc = subprocess.run(run, input=spec, check=True, timeout=120, capture_output=True, text=True)
    assert proc.stdout.split() == ["-9"] * n, "every writer was killed at its point"
    for folder, k in cases:
        folder = Path(folder)
        assert [p for p in folder.iterdir() if ".staging-" in p.name], f"{k}: nothing to recover"
        if k % 2 == 0:
            OutputSet.prepare(targets(folder), [], force=True).discard()  # the next run
        else:
            try:
                load(folder)
            except InputError as e:
                assert not force and k < BEFORE_COMMIT and "no such file" in str(e), (k, e)
        err = capsys.readouterr().err
        assert err.count("\n") == 1, (k, err)
        expected = "new" if k >= BEFORE_COMMIT else "old" if force else None
        assert ("rolled forward" if expected == "new" else "rolled back") in err, (k, err)
        files = sorted(p.name for p in folder.iterdir())
        if expected is None:
            assert files == [], (k, files)
            continue
        assert files == sorted([*FILES, MANIFEST]), (k, files)
        verify_manifest(folder / MANIFEST)
        assert {k: p.read_bytes() for k, p in targets(folder).items()} == versions[expected], k
        assert load(folder).conv2.rank == (2 if expected == "new" else 3)
        assert capsys.readouterr().err == "", "a second recovery found something"


def test_recovery_leaves_a_live_run_alone(tmp_path, versions) -> None:
    write(tmp_path, versions["old"])
    stage = tmp_path / f".{NAME}.staging-{os.getpid()}-abc"
    (stage / "new").mkdir(parents=True)
    found = recover_folder(tmp_path)
    assert [f.action for f in found] == ["left alone"] and stage.is_dir()
    assert load(tmp_path).conv2.rank == 3


def test_two_racing_writers_without_force_one_wins(tmp_path, versions) -> None:
    barrier = threading.Barrier(2)
    results: dict[str, str] = {}

    def writer(name: str) -> None:
        try:
            write(tmp_path, versions[name], verify=lambda staged: barrier.wait(timeout=30))
            results[name] = "ok"
        except InputError as e:
            results[name] = str(e)

    threads = [threading.Thread(target=writer, args=(v,)) for v in ("old", "new")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [v for v, r in results.items() if r == "ok"]
    assert len(winners) == 1, results
    loser = "old" if winners == ["new"] else "new"
    assert results[loser].startswith("output exists") and "--force" in results[loser]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*FILES, MANIFEST])
    verify_manifest(tmp_path / MANIFEST)
    assert load(tmp_path).conv2.rank == (3 if winners == ["old"] else 2)


# --------------------------------------------------------------------------------------------
# the command line


def cli(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_writes_a_set_that_verifies_and_refuses_tampering(tmp_path, capsys) -> None:
    out = tmp_path / "d.pt"
    code, stdout, err = cli(capsys, "--demo", "--rank", "6", "--out", out)
    assert code == 0, err
    manifest = tmp_path / "d.manifest.json"
    assert f"wrote manifest {manifest}" in stdout
    assert json.loads((tmp_path / "d.recipe.json").read_text())["manifest"] == manifest.name
    assert not [p for p in tmp_path.iterdir() if "staging" in p.name]
    verify_manifest(manifest)
    assert load_decoupled(build_model("digits_cnn"), out).conv2.rank == 6

    sd = torch.load(out, weights_only=True)
    key = next(k for k, v in sd.items() if v.is_floating_point())
    sd[key] = sd[key] + 1  # same keys and shapes: only the manifest can tell
    torch.save(sd, out)
    with pytest.raises(InputError, match="incomplete or mixed output set") as e:
        load_decoupled(build_model("digits_cnn"), out)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("flags", "expect"),
    [
        (["--config", "{dir}/c.json", "--report", "{dir}/c.json"], "would overwrite the input"),
        (["--data", "{dir}/d.pt", "--out", "{dir}/d.pt"], "would overwrite the input"),
        (["--data", "{dir}/images", "--out", "{dir}/images/o.pt"], "inside the input folder"),
        (["--report", "{dir}/fifo.json"], "not a regular file"),
    ],
)
def test_cli_refuses_outputs_over_inputs_before_any_work(tmp_path, capsys, flags, expect) -> None:
    (tmp_path / "c.json").write_text('{"rank": 2}')
    (tmp_path / "d.pt").write_bytes(b"images")
    (tmp_path / "images").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    argv = [f.format(dir=tmp_path) for f in flags]
    code, stdout, err = cli(capsys, "--demo", "--rank", "2", "--out", tmp_path / "o.pt", *argv)
    assert code == 2 and stdout == "" and expect in err and err.count("\n") == 1
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "d.pt").read_bytes() == b"images"
