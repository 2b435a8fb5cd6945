"""Prebuilt sandboxes: the spawner builds the next sandboxes ahead; that must never show."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from pytest_nsbox import Sandbox, SandboxClosed
from pytest_nsbox.engine.client import Spawner
from pytest_nsbox.engine.spawner import prefork_depth

from .helpers import alive, descendants, wait_until


def _processes_named(name: str) -> set[int]:
    found = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip() == name:
                        found.add(int(pid))
            except OSError:
                continue
    return found


def test_lifetime_starts_at_hand_over_not_at_prebuild(alpine_tarball, cache_dir):
    Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir, timeout=1).start().close()
    time.sleep(1.5)  # the spare built just now has been idle for longer than its lifetime
    with Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir, timeout=1) as box:
        assert box.run(["echo", "alive"]).stdout == "alive\n"
        time.sleep(1.2)
        with pytest.raises(SandboxClosed, match="lifetime"):
            box.run(["true"])


def test_alternating_specs_get_their_own_sandboxes(alpine_tarball, cache_dir):
    for name in ["a", "b", "a", "a", "b", "b", "a"]:
        with Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir, hostname=name) as box:
            assert box.run(["hostname"]).stdout == f"{name}\n"
            assert box.run(["test", "-e", "/root/mark"]).returncode == 1  # never used before
            box.run(["touch", "/root/mark"], check=True)


def test_only_the_spares_of_the_last_spec_are_kept(alpine_tarball, cache_dir):
    for name in ["x", "y", "z"]:
        Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir, hostname=name).start().close()
    spawner = Spawner.get().process.pid
    depth = prefork_depth()

    def spares() -> int:
        count = 0
        for pid in _processes_named("nsbox-init"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == spawner:
                        count += 1
            except OSError:
                continue
        return count

    assert wait_until(lambda: spares() == depth)


OWNER = textwrap.dedent("""
    import sys, time
    from pytest_nsbox import Sandbox
    from pytest_nsbox.engine.client import Spawner
    Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start().close()  # leaves spares behind
    print(Spawner.get().process.pid, flush=True)
    time.sleep(300)
""")


def test_spares_die_with_their_owner(alpine_tarball, cache_dir):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(alpine_tarball), str(cache_dir)],
                             stdout=subprocess.PIPE, text=True)
    try:
        spawner = int(owner.stdout.readline())
        # The spares: inits below this owner's spawner, and nobody else's.
        assert wait_until(lambda: len(descendants(spawner)) >= prefork_depth())
        spares = set(descendants(spawner))
        owner.kill()
        owner.wait()
        assert wait_until(lambda: not alive(spawner))
        assert wait_until(lambda: not any(alive(pid) for pid in spares))
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
