"""ZeroQ images: BatchNorm statistics matched, weights untouched, seeded, refused without BN;
each followed by its mirror."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from decouple.calibrate.layerwise import holdout_mask
from decouple.calibrate.synthetic import bn_statistics_loss, synthesize_images, with_mirrors


def net() -> nn.Module:
    """conv → BN → ReLU → conv → BN whose running statistics come from "training" images far
    from a standard normal (pixels in [0, 2] with a channel tilt), as a trained model's do."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8, momentum=None),
    )  # fmt: skip
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(2 * torch.rand(32, 3, 6, 6) + torch.tensor([0.0, 1.0, -1.0]).view(1, 3, 1, 1))
    return model.eval()


def test_synthesized_images_match_the_running_statistics():
    model = net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, info = synthesize_images(model, (3, 6, 6), count=20, steps=150, batch_size=8, mirror=False)
    assert x.shape == (20, 3, 6, 6) and not x.requires_grad and not info.mirrored
    assert info.count == 20 and info.bn_layers == 2 and info.seconds > 0
    assert info.loss_after < 0.05 * info.loss_before, info
    with torch.no_grad():  # a batch of them alone
        assert float(bn_statistics_loss(model, x[:8])) < 0.05 * info.loss_before
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters()), "requires_grad restored"


def test_the_same_seed_gives_the_same_images_and_another_seed_others():
    model = net()
    a, _ = synthesize_images(model, (3, 6, 6), count=4, steps=5)
    b, _ = synthesize_images(model, (3, 6, 6), count=4, steps=5)
    c, _ = synthesize_images(model, (3, 6, 6), count=4, steps=5, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_each_made_image_is_followed_by_its_mirror():
    model = net()
    made, _ = synthesize_images(model, (3, 6, 6), count=8, steps=5, mirror=False)
    x, info = synthesize_images(model, (3, 6, 6), count=8, steps=5)
    assert info.mirrored and info.count == 8 and x.shape == (16, 3, 6, 6)
    assert torch.equal(x[:8], made) and torch.equal(x[8:], made.flip(-1))
    assert torch.equal(x[8:, :, :, 0], made[:, :, :, -1])  # left-right: the last axis
    assert not torch.equal(x[8:], made)


def test_an_image_and_its_mirror_fall_on_one_side_of_every_held_out_split():
    """8 made: image i's mirror is image i + 8, held out with it at every 2nd, 4th, 8th image."""
    ids = with_mirrors(torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 2, 3).clone())[:, 0, 0, 0]
    for fraction in (1 / 2, 1 / 4, 1 / 8):
        held = holdout_mask(16, fraction)
        assert held.any() and not held.all(), fraction
        for i in range(8):  # both copies of image i: held out together, or calibrated on together
            assert held[ids == i].unique().numel() == 1, (fraction, i)


def test_signals_are_not_mirrored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 4, 3), nn.BatchNorm1d(4)).eval()
    x, info = synthesize_images(model, (2, 12), count=4, steps=2)
    assert x.shape == (4, 2, 12) and not info.mirrored
    with pytest.raises(ValueError, match="at least 2 axes"):
        with_mirrors(torch.zeros(5))


def test_a_model_without_batchnorm_or_in_training_mode_is_refused():
    with pytest.raises(ValueError, match="no BatchNorm"):
        synthesize_images(nn.Sequential(nn.Conv2d(3, 4, 3)).eval(), (3, 6, 6), count=2)
    with pytest.raises(ValueError, match="eval mode"):
        synthesize_images(net().train(), (3, 6, 6), count=2)


def test_the_cli_calibrates_on_synthetic_images_and_says_so(tmp_path, capsys):
    from decouple.cli.run import main
    from decouple.models import build_model

    torch.manual_seed(0)
    model = tmp_path / "digits.pt"
    torch.save(build_model("digits_cnn").eval().state_dict(), model)
    out = tmp_path / "d.pt"
    argv = [str(model), "--arch", "digits_cnn", "--rank", "3", "--quiet", "--out", str(out)]
    code = main([*argv, "--calib", "synthetic:8"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "d.report.json").read_text())
    made = report["synthetic_calibration"]
    assert made["count"] == 8 and made["bn_layers"] == 4 and made["mirrored"]
    assert report["calibration_images"] == 16, "8 made, each also mirrored"
    assert report["calibration"], "the decoupled layers were refit"
    line = "calibration images: 8 synthesized from the model's BatchNorm statistics"
    assert line in captured.out and "each also used mirrored" in captured.out
    # --no-mirror: the same 8 made images (read back from the cache), alone
    assert main([*argv, "--calib", "synthetic:8", "--no-mirror", "--force"]) == 0
    captured = capsys.readouterr()
    report = json.loads((tmp_path / "d.report.json").read_text())
    assert report["calibration_images"] == 8 and not report["synthetic_calibration"]["mirrored"]
    assert report["synthetic_calibration"]["cached"] and "mirrored" not in captured.out
    assert main([*argv, "--calib", "synthetic:0", "--force"]) == 2
    assert "make at least one image" in capsys.readouterr().err


def test_max_change_judges_on_held_out_synthetic_images(tmp_path, capsys):
    from decouple.cli.run import main
    from decouple.models import build_model

    torch.manual_seed(0)
    model = tmp_path / "digits.pt"
    torch.save(build_model("digits_cnn").eval().state_dict(), model)
    out = tmp_path / "d.pt"
    argv = [str(model), "--arch", "digits_cnn", "--max-change", "5", "--calib", "synthetic:16"]
    code = main([*argv, "--quiet", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "d.report.json").read_text())
    change = report["max_change"]
    assert change["measured_on"] + change["decided_on"] == 32  # 16 made and their mirrors
    assert report["synthetic_calibration"]["count"] == 16
    assert change["changed_pct"] <= 5
