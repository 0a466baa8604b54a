"""Budgets: each layer's options (keep it, or each candidate rank of its method) with a cost and a
loss, the greedy allocator over them, ``--target-flops`` (:mod:`.flops_budget`) and
``--target-latency`` (:mod:`.latency_budget`, priced by measured times).

May import :mod:`decouple.factor`, :mod:`decouple.nn`, :mod:`decouple.surgery`,
:mod:`decouple.calibrate` and :mod:`decouple.runtime`.
"""

from .allocate import MIN_SAVING, Allocation, Option, allocate
from .flops_budget import plan_ranks
from .latency_budget import LatencyPlan, plan_latency
from .losses import CRITERIA
from .options import rank_options

__all__ = [
    "CRITERIA",
    "MIN_SAVING",
    "Allocation",
    "LatencyPlan",
    "Option",
    "allocate",
    "plan_latency",
    "plan_ranks",
    "rank_options",
]
