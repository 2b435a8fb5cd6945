"""Local rootfs specs: directories, tarballs extracted once, and hostile archives refused."""

from __future__ import annotations

import io
import os
import tarfile

import pytest

from pytest_nsbox import RootfsError, Sandbox, UnsafeArchiveError
from pytest_nsbox.rootfs.archive import extract
from pytest_nsbox.rootfs.store import resolve


def test_tarball_is_extracted_once_and_reused(alpine_tarball, tmp_path):
    first = resolve(alpine_tarball, tmp_path)
    assert (first.tree / "bin/busybox").is_file()
    assert os.readlink(first.tree / "bin/sh") == "/bin/busybox"  # absolute links kept
    stamp = first.tree.stat().st_mtime_ns
    from pytest_nsbox.rootfs import store as rootfs
    rootfs._default_stores.clear()
    again = resolve(alpine_tarball, tmp_path)
    assert again.tree == first.tree and again.tree.stat().st_mtime_ns == stamp
    assert sorted(p.name for p in (tmp_path / "trees").iterdir() if not p.name.endswith(".lock")) == \
        [first.tree.name, first.tree.name + ".json"]


def test_directory_rootfs(alpine_tarball, tmp_path):
    tree = tmp_path / "alpine"
    tree.mkdir()
    extract(alpine_tarball, tree)
    with Sandbox(rootfs=tree) as box:
        assert "alpine" in box.run(["cat", "/etc/os-release"]).stdout


def test_stale_half_extracted_entry_is_rebuilt(alpine_tarball, tmp_path):
    from pytest_nsbox.rootfs import store as rootfs
    digest = rootfs.file_sha256(alpine_tarball)
    stale = tmp_path / "trees" / f"sha256-{digest}.tmp-99999"
    (stale / "bin").mkdir(parents=True)
    (stale / "bin" / "half").write_text("")
    rootfs._default_stores.clear()
    result = resolve(alpine_tarball, tmp_path)
    assert not stale.exists()
    assert (result.tree / "bin/busybox").is_file()


def _tarball(path, *members):
    with tarfile.open(path, "w:gz") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name, data=b"x", mode=0o644):
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    return info, data


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


def _special(name, kind):
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info, None


@pytest.mark.parametrize("members, member_name", [
    ([_file("/etc/evil")], "/etc/evil"),
    ([_file("ok"), _file("../escape")], "../escape"),
    ([_file("a/../../escape")], "a/../../escape"),
    ([_link("up", "../../..")], "up"),
    ([_link("etc", "/etc"), _file("etc/passwd")], "etc/passwd"),
    ([_link("d", "sub"), _file("d/x")], "d/x"),
    ([_special("dev/sda", tarfile.BLKTYPE)], "dev/sda"),
    ([_special("dev/null", tarfile.CHRTYPE)], "dev/null"),
    ([_special("fifo", tarfile.FIFOTYPE)], "fifo"),
    ([_link("hard", "../../etc/passwd", tarfile.LNKTYPE)], "../../etc/passwd"),
], ids=["absolute", "dotdot", "inner-dotdot", "escaping-symlink", "write-through-absolute-symlink",
        "write-through-relative-symlink", "block-device", "char-device", "fifo", "escaping-hardlink"])
def test_malicious_tarball_is_refused_and_not_cached(tmp_path, members, member_name):
    archive = _tarball(tmp_path / "evil.tar.gz", *members)
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError, match=f"{member_name!r}".replace(".", r"\.")):
        resolve(archive, cache)
    leftovers = [p.name for p in (cache / "trees").iterdir() if not p.name.endswith(".lock")]
    assert leftovers == []
    assert not (tmp_path.parent / "escape").exists()


def test_links_that_stay_inside_are_kept(tmp_path):
    archive = _tarball(tmp_path / "ok.tar", _file("usr/bin/tool"), _file("usr/bin/sh", mode=0o755), _link("bin", "usr/bin"),
                       _link("usr/lib/abs", "/usr/bin/tool"), _link("usr/bin/hard", "usr/bin/tool", tarfile.LNKTYPE))
    tree = resolve(archive, tmp_path / "cache").tree
    assert os.readlink(tree / "bin") == "usr/bin"
    assert os.readlink(tree / "usr/lib/abs") == "/usr/bin/tool"
    assert (tree / "usr/bin/hard").stat().st_ino == (tree / "usr/bin/tool").stat().st_ino


def test_not_a_tarball_is_named_by_the_users_path(tmp_path):
    bogus = tmp_path / "bogus.tar.gz"
    bogus.write_bytes(b"not a tarball")
    with pytest.raises(RootfsError, match=f"^{bogus} is not a readable tarball") as caught:
        resolve(bogus, tmp_path / "cache")
    assert ".tmp-" not in str(caught.value)
    assert sorted(p.name for p in (tmp_path / "cache" / "trees").iterdir() if not p.name.endswith(".lock")) == []


def _tree(root, *links, files=()):
    for name, mode in files:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/true\n")
        path.chmod(mode)
    for name, target in links:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.symlink_to(target)
    return root


@pytest.mark.parametrize("links, files, ok", [
    ([("bin/sh", "/bin/busybox")], [("bin/busybox", 0o755)], True),          # Alpine's: absolute, in the tree
    ([("bin/sh", "busybox")], [("bin/busybox", 0o755)], True),
    ([("bin", "usr/bin"), ("usr/bin/sh", "../../usr/bin/../bin/dash")], [("usr/bin/dash", 0o755)], True),
    ([("bin/sh", "/../../../bin/busybox")], [("bin/busybox", 0o755)], True),  # '..' stops at the tree's root
    ([], [], False),                                                         # empty
    ([], [("bin/sh", 0o644)], False),                                        # not executable
    ([("bin/sh", "/usr/bin/dash")], [], False),                              # only on the host
    ([("bin/sh", "/bin/sh")], [], False),                                    # a loop
    ([("bin", "/bin")], [], False),                                          # the host's /bin, not the tree's
])
def test_a_rootfs_tree_needs_an_executable_bin_sh(tmp_path, links, files, ok):
    assert os.path.exists("/usr/bin/dash") or os.path.exists("/bin/sh")
    tree = _tree(tmp_path / "tree", *links, files=files)
    tree.mkdir(exist_ok=True)
    if ok:
        assert resolve(tree, tmp_path / "cache").tree == tree
    else:
        with pytest.raises(RootfsError, match=f"^{tree} has no executable /bin/sh "):
            resolve(tree, tmp_path / "cache")


def test_a_tarball_without_bin_sh_is_refused_and_not_cached(tmp_path):
    archive = _tarball(tmp_path / "nosh.tar.gz", _file("usr/bin/python3", mode=0o755))
    with pytest.raises(RootfsError, match=f"^{archive} has no executable /bin/sh .*a whole root filesystem"):
        resolve(archive, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "trees").iterdir() if not p.name.endswith(".lock")) == []


def test_unusable_cache_is_a_sentence_not_a_traceback(alpine_tarball, tmp_path):
    from pytest_nsbox import RootfsError
    from pytest_nsbox.rootfs import store as rootfs
    digest = rootfs.file_sha256(alpine_tarball)
    lock = tmp_path / "trees" / f"sha256-{digest}.lock"
    lock.mkdir(parents=True)  # the entry's lock cannot be opened, even by root
    rootfs._default_stores.clear()
    with pytest.raises(RootfsError, match=rf"^{alpine_tarball}: cannot write {lock}: Is a directory; choose another cache with --nsbox-cache-dir"):
        resolve(alpine_tarball, tmp_path)
