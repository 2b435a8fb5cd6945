"""The spawner's socket in other hands: only the test process that started the spawner is served.

The spawner is unconfined: it builds sandboxes with whatever binds a request names.  Its socket is
an ordinary descriptor, so a fork of the test process (a test's own os.fork(), an isolated test's
child before it drops it) or a program that was handed the descriptor can write to it.  Each test
here does that from a real fork, and from a child in its own user and PID namespaces as isolate
mode makes them, and checks that the stranger gets nothing, changes nothing, and cannot crash or
wedge the spawner for its owner.

Root's plain forks are not strangers: they hold root's capabilities, with which a process may claim
any PID of its namespace (and could ptrace the test process anyway).  They are as trusted as the
test process, and served; still, what they ask for is answered where only the owner reads, under
an id they cannot guess, so the owner never takes it for its own.  A fork in its own user
namespace (isolate mode's) is a stranger, root or not.
"""

from __future__ import annotations

import marshal
import os
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from pytest_nsbox.engine import client, kernel, protocol
from ..helpers import alive, wait_until

ROOT = os.geteuid() == 0
# What a hostile sender may write instead of a request.
GARBAGE: tuple[bytes, ...] = (
    b"",                                                   # an empty message, which looks like EOF
    os.urandom(64),
    b"\xff" * 16,
    marshal.dumps({"op": "create", "spec": {}})[:-3],      # cut short
    b"[" + (0x7FFFFFFF).to_bytes(4, "little"),             # a list that claims 2**31 items
    b"[\x01\x00\x00\x00" * 5000 + b"N",                    # nested deeper than marshal's stack
    marshal.dumps([1, 2, 3]),                              # not a dict
    marshal.dumps({"op": "create"}),                       # no spec
    marshal.dumps({"op": "create", "spec": 5, "id": 1}),
    marshal.dumps({"op": 7}),
    marshal.dumps(compile("import os; os._exit(3)", "x", "exec")),  # marshal decodes code too
    b"x" * 150_000,                                        # as big as a message gets
)


@pytest.fixture
def owner_spec(sandbox_factory, monkeypatch):
    """The spec the owner's sandboxes are made of (a stranger can build the same), with the
    spawner started."""
    specs = []
    create = client.Spawner.create

    def recording(self, spec):
        specs.append(spec)
        return create(self, spec)

    monkeypatch.setattr(client.Spawner, "create", recording)
    sandbox_factory().close()
    return specs[-1]


def rogue_spec(spec: dict, target: os.PathLike) -> dict:
    """The owner's spec with a writable bind of a host directory of the stranger's choosing."""
    return {**spec, "hostname": "rogue", "mounts": [*spec["mounts"], [str(target), "/rogue", True]]}


def send_creates(control: socket.socket, spec: dict) -> socket.socket:
    """Ask for a sandbox as the owner would, in every form a request has had, and with a socket
    to answer on sent along; the stranger's end of that socket."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    protocol.send(control, {"op": "create", "spec": spec})
    # The id the owner's next request would carry if ids were counted (they are random).
    next_id = getattr(client.Spawner._instance, "_last_id", 0) + 1
    protocol.send(control, {"op": "create", "id": next_id, "spec": spec})
    protocol.send(control, {"op": "create", "id": next_id, "spec": spec}, [theirs.fileno()])
    theirs.close()
    return mine


def send_garbage(control: socket.socket) -> None:
    for data in GARBAGE:
        try:
            control.send(data)
        except OSError:
            pass  # bigger than the socket takes: nothing sent
    with open(os.devnull, "rb") as null:
        socket.send_fds(control, [marshal.dumps({"op": "hello", "id": 1})], [null.fileno()] * 200)


def anything_arrives(socks: list[socket.socket], timeout: float) -> bool:
    """Whether a message (data or descriptors) reaches any of `socks` within `timeout`; EOF is not one."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        ready, _, _ = select.select(socks, [], [], left)
        for sock in ready:
            data, ancillary, _flags, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4), socket.MSG_DONTWAIT)
            if data or ancillary:
                return True
            socks = [s for s in socks if s is not sock]  # EOF
        if not socks:
            return False
    return False


def in_fork(child, namespaces: int = 0) -> bytes:
    """Run `child()` in a fork of this process (with `namespaces`: in new ones, root inside);
    what it returned."""
    r, w = os.pipe()
    uid, gid = os.getuid(), os.getgid()
    if namespaces:
        pid, pidfd = kernel.fork_into(namespaces, what="fork a stranger")
    else:
        pid, pidfd = os.fork(), -1
    if pid == 0:
        try:
            os.close(r)
            if namespaces & kernel.CLONE_NEWUSER:
                kernel.write_id_maps(uid, gid)
            os.write(w, child())
        except BaseException as exc:  # noqa: BLE001 - say it, the parent asserts on it
            os.write(w, f"child failed: {exc!r}".encode())
        finally:
            os._exit(0)
    os.close(w)
    if pidfd >= 0:
        os.close(pidfd)
    with os.fdopen(r, "rb") as f:
        said = f.read()
    os.waitpid(pid, 0)
    return said


def control() -> socket.socket:
    """The test process's end of its spawner's socket, as a fork inherits it (Spawner.get() would
    start the fork a spawner of its own)."""
    assert client.Spawner._instance is not None
    return client.Spawner._instance.sock


def mounted_anywhere(path: os.PathLike) -> list[int]:
    """PIDs (whose mount table we may read) that have `path` mounted.  A bind's root is shown
    relative to its filesystem: its last components, unique to a test, are matched."""
    tail = "/" + "/".join(os.fspath(path).split("/")[-3:])
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/mountinfo") as f:
                    table = f.read()
            except OSError:
                continue
            if f"{tail} " in table or f"{tail}/" in table:
                found.append(int(name))
    return found


def assert_served_as_before(sandbox_factory, spawner_pid: int) -> None:
    """The owner's next sandbox is its own, made within a second by the same spawner."""
    started = time.monotonic()
    box = sandbox_factory()
    assert box.run("hostname").stdout == "nsbox\n"
    assert box.run("test -e /rogue").returncode == 1
    assert time.monotonic() - started < 1.0
    assert client.Spawner.get().process.pid == spawner_pid, "the spawner died and was restarted"
    box.close()


def test_a_forked_child_cannot_queue_a_sandbox_for_the_next_request(owner_spec, sandbox_factory, tmp_path):
    target = tmp_path / "host-dir"
    target.mkdir()
    spawner_pid = client.Spawner.get().process.pid

    def stranger() -> bytes:
        send_creates(control(), rogue_spec(owner_spec, target))
        return b"sent"  # and never reads a reply

    assert in_fork(stranger) == b"sent"
    box = sandbox_factory()
    assert box.run("hostname").stdout == "nsbox\n"
    assert box.run("test -e /rogue").returncode == 1, "the owner was handed the stranger's sandbox"
    assert not mounted_anywhere(target), "the stranger's bind was made"
    box.close()
    assert_served_as_before(sandbox_factory, spawner_pid)
    assert not mounted_anywhere(target)
    assert list(target.iterdir()) == []


def test_a_forked_child_gets_no_reply_and_no_descriptors(owner_spec, tmp_path):
    def stranger() -> bytes:
        sock = control()
        mine = send_creates(sock, rogue_spec(owner_spec, tmp_path))
        return b"served" if anything_arrives([sock, mine], timeout=1.5) else b"nothing"

    assert in_fork(stranger) == b"nothing"
    assert not mounted_anywhere(tmp_path)


def test_garbage_from_a_forked_child_neither_crashes_nor_wedges_the_spawner(owner_spec, sandbox_factory):
    spawner_pid = client.Spawner.get().process.pid

    def stranger() -> bytes:
        send_garbage(control())
        return b"sent"

    assert in_fork(stranger) == b"sent"
    assert_served_as_before(sandbox_factory, spawner_pid)


def test_a_flood_from_a_forked_child_does_not_starve_the_owner(owner_spec, sandbox_factory):
    spawner_pid = client.Spawner.get().process.pid
    pid = os.fork()
    if pid == 0:
        try:
            sock = control()
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                send_garbage(sock)
        finally:
            os._exit(0)
    try:
        time.sleep(0.2)
        for _ in range(3):
            assert_served_as_before(sandbox_factory, spawner_pid)
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)


@pytest.mark.skipif(ROOT, reason="root's forks may claim any PID: they are as trusted as the test process")
def test_a_forked_child_cannot_claim_the_owners_pid():
    owner = os.getpid()

    def stranger() -> bytes:
        forged = (owner.to_bytes(4, "little") + os.getuid().to_bytes(4, "little")
                  + os.getgid().to_bytes(4, "little"))
        try:
            control().sendmsg([marshal.dumps({"op": "hello", "id": 1})],
                              [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, forged)])
        except PermissionError:
            return b"refused"
        return b"sent"

    assert in_fork(stranger) == b"refused"


NAMESPACES = kernel.CLONE_NEWUSER | kernel.CLONE_NEWPID


def claim(sock: socket.socket, pid: int, data: bytes, fds: list[int] = ()) -> str:
    """Send `data` claiming to be `pid` (root in our own user namespace may name any PID of our
    PID namespace); how the kernel took it."""
    creds = pid.to_bytes(4, "little") + (0).to_bytes(4, "little") * 2
    ancillary = [(socket.SOL_SOCKET, socket.SCM_CREDENTIALS, creds)]
    if fds:
        ancillary.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, b"".join(fd.to_bytes(4, "little") for fd in fds)))
    try:
        sock.sendmsg([data], ancillary)
    except OSError as exc:
        return exc.__class__.__name__
    return "sent"


def test_a_child_in_its_own_namespaces_cannot_pass_for_the_owner(owner_spec, sandbox_factory, tmp_path):
    """As isolate mode makes a test's child: its own user and PID namespaces, root inside.  It may
    name any PID of its own namespace, the number of the owner's PID included, and it is still
    not the owner: the kernel passes who sent, not a number."""
    spawner_pid = client.Spawner.get().process.pid
    owner = os.getpid()

    def stranger() -> bytes:
        sock = control()
        request = marshal.dumps({"op": "create", "id": 1, "spec": rogue_spec(owner_spec, tmp_path)})
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        said = [claim(sock, owner, request),  # not a PID of our namespace
                claim(sock, os.getpid(), request),  # ourselves: allowed, and 1
                claim(sock, os.getpid(), request, [theirs.fileno()])]
        # A process of our namespace whose number is the owner's.
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(owner - 1))
        r, w = os.pipe()
        child = os.fork()
        if child == 0:
            os.write(w, f"{os.getpid()} {claim(sock, owner, request)}".encode())
            os._exit(0)
        os.close(w)
        said.append(os.read(r, 100).decode())
        os.waitpid(child, 0)
        theirs.close()
        send_creates(sock, rogue_spec(owner_spec, tmp_path))
        send_garbage(sock)
        served = anything_arrives([sock, mine], timeout=1.5)
        return f"{' '.join(said)} {'served' if served else 'nothing'}".encode()

    said = in_fork(stranger, NAMESPACES).decode()
    assert said == f"ProcessLookupError sent sent {owner} sent nothing", said
    assert not mounted_anywhere(tmp_path)
    assert_served_as_before(sandbox_factory, spawner_pid)


def test_a_forked_child_cannot_read_the_owners_answers(owner_spec, sandbox_factory, monkeypatch):
    monkeypatch.setattr(client, "_REQUEST_TIMEOUT", 3.0)  # a stolen answer fails in 3 s, not 30
    spawner_pid = client.Spawner.get().process.pid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            kept = client.Spawner._instance._replies  # the socket answers come on, if the fork kept it
            socks = [control(), *([kept] if kept is not None else [])]
            os.write(w, b"served" if anything_arrives(socks, timeout=2.5) else b"nothing")
        finally:
            os._exit(0)
    os.close(w)
    try:
        time.sleep(0.1)
        for _ in range(3):
            assert_served_as_before(sandbox_factory, spawner_pid)
    finally:
        with os.fdopen(r, "rb") as f:
            said = f.read()
        os.waitpid(pid, 0)
    assert said == b"nothing"


def open_pidfds() -> int:
    return sum(os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]" for fd in os.listdir("/proc/self/fd")
               if _readable_link(f"/proc/self/fd/{fd}"))


def _readable_link(path: str) -> bool:
    try:
        os.readlink(path)
    except OSError:
        return False
    return True


def test_an_answer_that_comes_too_late_is_not_taken_for_the_next(owner_spec, sandbox_factory, monkeypatch):
    from pytest_nsbox import Sandbox, SandboxSetupError
    spawner = client.Spawner.get()
    before = open_pidfds()
    monkeypatch.setattr(client, "_REQUEST_TIMEOUT", 0.5)
    os.kill(spawner.process.pid, signal.SIGSTOP)
    try:
        with pytest.raises(SandboxSetupError, match="did not answer within"):
            Sandbox(hostname="late").start()
    finally:
        os.kill(spawner.process.pid, signal.SIGCONT)
    time.sleep(0.3)  # its answer, a sandbox, is waiting now
    monkeypatch.setattr(client, "_REQUEST_TIMEOUT", 30.0)
    assert_served_as_before(sandbox_factory, spawner.process.pid)
    assert open_pidfds() == before, "the late answer's descriptors were kept"


@pytest.mark.skipif(not ROOT, reason="only root's forks may claim the owner's PID")
def test_a_root_fork_that_claims_the_owners_pid_is_not_answered_in_its_place(owner_spec, sandbox_factory, tmp_path):
    """Root's fork is as trusted as the test process (it could ptrace it), and the spawner serves
    it; but the answer goes where only the owner reads, with an id the fork could not guess, and
    the owner drops it."""
    spawner_pid = client.Spawner.get().process.pid
    owner = os.getpid()

    def stranger() -> bytes:
        sock = control()
        spec = rogue_spec(owner_spec, tmp_path)
        said = [claim(sock, owner, marshal.dumps({"op": "create", "id": guess, "spec": spec}))
                for guess in (0, 1, 2, getattr(client.Spawner._instance, "_last_id", 0) + 1)]
        return f"{' '.join(said)} {'served' if anything_arrives([sock], timeout=1.0) else 'nothing'}".encode()

    assert in_fork(stranger) == b"sent sent sent sent nothing"
    assert_served_as_before(sandbox_factory, spawner_pid)


# An owner with a fork that keeps the spawner's socket (and sleeps), then closes or dies.
OWNER_WITH_A_FORK = textwrap.dedent("""
    import os, sys, time
    from pytest_nsbox import Sandbox
    from pytest_nsbox.engine import client
    Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start().close()
    spawner = client.Spawner.get()
    fork = os.fork()
    if fork == 0:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, 1)  # the test reads our output to its end
        os.dup2(null, 2)
        time.sleep(60)
        os._exit(0)
    print(spawner.process.pid, fork, flush=True)
    if sys.argv[3] == "close":
        started = time.monotonic()
        spawner.close()
        print(round(time.monotonic() - started, 2), spawner.process.poll(), flush=True)
    os._exit(0)  # no atexit: as if killed
""")


def run_owner_with_a_fork(alpine_tarball, cache_dir, how: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", OWNER_WITH_A_FORK, str(alpine_tarball), str(cache_dir), how],
                         capture_output=True, text=True, timeout=60)
    lines = out.stdout.split("\n")
    assert len(lines) >= 2, out
    return lines


def test_the_spawner_leaves_with_its_owner_even_if_a_fork_holds_its_socket(alpine_tarball, cache_dir):
    spawner, fork = map(int, run_owner_with_a_fork(alpine_tarball, cache_dir, "die")[0].split())
    try:
        assert wait_until(lambda: not alive(spawner), timeout=5), "the spawner outlived its owner"
    finally:
        os.kill(fork, signal.SIGKILL)


def test_closing_the_spawner_does_not_wait_for_a_fork_that_holds_its_socket(alpine_tarball, cache_dir):
    lines = run_owner_with_a_fork(alpine_tarball, cache_dir, "close")
    spawner, fork = map(int, lines[0].split())
    try:
        seconds, returncode = lines[1].split()
        assert float(seconds) < 2 and returncode == "0", lines
    finally:
        os.kill(fork, signal.SIGKILL)
