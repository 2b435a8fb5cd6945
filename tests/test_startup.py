"""What start() promises, whatever order the sandbox's processes report in."""

from __future__ import annotations

import pytest

from pytest_nsbox import Sandbox

from .helpers import alive


def test_start_reports_init_pid_and_namespaces_every_time(alpine_tarball, cache_dir):
    # Prebuilt or not, a started sandbox knows its init and its namespaces.
    for _ in range(40):
        with Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir) as box:
            assert isinstance(box.init_pid, int) and alive(box.init_pid)
            assert set(box.namespaces) == {"user", "mnt", "pid", "ipc", "uts", "cgroup", "net"}


def test_a_failed_setup_always_reports_its_own_error(tmp_path, alpine_tarball):
    # Init reports the error and exits; the owner's `hello` may still be unread then, and the
    # kernel says "connection reset" before it hands over the report: never instead of it.
    from pytest_nsbox import SandboxSetupError
    from pytest_nsbox.rootfs.archive import extract
    tree = tmp_path / "tree"
    tree.mkdir()
    extract(alpine_tarball, tree)
    (tree / "dev").rmdir()
    (tree / "dev").symlink_to("/proc")
    for _ in range(30):
        with pytest.raises(SandboxSetupError, match="prepare mount point /dev"):
            Sandbox(rootfs=str(tree)).start()
