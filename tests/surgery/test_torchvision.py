"""Real architectures (torchvision, weights=None): full-rank decoupling reproduces their outputs."""

import copy

import pytest
import torch

from decouple import DecoupleConfig, DecoupledConv2d, decouple_

torchvision = pytest.importorskip(
    "torchvision", reason="torchvision is not installed (pip install -e '.[vision]')"
)


def build(name):
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval().double()
    for m in model.modules():  # fresh BNs are identities; make folding do real work
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("name", ["resnet18", "vgg11", "densenet121"])
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_full_rank_reproduces_torchvision_models(name, order):
    model = build(name)
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        # 49 = k² of ResNet's 7×7 stem: full rank everywhere (clipped per layer).
        records = decouple_(model, DecoupleConfig(rank=49, order=order, fold_bn=True))
        got = model(x)
    decoupled = [r for r in records if r.action == "decoupled"]
    assert decoupled and all(
        isinstance(model.get_submodule(r.name), DecoupledConv2d) for r in decoupled
    )
    assert (sum(r.bn_folded is not None for r in records) > 0) == has_bn
    assert (got - expected).norm() / expected.norm() < 1e-9


def test_resnet18_low_rank_is_smaller_and_still_runs():
    model = build("resnet18").float()
    original = copy.deepcopy(model)
    records = decouple_(model, DecoupleConfig(rank=2, fold_bn=True, overrides={"conv1": "skip"}))
    by_name = {r.name: r for r in records}
    assert by_name["conv1"].action == "kept" and by_name["layer1.0.conv1"].rank == 2
    assert by_name["layer2.0.downsample.0"].reason.startswith("1x1 conv (low-rank it with")
    assert sum(p.numel() for p in model.parameters()) < sum(
        p.numel() for p in original.parameters()
    )
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)
