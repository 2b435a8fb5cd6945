"""Cleanup is part of the feature: nothing of a sandbox outlives it, even when its owner dies."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from pytest_nsbox import Sandbox
from pytest_nsbox.engine.spawner import prefork_depth

from .helpers import alive, commands_of, processes_in_pid_namespace, sandbox_processes, wait_until


def _host_mounts() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split(" ", 4)[4] for line in f)


def test_nothing_outlives_a_closed_sandbox(sandbox_factory, tmp_path):
    mounts_before = _host_mounts()
    tmp_before = set(os.listdir("/tmp"))
    box = sandbox_factory(mounts=[(tmp_path, "/data", "rw")])
    box.run("sleep 300 & sleep 301 & (setsid sleep 302 &) ; true", check=True)
    box.spawn(["sleep", "303"])
    pid_ns, init_pid = box.namespaces["pid"], box.init_pid
    # The backgrounded sleeps may still be forking when the shell returns (seen in an emulated VM).
    assert wait_until(lambda: len(sandbox_processes(pid_ns, init_pid)) >= 5)
    box.close()
    # close() returns only once the kernel has reaped the whole PID namespace.
    assert processes_in_pid_namespace(pid_ns) == []
    assert not alive(init_pid)
    assert _host_mounts() == mounts_before
    assert set(os.listdir("/tmp")) - tmp_before == set()


def test_forgotten_sandbox_dies_with_its_last_reference(alpine_tarball, cache_dir):
    box = Sandbox(rootfs=alpine_tarball, cache_dir=cache_dir).start()
    box.spawn(["sleep", "300"])
    pid_ns = box.namespaces["pid"]
    del box
    gc.collect()
    assert wait_until(lambda: processes_in_pid_namespace(pid_ns) == [])


OWNER = textwrap.dedent("""
    import os, sys, time
    from pytest_nsbox import Sandbox
    box = Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start()
    box.run("sleep 300 & true")
    box.spawn(["sh", "-c", "trap '' TERM INT HUP; sleep 301"])
    print(box.namespaces["pid"], box.init_pid, flush=True)
    time.sleep(300)
""")


def _interruptible() -> None:
    """SIGINT as a terminal delivers it: a shell's background job (how a CI runner may start the
    suite) inherits it ignored, and Python then leaves it ignored instead of raising KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_sandbox_dies_with_its_owner(sig, alpine_tarball, cache_dir):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(alpine_tarball), str(cache_dir)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=_interruptible)
    try:
        line = owner.stdout.readline()
        assert line, owner.stderr.read()
        pid_ns, init_pid = line.split()
        # Sampled at once, a process may be caught mid-fork or mid-exec (seen in an emulated VM).
        assert wait_until(lambda: len(commands_of(pid_ns, int(init_pid))) == 2)
        owner.send_signal(sig)
        try:
            # How fast a loaded interpreter unwinds is not the subject: the sandbox after it is.
            owner.wait(timeout=30)
        except subprocess.TimeoutExpired:
            owner.kill()
            pytest.fail(f"the owner did not exit on {sig!r}: {owner.communicate()[1]}")
        assert wait_until(lambda: not sandbox_processes(pid_ns, int(init_pid)), timeout=5)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()
        owner.stderr.close()


EXITING_OWNER = textwrap.dedent("""
    import sys
    from pytest_nsbox import Sandbox
    from pytest_nsbox.engine import client
    box = Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start()  # and spares behind it
    box.spawn(["sleep", "300"])
    print(client.Spawner.get().process.pid, flush=True)
    sys.stdin.readline()
    # Exits with the sandbox still open.
""")


def _descendants(pid: int) -> set[int]:
    found = set()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        return found
    for child in children:
        found |= {child} | _descendants(child)
    return found


def test_an_exiting_owner_leaves_not_even_a_zombie(alpine_tarball, cache_dir):
    """By the time the owner has exited, its spawner, inits and commands are dead *and reaped*."""
    owner = subprocess.Popen([sys.executable, "-c", EXITING_OWNER, str(alpine_tarball), str(cache_dir)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    spawner = int(owner.stdout.readline())
    spares = prefork_depth()
    assert spares >= 1
    # The sandbox's init and its sleep, and each spare's init.
    assert wait_until(lambda: len(_descendants(spawner)) >= 2 + spares)
    ours = {spawner} | _descendants(spawner)
    owner.communicate("\n", timeout=30)
    assert owner.returncode == 0
    assert [pid for pid in ours if os.path.exists(f"/proc/{pid}")] == []


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_pytest_killed_mid_test_leaves_nothing(pytester, sig):
    pytester.makepyfile(textwrap.dedent("""
        import time
        def test_hang(sandbox):
            sandbox.spawn(["sleep", "300"])
            with open("ns.txt", "w") as f:
                f.write(sandbox.namespaces["pid"])
            time.sleep(300)
    """))
    owner = pytester.popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"], preexec_fn=_interruptible,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ns_file = pytester.path / "ns.txt"
        assert wait_until(lambda: ns_file.exists() and ns_file.read_text(), timeout=30)
        pid_ns = ns_file.read_text()
        assert wait_until(lambda: processes_in_pid_namespace(pid_ns) != [])
        owner.send_signal(sig)
        owner.wait(timeout=10)
        assert wait_until(lambda: processes_in_pid_namespace(pid_ns) == [], timeout=5)
    finally:
        owner.kill()
        owner.wait()


def test_signals_to_init_are_forwarded_to_commands(sandbox):
    process = sandbox.spawn(["sh", "-c", "trap 'echo got-term; kill $!; exit 17' TERM; sleep 30 & wait"],
                            stdout=subprocess.PIPE)
    time.sleep(0.2)
    os.kill(sandbox.init_pid, signal.SIGTERM)
    assert process.wait(timeout=5) == 17
    assert process.stdout.read() == "got-term\n"
    assert sandbox.run(["true"]).returncode == 0  # the sandbox itself carries on


def test_zombies_are_reaped(sandbox):
    sandbox.run("for i in 1 2 3 4 5; do (sleep 0.01 &) ; done; sleep 0.3", check=True)
    states = sandbox.run(["sh", "-c", "cat /proc/[0-9]*/stat"]).stdout
    assert ") Z " not in states
