"""The cache against other local users: ownership, private modes, links, and half-removed trees.

Run as root, another user's files are made with chown; run as a normal user, a root-owned directory
plays the other user's cache. Both runs happen in CI.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from pytest_nsbox import RootfsError
from pytest_nsbox.rootfs.store import RootfsStore


SHA_319 = "a2a87004e87720cbb0372c08b7de9b80748afdfd7fd72d2eab2ec0b074b92211"
SHA_320 = "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="only root can give files to another user")


def _other_user() -> tuple[int, str]:
    """(uid, the name the store's messages give it) of a user that is not root.

    `nobody` exists on any stock machine (CI's own user `nsbox-ci` is only made later in .ci/run);
    without either, a uid with no passwd entry, which the store names "uid N"."""
    for name in ("nobody", "nsbox-ci"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid != 0:
            return entry.pw_uid, entry.pw_name
    uid = next(uid for uid in range(65534, 1000, -1) if not _has_entry(uid))
    return uid, f"uid {uid}"


def _has_entry(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
        return True
    except KeyError:
        return False


def _store(cache: Path, mirror) -> RootfsStore:
    return RootfsStore(cache, mirror.url, offline=False)


def test_a_cache_of_another_user_is_refused(tmp_path, mirror, alpine_tarball):
    if ROOT:
        cache = tmp_path / "cache"
        cache.mkdir()
        uid, owner = _other_user()
        os.chown(cache, uid, uid)
    else:
        cache, owner = Path("/usr/share"), "root"  # a populated directory that is not ours
    for spec in ("alpine:3.20", str(alpine_tarball)):
        with pytest.raises(RootfsError, match=rf"{cache} belongs to {re.escape(owner)}, not to you .*"
                                              r"--nsbox-cache-dir or NSBOX_CACHE_DIR"):
            _store(cache, mirror).resolve(spec)
    if ROOT:
        assert list(cache.iterdir()) == []


@pytest.mark.parametrize("where", ["cache", "trees"])
def test_a_cache_others_can_write_is_refused(tmp_path, mirror, where):
    cache = tmp_path / "cache"
    (cache / "trees").mkdir(parents=True)
    os.chmod(cache / ("trees" if where == "trees" else ""), 0o777)
    path = cache / "trees" if where == "trees" else cache
    with pytest.raises(RootfsError, match=rf"{path} is writable by other users \(mode 0?777\).*chmod go-w"):
        _store(cache, mirror).resolve("alpine:3.20.3")
    assert [p.name for p in (cache / "trees").iterdir()] == []


@pytest.mark.parametrize("how", ["owner", "mode"])
def test_a_planted_tree_is_refused_not_used(tmp_path, mirror, how):
    if how == "owner" and not ROOT:
        pytest.skip("only root can give files to another user")
    cache = tmp_path / "cache"
    planted = cache / "trees" / f"sha256-{SHA_320}"
    (planted / "bin").mkdir(parents=True)
    (planted / "bin" / "sh").write_text("#!/planted\n")
    what = "is writable by other users"
    if how == "owner":
        uid, owner = _other_user()
        os.chown(planted, uid, uid)
        what = f"belongs to {re.escape(owner)}"
    else:
        os.chmod(planted, 0o777)
    with pytest.raises(RootfsError, match=rf"{planted} {what}"):
        _store(cache, mirror).resolve("alpine:3.20.3")


@needs_root
@pytest.mark.parametrize("name, use", [
    ("resolutions.json", lambda store: store.resolve("alpine:3.19")),
    ("resolutions.json.lock", lambda store: store.resolve("alpine:3.19", refresh=True)),
    (f"trees/sha256-{SHA_319}.json", lambda store: store.resolve("alpine:3.19.4")),
    (f"trees/sha256-{SHA_319}.lock", lambda store: store.prune(keep=0)),
])
def test_entries_of_another_user_are_refused(tmp_path, mirror, name, use):
    cache = tmp_path / "cache"
    _store(cache, mirror).resolve("alpine:3.19")
    uid, owner = _other_user()
    os.chown(cache / name, uid, uid)
    with pytest.raises(RootfsError, match=rf"{cache / name} belongs to {re.escape(owner)}, not to you"):
        use(_store(cache, mirror))


def test_predictable_temp_names_are_never_followed(tmp_path, mirror):
    cache = tmp_path / "cache"
    (cache / "trees").mkdir(parents=True, mode=0o700)
    cache.chmod(0o700)
    victims = []
    for planted in (cache / f"resolutions.json.tmp-{os.getpid()}",
                    cache / "trees" / f"sha256-{SHA_319}.json.tmp-{os.getpid()}",
                    cache / "trees" / f"sha256-{SHA_319}.tmp-{os.getpid()}.tar"):
        victim = tmp_path / f"victim-{len(victims)}"
        victim.write_text("precious\n")
        planted.symlink_to(victim)
        victims.append(victim)
    rootfs = _store(cache, mirror).resolve("alpine:3.19")
    assert (rootfs.tree / "bin/busybox").is_file()
    assert [v.read_text() for v in victims] == ["precious\n"] * 3


def test_everything_is_created_private(tmp_path, mirror):
    old = os.umask(0o022)
    try:
        cache = tmp_path / "new" / "cache"
        _store(cache, mirror).resolve("alpine:3.19")
    finally:
        os.umask(old)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.lstat().st_mode)
             for p in [tmp_path / "new", cache, *cache.iterdir(), *(cache / "trees").iterdir()]}
    tree = f"new/cache/trees/sha256-{SHA_319}"
    assert modes == {"new": 0o700, "new/cache": 0o700, "new/cache/trees": 0o700,
                     "new/cache/resolutions.json": 0o600, "new/cache/resolutions.json.lock": 0o600,
                     tree: 0o755, f"{tree}.json": 0o600, f"{tree}.lock": 0o600}


def test_other_users_cannot_reach_a_tree_to_plant_files(mirror):
    # A cache root others may enter (as the repository's rootfs-cache/ is): trees/ is what stops
    # them, and a trees/ left open by an older version is closed on first use.
    base = Path(tempfile.mkdtemp(prefix="nsbox-reach-"))
    try:
        base.chmod(0o755)
        cache = base / "cache"
        (cache / "trees").mkdir(parents=True)
        cache.chmod(0o755)
        (cache / "trees").chmod(0o755)
        tree = _store(cache, mirror).resolve("alpine:3.19.4").tree
        assert stat.S_IMODE((tree / "var/tmp").stat().st_mode) == 0o1777  # as Alpine has it, inside
        assert stat.S_IMODE((cache / "trees").stat().st_mode) == 0o700
        if ROOT:
            uid, _name = _other_user()  # a uid is enough: no passwd entry, no runuser needed
            planted = subprocess.run(["touch", str(tree / "var/tmp/planted")], user=uid, group=uid,
                                     extra_groups=[], capture_output=True, text=True)
            assert planted.returncode != 0 and "Permission denied" in planted.stderr
            assert not (tree / "var/tmp/planted").exists()
    finally:
        subprocess.run(["rm", "-rf", str(base)], check=True)


PRUNE_KILLED_MIDWAY = textwrap.dedent("""
    import os, shutil, signal, sys
    from pytest_nsbox.rootfs import store as rootfs
    def crash(path, *args, **kwargs):
        shutil.rmtree(os.path.join(path, "bin"))  # half of the tree is gone...
        os.kill(os.getpid(), signal.SIGKILL)      # ...when the process dies
    rootfs.remove_tree = crash
    rootfs.RootfsStore(sys.argv[1], offline=True).prune(keep=0)
""")


def test_prune_killed_midway_leaves_no_half_tree(tmp_path, mirror):
    cache = tmp_path / "cache"
    store = _store(cache, mirror)
    store.resolve("alpine:3.19.4")
    killed = subprocess.run([sys.executable, "-c", PRUNE_KILLED_MIDWAY, str(cache)])
    assert killed.returncode == -signal.SIGKILL
    fresh = _store(cache, mirror)
    assert fresh.entries() == []
    rootfs = fresh.resolve("alpine:3.19.4")  # extracted anew, not the half tree
    assert (rootfs.tree / "bin/busybox").is_file()
    assert [p.name for p in (cache / "trees").iterdir() if ".trash-" in p.name or ".tmp-" in p.name] == []


def test_prune_sweeps_what_a_killed_prune_left(tmp_path, mirror):
    cache = tmp_path / "cache"
    _store(cache, mirror).resolve("alpine:3.19.4")
    subprocess.run([sys.executable, "-c", PRUNE_KILLED_MIDWAY, str(cache)])
    assert any(".trash-" in p.name for p in (cache / "trees").iterdir())
    assert _store(cache, mirror).prune(keep=0) == []
    assert sorted(p.name for p in (cache / "trees").iterdir() if not p.name.endswith(".lock")) == []
