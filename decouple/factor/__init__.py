"""The math: pure functions on kernel tensors, no ``nn.Module`` anywhere.

Network decoupling (:mod:`.nd`: batched SVD of kernel slices), CP (:mod:`.cp`) and Tucker-2
(:mod:`.tucker`) of a conv kernel, and the tensorly adapter. Imports nothing else of ``decouple``.
"""

from .cp import CPFactors, cp_max_rank, cp_weight
from .nd import ORDERS, Decoupling, decouple_weight, max_rank, rank_for_energy, spectrum, svd_flip
from .tucker import TuckerFactors, tucker2_weight

__all__ = [
    "CPFactors",
    "Decoupling",
    "ORDERS",
    "TuckerFactors",
    "cp_max_rank",
    "cp_weight",
    "decouple_weight",
    "max_rank",
    "rank_for_energy",
    "spectrum",
    "svd_flip",
    "tucker2_weight",
]
