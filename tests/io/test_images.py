"""Image loaders: the shared CIFAR-10 files, image folders, tensor files, and the dispatcher."""

import numpy as np
import pytest
import torch
from PIL import Image

from decouple.io.evaluate import evaluate, evaluate_set
from decouple.io.images import (
    ImageSet,
    cifar10_test_labels,
    load_cifar10_exact,
    load_cifar10_jpeg,
    load_image_folder,
    load_images,
    load_tensor_file,
)

BATCH = "test_batch.truncated_first_3145728_bytes"
TAR = "cifar10_test_jpeg_q75_YoongiKim.tar"


def test_cifar_labels_and_exact_images(cifar_assets):
    labels = cifar10_test_labels(cifar_assets / BATCH)
    assert len(labels) == 10_000 and labels[:10] == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(labels).tolist() == [1000] * 10  # CIFAR-10's test set is balanced
    exact = load_cifar10_exact(cifar_assets / BATCH)
    assert exact.images.shape == (1017, 3, 32, 32) and exact.images.dtype == torch.uint8
    assert exact.labels.tolist() == labels[:1017] and exact.indices.tolist() == list(range(1017))
    assert load_images(cifar_assets / BATCH).images.equal(exact.images)


def test_cifar_jpeg_sample_avoids_the_evaluation_images(cifar_assets):
    labels = cifar10_test_labels(cifar_assets / BATCH)
    a = load_cifar10_jpeg(cifar_assets / TAR, min_index=1017, limit=64, seed=3)
    b = load_images(cifar_assets / TAR, min_index=1017, limit=64, seed=3)
    assert len(a) == 64 and a.images.shape == (64, 3, 32, 32)
    assert int(a.indices.min()) >= 1017 and a.indices.tolist() == sorted(a.indices.tolist())
    assert a.labels.tolist() == [labels[i] for i in a.indices.tolist()]
    assert torch.equal(a.images, b.images)  # same seed, same sample
    c = load_cifar10_jpeg(cifar_assets / TAR, min_index=1017, limit=64, seed=4)
    assert a.indices.tolist() != c.indices.tolist()


def test_jpeg_and_exact_pixels_agree_roughly(cifar_assets):
    """The JPEG of test image i is a lossy copy of exact image i: the file→index map is right."""
    exact = load_cifar10_exact(cifar_assets / BATCH)
    jpeg = load_cifar10_jpeg(cifar_assets / TAR, min_index=1000, limit=None)
    first = jpeg.subset(torch.arange(17))  # indices 1000..1016 are in both
    assert first.indices.tolist() == list(range(1000, 1017))
    diff = (first.images.float() - exact.images[1000:1017].float()).abs().mean()
    shuffled = (first.images.float() - exact.images[999:1016].float()).abs().mean()
    assert diff < 10 < shuffled


def test_image_folder_tensor_file_and_dispatch(tmp_path):
    rng = np.random.default_rng(0)
    for cls in ("b_dog", "a_cat"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 5, 3), dtype=np.uint8)).save(
                tmp_path / "imgs" / cls / f"{i}.png"
            )
    folder = load_image_folder(tmp_path / "imgs")
    assert folder.images.shape == (6, 3, 6, 5) and folder.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert load_image_folder(tmp_path / "imgs", size=(4, 4)).images.shape == (6, 3, 4, 4)
    assert torch.equal(load_images(tmp_path / "imgs").images, folder.images)

    torch.save({"images": folder.images, "labels": folder.labels}, tmp_path / "t.pt")
    tensors = load_tensor_file(tmp_path / "t.pt")
    assert torch.equal(tensors.images, folder.images) and torch.equal(
        load_images(tmp_path / "t.pt").labels, folder.labels
    )


@pytest.mark.parametrize(
    "content,match",
    [
        ({"pixels": torch.zeros(2)}, "images"),
        ({"images": torch.zeros(2, 3)}, "n, C, H, W"),
        (b"junk", "tensor file"),
    ],
)
def test_bad_sources_raise_value_error(tmp_path, content, match):
    path = tmp_path / "bad.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match=match):
        load_images(path)
    with pytest.raises(ValueError, match="no such"):
        load_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="class folders"):
        load_images(tmp_path / "empty")


def test_as_float_and_evaluate_set_agree_with_evaluate():
    g = torch.Generator().manual_seed(0)
    data = ImageSet(
        torch.randint(0, 256, (37, 3, 4, 4), generator=g, dtype=torch.uint8), torch.arange(37) % 5
    )
    x = data.as_float((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    assert torch.allclose(x[:, 1], (data.images[:, 1].float() / 255 - 0.4) / 0.2)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 5))
    whole = evaluate(model, x, data.labels)
    batched = evaluate_set(model, data, (0.5, 0.4, 0.3), (0.2, 0.2, 0.2), batch_size=8)
    assert whole["top1"] == pytest.approx(batched["top1"]) and whole["loss"] == pytest.approx(
        batched["loss"], rel=1e-5
    )
