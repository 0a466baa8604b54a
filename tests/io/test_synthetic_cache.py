"""The --calib synthetic cache: made once, read back the same, keyed by everything that matters."""

from __future__ import annotations

import copy
import json

import torch

from decouple.io import synthetic_cache
from decouple.models import build_model

SETTINGS = {"count": 8, "seed": 0}


def _model():
    torch.manual_seed(0)
    return build_model("digits_cnn").eval()


def test_the_key_follows_weights_statistics_shape_and_settings():
    m = _model()
    key = synthetic_cache.cache_key(m, (1, 8, 8), SETTINGS)
    assert synthetic_cache.cache_key(copy.deepcopy(m), (1, 8, 8), SETTINGS) == key
    assert synthetic_cache.cache_key(m, (1, 8, 8), SETTINGS | {"seed": 1}) != key
    assert synthetic_cache.cache_key(m, (1, 8, 8), SETTINGS | {"count": 9}) != key
    assert synthetic_cache.cache_key(m, (1, 9, 8), SETTINGS) != key
    for name in m.state_dict():  # every tensor, BatchNorm statistics included
        other = copy.deepcopy(m)
        with torch.no_grad():
            other.state_dict()[name].add_(1)
        assert synthetic_cache.cache_key(other, (1, 8, 8), SETTINGS) != key, name


def test_store_and_load_round_trip_and_a_torn_file_is_a_miss(tmp_path):
    path = tmp_path / "k.pt"
    x = torch.randn(4, 1, 8, 8)
    synthetic_cache.store(path, x, {"count": 4, "seconds": 1.5})
    got, info = synthetic_cache.load(path, 4, (1, 8, 8))
    assert torch.equal(got, x) and info == {"count": 4, "seconds": 1.5}
    assert synthetic_cache.load(path, 5, (1, 8, 8)) is None  # not what was asked for
    path.write_bytes(path.read_bytes()[:100])
    assert synthetic_cache.load(path, 4, (1, 8, 8)) is None
    assert [p.name for p in tmp_path.iterdir()] == ["k.pt"]  # no temporary file left


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DECOUPLE_CACHE", str(tmp_path))
    assert synthetic_cache.cache_dir() == tmp_path / "synthetic"
    monkeypatch.setenv("DECOUPLE_CACHE", "off")
    assert synthetic_cache.cache_dir() is None
    monkeypatch.delenv("DECOUPLE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert synthetic_cache.cache_dir() == tmp_path / "xdg" / "decouple" / "synthetic"


def test_the_cli_reads_its_synthetic_images_back_instead_of_making_them(
    tmp_path, capsys, monkeypatch
):
    from decouple.calibrate import synthetic
    from decouple.cli.run import main

    ckpt = tmp_path / "digits.pt"
    torch.save(_model().state_dict(), ckpt)
    argv = [str(ckpt), "--arch", "digits_cnn", "--rank", "3", "--quiet", "--calib", "synthetic:8"]
    assert main([*argv, "--out", str(tmp_path / "a.pt")]) == 0, capsys.readouterr().err
    cached = list(synthetic_cache.cache_dir().glob("*.pt"))
    assert len(cached) == 1

    def refuse(*args, **kwargs):
        raise AssertionError("made again")

    monkeypatch.setattr(synthetic, "synthesize_images", refuse)
    capsys.readouterr()
    assert main([*argv, "--out", str(tmp_path / "b.pt")]) == 0, capsys.readouterr().err
    assert f"read back from the cache {cached[0]}" in capsys.readouterr().out
    a, b = (json.loads((tmp_path / f"{n}.report.json").read_text()) for n in "ab")
    assert a["synthetic_calibration"]["cached"] is None
    assert b["synthetic_calibration"]["cached"] == str(cached[0])
    assert [c["error_after"] for c in a["calibration"]] == [
        c["error_after"] for c in b["calibration"]
    ]  # the same images, so the same refit

    cached[0].write_bytes(b"torn")  # an unreadable entry is made again (here: refused)
    assert main([*argv, "--out", str(tmp_path / "c.pt")]) != 0
    assert "made again" in capsys.readouterr().err
