"""The MobileNetV2-style CIFAR-10 zoo entry, checked against its ONNX original in ONNX Runtime."""

import importlib
from pathlib import Path

import numpy as np
import pytest
import torch

from decouple.io.checkpoint import load_model
from decouple.io.errors import InputError
from decouple.io.images import load_cifar10_exact
from decouple.io.onnx_weights import state_dict_from_onnx
from decouple.models import build_model, get_model_info

ROOT = Path(__file__).resolve().parents[2]
ONNX = "mbv2_tinymlperf_alibaba_cifar10.onnx"
BATCH = "test_batch.truncated_first_3145728_bytes"


@pytest.fixture(scope="module")
def onnx_path(cifar_assets):
    pytest.importorskip("onnx")
    return cifar_assets / ONNX


@pytest.fixture(scope="module")
def session(onnx_path):
    ort = pytest.importorskip("onnxruntime")
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1  # as the suite's torch
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def model(onnx_path):
    model = build_model("cifar_mbv2")
    model.load_state_dict(state_dict_from_onnx(onnx_path), strict=True)
    return model.eval()


def test_builds_by_name_with_the_described_convs_and_traces():
    info = get_model_info("cifar_mbv2")
    assert info.input_shape == (3, 32, 32) and info.meta["std"] == (0.229, 0.224, 0.225)
    model = build_model("cifar_mbv2").eval()
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    depthwise = [c for c in convs if c.groups > 1 and c.groups == c.in_channels]
    assert (len(convs), len(pointwise), len(depthwise)) == (26, 17, 8)
    assert all(m.eps == 1e-3 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert [b.residual for b in model.blocks] == [False, True, False, True, False, True, False]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    torch.fx.symbolic_trace(model)


def test_keys_are_the_onnx_initializers(onnx_path):
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    names = {i.name for i in graph.initializer}
    keys = build_model("cifar_mbv2").state_dict().keys()
    # The exporter drops num_batches_tracked; BatchNorm fills it in on a strict load.
    assert {k for k in keys if not k.endswith("num_batches_tracked")} == names
    assert len(names) == 132
    weights = state_dict_from_onnx(onnx_path)
    assert set(weights) == names and all(w.dtype == torch.float32 for w in weights.values())
    # As many residual blocks as the graph has Add nodes.
    adds = sum(n.op_type == "Add" for n in graph.node)
    assert adds == sum(b.residual for b in build_model("cifar_mbv2").blocks) == 3


def test_agrees_with_onnxruntime_on_random_inputs(model, session):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(x).numpy()
    (theirs,) = session.run(None, {"actual_input_1": x.numpy()})
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    print(f"PyTorch vs ONNX Runtime: max relative error {err:.2e}")
    assert err < 1e-4


def test_top1_on_exact_images_equals_onnxruntime(cifar_assets, model, session):
    data = load_cifar10_exact(cifar_assets / BATCH)
    meta = get_model_info("cifar_mbv2").meta
    x = data.as_float(meta["mean"], meta["std"])
    with torch.no_grad():
        ours = int((model(x).argmax(1) == data.labels).sum())
    (logits,) = session.run(None, {"actual_input_1": x.numpy()})
    theirs = int((logits.argmax(1) == data.labels.numpy()).sum())
    print(f"cifar_mbv2: PyTorch {ours}/{len(data)}, ONNX Runtime {theirs}/{len(data)}")
    assert ours == theirs
    assert ours == 843  # the assets README's measurement


def test_script_writes_a_checkpoint_the_cli_loads(onnx_path, tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    script = importlib.import_module("mbv2_from_onnx")
    out = tmp_path / "mbv2.pt"
    assert script.main(["--onnx", str(onnx_path), "--out", str(out)]) == 0
    model, shape, kind = load_model(out, "cifar_mbv2")
    assert shape == (3, 32, 32) and kind == "state_dict"
    expected = state_dict_from_onnx(onnx_path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
    with pytest.raises(SystemExit) as e:  # an existing output is kept without --force
        script.main(["--onnx", str(onnx_path), "--out", str(out)])
    assert e.value.code == 2 and "--force" in capsys.readouterr().err
    assert script.main(["--onnx", str(onnx_path), "--out", str(out), "--force"]) == 0


@pytest.mark.parametrize("content", [b"not an onnx model\n" * 20, b"", None])
def test_bad_onnx_input_is_one_line_input_error(tmp_path, content):
    pytest.importorskip("onnx")
    path = tmp_path / "model.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(InputError) as e:
        state_dict_from_onnx(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)
