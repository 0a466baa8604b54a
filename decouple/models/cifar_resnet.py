"""The CIFAR ResNet of He et al. (2015), "option A", for any depth 6n+2.

Matches the checkpoints of github.com/akamaster/pytorch_resnet_cifar10 (BSD 2-Clause,
Copyright (c) 2018 Yerlan Idelbayev; "Proper ResNet Implementation for CIFAR10/CIFAR100 in
PyTorch"): key names ``conv1``, ``bn1``, ``layer{1,2,3}.{i}.{conv1,bn1,conv2,bn2}``, ``linear``,
once the ``module.`` prefix of ``nn.DataParallel`` is stripped. The shortcut is parameter-free.
The forward pass is straight-line code, so ``torch.fx`` traces it (BatchNorm folding needs that).
"""

from __future__ import annotations

from torch import nn
from torch.nn import functional as F

from .registry import ModelInfo, register_family, register_model

# The checkpoints were trained on RGB in [0, 1] normalised with the ImageNet statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CREDIT = (
    "checkpoints: akamaster/pytorch_resnet_cifar10 (BSD-2-Clause, Yerlan Idelbayev), "
    '"Proper ResNet Implementation for CIFAR10/CIFAR100 in PyTorch"'
)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad ``pad`` channels on each side."""

    def __init__(self, pad: int) -> None:
        super().__init__()
        self.pad = pad

    def forward(self, x):
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes = stride != 1 or in_planes != planes
        self.shortcut = PadShortcut(planes // 4) if changes else nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """CIFAR ResNet with ``(depth − 2) / 6`` BasicBlocks per stage (widths 16, 32, 64).

    Parameters
    ----------
    depth : int
        6n + 2: 20, 32, 44, 56, 110, ...
    num_classes : int, default 10
    """

    def __init__(self, depth: int = 20, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"depth must be 6n+2 with n >= 1 (8, 14, 20, 32, ...); got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        stages = []
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                blocks.append(BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for m in self.modules():  # He initialisation, as in the reference implementation
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def _info(depth: int) -> ModelInfo:
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet's depth must be 6n+2 (8, 14, 20, 32, ...); got {depth}")
    return ModelInfo(
        name=f"cifar_resnet{depth}",
        builder=lambda num_classes=10: CifarResNet(depth, num_classes),
        input_shape=(3, 32, 32),
        description=f"CIFAR ResNet-{depth} (option A shortcuts), 3x32x32 inputs",
        meta={"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "num_classes": 10, "credit": CREDIT},
    )


for _depth in (20, 32, 44, 56, 110):
    register_model(
        f"cifar_resnet{_depth}",
        input_shape=(3, 32, 32),
        description=f"CIFAR ResNet-{_depth} (option A shortcuts), 3x32x32 inputs",
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        num_classes=10,
        credit=CREDIT,
    )(lambda num_classes=10, _d=_depth: CifarResNet(_d, num_classes))

register_family(
    r"cifar_resnet(\d+)",
    lambda m: _info(int(m.group(1))),
    shown="cifar_resnetN (any depth N = 6n+2: 8, 14, 20, 32, ...)",
)
