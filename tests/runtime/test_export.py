"""Export: every factored layer, realization and conv geometry through ONNX (onnx checker + ONNX
Runtime against PyTorch) and ``torch.export``; a dynamic batch axis; a decoupled ResNet-18."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn
from toys import toy

from decouple import CPConv2d, DecoupleConfig, DecoupledConv2d, TuckerConv2d, decouple_
from decouple.nn.decoupled import REALIZATIONS

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime")),
    reason="onnx/onnxruntime not installed (pip install '.[export]')",
)

from decouple.runtime import export, export_util  # noqa: E402
from decouple.runtime.export import export_program, onnx_bytes, onnx_files  # noqa: E402
from decouple.runtime.onnx_check import check_onnx, ort_runner, ort_session  # noqa: E402

GEOMETRIES = [
    dict(padding=1),
    dict(padding=1, stride=2, groups=2),
    dict(padding=2, dilation=2),
    dict(padding=(1, 0), stride=(2, 1), bias=False),
    dict(padding="same"),
    dict(padding="same", dilation=2),  # ONNX Runtime refuses auto_pad SAME with dilation
    dict(padding=1, padding_mode="reflect"),
    dict(padding=1, padding_mode="replicate", stride=2),
    dict(padding=(2, 1), padding_mode="circular"),
    dict(padding="same", padding_mode="circular"),
]


def _ids(g: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in g.items())


def _roundtrip(layer: nn.Module, x: torch.Tensor) -> dict:
    layer.eval()
    result = check_onnx(layer, x, onnx_bytes(layer, x), rtol=1e-4, atol=1e-5)
    assert result["checker"] and result["ok"], result
    assert result["rel_err"] < 1e-5, result  # float32 rounding, not a slightly wrong graph
    return result


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_every_realization_exports(geometry, order):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, **geometry)
    x = torch.randn(2, 4, 9, 10)
    layer = DecoupledConv2d.from_conv(conv, 2, order)
    for name in REALIZATIONS[order]:
        _roundtrip(layer.set_realization(name), x)


@pytest.mark.parametrize("geometry", GEOMETRIES, ids=_ids)
@pytest.mark.parametrize("cls, rank", [(CPConv2d, 3), (TuckerConv2d, (2, 3))], ids=["cp", "tucker"])
def test_cp_and_tucker_export(cls, rank, geometry):
    torch.manual_seed(1)
    conv = nn.Conv2d(4, 6, 3, **geometry)
    _roundtrip(cls.from_conv(conv, rank), torch.randn(1, 4, 9, 10))


@pytest.mark.parametrize("kernel, dilation", [(2, 1), (2, 3), (4, 1)])
def test_same_padding_with_even_kernels(kernel, dilation):
    """Odd total padding: PyTorch puts the extra row and column at the end."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation)
    x = torch.randn(1, 3, 9, 8)
    _roundtrip(conv, x)
    _roundtrip(DecoupledConv2d.from_conv(conv, 2).set_realization("split"), x)


def test_export_leaves_the_model_alone():
    conv = nn.Conv2d(3, 4, 2, padding="same", dilation=3)
    model = nn.Sequential(DecoupledConv2d.from_conv(conv, 2)).eval()
    onnx_bytes(model, torch.randn(1, 3, 8, 8))
    assert model[0].depthwise.padding == "same" and model[0].depthwise.padding_mode == "zeros"


def _decoupled_toy(order: str) -> nn.Module:
    model = toy().float()
    decouple_(model, DecoupleConfig(rank=2, order=order, fold_bn=True))
    for i, layer in enumerate(m for m in model.modules() if isinstance(m, DecoupledConv2d)):
        layer.set_realization(REALIZATIONS[order][i % len(REALIZATIONS[order])])
    return model


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_one_file_serves_every_batch_size(order):
    model = _decoupled_toy(order)  # a skip connection, folded BN, mixed realizations
    data = onnx_bytes(model, torch.randn(1, 3, 8, 8))
    run = ort_runner(ort_session(data, threads=1))
    x = torch.randn(3, 3, 8, 8)
    got = torch.from_numpy(run(x.numpy()))
    torch.testing.assert_close(got, model(x).detach(), rtol=1e-4, atol=1e-5)
    assert check_onnx(model, x, data)["ok"]


def test_fixed_batch_rejects_another_batch_size():
    model = _decoupled_toy("dw-pw")
    data = onnx_bytes(model, torch.randn(1, 3, 8, 8), dynamic_batch=False)
    with pytest.raises(Exception, match="(?i)dimension|shape"):
        ort_runner(ort_session(data))(np.zeros((3, 3, 8, 8), np.float32))


def test_a_wrong_export_is_caught():
    model = _decoupled_toy("dw-pw")
    x = torch.randn(2, 3, 8, 8)
    data = onnx_bytes(model, x)
    with torch.no_grad():
        model.conv3.pointwise.weight.mul_(1.01)  # PyTorch now disagrees with the file by ~1%
    result = check_onnx(model, x, data)
    assert not result["ok"] and result["rel_err"] > 1e-3


def test_float64_models_fail_clearly_in_onnx_runtime():
    layer = DecoupledConv2d.from_conv(nn.Conv2d(3, 4, 3), 2).double().eval()
    x = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32"):
        check_onnx(layer, x, onnx_bytes(layer, x))


def test_missing_packages_name_the_extra(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        export_util.importlib.util, "find_spec", lambda n, *a: None if n == "onnx" else real(n, *a)
    )
    with pytest.raises(ImportError, match=r"decouple\[export\]"):
        onnx_bytes(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2))


def test_when_both_exporters_fail_the_first_reason_is_one_line(monkeypatch):
    calls = []

    def fail(*args, dynamo, **kwargs):
        calls.append(dynamo)
        raise RuntimeError(f"op not covered ({'dynamo' if dynamo else 'torchscript'})\ntrace")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match=r"ONNX export failed: op not covered \(torchscript\)$"):
        onnx_bytes(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2))
    assert calls[0] is False  # the TorchScript exporter first
    assert calls[1:] in ([], [True])  # then dynamo, where onnxscript is installed


@pytest.mark.parametrize("order", ["dw-pw", "pw-dw"])
def test_torch_export_round_trip(order):
    model = _decoupled_toy(order)
    result = export_program(model, torch.randn(2, 3, 8, 8))
    assert result["ok"] and result["rel_err"] < 1e-5, result


def test_torch_export_failure_is_reported():
    class Branchy(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else x  # data-dependent control flow

    result = export_program(Branchy(), torch.ones(1, 2))
    assert result["ok"] is False and result["error"] and "\n" not in result["error"]


@pytest.fixture(scope="module")
def resnet18():
    torchvision = pytest.importorskip("torchvision", reason="torchvision not installed")
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    records = decouple_(model, DecoupleConfig(rank=2, fold_bn=True))
    assert sum(r.action == "decoupled" for r in records) > 0
    return model


def test_torchvision_resnet18_decoupled_exports(resnet18):
    data = onnx_bytes(resnet18, torch.randn(1, 3, 64, 64))
    x = torch.randn(2, 3, 64, 64)
    result = check_onnx(resnet18, x, data, rtol=1e-4)
    assert result["ok"] and result["rel_err"] < 1e-4, result


def test_fallback_exporter_is_silent_and_right(capfd):
    """The TorchScript exporter loses the spatial shape after ``repeat_interleave`` with a
    dynamic batch, so a non-global adaptive pool after a ``repeat`` layer fails there (printing
    its whole graph from C++); the dynamo exporter then takes over, quietly."""
    pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript")
    torch.manual_seed(3)
    layer = DecoupledConv2d.from_conv(nn.Conv2d(3, 4, 3, padding=1), 2)
    model = nn.Sequential(layer.set_realization("repeat"), nn.AdaptiveAvgPool2d(2)).eval()
    x = torch.randn(1, 3, 8, 8)
    capfd.readouterr()
    data = onnx_bytes(model, x)
    assert capfd.readouterr() == ("", "")
    assert check_onnx(model, torch.randn(3, 3, 8, 8), data)["ok"]


def test_attention_exports_with_the_torchscript_exporter(monkeypatch):
    """Under ``no_grad`` MultiheadAttention runs a fused op the TorchScript exporter lacks."""
    calls = []
    real = torch.onnx.export

    def spy(*args, dynamo, **kwargs):
        calls.append(dynamo)
        return real(*args, dynamo=dynamo, **kwargs)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = DecoupledConv2d.from_conv(nn.Conv2d(3, 8, 2, stride=2), 2)
            self.attn = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)

        def forward(self, x):
            return self.attn(self.conv(x).flatten(2).transpose(1, 2))

    torch.manual_seed(4)
    model = Attention().eval()
    monkeypatch.setattr(torch.onnx, "export", spy)
    with torch.no_grad():  # as a caller timing the model might
        data = onnx_bytes(model, torch.randn(1, 3, 8, 8))
    assert calls == [False]
    assert check_onnx(model, torch.randn(2, 3, 8, 8), data, rtol=1e-4)["ok"]


def test_weights_past_the_limit_go_to_a_file_beside_the_graph(tmp_path, monkeypatch):
    """What a 2.4 GiB ViT-H/14 takes, on a small model with the threshold lowered."""
    torch.manual_seed(0)
    model = _decoupled_toy("dw-pw").eval()
    x = torch.randn(2, 3, 8, 8)
    small = onnx_files(model, x, "m.onnx")
    assert list(small) == ["m.onnx"] and check_onnx(model, x, small)["ok"]
    files = onnx_files(model, x, "m.onnx", external_above=0)
    assert list(files) == ["m.onnx", "m.onnx.data"]
    import onnx

    graph = onnx.load_from_string(files["m.onnx"])  # the large weights left the graph
    external = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and 0 < sum(4 * np.prod(t.dims) for t in external) <= len(files["m.onnx.data"])
    result = check_onnx(model, torch.randn(3, 3, 8, 8), files)  # a batch of 3: dynamic axis
    assert result["checker"] and result["ok"] and result["rel_err"] < 1e-5
    for name, data in files.items():  # written anywhere, side by side, the pair runs
        (tmp_path / name).write_bytes(data)
    run = ort_runner(ort_session(tmp_path / "m.onnx"))
    with torch.no_grad():
        np.testing.assert_allclose(run(x.numpy()), model(x).numpy(), rtol=1e-4, atol=1e-5)
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1000)
    with pytest.raises(RuntimeError, match="onnx_files"):  # one file cannot hold them
        onnx_bytes(model, x)
    assert list(onnx_files(model, x, "m.onnx")) == ["m.onnx", "m.onnx.data"]


def test_onnx_runtime_sessions_share_one_cpu_arena():
    """Timing a layer's options side by side keeps one arena, not one per session (VGG-16's
    latency tables held 21.5 GB with one each)."""
    pytest.importorskip("onnxruntime")
    from decouple.runtime.export import onnx_bytes
    from decouple.runtime.onnx_check import ort_session

    conv = nn.Conv2d(3, 4, 3).eval()
    x = torch.randn(2, 3, 8, 8)
    sessions = [ort_session(onnx_bytes(conv, x)) for _ in range(2)]
    for s in sessions:
        assert s.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
        out = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(out), conv(x).detach(), rtol=1e-4, atol=1e-5)
