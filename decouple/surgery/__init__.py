"""Model surgery: ``DecoupleConfig``, the method registry (nd / cp / tucker behind one interface),
BatchNorm folding, ``decouple_`` (the in-place verb) and recipes that replay it. Configs and
recipes are checked as untrusted input (:mod:`.checks`, :mod:`.recipe_check`), and every verb
plans and checks before it changes the model, all or nothing.

May import :mod:`decouple.factor` and :mod:`decouple.nn`.
"""

from .bn_fold import fold_batchnorm_
from .config import DecoupleConfig, LayerSpec
from .methods import METHODS, FactorCache, FactorOptions
from .recipe import apply_recipe_, make_recipe
from .rewrite import LayerRecord, decouplable_convs, decouple_

__all__ = [
    "METHODS",
    "DecoupleConfig",
    "FactorCache",
    "FactorOptions",
    "LayerRecord",
    "LayerSpec",
    "apply_recipe_",
    "decouplable_convs",
    "decouple_",
    "fold_batchnorm_",
    "make_recipe",
]
