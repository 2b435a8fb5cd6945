"""The spawner: a small single-threaded process that clones every sandbox's init.

Forking the test process itself would cost more the bigger it grows (a 2 GB pytest forks ~20x
slower than a 50 MB one), and a multi-threaded process — every pytest-xdist worker — cannot safely
run Python code after fork.  So the test process starts one spawner, once, and asks it for
sandboxes over a socket::

    test process ──socket──> spawner       (one per test process; exits when the socket closes)
                               └─ init     (PID 1 of a sandbox: clone3 with every CLONE_NEW*;
                                             dies with the spawner: PDEATHSIG)

The spawner is unconfined and builds whatever a request names (binds of host paths included), and
its socket is a descriptor that a fork of the test process inherits.  So it serves the test
process alone: the kernel tells it who sent each message (SCM_CREDENTIALS), it drops every other
sender's unread (and never installs a descriptor that came with a message), and it answers on a
second socket, whose copy every fork of the owner closes, each answer with the id of its request.
It leaves when its owner dies, even if a fork still holds the socket.

Every sandbox and every command is a clone of a process the size of the spawner, and on virtual
machines a clone costs more the more memory it copies.  So the modules the spawner loads (this
one, init, layout, kernel, seccomp, caps, protocol, transfer) import only small parts of the stdlib: no
typing, dataclasses, pathlib, hashlib or threading.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import sys

from . import caps, init, kernel, protocol, seccomp, steps

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing
if TYPE_CHECKING:
    from typing import Any


SANDBOX_FLAGS = (kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS | kernel.CLONE_NEWPID | kernel.CLONE_NEWIPC
                 | kernel.CLONE_NEWUTS)


def namespace_flags(network: str) -> int:
    return SANDBOX_FLAGS | (kernel.CLONE_NEWNET if network == "none" else 0)


class Spawner:
    def __init__(self, control: socket.socket, replies: socket.socket, owner: int, owner_pidfd: int):
        self.control = control  # requests come in here
        self.replies = replies  # answers go out here
        self.owner = owner  # its PID, as the kernel names the sender of each message
        self.owner_pidfd = owner_pidfd
        self.request_id: object = None  # of the request being served, echoed in its answer
        # Every init checks this after arming its death signal: a pidfd reads ready once we are gone.
        self.alive = os.pidfd_open(os.getpid())
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.plan = caps.detect()
        caps.sweep_stale(self.plan)
        self.identity = {"uid": os.getuid(), "gid": os.getgid(),
                         "protect_proc": caps.is_global_root(),
                         "mechanism": self.plan.mechanism,
                         "memory_mechanism": self.plan.memory_mechanism}
        self.default_tmpfs = caps.default_tmpfs_size()
        self.seccomp_program = _seccomp_program()
        self.inits: dict[int, caps.SandboxCgroup | None] = {}  # pid -> its sandbox's cgroup
        # Sandboxes prebuilt for the spec last asked for: per-test sandboxes tend to repeat their
        # spec, so the next ones are built while the current test runs.
        self.prefork = prefork_depth()
        self.spare_key: str | None = None
        self.spares: list[tuple[socket.socket, int, dict[str, Any]]] = []
        self.mapped: dict[str, Any] | None = None  # the ranges of the namespace we moved into

    def serve(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        while True:
            ready, _, _ = select.select([self.control, self.wake_r, self.owner_pidfd], [], [])
            if self.wake_r in ready:
                os.read(self.wake_r, 512)
                self.reap()
            if self.owner_pidfd in ready:
                self.shutdown()  # a fork that holds the socket would keep us waiting for EOF
                return
            if self.control in ready:
                try:
                    message = protocol.receive_from(self.control, self.owner, socket.MSG_DONTWAIT)
                except (protocol.Dropped, BlockingIOError):
                    continue  # another process's, or not a message: it costs the sender only
                if message is None:
                    self.shutdown()
                    return
                self.answer(message)

    def answer(self, message: dict[str, Any]) -> None:
        """Serve one request of the owner's; the answer echoes its id."""
        self.request_id = message.get("id")
        try:
            self.handle(message)
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone, not every sandbox
            self.reply({"op": "error", "message": f"the spawner could not serve {message.get('op')!r}: {exc!r}"})

    def reply(self, message: dict[str, Any], fds: list[int] | tuple[int, ...] = ()) -> None:
        try:
            # Never wait on the owner: its end holds nothing unless it stopped reading.
            protocol.send(self.replies, {**message, "id": self.request_id}, fds, socket.MSG_DONTWAIT)
        except OSError:
            pass  # it gave up on answers that now fill its end, or is leaving: what we made is dropped

    def handle(self, message: dict[str, Any]) -> None:
        op = message["op"]
        if op == "create":
            self.create(message["spec"])
        elif op == "hello":
            self.reply({"op": "hello", "caps": self.plan.to_json()})
        elif op == "probe":
            self.reply({"op": "probed", "caps": self.plan.to_json(), **probe(message.get("network", "none"))})
        else:
            self.reply({"op": "error", "message": f"unknown request {op!r}"})

    def create(self, spec: dict[str, Any]) -> None:
        key = repr(sorted(spec.items()))  # specs are plain values: equal specs, equal keys
        if key != self.spare_key:
            self.drop_spares()
            self.spare_key = key
        if self.spares:
            sock, pidfd, info = self.spares.pop(0)
        else:
            try:
                sock, pidfd, info = self.build(spec)
            except OSError as exc:
                self.reply({"op": "error", "message": str(exc), "unavailable": _unavailable(exc)})
                return
        self.reply(info, [sock.fileno(), pidfd])
        sock.close()  # if the owner stopped waiting, init reads EOF and ends the sandbox
        os.close(pidfd)
        while len(self.spares) < self.prefork:
            try:
                self.spares.append(self.build(spec))
            except OSError:
                break  # the next request builds on demand and reports the error

    def drop_spares(self) -> None:
        for sock, pidfd, _info in self.spares:
            _kill_init(pidfd)
            sock.close()
        self.spares.clear()

    def build(self, spec: dict[str, Any]) -> tuple[socket.socket, int, dict[str, Any]]:
        """Clone a sandbox's init; return our end of its socket, its pidfd and the `created` reply."""
        # The cgroup exists before init does, so whatever happens next, reaping init (or, if we
        # are SIGKILLed, the next session's sweep) removes it.
        if spec.get("idmap") and spec["idmap"]["helpers"]:
            self._move_into_ranges(spec["idmap"])  # before the first, and only the first
        cgroup = caps.SandboxCgroup.create(self.plan, os.getpid(), spec.get("pids_max"),
                                           spec.get("memory_max"))
        size = caps.tmpfs_size(spec.get("tmpfs_size"), spec.get("memory_max"), self.default_tmpfs)
        child_spec = {**spec, **self.identity, "tmpfs_size": size}
        if spec.get("seccomp", True):
            if isinstance(self.seccomp_program, str):
                raise OSError(errno.ENOSYS, self.seccomp_program)
            child_spec["seccomp_program"] = self.seccomp_program
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cgroup_fd, go_r, go_w = -1, -1, -1
        try:
            if cgroup is not None and cgroup.version == 2:
                cgroup_fd = cgroup.open()  # clone3 puts init straight into it
            elif cgroup is not None:
                go_r, go_w = os.pipe2(os.O_CLOEXEC)
            pid, pidfd = kernel.clone(namespace_flags(spec["network"]), cgroup_fd,
                                      what="create the sandbox (clone its init)")
        except OSError:
            for fd in (cgroup_fd, go_r, go_w):
                if fd >= 0:
                    os.close(fd)
            ours.close()
            theirs.close()
            if cgroup is not None:
                cgroup.destroy()
            raise
        if pid == 0:
            ours.close()
            if go_w >= 0:
                os.close(go_w)
            self._become_child(cgroup_fd)
            init.main(theirs, child_spec, self.alive, go_r)
        theirs.close()
        if cgroup_fd >= 0:
            os.close(cgroup_fd)
        self.inits[pid] = cgroup  # reaping init removes the cgroup, whatever happens next
        if spec.get("idmap"):
            try:
                self._map(pid, spec["idmap"], ours)
            except OSError:
                _kill_init(pidfd)
                ours.close()
                if go_w >= 0:
                    os.close(go_w)
                raise
        if go_r >= 0:
            os.close(go_r)
            self._place(pid, cgroup, go_w)
        return ours, pidfd, {"op": "created", "init": pid, "caps": self.plan.to_json(),
                             "cgroup": cgroup.dirs if cgroup else None,
                             "cgroup_version": cgroup.version if cgroup else None,
                             "tmpfs_size": size}

    def _map(self, pid: int, idmap: dict[str, Any], ours: socket.socket) -> None:
        """An image's many ids: written from out here (init cannot grant itself more than one id),
        then init hears that it may go on; it waits for this before anything else.  Inside our
        namespace of ranges (a normal user's), they are ours to write: the same ids, as init
        writes them for its commands."""
        if idmap["helpers"]:
            kernel.map_ranges(pid, idmap["nested"], helpers=False)
        else:
            kernel.map_ranges(pid, idmap, helpers=False)
        protocol.send(ours, {"op": "mapped"})

    def _move_into_ranges(self, idmap: dict[str, Any]) -> None:
        """A normal user's ranges can be granted only by newuidmap/newgidmap, two setuid execs
        that would cost more than the rest of a sandbox.  So they grant them once, to a user
        namespace we then move into: in it we hold CAP_SETUID over every id of the ranges, and
        write each init's map ourselves.  Everything we do on the host, we still do as the user
        (the kernel checks host ids), and what we build is unchanged: each sandbox has its own user
        namespace, now a child of ours, whose processes hold nothing over it or each other."""
        wanted = {"uid": idmap["uid"], "gid": idmap["gid"]}
        if self.mapped is not None:  # EBUSY, not EINVAL: an error to report, never "unavailable here"
            if self.mapped != wanted:
                raise OSError(errno.EBUSY, f"the spawner maps {self.mapped}, not {wanted}: its owner "
                              "changed its ranges (restart the test run)")
            return
        go_r, go_w = os.pipe2(os.O_CLOEXEC)
        try:
            pid, pidfd = kernel.clone(kernel.CLONE_NEWUSER, what="make the namespace of the user's ranges")
        except OSError:
            os.close(go_r)
            os.close(go_w)
            raise
        if pid == 0:  # it only holds the namespace until we have joined it (or we are gone)
            os.close(go_w)
            os.read(go_r, 1)
            os._exit(0)
        os.close(go_r)
        try:
            kernel.map_ranges(pid, idmap, helpers=True)
            ns = os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)
            try:
                kernel.join_user_namespace(ns, "join the namespace of the user's ranges")
            finally:
                os.close(ns)
        finally:
            os.close(go_w)
            os.waitpid(pid, 0)
            os.close(pidfd)
        self.mapped = wanted
        # One-uid sandboxes from now on map our uid as this namespace names it (0).
        self.identity = {**self.identity, "uid": os.getuid(), "gid": os.getgid()}
        self.drop_spares()  # built with the old names

    @staticmethod
    def _place(pid: int, cgroup: caps.SandboxCgroup, go: int) -> None:
        """cgroup v1 has no CLONE_INTO_CGROUP: move init, then let it go on (it forks nothing before)."""
        try:
            cgroup.join(pid)
            os.write(go, b"g")
        except OSError:
            pass  # init reads EOF instead of "g" and reports that it was not placed
        finally:
            os.close(go)

    def _become_child(self, cgroup_fd: int) -> None:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.control.close()
        os.close(self.owner_pidfd)
        self.replies.close()
        os.close(self.wake_r)
        os.close(self.wake_w)
        if cgroup_fd >= 0:
            os.close(cgroup_fd)
        for sock, pidfd, _info in self.spares:
            sock.close()  # other sandboxes: not ours to hold
            os.close(pidfd)

    def shutdown(self) -> None:
        """The owner is gone: end every sandbox and remove every cgroup we made, then leave.

        Inits would die with us anyway (PDEATHSIG), but their cgroups would stay behind, and they
        would linger as zombies until the host's PID 1 reaps them.  As their parent we reap them,
        so when wait() says there are no children left, nothing of any sandbox is left either.
        """
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.drop_spares()
        for pid in self.inits:
            try:
                os.kill(pid, signal.SIGKILL)  # unreaped children: their PIDs cannot be reused
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
        """An init was reaped: its sandbox is gone, and so is its cgroup."""
        cgroup = self.inits.pop(pid, None)
        if cgroup:
            try:
                cgroup.destroy()
            except OSError:
                pass  # the next session's sweep retries


def prefork_depth(environ: dict[str, str] | None = None) -> int:
    """How many spares to keep: NSBOX_PREFORK, else the CPUs this process may use shared out
    between pytest-xdist's workers, at most two (more spares than cores only steal the test's CPU)."""
    environ = os.environ if environ is None else environ
    value = environ.get("NSBOX_PREFORK", "")
    if value.isdigit():
        return int(value)
    workers = environ.get("PYTEST_XDIST_WORKER_COUNT", "1")
    cpus = len(os.sched_getaffinity(0))
    return max(1, min(2, cpus // max(1, int(workers) if workers.isdigit() else 1)))


def _seccomp_program() -> bytes | str:
    """The filter, built once (every init installs the same bytes), or why it cannot be had."""
    try:
        return seccomp.program()
    except OSError as exc:
        return f"{exc}; pass seccomp=False to make sandboxes without the syscall filter"


def _kill_init(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.close(pidfd)


def _unavailable(exc: OSError) -> bool:
    """Whether a failed clone means this host cannot make sandboxes at all (policy, not load)."""
    return exc.errno in (errno.EPERM, errno.EACCES, errno.ENOSPC, errno.EINVAL, errno.ENOSYS)


def probe(network: str) -> dict[str, Any]:
    """Can sandboxes be made here?  Clones a child that takes every step a sandbox needs (those
    of steps.py, which `nsbox doctor` takes one by one) and reports the first failure with its
    cause."""
    uid, gid = os.getuid(), os.getgid()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = kernel.clone(namespace_flags(network), what="create namespaces")
    except OSError as exc:
        os.close(r)
        os.close(w)
        return {"ok": False, "error": str(exc)}
    if pid == 0:
        os.close(r)
        message = b""
        try:
            kernel.write_id_maps(uid, gid)
            steps.take_all(network)
        except OSError as exc:
            message = str(exc).encode()
        except BaseException as exc:  # noqa: BLE001
            message = repr(exc).encode()
        os.write(w, message)
        os._exit(0)
    os.close(w)
    os.close(pidfd)
    with os.fdopen(r, "rb") as f:
        error = f.read().decode()
    os.waitpid(pid, 0)
    return {"ok": not error, "error": error}


def _shun_the_oom_killer() -> None:
    """Root may keep the out-of-memory killer away from the spawner and every init it makes
    (each command raises its own score again); a normal user may not, and commands then rank
    above init anyway (see init.COMMAND_OOM_SCORE_ADJ)."""
    try:
        fd = os.open("/proc/self/oom_score_adj", os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.write(fd, b"-1000")
    except OSError:
        pass
    finally:
        os.close(fd)


def main(control_fd: int, replies_fd: int, owner: int, owner_pidfd: int) -> None:
    """Entry point: `python -I -S -c "...main(FD, FD, OWNER_PID, OWNER_PIDFD)"`, started once by
    the test process, which passes our end of the sockets for requests and for answers, its own
    PID (as our PID namespace numbers it) and a pidfd of itself."""
    for fd in (control_fd, replies_fd, owner_pidfd):
        os.set_inheritable(fd, False)
    control = socket.socket(fileno=control_fd)
    try:
        protocol.require_credentials(control)  # the owner set it already, before its first request
        kernel.set_process_name("nsbox-spawner")
        kernel.become_subreaper()
        _shun_the_oom_killer()
        Spawner(control, socket.socket(fileno=replies_fd), owner, owner_pidfd).serve()
    except BaseException as exc:  # noqa: BLE001 - tell the owner why, instead of dying silently
        try:
            protocol.send(control, {"op": "error", "message": f"spawner failed: {exc!r}"})
        except OSError:
            pass
        sys.exit(1)
    sys.exit(0)
