"""A hostile root filesystem: whatever its symlinks say, nothing is created or mounted on the host.

A rootfs is a tarball from anywhere.  Init resolves every mount point inside the new root, after
every descriptor of the host is closed, with magic links refused: these trees try each way out.
"""

from __future__ import annotations

import os

import pytest

from pytest_nsbox import Sandbox, SandboxSetupError
from pytest_nsbox.rootfs.archive import extract

#: Descriptor numbers a magic link might guess: init's own, whatever they are on the day.
GUESSES = range(3, 20)


@pytest.fixture
def tree(tmp_path, alpine_tarball):
    root = tmp_path / "tree"
    root.mkdir()
    extract(alpine_tarball, root)
    return root


@pytest.fixture
def host(tmp_path):
    """A host directory the hostile tree aims at, and a file to bind."""
    target = tmp_path / "host"
    target.mkdir()
    (tmp_path / "payload").write_text("bound\n")
    return target


def _start(tree, **settings):
    box = Sandbox(rootfs=str(tree), **settings)
    try:
        box.start()
    except SandboxSetupError as exc:
        box.close()
        return exc
    box.close()
    return None


def test_a_magic_link_through_the_trees_descriptor_reaches_nothing(tree, host, tmp_path):
    # /proc/self/fd/N/.. from the tree's own descriptor would be the tree's parent on the host.
    (tree / "escape").mkdir()
    for fd in GUESSES:
        os.symlink(f"/proc/self/fd/{fd}/../host/pwned-{fd}", tree / "escape" / f"f{fd}")
    error = _start(tree, mounts=[(tmp_path / "payload", f"/escape/f{fd}") for fd in GUESSES])
    assert sorted(os.listdir(host)) == []
    assert error is not None and "magic link" in str(error), error


def test_a_magic_link_through_a_bind_clone_reaches_nothing(tree, tmp_path):
    # The clone of a read-only bind's source, reached through its descriptor before it is
    # attached (and before it was made read-only, in an earlier design).
    guarded = tmp_path / "read-only"
    guarded.mkdir()
    (tmp_path / "payload").write_text("bound\n")
    (tree / "escape").mkdir()
    for fd in GUESSES:
        os.symlink(f"/proc/self/fd/{fd}/pwned-{fd}", tree / "escape" / f"g{fd}")
    mounts = [(guarded, "/ro")] + [(tmp_path / "payload", f"/escape/g{fd}") for fd in GUESSES]
    error = _start(tree, mounts=mounts)
    assert sorted(os.listdir(guarded)) == []
    assert error is not None and "magic link" in str(error), error


def test_absolute_and_climbing_symlinks_resolve_inside(tree, host):
    # With network="host", /etc/hosts and /etc/resolv.conf are bind targets.
    (tree / "etc/hosts").unlink()
    os.symlink(f"../../../../../../../../..{host}/pwned-hosts", tree / "etc/hosts")
    if (tree / "etc/resolv.conf").exists():
        (tree / "etc/resolv.conf").unlink()
    os.symlink(f"{host}/pwned-resolv", tree / "etc/resolv.conf")
    with Sandbox(rootfs=str(tree), network="host") as box:
        # Both were made, inside the sandbox, where the symlinks lead from its own root.
        assert box.run(["test", "-f", f"{host}/pwned-hosts"]).returncode == 0
        assert box.run(["test", "-f", f"{host}/pwned-resolv"]).returncode == 0
    assert sorted(os.listdir(host)) == []


@pytest.mark.parametrize("target", ["proc/sys/kernel", "dev/shm", ""], ids=["proc", "dev", "root"])
def test_a_symlink_cannot_steer_a_bind_onto_proc_dev_or_the_root(tree, tmp_path, target):
    os.symlink(f"/{target}", tree / "steer")
    error = _start(tree, mounts=[(tmp_path, "/steer")])
    assert error is not None and "where binds may not go" in str(error), error


@pytest.mark.parametrize("name", ["dev", "tmp", "run", "proc"])
def test_a_symlink_instead_of_a_fixed_mount_point_is_refused(tree, name, tmp_path):
    os.rename(tree / name, tree / f"{name}.real")
    os.symlink(str(tmp_path), tree / name)
    error = _start(tree)
    assert error is not None and f"/{name}" in str(error), error
