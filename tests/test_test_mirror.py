"""The tests' own Alpine: ../shared/alpine-mirror, else the pinned releases fetched, else how to get them."""

from __future__ import annotations

import hashlib

import pytest

from pytest_nsbox.rootfs.alpine import latest_minirootfs
from pytest_nsbox.rootfs.store import RootfsStore

from . import conftest
from .mirror import serve

SHA_319 = "a2a87004e87720cbb0372c08b7de9b80748afdfd7fd72d2eab2ec0b074b92211"
SHA_320 = "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
RELEASES = "v3.20/releases/x86_64"


def test_a_missing_mirror_is_fetched_from_the_pinned_releases(tmp_path, mirror):
    fetched = tmp_path / "fetched"
    conftest.fetch_test_mirror(fetched, mirror.url)
    tarball = fetched / RELEASES / "alpine-minirootfs-3.20.3-x86_64.tar.gz"
    assert hashlib.sha256(tarball.read_bytes()).hexdigest() == SHA_320
    assert (fetched / RELEASES / "alpine-minirootfs-3.20.3-x86_64.tar.gz.sha256").read_text() == \
        f"{SHA_320}  alpine-minirootfs-3.20.3-x86_64.tar.gz\n"
    release = latest_minirootfs((fetched / RELEASES / "latest-releases.yaml").read_text(), "x86_64")
    assert (release.version, release.sha256) == ("3.20.3", SHA_320)
    requests = len(mirror.requests)
    conftest.fetch_test_mirror(fetched, mirror.url)  # complete: nothing fetched again
    assert len(mirror.requests) == requests
    served, stop = serve(fetched, tmp_path / "served")
    try:
        assert RootfsStore(tmp_path / "cache", served.url).resolve("alpine:3.19").digest == SHA_319
    finally:
        stop()


def test_without_network_the_tests_say_how_to_get_alpine(tmp_path):
    dest = tmp_path / "alpine-mirror"
    with pytest.raises(pytest.UsageError) as caught:
        conftest.fetch_test_mirror(dest, "http://127.0.0.1:9")
    message = str(caught.value)
    assert "NSBOX_TEST_MIRROR" in message
    assert (f"curl -fLo {dest}/{RELEASES}/alpine-minirootfs-3.20.3-x86_64.tar.gz "
            f"https://dl-cdn.alpinelinux.org/alpine/{RELEASES}/alpine-minirootfs-3.20.3-x86_64.tar.gz") in message
    assert SHA_320 in message and SHA_319 in message
