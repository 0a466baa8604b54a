"""Shared fixtures: the real pretrained CIFAR-10 assets in ../shared/assets (never committed)."""

import os

import pytest

from decouple.io.images import shared_assets_dir

REQUIRED = (
    "resnet20-12fca82f.th",
    "resnet32-d509ac18.th",
    "test_batch.truncated_first_3145728_bytes",
    "cifar10_test_jpeg_q75_YoongiKim.tar",
)


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
