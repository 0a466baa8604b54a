"""The layers: ``DecoupledConv2d``, ``CPConv2d`` and ``TuckerConv2d``, each built ``from_conv``,
their shared geometry base, and what they cost in FLOPs; what counts as a conv to rewrite
(:mod:`.discover`), the checks every in-place verb runs first (:mod:`.guards`) and the undo log
that makes them all or nothing (:mod:`.transaction`).

May import :mod:`decouple.factor`.
"""

from .decoupled import REALIZATIONS, DecoupledConv2d
from .discover import is_plain_conv2d
from .factorized import CP_REALIZATIONS, CP_SPATIAL, CPConv2d, FactorizedConv2d, TuckerConv2d
from .flops import conv_flops, count_flops, factored_flops
from .geometry import ConvGeometry
from .guards import InputTypeError
from .transaction import transaction

__all__ = [
    "CP_REALIZATIONS",
    "CP_SPATIAL",
    "CPConv2d",
    "ConvGeometry",
    "DecoupledConv2d",
    "FactorizedConv2d",
    "InputTypeError",
    "REALIZATIONS",
    "TuckerConv2d",
    "conv_flops",
    "count_flops",
    "factored_flops",
    "is_plain_conv2d",
    "transaction",
]
