"""The bundled demo model and test split: loadable, accurate, traceable."""

from __future__ import annotations

import pytest
import torch
import torch.fx

from decouple import demo
from decouple.demo import PIXEL_MAX, load_demo_model, load_demo_test_set, normalize
from decouple.models import build_model, get_model_info, list_models
from decouple.models.digits import DigitsCNN

MIN_TEST_ACCURACY = 0.95


@pytest.fixture(scope="module")
def raw_test_data() -> dict:
    return torch.load(demo.test_data_path(), map_location="cpu", weights_only=True)


def test_registered() -> None:
    assert "digits_cnn" in list_models()
    info = get_model_info("digits_cnn")
    assert info.input_shape == (1, 8, 8)
    assert isinstance(info.build(), DigitsCNN)


def test_bundled_files_are_small() -> None:
    assert demo.model_path().stat().st_size + demo.test_data_path().stat().st_size < 1_000_000


def test_weights_load_strictly_into_registry_model() -> None:
    state = torch.load(demo.model_path(), map_location="cpu", weights_only=True)
    model = build_model("digits_cnn")
    model.load_state_dict(state, strict=True)
    for name, tensor in state.items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32, name


def test_demo_model_accuracy() -> None:
    model = load_demo_model()
    assert not model.training
    images, labels = load_demo_test_set()
    with torch.no_grad():
        acc = (model(images).argmax(dim=1) == labels).float().mean().item()
    assert acc >= MIN_TEST_ACCURACY


def test_symbolic_trace_matches_eager() -> None:
    model = load_demo_model()
    traced = torch.fx.symbolic_trace(model)
    targets = {n.target for n in traced.graph.nodes if n.op == "call_module"}
    assert {"conv1", "conv2", "conv3", "conv4", "fc"} <= targets
    images, _ = load_demo_test_set()
    with torch.no_grad():
        torch.testing.assert_close(traced(images[:32]), model(images[:32]))


def test_raw_test_split_format(raw_test_data: dict) -> None:
    images, labels = raw_test_data["images"], raw_test_data["labels"]
    assert images.dtype == torch.uint8
    assert images.ndim == 4 and images.shape[1:] == (1, 8, 8)
    assert labels.dtype == torch.int64 and labels.shape == (images.shape[0],)
    assert int(images.min()) >= 0 and int(images.max()) == PIXEL_MAX
    assert set(labels.tolist()) == set(range(10))


def test_loaded_test_set_is_normalized(raw_test_data: dict) -> None:
    images, labels = load_demo_test_set()
    assert images.dtype == torch.float32 and images.shape == raw_test_data["images"].shape
    assert labels.dtype == torch.int64
    torch.testing.assert_close(images, normalize(raw_test_data["images"]))
    assert images.min() >= -1.0 and images.max() <= 1.0
