"""Tiny architectures for the CLI tests, reachable as ``--arch tiny_archs:NAME``.

Not a test module: ``tests/test_cli.py`` puts this folder on ``sys.path`` (and on ``PYTHONPATH``
for subprocesses). Module classes defined here pickle by reference to ``tiny_archs``.
"""

from __future__ import annotations

import torch
from torch import nn


def small_cnn() -> nn.Module:
    """Two 3×3 convs (one followed by BatchNorm) for 3×H×W inputs; 4 logits."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def pooled_head() -> nn.Module:
    """A stem, a 3×3 conv of 16 channels, global pool, linear: the conv → linear chain can be
    pruned."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


def pointwise_only() -> nn.Module:
    """Only 1×1 convs: nothing that network decoupling applies to."""
    return nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))


def raises() -> nn.Module:
    raise RuntimeError("this builder always fails")


def not_a_module() -> int:
    return 3


class TwoOutputs(nn.Module):
    """A conv net whose forward returns a tuple instead of one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = self.conv(x)
        return y, y.mean()


def exits() -> nn.Module:
    """A builder that calls ``sys.exit`` (a BaseException, not an Exception)."""
    import sys

    sys.exit(0)


def warns_then_raises() -> nn.Module:
    import warnings

    warnings.warn(
        "a library warning that must not add a line to the error", UserWarning, stacklevel=2
    )
    raise ValueError("this builder warns, then fails")


def transposed_only() -> nn.Module:
    """No ``nn.Conv2d`` at all: a transposed convolution only."""
    return nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())


class ShiftedConv(nn.Conv2d):
    """A Conv2d subclass with its own forward: decoupling its weight would change what it does."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + 1.0


def custom_conv_net() -> nn.Module:
    """One plain 3×3 conv and one :class:`ShiftedConv`; 3×8×8 inputs."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        ShiftedConv(8, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )


class DictOutput(nn.Module):
    """A segmentation-like net: ``OrderedDict(out=(B, 4, H, W), aux=(B, 4))``, not logits."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        from collections import OrderedDict

        y = self.head(torch.relu(self.body(x)))
        return OrderedDict(out=y, aux=y.mean((2, 3)))


def dict_output() -> nn.Module:
    return DictOutput()


class NoTensorOutput(nn.Module):
    """A conv net whose forward returns no tensor at all: nothing to compare."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> dict:
        return {"channels": int(self.conv(x).shape[1]), "note": None}


def write_small_cnn_files(folder, n: int) -> None:
    """A seeded small_cnn state_dict (``net.pt``, BN variances away from 1), ``n`` labelled
    3×8×8 images (``data.pt``, 4 classes) and the same images reversed, unlabelled, to
    calibrate on (``calib.pt``)."""
    torch.manual_seed(0)
    model = small_cnn().eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
    torch.save(model.state_dict(), folder / "net.pt")
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=g, dtype=torch.uint8)
    torch.save({"images": images, "labels": torch.arange(n) % 4}, folder / "data.pt")
    torch.save({"images": images.flip(0)}, folder / "calib.pt")
