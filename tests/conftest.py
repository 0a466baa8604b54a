"""Shared fixtures: the real pretrained CIFAR-10 assets in ../shared/assets (never committed), and
a fake clock for every test whose answer would otherwise depend on how busy the machine is."""

import json
import os
import shutil
import tempfile
from types import SimpleNamespace

import pytest
import torch
from hypothesis import settings

from decouple.io.images import shared_assets_dir

# Hypothesis's default 200 ms deadline fails a property test on a busy machine, not a bug: no
# test here is about speed, so no example has a deadline.
settings.register_profile("decouple", deadline=None)
settings.load_profile("decouple")

REQUIRED = (
    "resnet20-12fca82f.th",
    "resnet32-d509ac18.th",
    "test_batch.truncated_first_3145728_bytes",
    "cifar10_test_jpeg_q75_YoongiKim.tar",
    "mbv2_tinymlperf_alibaba_cifar10.onnx",
)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The suite runs PyTorch (and ONNX Runtime, which follows it) on one thread, and so do the
    processes it starts.

    On a machine whose cores are busy with other work, OpenMP threads wait on each other at
    every op: on a loaded 2-core machine a small conv took 0.3-0.5 ms on two threads and 0.02 ms
    on one, and a test of 0.1 s took 25 s to 200 s. No test here is about parallel speed.
    """
    threads, env = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(threads)
    if env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = env


@pytest.fixture(scope="session", autouse=True)
def _private_tmp(tmp_path_factory):
    """Everything the suite (and the processes and notebook kernels it starts) writes through
    ``tempfile`` goes into a folder of its own, removed at the end: nothing is left in /tmp."""
    folder = tmp_path_factory.mktemp("tmpdir")
    before, cached = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(folder), None
    yield folder
    tempfile.tempdir = cached
    if before is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = before
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Each test caches ``--calib synthetic`` images in a folder of its own: never the user's
    ``~/.cache``, and no test reads what another made."""
    monkeypatch.setenv("DECOUPLE_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture(scope="session")
def _fixed_cost_models(tmp_path_factory):
    """Cost models with fixed coefficients, one per runtime (JSON, as a user would give them)."""
    from decouple.runtime.cost_model import FEATURES, CostModel

    coefficients = dict.fromkeys(FEATURES, 0.0)
    coefficients.update(gmac_dense=6.0, gmac_depthwise=10.0, gmac_grouped=0.2,
                        gmac_unblocked=10.0, mbyte_grouped=0.2, mbyte_unblocked=0.05,
                        mbyte_other=0.02, op=0.003)  # fmt: skip
    models = [
        CostModel(runtime=r, batch=1, threads=1, processor="fixed", versions="fixed",
                  coefficients=coefficients, fit_error=0.0, graphs_timed=0).to_dict()
        for r in ("eager", "channels-last", "onnxruntime")
    ]  # fmt: skip
    path = tmp_path_factory.mktemp("cost_models") / "fixed.json"
    path.write_text(json.dumps(models))
    return path


@pytest.fixture(autouse=True)
def _no_cost_model_fit(_fixed_cost_models, monkeypatch):
    """Every report predicts speed from fixed cost models: fitting one times graphs for 10-30 s
    and depends on the machine. Tests of the fit inject a timer."""
    monkeypatch.setenv("DECOUPLE_COST_MODEL", str(_fixed_cost_models))


@pytest.fixture(scope="session")
def cifar_assets():
    """The ``cifar10`` assets folder; skips without it, but fails where CI demands it."""
    folder = shared_assets_dir()
    missing = [f for f in REQUIRED if folder is None or not (folder / f).is_file()]
    if missing:
        why = f"shared CIFAR-10 assets not found (../shared/assets/cifar10: {', '.join(missing)})"
        if os.environ.get("DECOUPLE_REQUIRE_ASSETS") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return folder


class FakeClock:
    """Time that passes only when modules run, at prices a test chooses.

    Every timing in ``decouple`` goes through ``Timer.timeit`` of ``torch.utils.benchmark``
    (:func:`decouple.runtime.latency.time_prepared`); the :func:`fake_clock` fixture swaps that
    timer for one that reads this clock, so ``measure``, ``compare``, ``fastest``,
    ``time_candidates``, ``choose_realizations_``, ``confirm_on_model_`` and the latency planner
    all run as they do, on a machine that is never busy.

    ``cost(module)`` is the price of one call of a module, in ms (default: its ``fake_ms``
    attribute, which copies and deep copies keep, else 0); a priced module's price covers every
    module it calls. Each timed call also costs ``call_ms`` (the runtime's fixed cost of a call:
    what ``time_candidates`` times an identity for and takes off).
    """

    def __init__(self) -> None:
        self.now = 0.0  # seconds
        self.call_ms = 0.01
        self.cost = lambda module: getattr(module, "fake_ms", 0.0)
        self._open = None  # the priced module running now

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3

    def _enter(self, module, args) -> None:
        if self._open is None:
            ms = self.cost(module)
            if ms:
                self.advance(ms)
                self._open = module

    def _leave(self, module, args, output) -> None:
        if module is self._open:
            self._open = None


@pytest.fixture
def fake_clock(monkeypatch):
    """A :class:`FakeClock` in place of the real one for every timing ``decouple`` takes."""
    from torch.nn.modules.module import (
        register_module_forward_hook,
        register_module_forward_pre_hook,
    )
    from torch.utils import benchmark

    from decouple.runtime import latency

    clock = FakeClock()

    class Timer(benchmark.Timer):
        def __init__(self, stmt, globals, **kwargs):
            super().__init__(stmt=stmt, globals=globals, **kwargs)
            self.fn, self.arg = globals["fn"], globals["arg"]

        def timeit(self, number: int = 1000000) -> benchmark.Measurement:
            start = clock.now
            for _ in range(number):
                clock.advance(clock.call_ms)
                self.fn(self.arg)
            return benchmark.Measurement(number, [clock.now - start], self._task_spec)

    fake = SimpleNamespace(Timer=Timer, Measurement=benchmark.Measurement)
    monkeypatch.setattr(latency, "_benchmark", lambda: fake)
    hooks = [
        register_module_forward_pre_hook(clock._enter),
        register_module_forward_hook(clock._leave, always_call=True),
    ]
    yield clock
    for h in hooks:
        h.remove()
