"""A small plain-conv CNN for scikit-learn's 8×8 handwritten digits, the bundled demo model.

Four 3×3 convolutions (no bias, each followed by BatchNorm and ReLU) give the decoupling code
something realistic to work on while staying small enough to train on a CPU in seconds.
"""

from __future__ import annotations

import torch
from torch import nn

from .registry import register_model


class DigitsCNN(nn.Module):
    """Four-conv CNN for 1×8×8 digit images.

    ``conv1`` (1→32) → ``conv2`` (32→64) → 2×2 max-pool → ``conv3`` (64→64) → ``conv4`` (64→64)
    → global average pool → ``fc`` (64→``num_classes``). Every conv is 3×3 with padding 1 and no
    bias, followed by BatchNorm and ReLU. The forward pass is straight-line code, so the model
    traces with :func:`torch.fx.symbolic_trace`.

    Parameters
    ----------
    num_classes : int, default 10
        Number of output logits.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # 8×8 stage
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        # 4×4 stage
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(64)
        self.relu3 = nn.ReLU(inplace=True)
        self.conv4 = nn.Conv2d(64, 64, 3, padding=1, bias=False)
        self.bn4 = nn.BatchNorm2d(64)
        self.relu4 = nn.ReLU(inplace=True)
        # classifier head
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map a batch ``(B, 1, 8, 8)`` to logits ``(B, num_classes)``."""
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.pool(x)
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.relu4(self.bn4(self.conv4(x)))
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


@register_model(
    "digits_cnn",
    input_shape=(1, 8, 8),
    description="4-conv CNN for scikit-learn's 8×8 digits (bundled demo weights)",
)
def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Build a freshly initialised :class:`DigitsCNN`.

    Parameters
    ----------
    num_classes : int, default 10
        Number of output logits.

    Returns
    -------
    DigitsCNN
    """
    return DigitsCNN(num_classes=num_classes)
