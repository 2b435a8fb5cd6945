"""PID 1 of a sandbox: builds it, then starts commands on request, reaps, kills, reports exits.

The init talks to its owner over one SOCK_SEQPACKET socket.  Requests: `hello` (the owner has it:
the lifetime starts), `exec` (argv, env, cwd and up to three stdio descriptors), `signal` (one
command, or every process it started).  Events: `ready`, `started`/`failed` per exec, `exited` per
command with its returncode (a signal death as -N, as in subprocess), `expired` when the sandbox's
lifetime runs out, `error` when setup fails.  When the socket closes — the owner closed the
sandbox, or died — init exits, and the kernel kills every process left in its PID namespace.

Nothing a command does can reach what init relies on: each command runs in a user and a mount
namespace of its own (see docs/design.md), so init's mounts, its /proc and its descriptors are out
of every command's reach.
"""

from __future__ import annotations

import errno
import fcntl
import marshal
import os
import resource
import select
import signal
import socket
import time

from . import kernel, layout, protocol, seccomp, transfer

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing (see spawner.py)
if TYPE_CHECKING:
    from typing import Any


FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
COMMAND_FLAGS = kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS
_NS_GET_PARENT = 0xB702  # _IO(0xb7, 0x2): the user namespace one level up
#: After this long, a fork bomb still refilling a command's processes gets the whole sandbox killed.
KILL_PATIENCE = 0.5
#: How long a command's process may take from clone to exec (or, for a file transfer, to being
#: ready): well under a millisecond, unless something in the sandbox stopped it — any command may
#: signal another, they share the uid — and init must never wait on one for ever.
EXEC_PATIENCE = 5.0
#: Commands are the out-of-memory killer's first choice, before init (raising needs no privilege).
COMMAND_OOM_SCORE_ADJ = b"500"


class Init:
    def __init__(self, sock: socket.socket, spec: dict[str, Any], go: int):
        self.sock = sock
        self.spec = spec
        self.go = go                         # -1, or a pipe: the spawner has placed us in our cgroup
        self.commands: dict[int, int] = {}   # pid -> inode of its user namespace (its tag)
        self.deadline: float | None = None   # set when the owner says hello: a sandbox may be prebuilt
        self.expired = False
        self.proc = -1                       # our /proc: no command can mount over it
        self.devpts = -1                     # our /dev/pts, likewise
        self.own_userns = 0

    # -- setup ------------------------------------------------------------------------------
    def setup(self) -> None:
        spec = self.spec
        host_opened = None
        if spec.get("idmap"):
            message, _fds = protocol.receive(self.sock)  # the spawner maps our ranges (spawner.py)
            if message is None or message.get("op") != "mapped":
                raise kernel.KernelError(errno.EPERM, "map the sandbox's ids", None,
                                         "the spawner could not write them")
            host_opened = _become_root
        else:
            try:
                kernel.write_id_maps(spec["uid"], spec["gid"])
            except kernel.KernelError as exc:
                exc.unavailable = True  # type: ignore[attr-defined]
                raise
        size = spec["tmpfs_size"]
        layout.build(spec["tree"], [layout.BindSpec(*b) for b in spec["mounts"]],
                     host_network=spec["network"] == "host", tmpfs_size=size,
                     host_root=spec.get("host_root", False), layers=spec.get("layers", ()),
                     host_opened=host_opened)
        layout.set_hostname(spec["hostname"])
        sysctls = layout.ipc_sysctls(size)
        if spec["network"] == "none":
            layout.bring_up_loopback()
            gids = sum(count for _inside, _outside, count in spec["idmap"]["gid"]) if spec.get("idmap") else 1
            sysctls.update(layout.private_network_sysctls(gids))
        layout.write_sysctls(sysctls)
        self.proc = os.open("/proc", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.devpts = os.open("/dev/pts", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if self.go >= 0:
            # cgroup v1: the spawner writes our PID into the sandbox's cgroup, then lets us go on.
            if os.read(self.go, 1) != b"g":
                raise kernel.KernelError(errno.ESRCH, "join the sandbox's cgroup", None,
                                         "the spawner could not place the sandbox in it")
            os.close(self.go)
        layout.own_cgroup_namespace()  # rooted at our own cgroup, wherever that is
        # No command may make one, so none can mount cgroupfs (its knob must still be writable).
        layout.forbid_cgroup_namespaces()
        if spec.get("protect_proc"):
            layout.protect_proc()
        self.own_userns = os.stat("self/ns/user", dir_fd=self.proc).st_ino
        namespaces = {name: os.readlink(f"self/ns/{name}", dir_fd=self.proc)
                      for name in kernel.NAMESPACE_FLAGS}
        kernel.join_new_session_keyring()
        pids_max = spec.get("pids_max")
        if pids_max and spec.get("mechanism") == "rlimit":
            # Counted per user namespace (Linux >= 5.14), and set before any command's user
            # namespace exists, whose ucount limit it becomes: this caps the sandbox, not the user.
            # Never above the owner's hard limit (ulimit -Hu), which nobody here may raise.
            hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
            if hard != resource.RLIM_INFINITY:
                pids_max = min(pids_max, hard)
            resource.setrlimit(resource.RLIMIT_NPROC, (pids_max, pids_max))
        if spec.get("seccomp", True):
            seccomp.install(spec["seccomp_program"])  # no_new_privs first, then the filter
        else:
            kernel.set_no_new_privs()  # no exec inside may gain privileges, filter or not
        # Nobody inside may open /proc/1/exe (the host's Python) or ptrace us: runc CVE-2019-5736.
        kernel.set_dumpable(False)
        protocol.send(self.sock, {"op": "ready", "namespaces": namespaces, "pids_max": pids_max})

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
            elif op == "socket":
                self.make_socket(message["id"])
            elif op == "pty":
                self.make_pty(message["id"])
        finally:
            for fd in fds:
                os.close(fd)

    def make_socket(self, request_id: int) -> None:
        """A TCP socket made in the sandbox's network namespace, for the owner: what it connects to
        is the sandbox's 127.0.0.1 (published ports; readiness checks)."""
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            self._failed(request_id, exc.errno or 0, f"cannot make a socket in the sandbox: {exc}")
            return
        try:
            protocol.send(self.sock, {"op": "socket", "id": request_id}, [sock.fileno()])
        finally:
            sock.close()

    def make_pty(self, request_id: int) -> None:
        """A terminal of the sandbox's own /dev/pts, for the owner to give a command (`nsbox
        shell`): inside, `tty` names it and /dev/pts lists it, as on a login."""
        try:
            master, slave = kernel.open_pty(self.devpts)
        except OSError as exc:
            self._failed(request_id, exc.errno or 0, f"cannot open a terminal in the sandbox: {exc}")
            return
        try:
            protocol.send(self.sock, {"op": "pty", "id": request_id}, [master, slave])
        finally:
            os.close(master)
            os.close(slave)

    def reap(self) -> None:
        for pid, status in kernel.reap_children():
            if self.commands.pop(pid, None) is not None:
                protocol.send(self.sock, {"op": "exited", "pid": pid,
                                          "returncode": os.waitstatus_to_exitcode(status)})

    def forward(self, signum: int) -> None:
        for pid in self.commands:
            _kill(pid, signum)

    def expire(self) -> None:
        self.expired = True
        _kill(-1, signal.SIGKILL)  # from PID 1: every other process of the namespace
        protocol.send(self.sock, {"op": "expired", "timeout": self.spec["timeout"]})

    def signal(self, pid: int, signum: int, everything: bool) -> None:
        tag = self.commands.get(pid)
        if tag is None:
            return
        _kill(pid, signum)
        if not everything:
            return
        # Every process that carries the command's user namespace: a process can never leave it,
        # whether it calls setsid, double-forks or hides behind a mount.  A fork bomb refills it
        # while we kill it: repeat until it is empty, and if it is not within KILL_PATIENCE, kill
        # everything in the sandbox but us.
        deadline = time.monotonic() + KILL_PATIENCE
        while True:
            members = self.started_by(tag)
            if not members:
                return
            for member in members:
                _kill(member, signum)
            if signum != signal.SIGKILL:
                return
            if time.monotonic() > deadline:
                _kill(-1, signal.SIGKILL)
                return

    def started_by(self, tag: int) -> list[int]:
        """The live processes whose user namespace is `tag`, or lies below it."""
        others = {self.own_userns, *self.commands.values()} - {tag}
        found = []
        for name in os.listdir(self.proc):
            if not name.isdigit() or name == "1":
                continue
            try:
                if _state(self.proc, name) == b"Z":
                    continue  # dead already, waiting for us to reap it
                ino = os.stat(f"{name}/ns/user", dir_fd=self.proc).st_ino
                if ino == tag or (ino not in others and _below(self.proc, name, tag, others)):
                    found.append(int(name))
            except OSError:
                continue  # gone meanwhile
        return found

    # -- commands ---------------------------------------------------------------------------
    def start(self, message: dict[str, Any], fds: list[int]) -> None:
        request_id = message["id"]
        if self.expired:
            protocol.send(self.sock, {"op": "failed", "id": request_id, "expired": True,
                                      "error": f"the sandbox's lifetime of {self.spec['timeout']} s expired"})
            return
        argv, env, cwd = message["argv"], message["env"], message["cwd"]
        moves = message.get("transfer")  # read_file/write_file: our own code, no program to find
        try:
            path = "" if moves else _which(argv[0], env.get("PATH", ""))
            if not os.path.isdir(cwd):
                code = errno.ENOTDIR if os.path.lexists(cwd) else errno.ENOENT
                raise OSError(code, os.strerror(code), cwd)
        except OSError as exc:
            self._failed(request_id, *_exec_failure(exc, cwd))
            return
        stdio = _stdio_slots(message["stdio"], fds)
        limit = self.spec["memory_max"] if self.spec.get("memory_mechanism") == "rlimit" else None
        idmap = self.spec.get("idmap")
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        go_r, go_w = os.pipe2(os.O_CLOEXEC) if idmap else (-1, -1)
        try:
            pid, pidfd = kernel.clone(COMMAND_FLAGS, what="start a command")
        except OSError as exc:
            for fd in (err_r, err_w, go_r, go_w):
                if fd >= 0:
                    os.close(fd)
            self._failed(request_id, exc.errno or 0, self._clone_failure(exc, argv))
            return
        if pid == 0:
            _become(path, argv, env, cwd, stdio, err_w, limit, bool(message.get("tty")), moves,
                    go_r, None if moves else message.get("user", self.spec.get("user")))
        os.close(pidfd)
        os.close(err_w)
        try:
            said: bytes | None = b""
            if idmap:
                os.close(go_r)
                said = self._grant_ids(pid, err_r, go_w, idmap)
            if said is not None:
                rest = _hear_from(err_r, pid)
                said = None if rest is None else said + rest
        finally:
            os.close(err_r)
        if said is None:
            os.waitpid(pid, 0)
            self._failed(request_id, 0, f"cannot start {argv[0]}: its process did not get to exec within "
                         f"{EXEC_PATIENCE:g} s, and was killed (something in the sandbox stopped it: "
                         "SIGSTOP?)")
            return
        # The child's first 8 bytes are its tag; anything after them says why it did not exec.
        tag, failure = int.from_bytes(said[:8], "little"), said[8:]
        if failure or len(said) < 8:
            os.waitpid(pid, 0)
            self._failed(request_id, *_decode_failure(failure))
            return
        self.commands[pid] = tag
        protocol.send(self.sock, {"op": "started", "id": request_id, "pid": pid})

    def _grant_ids(self, pid: int, err_r: int, go_w: int, idmap: dict[str, Any]) -> bytes | None:
        """Map the command's namespace once it has told its tag: many ids are granted from the
        parent namespace (a process may map only itself), here init's.  What it said so far, a
        failure appended if it could not be mapped; None if it never said its tag."""
        try:
            said = _hear_from(err_r, pid, most=8)
            if said is None or len(said) < 8:
                return said
            try:
                kernel.map_ranges(pid, idmap["nested"], helpers=False, proc=self.proc)
            except OSError as exc:
                _kill(pid, signal.SIGKILL)
                return said + marshal.dumps((exc.errno or 0, f"cannot start the command: {exc}", ""))
            os.write(go_w, b"g")
            return said
        finally:
            os.close(go_w)

    def _clone_failure(self, exc: OSError, argv: list[str]) -> str:
        if exc.errno == errno.EAGAIN and self.spec.get("pids_max"):
            return (f"cannot start {argv[0]}: the sandbox has reached its pids_max of "
                    f"{self.spec['pids_max']} processes (fork refused: EAGAIN); something in it "
                    "is still forking, or pids_max is too low for this test")
        return f"cannot start {argv[0]}: {exc}"

    def _failed(self, request_id: int, errno_: int, error: str, step: str = "") -> None:
        protocol.send(self.sock, {"op": "failed", "id": request_id, "errno": errno_, "error": error,
                                  "step": step})


def _become(path: str, argv: list[str], env: dict[str, str], cwd: str, stdio: list[int | None],
            err_w: int, memory_limit: int | None, tty: bool = False, moves: list | None = None,
            go_r: int = -1, user: list | None = None) -> None:
    """In the cloned child, in its own user and mount namespaces: become the command.  Never returns.

    Until exec this process is a copy of init, and like init not dumpable, so not even init may
    read its /proc/N/ns: it tells init its tag itself.  It must become dumpable for its id maps to
    be written, by itself or by init (a non-dumpable process's /proc files belong to the host's
    root); that opens it to no other command, because tracing a process in another user namespace
    takes CAP_SYS_PTRACE there.  With many ids (`go_r`), init maps them, and then lets it go on;
    `user` is [uid, gid, groups] to run as (the image's User).
    """
    try:
        kernel.set_dumpable(True)
        os.write(err_w, os.stat("/proc/self/ns/user").st_ino.to_bytes(8, "little"))
        if go_r >= 0:
            if os.read(go_r, 1) != b"g":
                os._exit(127)  # init could not map us, and says so itself
            os.close(go_r)
        else:
            kernel.write_id_maps(0, 0)  # root here is the sandbox's root, and nothing more
        # An out-of-memory kill in the sandbox's cgroup must take a command, never init: shared
        # memory (tmpfs) counts to no process, so init, the biggest, would look the best victim.
        _write_file("/proc/self/oom_score_adj", COMMAND_OOM_SCORE_ADJ)
        os.setsid()  # no controlling terminal: no TIOCSTI into the user's (CVE-2017-5226)
        if memory_limit:
            resource.setrlimit(resource.RLIMIT_AS, (memory_limit, memory_limit))
        devnull = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        for target, fd in enumerate(stdio):
            os.dup2(devnull if fd is None else fd, target, inheritable=True)
        if tty:
            # A pty the caller opened for this command alone (`nsbox shell`), never the user's own
            # terminal: what the command injects with TIOCSTI reaches only itself.
            kernel.set_controlling_terminal(0)
        # Nothing but 0/1/2 crosses exec: not xdist's channels, not a lock file (CVE-2024-21626).
        os.closerange(3, err_w)
        os.closerange(err_w + 1, 1 << 20)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # ignored by Python; exec keeps that
            signal.signal(sig, signal.SIG_DFL)
        if user is not None:
            uid, gid, groups = user
            if min(uid, gid, *groups) < 0:  # setresuid(-1) would leave the command root
                raise OSError(errno.EINVAL, "a negative id for the command's user")
            os.setgroups(groups)
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)  # and with it every capability goes
        elif go_r >= 0:
            os.setgroups([])  # init's (none): setgroups is allowed here, as images need
        os.chdir(cwd)
        if moves:
            # A file transfer (transfer.py): this process does it itself, and never execs.  Init
            # hears "started" now, so that nothing the file does can keep it waiting.
            os.close(err_w)
            kernel.set_process_name("nsbox-transfer")
            _transfer_and_exit(moves)
        # Not os.execvpe: it imports `warnings` lazily, and the host's stdlib is gone after pivot_root.
        os.execve(path, argv, env)
    except OSError as exc:
        os.write(err_w, marshal.dumps(_exec_failure(exc, cwd)))
    except BaseException as exc:  # noqa: BLE001 - report whatever stopped us, then leave
        os.write(err_w, marshal.dumps((0, repr(exc), "")))
    os._exit(127)


def _become_root() -> None:
    """With many ids, once the host's paths are open: root's init is still host root, which its
    namespace does not map (files it made would be nobody's); become the namespace's root, and
    leave the host's supplementary groups (nobody's, inside) behind."""
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def _hear_from(fd: int, pid: int, most: int = 1 << 20) -> bytes | None:
    """What a command's process says before it execs (its tag, then why exec failed, if it did),
    until it closes its end or has said `most` bytes; None, once it is killed, if that took more
    than EXEC_PATIENCE."""
    said = b""
    deadline = time.monotonic() + EXEC_PATIENCE
    while len(said) < most:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            _kill(pid, signal.SIGKILL)
            return None
        chunk = os.read(fd, min(4096, most - len(said)))
        if not chunk:
            return said
        said += chunk
    return said


def _transfer_and_exit(moves: list) -> None:
    """Never returns: past this point nothing may fall back into init's code (err_w is closed)."""
    try:
        code = transfer.serve(moves)
    except BaseException:  # noqa: BLE001 - whatever it was, this process ends here
        code = 125
    os._exit(code)


def _write_file(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _which(name: str, path: str) -> str:
    """execvp's search, over the sandbox's PATH."""
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


def _decode_failure(data: bytes) -> tuple[int, str, str]:
    try:
        errno_, text, step = marshal.loads(data)
        return int(errno_), str(text), str(step)
    except (ValueError, TypeError, EOFError):
        return 0, "the command died before exec", ""


def _exec_failure(exc: OSError, cwd: str) -> tuple[int, str, str]:
    """(errno, sentence, step) for a command that could not be started; the step ("chdir" or
    "exec") lets the caller name the working directory rather than the program, as subprocess does."""
    what = "chdir" if exc.filename == cwd else "exec"
    name = errno.errorcode.get(exc.errno or 0, "?")
    return exc.errno or 0, f"{what} {exc.filename}: {name} ({exc.strerror})", what


def _state(proc: int, name: str) -> bytes:
    fd = os.open(f"{name}/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        return os.read(fd, 512).rsplit(b")", 1)[1].split()[0]
    finally:
        os.close(fd)


def _below(proc: int, name: str, tag: int, others: set[int]) -> bool:
    """Whether process `name` sits in a user namespace nested (at any depth) below `tag`."""
    fd = os.open(f"{name}/ns/user", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc)
    try:
        while True:
            try:
                parent = fcntl.ioctl(fd, _NS_GET_PARENT)
            except OSError:
                return False  # the top of what we may see: not below any command
            os.close(fd)
            fd = parent
            ino = os.fstat(fd).st_ino
            if ino == tag:
                return True
            if ino in others:
                return False
    finally:
        os.close(fd)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _noop(_signum: int, _frame: object) -> None:
    pass


def main(sock: socket.socket, spec: dict[str, Any], spawner_alive: int, go: int) -> None:
    """Entry point of PID 1, in the child the spawner cloned.  Never returns."""
    try:
        kernel.set_parent_death_signal(signal.SIGKILL)
        if select.select([spawner_alive], [], [], 0)[0]:
            os._exit(1)  # the spawner died before we armed the death signal: its pidfd says so
        os.close(spawner_alive)
        kernel.set_process_name("nsbox-init")
        init = Init(sock, spec, go)
        try:
            init.setup()
        except OSError as exc:
            protocol.send(sock, {"op": "error", "message": str(exc), "errno": exc.errno,
                                 "unavailable": getattr(exc, "unavailable", False)})
            os._exit(1)
        init.serve()
    except BaseException as exc:  # noqa: BLE001 - PID 1 must say why it dies, then die
        try:
            protocol.send(sock, {"op": "error", "message": f"sandbox init failed: {exc!r}"})
        except OSError:
            pass
    os._exit(1)
