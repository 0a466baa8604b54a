"""The CIFAR ResNet zoo entry: any 6n+2 depth by name, and the real shared checkpoints."""

import pytest
import torch

from decouple import DecoupleConfig
from decouple.io.checkpoint import load_model
from decouple.io.evaluate import evaluate
from decouple.io.images import load_cifar10_exact, load_cifar10_jpeg
from decouple.models import build_model, get_model_info
from decouple.pipeline import compress_

BATCH = "test_batch.truncated_first_3145728_bytes"


@pytest.mark.parametrize("depth", [8, 14, 20, 44])
def test_any_depth_builds_by_name_and_traces(depth):
    model = build_model(f"cifar_resnet{depth}").eval()
    n = (depth - 2) // 6
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 1 + 6 * n  # stem + two per block
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.fx.symbolic_trace(model)
    assert get_model_info(f"cifar_resnet{depth}").meta["std"] == (0.229, 0.224, 0.225)


def test_invalid_depth_is_refused():
    with pytest.raises(KeyError, match="6n\\+2"):
        get_model_info("cifar_resnet21")


@pytest.mark.parametrize(
    "name,file,correct",
    [
        ("cifar_resnet20", "resnet20-12fca82f.th", 932),
        ("cifar_resnet32", "resnet32-d509ac18.th", 944),
    ],
)
def test_shared_checkpoints_load_and_reach_published_accuracy(cifar_assets, name, file, correct):
    model, shape, kind = load_model(cifar_assets / file, name)
    assert shape == (3, 32, 32) and kind == "state_dict"
    raw = torch.load(cifar_assets / file, map_location="cpu", weights_only=True)["state_dict"]
    assert sum(v.numel() for k, v in raw.items() if "running" not in k) == sum(
        p.numel() for p in model.parameters()
    )
    data = load_cifar10_exact(cifar_assets / BATCH)
    meta = get_model_info(name).meta
    acc = evaluate(model, data.as_float(meta["mean"], meta["std"]), data.labels)
    print(f"{name}: {round(acc['top1'] * len(data))}/{len(data)} = {100 * acc['top1']:.2f} %")
    assert round(acc["top1"] * len(data)) == correct  # the assets README's measurement


def test_calibrated_budget_keeps_resnet20_accurate(cifar_assets):
    """The issue's bar, in miniature: half the FLOPs, 256 calibration images, small loss."""
    model, _, _ = load_model(cifar_assets / "resnet20-12fca82f.th", "cifar_resnet20")
    meta = get_model_info("cifar_resnet20").meta
    test = load_cifar10_exact(cifar_assets / BATCH)
    calib = load_cifar10_jpeg(
        cifar_assets / "cifar10_test_jpeg_q75_YoongiKim.tar", min_index=1017, limit=256
    )
    x = test.as_float(meta["mean"], meta["std"])
    before = evaluate(model, x, test.labels)["top1"]
    result = compress_(
        model,
        DecoupleConfig(order="dw-pw", fold_bn=True),
        (3, 32, 32),
        target_flops=0.5,
        calib_images=calib.as_float(meta["mean"], meta["std"]),
    )
    after = evaluate(model, x, test.labels)["top1"]
    assert result.allocation.total_flops <= result.allocation.target_flops
    assert after > before - 0.03, (before, after)
