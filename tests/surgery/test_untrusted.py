"""Configs, recipes and models as untrusted input: the exact error and the model unchanged.

Tables of bad values give the exception type and a message naming what was wrong; hypothesis
throws random configs and recipes at a tiny model, where every outcome must be success (the model
still runs, same output shape) or ``ValueError``/``TypeError`` with the model unchanged.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_transactional import assert_same, fingerprint
from torch import nn
from toys import images, toy

from decouple import DecoupleConfig, DecoupledConv2d, LayerSpec, apply_recipe_, decouple_
from decouple.nn.factorized import TuckerConv2d
from decouple.surgery import make_recipe
from decouple.surgery.config import CONFIG_KEYS

# -- configs ------------------------------------------------------------------------------------

BAD_CONFIGS = [
    (dict(rank="2"), TypeError, r"rank must be an int; got str '2'"),
    (dict(rank=2.0), TypeError, r"rank must be an int; got float 2\.0"),
    (dict(rank=True), TypeError, r"rank must be an int; got bool True"),
    (dict(rank=0), ValueError, r"rank must be an integer >= 1; got 0"),
    (dict(energy="0.5"), TypeError, r"energy must be a number in \(0, 1\]; got str '0.5'"),
    (dict(energy=float("nan")), ValueError, r"energy .* got nan"),
    (dict(rank=2, order=3), TypeError, r"order must be one of dw-pw, pw-dw; got int 3"),
    (dict(rank=2, method=["nd"]), TypeError, r"method must be .*; got list \['nd'\]"),
    (dict(rank=2, fold_bn=1), TypeError, r"fold_bn must be a bool; got int 1"),
    (dict(rank=2, seed=2**40), ValueError, r"seed must be an integer in \[0, 4294967295\]"),
    (dict(rank=2, seed="0"), TypeError, r"seed must be an int; got str"),
    (dict(rank=2, cp_max_iter=10**12), ValueError, r"cp_max_iter must be an integer in"),
    (dict(rank=2, overrides=5), TypeError, r"overrides must be a dict .*; got int 5"),
    (dict(rank=2, overrides=[("a",)]), TypeError, r"override must be a \(name, rule\) pair"),
    (dict(rank=2, overrides={3: 2}), TypeError, r"override key must be .*; got int 3"),
    (dict(rank=2, overrides={"a": [2]}), TypeError, r"layer override must be .*; got list"),
    (dict(rank=2, overrides={"a": {"rank": "2"}}), TypeError, r"rank must be an int; got str"),
    (dict(rank=2, overrides={"a": {"skip": "yes"}}), TypeError, r"skip must be a bool"),
    (dict(rank=2, overrides={"a": {"rnak": 2}}), ValueError, r"\['rnak'\]; allowed: rank"),
    (dict(rank=2, overrides={"(" * 5000: 2}), ValueError, r"neither a plain name nor a valid"),
    (dict(rank=2, overrides={"": 2}), ValueError, r"non-empty"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_CONFIGS, ids=lambda v: None)
def test_bad_configs_name_the_field_and_value(kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        DecoupleConfig(**kwargs)
    if error is ValueError:
        assert not isinstance(info.value, TypeError)
    with pytest.raises(error, match=match):  # the same from a dict read from disk
        DecoupleConfig.from_dict(kwargs)


@pytest.mark.parametrize(
    "text,error,match",
    [
        ("[" * 100_000, ValueError, "nested too deeply"),
        ('{"a": ' * 100_000, ValueError, "nested too deeply"),
        ("[1, 2]", TypeError, r"a config must be a dict .*; got list"),
        ('{"rnak": 2}', ValueError, r"unknown config keys \['rnak'\]; allowed: rank, energy"),
        ('{"rank": "2"}', TypeError, "rank must be an int"),
        ("{rank: 2", ValueError, "Expecting property name"),
        (b"\xff", ValueError, "utf-8"),
        (3, TypeError, "a JSON config must be a str; got int 3"),
    ],
)
def test_bad_json_configs(text, error, match):
    with pytest.raises(error, match=match):
        DecoupleConfig.from_json(text)


def test_layer_spec_types():
    with pytest.raises(TypeError, match="skip must be a bool; got str 'yes'"):
        LayerSpec(skip="yes")
    with pytest.raises(TypeError, match="layer override must be"):
        LayerSpec.coerce(None)


# -- recipes ------------------------------------------------------------------------------------


def good_recipe() -> dict:
    model = toy()
    config = DecoupleConfig(
        rank=2,
        fold_bn=True,
        overrides={"conv2": {"method": "tucker", "rank": 3}},
        include_stem=True,
    )
    records = decouple_(model, config)
    return json.loads(json.dumps(make_recipe(records, config)))


GOOD = good_recipe()


def _with(path: tuple, value, base: dict = GOOD) -> dict:
    """``base`` with the value at ``path`` set to ``value``."""
    recipe = copy.deepcopy(base)
    node = recipe
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return recipe


BAD_RECIPES = {
    "not-a-dict": ([], TypeError, r"a recipe must be a dict .*; got list"),
    "no-format": ({"layers": {}}, ValueError, "not a decouple recipe"),
    "version-bool": (_with(("version",), True), ValueError, "unsupported recipe version"),
    "version-str": (_with(("version",), "1"), ValueError, "unsupported recipe version"),
    "unknown-key": (_with(("extra",), 1), ValueError, r"\['extra'\]; allowed: format"),
    "bad-config": (_with(("config", "rank"), "x"), TypeError, "recipe config: rank"),
    "layers-list": (_with(("layers",), []), TypeError, "recipe layers must be a dict"),
    "unknown-layer": (
        _with(("layers", "conv9"), {"rank": 2}),
        ValueError,
        r"'conv9' is not a module of the model; did you mean 'conv\d', 'conv\d', 'conv\d'\?",
    ),
    "not-a-conv": (
        _with(("layers", "bn1"), {"rank": 2}),
        ValueError,
        r"'bn1' is a BatchNorm2d, not a Conv2d",
    ),
    "empty-name": (_with(("layers", ""), {"rank": 2}), ValueError, "'' is not a module"),
    "entry-int": (_with(("layers", "conv1"), 3), TypeError, r"'conv1' must be a dict"),
    "rank-str": (_with(("layers", "conv1", "rank"), "2"), TypeError, r"rank must be an int"),
    "rank-float": (_with(("layers", "conv1", "rank"), 2.0), TypeError, r"got float 2\.0"),
    "rank-bool": (_with(("layers", "conv1", "rank"), True), TypeError, r"got bool True"),
    "rank-zero": (_with(("layers", "conv1", "rank"), 0), ValueError, r"in \[1, 8\]; got 0"),
    "rank-above-full": (
        _with(("layers", "conv1", "rank"), 9),
        ValueError,
        r"recipe layer 'conv1' rank must be an integer in \[1, 8\]; got 9",
    ),
    "rank-huge": (
        _with(("layers", "conv3", "rank"), 10**12),
        ValueError,
        r"'conv3' rank must be an integer in \[1, 6\]; got 1000000000000",
    ),
    "method-unknown": (_with(("layers", "conv1", "method"), "svd"), ValueError, "svd"),
    "method-int": (_with(("layers", "conv1", "method"), 3), TypeError, "method must be"),
    "order-bad": (_with(("layers", "conv1", "order"), "dw"), ValueError, "order must be"),
    "realization-bad": (
        _with(
            ("layers", "conv1", "realization"),
            "tile",
            _with(("layers", "conv1", "order"), "pw-dw"),
        ),
        ValueError,
        r"realization must be one of grouped, split, sum",
    ),
    "entry-unknown-key": (
        _with(("layers", "conv1", "speed"), 1),
        ValueError,
        r"\['speed'\]; allowed: method, rank, order, realization",
    ),
    "tucker-one-rank": (_with(("layers", "conv2", "ranks"), [2]), TypeError, "a pair"),
    "tucker-rank-above": (
        _with(("layers", "conv2", "ranks"), [100, 2]),
        ValueError,
        r"'conv2' ranks R_out must be an integer in \[1, 8\]; got 100",
    ),
    "cp-rank-above": (
        _with(("layers", "conv3"), {"method": "cp", "rank": 55}),
        ValueError,
        r"'conv3' rank must be an integer in \[1, 54\]",
    ),
    "fold-unknown-bn": (
        _with(("folded_bn", "conv1"), "bn9"),
        ValueError,
        r"'bn9' is not a module of the model; did you mean 'bn2', 'bn1'",
    ),
    "fold-unknown-conv": (_with(("folded_bn", "conv9"), "bn1"), ValueError, "'conv9'"),
    "fold-list": (_with(("folded_bn",), ["conv1"]), TypeError, "folded_bn must be a dict"),
    "fold-wrong-size": (
        _with(("folded_bn", "conv3"), "bn1"),
        ValueError,
        r"BN 'bn1' \(8 features\) into 'conv3' \(6 output channels\)",
    ),
}


@pytest.mark.parametrize("case", BAD_RECIPES)
def test_bad_recipes_are_refused_before_any_change(case):
    recipe, error, match = BAD_RECIPES[case]
    model = toy()
    before = fingerprint(model)
    with pytest.raises(error, match=match) as info:
        apply_recipe_(model, recipe)
    if error is ValueError:
        assert not isinstance(info.value, TypeError)
    assert_same(before, fingerprint(model))


def test_a_huge_rank_is_refused_at_once():
    start = time.perf_counter()
    with pytest.raises(ValueError, match="1000000000000"):
        apply_recipe_(toy(), _with(("layers", "conv1", "rank"), 10**12))
    assert time.perf_counter() - start < 1.0


def test_good_recipe_replays_and_twice_is_a_no_op():
    model = apply_recipe_(toy(), GOOD)
    assert isinstance(model.conv2, TuckerConv2d) and isinstance(model.conv1, DecoupledConv2d)
    structure = repr(model)
    apply_recipe_(model, GOOD)
    assert repr(model) == structure


# -- fuzzing ------------------------------------------------------------------------------------

NAMES = ["conv1", "conv2", "conv3", "bn1", "head", "relu", "", "conv", "conv1.weight", "x"]
anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 12),
    st.sampled_from([10**12, 2**70, -(10**9)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["nd", "cp", "tucker", "auto", "dw-pw", "pw-dw", "skip", "tile", "sum"]),
    st.lists(st.integers(-1, 12), max_size=3),
)
plausible_entries = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(["nd", "cp", "tucker"]),
        "rank": st.integers(0, 10),
        "ranks": st.lists(st.integers(0, 9), min_size=2, max_size=2),
        "order": st.sampled_from(["dw-pw", "pw-dw"]),
        "realization": st.sampled_from(["grouped", "split", "tile", "sum"]),
    },
)
entries = st.one_of(
    plausible_entries,
    anything,
    st.dictionaries(
        st.sampled_from(["method", "rank", "ranks", "order", "realization", "x"]),
        anything,
        max_size=4,
    ),
)
recipes = st.fixed_dictionaries(
    {
        "format": st.sampled_from(["decouple-recipe"] * 4 + ["other"]),
        "version": st.sampled_from([1, 1, 1, True, "1", 2]),
        "layers": st.dictionaries(st.sampled_from(NAMES), entries, max_size=3),
    },
    optional={
        "folded_bn": st.one_of(
            anything, st.dictionaries(st.sampled_from(NAMES), st.sampled_from(NAMES), max_size=2)
        ),
        "config": st.one_of(st.none(), st.dictionaries(st.sampled_from(CONFIG_KEYS), anything)),
    },
)
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)


def _outcome_is_clean(model: nn.Module, call) -> None:
    """Success with a model that still runs at the same output shape, or a clean refusal."""
    before = fingerprint(model)
    try:
        call()
    except (ValueError, TypeError):
        assert_same(before, fingerprint(model))
        return
    with torch.no_grad():
        assert model(images(4)).shape == before["out"].shape


@FUZZ
@given(recipe=recipes)
def test_fuzzed_recipes_apply_or_are_refused_cleanly(recipe):
    model = toy()
    _outcome_is_clean(model, lambda: apply_recipe_(model, recipe))


plausible_specs = st.one_of(
    st.integers(1, 9),
    st.just("skip"),
    st.floats(0.1, 1.0),
    st.fixed_dictionaries(
        {},
        optional={
            "rank": st.integers(1, 9),
            "method": st.sampled_from(["nd", "cp", "tucker", "auto"]),
            "order": st.sampled_from(["dw-pw", "pw-dw"]),
        },
    ),
)
plausible_configs = st.fixed_dictionaries(
    {},
    optional={
        "rank": st.integers(1, 12),
        "energy": st.floats(0.1, 1.0),
        "order": st.sampled_from(["dw-pw", "pw-dw"]),
        "method": st.sampled_from(["nd", "cp", "tucker", "auto"]),
        "fold_bn": st.booleans(),
        "overrides": st.dictionaries(
            st.sampled_from(["conv1", "conv2", "conv3", r"conv\d", "bn1"]),
            plausible_specs,
            max_size=2,
        ),
        "cp_max_iter": st.integers(1, 30),
        "seed": st.integers(0, 3),
    },
)
configs = st.one_of(
    plausible_configs,
    st.dictionaries(
        st.sampled_from([*CONFIG_KEYS, "rnak"]),
        st.one_of(
            anything,
            st.dictionaries(st.sampled_from(NAMES[:5] + [r"conv\d", "("]), entries, max_size=3),
        ),
        max_size=4,
    ),
)


@FUZZ
@given(data=configs)
def test_fuzzed_configs_decouple_or_are_refused_cleanly(data):
    model = toy()

    def call():
        decouple_(model, DecoupleConfig.from_dict(data))

    _outcome_is_clean(model, call)
