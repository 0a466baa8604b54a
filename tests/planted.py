"""Shared test inputs (not a test module): conv geometries to draw, kernels of a planted rank."""

import torch
from hypothesis import strategies as st

PADDING_MODES = ["zeros", "reflect", "replicate", "circular"]


@st.composite
def conv_configs(draw):
    groups = draw(st.integers(1, 3))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    stride = (
        (1, 1) if padding_kind == "same" else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    )
    padding = {
        "int": draw(st.integers(0, 2)),
        "tuple": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
        "same": "same",
        "valid": "valid",
    }[padding_kind]
    return dict(
        in_channels=cin,
        out_channels=cout,
        kernel_size=(kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(PADDING_MODES)),
    )


def planted_cp(shape, groups, rank, seed=0):
    """A kernel that is exactly a sum of ``rank`` CP terms per group."""
    n, cg, kh, kw = shape
    g = torch.Generator().manual_seed(seed)
    f = [
        torch.randn(groups, d, rank, generator=g, dtype=torch.float64)
        for d in (n // groups, cg, kh, kw)
    ]
    return torch.einsum("gnr,gcr,gir,gjr->gncij", *f).reshape(shape)


def planted_tucker(shape, groups, ranks, seed=0):
    n, cg, kh, kw = shape
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(groups, ranks[0], ranks[1], kh, kw, generator=g, dtype=torch.float64)
    out = torch.randn(groups, n // groups, ranks[0], generator=g, dtype=torch.float64)
    inp = torch.randn(groups, cg, ranks[1], generator=g, dtype=torch.float64)
    return torch.einsum("gabij,gna,gcb->gncij", core, out, inp).reshape(shape)
