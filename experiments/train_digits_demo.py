"""Train the bundled demo model: ``DigitsCNN`` on scikit-learn's 8×8 handwritten digits.

Splits the 1,797 digits 75/25 (stratified, ``random_state=0``), trains with Adam, a cosine
learning-rate schedule and random ±1-pixel shifts for a fixed number of epochs, prints train and
test accuracy, and writes into ``--out-dir`` (default ``decouple/demo`` in this repository):

* ``digits_cnn.pt``: the model's plain ``state_dict`` (float32 parameters);
* ``digits_test.pt``: ``{"images": uint8 (n, 1, 8, 8) raw 0..16 pixels, "labels": int64 (n,)}``,
  the test split only.

Both files are written atomically and load with ``torch.load(..., weights_only=True)``. Seeds are
fixed and deterministic algorithms are requested, so a rerun on the same platform reproduces the
same weights. It takes well under a minute on two CPU cores. To rerun::

    pip install -e '.[demo-train]' && python experiments/train_digits_demo.py
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from decouple.demo import MODEL_FILENAME, TEST_DATA_FILENAME, normalize
from decouple.models import build_model

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT_DIR = REPO_ROOT / "decouple" / "demo"

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4


def load_split() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Raw uint8 images ``(n, 1, 8, 8)`` and int64 labels of the fixed train and test splits."""
    digits = load_digits()
    images = torch.from_numpy(digits.images).round().to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(digits.target).to(torch.int64)
    idx_train, idx_test = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, stratify=labels.numpy(), random_state=0
    )
    idx_train, idx_test = torch.from_numpy(idx_train), torch.from_numpy(idx_test)
    return images[idx_train], labels[idx_train], images[idx_test], labels[idx_test]


def random_shift(raw: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shift each raw image by an independent random offset in {-1, 0, 1}² (zero fill)."""
    b, _, h, w = raw.shape
    padded = F.pad(raw, (1, 1, 1, 1))  # pad with raw 0 = background
    dy = torch.randint(0, 3, (b,), generator=generator)
    dx = torch.randint(0, 3, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h))[:, :, None]  # (b, h, 1)
    cols = (dx[:, None] + torch.arange(w))[:, None, :]  # (b, 1, w)
    batch = torch.arange(b)[:, None, None]
    return padded[batch, 0, rows, cols].unsqueeze(1)


@torch.no_grad()
def accuracy(model: torch.nn.Module, raw: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of ``model`` (in eval mode) on raw images."""
    model.eval()
    pred = model(normalize(raw)).argmax(dim=1)
    return (pred == labels).float().mean().item()


def train(x_train: torch.Tensor, y_train: torch.Tensor) -> torch.nn.Module:
    """Train a fresh ``digits_cnn`` on raw uint8 images; returns it in eval mode."""
    torch.manual_seed(SEED)
    generator = torch.Generator().manual_seed(SEED)
    model = build_model("digits_cnn")
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = -(-len(y_train) // BATCH_SIZE)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, EPOCHS * steps_per_epoch)

    for epoch in range(EPOCHS):
        model.train()
        order = torch.randperm(len(y_train), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            idx = order[start : start + BATCH_SIZE]
            x = normalize(random_shift(x_train[idx], generator))
            loss = F.cross_entropy(model(x), y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(idx)
        if (epoch + 1) % 10 == 0:
            print(f"epoch {epoch + 1:3d}/{EPOCHS}  loss {total_loss / len(y_train):.4f}")
    return model.eval()


def atomic_save(obj: object, path: Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s directory, then ``os.replace`` it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the bundled files should be world-readable
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir",
        type=Path,
        default=DEFAULT_OUT_DIR,
        help=f"where to write {MODEL_FILENAME} and {TEST_DATA_FILENAME} (default: %(default)s)",
    )
    args = parser.parse_args(argv)

    try:
        torch.use_deterministic_algorithms(True)
    except RuntimeError as exc:  # pragma: no cover - depends on the platform
        print(f"warning: deterministic algorithms unavailable ({exc})")

    x_train, y_train, x_test, y_test = load_split()
    print(f"train {len(y_train)}  test {len(y_test)}")

    t0 = time.perf_counter()
    model = train(x_train, y_train)
    print(f"trained in {time.perf_counter() - t0:.1f} s")
    print(f"train accuracy {accuracy(model, x_train, y_train):.4f}")
    print(f"test accuracy  {accuracy(model, x_test, y_test):.4f}")

    args.out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    atomic_save(state, args.out_dir / MODEL_FILENAME)
    atomic_save(
        {"images": x_test.contiguous(), "labels": y_test.contiguous()},
        args.out_dir / TEST_DATA_FILENAME,
    )
    for name in (MODEL_FILENAME, TEST_DATA_FILENAME):
        path = args.out_dir / name
        print(f"wrote {path} ({path.stat().st_size / 1024:.1f} KiB)")


if __name__ == "__main__":
    main()
