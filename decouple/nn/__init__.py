"""The layers: ``DecoupledConv2d``, ``CPConv2d`` and ``TuckerConv2d``, each built ``from_conv``,
their shared geometry base, and what they cost in FLOPs.

May import :mod:`decouple.factor`.
"""

from .decoupled import REALIZATIONS, DecoupledConv2d
from .factorized import CPConv2d, FactorizedConv2d, TuckerConv2d
from .flops import conv_flops, count_flops, factored_flops
from .geometry import ConvGeometry

__all__ = [
    "CPConv2d",
    "ConvGeometry",
    "DecoupledConv2d",
    "FactorizedConv2d",
    "REALIZATIONS",
    "TuckerConv2d",
    "conv_flops",
    "count_flops",
    "factored_flops",
]
