"""Shared by the exporters and their checks: optional packages, quiet exporters, output comparison."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import sys
import warnings

import numpy as np
import torch

from ..nn.outputs import flatten_output

INSTALL_HINT = "pip install 'decouple[export]'"


def need(module: str):
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{module} is not installed; {INSTALL_HINT}")
    return importlib.import_module(module)


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


@contextlib.contextmanager
def _fds_to_devnull():
    """Point file descriptors 1 and 2 at /dev/null: when it fails, the TorchScript exporter's
    C++ logger prints the whole graph there, whatever ``verbose`` says (torch 2.14)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
    except (OSError, AttributeError, ValueError):  # no real descriptors (embedded interpreters)
        yield
        return
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (null, *saved):
            os.close(fd)


@contextlib.contextmanager
def quiet():
    """Silence the exporters' warnings, prints and log records: the CLI owns stdout and stderr."""
    level = logging.root.manager.disable
    with (
        _fds_to_devnull(),  # first: it flushes the real sys.stdout and sys.stderr
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
        contextlib.redirect_stderr(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(level)


def leaves(out) -> list[torch.Tensor]:
    """The tensors of a model output in the order the exporters flatten them (depth first,
    dicts by value order; :func:`decouple.nn.outputs.flatten_output` names them)."""
    return list(flatten_output(out).values())


def compare_outputs(
    got: list[np.ndarray],
    expected: list[np.ndarray],
    rtol: float,
    atol: float,
    names: list[str] | None = None,
):
    """``(max_abs_err, Frobenius relative error, every leaf close, per-leaf relative errors)``.

    Outputs are compared leaf by leaf: a leaf is close when every element is within
    ``atol + rtol·|y|`` or its own relative error is below ``rtol`` (random-weight models have
    outputs far from 1, where float32 rounding alone exceeds any fixed elementwise bound), so a
    small leaf beside a large one (an auxiliary head, a score) cannot hide a wrong graph. The
    per-leaf errors are keyed by ``names`` (default ``[0]``, ``[1]``, ...).
    """
    names = list(names) if names is not None else [f"[{i}]" for i in range(len(expected))]
    if len(got) != len(expected) or any(
        g.shape != e.shape for g, e in zip(got, expected, strict=False)
    ):
        return float("inf"), float("inf"), False, dict.fromkeys(names, float("inf"))
    per, close, worst, sq_diff, sq_norm = {}, True, 0.0, 0.0, 0.0
    for name, g, e in zip(names, got, expected, strict=True):
        g, e = g.astype(np.float64), e.astype(np.float64)
        diff = np.abs(g - e)
        d2, n2 = float(np.sum(diff**2)), float(np.sum(e**2))
        per[name] = d2**0.5 / max(n2**0.5, 1e-30)
        close &= bool(np.all(diff <= atol + rtol * np.abs(e))) or per[name] < rtol
        worst = max(worst, float(diff.max()) if diff.size else 0.0)
        sq_diff, sq_norm = sq_diff + d2, sq_norm + n2
    return worst, sq_diff**0.5 / max(sq_norm**0.5, 1e-30), close, per
