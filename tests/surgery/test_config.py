"""Configs validate themselves, resolve overrides, and round-trip through JSON."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from decouple import DecoupleConfig, LayerSpec


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rank=0), "rank must be an integer >= 1; got 0"),
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(energy=0.0), r"energy must be a number in \(0, 1\]; got 0.0"),
        (dict(energy=1.5), "energy"),
        (dict(rank=2, energy=0.5), "not both"),
        (dict(rank=2, order="dw"), "order must be one of dw-pw, pw-dw; got 'dw'"),
        (dict(rank=2, fold_bn="yes"), "fold_bn"),
        (dict(rank=2, overrides={"a": 0}), "rank"),
        (dict(rank=2, overrides={"a": "drop"}), "skip"),
        (dict(rank=2, overrides={"a": {"rank": 2, "speed": 1}}), "unknown layer override keys"),
        (dict(rank=2, overrides={"layer[": 2}), "regex"),
    ],
)
def test_invalid_configs_name_the_bad_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DecoupleConfig(**kwargs)


def test_layer_spec_validation():
    with pytest.raises(ValueError, match="skip"):
        LayerSpec(rank=2, skip=True)
    assert LayerSpec.coerce("skip").skip and LayerSpec.coerce(3).rank == 3
    assert LayerSpec.coerce(0.5).energy == 0.5


def test_resolution_order():
    c = DecoupleConfig(
        energy=0.9, order="pw-dw", overrides={"a.*": 2, "ab": "skip", "c": {"order": "dw-pw"}}
    )
    assert c.resolve("ab").skip
    assert c.resolve("ax") == LayerSpec(rank=2, order="pw-dw", method="nd")
    assert c.resolve("c") == LayerSpec(energy=0.9, order="dw-pw", method="nd")
    assert c.resolve("z") == LayerSpec(energy=0.9, order="pw-dw", method="nd")
    assert DecoupleConfig().resolve("z").skip  # no rule at all: leave it


specs = st.one_of(
    st.just("skip"),
    st.integers(1, 20),
    st.floats(0.01, 1.0),
    st.fixed_dictionaries(
        {"rank": st.integers(1, 9)}, optional={"order": st.sampled_from(["dw-pw", "pw-dw"])}
    ),
)


@given(
    rank=st.one_of(st.none(), st.integers(1, 9)),
    order=st.sampled_from(["dw-pw", "pw-dw"]),
    fold=st.booleans(),
    overrides=st.dictionaries(
        st.from_regex(r"[a-z][a-z0-9_.]{0,8}", fullmatch=True), specs, max_size=4
    ),
)
def test_json_round_trip(rank, order, fold, overrides):
    c = DecoupleConfig(rank=rank, order=order, fold_bn=fold, overrides=overrides)
    assert DecoupleConfig.from_json(c.to_json()) == c
    assert hash(c) == hash(DecoupleConfig.from_json(c.to_json()))
