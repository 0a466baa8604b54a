"""save_decoupled writes the CLI's output set; load_decoupled reads it back bit for bit; a
decoupled file given as an original is named as such."""

import json

import pytest
import torch

from decouple.io.checkpoint import load_decoupled, load_model
from decouple.io.errors import InputError
from decouple.io.manifest import verify_manifest
from decouple.io.save import save_decoupled
from decouple.models import build_model
from decouple.report import build_report
from decouple.surgery.config import DecoupleConfig
from decouple.surgery.rewrite import decouple_

X = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))


def decoupled(**kw):
    model = build_model("digits_cnn").eval()
    original = build_model("digits_cnn").eval()
    original.load_state_dict(model.state_dict())
    config = DecoupleConfig(rank=2, **kw)
    return original, model, decouple_(model, config), config


@pytest.mark.parametrize("with_records", [True, False])
def test_save_then_load_is_bit_identical(tmp_path, with_records):
    original, model, records, config = decoupled(include_stem=True)
    path = tmp_path / "net.decoupled.pt"
    args = (records, config) if with_records else ()
    paths = save_decoupled(model, path, *args)
    assert list(paths) == ["model", "recipe", "manifest"]
    assert paths["recipe"].name == "net.decoupled.recipe.json"
    assert paths["manifest"].name == "net.decoupled.manifest.json"
    verify_manifest(paths["manifest"])
    recipe = json.loads(paths["recipe"].read_text())
    assert recipe["folded_bn"] and recipe["layers"]
    fresh = load_decoupled(build_model("digits_cnn"), path)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))


def test_existing_files_need_force_and_a_report_is_written(tmp_path):
    original, model, records, config = decoupled()
    path = tmp_path / "net.pt"
    save_decoupled(model, path, records, config)
    with pytest.raises(InputError, match="output exists"):
        save_decoupled(model, path, records, config)
    report = build_report(original, model, records, (1, 28, 28))
    paths = save_decoupled(model, path, records, config, report=report, force=True)
    assert [p.name for p in paths.values()] == [
        "net.pt", "net.recipe.json", "net.report.json", "net.report.md", "net.manifest.json"
    ]  # fmt: skip
    verify_manifest(paths["manifest"])
    assert json.loads(paths["report"].read_text())["output"]["inputs"].startswith("8 random")
    with pytest.raises(TypeError, match="report"):
        save_decoupled(model, path, records, config, report="text", force=True)


def test_a_decoupled_file_given_as_the_original_is_named(tmp_path):
    _, model, records, config = decoupled()
    path = tmp_path / "net.decoupled.pt"
    save_decoupled(model, path, records, config)
    with pytest.raises(InputError) as info:
        load_model(path, "digits_cnn")
    message = str(info.value)
    assert message.startswith(f"{path} is already decoupled (written by decouple: 3 factored")
    assert "decouple.load_decoupled(model, " in message
    other = tmp_path / "other.pt"  # weights that merely do not fit: the usual message
    torch.save({"weight": torch.zeros(3)}, other)
    with pytest.raises(InputError, match="do not match"):
        load_model(other, "digits_cnn")
