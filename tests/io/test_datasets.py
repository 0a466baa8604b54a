"""ImageNet-style inputs: folders and tars of JPEGs of every size and mode, read one at a time,
prepared as the weights' transforms say, streamed by a DataLoader; and the CLI on them."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("torchvision")
from PIL import Image  # noqa: E402

from decouple.io.datasets import (  # noqa: E402
    FileImages,
    TarImages,
    loader,
    open_images,
)
from decouple.io.preprocess import Preprocess, default_preprocess  # noqa: E402

TESTS_DIR = Path(__file__).resolve().parents[1]
SIZES = [(40, 30), (25, 50), (64, 64), (33, 21)]  # (width, height): landscape, portrait, square


def make_tree(root: Path, classes=("cat", "dog", "fox"), per_class=4, seed=0) -> Path:
    """``root/<class>/<n>.jpg`` of varying sizes; every fourth greyscale, one RGBA PNG."""
    rng = np.random.default_rng(seed)
    for c, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            w, h = SIZES[(c + i) % len(SIZES)]
            if i % 4 == 3:
                im = Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
            else:
                im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")
            im.save(root / cls / f"{i}.jpg", quality=90)
    rgba = rng.integers(0, 256, (30, 30, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(root / classes[0] / "extra.png")
    return root


def make_tar(tree: Path, path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        for f in sorted(tree.rglob("*")):
            if f.is_file():
                tf.add(f, arcname=f"val/{f.relative_to(tree)}")
    return path


PREP = Preprocess(resize=20, crop=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_a_class_tree_is_an_image_folder_of_rgb_images_at_the_crop_size(tmp_path):
    tree = make_tree(tmp_path / "val")
    data = open_images(tree, PREP, labelled=True)
    assert len(data) == 13 and data.classes == ["cat", "dog", "fox"]
    shapes = {tuple(data[i][0].shape) for i in range(len(data))}
    assert shapes == {(3, 16, 16)}  # greyscale and RGBA come out as RGB
    labels = [data[i][1] for i in range(len(data))]
    assert labels == [0] * 5 + [1] * 4 + [2] * 4


def test_unlabelled_folders_and_tars_read_the_same_images(tmp_path):
    tree = make_tree(tmp_path / "val")
    folder = open_images(tree, PREP, labelled=False)
    tar = open_images(make_tar(tree, tmp_path / "val.tar"), PREP, labelled=False)
    assert isinstance(folder, FileImages) and isinstance(tar, TarImages)
    assert len(folder) == len(tar) == 13
    for i in range(len(folder)):  # both sorted by path: same order, same pixels
        torch.testing.assert_close(folder[i][0], tar[i][0])
    labelled = open_images(tmp_path / "val.tar", PREP, labelled=True)
    assert labelled.classes == ["cat", "dog", "fox"] and labelled[12][1] == 2


def test_the_transform_is_the_weights_pipeline(tmp_path):
    (tmp_path / "val" / "a").mkdir(parents=True)
    yy, xx = np.mgrid[0:30, 0:40]  # a smooth picture: resampling filters agree on it
    rgb = np.stack([xx * 6, yy * 8, (xx + yy) * 3], axis=-1).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(tmp_path / "val" / "a" / "smooth.png")
    data = open_images(tmp_path / "val", PREP, labelled=True)
    # by hand: short side 30 -> 20 (40 -> int(26.7) = 26), centre 16×16, [0, 1], normalised
    im = Image.fromarray(rgb, "RGB").resize((26, 20), Image.BILINEAR)
    left, top = (26 - 16) // 2, (20 - 16) // 2
    x = torch.from_numpy(np.asarray(im.crop((left, top, left + 16, top + 16))).copy())
    x = (x.permute(2, 0, 1).float() / 255 - 0.5) / 0.25
    assert data[0][0].shape == (3, 16, 16)
    assert (data[0][0] - x).abs().max() < 0.1  # within a few grey levels of PIL's resize


def test_a_dataloader_with_workers_streams_the_same_batches(tmp_path):
    tree = make_tree(tmp_path / "val")
    data = open_images(make_tar(tree, tmp_path / "val.tar"), PREP, labelled=True)
    serial = [(x, y) for x, y in loader(data, 5)]
    parallel = [(x, y) for x, y in loader(data, 5, workers=2)]
    assert [len(x) for x, _ in serial] == [5, 5, 3]
    for (a, la), (b, lb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb)


def test_a_sample_is_seeded_and_in_source_order(tmp_path):
    tree = make_tree(tmp_path / "val")
    a = open_images(tree, PREP, labelled=False, limit=5)
    b = open_images(tree, PREP, labelled=False, limit=5)
    assert a.indices == b.indices == sorted(a.indices) and len(a) == 5


def test_defaults_come_from_the_weights_enum_or_our_registry():
    vgg = default_preprocess("vgg16")
    assert (vgg.resize, vgg.crop) == (256, 224)
    assert vgg.mean == pytest.approx((0.485, 0.456, 0.406))
    inception = default_preprocess("inception_v3")
    assert (inception.resize, inception.crop) == (342, 299)
    cifar = default_preprocess("cifar_resnet20")
    assert cifar.resize is None and cifar.crop is None and len(cifar.mean) == 3
    assert default_preprocess("mypkg.nets:build") == Preprocess()
    assert vgg.with_overrides(crop=192, mean=None).crop == 192


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(crop=0), "crop must be a positive"),
        (dict(resize=2.5), "resize must be a positive"),
        (dict(std=(1.0, 0.0, 1.0)), "std must be positive"),
        (dict(mean=(0.5, 0.5), std=(0.2, 0.2, 0.2)), "differ in length"),
        (dict(std=(1.0, 1e-9)), "std must be positive"),
        (dict(mean=(float("nan"),)), "finite"),
        (dict(std=[0.5]), "tuple"),
        (dict(mean=(True,)), "tuple"),
    ],
)
def test_bad_preprocessing_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Preprocess(**kwargs)


def test_one_value_broadcasts_and_channels_are_checked():
    prep = Preprocess(mean=(0.5,), std=(0.2, 0.2, 0.2))  # one mean for every channel is fine
    prep.check_channels(3)
    with pytest.raises(ValueError, match="takes 1 channels"):
        prep.check_channels(1)


def test_the_cli_evaluates_and_calibrates_on_folders_and_tars(tmp_path, capsys, monkeypatch):
    import tiny_archs

    from decouple.cli.run import main

    monkeypatch.syspath_prepend(str(TESTS_DIR))
    monkeypatch.chdir(tmp_path)  # outputs go to the current folder
    torch.manual_seed(0)
    torch.save(tiny_archs.small_cnn().state_dict(), tmp_path / "net.pt")
    make_tree(tmp_path / "val")
    make_tree(tmp_path / "calib_tree", seed=1)
    make_tar(tmp_path / "calib_tree", tmp_path / "calib.tar")
    args = [
        tmp_path / "net.pt", "--arch", "tiny_archs:small_cnn", "--input-shape", "3,16,16",
        "--rank", "2", "--data", tmp_path / "val", "--calib", tmp_path / "calib.tar",
        "--resize", "20", "--crop", "16", "--batch-size", "4", "--calib-size", "8",
    ]  # fmt: skip
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert code == 0, err
    report = json.loads((tmp_path / "net.decoupled.report.json").read_text())
    assert report["accuracy"]["before"]["n"] == 13 and report["calibration_images"] == 8
    assert report["calibration"]  # every decoupled layer refit

    wrong = [str(a) for a in args[:-8]] + ["--data", str(tmp_path / "val"), "--force"]
    assert main(wrong) == 2  # no resize/crop: images of mixed sizes do not fit 3×16×16
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--resize/--crop" in err
