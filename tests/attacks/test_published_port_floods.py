"""A published port against a flood of connections.

`Sandbox.port()` listens on the host's 127.0.0.1, where any local user may connect, as often as it
likes, and then neither read nor close. The relay lives in the test process: what it holds per
connection (threads, buffers, descriptors) must have a ceiling, per port and for the process, and
what comes beyond it is closed at once, said once, not once per connection.
"""

from __future__ import annotations

import os
import pwd
import resource
import shutil
import socket
import subprocess
import textwrap
import time

import pytest

from pytest_nsbox import ConfigError, NsboxWarning
from pytest_nsbox.engine import services

from ..helpers import talk

ECHO = ["nc", "-lk", "-p", "8080", "-e", "cat"]  # busybox: a process per connection, echoing
SLACK_THREADS = 4  # the port's accept thread, and threads the plugin may start meanwhile
SLACK_RSS = 24 << 20  # the interpreter's own growth: sockets, frames, allocator rounding


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS in /proc/self/status")


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))



def flood(address: tuple[str, int], count: int, push: int = 1 << 20,
          half_close: bool = True) -> list[socket.socket]:
    """`count` connections that never read: two in three push `push` bytes (the relay's buffers fill
    both ways, as the server echoes to a client that does not read), one in three of those then
    half-closes (unless not `half_close`), and the rest stay idle."""
    held = []
    chunk = b"x" * (1 << 16)
    for i in range(count):
        try:
            sock = socket.create_connection(address, timeout=5)
        except OSError:
            continue
        held.append(sock)
        sock.setblocking(False)
        sent = 0
        while i % 3 != 2 and sent < push:
            try:
                sent += sock.send(chunk)
            except OSError:  # full (a slow reader's own doing), or refused and reset
                break
        if half_close and i % 3 == 1:
            try:
                sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
    return held


def refused(address: tuple[str, int]) -> bool:
    """Whether a connection to an echo server at `address` is closed at once instead of served."""
    try:
        with socket.create_connection(address, timeout=5) as sock:
            sock.sendall(b"x")
            return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def peaks(seconds: float) -> tuple[int, int]:
    """The most threads and the largest RSS of this process seen within `seconds`."""
    most_threads, most_rss = threads(), rss()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        most_threads, most_rss = max(most_threads, threads()), max(most_rss, rss())
    return most_threads, most_rss


def settle(predicate, seconds: float = 15.0) -> bool:
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


def test_a_flood_of_three_times_the_limit_leaves_the_process_bounded(sandbox_factory):
    limit = services.MAX_CONNECTIONS
    assert limit == 64
    warm = sandbox_factory()
    warm.close()  # the spawner's connection and the like exist before the baseline
    fds_before, threads_before = descriptors(), threads()
    box = sandbox_factory()
    server = box.spawn(ECHO)
    published = box.wait_for_port(8080, process=server)
    assert talk(published, b"before") == b"before"
    threads_ready, rss_ready = threads(), rss()

    held = flood(published, 3 * limit)
    most_threads, most_rss = peaks(1.5)
    close_all(held)

    assert most_threads - threads_ready <= 2 * limit + SLACK_THREADS
    assert most_rss - rss_ready <= limit * 2 * services.BUFFER_SIZE + SLACK_RSS
    # The flood over, the server is reached again, by a fresh connection, at once.
    assert settle(lambda: threads() <= threads_ready)
    assert talk(published, b"after the flood") == b"after the flood"
    with pytest.warns(NsboxWarning) as warned:
        box.close()
    notes = [str(w.message) for w in warned if "closed" in str(w.message)]
    assert len(notes) == 1, notes  # said once, not once per connection
    assert f"limit of {limit} open at once" in notes[0] and "max_connections" in notes[0]
    assert "(the sandbox's port 8080)" in notes[0]
    # Nothing of the relay is left: no thread, no socket.
    assert settle(lambda: threads() <= threads_before)
    assert descriptors() <= fds_before


def test_the_limit_is_a_keyword_of_port_and_bounds_each_port(sandbox_factory):
    box = sandbox_factory()
    server = box.spawn(ECHO)
    box.wait_for_port(8080, process=server)
    published = box.port(8080, max_connections=8)
    assert box.port(8080) == published  # the same port keeps its limit
    threads_ready = threads()
    # Neither reading nor closing, they hold every slot (a half-closed one whose echo fits in the
    # kernel's buffers ends, and frees its slot, as it should).
    held = flood(published, 24, half_close=False)
    most_threads, _ = peaks(1.0)
    assert refused(published)  # a ninth is closed at once, not queued
    close_all(held)
    assert most_threads - threads_ready <= 2 * 8 + SLACK_THREADS
    assert settle(lambda: threads() <= threads_ready)
    assert talk(published, b"fresh") == b"fresh"
    with pytest.warns(NsboxWarning, match=r"limit of 8 open at once"):
        box.close()
    for wrong in (0, -1, True, 1.5, services.PROCESS_SLOTS.limit + 1):
        with pytest.raises(ConfigError, match="max_connections"):
            sandbox_factory().port(8080, max_connections=wrong)


def test_all_published_ports_of_a_process_share_one_ceiling(sandbox_factory, monkeypatch):
    monkeypatch.setattr(services.PROCESS_SLOTS, "limit", 20)
    box = sandbox_factory()
    for port in (8080, 8081):
        box.spawn(["nc", "-lk", "-p", str(port), "-e", "cat"])
    published = [box.wait_for_port(port) for port in (8080, 8081)]
    for port in (8080, 8081):
        box.port(port, max_connections=16)
    threads_ready = threads()
    held = flood(published[0], 3 * 16) + flood(published[1], 3 * 16)
    most_threads, _ = peaks(1.0)
    close_all(held)
    assert most_threads - threads_ready <= 2 * 20 + SLACK_THREADS
    assert settle(lambda: services.PROCESS_SLOTS.open == 0)
    assert [talk(p, b"both") for p in published] == [b"both", b"both"]
    with pytest.warns(NsboxWarning) as warned:
        box.close()
    assert any("the limit of 20 for all published ports of this process" in str(w.message) for w in warned)


def test_a_port_outlives_running_out_of_descriptors(sandbox_factory):
    box = sandbox_factory()
    server = box.spawn(ECHO)
    published = box.wait_for_port(8080, process=server)
    threads_ready = threads()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (descriptors() + 6, hard))
        for _ in range(12):  # the relay's accept() meets EMFILE
            try:
                held.append(socket.create_connection(published, timeout=2))
            except OSError:
                break
        time.sleep(0.3)
    finally:
        close_all(held)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert settle(lambda: threads() <= threads_ready)
    assert talk(published, b"still here") == b"still here"


FLOOD_AS_ANOTHER_USER = textwrap.dedent("""
    import socket, sys, time
    held = []
    for i in range(int(sys.argv[2])):
        try:
            s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5)
        except OSError:
            continue
        held.append(s)
        s.setblocking(False)
        try:
            while i % 2 and s.send(b"x" * 65536):
                pass
        except OSError:
            pass
    print(len(held), flush=True)
    sys.stdin.read()  # hold them until told
""")


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a flood as another user")
def test_a_flood_from_another_local_user_is_bounded_alike(sandbox_factory):
    python = shutil.which("python3", path="/usr/bin:/bin")
    try:
        uid = pwd.getpwnam("nobody").pw_uid
    except KeyError:
        pytest.skip("no user `nobody` to flood as")
    if python is None:
        pytest.skip("no /usr/bin/python3 another user may run")
    limit = services.MAX_CONNECTIONS
    box = sandbox_factory()
    server = box.spawn(ECHO)
    published = box.wait_for_port(8080, process=server)
    threads_ready, rss_ready = threads(), rss()
    with subprocess.Popen([python, "-c", FLOOD_AS_ANOTHER_USER, str(published.port), str(3 * limit)],
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          user=uid, group=uid, extra_groups=[], cwd="/") as attacker:
        try:
            assert attacker.stdout is not None and int(attacker.stdout.readline()) > limit
            most_threads, most_rss = peaks(1.0)
        finally:
            attacker.kill()
    assert most_threads - threads_ready <= 2 * limit + SLACK_THREADS
    assert most_rss - rss_ready <= limit * 2 * services.BUFFER_SIZE + SLACK_RSS
    assert settle(lambda: threads() <= threads_ready)
    assert talk(published, b"owner's turn") == b"owner's turn"
    with pytest.warns(NsboxWarning, match="closed"):
        box.close()
