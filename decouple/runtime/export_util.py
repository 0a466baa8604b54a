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
    """The tensors of a model output in the order the exporters flatten them."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    return [t for o in out for t in leaves(o)]


def compare_outputs(got: list[np.ndarray], expected: list[np.ndarray], rtol: float, atol: float):
    """``(max_abs_err, Frobenius relative error, every element within atol + rtol·|y|)``."""
    if len(got) != len(expected) or any(
        g.shape != e.shape for g, e in zip(got, expected, strict=False)
    ):
        return float("inf"), float("inf"), False
    g = np.concatenate([a.astype(np.float64).ravel() for a in got])
    e = np.concatenate([a.astype(np.float64).ravel() for a in expected])
    diff = np.abs(g - e)
    rel = float(np.linalg.norm(g - e) / max(float(np.linalg.norm(e)), 1e-30))
    close = bool(np.all(diff <= atol + rtol * np.abs(e)))
    return (float(diff.max()) if diff.size else 0.0), rel, close
