"""Shared test set-up: the real Alpine minirootfs from ../shared/alpine-mirror, a repo-local cache.

The sandbox tests use the plugin's own fixtures, so NSBOX_ROOTFS and NSBOX_CACHE_DIR are set here
(unless the caller set them) before the plugin reads them.

Where ../shared/alpine-mirror is absent (a plain clone), the pinned releases are downloaded once
from Alpine's CDN, checked against their pinned digests, into rootfs-cache/alpine-mirror in the same
layout; without network, the run stops and says how to get them.
"""

from __future__ import annotations

import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
SHARED_MIRROR = REPO.parent / "shared" / "alpine-mirror"
FETCHED_MIRROR = REPO / "rootfs-cache" / "alpine-mirror"
if "NSBOX_TEST_MIRROR" in os.environ:
    MIRROR = pathlib.Path(os.environ["NSBOX_TEST_MIRROR"])
else:
    MIRROR = SHARED_MIRROR if SHARED_MIRROR.is_dir() else FETCHED_MIRROR
ALPINE_320 = MIRROR / "v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"
ALPINE_319 = MIRROR / "v3.19/releases/x86_64/alpine-minirootfs-3.19.4-x86_64.tar.gz"
# The releases the tests use, as ../shared/alpine-mirror has them (and alpine-releases.json pins).
TEST_RELEASES = {"3.20.3": "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c",
                 "3.19.4": "a2a87004e87720cbb0372c08b7de9b80748afdfd7fd72d2eab2ec0b074b92211"}
LATEST_RELEASES = """---
-
  title: "Mini root filesystem"
  branch: v{branch}
  arch: x86_64
  version: {version}
  flavor: alpine-minirootfs
  file: {name}
  size: {size}
  sha256: {sha256}
"""

os.environ.setdefault("NSBOX_ROOTFS", str(ALPINE_320))
os.environ.setdefault("NSBOX_CACHE_DIR", str(REPO / "rootfs-cache"))


def fetch_test_mirror(dest: pathlib.Path, source: str) -> None:
    """Lay out TEST_RELEASES in `dest` as a mirror has them, downloading what is missing from `source`."""
    from pytest_nsbox.rootfs.alpine import file_name, tarball_url
    from pytest_nsbox.rootfs.download import fetch_file
    from pytest_nsbox.errors import NsboxError
    from pytest_nsbox.rootfs.store import file_sha256
    for version, sha256 in TEST_RELEASES.items():
        branch, name = version.rsplit(".", 1)[0], file_name(version, "x86_64")
        release = dest / f"v{branch}/releases/x86_64"
        tarball = release / name
        if not (tarball.is_file() and file_sha256(tarball) == sha256):
            release.mkdir(parents=True, exist_ok=True)
            try:
                fetch_file(tarball_url(source, version, "x86_64"), tarball, sha256)
            except NsboxError as exc:
                raise pytest.UsageError(_how_to_get_alpine(dest, exc)) from None
        (release / f"{name}.sha256").write_text(f"{sha256}  {name}\n")
        (release / "latest-releases.yaml").write_text(LATEST_RELEASES.format(
            branch=branch, version=version, name=name, size=tarball.stat().st_size, sha256=sha256))


def _how_to_get_alpine(dest: pathlib.Path, error: Exception) -> str:
    from pytest_nsbox.rootfs.alpine import DEFAULT_MIRROR, file_name, tarball_url
    lines = [f"the tests need Alpine's minirootfs {' and '.join(TEST_RELEASES)} (x86_64), in {SHARED_MIRROR} "
             f"or NSBOX_TEST_MIRROR, and fetching them failed ({error}). Where there is network, run:"]
    for version, sha256 in TEST_RELEASES.items():
        path = dest / f"v{version.rsplit('.', 1)[0]}/releases/x86_64" / file_name(version, "x86_64")
        lines.append(f"  mkdir -p {path.parent} && curl -fLo {path} {tarball_url(DEFAULT_MIRROR, version, 'x86_64')}"
                     f"  # SHA-256 {sha256}")
    lines.append("then run the tests again: the rest of the mirror's layout is made from them.")
    return "\n".join(lines)


def pytest_configure(config: pytest.Config) -> None:
    # xdist workers start after the controller has fetched.
    if MIRROR == FETCHED_MIRROR and not hasattr(config, "workerinput"):
        from pytest_nsbox.rootfs.alpine import DEFAULT_MIRROR
        fetch_test_mirror(FETCHED_MIRROR, DEFAULT_MIRROR)
    rootfs = pathlib.Path(os.environ["NSBOX_ROOTFS"])
    if not rootfs.exists():
        raise pytest.UsageError(
            f"the tests need the Alpine minirootfs at {rootfs}: set NSBOX_TEST_MIRROR to a copy of "
            "shared/alpine-mirror, or NSBOX_ROOTFS to an Alpine minirootfs tarball")


@pytest.fixture
def mirror(tmp_path):
    """A copy of the Alpine mirror served on 127.0.0.1 for one test (tests/mirror.py)."""
    from .mirror import serve
    served, stop = serve(MIRROR, tmp_path / "mirror")
    yield served
    stop()


@pytest.fixture
def alpine_tarball() -> pathlib.Path:
    return pathlib.Path(os.environ["NSBOX_ROOTFS"])


@pytest.fixture
def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ["NSBOX_CACHE_DIR"])


@pytest.fixture(autouse=True)
def _prune_caches_of_many_ids(request):
    """A cache a test made in its tmp_path may hold image trees that the user's subordinate ids
    own, which pytest's own cleanup of old tmp dirs cannot remove: prune them, as a user would
    (`nsbox rootfs prune`), when the test ends."""
    tmp = request.getfixturevalue("tmp_path") if "tmp_path" in request.fixturenames else None
    yield
    if tmp is None:
        return
    from pytest_nsbox.rootfs.store import RootfsStore
    for trees in [*tmp.glob("*/trees"), *tmp.glob("*/*/trees")]:
        if any("-ids-" in p.name for p in trees.iterdir()):
            RootfsStore(trees.parent).prune()
