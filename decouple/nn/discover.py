"""What counts as a convolution to rewrite: one answer for surgery, BN folding, recipes and plans.

A module is a *plain* 2-D convolution when it is an ``nn.Conv2d`` whose class computes what
``nn.Conv2d`` computes: ``nn.Conv2d`` itself, or a subclass that overrides neither ``forward``
nor ``_conv_forward`` (a lazy conv, a parametrized conv, a subclass adding attributes). A subclass
with its own forward (QAT convs, convs with masks or extra terms) may compute anything from its
weight, so replacing it by a factorization of that weight would be wrong even at full rank; it
is kept, and :func:`custom_forward_reason` says why. The same rule makes a *plain* ``nn.Linear``
(:func:`is_plain_linear`), which the low-rank method (``svd``) rewrites.
"""

from __future__ import annotations

from collections import Counter

from torch import nn
from torch.nn.modules.conv import _ConvNd


def _own_forward(module: nn.Module) -> bool:
    cls = type(module)
    if "forward" in module.__dict__:  # an instance whose forward was patched
        return True
    if isinstance(module, nn.Linear):
        return cls.forward is not nn.Linear.forward
    return cls.forward is not nn.Conv2d.forward or cls._conv_forward is not nn.Conv2d._conv_forward


def is_plain_conv2d(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Conv2d`` that computes exactly what ``nn.Conv2d`` does."""
    return isinstance(module, nn.Conv2d) and not _own_forward(module)


def is_plain_linear(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` that computes exactly what ``nn.Linear`` does."""
    return isinstance(module, nn.Linear) and not _own_forward(module)


def is_plain_layer(module: nn.Module) -> bool:
    """A layer decouple may rewrite: a plain ``nn.Conv2d`` or a plain ``nn.Linear``."""
    return is_plain_conv2d(module) or is_plain_linear(module)


def custom_forward_reason(module: nn.Module) -> str | None:
    """Why an ``nn.Conv2d`` or ``nn.Linear`` subclass is kept (``"kept: custom forward
    (MyConv)"``), else None."""
    if isinstance(module, (nn.Conv2d, nn.Linear)) and _own_forward(module):
        return f"kept: custom forward ({type(module).__name__})"
    return None


# The parameters that mark a factored layer in a state_dict, by layer: DecoupledConv2d holds
# depthwise + pointwise, CPConv2d and TuckerConv2d pointwise_in + pointwise_out.
FACTORED_MARKS = (
    ("depthwise.weight", "pointwise.weight"),
    ("pointwise_in.weight", "pointwise_out.weight"),
)


def factored_layer_names(keys) -> list[str]:
    """The factored layers (``DecoupledConv2d``, ``CPConv2d``, ``TuckerConv2d``) a ``state_dict``
    with these ``keys`` holds, by their module names, in order."""
    keys = set(keys)
    names = []
    for key in sorted(keys):
        for first, second in FACTORED_MARKS:
            if key == first or key.endswith("." + first):
                prefix = key[: -len(first)]
                if prefix + second in keys:
                    names.append(prefix.rstrip("."))
    return names


def conv_census(model: nn.Module) -> str:
    """The convolutions of ``model`` by type, most common first: ``"ConvTranspose2d x2, ..."``."""
    counts = Counter(type(m).__name__ for m in model.modules() if isinstance(m, _ConvNd))
    if not counts:
        return "no convolution of any kind"
    return ", ".join(f"{name} x{n}" for name, n in counts.most_common())
