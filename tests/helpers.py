"""Observing sandboxes from the host, the way a user (or a leak) would be seen."""

from __future__ import annotations

import os
import time


def processes_in_pid_namespace(ns: str) -> list[int]:
    """Host PIDs of the live processes whose PID namespace is `ns` ('pid:[4026...]').

    A zombie keeps its PID namespace until it is reaped (a closed sandbox's init, for the moment
    before the spawner reaps it), but it runs nothing and holds nothing: it is not counted.
    """
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                if os.readlink(f"/proc/{name}/ns/pid") == ns and alive(int(name)):
                    found.append(int(name))
            except OSError:
                continue
    return found


def sandbox_processes(ns: str, init_pid: int) -> set[int]:
    """Every live process of a sandbox, its init included.

    The init is not dumpable, so an unprivileged owner cannot read its /proc/N/ns links: it is
    counted by PID instead.
    """
    found = set(processes_in_pid_namespace(ns))
    if alive(init_pid):
        found.add(init_pid)
    return found


def commands_of(ns: str, init_pid: int) -> set[int]:
    """The sandbox's live processes but its init: what its commands left running."""
    return sandbox_processes(ns, init_pid) - {init_pid}


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_until(predicate, timeout: float = 5.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def host_python() -> str:
    """The real interpreter behind this venv: inside a `rootfs="host"` sandbox (whose /tmp is its
    own) it is still there, so tests can make raw syscalls from inside a sandbox."""
    import sys
    return os.path.realpath(sys.executable)


def talk(address: tuple[str, int], data: bytes) -> bytes:
    """Send `data` to a server, half-close, and read its whole answer."""
    import socket
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    return b"".join(chunks)
