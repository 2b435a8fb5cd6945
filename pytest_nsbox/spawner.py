"""The spawner: a small single-threaded process that forks every sandbox.

Forking the test process itself would cost more the bigger it grows (a 2 GB pytest forks ~20x
slower than a 50 MB one), and a multi-threaded process — every pytest-xdist worker — can neither
create a user namespace (EINVAL) nor safely run Python code after fork.  So the test process
starts one spawner, once, and asks it for sandboxes over a socket.

Process tree of one sandbox, and why each level exists::

    test process ──socket──> spawner            (one per test process; exits when the socket closes)
                               └─ monitor       (unshares the namespaces, writes the id maps,
                                   │             waits for init; dies with the spawner: PDEATHSIG)
                                   └─ init, PID 1 of the sandbox  (layout, then serves requests;
                                        │                           dies with the monitor: PDEATHSIG)
                                        └─ commands (setsid, exec)

The monitor and init hold the sandbox's socket, so the owner sees it close only once init has
exited and the kernel has killed and reaped everything in the sandbox's PID namespace.

Every sandbox costs two forks of a process the size of the spawner, and on virtual machines fork
time grows with the forking process's memory (here 0.8 ms at 10 MB, 1.3 ms at 19 MB).  So the
modules the spawner loads (this one, init, layout, kernel, caps, protocol) import only small parts
of the stdlib: no typing, dataclasses, pathlib, secrets or hashlib.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import sys

from . import caps, init, kernel, protocol

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing (see spawner.py)
if TYPE_CHECKING:
    from typing import Any


SANDBOX_FLAGS = (kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS | kernel.CLONE_NEWPID | kernel.CLONE_NEWIPC
                 | kernel.CLONE_NEWUTS | kernel.CLONE_NEWCGROUP)


def namespace_flags(network: str) -> int:
    return SANDBOX_FLAGS | (kernel.CLONE_NEWNET if network == "none" else 0)


class Spawner:
    def __init__(self, control: socket.socket):
        self.control = control
        self.pid = os.getpid()
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.plan = caps.detect()
        caps.sweep_stale(self.plan)
        self.monitors: dict[int, caps.SandboxCgroup | None] = {}  # pid -> its sandbox's cgroup
        # Sandboxes prebuilt for the spec last asked for: per-test sandboxes tend to repeat their
        # spec, so the next ones are built while the current test runs.  Two, so that with quick
        # tests two builds overlap on a second core.
        self.prefork = _prefork_depth()
        self.spare_key: str | None = None
        self.spares: list[tuple[socket.socket, dict[str, Any]]] = []

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            ready, _, _ = select.select([self.control, self.wake_r], [], [])
            if self.wake_r in ready:
                os.read(self.wake_r, 512)
                self.reap()
            if self.control in ready:
                message, fds = protocol.receive(self.control, socket.MSG_DONTWAIT)
                if message is None:
                    self.shutdown()
                    return
                for fd in fds:
                    os.close(fd)
                self.handle(message)

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "create":
            self.create(message["spec"])
        elif op == "hello":
            protocol.send(self.control, {"op": "hello", "caps": self.plan.to_json()})
        elif op == "probe":
            protocol.send(self.control, {"op": "probed", "caps": self.plan.to_json(),
                                         **probe(message.get("network", "none"))})
        else:
            protocol.send(self.control, {"op": "error", "message": f"unknown request {op!r}"})

    def create(self, spec: dict[str, Any]) -> None:
        key = repr(sorted(spec.items()))  # specs are plain values: equal specs, equal keys
        if key != self.spare_key:
            self.drop_spares()
            self.spare_key = key
        if self.spares:
            sock, info = self.spares.pop(0)
        else:
            try:
                sock, info = self.build(spec)
            except OSError as exc:
                protocol.send(self.control, {"op": "error", "message": kernel.describe(
                    exc.errno or 0, "create the sandbox's cgroup", exc.filename)})
                return
        protocol.send(self.control, info, [sock.fileno()])
        sock.close()
        while len(self.spares) < self.prefork:
            try:
                self.spares.append(self.build(spec))
            except OSError:
                break  # the next request builds on demand and reports the error

    def drop_spares(self) -> None:
        for sock, _info in self.spares:
            sock.close()  # its init sees EOF and ends the unwanted sandbox
        self.spares.clear()

    def build(self, spec: dict[str, Any]) -> tuple[socket.socket, dict[str, Any]]:
        """Fork a sandbox's monitor; return our end of its socket and the `created` reply."""
        # The cgroup exists before the monitor does, so whatever happens next, reaping the monitor
        # (or, if we are SIGKILLed, the next session's sweep) removes it.
        cgroup = caps.SandboxCgroup.create(self.plan, self.pid, spec.get("pids_max"),
                                           spec.get("memory_max"))
        spec = {**spec, "mechanism": self.plan.mechanism,
                "memory_mechanism": self.plan.memory_mechanism,
                "cgroup": cgroup.dirs if cgroup else None}
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            self._become_child()
            monitor(theirs, spec, self.pid)
        theirs.close()
        self.monitors[pid] = cgroup
        return ours, {"op": "created", "monitor": pid, "caps": self.plan.to_json(),
                      "cgroup": cgroup.dirs if cgroup else None,
                      "cgroup_version": cgroup.version if cgroup else None}

    def _become_child(self) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.control.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        for sock, _info in self.spares:
            sock.close()  # other sandboxes' sockets: not ours to hold

    def shutdown(self) -> None:
        """The owner is gone: end every sandbox and remove every cgroup we made, then leave.

        Monitors would die with us anyway (PDEATHSIG), but their cgroups would stay behind, and
        they and their inits would linger as zombies until the host's PID 1 reaps them.  As a
        subreaper we inherit each init whose monitor is killed, so when wait() says there are no
        children left, nothing of any sandbox is left either.
        """
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.drop_spares()
        for pid in self.monitors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        while True:
            try:
                pid, _status = os.wait()
            except ChildProcessError:
                break
            self._forget(pid)
        caps.remove_parents(self.plan)

    def reap(self) -> None:
        for pid, _status in kernel.reap_children():
            self._forget(pid)

    def _forget(self, pid: int) -> None:
        """A monitor (or an inherited init) was reaped: its sandbox is gone, and so is its cgroup."""
        cgroup = self.monitors.pop(pid, None)
        if cgroup:
            try:
                cgroup.destroy()
            except OSError:
                pass  # the next session's sweep retries


def _prefork_depth() -> int:
    value = os.environ.get("NSBOX_PREFORK", "2")
    return int(value) if value.isdigit() else 2


def monitor(sock: socket.socket, spec: dict[str, Any], spawner_pid: int) -> None:
    """The sandbox's outer process.  Never returns."""
    try:
        kernel.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != spawner_pid:
            os._exit(1)  # the spawner died before the death signal was armed
        kernel.set_process_name("nsbox-monitor")
        if spec.get("cgroup"):
            # Before unshare: inside the new user namespace we could no longer write the host's
            # cgroup files.  Everything the sandbox forks from here on is counted.
            caps.SandboxCgroup(0, spec["cgroup"]).join()
        uid, gid = os.getuid(), os.getgid()
        kernel.unshare(namespace_flags(spec["network"]))
        kernel.write_id_maps(uid, gid)
        alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(alive_r, False)
        pid = os.fork()
        if pid == 0:
            os.close(alive_w)
            init.main(sock, spec, alive_r)
        os.close(alive_r)
        protocol.send(sock, {"op": "init", "pid": pid})
        os.waitpid(pid, 0)
    except OSError as exc:
        try:
            protocol.send(sock, {"op": "error", "message": str(exc), "errno": exc.errno,
                                 "unavailable": True})
        except OSError:
            pass
        os._exit(1)
    os._exit(0)


def probe(network: str) -> dict[str, Any]:
    """Can sandboxes be made here?  Forks a child that makes namespaces and an overlay, like a
    sandbox does, and reports the first failure with its cause."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(r)
        message = b""
        uid, gid = os.getuid(), os.getgid()
        try:
            kernel.unshare(namespace_flags(network))
            kernel.write_id_maps(uid, gid)
            kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, operation="make mounts private")
            kernel.mount("tmpfs", "/tmp", "tmpfs", 0, "mode=0700", operation="mount tmpfs")
            for name in ("lower", "upper", "work", "root"):
                os.mkdir(f"/tmp/{name}")
            kernel.mount("overlay", "/tmp/root", "overlay", 0,
                         "lowerdir=/tmp/lower,upperdir=/tmp/upper,workdir=/tmp/work,userxattr")
        except OSError as exc:
            message = str(exc).encode()
        except BaseException as exc:  # noqa: BLE001
            message = repr(exc).encode()
        os.write(w, message)
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        error = f.read().decode()
    os.waitpid(pid, 0)
    return {"ok": not error, "error": error}


def main(control_fd: int) -> None:
    """Entry point: `python -I -S -c "...main(FD)"`, started once by the test process."""
    os.set_inheritable(control_fd, False)
    control = socket.socket(fileno=control_fd)
    try:
        kernel.set_process_name("nsbox-spawner")
        kernel.become_subreaper()
        Spawner(control).serve()
    except BaseException as exc:  # noqa: BLE001 - tell the owner why, instead of dying silently
        try:
            protocol.send(control, {"op": "error", "message": f"spawner failed: {exc!r}"})
        except OSError:
            pass
        sys.exit(1)
    sys.exit(0)
