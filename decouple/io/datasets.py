"""Image sources as ``torch.utils.data`` datasets: one image read and prepared at a time.

* a labelled tree ``root/<class>/<image>``: ``torchvision.datasets.ImageFolder``;
* a folder of images, at any depth, unlabelled (calibration);
* a tar of images, read member by member in place, never extracted; labelled by the folder each
  member sits in when there is one;
* the shared CIFAR-10 files and tensor files: small, held as uint8 pixels
  (:mod:`decouple.io.images`), prepared per item.

Images of any size and mode (greyscale, palette, RGBA) become RGB and go through the
:class:`~decouple.io.preprocess.Preprocess` of the model. Every dataset has a ``name`` and, where
its source numbers images (the CIFAR-10 test index), ``indices``.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from .images import (
    IMAGE_SUFFIXES,
    ImageSet,
    decode_rgb,
    is_regular_image,
    load_cifar10_exact,
    load_cifar10_jpeg,
    load_tensor_file,
    looks_like_cifar_batch,
    read_prefix,
)
from .preprocess import Preprocess

NO_LABEL = -1


def _rgb(data) -> object:
    return decode_rgb(data)


class FileImages(Dataset):
    """Image files, each read when asked for; ``labels`` optional."""

    def __init__(self, paths: list[Path], transform, labels: list[int] | None = None, name=""):
        self.paths, self.transform, self.labels = paths, transform, labels
        self.name = name or f"{len(paths)} images"
        self.indices = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(
            _rgb(self.paths[i])
        ), NO_LABEL if self.labels is None else self.labels[i]


class TarImages(Dataset):
    """The image members of a tar, read in place by offset (each worker opens its own handle)."""

    def __init__(self, path: Path, transform, labelled: bool = False):
        self.path, self.transform = path, transform
        with tarfile.open(path) as tf:
            members = [
                m for m in tf.getmembers() if m.isfile() and m.name.lower().endswith(IMAGE_SUFFIXES)
            ]
        members.sort(key=lambda m: m.name)
        self.spans = [(m.offset_data, m.size) for m in members]
        folders = [Path(m.name).parent.name for m in members]
        self.classes = sorted(set(folders)) if labelled and all(folders) else None
        self.labels = [self.classes.index(f) for f in folders] if self.classes else None
        self.name = f"{len(members)} images in {path.name}"
        self.indices = None
        self._handle, self._pid = None, None

    def __len__(self) -> int:
        return len(self.spans)

    def __getitem__(self, i: int):
        if self._handle is None or self._pid != os.getpid():  # a DataLoader worker is a new process
            self._handle, self._pid = open(self.path, "rb"), os.getpid()  # noqa: SIM115
        offset, size = self.spans[i]
        self._handle.seek(offset)
        image = _rgb(io.BytesIO(self._handle.read(size)))
        return self.transform(image), NO_LABEL if self.labels is None else self.labels[i]

    def __getstate__(self):  # the open file stays behind when a worker is started
        return {**self.__dict__, "_handle": None, "_pid": None}


class PixelImages(Dataset):
    """An in-memory :class:`~decouple.io.images.ImageSet` (the small CIFAR and tensor sources)."""

    def __init__(self, images: ImageSet, preprocess: Preprocess):
        self.set, self.preprocess = images, preprocess
        self.name, self.indices = images.name, images.indices
        self.labels = images.labels

    def __len__(self) -> int:
        return len(self.set)

    def __getitem__(self, i: int):
        prep = self.preprocess
        if prep.resize is not None or prep.crop is not None:
            x = prep.transform()(self.set.images[i])[None]
        else:
            x = self.set.as_float(prep.mean, prep.std, i, i + 1)
        label = NO_LABEL if self.set.labels is None else int(self.set.labels[i])
        return x[0], label


def _is_cifar_jpeg_tar(path: Path) -> bool:
    with tarfile.open(path) as tf:
        for m in tf:
            if m.isfile():
                parts = m.name.split("/")
                return len(parts) >= 3 and parts[-3] == "test" and parts[-1].endswith(".jpg")
    return False


def open_images(
    path: str | os.PathLike,
    preprocess: Preprocess,
    labelled: bool,
    min_index: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> Dataset:
    """The images at ``path`` as a dataset, told apart by content (see the module docstring).

    ``labelled`` asks for labels: a folder must then be a class tree. ``limit`` takes a seeded
    random sample of that many images (kept in source order); ``min_index`` keeps only images
    numbered at or above it in sources that number them (the CIFAR-10 test index).
    """
    path = Path(path)
    if path.is_dir():
        data = _folder(path, preprocess, labelled)
    elif not path.exists():
        raise ValueError(f"no such file or directory: {path}")
    elif not path.is_file():
        raise ValueError("not a regular file or a directory (a FIFO, device or socket?)")
    elif tarfile.is_tarfile(path):
        if _is_cifar_jpeg_tar(path):
            pixels = load_cifar10_jpeg(path, min_index=min_index, limit=limit, seed=seed)
            return PixelImages(pixels, preprocess)
        data = TarImages(path, _transform(preprocess), labelled)
        if labelled and data.labels is None:
            raise ValueError("its images are not in class folders (<class>/<image>)")
    elif looks_like_cifar_batch(read_prefix(path, 4096)):
        data = PixelImages(load_cifar10_exact(path), preprocess)
    else:
        data = PixelImages(load_tensor_file(path), preprocess)
    if labelled and isinstance(data, PixelImages) and data.labels is None:
        raise ValueError("it has no labels; accuracy needs them")
    if data.indices is not None and min_index > 0:
        keep = (data.indices >= min_index).nonzero().flatten().tolist()
        data = _subset(data, keep)
    if limit is not None and limit < len(data):
        pick = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:limit]
        data = _subset(data, pick.sort().values.tolist())
    return data


def _subset(data: Dataset, keep: list[int]) -> Dataset:
    sub = Subset(data, keep)
    sub.name = getattr(data, "name", "images")
    indices = getattr(data, "indices", None)
    sub.source_indices = None if indices is None else indices[keep]
    return sub


def _transform(preprocess: Preprocess):
    try:
        return preprocess.transform()
    except ImportError:
        raise ValueError(
            "image folders and tars need torchvision: pip install 'decouple[vision]'"
        ) from None


def _folder(root: Path, preprocess: Preprocess, labelled: bool) -> Dataset:
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if labelled:
        if not classes:
            raise ValueError("it has no class folders (expected <root>/<class>/<image>)")
        from torchvision.datasets import ImageFolder

        data = ImageFolder(
            str(root), transform=_transform(preprocess), loader=_rgb, is_valid_file=is_regular_image
        )
        data.name, data.indices = f"{len(data)} images in {root}", None
        return data
    paths = sorted(p for p in root.rglob("*") if is_regular_image(str(p)))
    if not paths:
        raise ValueError(f"it holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return FileImages(paths, _transform(preprocess), name=f"{len(paths)} images in {root}")


def numbered_source(path: str | os.PathLike) -> bool:
    """Whether the file numbers its images (the CIFAR-10 test batch and JPEG tar), so that one
    part can calibrate and another evaluate."""
    path = Path(path)
    if not path.is_file():
        return False
    if tarfile.is_tarfile(path):
        return _is_cifar_jpeg_tar(path)
    return looks_like_cifar_batch(read_prefix(path, 4096))


def source_indices(data: Dataset) -> torch.Tensor | None:
    """The source's numbers of the images in ``data`` (the CIFAR-10 test index), if it has them."""
    if isinstance(data, Subset):
        return getattr(data, "source_indices", None)
    return getattr(data, "indices", None)


def loader(data: Dataset, batch_size: int = 64, workers: int = 0) -> DataLoader:
    """Mini-batches of ``(images, labels)`` in a fixed order, the same on every pass."""
    return DataLoader(
        data, batch_size=batch_size, shuffle=False, num_workers=workers,
        persistent_workers=workers > 0,
    )  # fmt: skip
