"""A new user's first hour, following only the README and ``--help``: where outputs go, ``--skip``,
stems, whole modules without ``--input-shape``, what the output check ran on, a fast ``--help``,
"did you mean", decouple's own files, and progress when piped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import cli
from torch import nn

from decouple.cli.flags import skip_patterns
from decouple.cli.model_checks import infer_input_shape
from decouple.models import build_model


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def digits_sd(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "digits.pt"
    torch.save(build_model("digits_cnn").eval().state_dict(), path)
    return path


def report_of(path: Path) -> dict:
    return json.loads(path.read_text())


# 1. outputs default to the current folder, never the model's


def test_outputs_go_to_the_current_folder_not_beside_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    shared, here = tmp_path / "shared", tmp_path / "here"
    shared.mkdir(), here.mkdir()
    torch.save(build_model("digits_cnn").state_dict(), shared / "digits.pt")
    monkeypatch.chdir(here)
    code, out, err = cli(capsys, shared / "digits.pt", "--arch", "digits_cnn", "--rank", "2")
    assert code == 0, err
    assert [p.name for p in shared.iterdir()] == ["digits.pt"], "wrote into the model's folder"
    assert sorted(p.name for p in here.iterdir()) == sorted(
        f"digits.decoupled{s}"
        for s in (".pt", ".recipe.json", ".report.json", ".report.md", ".manifest.json")
    )
    assert f"wrote model    {here / 'digits.decoupled.pt'}" in out


# 2. --skip: one pattern (or comma list) per use; a pattern matching nothing is an error


def test_skip_patterns_split_on_commas_outside_braces() -> None:
    assert skip_patterns(["conv1"]) == ["conv1"]
    assert skip_patterns(["conv1,fc", "layer{1,2}\\..*"]) == ["conv1", "fc", "layer{1,2}\\..*"]
    assert skip_patterns(["a{1,2},b , c"]) == ["a{1,2}", "b", "c"]


def test_skip_before_model_does_not_swallow_it(digits_sd: Path, capsys) -> None:
    argv = ["--skip", "conv[13]{1},conv4", digits_sd, "--arch", "digits_cnn", "--rank", "2"]
    code, out, err = cli(capsys, *argv)
    assert code == 0, err
    layers = {r["name"]: r for r in report_of(Path("digits.decoupled.report.json"))["layers"]}
    assert all(layers[n]["reason"] == "skipped by override" for n in ("conv1", "conv3", "conv4"))
    assert layers["conv2"]["action"] == "decoupled"


def test_a_skip_that_matches_no_layer_names_the_nearest(digits_sd: Path, capsys) -> None:
    code, out, err = cli(capsys, digits_sd, "--arch", "digits_cnn", "--rank", "2", "--skip", "cnv2")
    assert code == 2 and out == ""
    assert one_line(err).startswith(
        "decouple: error: --skip 'cnv2' matches no conv or linear layer of the model (nearest: conv2, "
    )
    assert not list(Path.cwd().glob("digits.decoupled*"))


def test_a_config_override_that_matches_no_layer_is_an_error(digits_sd: Path, capsys) -> None:
    config = Path("c.json")
    config.write_text(json.dumps({"overrides": {"conv2": 2, "layer4\\..*": "skip"}}))
    code, _, err = cli(capsys, digits_sd, "--arch", "digits_cnn", "--config", config)
    assert code == 2
    assert "--config c.json: override 'layer4\\..*' matches no conv or linear layer" in one_line(
        err
    )


# 3. --include-stem


def test_include_stem_decouples_the_stem(digits_sd: Path, capsys) -> None:
    from decouple import DecoupleConfig

    if "include_stem" not in DecoupleConfig.__dataclass_fields__:
        pytest.skip("DecoupleConfig.include_stem is not there yet")
    args = [digits_sd, "--arch", "digits_cnn", "--rank", "2"]
    assert cli(capsys, *args)[0] == 0
    by_default = report_of(Path("digits.decoupled.report.json"))
    assert cli(capsys, *args, "--include-stem", "--force")[0] == 0
    included = report_of(Path("digits.decoupled.report.json"))
    assert by_default["layers"][0]["reason"].startswith("kept: stem")  # conv1 reads 1 channel
    assert included["layers"][0]["action"] == "decoupled"
    assert included["config"]["include_stem"] is True


# 4. a whole module without --input-shape


def test_a_whole_module_without_input_shape_infers_it(tmp_path: Path, capsys) -> None:
    torch.save(build_model("digits_cnn").eval(), tmp_path / "whole.pt")
    code, out, err = cli(capsys, tmp_path / "whole.pt", "--trust-pickle", "--rank", "2")
    assert code == 0, err
    line = "input shape: (1, 8, 8) inferred from the first conv's 1 input channel and 8x8 "
    assert out.startswith(line) and out.splitlines()[0].endswith(
        "; pass --input-shape to change it"
    )
    note = report_of(Path("whole.decoupled.report.json"))["input_shape_note"]
    assert note.endswith("8x8 for DigitsCNN, of decouple's zoo")


def test_the_inferred_size_follows_the_models_family() -> None:
    tv = pytest.importorskip("torchvision")
    assert infer_input_shape(tv.models.resnet18())[0] == (3, 224, 224)
    assert "torchvision" in infer_input_shape(tv.models.resnet18())[1]
    assert infer_input_shape(build_model("cifar_resnet20"))[0] == (3, 32, 32)
    mine = nn.Sequential(nn.Conv2d(5, 4, 3))
    shape, note = infer_input_shape(mine)
    assert shape == (5, 224, 224) and "guess" in note
    assert infer_input_shape(nn.Sequential(nn.Linear(2, 2))) is None


# 5. the output check uses the given images, and says which


def _images(path: Path, n: int, labelled: bool) -> Path:
    g = torch.Generator().manual_seed(n)
    images = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    torch.save({"images": images, **({"labels": torch.arange(n) % 10} if labelled else {})}, path)
    return path


@pytest.mark.parametrize(
    ("given", "phrase"),
    [
        ((), "8 random Gaussian inputs (no images given)"),
        (("--data",), "the first 12 --data images, not used to fit"),
        (("--data", "--calib"), "the first 12 --data images, not used to fit"),
        (("--calib",), "the first 20 --calib images (also used to fit: not held out)"),
    ],
    ids=["none", "data", "data-and-calib", "calib"],
)
def test_the_output_check_says_which_images(given, phrase, digits_sd: Path, capsys) -> None:
    argv = [digits_sd, "--arch", "digits_cnn", "--rank", "2", "--refit", "none"]
    if "--data" in given:
        argv += ["--data", _images(Path("data.pt"), 12, labelled=True)]
    if "--calib" in given:
        argv += ["--calib", _images(Path("calib.pt"), 20, labelled=False)]
    code, _, err = cli(capsys, *argv)
    assert code == 0, err
    assert report_of(Path("digits.decoupled.report.json"))["output_check_inputs"] == phrase


# 6. a fast start: --help, --version and argument errors import neither torch nor tensorly

_PROBE = """
import sys
from decouple.cli.run import main
try:
    code = main(sys.argv[1:])
except SystemExit as e:
    code = e.code
heavy = sorted(m for m in ("torch", "tensorly") if m in sys.modules)
print("HEAVY", heavy, "CODE", code)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["m.pt", "--rnak", "2"]])
def test_help_version_and_typos_import_no_torch(argv: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "DECOUPLE_DEBUG"}
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, env=env, timeout=60
    )
    assert "HEAVY [] CODE" in proc.stdout, proc.stdout + proc.stderr
    if argv == ["--version"]:
        assert proc.stdout.startswith("decouple 0.1.0\n")


def test_version_without_torch() -> None:
    code = "import sys, decouple; print(decouple.__version__, 'torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.split() == ["0.1.0", "False"], proc.stderr


def test_the_parsers_copies_equal_the_librarys_constants() -> None:
    import decouple
    from decouple.calibrate.layerwise import REFIT_MODES
    from decouple.cli import parser
    from decouple.factor.nd import ORDERS
    from decouple.plan.losses import CRITERIA
    from decouple.runtime.latency import LAYER_TABLES, RUNTIMES
    from decouple.surgery.checks import AUTO
    from decouple.surgery.methods import METHODS

    assert parser.REFIT_MODES == REFIT_MODES and parser.ORDERS == ORDERS
    assert parser.CRITERIA == CRITERIA and parser.RUNTIMES == RUNTIMES
    assert parser.LAYER_TABLES == LAYER_TABLES
    assert parser.AUTO == AUTO and parser.METHODS == METHODS
    assert parser.VERSION == decouple.__version__


def test_the_lazy_facade_keeps_its_names() -> None:
    import decouple

    assert all(hasattr(decouple, name) for name in decouple.__all__)
    assert set(decouple.__all__) <= set(dir(decouple))
    with pytest.raises(AttributeError):
        decouple.no_such_name  # noqa: B018


# 7. did you mean


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["m.pt", "--rnak", "2"], "unrecognized arguments: --rnak (did you mean --rank?)"),
        (
            ["m.pt", "--method", "tuker"],
            "(choose from 'nd', 'cp', 'tucker', 'svd', 'auto'); did you mean tucker?",
        ),  # fmt: skip
        (["m.pt", "--order", "pwdw"], "did you mean pw-dw?"),
    ],
)
def test_did_you_mean(argv: list[str], message: str, capsys) -> None:
    code, out, err = cli(capsys, *argv)
    assert code == 2 and out == "" and message in one_line(err)


# 8. decouple's own output


def test_a_decoupled_state_dict_is_recognised(digits_sd: Path, capsys) -> None:
    args = ["--arch", "digits_cnn", "--rank", "2"]
    assert cli(capsys, digits_sd, *args)[0] == 0
    code, _, err = cli(capsys, "digits.decoupled.pt", *args, "--out", "again.pt")
    assert code == 2
    assert one_line(err).startswith("decouple: error: digits.decoupled.pt is already decoupled")
    assert "decouple.load_decoupled" in err
    Path("digits.decoupled.recipe.json").unlink()  # the keys alone tell too
    code, _, err = cli(capsys, "digits.decoupled.pt", *args, "--out", "again.pt")
    assert code == 2 and "is already decoupled (written by decouple: it has" in one_line(err)


def test_a_decoupled_whole_module_is_recognised(tmp_path: Path, capsys) -> None:
    torch.save(build_model("digits_cnn").eval(), tmp_path / "whole.pt")
    argv = ["--trust-pickle", "--rank", "2", "--input-shape", "1,8,8", "--include-stem"]
    assert cli(capsys, tmp_path / "whole.pt", *argv)[0] == 0
    code, _, err = cli(capsys, "whole.decoupled.pt", *argv, "--out", "again.pt")
    assert code == 2
    assert one_line(err) == (
        "decouple: error: whole.decoupled.pt is already decoupled (written by decouple: it has 4 "
        "factored layers); decouple the original model, or load this one with torch.load"
    )


# 9. progress when piped: on by default, on stderr only; --quiet turns it off


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_is_on_unless_quiet_and_stdout_stays_clean(
    quiet: bool, digits_sd: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import decouple.pipeline

    seen = {}
    real = decouple.pipeline.compress_

    def spy(*args, **kwargs):
        seen["progress"] = kwargs["progress"]
        return real(*args, **kwargs)

    monkeypatch.setattr(decouple.pipeline, "compress_", spy)
    argv = [
        digits_sd,
        "--arch",
        "digits_cnn",
        "--rank",
        "2",
        "--data",
        _images(Path("d.pt"), 8, True),
    ]
    code, out, err = cli(capsys, *argv, *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert seen["progress"] is not quiet
    assert out.splitlines()[0].split()[:2] == ["layer", "shape"]  # the report, nothing before it
    assert "evaluate" not in out and "calibrate" not in out
    if quiet:
        assert err == ""
