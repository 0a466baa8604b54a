"""A MobileNetV2-style CIFAR-10 network: Alibaba's MLPerf Tiny v0.7 image-classification model.

Written from the ONNX file ``mbv2_tinymlperf_alibaba_cifar10.onnx`` of the shared assets
(github.com/mlcommons/tiny_results_v0.7, ``open/Alibaba/code/ic/sinian/ic_model/model_ic.onnx``,
Apache-2.0). Its initializers are named by the PyTorch module paths it was exported from
(``blocks.0.conv.depth_conv.conv.weight``, ``tail.2.linear.bias``, ...); the attribute names here
reproduce them, so :func:`decouple.io.onnx_weights.state_dict_from_onnx` loads it with
``strict=True``. Unlike the CIFAR ResNets, most of its FLOPs sit in 1×1 convs.

The ONNX graph is the reference: 3×3 convs pad 1, depthwise convs have ``group`` = channels,
every BatchNorm has eps 1e-3, ReLU6 is ``Clip(0, 6)``, the residual ``Add`` comes after the
projection's BN, and the head pools globally *before* ``tail.1`` (a 1×1 conv + BN on a 1×1 map),
then flattens into ``tail.2.linear``. The forward pass is straight-line code (``torch.fx`` traces
it, which BatchNorm folding needs).
"""

from __future__ import annotations

from torch import nn

from .registry import register_model

# Trained on RGB in [0, 1] normalised with the ImageNet statistics, like the CIFAR ResNets.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3  # the ONNX BatchNormalization nodes' epsilon (TensorFlow's default, not torch's)
CREDIT = (
    "weights: mlcommons/tiny_results_v0.7, open/Alibaba (Apache-2.0), "
    "MLPerf Tiny v0.7 image classification"
)
STEM_CHANNELS, STEM_OUT = 24, 8
# (in, expanded, out, stride) of blocks.0..6
BLOCKS = (
    (8, 24, 16, 2),
    (16, 48, 16, 1),
    (16, 48, 24, 2),
    (24, 96, 24, 1),
    (24, 72, 48, 1),
    (48, 144, 48, 1),
    (48, 96, 112, 1),
)
TAIL_EXPAND, TAIL_FEATURES = 448, 88


class ConvBN(nn.Module):
    """Bias-free conv → BatchNorm (eps 1e-3) → ReLU6, or no activation when ``act`` is False.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size : int
        1 or 3; padding is ``kernel_size // 2`` ("same" at stride 1).
    stride : int, default 1
    groups : int, default 1
        ``in_channels`` for a depthwise conv.
    act : bool, default True
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=kernel_size // 2,
            groups=groups,
            bias=False,
        )
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, track_running_stats=True)
        self.act = nn.ReLU6() if act else nn.Identity()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class InvertedConv(nn.Module):
    """1×1 expand (``inverted_bottleneck``, absent when ``expanded`` is None), depthwise 3×3
    (``depth_conv``) and linear 1×1 projection (``point_linear``, no activation).

    Parameters
    ----------
    in_channels : int
    expanded : int or None
        Channels of the depthwise conv; None: no expansion, the depthwise conv runs on the input.
    out_channels : int
    stride : int
        Stride of the depthwise conv.
    """

    def __init__(
        self, in_channels: int, expanded: int | None, out_channels: int, stride: int
    ) -> None:
        super().__init__()
        mid = in_channels if expanded is None else expanded
        self.inverted_bottleneck = None if expanded is None else ConvBN(in_channels, mid, 1)
        self.depth_conv = ConvBN(mid, mid, 3, stride=stride, groups=mid)
        self.point_linear = ConvBN(mid, out_channels, 1, act=False)

    def forward(self, x):
        if self.inverted_bottleneck is not None:
            x = self.inverted_bottleneck(x)
        return self.point_linear(self.depth_conv(x))


class MobileBlock(nn.Module):
    """An :class:`InvertedConv` as ``.conv``, plus the block's input when the shapes allow it
    (stride 1 and ``in == out``), as in the ONNX graph's ``Add`` nodes."""

    def __init__(
        self, in_channels: int, expanded: int | None, out_channels: int, stride: int
    ) -> None:
        super().__init__()
        self.conv = InvertedConv(in_channels, expanded, out_channels, stride)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x):
        out = self.conv(x)
        return out + x if self.residual else out


class Classifier(nn.Module):
    """The final ``nn.Linear``, held as ``.linear`` so that its key is ``tail.2.linear.*``."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x)


class CifarMobileNetV2(nn.Module):
    """The MobileNetV2-style CIFAR-10 network of the shared assets, for 3×32×32 inputs.

    ``input_stem``: 3×3 conv 3→24 at stride 2, then a depthwise-separable block 24→8 without
    expansion or residual; ``blocks.0..6``: inverted bottlenecks (see ``BLOCKS``); ``tail.0``:
    1×1 conv 112→448 + ReLU6; global average pool; ``tail.1``: 1×1 conv 448→88 (BN, no
    activation); flatten; ``tail.2.linear``: 88→``num_classes``.

    Parameters
    ----------
    num_classes : int, default 10
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input_stem = nn.Sequential(
            ConvBN(3, STEM_CHANNELS, 3, stride=2),
            MobileBlock(STEM_CHANNELS, None, STEM_OUT, 1),
        )
        self.blocks = nn.Sequential(*(MobileBlock(*cfg) for cfg in BLOCKS))
        # A ModuleList, not a Sequential: the pool and the flatten sit between its entries, and
        # giving them indices would shift the checkpoint's "tail.1" and "tail.2".
        self.tail = nn.ModuleList(
            [
                ConvBN(BLOCKS[-1][2], TAIL_EXPAND, 1),
                ConvBN(TAIL_EXPAND, TAIL_FEATURES, 1, act=False),
                Classifier(TAIL_FEATURES, num_classes),
            ]
        )
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)

    def forward(self, x):
        x = self.blocks(self.input_stem(x))
        x = self.global_pool(self.tail[0](x))
        x = self.flatten(self.tail[1](x))
        return self.tail[2](x)


@register_model(
    "cifar_mbv2",
    input_shape=(3, 32, 32),
    description="MobileNetV2-style CIFAR-10 net (MLPerf Tiny, Alibaba), 3x32x32 inputs",
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    num_classes=10,
    credit=CREDIT,
)
def cifar_mbv2(num_classes: int = 10) -> nn.Module:
    """Build a freshly initialised :class:`CifarMobileNetV2`.

    Parameters
    ----------
    num_classes : int, default 10
        Number of output logits.

    Returns
    -------
    CifarMobileNetV2
    """
    return CifarMobileNetV2(num_classes=num_classes)
