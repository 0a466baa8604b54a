"""``--arch``: every torchvision builder is called so that nothing is downloaded, each family
gets its input shape and says where it came from, ``package.module:callable`` is found in the
current folder (also from the ``decouple`` console script), and a model whose input size is only
a guess takes its shape from the ``--data``/``--calib`` images.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
from test_cli import assert_one_line_error, cli
from torch import nn

from decouple.io.checkpoint import build_arch
from decouple.io.errors import InputError
from decouple.io.torchvision_archs import torchvision_family, torchvision_input_shape
from decouple.models import build_model

tv = pytest.importorskip("torchvision")
ALL = tv.models.list_models()
WITH_BACKBONE = {*tv.models.list_models(tv.models.detection), *tv.models.list_models(tv.models.segmentation)}  # fmt: skip
QUANTIZED = tv.models.list_models(tv.models.quantization)

# A user's architecture file, as it sits beside the model.
MODULE = """from torch import nn


def build():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, WIDTH, 3, padding=1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    )
"""


def write_module(folder: Path, name: str, width: int = 8) -> Path:
    path = folder / f"{name}.py"
    path.write_text(MODULE.replace("WIDTH", str(width)))
    return path


def save_user_model(folder: Path, name: str) -> Path:
    """``folder/name.py`` and the state_dict of its ``build()`` in ``folder/net.pt``."""
    write_module(folder, name)
    torch.save(build_arch(f"{name}:build")[0].state_dict(), folder / "net.pt")
    return folder / "net.pt"


@pytest.fixture(autouse=True)
def _forget_user_modules():
    """The modules these tests write are dropped afterwards: each test imports its own."""
    yield
    for k in [k for k in sys.modules if k.startswith("mymodels")]:
        del sys.modules[k]


@pytest.fixture
def no_downloads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every way torchvision fetches weights fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to download {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(torch.hub, "urlopen", refuse, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(tv.models._api.WeightsEnum, "get_state_dict", refuse)


# 1. torchvision builders: never a download


def test_every_torchvision_builder_gets_no_weights(monkeypatch, no_downloads) -> None:
    """Building all ~120 models takes about 2 minutes and 3 GB; each builder is recorded instead
    (its real signature decides the arguments), and a few build for real below."""
    real, calls = tv.models.get_model_builder, {}

    def recording(name: str):
        @functools.wraps(real(name))  # keeps the signature build_arch reads
        def record(**kwargs):
            calls[name] = kwargs
            return nn.Sequential(nn.Conv2d(3, 4, 3))

        return record

    monkeypatch.setattr(tv.models, "get_model_builder", recording)
    for name in ALL:
        build_arch(name)
    assert sorted(calls) == sorted(ALL) and len(ALL) > 100
    for name, kwargs in calls.items():
        params = inspect.signature(real(name)).parameters
        inspect.signature(real(name)).bind(**kwargs)  # only arguments the builder takes
        weights = {p for p in params if p.startswith("weights")}
        assert "weights" in weights, name
        assert {k: kwargs[k] for k in weights} == dict.fromkeys(weights), name
        assert kwargs.get("quantize") is (False if "quantize" in params else None), name
    assert {n for n, kw in calls.items() if "weights_backbone" in kw} == WITH_BACKBONE
    assert len(WITH_BACKBONE) >= 15 and {"deeplabv3_resnet50", "fasterrcnn_resnet50_fpn"} <= set(
        WITH_BACKBONE
    )
    assert QUANTIZED and all(calls[n]["quantize"] is False for n in QUANTIZED)


@pytest.mark.parametrize(
    "name, family, shape",
    [
        ("deeplabv3_resnet50", "segmentation", (3, 520, 520)),  # downloaded its backbone before
        ("retinanet_resnet50_fpn", "detection", (3, 800, 800)),
        ("ssdlite320_mobilenet_v3_large", "detection", (3, 320, 320)),
        ("resnet18", "classification", (3, 224, 224)),
        ("quantized_mobilenet_v2", "classification", (3, 224, 224)),
    ],
)
def test_representative_builds_download_nothing(no_downloads, name, family, shape) -> None:
    model, got = build_arch(name)
    assert torchvision_family(name) == family and got == shape
    assert any(type(m) is nn.Conv2d for m in model.modules())  # float, not quantized


class _StubViT(nn.Module):
    image_size = 224  # what vit_h_14 takes built with weights=None (its weights' crop is 518)


@pytest.mark.parametrize(
    "name, model, shape, said",
    [
        ("inception_v3", nn.Identity(), (3, 299, 299), "Inception_V3_Weights"),
        ("efficientnet_b3", nn.Identity(), (3, 300, 300), "crop of EfficientNet_B3_Weights"),
        ("vit_h_14", _StubViT(), (3, 224, 224), "image_size of _StubViT"),
        ("fcn_resnet50", nn.Identity(), (3, 520, 520), "takes any size"),
        ("fasterrcnn_resnet50_fpn", nn.Identity(), (3, 800, 800), "any input size"),
        ("r3d_18", nn.Identity(), None, "video"),
        ("raft_small", nn.Identity(), None, "optical-flow"),
    ],
)
def test_each_family_says_where_its_shape_comes_from(name, model, shape, said) -> None:
    got, note = torchvision_input_shape(name, model)
    assert got == shape and said in note


def test_a_torchvision_arch_runs_offline_and_prints_where_its_shape_came_from(
    tmp_path: Path, no_downloads, capsys
) -> None:
    torch.manual_seed(0)
    torch.save(tv.models.squeezenet1_1().state_dict(), tmp_path / "sq.pt")
    code, out, err = cli(capsys, tmp_path / "sq.pt", "--arch", "squeezenet1_1", "--rank", "2")
    assert code == 0, err
    assert (
        "input shape: (3, 224, 224) inferred from the crop of SqueezeNet1_1_Weights.IMAGENET1K_V1's "
        "transforms" in out
    )
    report = json.loads((tmp_path / "sq.decoupled.report.json").read_text())
    assert report["input_shape"] == [3, 224, 224] and "SqueezeNet1_1" in report["input_shape_note"]


@pytest.mark.parametrize("name, said", [("mc3_18", "video model"), ("raft_small", "two images")])
def test_video_and_optical_flow_end_with_one_line(tmp_path: Path, name, said, capsys) -> None:
    torch.save(tv.models.get_model(name).state_dict(), tmp_path / "m.pt")
    code, _, err = cli(capsys, tmp_path / "m.pt", "--arch", name, "--rank", "2")
    assert code == 2
    assert_one_line_error(err)
    assert f"--arch {name} is a torchvision" in err and said in err


# 2. package.module:callable from the current folder


def test_module_callable_is_found_in_the_current_folder(monkeypatch, tmp_path: Path) -> None:
    """As with the console script: the current folder is not on sys.path, yet its module is
    found, and sys.path is left as it was."""
    write_module(tmp_path, "mymodels_here")
    off = [p for p in sys.path if p not in ("", ".", os.getcwd())]
    monkeypatch.setattr(sys, "path", off)
    model, shape = build_arch("mymodels_here:build")
    assert shape is None and isinstance(model[0], nn.Conv2d)
    assert sys.path == off and str(tmp_path) not in sys.path


def test_the_console_script_finds_a_module_in_the_current_folder(tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("decouple")
    if not script.is_file():
        pytest.skip("the decouple console script is not installed beside this Python")
    save_user_model(tmp_path, "mymodels_script")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DECOUPLE_DEBUG")}
    argv = ["net.pt", "--arch", "mymodels_script:build", "--rank", "1", "--input-shape", "3,8,8"]
    proc = subprocess.run(
        [script, *argv, "--include-stem", "--quiet"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "net.decoupled.pt").is_file()


def test_the_same_module_name_in_another_folder_is_imported_afresh(monkeypatch, tmp_path) -> None:
    """Two runs in one process, in two folders: the second folder's module, not the first's."""
    for width, folder in ((5, tmp_path / "a"), (6, tmp_path / "b")):
        folder.mkdir()
        write_module(folder, "mymodels_twice", width)
        monkeypatch.chdir(folder)
        model, _ = build_arch("mymodels_twice:build")
        assert model[2].out_channels == width


def test_a_module_that_shadows_one_in_use_is_refused(tmp_path: Path) -> None:
    (tmp_path / "json.py").write_text("def build():\n    raise AssertionError('imported')\n")
    with pytest.raises(InputError, match=r"cannot import --arch json:build: .*json\.py .*rename"):
        build_arch("json:build")
    assert json.dumps([1]) == "[1]"  # the standard library's is still the one in use


# 3. a guessed input shape gives way to the images'


def image_folder(root: Path, size: int) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (size, size), (40 * i, 90, 160)).save(root / label / f"{i}.png")
    return root


@pytest.mark.parametrize("source", ["--data", "--calib"])
def test_a_guessed_shape_comes_from_the_images(tmp_path: Path, source: str, capsys) -> None:
    images = image_folder(tmp_path / "images", 32)
    if source == "--data":  # a state_dict of the user's own architecture
        save_user_model(tmp_path, "mymodels_images")
        argv = ["net.pt", "--arch", "mymodels_images:build"]
    else:  # a whole module of no known family
        torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3)), "net.pt")
        argv = ["net.pt", "--trust-pickle"]
    # rank 1 on random weights wrecks the model: written anyway, this test is about the shape
    argv += ["--allow-miss"]
    code, out, err = cli(capsys, *argv, "--rank", "1", "--include-stem", source, images)
    assert code == 0, err
    said = f"the first {source} image as preprocessing makes it (Sequential is of no known family)"
    assert f"input shape: (3, 32, 32) inferred from {said}" in out
    report = json.loads((tmp_path / "net.decoupled.report.json").read_text())
    assert report["input_shape"] == [3, 32, 32] and report["input_shape_note"] == said


@pytest.mark.parametrize(
    "argv, model_takes",
    [
        (["--arch", "cifar_resnet20"], (3, 32, 32)),  # a known architecture's shape
        (["--arch", "mymodels_given:build", "--input-shape", "3,32,32"], (3, 32, 32)),
    ],
    ids=["known-arch", "input-shape"],
)
def test_images_never_override_a_known_or_given_shape(tmp_path, argv, model_takes, capsys):
    images = image_folder(tmp_path / "images", 16)
    if "cifar_resnet20" in argv:
        torch.save(build_model("cifar_resnet20").state_dict(), tmp_path / "net.pt")
    else:
        save_user_model(tmp_path, "mymodels_given")
    code, _, err = cli(capsys, tmp_path / "net.pt", *argv, "--rank", "1", "--data", images)
    assert code == 2
    assert_one_line_error(err)
    assert f"come out of preprocessing as (3, 16, 16), but the model takes {model_takes}" in err
    assert not (tmp_path / "net.decoupled.pt").exists()
