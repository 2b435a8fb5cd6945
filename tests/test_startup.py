"""What start() promises, whatever order the sandbox's processes report in."""

from __future__ import annotations

from pytest_nsbox import Sandbox

from .helpers import alive


def test_start_reports_init_pid_and_namespaces_every_time(alpine_tarball, cache_dir):
    # Prebuilt or not, a started sandbox knows its init and its namespaces.
    for _ in range(40):
        with Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir) as box:
            assert isinstance(box.init_pid, int) and alive(box.init_pid)
            assert set(box.namespaces) == {"user", "mnt", "pid", "ipc", "uts", "cgroup", "net"}
