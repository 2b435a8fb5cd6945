"""Symlinks in a rootfs archive: none leads a host-side step out of the tree.

A relative link is resolved at extraction as the host would resolve it, through the links already
in the tree, component by component, and refused if it climbs above the tree's root (lexically,
`a/l2/..` is `a`; on the host, when `a/l2 -> ..`, it is the tree's parent).  Absolute links are
kept (Alpine's `bin/sh -> /bin/busybox`): on the host they point outside by nature, so the promise
is that no host-side code follows any link inside a tree — extraction, the /bin/sh check, use as a
rootfs or a layer, Sandbox.save, prune.  A canary outside the tree, watched with inotify, proves it.
"""

from __future__ import annotations

import ctypes
import io
import os
import struct
import tarfile
from pathlib import Path

import pytest

from pytest_nsbox import RootfsError, Sandbox, UnsafeArchiveError
from pytest_nsbox.rootfs.archive import extract
from pytest_nsbox.rootfs.store import RootfsStore

IN_ALL_EVENTS = 0xFFF  # access, modify, attrib, close, open, moves, create, delete (inotify(7))
IN_NONBLOCK_CLOEXEC = os.O_NONBLOCK | os.O_CLOEXEC


class Watch:
    """Every inotify event on some paths of the host, whoever caused it."""

    def __init__(self, *paths: Path):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.names = {}
        for path in paths:
            wd = self.libc.inotify_add_watch(self.fd, os.fsencode(path), IN_ALL_EVENTS)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.names[wd] = path

    def events(self) -> list[str]:
        seen = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen
            while data:
                wd, mask, _, length = struct.unpack_from("iIII", data)
                name = data[16:16 + length].rstrip(b"\0").decode()
                seen.append(f"{self.names[wd]}/{name} mask={mask:#x}")
                data = data[16 + length:]

    def close(self) -> None:
        os.close(self.fd)


def _link(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode = tarfile.DIRTYPE, 0o755
    return info


def _sh() -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo("bin/sh")
    info.size, info.mode = 12, 0o755
    return info, b"#!/bin/true\n"


def _tarball(path: Path, *members: tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            info, data = member if isinstance(member, tuple) else (member, None)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


# Each leaves the tree on the host, though every link is lexically inside: (members, refused link).
ESCAPES = {
    "through-a-link-to-dotdot": ([_dir("a"), _link("a/l2", ".."), _link("a/evil", "l2/../canary")], "a/evil"),
    "the-reviewers-pair": ([_dir("a"), _link("a/l2", ".."), _link("a/evil", "l2/..")], "a/evil"),
    "a-chain-of-links": ([_dir("a"), _dir("a/b"), _link("a/b/up", ".."), _link("a/l1", "b/up/b/up"),
                          _link("a/l2", "l1"), _link("a/evil", "l2/../../canary")], "a/evil"),
    "a-link-to-a-link-in-a-subdirectory": ([_dir("x"), _dir("x/y"), _link("x/y/root", "../.."),
                                            _link("x/evil", "y/root/../canary")], "x/evil"),
    "a-link-replaced-later": ([_dir("a"), _link("a/l2", "."), _link("a/evil", "l2/../canary"),
                               _link("a/l2", "..")], "a/evil"),
    "a-hard-link-to-a-relative-symlink": ([_dir("a"), _link("a/up", ".."),
                                           _link("evil", "a/up", tarfile.LNKTYPE)], "evil"),
    "a-loop-then-a-way-out": ([_dir("a"), _link("a/loop", "loop"), _link("a/l2", ".."),
                               _link("a/evil", "./l2/./../canary")], "a/evil"),
}


@pytest.mark.parametrize("members, refused", ESCAPES.values(), ids=ESCAPES)
def test_a_relative_link_that_leaves_the_tree_on_the_host_is_refused(tmp_path, members, refused):
    archive = _tarball(tmp_path / "links.tar.gz", *members, _sh())
    canary = tmp_path / "canary"
    canary.write_text("the host's\n")
    watch = Watch(tmp_path / "canary")
    try:
        dest = tmp_path / "tree"
        dest.mkdir()
        with pytest.raises(UnsafeArchiveError, match=rf"^{archive}: archive member {refused!r} is a symlink "
                                                     r"that leaves the tree on the host \("):
            extract(archive, dest)
        assert list(dest.iterdir()) == []  # refused before anything was written
        cache = tmp_path / "cache"
        with pytest.raises(UnsafeArchiveError, match=f"{refused!r}"):
            RootfsStore(cache, offline=True).resolve(archive)
        assert [p.name for p in (cache / "trees").iterdir() if not p.name.endswith(".lock")] == []
        assert watch.events() == []
    finally:
        watch.close()


@pytest.mark.parametrize("members", [
    [_dir("a"), _link("a/l2", ".."), _link("a/in", "l2/a/l2/bin")],       # through '..' to the root, no further
    [_dir("usr"), _dir("usr/bin"), _link("sbin", "usr/bin"), _link("usr/bin/up", "../../sbin/../usr")],
    [_dir("a"), _link("a/abs", "/"), _link("a/through", "abs/..")],        # absolute: inside the sandbox's root
    [_dir("a"), _link("a/dangling", "nowhere/else"), _link("a/loop", "loop")],
], ids=["through-dotdot-to-the-root", "debian-style", "through-an-absolute-link", "dangling-and-loops"])
def test_links_that_stay_inside_on_the_host_are_kept(tmp_path, members):
    archive = _tarball(tmp_path / "ok.tar.gz", *members, _sh())
    dest = tmp_path / "tree"
    dest.mkdir()
    extract(archive, dest)
    names = {m.name for m in members if m.issym()}
    assert all(os.path.islink(dest / name) for name in names)


@pytest.fixture
def canary(tmp_path) -> Path:
    """A directory of the host, and a file and a subdirectory in it, that the tree's links aim at."""
    place = tmp_path / "canary"
    (place / "sub").mkdir(parents=True)
    (place / "secret").write_text("the host's\n")
    (place / "sub" / "keep").write_text("the host's\n")
    return place


def _hostile_alpine(path: Path, alpine: Path, canary: Path) -> Path:
    """Alpine, plus links that point at `canary` on the host: every kind an archive may keep."""
    extra = [_link("evil-dir", str(canary)), _link("etc/evil-file", f"{canary}/secret"),
             _link("usr/evil-through", f"../evil-dir/sub"),             # relative, through an absolute link
             _link("var/evil-hard", "evil-dir", tarfile.LNKTYPE),        # a hard link to an absolute symlink
             _link("usr/l2", ".."), _link("usr/evil-up", "l2/usr/l2/evil-dir/secret"),
             _link("home", str(canary / "sub"))]                          # replaces Alpine's /home directory
    with tarfile.open(alpine) as source, tarfile.open(path, "w:gz") as out:
        for member in source:
            if member.name.strip("./") == "home":
                continue
            out.addfile(member, source.extractfile(member) if member.isfile() else None)
        for info in extra:
            out.addfile(info)
    return path


def test_no_host_side_step_follows_a_link_out_of_the_tree(tmp_path, alpine_tarball, canary):
    archive = _hostile_alpine(tmp_path / "hostile.tar.gz", alpine_tarball, canary)
    layer_archive = _tarball(tmp_path / "layer.tar.gz", _dir("opt"), _link("opt/evil", str(canary)),
                             _link("opt/up", ".."), _link("opt/evil-up", "up/evil-dir/sub/keep"))
    cache = tmp_path / "cache"
    watch = Watch(canary, canary / "sub")
    try:
        store = RootfsStore(cache, offline=True)
        rootfs = store.resolve(archive)                                    # extraction, the /bin/sh check
        layer = store.resolve(layer_archive, layer=True)
        with Sandbox(rootfs=[rootfs, layer], cache_dir=cache) as box:    # a rootfs and a layer, in use
            assert box.run("cat /etc/evil-file").returncode != 0
            for command in ("cat /usr/evil-up /opt/evil-up", "ls /evil-dir/ /usr/evil-through/ /home/ /opt/evil/",
                            "echo pwned > /etc/evil-file", "mkdir -p /evil-dir/pwned", "touch /home/pwned"):
                box.run(command)
            saved = box.save(tmp_path / "saved.tar")
        again = RootfsStore(cache, offline=True).resolve(saved)          # the saved tree, extracted again
        assert os.readlink(again.tree / "etc/evil-file") == f"{canary}/secret"
        removed = RootfsStore(cache, offline=True).prune(keep=0)        # removal of all three trees
        assert len(removed) == 3 and not any(e.tree.exists() for e in removed)
        assert watch.events() == []
    finally:
        watch.close()
    assert sorted(p.name for p in canary.rglob("*")) == ["keep", "secret", "sub"]


def test_the_bin_sh_check_never_leaves_the_tree(tmp_path, canary):
    (canary / "sh").write_bytes(b"#!/bin/true\n")
    (canary / "sh").chmod(0o755)
    archive = _tarball(tmp_path / "bin.tar.gz", _link("bin", str(canary)), _dir("usr"), _link("usr/l", ".."),
                       _link("sbin", "usr/l/bin"))
    watch = Watch(canary)
    try:
        with pytest.raises(RootfsError, match=r"no executable /bin/sh \(/\S+ does not exist in the tree\)"):
            RootfsStore(tmp_path / "cache", offline=True).resolve(archive)
        assert watch.events() == []
    finally:
        watch.close()


def test_writing_through_a_link_is_refused_before_anything_is_written(tmp_path):
    archive = _tarball(tmp_path / "through.tar.gz", _sh(), _dir("a"), _link("a/l", "/tmp"),
                       (tarfile.TarInfo("a/l/x"), b""))
    dest = tmp_path / "tree"
    dest.mkdir()
    with pytest.raises(UnsafeArchiveError, match=r"'a/l/x' would be written through 'a/l', a symlink"):
        extract(archive, dest)
    assert list(dest.iterdir()) == []
