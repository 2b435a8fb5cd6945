"""Archive bombs: limits on size, members and depth, checked before anything is written.

The archives are real ones: GNU tar writes the sparse members, tarfile the rest.
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

from pytest_nsbox import ConfigError, RootfsError
from pytest_nsbox.rootfs.archive import Limits, extract
from pytest_nsbox.rootfs.store import RootfsStore, remove_tree


def _store(tmp_path: Path) -> RootfsStore:
    return RootfsStore(tmp_path / "cache", offline=True)


def _leftovers(tmp_path: Path) -> list[str]:
    trees = tmp_path / "cache" / "trees"
    return sorted(p.name for p in trees.iterdir() if not p.name.endswith(".lock")) if trees.exists() else []


def _sparse_tarball(tmp_path: Path, size: str) -> Path:
    source = tmp_path / "sparse-src"
    (source / "bin").mkdir(parents=True)
    subprocess.run(["truncate", "-s", size, str(source / "hole")], check=True)
    archive = tmp_path / "sparse.tar.gz"
    subprocess.run(["tar", "-S", "-czf", str(archive), "-C", str(source), "bin", "hole"], check=True)
    subprocess.run(["rm", "-rf", str(source)], check=True)
    assert archive.stat().st_size < 10_000
    return archive


def _zeros_tarball(path: Path, *sizes: int) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for number, size in enumerate(sizes):
            info = tarfile.TarInfo(f"zeros-{number}")
            info.size = size
            tar.addfile(info, io.BytesIO(bytes(size)))
    return path


def test_total_size_is_limited_before_anything_is_written(tmp_path, monkeypatch):
    archive = _zeros_tarball(tmp_path / "bomb.tar.gz", 600_000, 600_000)
    monkeypatch.setenv("NSBOX_ROOTFS_MAX_BYTES", "1M")
    with pytest.raises(RootfsError, match=rf"{archive} .*more than 1 MiB.*'zeros-1'.*NSBOX_ROOTFS_MAX_BYTES"):
        _store(tmp_path).resolve(archive)
    assert _leftovers(tmp_path) == []
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RootfsError, match="NSBOX_ROOTFS_MAX_BYTES"):
        extract(archive, dest, "bomb.tar.gz", Limits(max_bytes=1 << 20))
    assert list(dest.iterdir()) == []  # not even the first member, which alone would fit


def test_a_sparse_member_counts_at_its_real_size(tmp_path, monkeypatch):
    archive = _sparse_tarball(tmp_path, "64M")
    monkeypatch.setenv("NSBOX_ROOTFS_MAX_BYTES", "16M")
    with pytest.raises(RootfsError, match=r"more than 16 MiB .*'hole'.*NSBOX_ROOTFS_MAX_BYTES"):
        _store(tmp_path).resolve(archive)
    assert _leftovers(tmp_path) == []


def test_default_limit_refuses_a_5_gib_sparse_member_at_once(tmp_path):
    archive = _sparse_tarball(tmp_path, "5G")
    started = time.monotonic()
    with pytest.raises(RootfsError, match=r"more than 4 GiB .*NSBOX_ROOTFS_MAX_BYTES"):
        _store(tmp_path).resolve(archive)
    assert time.monotonic() - started < 10
    assert _leftovers(tmp_path) == []


def test_member_count_is_limited(tmp_path, monkeypatch):
    archive = tmp_path / "many.tar"
    with tarfile.open(archive, "w") as tar:
        for number in range(120):
            tar.addfile(tarfile.TarInfo(f"f{number}"), io.BytesIO())
    monkeypatch.setenv("NSBOX_ROOTFS_MAX_MEMBERS", "100")
    with pytest.raises(RootfsError, match=r"more than 100 members.*NSBOX_ROOTFS_MAX_MEMBERS"):
        _store(tmp_path).resolve(archive)
    assert _leftovers(tmp_path) == []


def test_deep_nesting_is_refused_with_a_sentence(tmp_path):
    archive = tmp_path / "deep.tar.gz"
    with tarfile.open(archive, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for depth in range(1, 3001):
            info = tarfile.TarInfo("/".join(["d"] * depth))
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
    with pytest.raises(RootfsError, match=r"deeper than 256 directories.*NSBOX_ROOTFS_MAX_DEPTH"):
        _store(tmp_path).resolve(archive)
    assert _leftovers(tmp_path) == []


def test_limits_can_be_raised(tmp_path, monkeypatch, alpine_tarball):
    monkeypatch.setenv("NSBOX_ROOTFS_MAX_DEPTH", "4")
    with pytest.raises(RootfsError, match="deeper than 4 directories"):
        _store(tmp_path).resolve(alpine_tarball)
    monkeypatch.setenv("NSBOX_ROOTFS_MAX_DEPTH", "64")
    assert (_store(tmp_path).resolve(alpine_tarball).tree / "bin/busybox").is_file()


@pytest.mark.parametrize("variable, value", [("NSBOX_ROOTFS_MAX_BYTES", "lots"), ("NSBOX_ROOTFS_MAX_BYTES", "-1"),
                                             ("NSBOX_ROOTFS_MAX_MEMBERS", "1.5"), ("NSBOX_ROOTFS_MAX_DEPTH", "0")])
def test_bad_limits_are_config_errors(monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=rf"{variable}={value!r} .*positive"):
        Limits.from_env()


def test_defaults():
    assert Limits() == Limits(max_bytes=4 << 30, max_members=500_000, max_depth=256)


def test_removal_of_a_very_deep_tree_does_not_recurse(tmp_path):
    top = tmp_path / "deep"
    top.mkdir()
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(3000):  # deeper than PATH_MAX allows by name, and than Python's recursion limit
        os.mkdir("d", 0o755, dir_fd=fd)
        with open(os.open("f", os.O_WRONLY | os.O_CREAT, 0o444, dir_fd=fd), "w"):
            pass
        os.chmod(fd, 0o555)  # read-only once filled, as archives' directories may be
        child = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = child
    os.close(fd)
    remove_tree(top)
    assert not top.exists()


def test_removal_never_follows_a_link(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top = tmp_path / "tree"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "link").symlink_to(outside)
    (top / "link").symlink_to(outside)
    remove_tree(top)
    assert not top.exists() and (outside / "keep").exists()
