"""Shared test set-up: the real Alpine minirootfs from ../shared/alpine-mirror, a repo-local cache.

The sandbox tests use the plugin's own fixtures, so NSBOX_ROOTFS and NSBOX_CACHE_DIR are set here
(unless the caller set them) before the plugin reads them.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
MIRROR = pathlib.Path(os.environ.get("NSBOX_TEST_MIRROR", REPO.parent / "shared" / "alpine-mirror"))
ALPINE_320 = MIRROR / "v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"
ALPINE_319 = MIRROR / "v3.19/releases/x86_64/alpine-minirootfs-3.19.4-x86_64.tar.gz"

os.environ.setdefault("NSBOX_ROOTFS", str(ALPINE_320))
os.environ.setdefault("NSBOX_CACHE_DIR", str(REPO / "rootfs-cache"))


def pytest_configure(config: pytest.Config) -> None:
    rootfs = pathlib.Path(os.environ["NSBOX_ROOTFS"])
    if not rootfs.exists():
        raise pytest.UsageError(
            f"the tests need the Alpine minirootfs at {rootfs}: set NSBOX_TEST_MIRROR to a copy of "
            "shared/alpine-mirror, or NSBOX_ROOTFS to an Alpine minirootfs tarball")


@pytest.fixture
def alpine_tarball() -> pathlib.Path:
    return pathlib.Path(os.environ["NSBOX_ROOTFS"])


@pytest.fixture
def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["NSBOX_CACHE_DIR"])
