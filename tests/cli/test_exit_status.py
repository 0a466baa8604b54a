"""What a script can tell from the exit status, and what is left on disk: a target out of reach
or a wrecked plan (3, nothing written; ``--allow-miss`` writes it), SIGTERM (143, nothing left),
``--recover``; and the messages a new user met first (help examples, the arch list, a file that
is not a model, ``InputError`` as a ``ValueError``).
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from test_cli import cli as _cli
from test_first_hour import digits_sd, one_line  # noqa: F401  (a fixture)

from decouple.cli import run as cli_run
from decouple.cli.parser import EPILOG, build_parser
from decouple.io.errors import InputError
from decouple.io.output_set import OutputSet
from decouple.io.recovery import JOURNAL, OWNER

MISSED = 3


def cli(capsys, *argv):  # noqa: F811 - quiet: stderr holds only the one line a script reads
    return _cli(capsys, *argv, *(["--quiet"] if "--recover" not in argv else []))


def test_an_unreachable_flops_target_writes_nothing_and_exits_3(tmp_path, capsys) -> None:
    code, out, err = cli(capsys, "--demo", "--target-flops", "0.01", "--out", tmp_path / "d.pt")
    assert code == MISSED, err
    line = one_line(err)
    assert "--target-flops 0.01 is out of reach: the cheapest plan keeps" in line
    assert "% of the FLOPs; its predicted loss" in line and "--allow-miss" in line
    assert list(tmp_path.iterdir()) == [] and out == ""


def test_allow_miss_writes_the_closest_plan_and_says_so(tmp_path, capsys) -> None:
    argv = ["--demo", "--target-flops", "0.01", "--out", tmp_path / "d.pt", "--allow-miss"]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    assert "NOT reachable; cheapest ranks used" in out
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["allocation"]["reached"] is False


def test_a_plan_that_wrecks_the_model_is_not_written_silently(tmp_path, capsys) -> None:
    """Rank 1 everywhere, the 1-channel stem included: the demo CNN's top-1 falls apart."""
    argv = ["--demo", "--rank", "1", "--include-stem", "--out", tmp_path / "d.pt"]
    code, out, err = cli(capsys, *argv)
    assert code == MISSED, err
    assert "would wreck the model: top-1 agrees with the original's on only" in one_line(err)
    assert list(tmp_path.iterdir()) == []
    code, out, err = cli(capsys, *argv, "--allow-miss")
    assert code == 0 and (tmp_path / "d.pt").is_file(), err


def test_a_fine_plan_is_not_called_a_wreck(tmp_path, capsys) -> None:
    code, _, err = cli(capsys, "--demo", "--rank", "4", "--out", tmp_path / "d.pt")
    assert code == 0, err


def test_sigterm_cleans_up_and_exits_143(tmp_path, capsys, monkeypatch) -> None:
    """The signal arrives mid-run (when the report is due): the staging folder goes too."""

    def terminated(*args, **kwargs):
        assert [p for p in tmp_path.iterdir() if ".staging-" in p.name], "staged by now"
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("SIGTERM did not interrupt the run")

    monkeypatch.setattr(cli_run, "_report_and_write", terminated)
    before = signal.getsignal(signal.SIGTERM)
    code, out, err = cli(capsys, "--demo", "--rank", "2", "--out", tmp_path / "d.pt")
    assert code == 143 and one_line(err) == "decouple: terminated"
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) == before, "the handler outlived the run"


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


def _dead_staging(folder: Path, name: str, journal: dict | None = None) -> Path:
    stage = folder / f".{name}.staging-{_dead_pid()}-x1"
    (stage / "new").mkdir(parents=True)
    (stage / "previous").mkdir()
    (stage / OWNER).write_text(json.dumps({"pid": int(stage.name.split("-")[-2])}))
    (stage / "new" / name).write_bytes(b"staged")
    if journal is not None:
        (stage / JOURNAL).write_text(json.dumps(journal))
    return stage


def test_a_dead_runs_staging_folder_with_new_files_only_goes_at_the_next_run(tmp_path, capsys):
    stage = _dead_staging(tmp_path, "d.pt")
    OutputSet.prepare({"model": tmp_path / "d.pt"}, [], manifest=False).discard()
    assert not stage.exists() and list(tmp_path.iterdir()) == []
    assert "rolled back a run" in one_line(capsys.readouterr().err)


def test_recover_on_demand_says_what_it_found(tmp_path, capsys) -> None:
    stage = _dead_staging(tmp_path, "d.pt")
    target = tmp_path / "d.pt"
    files = [["model", str(target), str(stage / "new" / "d.pt")]]
    (stage / JOURNAL).write_text(json.dumps({"force": False, "files": files,
                                             "staging": [str(stage)]}))  # fmt: skip
    code, out, err = cli(capsys, "--recover", target)
    assert code == 0 and "rolled forward" in one_line(err)
    assert target.read_bytes() == b"staged" and not stage.exists()
    code, out, err = cli(capsys, "--recover", tmp_path)
    assert code == 0 and one_line(err) == f"decouple: nothing to recover in {tmp_path}"
    code, out, err = cli(capsys, "--recover", tmp_path / "nowhere" / "x.pt")
    assert code == 2 and "no such folder" in one_line(err)


def test_the_help_examples_do_not_skip_the_stem_by_hand() -> None:
    assert "--skip conv1" not in EPILOG
    assert "exit status" in EPILOG and "3 the target" in EPILOG and "143" in EPILOG
    assert "--allow-miss" in build_parser().format_help()


def test_the_arch_list_names_every_cifar_resnet_depth(digits_sd, capsys) -> None:  # noqa: F811
    code, _, err = cli(capsys, digits_sd, "--arch", "resnet_cifar", "--rank", "2")
    assert code == 2
    assert "cifar_resnetN (any depth N = 6n+2" in one_line(err)
    assert "cifar_resnet44" not in err  # the family once, not five of its depths


@pytest.mark.parametrize(
    "content, phrase",
    [
        (
            b"some notes\nabout nothing\n",
            "a text file, not a PyTorch file (torch.save writes a zip archive)",
        ),
        (b"", "the file is empty"),
        (
            b"\x00\xff\xfe binary",
            "not a PyTorch file, or a corrupt one (torch.save writes a zip archive)",
        ),
    ],
)
def test_a_file_that_is_not_a_model_says_what_it_is(tmp_path, capsys, content, phrase) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    code, _, err = cli(capsys, path, "--arch", "digits_cnn", "--rank", "2")
    assert code == 2 and one_line(err) == f"decouple: error: cannot read {path}: {phrase}"


def test_a_truncated_checkpoint_says_so(tmp_path, capsys) -> None:
    path = tmp_path / "cut.pt"
    torch.save({"w": torch.zeros(1000)}, path)
    path.write_bytes(path.read_bytes()[:300])
    code, _, err = cli(capsys, path, "--arch", "digits_cnn", "--rank", "2")
    assert code == 2 and "a zip archive that is not a whole PyTorch file" in one_line(err)


def test_input_error_is_a_value_error() -> None:
    assert issubclass(InputError, ValueError)
    with pytest.raises(ValueError, match="no such file"):
        from decouple import load_decoupled
        from decouple.models import build_model

        load_decoupled(build_model("digits_cnn"), "/nonexistent/x.pt")


def test_a_planted_journal_never_moves_a_file_from_elsewhere(tmp_path, capsys) -> None:
    """The journal lives in the user's output folder: one naming a file outside its own staging
    folder (or a target elsewhere) is refused as damaged, and nothing moves."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    secret = outside / "secret.txt"
    secret.write_bytes(b"mine")
    folder = tmp_path / "out"
    folder.mkdir()
    stage = _dead_staging(folder, "d.pt")
    for files in ([["model", str(folder / "d.pt"), str(secret)]],
                  [["model", str(outside / "d.pt"), str(stage / "new" / "d.pt")]]):  # fmt: skip
        (stage / JOURNAL).write_text(json.dumps({"files": files, "staging": [str(stage)]}))
        code, _, err = cli(capsys, "--recover", folder)
        assert code == 0 and "its journal is damaged; left alone" in one_line(err)
        assert secret.read_bytes() == b"mine" and not (folder / "d.pt").exists()
        assert not (outside / "d.pt").exists() and stage.is_dir()
