"""The example suite of the README's quickstart runs where it is copied: beside a local Alpine mirror
(as on this machine), and in a plain clone, where the default `alpine` is downloaded."""

from __future__ import annotations

import shutil

import pytest

from .conftest import MIRROR, REPO
from .mirror import serve


@pytest.fixture
def clone(pytester, monkeypatch):
    """A copy of examples/ in a checkout `main/`, without anything beside it, and no NSBOX_ROOTFS."""
    shutil.copytree(REPO / "examples", pytester.path / "main" / "examples",
                    ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.delenv("NSBOX_ROOTFS", raising=False)
    monkeypatch.delenv("NSBOX_ALPINE_MIRROR", raising=False)
    return pytester


def test_the_examples_use_the_local_mirror_beside_the_checkout(clone, monkeypatch):
    (clone.path / "shared").mkdir()
    (clone.path / "shared" / "alpine-mirror").symlink_to(MIRROR)
    monkeypatch.chdir(clone.path / "main")
    result = clone.runpytest_subprocess("examples")
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["nsbox: rootfs */shared/alpine-mirror/v3.20/*alpine-minirootfs-3.20.3-x86_64.tar.gz*"])


def test_the_examples_download_the_default_alpine_in_a_plain_clone(clone, monkeypatch, tmp_path):
    mirror, stop = serve(MIRROR, tmp_path / "mirror")  # Alpine's CDN, as far as the plugin can tell
    try:
        monkeypatch.setenv("NSBOX_ALPINE_MIRROR", mirror.url)
        monkeypatch.setenv("NSBOX_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.chdir(clone.path / "main")
        result = clone.runpytest_subprocess("examples")
    finally:
        stop()
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["nsbox: rootfs alpine (not cached yet: fetched on first use)*"])
    assert mirror.downloads("alpine-minirootfs-3.20.3-x86_64.tar.gz") == 1
