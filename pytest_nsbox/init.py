"""PID 1 of a sandbox: builds its root, then starts commands on request, reaps, forwards signals.

The init talks to its owner over one SOCK_SEQPACKET socket.  Requests: `exec` (argv, env, cwd and
up to three stdio descriptors), `signal` (one process or the whole session a command started).
Events: `ready`, `started`/`failed` per exec, `exited` per command with its returncode (a signal
death as -N, as in subprocess), `expired` when the sandbox's lifetime runs out, `error` when setup
fails.  When the socket closes — the owner closed the sandbox, or died — init exits, and the kernel
kills every process left in its PID namespace: nothing can outlive the sandbox.
"""

from __future__ import annotations

import errno
import marshal
import os
import resource
import select
import signal
import socket
import time

from . import kernel, layout, protocol

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing (see spawner.py)
if TYPE_CHECKING:
    from typing import Any


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)


class Init:
    def __init__(self, sock: socket.socket, spec: dict[str, Any]):
        self.sock = sock
        self.spec = spec
        self.commands: set[int] = set()
        self.deadline: float | None = None  # set when the owner says hello: a sandbox may be prebuilt
        self.expired = False
        self.devnull: int | None = None

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        binds = [layout.BindSpec(*b) for b in spec["mounts"]]
        layout.build(spec["tree"], binds, host_network=spec["network"] == "host",
                     host_root=spec.get("host_root", False))
        layout.set_hostname(spec["hostname"])
        if spec["network"] == "none":
            layout.bring_up_loopback()
            layout.relax_private_network()
        namespaces = {name: os.readlink(f"/proc/self/ns/{name}") for name in kernel.NAMESPACE_FLAGS}
        # Lock the mounts: in a nested user namespace they are inherited as locked, so even the
        # sandbox's root cannot unmount them or remount a read-only bind writable.
        kernel.unshare(kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS)
        kernel.write_id_maps(0, 0)
        if spec.get("pids_max") and spec.get("mechanism") == "rlimit":
            # Counted per user namespace (Linux >= 5.14): this caps the sandbox, not the user.
            resource.setrlimit(resource.RLIMIT_NPROC, (spec["pids_max"], spec["pids_max"]))
        # Nobody inside may open /proc/1/exe (the host's Python) or ptrace us: runc CVE-2019-5736.
        kernel.set_dumpable(False)
        protocol.send(self.sock, {"op": "ready", "namespaces": namespaces})

    # -- the loop ---------------------------------------------------------------------------
    def serve(self) -> None:
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, *FORWARDED_SIGNALS):
            signal.signal(sig, _noop)
        while True:
            timeout = None
            if self.deadline is not None and not self.expired:
                timeout = max(0.0, self.deadline - time.monotonic())
            ready, _, _ = select.select([self.sock, wake_r], [], [], timeout)
            if wake_r in ready:
                for signum in os.read(wake_r, 512):
                    if signum == signal.SIGCHLD:
                        self.reap()
                    else:
                        self.forward(signum)
            if self.sock in ready:
                message, fds = protocol.receive(self.sock, socket.MSG_DONTWAIT)
                if message is None:
                    os._exit(0)
                self.handle(message, fds)
            if self.deadline is not None and not self.expired and time.monotonic() >= self.deadline:
                self.expire()

    def handle(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        try:
            if op == "hello":
                if self.spec.get("timeout"):
                    self.deadline = time.monotonic() + self.spec["timeout"]
            elif op == "exec":
                self.start(message, fds)
            elif op == "signal":
                self.signal(message["pid"], message["signal"], message.get("session", False))
        finally:
            for fd in fds:
                os.close(fd)

    def reap(self) -> None:
        for pid, status in kernel.reap_children():
            if pid in self.commands:
                self.commands.discard(pid)
                protocol.send(self.sock, {"op": "exited", "pid": pid,
                                          "returncode": os.waitstatus_to_exitcode(status)})

    def forward(self, signum: int) -> None:
        for pid in self.commands:
            _kill(pid, signum)

    def expire(self) -> None:
        self.expired = True
        _kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
        protocol.send(self.sock, {"op": "expired", "timeout": self.spec["timeout"]})

    def signal(self, pid: int, signum: int, session: bool) -> None:
        if pid not in self.commands:
            return
        _kill(pid, signum)
        if not session:
            return
        # A fork bomb refills its session while we kill it: repeat until it is empty, and if it
        # is not within half a second, kill everything in the sandbox but us.
        deadline = time.monotonic() + 0.5
        while True:
            members = _session_members(pid)
            if not members:
                return
            for member in members:
                _kill(member, signum)
            if signum != signal.SIGKILL:
                return
            if time.monotonic() > deadline:
                _kill(-1, signal.SIGKILL)
                return

    # -- commands ---------------------------------------------------------------------------
    def start(self, message: dict[str, Any], fds: list[int]) -> None:
        request_id = message["id"]
        if self.expired:
            protocol.send(self.sock, {"op": "failed", "id": request_id, "expired": True,
                                      "error": f"the sandbox's lifetime of {self.spec['timeout']} s expired"})
            return
        stdio = _stdio_slots(message["stdio"], fds)
        if self.spec.get("memory_max") and self.spec.get("memory_mechanism") == "rlimit":
            self._fork_exec(request_id, message, stdio)  # RLIMIT_AS must be set in the child
            return
        try:
            pid = self._spawn(message, stdio)
        except OSError as exc:
            self._failed(request_id, *_exec_failure(exc, message["cwd"]))
            return
        self.commands.add(pid)
        protocol.send(self.sock, {"op": "started", "id": request_id, "pid": pid})

    def _spawn(self, message: dict[str, Any], stdio: list[int | None]) -> int:
        """posix_spawn (vfork): no Python runs in the child, and init's size does not matter."""
        argv, env, cwd = message["argv"], message["env"], message["cwd"]
        if not os.path.isdir(cwd):
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), cwd)
        if self.devnull is None:
            self.devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        fds = [self.devnull if fd is None else fd for fd in stdio]
        return kernel.spawn(_which(argv[0], env.get("PATH", "")), argv, env, cwd, fds)

    def _fork_exec(self, request_id: int, message: dict[str, Any], stdio: list[int | None]) -> None:
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:
            os.close(err_r)
            if self.spec.get("memory_max") and self.spec.get("memory_mechanism") == "rlimit":
                limit = self.spec["memory_max"]
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            _exec_child(message, stdio, err_w)
        os.close(err_w)
        with os.fdopen(err_r, "rb") as f:
            failure = f.read()
        if failure:
            os.waitpid(pid, 0)
            self._failed(request_id, *marshal.loads(failure))
            return
        self.commands.add(pid)
        protocol.send(self.sock, {"op": "started", "id": request_id, "pid": pid})

    def _failed(self, request_id: int, errno_: int, error: str) -> None:
        protocol.send(self.sock, {"op": "failed", "id": request_id, "errno": errno_, "error": error})


def _which(name: str, path: str) -> str:
    """execvp's search, over the sandbox's PATH (posix_spawnp would search init's own)."""
    if "/" in name:
        return name
    denied = None
    for directory in path.split(":"):
        candidate = os.path.join(directory or ".", name)
        if os.path.isfile(candidate):
            if os.access(candidate, os.X_OK):
                return candidate
            denied = candidate
    if denied:
        raise OSError(errno.EACCES, os.strerror(errno.EACCES), name)
    raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), name)


def _stdio_slots(layout_: list[str | None], fds: list[int]) -> list[int | None]:
    """Map the request's stdio description (`fd` or null per slot) onto the fds that came with it."""
    it = iter(fds)
    return [next(it) if slot == "fd" else None for slot in layout_]


def _exec_child(message: dict[str, Any], stdio: list[int | None], err_w: int) -> None:
    """In the forked child: become the command.  Never returns."""
    try:
        os.setsid()  # no controlling terminal: no TIOCSTI into the user's (CVE-2017-5226)
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        for target, fd in enumerate(stdio):
            os.dup2(devnull if fd is None else fd, target, inheritable=True)
        # Nothing but 0/1/2 crosses exec: not xdist's channels, not a lock file (CVE-2024-21626).
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 20)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ, *FORWARDED_SIGNALS, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        signal.set_wakeup_fd(-1)
        os.chdir(message["cwd"])
        if not os.getcwd().startswith("/"):
            raise OSError(errno.EACCES, "working directory is outside the sandbox's root")
        argv, env = message["argv"], message["env"]
        # Not os.execvpe: it imports `warnings` lazily, and the host's stdlib is gone after pivot_root.
        os.execve(_which(argv[0], env.get("PATH", "")), argv, env)
    except OSError as exc:
        os.write(err_w, marshal.dumps(_exec_failure(exc, message["cwd"])))
    except BaseException as exc:  # noqa: BLE001 - report whatever stopped us, then leave
        os.write(err_w, marshal.dumps((0, repr(exc))))
    os._exit(127)


def _exec_failure(exc: OSError, cwd: str) -> tuple[int, str]:
    """(errno, sentence) for a command that could not be started."""
    what = "chdir" if exc.filename == cwd else "exec"
    name = errno.errorcode.get(exc.errno or 0, "?")
    return exc.errno or 0, f"{what} {exc.filename}: {name} ({exc.strerror})"


def _session_members(sid: int) -> list[int]:
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or name == "1":
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        # Fields after "comm)": state ppid pgrp session.  Zombies are dead already.
        if int(fields[3]) == sid and fields[0] != b"Z":
            members.append(int(name))
    return members


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _noop(_signum: int, _frame: object) -> None:
    pass


def main(sock: socket.socket, spec: dict[str, Any], parent_alive: int) -> None:
    """Entry point of PID 1, called in the child the monitor forked.  Never returns."""
    try:
        kernel.set_parent_death_signal(signal.SIGKILL)
        try:
            if os.read(parent_alive, 1) == b"":
                os._exit(1)  # the monitor died before we armed the death signal
        except BlockingIOError:
            pass
        os.close(parent_alive)
        kernel.set_process_name("nsbox-init")
        init = Init(sock, spec)
        try:
            init.setup()
        except OSError as exc:
            protocol.send(sock, {"op": "error", "message": str(exc), "errno": exc.errno})
            os._exit(1)
        init.serve()
    except BaseException as exc:  # noqa: BLE001 - PID 1 must say why it dies, then die
        try:
            protocol.send(sock, {"op": "error", "message": f"sandbox init failed: {exc!r}"})
        except OSError:
            pass
    os._exit(1)
