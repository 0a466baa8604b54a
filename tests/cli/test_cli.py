"""The command line: ``decouple.cli.main(argv)`` in-process, and ``python -m decouple`` for real.

Good runs write the decoupled model, its recipe and the JSON/Markdown report; bad input ends with
exit status 2, one line on stderr, no traceback and no file written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from decouple import DecoupleConfig, DecoupledConv2d, decouple_, load_decoupled
from decouple.cli.run import main
from decouple.models import build_model
from decouple.pipeline import compress_

TESTS_DIR = Path(__file__).resolve().parents[1]
CONVS = ["conv1", "conv2", "conv3", "conv4"]
DIGITS_SHAPE = (1, 8, 8)
# digits_cnn's conv1 reads 1 channel: a stem, kept by default. The tests of every conv decoupled
# say so (tests/cli/test_first_hour.py checks the default).
STEM = "--include-stem"


# --------------------------------------------------------------------------------------------
# helpers


def cli(capsys: pytest.CaptureFixture, *argv: object) -> tuple[int, str, str]:
    """Run ``main`` in-process; return (exit status, stdout, stderr)."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(err: str) -> None:
    # a stage that took half a second before the error ("[ 1.1 s] loading: 1.1 s") is progress
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"\[\s*[\d.]+ s\] ", ln)]
    assert len(lines) == 1, f"expected one line on stderr, got {err!r}"
    assert lines[0].startswith("decouple: error: "), err
    assert lines[0].strip(), "the error line is empty"
    assert "Traceback" not in err


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with its content hash (folders as ``"dir"``)."""
    return {
        p.relative_to(root).as_posix(): sha256(p) if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def default_outputs(model_path: Path) -> dict[str, Path]:
    """Where a run without --out writes: the current folder (tests/cli/conftest.py makes it the
    test's tmp_path), never beside the model."""
    stem = Path.cwd() / f"{model_path.stem}.decoupled"
    return {
        "model": Path(f"{stem}{model_path.suffix}"),
        "recipe": Path(f"{stem}.recipe.json"),
        "report": Path(f"{stem}.report.json"),
        "markdown": Path(f"{stem}.report.md"),
        "manifest": Path(f"{stem}.manifest.json"),  # written last: the set is complete
    }


def read_report(path: Path) -> tuple[dict, dict[str, dict]]:
    """The report and its conv rows by name (the digits CNN's linear head, kept by the k×k
    methods, is checked on its own where it matters)."""
    report = json.loads(path.read_text())
    return report, {r["name"]: r for r in report["layers"] if r["kind"] == "conv"}


def digits_model(seed: int = 0) -> nn.Module:
    """A freshly built ``digits_cnn`` with non-trivial BatchNorm statistics, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("digits_cnn")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def load_digits(path: Path) -> nn.Module:
    model = build_model("digits_cnn")
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return model.eval()


@pytest.fixture
def digits_sd(tmp_path: Path) -> Path:
    """A ``digits_cnn`` state_dict file."""
    path = tmp_path / "digits.pt"
    torch.save(digits_model().state_dict(), path)
    return path


def digits_input(n: int = 16) -> torch.Tensor:
    return torch.randn((n, *DIGITS_SHAPE), generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------------------------
# 1. end to end


def test_state_dict_end_to_end(digits_sd: Path, tmp_path: Path, capsys) -> None:
    before = sha256(digits_sd)
    code, out, err = cli(capsys, STEM, digits_sd, "--arch", "digits_cnn", "--rank", "2")
    assert code == 0, err
    # nothing on stderr but the progress lines of stages that took half a second (machine load)
    assert all(re.match(r"\[\s*[\d.]+ s\] ", ln) for ln in err.splitlines()), err
    assert sha256(digits_sd) == before, "the input file was modified"

    paths = default_outputs(digits_sd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [digits_sd.name, *(p.name for p in paths.values())]
    ), "unexpected files (leftover temporaries?)"

    # the table on stdout: a header, one row per conv, the summary and where things went
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["layer", "shape"] and "rel err" in lines[0]
    for name in CONVS:
        assert any(line.startswith(name + " ") for line in lines), name
    assert "decoupled 4 of 5 layers" in out  # the 4 convs; the linear head fc is kept
    assert any(line.startswith("fc ") and "64->10 linear" in line for line in lines)
    for what, path in paths.items():
        assert f"wrote {what:8s} {path}" in out

    report, layers = read_report(paths["report"])
    assert list(layers) == CONVS
    for i, name in enumerate(CONVS, 1):
        r = layers[name]
        assert r["action"] == "decoupled"
        assert r["rank"] == 2 and r["max_rank"] == 9 and r["order"] == "dw-pw"
        assert 0.0 < r["rel_error"] < 1.0
        assert 0.0 < r["energy"] <= 1.0
        assert 0 < r["params_after"] < r["params_before"]
        assert 0 < r["flops_after"] < r["flops_before"]
        assert r["bn_folded"] == f"bn{i}"
    totals = report["totals"]
    assert totals["layers_decoupled"] == 4 and totals["layers_kept"] == 1  # fc, linear
    assert totals["flops_ratio"] > 1 and totals["params_ratio"] > 1
    assert totals["flops_before"] > sum(r["flops_before"] for r in layers.values())
    assert report["input_shape"] == list(DIGITS_SHAPE)
    assert report["arch"] == "digits_cnn" and report["config"]["rank"] == 2
    assert math.isfinite(report["output"]["rel_error"]) and report["output"]["rel_error"] > 0

    recipe = json.loads(paths["recipe"].read_text())
    assert recipe["format"] == "decouple-recipe"
    assert recipe["layers"] == {n: {"method": "nd", "rank": 2, "order": "dw-pw"} for n in CONVS}
    assert recipe["folded_bn"] == {f"conv{i}": f"bn{i}" for i in range(1, 5)}

    md = paths["markdown"].read_text()
    assert md.startswith("# Decoupling report") and "| conv3 |" in md

    # the output is a plain state_dict that loads with weights_only=True
    sd = torch.load(paths["model"], map_location="cpu", weights_only=True)
    assert isinstance(sd, dict) and "conv1.depthwise.weight" in sd and "bn1.weight" not in sd


# --------------------------------------------------------------------------------------------
# 2. reloading what the CLI wrote


def test_reload_round_trip_matches_library(digits_sd: Path, capsys) -> None:
    code, _, err = cli(capsys, STEM, digits_sd, "--arch", "digits_cnn", "--rank", "2")
    assert code == 0, err
    paths = default_outputs(digits_sd)

    reloaded = load_decoupled(build_model("digits_cnn"), paths["model"])
    assert sum(isinstance(m, DecoupledConv2d) for m in reloaded.modules()) == 4
    reference = load_digits(digits_sd)  # the CLI's path: data-free, so its biases corrected
    compress_(reference, DecoupleConfig(include_stem=True, rank=2), DIGITS_SHAPE)
    x = digits_input()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), atol=1e-6, rtol=0)

        # and the report's output error is reproducible from the files alone
        original = load_digits(digits_sd)
        probe = torch.randn((8, *DIGITS_SHAPE), generator=torch.Generator().manual_seed(0))
        a, b = original(probe).double(), reloaded(probe).double()
    report, _ = read_report(paths["report"])
    assert float((a - b).norm() / a.norm()) == pytest.approx(
        report["output"]["rel_error"], abs=1e-6
    )


def test_whole_module_with_trust_pickle(tmp_path: Path, capsys) -> None:
    torch.manual_seed(0)
    import tiny_archs

    model = tiny_archs.small_cnn().eval()
    path = tmp_path / "whole.pt"
    torch.save(model, path)
    before = sha256(path)

    code, out, err = cli(
        capsys, STEM, path, "--trust-pickle", "--rank", "2", "--input-shape", "3,16,16"
    )
    assert code == 0, err
    assert sha256(path) == before
    paths = default_outputs(path)
    assert all(p.is_file() for p in paths.values())

    loaded = torch.load(paths["model"], map_location="cpu", weights_only=False)
    assert isinstance(loaded, nn.Module)
    assert sum(isinstance(m, DecoupledConv2d) for m in loaded.modules()) == 2

    reference = torch.load(path, map_location="cpu", weights_only=False).eval()
    compress_(reference, DecoupleConfig(include_stem=True, rank=2), (3, 16, 16))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), reference(x), atol=1e-6, rtol=0)

    report, layers = read_report(paths["report"])
    assert report["input_shape"] == [3, 16, 16]
    assert layers["0"]["bn_folded"] == "1" and layers["3"]["bn_folded"] is None
    assert all(r["action"] == "decoupled" and r["rank"] == 2 for r in layers.values())


def test_module_callable_arch_with_input_shape(tmp_path: Path, capsys) -> None:
    import tiny_archs

    torch.manual_seed(0)
    path = tmp_path / "small.pt"
    torch.save(tiny_archs.small_cnn().state_dict(), path)
    code, _, err = cli(
        capsys,
        STEM,
        path,
        "--arch",
        "tiny_archs:small_cnn",
        "--rank",
        "1",
        "--input-shape",
        "3,6,6",
    )
    assert code == 0, err
    paths = default_outputs(path)
    reloaded = load_decoupled(tiny_archs.small_cnn(), paths["model"])
    assert sum(isinstance(m, DecoupledConv2d) for m in reloaded.modules()) == 2
    assert read_report(paths["report"])[0]["input_shape"] == [3, 6, 6]


def test_a_model_returning_an_ordered_dict_is_compared_leaf_by_leaf(tmp_path, capsys) -> None:
    import tiny_archs

    torch.manual_seed(0)
    path = tmp_path / "seg.pt"
    torch.save(tiny_archs.dict_output().state_dict(), path)
    argv = [path, "--arch", "tiny_archs:dict_output", "--rank", "2", "--input-shape", "3,8,8"]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    report, layers = read_report(default_outputs(path)["report"])
    assert layers["head"]["action"] == "decoupled"
    assert report["output"]["leaves"] == ["out", "aux"]
    assert set(report["output"]["leaf_errors"]) == {"out", "aux"}
    assert "output: relative error" in out and "over 2 leaves (out, aux) on 8 random" in out


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": sd, "epoch": 3}, id="checkpoint-dict"),
        pytest.param(lambda sd: {"model_state_dict": sd}, id="model_state_dict"),
        pytest.param(lambda sd: {f"module.{k}": v for k, v in sd.items()}, id="dataparallel"),
    ],
)
def test_checkpoint_layouts(wrap: Callable, tmp_path: Path, capsys) -> None:
    path = tmp_path / "ckpt.pth"
    torch.save(wrap(digits_model().state_dict()), path)
    code, _, err = cli(capsys, STEM, path, "--arch", "digits_cnn", "--rank", "2")
    assert code == 0, err
    out = tmp_path / "ckpt.decoupled.pth"
    assert load_decoupled(build_model("digits_cnn"), out) is not None


# --------------------------------------------------------------------------------------------
# 3. options


def test_energy(digits_sd: Path, capsys) -> None:
    code, _, err = cli(capsys, STEM, digits_sd, "--arch", "digits_cnn", "--energy", "0.9")
    assert code == 0, err
    report, layers = read_report(default_outputs(digits_sd)["report"])
    assert report["config"]["energy"] == 0.9 and report["config"]["rank"] is None
    for r in layers.values():
        assert r["action"] == "decoupled"
        assert r["energy"] >= 0.9 - 1e-9
        assert 1 <= r["rank"] <= r["max_rank"]
        assert r["reason"].startswith("energy 0.9 -> T=")


def test_order_pw_dw(digits_sd: Path, capsys) -> None:
    code, _, err = cli(
        capsys, STEM, digits_sd, "--arch", "digits_cnn", "--rank", "2", "--order", "pw-dw"
    )
    assert code == 0, err
    paths = default_outputs(digits_sd)
    _, layers = read_report(paths["report"])
    assert {r["order"] for r in layers.values()} == {"pw-dw"}
    reloaded = load_decoupled(build_model("digits_cnn"), paths["model"])
    reference = load_digits(digits_sd)
    compress_(reference, DecoupleConfig(include_stem=True, rank=2, order="pw-dw"), DIGITS_SHAPE)
    x = digits_input()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("skip", "kept"),
    [
        (["conv2"], {"conv2"}),
        (["conv[23]"], {"conv2", "conv3"}),
        (["conv1", "conv4"], {"conv1", "conv4"}),
        (["conv1,conv4"], {"conv1", "conv4"}),
    ],
    ids=["exact", "regex", "two-names", "comma-list"],
)
def test_skip(skip: list[str], kept: set[str], digits_sd: Path, capsys) -> None:
    flags = [a for s in skip for a in ("--skip", s)]  # one pattern (or comma list) per --skip
    code, out, err = cli(capsys, STEM, digits_sd, "--arch", "digits_cnn", "--rank", "2", *flags)
    assert code == 0, err
    report, layers = read_report(default_outputs(digits_sd)["report"])
    for name, r in layers.items():
        if name in kept:
            assert r["action"] == "kept" and r["reason"] == "skipped by override"
            assert r["rank"] is None and r["params_after"] == r["params_before"]
        else:
            assert r["action"] == "decoupled" and r["rank"] == 2
    assert report["totals"]["layers_kept"] == len(kept) + 1  # and the linear head
    assert f"decoupled {4 - len(kept)} of 5 layers" in out


def test_no_fold_bn(digits_sd: Path, capsys) -> None:
    code, _, err = cli(
        capsys, STEM, digits_sd, "--arch", "digits_cnn", "--rank", "2", "--no-fold-bn"
    )
    assert code == 0, err
    paths = default_outputs(digits_sd)
    report, layers = read_report(paths["report"])
    assert report["config"]["fold_bn"] is False
    assert all(r["bn_folded"] is None for r in layers.values())
    assert json.loads(paths["recipe"].read_text())["folded_bn"] == {}
    sd = torch.load(paths["model"], weights_only=True)
    assert "bn1.running_var" in sd
    reloaded = load_decoupled(build_model("digits_cnn"), paths["model"])
    reference = load_digits(digits_sd)
    decouple_(reference, DecoupleConfig(include_stem=True, rank=2, fold_bn=False))
    x = digits_input()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), reference(x), atol=1e-6, rtol=0)


def test_config_file_per_layer_ranks(digits_sd: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "ranks.json"
    config.write_text(
        json.dumps({"overrides": {"conv2": 2, "conv3": {"rank": 4, "order": "pw-dw"}}})
    )
    code, _, err = cli(capsys, STEM, digits_sd, "--arch", "digits_cnn", "--config", config)
    assert code == 0, err
    paths = default_outputs(digits_sd)
    _, layers = read_report(paths["report"])
    assert {n for n, r in layers.items() if r["action"] == "decoupled"} == {"conv2", "conv3"}
    assert (layers["conv2"]["rank"], layers["conv2"]["order"]) == (2, "dw-pw")
    assert (layers["conv3"]["rank"], layers["conv3"]["order"]) == (4, "pw-dw")
    for name in ("conv1", "conv4"):
        assert layers[name]["reason"] == "no rank or energy for this layer"
    reloaded = load_decoupled(build_model("digits_cnn"), paths["model"])
    assert isinstance(reloaded.conv1, nn.Conv2d) and isinstance(reloaded.conv3, DecoupledConv2d)
    assert (reloaded.conv3.rank, reloaded.conv3.order) == (4, "pw-dw")


def test_flags_override_config(digits_sd: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"energy": 0.5, "order": "pw-dw", "fold_bn": True}))
    argv = [digits_sd, "--arch", "digits_cnn", "--config", config]
    code, _, err = cli(capsys, STEM, *argv, "--rank", "3", "--order", "dw-pw", "--no-fold-bn")
    assert code == 0, err
    report, layers = read_report(default_outputs(digits_sd)["report"])
    assert report["config"]["rank"] == 3 and report["config"]["energy"] is None
    assert all(r["rank"] == 3 and r["order"] == "dw-pw" for r in layers.values())
    assert all(r["bn_folded"] is None for r in layers.values())


def test_custom_out_and_report(digits_sd: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "models" / "small.pt"  # folders are created
    report = tmp_path / "reports" / "run1.json"
    code, stdout, err = cli(
        capsys,
        STEM,
        digits_sd,
        "--arch",
        "digits_cnn",
        "--rank",
        "2",
        "--out",
        out,
        "--report",
        report,
    )
    assert code == 0, err
    expected = [out, out.with_name("small.recipe.json"), report, report.with_suffix(".md")]
    assert all(p.is_file() for p in expected)
    assert not any(p.exists() for p in default_outputs(digits_sd).values())
    assert f"wrote model    {out}" in stdout
    assert load_decoupled(build_model("digits_cnn"), out) is not None
    assert json.loads(report.read_text())["totals"]["layers_decoupled"] == 4


def test_the_report_says_where_the_time_went(digits_sd: Path, capsys) -> None:
    code, stdout, err = cli(capsys, digits_sd, "--arch", "digits_cnn", "--rank", "2")
    assert code == 0, err
    timings = json.loads(default_outputs(digits_sd)["report"].read_text())["timings"]
    assert {"loading", "BN folding", "decoupling", "report"} <= set(timings["stages"])
    assert timings["total"] >= sum(timings["stages"].values()) - 0.01  # rounded to ms
    assert "time: " in stdout and "until the files were written" in stdout


def test_report_given_as_markdown(digits_sd: Path, tmp_path: Path, capsys) -> None:
    code, _, err = cli(
        capsys, digits_sd, "--arch", "digits_cnn", "--rank", "2", "--report", tmp_path / "r.md"
    )
    assert code == 0, err
    assert (tmp_path / "r.md").read_text().startswith("# Decoupling report")
    assert "totals" in json.loads((tmp_path / "r.json").read_text())


def test_existing_outputs_need_force(digits_sd: Path, tmp_path: Path, capsys) -> None:
    argv = [digits_sd, "--arch", "digits_cnn"]
    assert cli(capsys, STEM, *argv, "--rank", "2")[0] == 0
    paths = default_outputs(digits_sd)
    before = snapshot(tmp_path)

    code, out, err = cli(capsys, STEM, *argv, "--rank", "3")
    assert code == 2 and out == ""
    assert_one_line_error(err)
    assert "--force" in err
    assert snapshot(tmp_path) == before

    code, _, err = cli(capsys, STEM, *argv, "--rank", "3", "--force")
    assert code == 0, err
    assert set(snapshot(tmp_path)) == set(before), "--force left other files behind"
    _, layers = read_report(paths["report"])
    assert all(r["rank"] == 3 for r in layers.values())
    reloaded = load_decoupled(build_model("digits_cnn"), paths["model"])
    assert reloaded.conv2.rank == 3
    assert sha256(digits_sd) == before[digits_sd.name]


def test_demo(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo.pt"
    # 19 % top-1 with the stem decoupled: a wreck, written only because --allow-miss says so
    code, stdout, err = cli(capsys, STEM, "--demo", "--rank", "3", "--out", out, "--allow-miss")
    assert code == 0, err
    accuracy_lines = [line for line in stdout.splitlines() if line.startswith("accuracy:")]
    assert len(accuracy_lines) == 1 and "->" in accuracy_lines[0]
    assert "digits test images" in accuracy_lines[0]
    report = json.loads(out.with_name("demo.report.json").read_text())
    acc = report["accuracy"]
    assert acc["before"]["top1"] >= 0.95 and 0.0 <= acc["after"]["top1"] <= 1.0
    assert acc["before"]["n"] == acc["after"]["n"] > 0
    assert all(r["rank"] == 3 for r in report["layers"] if r["kind"] == "conv")
    assert out.is_file() and out.with_name("demo.recipe.json").is_file()


def test_demo_without_out_writes_to_a_fresh_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from decouple import demo

    package_files = snapshot(demo.model_path().parent)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, stdout, err = cli(capsys, "--demo", "--rank", "6")
    assert code == 0, err
    written = [line.split()[-1] for line in stdout.splitlines() if line.startswith("wrote ")]
    assert len(written) == 5  # model, recipe, report, markdown, manifest
    assert all(Path(p).is_file() and Path(p).is_relative_to(tmp_path) for p in written)
    assert snapshot(demo.model_path().parent) == package_files


def test_help_exits_zero(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--trust-pickle" in out and "--rank" in out


# --------------------------------------------------------------------------------------------
# 4. bad input: exit 2, one line on stderr, nothing written

BAD_CASES: list = []


def bad_case(case_id: str, expect: str | None = None) -> Callable:
    """Register ``fn(tmp_path, digits_sd) -> argv``; ``expect`` must appear in the error line."""

    def register(fn: Callable) -> Callable:
        BAD_CASES.append(pytest.param(fn, expect, id=case_id))
        return fn

    return register


def digits_args(sd: Path, *extra: object) -> list:
    return [sd, "--arch", "digits_cnn", *extra]


def save(obj: object, path: Path) -> Path:
    torch.save(obj, path)
    return path


def write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def broken_digits(tmp: Path, key: str, value: float) -> Path:
    sd = digits_model().state_dict()
    sd[key] = sd[key].clone()
    sd[key].view(-1)[3] = value
    return save(sd, tmp / "broken.pt")


@bad_case("missing-file", "no such file")
def _missing(tmp, sd):
    return digits_args(tmp / "nope.pt", "--rank", "2")


@bad_case("directory", "not a file")
def _directory(tmp, sd):
    (tmp / "adir").mkdir()
    return digits_args(tmp / "adir", "--rank", "2")


@bad_case("truncated", "cannot read")
def _truncated(tmp, sd):
    data = sd.read_bytes()
    return digits_args(write(tmp / "half.pt", data[: len(data) // 2]), "--rank", "2")


@bad_case("random-bytes")
def _random_bytes(tmp, sd):
    return digits_args(write(tmp / "noise.pt", random.Random(0).randbytes(512)), "--rank", "2")


@bad_case("text-file", "cannot read")
def _text(tmp, sd):
    return digits_args(write(tmp / "notes.pt", "hello, I am not a model\n"), "--rank", "2")


@bad_case("empty-file", "cannot read")
def _empty(tmp, sd):
    return digits_args(write(tmp / "empty.pt", b""), "--rank", "2")


@bad_case("dict-not-a-model", "not a model")
def _dict(tmp, sd):
    return digits_args(save({"a": 1}, tmp / "d.pt"), "--rank", "2")


@bad_case("empty-dict", "not a model")
def _empty_dict(tmp, sd):
    return digits_args(save({}, tmp / "d.pt"), "--rank", "2")


@bad_case("tensor-list", "not a model")
def _tensor_list(tmp, sd):
    return digits_args(save([torch.zeros(3), torch.ones(2, 2)], tmp / "l.pt"), "--rank", "2")


@bad_case("state-dict-without-arch", "--arch")
def _no_arch(tmp, sd):
    return [sd, "--rank", "2"]


@bad_case("unknown-arch", "unknown arch")
def _unknown_arch(tmp, sd):
    return [sd, "--arch", "no_such_net", "--rank", "2"]


@bad_case("keys-do-not-match", "resnet18")
def _mismatch(tmp, sd):
    return [sd, "--arch", "resnet18", "--rank", "2"]


@bad_case("callable-arch-no-module", "cannot import")
def _no_module(tmp, sd):
    return [sd, "--arch", "no_such_module_xyz:build", "--rank", "2"]


@bad_case("callable-arch-no-attr", "cannot import")
def _no_attr(tmp, sd):
    return [sd, "--arch", "tiny_archs:no_such_builder", "--rank", "2"]


@bad_case("callable-arch-raises", "failed")
def _raises(tmp, sd):
    return [sd, "--arch", "tiny_archs:raises", "--rank", "2"]


@bad_case("callable-arch-not-a-module", "not an nn.Module")
def _not_module(tmp, sd):
    return [sd, "--arch", "tiny_archs:not_a_module", "--rank", "2"]


@bad_case("rank-0", "rank")
def _rank0(tmp, sd):
    return digits_args(sd, "--rank", "0")


@bad_case("rank-negative", "rank")
def _rank_neg(tmp, sd):
    return digits_args(sd, "--rank", "-1")


@bad_case("rank-not-an-int", "--rank")
def _rank_word(tmp, sd):
    return digits_args(sd, "--rank", "two")


@bad_case("energy-0", "energy")
def _energy0(tmp, sd):
    return digits_args(sd, "--energy", "0")


@bad_case("energy-1.5", "energy")
def _energy15(tmp, sd):
    return digits_args(sd, "--energy", "1.5")


@bad_case("energy-nan", "energy")
def _energy_nan(tmp, sd):
    return digits_args(sd, "--energy", "nan")


@bad_case("rank-and-energy", "not allowed")
def _rank_energy(tmp, sd):
    return digits_args(sd, "--rank", "2", "--energy", "0.9")


@bad_case("neither-rank-nor-energy", "--rank")
def _no_rank(tmp, sd):
    return digits_args(sd)


@bad_case("bad-order", "--order")
def _bad_order(tmp, sd):
    return digits_args(sd, "--rank", "2", "--order", "sideways")


@bad_case("skip-bad-regex", "conv[")
def _bad_regex(tmp, sd):
    return digits_args(sd, "--rank", "2", "--skip", "conv[")


@bad_case("nothing-to-decouple-pickled-1x1", "nothing to decouple")
def _pickled_1x1(tmp, sd):
    import tiny_archs

    path = save(tiny_archs.pointwise_only(), tmp / "pw.pt")
    return [path, "--trust-pickle", "--rank", "2", "--input-shape", "3,8,8"]


@bad_case("nothing-to-decouple-callable-1x1", "nothing to decouple")
def _callable_1x1(tmp, sd):
    import tiny_archs

    path = save(tiny_archs.pointwise_only().state_dict(), tmp / "pw.pt")
    return [path, "--arch", "tiny_archs:pointwise_only", "--rank", "2", "--input-shape", "3,8,8"]


@bad_case("nothing-to-decouple-all-skipped", "nothing to decouple")
def _all_skipped(tmp, sd):
    return digits_args(sd, "--rank", "2", "--skip", "conv.")


@bad_case("nan-conv-weight", "NaN or Inf")
def _nan(tmp, sd):
    return digits_args(broken_digits(tmp, "conv2.weight", float("nan")), "--rank", "2")


@bad_case("inf-conv-weight", "NaN or Inf")
def _inf(tmp, sd):
    return digits_args(broken_digits(tmp, "conv4.weight", float("-inf")), "--rank", "2")


@bad_case("inf-bn-running-var", "NaN or Inf")
def _inf_bn(tmp, sd):
    return digits_args(broken_digits(tmp, "bn3.running_var", float("inf")), "--rank", "2")


@bad_case("output-exists", "--force")
def _exists(tmp, sd):
    write(default_outputs(sd)["markdown"], "precious notes\n")
    return digits_args(sd, "--rank", "2")


@bad_case("out-is-the-input", "overwrite the input")
def _out_is_input(tmp, sd):
    return digits_args(sd, "--rank", "2", "--out", sd, "--force")


@bad_case("whole-module-without-trust-pickle", "--trust-pickle")
def _untrusted(tmp, sd):
    return [save(nn.Sequential(nn.Conv2d(3, 4, 3)), tmp / "whole.pt"), "--rank", "2"]


@bad_case("whole-module-not-running-at-the-inferred-shape", "pass --input-shape")
def _no_shape(tmp, sd):  # the shape is inferred as (3, 224, 224); the Linear wants 8x8 images
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    return [save(net, tmp / "w.pt"), "--trust-pickle", "--rank", "2"]


@bad_case("input-shape-two-numbers", "--input-shape")
def _shape_short(tmp, sd):
    return digits_args(sd, "--rank", "2", "--input-shape", "1,8")


@bad_case("input-shape-not-numbers", "--input-shape")
def _shape_words(tmp, sd):
    return digits_args(sd, "--rank", "2", "--input-shape", "a,b,c")


@bad_case("input-shape-zero", "--input-shape")
def _shape_zero(tmp, sd):
    return digits_args(sd, "--rank", "2", "--input-shape", "0,8,8")


@bad_case("input-shape-model-cannot-run", "--input-shape")
def _shape_channels(tmp, sd):
    return digits_args(sd, "--rank", "2", "--input-shape", "3,8,8")


@bad_case("no-model-no-demo", "MODEL")
def _no_model(tmp, sd):
    return ["--rank", "2"]


@bad_case("model-and-demo", "not both")
def _model_and_demo(tmp, sd):
    return digits_args(sd, "--rank", "2", "--demo", "--out", tmp / "d.pt")


@bad_case("unknown-flag", "--frobnicate")
def _unknown_flag(tmp, sd):
    return digits_args(sd, "--rank", "2", "--frobnicate")


@bad_case("config-missing", "--config")
def _config_missing(tmp, sd):
    return digits_args(sd, "--config", tmp / "nope.json")


@bad_case("config-not-json", "--config")
def _config_garbage(tmp, sd):
    return digits_args(sd, "--config", write(tmp / "c.json", "{rank: 2"))


@bad_case("config-unknown-key", "rnak")
def _config_key(tmp, sd):
    return digits_args(sd, "--config", write(tmp / "c.json", '{"rnak": 2}'))


@bad_case("config-bad-override", "override")
def _config_override(tmp, sd):
    return digits_args(sd, "--config", write(tmp / "c.json", '{"overrides": {"conv2": [2]}}'))


# -- cases that once crashed or wrote partial outputs; each must exit 2 without writing anything


@bad_case(
    "module-without-parameters",
    "nothing to decouple",
)
def _no_params(tmp, sd):
    path = save(nn.Sequential(nn.ReLU()), tmp / "relu.pt")
    return [path, "--trust-pickle", "--rank", "2", "--input-shape", "3,8,8"]


@bad_case(
    "model-returns-no-tensor",
    "the model returns a dict, with no tensor: there is no output to compare",
)
def _no_tensor_output(tmp, sd):
    import tiny_archs

    path = save(tiny_archs.NoTensorOutput(), tmp / "none.pt")
    return [path, "--trust-pickle", "--rank", "2", "--input-shape", "3,8,8"]


@bad_case(
    "data-on-a-model-without-class-logits",
    "--data needs a classifier, whose output is class logits (batch, classes); the model "
    "returns an OrderedDict of 2 tensors (out, aux)",
)
def _data_without_logits(tmp, sd):
    images = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    data = save({"images": images, "labels": torch.arange(4)}, tmp / "data.pt")
    import tiny_archs

    model = save(tiny_archs.dict_output().state_dict(), tmp / "seg.pt")
    return [model, "--arch", "tiny_archs:dict_output", "--rank", "2", "--input-shape", "3,8,8",
            "--data", data]  # fmt: skip


@bad_case(
    "config-not-an-object",
    "--config",
)
def _config_list(tmp, sd):
    return digits_args(sd, "--config", write(tmp / "c.json", "[1, 2]"))


@bad_case(
    "out-folder-is-a-file",
    "afile",
)
def _out_under_file(tmp, sd):
    write(tmp / "afile", "x")
    return digits_args(sd, "--rank", "2", "--out", tmp / "afile" / "m.pt")


@bad_case(
    "report-folder-is-a-file",
    "afile",
)
def _report_under_file(tmp, sd):
    write(tmp / "afile", "x")
    return digits_args(sd, "--rank", "2", "--report", tmp / "afile" / "r.json")


@bad_case(
    "report-is-the-out",
    None,
)
def _report_is_out(tmp, sd):
    return digits_args(sd, "--rank", "2", "--out", tmp / "o.pt", "--report", tmp / "o.pt")


@bad_case(
    "report-is-the-recipe",
    None,
)
def _report_is_recipe(tmp, sd):
    out = tmp / "o.pt"
    return digits_args(sd, "--rank", "2", "--out", out, "--report", tmp / "o.recipe.json")


@pytest.mark.parametrize(("build", "expect"), BAD_CASES)
def test_bad_input(build: Callable, expect: str | None, tmp_path: Path, digits_sd: Path, capsys):
    argv = build(tmp_path, digits_sd)
    before = snapshot(tmp_path)
    code, out, err = cli(capsys, *argv)
    assert code == 2, f"exit status {code}; stderr {err!r}"
    assert_one_line_error(err)
    assert err.startswith("decouple: error: ")
    if expect is not None:
        assert expect in err
    assert out == ""
    assert snapshot(tmp_path) == before, "files were written or changed"


def test_random_bytes_are_reported_as_corrupt(tmp_path: Path, capsys) -> None:
    path = write(tmp_path / "noise.pt", random.Random(0).randbytes(512))
    code, _, err = cli(capsys, path, "--arch", "digits_cnn", "--rank", "2")
    assert code == 2
    assert "corrupt" in err and "--trust-pickle" not in err


def test_bad_demo_run_leaves_no_temp_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    code, _, err = cli(capsys, "--demo", "--rank", "0")
    assert code == 2
    assert_one_line_error(err)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------
# 5. the real entry point


def run_module(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "DECOUPLE_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "decouple", *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_subprocess_good_run(digits_sd: Path, tmp_path: Path) -> None:
    proc = run_module(STEM, digits_sd.name, "--arch", "digits_cnn", "--rank", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "decoupled 4 of 5 layers" in proc.stdout
    assert all(p.is_file() for p in default_outputs(digits_sd).values())


def test_subprocess_bad_run(tmp_path: Path) -> None:
    proc = run_module("missing.pt", "--arch", "digits_cnn", "--rank", "2", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert_one_line_error(proc.stderr)
    assert proc.stderr.startswith("decouple: error: no such file")
    assert list(tmp_path.iterdir()) == []


def test_data_free_bias_correction_is_reported_and_can_be_turned_off(tmp_path: Path, capsys):
    out = tmp_path / "bc.pt"
    code, stdout, err = cli(capsys, "--demo", "--rank", "6", "--out", out)
    assert code == 0, err
    report = json.loads(out.with_name("bc.report.json").read_text())
    bc = report["bias_correction"]
    assert bc["layers"] == ["conv2", "conv3", "conv4"] and bc["samples"] > 0, bc
    line = next(ln for ln in stdout.splitlines() if ln.startswith("bias correction:"))
    assert "3 factored layers" in line and "--no-bias-correction" in line
    off = tmp_path / "off.pt"
    code, stdout, err = cli(capsys, "--demo", "--rank", "6", "--out", off, "--no-bias-correction")
    assert code == 0, err
    assert "bias_correction" not in json.loads(off.with_name("off.report.json").read_text())
    assert "bias correction:" not in stdout
    # the two models differ only in the factored layers' biases
    a, b = (torch.load(p, weights_only=True) for p in (out, off))
    a, b = a.get("state_dict", a), b.get("state_dict", b)
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(k.endswith("bias") for k in moved), moved
