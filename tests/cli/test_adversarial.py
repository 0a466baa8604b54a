"""The CLI against a hostile or careless user: every case exits 2 with one line, writes nothing
and changes no input; then hypothesis draws flag combinations, and every outcome must be either
exit 0 with a complete, verified output set, or exit 2 with one line and nothing written.

The cases are grouped by the class of failure they once showed: outputs colliding with inputs,
silently wrong results, errors that were tracebacks, late or hangs, and untrusted configs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from decouple import load_decoupled
from decouple.cli.run import main
from decouple.models import build_model

TESTS_DIR = Path(__file__).resolve().parents[1]
ROOT = TESTS_DIR.parent


def digits_sd(folder: Path) -> Path:
    torch.manual_seed(0)
    model = build_model("digits_cnn").eval()
    path = folder / "digits.pt"
    torch.save(model.state_dict(), path)
    return path


def small_args(folder: Path, *extra: object) -> list:
    """``tiny_archs.small_cnn`` (3×8×8 inputs): image files decode to RGB, so they need 3 channels."""
    import tiny_archs

    torch.manual_seed(0)
    path = folder / "small.pt"
    torch.save(tiny_archs.small_cnn().eval().state_dict(), path)
    return [path, "--arch", "tiny_archs:small_cnn", "--input-shape", "3,8,8", "--rank", "2", *extra]


def digits_data(folder: Path, n: int = 16) -> Path:
    """A labelled ``.pt`` image set the digits model takes (1×8×8)."""
    gen = torch.Generator().manual_seed(3)
    path = folder / "digits_data.pt"
    torch.save(
        {"images": torch.rand(n, 1, 8, 8, generator=gen), "labels": torch.arange(n) % 10}, path
    )
    return path


def png(path: Path, size: tuple[int, int] = (8, 8), mode: str = "L") -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, 128).save(path)
    return path


def bomb_png(path: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A tiny PNG whose header claims ``width × height`` pixels: a decompression bomb."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: (  # noqa: E731
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    )
    idat = zlib.compress(b"\x00" * 64)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )
    return path


def snapshot(root: Path) -> dict[str, str]:
    """Every entry under ``root``: content hash for files, the kind for anything else."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[p.relative_to(root).as_posix()] = "link:" + os.readlink(p)
        elif p.is_file():
            out[p.relative_to(root).as_posix()] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[p.relative_to(root).as_posix()] = "fifo" if p.is_fifo() else "dir"
    return out


def run_cli(capsys: pytest.CaptureFixture, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_refused(code: int, out: str, err: str, expect: str | None, codes=(2,)) -> None:
    assert code in codes, f"exit status {code}; stderr {err!r}"
    # progress (a stage's "[ 1.1 s] ..." line, a bar's "pricing ranks: 100%|...") is not an error
    lines = [ln for ln in err.strip().splitlines()
             if not re.match(r"\[\s*[\d.]+ s\] ", ln) and not re.search(r": +\d+%\|", ln)]  # fmt: skip
    assert len(lines) == 1 and lines[0].startswith("decouple: error: "), err
    assert "Traceback" not in err and out == ""
    if expect is not None:
        assert expect in err, err


# --------------------------------------------------------------------------------------------
# the table: case id -> (build(tmp) -> argv, a phrase the error line must contain)

CASES: list = []


def case(case_id: str, expect: str | None = None) -> Callable:
    def register(fn: Callable) -> Callable:
        CASES.append(pytest.param(fn, expect, id=case_id))
        return fn

    return register


def base(tmp: Path, *extra: object) -> list:
    return [digits_sd(tmp), "--arch", "digits_cnn", "--rank", "2", *extra]


# 1. outputs that collide with inputs or special files: refused even with --force


@case("report-is-the-config", "input")
def _report_is_config(tmp):
    config = tmp / "c.json"
    config.write_text('{"rank": 2}')
    return base(tmp, "--config", config, "--report", config, "--out", tmp / "o.pt", "--force")


@case("out-is-the-data", "input")
def _out_is_data(tmp):
    data = digits_data(tmp)
    return base(tmp, "--data", data, "--out", data, "--force")


@case("out-inside-the-data-folder", None)
def _out_in_data_dir(tmp):
    for i in range(2):
        png(tmp / "imgs" / str(i) / "a.png")
    return base(tmp, "--data", tmp / "imgs", "--out", tmp / "imgs" / "0" / "o.pt", "--force")


@case("report-inside-the-calib-folder", None)
def _report_in_calib_dir(tmp):
    png(tmp / "calib" / "a.png")
    return base(tmp, "--calib", tmp / "calib", "--report", tmp / "calib" / "r.json", "--force")


@case("out-is-a-fifo", "regular file")
def _out_fifo(tmp):
    os.mkfifo(tmp / "o.pt")
    return base(tmp, "--out", tmp / "o.pt", "--force")


@case("report-is-a-fifo", "regular file")
def _report_fifo(tmp):
    os.mkfifo(tmp / "r.json")
    return base(tmp, "--out", tmp / "o.pt", "--report", tmp / "r.json", "--force")


@case("out-is-a-link-to-the-model", "input")
def _out_link(tmp):
    args = base(tmp)
    (tmp / "o.pt").symlink_to(args[0])
    return [*args, "--out", tmp / "o.pt", "--force"]


@case("out-is-a-directory", "directory")
def _out_dir(tmp):
    (tmp / "o.pt").mkdir()
    return base(tmp, "--out", tmp / "o.pt", "--force")


@case("out-folder-unwritable", "cannot")
def _out_unwritable(tmp):
    if os.geteuid() == 0:  # root ignores modes; /proc refuses new files even to root
        return base(tmp, "--out", "/proc/self/decouple-test/o.pt")
    locked = tmp / "locked"
    locked.mkdir(mode=0o500)
    return base(tmp, "--out", locked / "sub" / "o.pt")


# 5. silently wrong results


@case("calib-is-the-data-folder", "share images")
def _same_folder(tmp):
    for c in ("0", "1"):
        png(tmp / "imgs" / c / "a.png")
    return base(tmp, "--data", tmp / "imgs", "--calib", tmp / "imgs", "--out", tmp / "o.pt")


@case("calib-inside-the-data-folder", "share images")
def _calib_sub(tmp):
    for c in ("0", "1"):
        png(tmp / "imgs" / c / "a.png")
    return base(tmp, "--data", tmp / "imgs", "--calib", tmp / "imgs" / "0", "--out", tmp / "o.pt")


@case("calib-is-the-data-file", "share images")
def _same_pt(tmp):
    data = digits_data(tmp)
    return base(tmp, "--data", data, "--calib", data, "--out", tmp / "o.pt")


PREPROCESSING = [  # (case id, flag, value, phrase): each with labelled --data images
    ("std-zero", "--std", "0", "std"),
    ("std-nan", "--std", "nan", "finite"),
    ("std-tiny", "--std", "1e-30", "std"),
    ("mean-of-the-wrong-length", "--mean", "0.5,0.5", "channels"),
]
for _id, _flag, _value, _expect in PREPROCESSING:
    case(_id, _expect)(
        lambda tmp, f=_flag, v=_value: base(
            tmp, "--data", digits_data(tmp), f, v, "--out", tmp / "o.pt"
        )
    )


@case("std-with-demo", "--demo")
def _demo_std(tmp):
    return ["--demo", "--rank", "2", "--std", "0.5", "--out", tmp / "o.pt"]


@case("mean-without-images", "--data")
def _mean_alone(tmp):
    return base(tmp, "--mean", "0.5", "--out", tmp / "o.pt")


@case("no-conv2d-at-all", None)
def _no_conv2d(tmp):
    import tiny_archs

    path = tmp / "t.pt"
    torch.save(tiny_archs.transposed_only(), path)
    return [path, "--trust-pickle", "--rank", "2", "--input-shape", "3,8,8", "--out", tmp / "o.pt"]


# 6. errors that were tracebacks, came late, or hung


@case("arch-calls-sys-exit", "sys.exit")
def _sys_exit(tmp):
    return [digits_sd(tmp), "--arch", "sys:exit", "--rank", "2", "--out", tmp / "o.pt"]


@case("arch-builder-calls-sys-exit", "sys.exit")
def _builder_exit(tmp):
    return [digits_sd(tmp), "--arch", "tiny_archs:exits", "--rank", "2", "--out", tmp / "o.pt"]


@case("arch-module-exits-on-import", "sys.exit")
def _import_exit(tmp):
    (tmp / "mods").mkdir()
    (tmp / "mods" / "exit_on_import.py").write_text("import sys\nsys.exit(5)\n")
    sys.path.insert(0, str(tmp / "mods"))  # removed by the test below
    return [digits_sd(tmp), "--arch", "exit_on_import:build", "--rank", "2", "--out", tmp / "o.pt"]


@case("arch-warns-then-fails", "warns, then fails")
def _warns(tmp):
    return [
        digits_sd(tmp), "--arch", "tiny_archs:warns_then_raises", "--rank", "2",
        "--out", tmp / "o.pt",
    ]  # fmt: skip


@case("config-is-a-fifo", "regular file")
def _config_fifo(tmp):
    os.mkfifo(tmp / "c.json")
    return base(tmp, "--config", tmp / "c.json", "--out", tmp / "o.pt")


@case("data-is-a-fifo", "regular file")
def _data_fifo(tmp):
    os.mkfifo(tmp / "d.pt")
    return base(tmp, "--data", tmp / "d.pt", "--out", tmp / "o.pt")


@case("config-nested-deeply", "nested")
def _deep_json(tmp):
    config = tmp / "c.json"
    config.write_text('{"overrides": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return base(tmp, "--config", config, "--out", tmp / "o.pt")


@case("negative-bn-variance", "running_var")
def _neg_var(tmp):
    path = digits_sd(tmp)
    sd = torch.load(path, weights_only=True)
    key = next(k for k in sd if k.endswith("running_var"))
    sd[key][0] = -1.0
    torch.save(sd, path)
    return [path, "--arch", "digits_cnn", "--rank", "2", "--out", tmp / "o.pt"]


@case("decompression-bomb-in-data", "too large")
def _bomb(tmp):
    png(tmp / "imgs" / "0" / "a.png")
    bomb_png(tmp / "imgs" / "1" / "b.png")
    return small_args(tmp, "--data", tmp / "imgs", "--out", tmp / "o.pt")


@case("damaged-image-in-calib", "cannot read")
def _damaged(tmp):
    png(tmp / "calib" / "a.png")
    (tmp / "calib" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return small_args(tmp, "--calib", tmp / "calib", "--out", tmp / "o.pt")


@case("input-shape-huge", "values per image")
def _huge_shape(tmp):
    return base(tmp, "--input-shape", "1,100000,100000", "--out", tmp / "o.pt")


@case("workers-absurd", "--workers")
def _workers(tmp):
    return base(tmp, "--workers", "100000", "--out", tmp / "o.pt")


# 7. untrusted configs


def config_args(tmp: Path, config: Path) -> list:
    return [digits_sd(tmp), "--arch", "digits_cnn", "--config", config, "--out", tmp / "o.pt"]


@pytest.mark.parametrize(
    "config",
    [
        '{"rank": "2"}',
        '{"rank": true}',
        '{"rank": 2.5}',
        '{"overrides": {"conv2": "lots"}}',
        '{"overrides": {"conv2": {"rank": [2]}}}',
        '{"overrides": {"conv_2": 2}}',
        '{"overrides": "conv2"}',
        '{"method": 3}',
        '{"fold_bn": "yes"}',
        '{"energy": "high"}',
    ],
)
def test_untrusted_config(config: str, tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.json"
    path.write_text(config)
    argv = config_args(tmp_path, path)
    before = snapshot(tmp_path)
    assert_refused(*run_cli(capsys, argv), None)
    assert snapshot(tmp_path) == before


def test_a_config_rank_above_full_rank_is_clipped_cheaply(tmp_path: Path, capsys) -> None:
    """A config says "at most T terms" (like --rank); 10**12 means full rank, allocated as such."""
    path = tmp_path / "c.json"
    path.write_text('{"rank": 2, "overrides": {"conv2": 1000000000000}}')
    argv = config_args(tmp_path, path)
    code, _, err = run_cli(capsys, argv)
    assert code == 0, err
    layers = {r["name"]: r for r in json.loads((tmp_path / "o.report.json").read_text())["layers"]}
    assert layers["conv2"]["rank"] == 9 and layers["conv3"]["rank"] == 2


@pytest.mark.parametrize(("build", "expect"), CASES)
def test_refused(build: Callable, expect: str | None, tmp_path: Path, capsys) -> None:
    path_before = list(sys.path)
    try:
        argv = build(tmp_path)
        before = snapshot(tmp_path)
        assert_refused(*run_cli(capsys, argv), expect)
    finally:
        sys.path[:] = path_before
        sys.modules.pop("exit_on_import", None)
    assert snapshot(tmp_path) == before, "files were written or an input changed"


def test_calib_and_data_on_the_same_cifar_batch(cifar_assets: Path, tmp_path: Path, capsys):
    batch = cifar_assets / "test_batch.truncated_first_3145728_bytes"
    argv = [
        cifar_assets / "resnet20-12fca82f.th", "--arch", "cifar_resnet20", "--rank", "3",
        "--data", batch, "--calib", batch, "--out", tmp_path / "o.pt",
    ]  # fmt: skip
    assert_refused(*run_cli(capsys, argv), "also in --data")
    assert list(tmp_path.iterdir()) == []


def test_unexpected_member_in_the_cifar_jpeg_tar(cifar_assets: Path, tmp_path: Path, capsys):
    from PIL import Image

    (tmp_path / "test_batch.truncated_first_3145728_bytes").symlink_to(
        cifar_assets / "test_batch.truncated_first_3145728_bytes"
    )
    jpg = tmp_path / "x.jpg"
    Image.new("RGB", (32, 32)).save(jpg)
    with tarfile.open(tmp_path / "c.tar", "w") as tf:
        tf.add(jpg, "test/cat/0000.jpg")
        tf.add(jpg, "test/cat/99999.jpg")  # cat has 1,000 test images
    argv = [
        cifar_assets / "resnet20-12fca82f.th", "--arch", "cifar_resnet20", "--rank", "3",
        "--calib", tmp_path / "c.tar", "--out", tmp_path / "o.pt",
    ]  # fmt: skip
    assert_refused(*run_cli(capsys, argv), "99999")


def test_a_fifo_in_an_image_folder_is_skipped_not_read(tmp_path: Path) -> None:
    """Reading a FIFO blocks forever; so this runs in a subprocess with a timeout."""
    for c in ("0", "1"):
        png(tmp_path / "imgs" / c / "a.png")
    os.mkfifo(tmp_path / "imgs" / "1" / "b.png")
    env = {k: v for k, v in os.environ.items() if k != "DECOUPLE_DEBUG"}
    argv = small_args(tmp_path, "--data", tmp_path / "imgs", "--out", tmp_path / "o.pt")
    env["PYTHONPATH"] = str(TESTS_DIR)
    proc = subprocess.run(
        [sys.executable, "-m", "decouple", *map(str, argv)],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2 images" in json.loads((tmp_path / "o.report.json").read_text())["accuracy"]["data"]


def test_a_conv_subclass_with_its_own_forward_is_kept(tmp_path: Path, capsys) -> None:
    import tiny_archs

    model = tiny_archs.custom_conv_net().eval()
    path = tmp_path / "m.pt"
    torch.save(model, path)
    argv = [
        path,
        "--trust-pickle",
        "--include-stem",  # the first conv reads 3 channels: a stem, kept by default
        "--rank",
        "9",
        "--input-shape",
        "3,8,8",
        "--out",
        tmp_path / "o.pt",
    ]
    code, out, err = run_cli(capsys, argv)
    assert code == 0, err
    got = torch.load(tmp_path / "o.pt", weights_only=False)
    assert type(got[2]) is tiny_archs.ShiftedConv, "the custom conv was rewritten"
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # full rank elsewhere: the same function
        torch.testing.assert_close(got(x), model(x), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# hypothesis: flag combinations; exit 0 with a verified set, or exit 2/3 with nothing written

VALUES = {
    "--rank": st.sampled_from(["1", "2", "9", "0", "-1", "two", "1e3"]),
    "--energy": st.sampled_from(["0.5", "0.99", "1", "0", "nan", "2"]),
    "--target-flops": st.sampled_from(["0.5", "0.9", "0", "1.5"]),
    "--method": st.sampled_from(["nd", "cp", "tucker", "auto", "svd"]),
    "--order": st.sampled_from(["dw-pw", "pw-dw", "dw"]),
    "--skip": st.sampled_from(["conv1", "conv.*", "(", "conv9"]),
    "--input-shape": st.sampled_from(["1,8,8", "1,16,16", "3,8,8", "1,8", "x"]),
    "--refit": st.sampled_from(["none", "last", "auto", "bogus"]),
    "--criterion": st.sampled_from(["energy", "data", "output", "vibes"]),
    "--batch-size": st.sampled_from(["4", "0", "-3"]),
    "--calib-size": st.sampled_from(["8", "0"]),
}
SWITCHES = ["--force", "--no-fold-bn", "--fold-bn"]
OUTS = ["fresh", "existing", "model", "data", "folder"]


@st.composite
def flag_sets(draw) -> tuple[list[str], str, bool, bool]:
    flags = draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=4, unique=True))
    argv = []
    for f in flags:
        argv += [f, draw(VALUES[f])]
    argv += draw(st.lists(st.sampled_from(SWITCHES), max_size=2, unique=True))
    if "--target-flops" in flags:  # a budget over every method prices CP at many ranks: a minute
        argv += ["--method", "nd"]
    return argv, draw(st.sampled_from(OUTS)), draw(st.booleans()), draw(st.booleans())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(drawn=flag_sets())
def test_fuzzed_flags_end_in_a_whole_set_or_one_line(drawn, capsys) -> None:
    flags, out_kind, with_data, with_calib = drawn
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = digits_sd(tmp)
        data = digits_data(tmp)
        (tmp / "existing.pt").write_bytes(b"user's own file")
        (tmp / "folder").mkdir()
        out = {
            "fresh": tmp / "o.pt", "existing": tmp / "existing.pt", "model": model,
            "data": data, "folder": tmp / "folder",
        }[out_kind]  # fmt: skip
        argv = [model, "--arch", "digits_cnn", *flags, "--out", out]
        if with_data:
            argv += ["--data", data]
        if with_calib:
            torch.save({"images": torch.rand(24, 1, 8, 8)}, tmp / "calib.pt")
            argv += ["--calib", tmp / "calib.pt"]
        before = snapshot(tmp)
        code, stdout, err = run_cli(capsys, argv)
        if code == 0:
            # data.pt is an input only with --data; otherwise it is a file --force may replace
            writable = ("fresh", "existing") if with_data else ("fresh", "existing", "data")
            assert out_kind in writable, "an input or a folder was written over"
            restored = load_decoupled(build_model("digits_cnn"), out)  # verifies the manifest
            assert restored(torch.rand(2, 1, 8, 8)).shape == (2, 10)
            for name in ("digits.pt", "digits_data.pt"):
                if name != Path(out).name:  # data.pt may be the output (--force, no --data)
                    assert snapshot(tmp)[name] == before[name], f"input {name} changed"
        else:  # 3: a target out of reach, or a plan that wrecks the random model
            assert_refused(code, stdout, err, None, codes=(2, 3))
            assert snapshot(tmp) == before, "a refused run wrote or changed files"


@pytest.mark.parametrize("after_s", [0.5, 2.0, 4.0])
def test_kill_9_during_a_forced_run_loses_nothing(tmp_path: Path, after_s: float) -> None:
    """Whenever the kill lands, the next load sees one whole set: the old one (rolled back, or
    never touched) or the new one (rolled forward), and no staging folder is left."""
    import signal
    import time

    model = digits_sd(tmp_path)
    argv = [
        sys.executable,
        "-m",
        "decouple",
        model,
        "--arch",
        "digits_cnn",
        "--out",
        tmp_path / "o.pt",
    ]
    env = {**os.environ, "PYTHONPATH": str(TESTS_DIR)}
    first = subprocess.run(
        [*map(str, argv), "--rank", "2"], capture_output=True, timeout=300, env=env
    )
    assert first.returncode == 0, first.stderr
    old = {p.name: p.read_bytes() for p in tmp_path.glob("o.*")}
    proc = subprocess.Popen([*map(str, argv), "--rank", "3", "--force"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(after_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    restored = load_decoupled(build_model("digits_cnn"), tmp_path / "o.pt")  # recovers first
    assert restored(torch.rand(2, 1, 8, 8)).shape == (2, 10)
    assert not list(tmp_path.glob(".*staging*")), "recovery left a staging folder"
    now = {p.name: p.read_bytes() for p in tmp_path.glob("o.*")}
    if now["o.pt"] == old["o.pt"]:  # the old set, whole
        assert now == old
    else:  # the new set, whole: the recipe says rank 3
        assert json.loads(now["o.recipe.json"])["layers"]["conv2"]["rank"] == 3
