"""Image sets for evaluation and calibration: the shared CIFAR-10 files, image folders, tensors.

Every loader returns an :class:`ImageSet` of uint8 pixels (or float pixels in [0, 1]), with
labels when known and the images' indices in their source (the CIFAR-10 test index), so that a
calibration set can be kept apart from an evaluation set drawn from the same source.
Preprocessing (``/255``, then per-channel mean and std) happens per batch in :meth:`as_float`.
"""

from __future__ import annotations

import io
import os
import pickletools
import re
import stat
import tarfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_TEST_SIZE = 10_000
# Layout of the python-version test_batch (see ../shared/assets/README.md): rows of 3072 bytes,
# R(1024) G(1024) B(1024), start at this offset.
CIFAR10_PIXELS_OFFSET = 20217
CIFAR10_ROW = 3 * 32 * 32
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
JPEG_NAME = re.compile(r"(\d{1,5})\.jpg")  # the image's rank within its class, in test order


@dataclass(frozen=True)
class ImageSet:
    """Images ``(n, C, H, W)`` (uint8, or float in [0, 1]), optional labels and source indices."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    indices: torch.Tensor | None = None
    name: str = "images"

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx) -> ImageSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return replace(
            self, images=self.images[idx], labels=pick(self.labels), indices=pick(self.indices)
        )

    def as_float(
        self, mean=None, std=None, start: int = 0, stop: int | None = None
    ) -> torch.Tensor:
        """Float32 images ``[start:stop]``: pixels in [0, 1], then ``(x − mean) / std`` per channel."""
        x = self.images[start:stop]
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if mean is not None:
            x = x - torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        if std is not None:
            x = x / torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        return x


def is_regular_image(path: str | os.PathLike) -> bool:
    """An image file by suffix that is a regular file (a FIFO of that name would hang a read)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode) and str(path).lower().endswith(IMAGE_SUFFIXES)
    except OSError:
        return False


def decode_rgb(data, where: object = None):
    """An RGB PIL image from a path or file object. Any failure to decode (damage, a decompression
    bomb) is a ValueError naming the image, so that it ends a CLI run with one line."""
    import warnings

    from PIL import Image

    where = where or (data if isinstance(data, (str, os.PathLike)) else "an image")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: refuse those as well.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(data) as im:
                return im.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"{where} is too large to decode safely ({e})") from None
    except Exception as e:  # noqa: BLE001 - PIL raises many types for damaged files
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"cannot read {where}: {msg}") from None


def read_prefix(path: str | os.PathLike, limit: int | None = None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if limit is None else f.read(limit)


def looks_like_cifar_batch(head: bytes) -> bool:
    return head[:2] == b"\x80\x02" and b"labels" in head


def cifar10_test_labels(test_batch_path: str | os.PathLike) -> list[int]:
    """All 10,000 CIFAR-10 test labels, read from the (possibly truncated) python ``test_batch``.

    ``pickle.load`` fails on a truncated file, but the labels list comes before the pixels, so
    the opcodes after the ``labels`` key are walked with ``pickletools.genops``.
    """
    raw = read_prefix(test_batch_path, CIFAR10_PIXELS_OFFSET)
    if not looks_like_cifar_batch(raw):
        raise ValueError(
            f"{test_batch_path} is not a python-version CIFAR-10 batch (pickle protocol 2)"
        )
    start = raw.index(b"labels") + len(b"labels")
    labels: list[int] = []
    in_list = False
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(raw[start:])):
            if op.name == "EMPTY_LIST":
                in_list = True
            elif in_list and op.name in ("BININT1", "BININT", "BININT2"):
                labels.append(int(arg))
                if len(labels) == CIFAR10_TEST_SIZE:
                    break
            elif in_list and op.name not in (
                "MARK",
                "APPENDS",
                "APPEND",
                "BINPUT",
                "LONG_BINPUT",
                "MEMOIZE",
            ):
                break
    except ValueError:  # ran off the prefix
        pass
    if len(labels) != CIFAR10_TEST_SIZE or not all(0 <= v < 10 for v in labels):
        raise ValueError(
            f"could not read the 10,000 labels from {test_batch_path} (found {len(labels)})"
        )
    return labels


def load_cifar10_exact(test_batch_path: str | os.PathLike) -> ImageSet:
    """The complete rows of a (truncated) CIFAR-10 ``test_batch``: exact pixels, labels, indices."""
    size = os.path.getsize(test_batch_path)
    n = (size - CIFAR10_PIXELS_OFFSET) // CIFAR10_ROW
    if n < 1:
        raise ValueError(f"{test_batch_path} is too short to hold a CIFAR-10 image ({size} bytes)")
    labels = cifar10_test_labels(test_batch_path)
    n = min(n, CIFAR10_TEST_SIZE)
    with open(test_batch_path, "rb") as f:
        f.seek(CIFAR10_PIXELS_OFFSET)
        pixels = np.frombuffer(f.read(n * CIFAR10_ROW), dtype=np.uint8).reshape(n, 3, 32, 32)
    return ImageSet(
        torch.from_numpy(pixels.copy()),
        torch.tensor(labels[:n], dtype=torch.long),
        torch.arange(n),
        name=f"CIFAR-10 test images 0..{n - 1} (exact pixels)",
    )


def load_cifar10_jpeg(
    tar_path: str | os.PathLike,
    test_batch_path: str | os.PathLike | None = None,
    min_index: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """CIFAR-10 test images from the JPEG tar (``test/<class>/NNNN.jpg``), read in place.

    ``NNNN`` is the image's rank within its class in test order, so with the 10,000 labels (from
    ``test_batch_path``, by default the truncated batch beside the tar) every file maps to its
    test index. Keeps indices ``>= min_index``; ``limit`` takes a seeded random sample of them.
    """

    tar_path = Path(tar_path)
    batch = (
        Path(test_batch_path)
        if test_batch_path
        else tar_path.with_name("test_batch.truncated_first_3145728_bytes")
    )
    labels = cifar10_test_labels(batch)
    by_class: dict[int, list[int]] = {c: [] for c in range(10)}
    for i, c in enumerate(labels):
        by_class[c].append(i)
    with tarfile.open(tar_path) as tf:
        members = []
        for m in tf.getmembers():
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 2 or parts[-2] not in CIFAR10_CLASSES:
                continue
            if not parts[-1].endswith(".jpg"):
                continue
            c, number = CIFAR10_CLASSES.index(parts[-2]), JPEG_NAME.fullmatch(parts[-1])
            if number is None or int(number[1]) >= len(by_class[c]):
                raise ValueError(
                    f"unexpected member {m.name!r}: CIFAR-10 JPEGs are <class>/NNNN.jpg with NNNN "
                    f"below {len(by_class[c])}"
                )
            index = by_class[c][int(number[1])]
            if index >= min_index:
                members.append((index, c, m))
        if not members:
            raise ValueError(f"{tar_path} holds no CIFAR-10 JPEG with test index >= {min_index}")
        members.sort(key=lambda t: t[0])
        if limit is not None and limit < len(members):
            pick = np.random.default_rng(seed).choice(len(members), size=limit, replace=False)
            members = [members[i] for i in sorted(pick)]
        images = []
        for _, _, m in members:  # decode only the chosen files
            im = decode_rgb(io.BytesIO(tf.extractfile(m).read()), m.name)
            images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
    idx = torch.tensor([t[0] for t in members])
    return ImageSet(
        torch.stack(images),
        torch.tensor([t[1] for t in members], dtype=torch.long),
        idx,
        name=f"{len(idx)} CIFAR-10 JPEG test images (index >= {int(idx.min())})",
    )


def load_image_folder(root: str | os.PathLike, size: tuple[int, int] | None = None) -> ImageSet:
    """An ImageFolder tree ``root/<class>/<image>``: classes sorted by name give the labels."""
    from PIL import Image

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{root} has no class folders (expected root/<class>/<image>)")
    images, labels = [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).iterdir()):
            if not is_regular_image(f):
                continue
            im = decode_rgb(f)
            if size is not None:
                im = im.resize((size[1], size[0]), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
            labels.append(label)
    if not images:
        raise ValueError(f"{root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    if len({tuple(t.shape) for t in images}) > 1:
        raise ValueError(f"images in {root} differ in size; give a size to resize them")
    return ImageSet(
        torch.stack(images), torch.tensor(labels), None, name=f"{len(images)} images in {root}"
    )


def load_tensor_file(path: str | os.PathLike) -> ImageSet:
    """A ``torch.save``-d dict ``{"images": (n, C, H, W), "labels": (n,) optional}``.

    uint8 images are pixels in 0..255; float images are taken as already in [0, 1].
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file
        raise ValueError(f"not a readable tensor file ({str(e).strip().splitlines()[0]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("images"), torch.Tensor):
        raise ValueError("expected a dict with an 'images' tensor of shape (n, C, H, W)")
    images, labels = obj["images"], obj.get("labels")
    if images.dim() != 4:
        raise ValueError(f"'images' must be (n, C, H, W); got shape {tuple(images.shape)}")
    if labels is not None and (
        not isinstance(labels, torch.Tensor) or labels.shape != (len(images),)
    ):
        raise ValueError("'labels' must be a tensor of shape (n,)")
    return ImageSet(
        images,
        None if labels is None else labels.long(),
        None,
        name=f"{len(images)} images from {path}",
    )


def load_images(
    path: str | os.PathLike,
    *,
    test_batch_path: str | os.PathLike | None = None,
    min_index: int = 0,
    limit: int | None = None,
    seed: int = 0,
) -> ImageSet:
    """Any supported image source, told apart by its content.

    A tar is the CIFAR-10 JPEG tar; a protocol-2 pickle holding ``labels`` is the CIFAR-10
    ``test_batch``; a directory is an image folder; anything else must be a tensor file.
    ``min_index`` and ``limit`` apply to the CIFAR-10 JPEG tar (other sources are small).
    """
    path = Path(path)
    if path.is_dir():
        return load_image_folder(path)
    if not path.is_file():
        raise ValueError(f"no such file or directory: {path}")
    if tarfile.is_tarfile(path):
        return load_cifar10_jpeg(path, test_batch_path, min_index=min_index, limit=limit, seed=seed)
    if looks_like_cifar_batch(read_prefix(path, 4096)):
        return load_cifar10_exact(path)
    return load_tensor_file(path)


def shared_assets_dir() -> Path | None:
    """The shared ``cifar10`` assets folder: ``$DECOUPLE_ASSETS``, else ``../shared/assets/cifar10``
    beside the current folder or the repository. ``None`` when absent."""
    env = os.environ.get("DECOUPLE_ASSETS")
    candidates = [Path(env)] if env else []
    repo = Path(__file__).resolve().parents[2]  # decouple/io/images.py -> the repository
    candidates += [
        Path.cwd().parent / "shared/assets/cifar10",
        repo.parent / "shared/assets/cifar10",
    ]
    for c in candidates:
        if (c / "test_batch.truncated_first_3145728_bytes").is_file():
            return c
    return None
