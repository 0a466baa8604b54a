"""The accuracy side of the CLI: --data, --calib, --target-flops, --criterion, --refit."""

from __future__ import annotations

import json

import pytest
import torch

from decouple.cli.run import main


@pytest.fixture
def files(tmp_path):
    """A small_cnn state_dict, labelled images and unlabelled calibration images (3×8×8)."""
    import tiny_archs

    tiny_archs.write_small_cnn_files(tmp_path, 40)
    return tmp_path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def base_args(tmp):
    return [tmp / "net.pt", "--arch", "tiny_archs:small_cnn", "--input-shape", "3,8,8"]


def test_budget_without_data(files, capsys):
    code, out, err = run(capsys, *base_args(files), "--target-flops", "0.6")
    assert code == 0, err
    report = json.loads((files / "net.decoupled.report.json").read_text())
    alloc = report["allocation"]
    assert alloc["criterion"] == "energy" and alloc["planned_flops"] <= alloc["target_flops"]
    assert report["totals"]["flops_after"] == alloc["planned_flops"]
    assert "budget:" in out
    layers = {r["name"]: r for r in report["layers"]}
    assert all(
        r["reason"] == alloc["reasons"][n] for n, r in layers.items() if n in alloc["reasons"]
    )


def test_default_calibration_size_follows_the_image_size(monkeypatch, files, capsys):
    """By default calibration takes as many images as 512 at 224x224 hold pixels, within
    [512, 2048]: small images get more (their layers see few positions each)."""
    from decouple.cli import inputs

    sizes = [inputs.default_calib_size((3, s, s)) for s in (8, 32, 112, 128, 160, 224, 384)]
    assert sizes[:3] == [2048] * 3 and sizes[-2:] == [512, 512]
    assert 512 < sizes[4] < sizes[3] < 2048  # 1003 and 1568: fewer as images grow
    monkeypatch.setattr(inputs, "CALIB_SIZES", (8, 30))  # the 8x8 images get the most: 30 of 40
    code, _, err = run(capsys, *base_args(files), "--rank", "1", "--calib", files / "calib.pt")
    assert code == 0, err
    report = json.loads((files / "net.decoupled.report.json").read_text())
    assert report["calibration_images"] == 30


@pytest.mark.parametrize("refit", ["auto", "last", "alternating"])
def test_data_and_calibration(files, capsys, refit):
    code, out, err = run(
        capsys,
        *base_args(files),
        "--include-stem",  # conv "0" reads 3 channels: a stem, kept by default
        "--rank",
        "1",
        "--data",
        files / "data.pt",
        "--calib",
        files / "calib.pt",
        "--calib-size",
        "24",
        "--refit",
        refit,
    )
    assert code == 0, err
    report = json.loads((files / "net.decoupled.report.json").read_text())
    assert report["calibration_images"] == 24
    assert {c["name"] for c in report["calibration"]} == {"0", "3"}
    if refit != "auto":
        assert {c["mode"] for c in report["calibration"]} == {refit}
    acc = report["accuracy"]
    assert acc["before"]["n"] == acc["after"]["n"] == 40
    assert "accuracy:" in out and "calibration:" in out
    # the change comes with its paired interval, from the images only one model gets right
    p = acc["paired"]
    assert p["n"] == 40 and p["low"] <= p["change"] <= p["high"]
    assert p["change"] == pytest.approx(acc["after"]["top1"] - acc["before"]["top1"])
    assert f"{p['fixed']:,} images fixed, {p['broken']:,} broken" in out


def test_data_criterion_needs_and_uses_calibration(files, capsys):
    code, _, err = run(
        capsys,
        *base_args(files),
        "--target-flops",
        "0.6",
        "--criterion",
        "data",
        "--calib",
        files / "calib.pt",
    )
    assert code == 0, err
    report = json.loads((files / "net.decoupled.report.json").read_text())
    assert report["allocation"]["criterion"] == "data"


@pytest.mark.parametrize(
    "extra,expect",
    [
        (["--target-flops", "0"], "--target-flops"),
        (["--target-flops", "1.5"], "--target-flops"),
        (["--target-flops", "0.5", "--criterion", "data"], "--calib"),
        (["--rank", "2", "--target-flops", "0.5"], "not allowed with"),
        (["--rank", "2", "--calib-size", "0", "--calib", "CALIB"], "--calib-size"),
        (["--rank", "2", "--data", "MISSING"], "no such file"),
        (["--rank", "2", "--data", "CALIB"], "no labels"),
        (["--rank", "2", "--data", "WRONGSHAPE"], "shape"),
        (["--rank", "2", "--refit", "best"], "invalid choice"),
        (["--rank", "2", "--mean", "a,b", "--data", "DATA"], "--mean"),
    ],
)
def test_bad_accuracy_options(files, capsys, extra, expect):
    torch.save(
        {"images": torch.zeros(4, 3, 5, 5, dtype=torch.uint8), "labels": torch.zeros(4)},
        files / "wrong.pt",
    )
    names = {
        "CALIB": files / "calib.pt",
        "MISSING": files / "nope.pt",
        "DATA": files / "data.pt",
        "WRONGSHAPE": files / "wrong.pt",
    }
    before = sorted(p.name for p in files.iterdir())
    code, out, err = run(capsys, *base_args(files), *[names.get(e, e) for e in extra])
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert expect in err, err
    assert sorted(p.name for p in files.iterdir()) == before


@pytest.mark.slow
def test_cifar_resnet20_end_to_end(cifar_assets, tmp_path, capsys):
    """The real checkpoint, half the FLOPs, calibrated on JPEGs that never touch the test images:
    the README's command, every method priced (about 15 s on one core)."""
    code, out, err = run(
        capsys,
        cifar_assets / "resnet20-12fca82f.th",
        "--arch",
        "cifar_resnet20",
        "--target-flops",
        "0.5",
        "--data",
        cifar_assets / "test_batch.truncated_first_3145728_bytes",
        "--calib",
        cifar_assets / "cifar10_test_jpeg_q75_YoongiKim.tar",
        "--calib-size",
        "64",
        "--out",
        tmp_path / "r20.pt",
    )
    assert code == 0, err
    report = json.loads((tmp_path / "r20.report.json").read_text())
    assert report["totals"]["flops_ratio"] >= 2.0
    before, after = report["accuracy"]["before"]["top1"], report["accuracy"]["after"]["top1"]
    assert round(before * 1017) == 932 and after > before - 0.03
    assert report["calibration_images"] == 64


@pytest.mark.parametrize("depth", [14, 26])
def test_other_cifar_depths_in_the_checkpoint_format(tmp_path, capsys, depth):
    """A depth not in ../shared, saved as the shared checkpoints are: DataParallel keys in a dict.
    (Network decoupling only: pricing CP on random kernels would take most of the test's time.)"""
    from decouple.models import build_model

    torch.manual_seed(depth)
    model = build_model(f"cifar_resnet{depth}")
    state = {f"module.{k}": v for k, v in model.state_dict().items() if "num_batches" not in k}
    torch.save({"state_dict": state, "best_prec1": 0.0}, tmp_path / f"resnet{depth}.th")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (24, 3, 32, 32), generator=g, dtype=torch.uint8)
    torch.save({"images": images[:8], "labels": torch.arange(8)}, tmp_path / "data.pt")
    torch.save({"images": images[8:]}, tmp_path / "calib.pt")  # never the evaluation images
    code, out, err = run(
        capsys,
        tmp_path / f"resnet{depth}.th",
        "--arch",
        f"cifar_resnet{depth}",
        "--target-flops",
        "0.5",
        "--method",
        "nd",
        "--data",
        tmp_path / "data.pt",
        "--calib",
        tmp_path / "calib.pt",
        "--calib-size",
        "16",
    )
    assert code == 0, err
    report = json.loads((tmp_path / f"resnet{depth}.decoupled.report.json").read_text())
    assert report["allocation"]["reached"] and report["totals"]["flops_ratio"] >= 2.0
    changed = sum(r["action"] in ("decoupled", "pruned") for r in report["layers"])
    assert len(report["calibration"]) == changed  # a pruned chain: its consumer is refit


def test_a_budget_with_calibration_prices_every_method(files, capsys):
    args = [*base_args(files), "--target-flops", "0.6", "--calib", files / "calib.pt"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads((files / "net.decoupled.report.json").read_text())
    assert report["config"]["method"] == "auto"
    alloc = report["allocation"]
    assert alloc["criterion"] == "output" and alloc["planned_flops"] <= alloc["target_flops"]
    assert set(alloc["methods"]) == set(alloc["ranks"])
    for name, label in alloc["methods"].items():
        layer = next(r for r in report["layers"] if r["name"] == name)
        assert (label == "keep") == (layer["action"] not in ("decoupled", "pruned"))


def test_max_change_keeps_predictions_and_says_what_it_reached(files, capsys):
    args = [*base_args(files), "--max-change", "25", "--calib", files / "calib.pt"]
    args += ["--data", files / "data.pt"]
    code, out, err = run(capsys, *args)
    assert code == 0, err
    report = json.loads((files / "net.decoupled.report.json").read_text())
    change = report["max_change"]
    assert change["reached"] and change["changed_pct"] <= 25
    assert change["measured_on"] == 10 and change["decided_on"] == 30  # 40 images, every 4th
    kept = [t for t in change["tries"] if t["within"]]
    assert min(t["cost_ratio"] for t in kept) == pytest.approx(change["cost_ratio"], abs=1e-4)
    assert change["cost_ratio"] == pytest.approx(
        report["totals"]["flops_after"] / report["totals"]["flops_before"], abs=1e-4
    )
    assert "max change: top-1 differs" in out and "accuracy: top-1" in out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-change", "1"], "pass --calib"),
        (["--max-change", "100", "--calib", "calib.pt"], "percentage in [0, 100)"),
        (["--method", "auto", "--rank", "2"], "--method auto chooses per layer under a budget"),
        (["--criterion", "output", "--target-flops", "0.5"], "--criterion output measures"),
    ],
)
def test_budget_flags_are_checked(files, capsys, extra, message):
    extra = [files / e if e == "calib.pt" else e for e in extra]
    code, out, err = run(capsys, *base_args(files), *extra)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (files / "net.decoupled.pt").exists()


@pytest.mark.parametrize("flag", [None, "--no-prune", "--no-distill-head"])
def test_a_budget_with_calibration_prunes_unread_channels_and_reloads(files, capsys, flag):
    """The linear layer reads 4 of the conv's 16 channels: with --calib the plan prunes the
    rest (exact), the report says so, and the output set reloads; --no-prune keeps them; the
    pruned head is distilled unless --no-distill-head."""
    import tiny_archs

    from decouple.io.checkpoint import load_decoupled

    torch.manual_seed(0)
    model = tiny_archs.pooled_head().eval()
    with torch.no_grad():
        model[6].weight[:, 4:] = 0
    torch.save(model.state_dict(), files / "head.pt")
    args = [files / "head.pt", "--arch", "tiny_archs:pooled_head", "--input-shape", "3,8,8",
            "--target-flops", "0.5", "--calib", files / "calib.pt"]  # fmt: skip
    code, out, err = run(capsys, *args, *([flag] if flag else []))
    assert code == 0, err
    report = json.loads((files / "head.decoupled.report.json").read_text())
    layers = {r["name"]: r for r in report["layers"]}
    if flag == "--no-prune":
        assert all(r["action"] != "pruned" for r in layers.values())
        return
    assert layers["2"]["action"] == "pruned" and layers["2"]["method"] == "prune"
    assert ("head_distillation" in report) == (flag is None)
    assert ("head distillation: " in out) == (flag is None)
    assert "refit on the" in layers["6"]["reason"]
    assert report["totals"]["layers_pruned"] == 1 and "pruned the channels of 1" in out
    recipe = json.loads((files / "head.decoupled.recipe.json").read_text())
    assert recipe["pruned"]["2"]["consumer"] == "6"
    fresh = load_decoupled(tiny_archs.pooled_head(), files / "head.decoupled.pt")
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(fresh(x), model(x), atol=1e-4)
