"""The public API: `Sandbox` (its processes are in process.py).  Works without pytest."""

from __future__ import annotations

import errno
import io
import os
import re
import select
import signal
import socket
import subprocess
import time
import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import (ConfigError, NsboxWarning, SandboxClosed, SandboxSetupError, SandboxUnavailable,
                      hide_our_frames)
from ..rootfs.store import Rootfs, resolve
from ..settings import BASE_ENV, DEFAULT_OUTPUT_MAX, DEFAULT_PIDS_MAX, Mount, SandboxSettings
from . import caps, protocol, saving, services
from .channel import Channel
from .client import Spawner
from .process import (CLOSE_TIMEOUT as _CLOSE_TIMEOUT, DEVNULL, PIPE, Command, CommandRecord, ExitInfo,
                      SandboxProcess, Streams, check_timeout as _check_timeout, encode)
from .services import PublishedPort
#: How long init may take to report ready or to answer an exec: milliseconds when it is well.
_ANSWER_TIMEOUT = 30.0
_OUT_OF_MEMORY = re.compile(r"out of memory|cannot allocate memory|MemoryError|std::bad_alloc", re.I)
_READ_CHUNK = 1 << 16
#: How long read_file and write_file may take by default: milliseconds when nothing stalls them.
FILE_TIMEOUT = 60.0
_UNSET: Any = object()  # run(output_max=None) means "no cap", so "not given" needs its own value
#: The sandboxes this process holds open: an isolated test keeps their descriptors (isolate/descriptors.py).
_LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()

# pytest shows our errors at the test's line, without this module's validators under them.
__tracebackhide__ = hide_our_frames


def _output_max(value: int | str | None) -> int | None:
    from ..settings import parse_size
    try:
        return parse_size(value)
    except ValueError as exc:
        raise ConfigError(f"bad value for 'output_max': {value!r}; allowed: bytes, a size such as "
                          f"'16M', or None for no cap ({exc})") from None




#: Every started sandbox still referenced somewhere: a failed test's report names those it used,
#: a module's or a session's included.
LIVE: weakref.WeakSet[Sandbox] = weakref.WeakSet()


@dataclass(frozen=True)
class Limits:
    """The caps a sandbox runs under, and the mechanism that enforces each."""

    pids_max: int | None
    pids_mechanism: str      # cgroup2 | cgroup1 | rlimit | enclosing | none
    memory_max: int | None
    memory_mechanism: str | None
    cgroup: dict[str, str] | None = None
    tmpfs_size: int | None = None
    note: str = ""  # e.g. why pids_max is lower than asked

    def describe(self) -> str:
        pids = f"pids_max {self.pids_max} by {self.pids_mechanism}" if self.pids_max else "PIDs uncapped"
        if self.pids_max and self.pids_mechanism == "enclosing":
            pids = f"pids_max {self.pids_max}, under the cap of the isolated test's own cgroup"
        if self.pids_max and self.pids_mechanism == "none":
            pids = f"pids_max {self.pids_max} NOT enforced (no mechanism here)"
        memory = f"memory_max {self.memory_max // (1 << 20)} MB by {self.memory_mechanism}" \
            if self.memory_max else "memory uncapped"
        tmpfs = f"; writable layer and tmpfs {self.tmpfs_size // (1 << 20)} MB" if self.tmpfs_size else ""
        note = f" ({self.note})" if self.note else ""
        return f"{pids}{note}; {memory}{tmpfs}"


class Sandbox:
    """A hermetic Linux sandbox over a root filesystem.

    Use it as a context manager (or call `start()` and `close()`).  Every `run`/`spawn` executes in
    the same namespaces and filesystem, like `docker exec` into a running container.
    """

    def __init__(self, rootfs: str | os.PathLike[str] | Rootfs | Sequence[Any] | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, network: str = "none",
                 hostname: str = "nsbox", env: Mapping[str, str] | None = None,
                 mounts: Sequence[Mount | tuple[Any, ...]] = (), cwd: str = "/",
                 pids_max: int | None = DEFAULT_PIDS_MAX, memory_max: int | str | None = None,
                 timeout: float | None = None, tmpfs_size: int | str | None = None,
                 seccomp: bool = True, output_max: int | str | None = DEFAULT_OUTPUT_MAX,
                 layers: Sequence[str | os.PathLike[str] | Rootfs] = ()):
        self.settings = SandboxSettings(rootfs=rootfs, layers=tuple(layers), cache_dir=cache_dir, network=network,  # type: ignore[arg-type]
                                        hostname=hostname, env=env or {}, mounts=tuple(mounts),
                                        cwd=cwd, pids_max=pids_max, memory_max=memory_max,
                                        timeout=timeout, tmpfs_size=tmpfs_size, seccomp=seccomp,
                                        output_max=output_max)
        self.history: list[CommandRecord] = []
        self.rootfs: Rootfs | None = None
        self.layers: list[Rootfs] = []
        self.init_pid: int | None = None
        self.namespaces: dict[str, str] = {}
        self.limits: Limits | None = None
        self.last_exit: ExitInfo | None = None
        self._cgroup: caps.SandboxCgroup | None = None
        self._channel: Channel | None = None
        self._processes: list[SandboxProcess] = []
        self._deadline: float | None = None
        self._pidfd = -1
        self._finalizer: weakref.finalize | None = None
        self._ports: dict[int, services.Forwarder] = {}

    @classmethod
    def from_settings(cls, settings: SandboxSettings) -> Sandbox:
        """A sandbox from settings made elsewhere (`nsbox_defaults`, `dataclasses.replace`)."""
        return cls(**{key: getattr(settings, key) for key in SandboxSettings.keys()})

    # -- lifecycle --------------------------------------------------------------------------
    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> Sandbox:
        if self._channel is not None:
            return self
        LIVE.add(self)
        rootfs = self.settings.rootfs
        self.rootfs = rootfs if isinstance(rootfs, Rootfs) else resolve(rootfs or "alpine",
                                                                        self.settings.cache_dir)
        self.layers = [layer if isinstance(layer, Rootfs) else resolve(layer, self.settings.cache_dir, layer=True)
                       for layer in self.settings.layers]
        ids, user = self.rootfs.ids, None
        if self.rootfs.image is not None and ids is None:
            _warn_of_users(self.rootfs)
        elif self.rootfs.image is not None and ids is not None:
            from ..rootfs import users
            user = users.resolve(self.rootfs.image.user, [self.rootfs.tree, *self.rootfs.lowers],
                                 self.rootfs.spec, ids.size)
        if self.layers and self.rootfs.host:
            raise ConfigError("the 'host' rootfs takes no layers: it is the host's tree, read-only, "
                              "not an overlay")
        spec = {
            "tree": str(self.rootfs.tree),
            "layers": [*map(str, self.rootfs.lowers), *(str(layer.tree) for layer in self.layers)],
            "host_root": self.rootfs.host,
            "network": self.settings.network,
            "hostname": self.settings.hostname,
            "mounts": [[str(m.source), m.target, m.rw] for m in self.settings.mounts],
            "pids_max": self.settings.pids_max,
            "memory_max": self.settings.memory_max,
            "timeout": self.settings.timeout,
            "tmpfs_size": self.settings.tmpfs_size,
            "seccomp": self.settings.seccomp,
            "idmap": {**ids.to_json(), "nested": ids.nested()} if ids else None,
            "user": list(user) if user else None,
        }
        __tracebackhide__ = True
        self._spawner = Spawner.get()
        sock, pidfd, info = self._spawner.create(spec)
        self._pidfd, self.init_pid = pidfd, info["init"]
        # If the owner forgets close(), dropping the last reference still ends the sandbox.
        self._finalizer = weakref.finalize(self, _end, sock, pidfd)
        try:
            protocol.send(sock, {"op": "hello"})  # the sandbox may have been prebuilt: its lifetime starts now
        except OSError:
            pass  # init died during setup: the error it sent first is read below
        plan = caps.CapPlan.from_json(info["caps"])
        if info.get("cgroup"):
            self._cgroup = caps.SandboxCgroup(info["cgroup_version"], info["cgroup"])
        self.limits = Limits(self.settings.pids_max, plan.mechanism, self.settings.memory_max,
                             plan.memory_mechanism if self.settings.memory_max else None,
                             info.get("cgroup"), info["tmpfs_size"])
        channel = self._channel = Channel(sock)
        _LIVE.add(self)
        self._deadline = time.monotonic() + self.settings.timeout if self.settings.timeout else None
        try:
            self._await_ready(channel)
        except BaseException:
            self.close()
            raise
        return self

    def _await_ready(self, channel: Channel) -> None:
        __tracebackhide__ = True
        event = channel.next_event(timeout=_ANSWER_TIMEOUT)
        if event is None:
            raise SandboxSetupError(f"the sandbox did not start: {self._why_dead()}" if channel.eof else
                                    f"the sandbox's init (pid {self.init_pid}) did not report within "
                                    f"{_ANSWER_TIMEOUT:g} s{_stopped(self.init_pid)}")
        if event["op"] == "error":
            error = SandboxUnavailable if event.get("unavailable") else SandboxSetupError
            raise error(f"cannot create a sandbox over {self.rootfs.tree if self.rootfs else '?'}: "
                        f"{event['message']}")
        self.namespaces = event["namespaces"]
        cap = event.get("pids_max")
        if self.limits is not None and cap != self.limits.pids_max:
            # The owner's hard RLIMIT_NPROC (ulimit -u) is below pids_max: no process may raise it.
            self.limits = replace(self.limits, pids_max=cap, note=f"pids_max {self.settings.pids_max} "
                                  f"clamped to {cap}, the hard RLIMIT_NPROC (ulimit -Hu) of this process")
            warnings.warn(f"nsbox: {self.limits.note}", NsboxWarning, stacklevel=3)

    def close(self) -> None:
        """End the sandbox: every process in it is killed and every mount is gone on return."""
        channel, self._channel = self._channel, None
        if channel is None:
            return
        _LIVE.discard(self)
        forwarders = list(self._ports.values())
        for forwarder in forwarders:
            forwarder.close()
        self._ports.clear()
        for process in self._processes:
            process._close_pipes()
        self._processes.clear()
        # PID 1's death takes the whole PID namespace with it, and its pidfd reads ready only once
        # the kernel has killed and reaped every other process in it: nothing init or its commands
        # do can delay this.
        if not _kill_and_wait(self._pidfd, _CLOSE_TIMEOUT):
            warnings.warn(f"sandbox init {self.init_pid} was still dying after {_CLOSE_TIMEOUT:g} s",
                          ResourceWarning, stacklevel=2)
        if self._finalizer is not None:
            self._finalizer()
        self._pidfd = -1
        if self._cgroup is not None:
            # Empty now; the spawner would remove it too, but close() promises it is gone.
            caps.destroy_dirs(list(self._cgroup.dirs.values()), self._cgroup.version)
        # Last, with init dead: a relay thread waiting on init or on a connect in there is freed.
        for forwarder in forwarders:
            forwarder.join(_CLOSE_TIMEOUT)
        for note in filter(None, (forwarder.refusals() for forwarder in forwarders)):
            warnings.warn(note, NsboxWarning, stacklevel=2)

    @property
    def closed(self) -> bool:
        return self._channel is None

    # -- servers --------------------------------------------------------------------------------
    def port(self, port: int | None = None, *, max_connections: int | None = None) -> PublishedPort:
        """Publish the sandbox's TCP `port` on the host: `(host, port)` on 127.0.0.1, a port the
        kernel picks (no clash between xdist workers), forwarded to whatever listens on the
        sandbox's own 127.0.0.1:`port`, now or later. With network="host" it is the port itself.
        Over an image, `port` defaults to the first of its ExposedPorts.

        At most `max_connections` (default services.MAX_CONNECTIONS, 64) are relayed at once; one
        more is closed at once, and close() warns once of how many were. Given again, the limit
        of a port already published changes."""
        __tracebackhide__ = True
        if port is None:
            port = self._exposed_port()
        _check_port(port)
        if max_connections is not None:
            _check_max_connections(max_connections)
        self._live_channel()
        if self.settings.network == "host":
            return PublishedPort("127.0.0.1", port)
        if port not in self._ports:
            self._ports[port] = services.Forwarder(port, self._inner_socket,
                                                   max_connections or services.MAX_CONNECTIONS)
        elif max_connections is not None:
            self._ports[port].slots.limit = max_connections
        return self._ports[port].published

    # Every wait_* takes timeout= (seconds, default 10) and process= (the server: if it exits, the
    # wait fails at once, with the end of its output), and raises ServerNotReady, a TimeoutError.
    def wait_for_port(self, port: int, timeout: float = 10.0, process: SandboxProcess | None = None) -> PublishedPort:
        """Wait until something in the sandbox accepts connections on `port`; its published address.
        ServerNotReady (a TimeoutError) if not within `timeout`, at once if `process` (the server)
        exits first."""
        __tracebackhide__ = True
        _check_port(port)
        server = self._server("wait_for_port", timeout, process)
        inner = socket.socket if self.settings.network == "host" else self._inner_socket
        services.wait_until_connectable(inner, port, timeout, server)
        return self.port(port)

    def wait_until(self, predicate: Any, timeout: float = 10.0, interval: float = 0.1,
                   process: SandboxProcess | None = None) -> Any:
        """Call `predicate()` here on the host every `interval` s until it returns something true,
        and return that (a client, a row...). An exception it raises counts as "not yet".
        ServerNotReady naming the predicate and its last result or exception if not within
        `timeout`, at once if `process` (the server) exits first."""
        __tracebackhide__ = True
        if not callable(predicate):
            raise ConfigError(f"wait_until takes a callable to call until it returns something true, not "
                              f"{predicate!r} (wrap a check in a function or a lambda)")
        services.check_wait("wait_until", timeout, interval)
        return services.wait_until(predicate, timeout, interval, self._server("wait_until", timeout, process))

    def wait_for_http(self, port: int, path: str = "/", status: Any = 200, timeout: float = 10.0,
                      process: SandboxProcess | None = None) -> PublishedPort:
        """Wait until a GET of `path` on the sandbox's `port`, through its published address, answers
        with `status`: a code, several (`(200, 204)`), or a callable taking the code and saying
        whether it means ready. Redirects are followed; no proxy is used. Returns the published
        address, as wait_for_port does; ServerNotReady with the last status or error if not within
        `timeout`, at once if `process` (the server) exits first."""
        __tracebackhide__ = True
        _check_port(port)
        if not isinstance(path, str) or not path.startswith("/") or not path.isascii() or \
                re.search(r"[\s\x00-\x1f\x7f]", path):
            raise ConfigError(f"wait_for_http(path={path!r}): a path must start with '/' and hold no "
                              "spaces, control or non-ASCII characters (quote them: urllib.parse.quote)")
        accept = services.http_status(status)
        server = self._server("wait_for_http", timeout, process)
        published = self.port(port)
        where = f"port {port} on the host's network" if self.settings.network == "host" else \
            f"the sandbox's port {port}"
        services.wait_for_http(published.url(path=path), where, accept, timeout, server)
        return published

    def _server(self, what: str, timeout: object, process: object) -> services.Server:
        """What a wait checks between attempts: this sandbox, alive, and its server, running."""
        __tracebackhide__ = True
        services.check_wait(what, timeout)
        if process is not None and not isinstance(process, SandboxProcess):
            raise ConfigError(f"{what}(process={process!r}): process is the server, as spawn() returned it")
        self._live_channel()
        return services.Server(self._live_channel, process)

    def _inner_socket(self) -> socket.socket:
        """A TCP socket made by init in the sandbox's network namespace."""
        return socket.socket(fileno=self._ask("socket")["fd"])

    def openpty(self) -> tuple[int, int]:
        """Like `os.openpty()`, a new pseudo-terminal as (master, slave) fds, but one of the
        sandbox's own /dev/pts: a command given the slave with `spawn(..., tty=True)` sees a
        terminal it can name (`tty`, `ps`), as on a login.  The caller closes both."""
        __tracebackhide__ = True
        master, slave = self._ask("pty")["fds"]
        return master, slave

    def _ask(self, op: str) -> dict[str, Any]:
        """Send init a request that only needs its id, and wait for the answer."""
        __tracebackhide__ = True
        channel = self._live_channel()
        request_id = channel.next_id()
        channel.send({"op": op, "id": request_id})
        channel.wait_for(lambda: request_id in channel.replies or channel.eof, _ANSWER_TIMEOUT)
        reply = channel.replies.pop(request_id, None)
        if reply is None:
            self._live_channel()
            raise SandboxSetupError(f"the sandbox's init (pid {self.init_pid}) did not answer within "
                                    f"{_ANSWER_TIMEOUT:g} s{_stopped(self.init_pid)}")
        if reply["op"] == "failed":
            raise OSError(reply.get("errno") or errno.EIO, reply["error"])
        return reply

    def _live_channel(self) -> Channel:
        __tracebackhide__ = True
        if self._channel is None:
            raise SandboxClosed("this sandbox is not started or already closed")
        if self._deadline is not None and time.monotonic() >= self._deadline:
            self._channel.expired = True  # init is killing everything now, if it has not yet
        if self._channel.expired:
            raise SandboxClosed(f"this sandbox's lifetime of {self.settings.timeout:g} s expired; "
                                "its processes were killed")
        if self._channel.eof:
            raise SandboxClosed(f"this sandbox died: {self._why_dead()}")
        return self._channel

    def _why_dead(self) -> str:
        """What ended a sandbox that nobody closed: its spawner's death, or its init's."""
        spawner = getattr(self, "_spawner", None)
        if spawner is not None and spawner.process.poll() is not None:
            code = spawner.process.returncode
            how = f"killed by signal {-code}" if code < 0 else f"exit status {code}"
            return f"its spawner (pid {spawner.process.pid}) died ({how}), and with it every sandbox it made"
        return (f"its init (pid {self.init_pid}) was killed from outside the sandbox "
                "(nothing inside may signal it)")

    @property
    def _image(self) -> Any:  # -> rootfs.oci.ImageConfig | None
        """The config of the image the sandbox runs over, if it runs over one."""
        return self.rootfs.image if self.rootfs else None

    def _exposed_port(self) -> int:
        image = self._image
        if image is None or not image.exposed_ports:
            what = "its image exposes no TCP port" if image else "it is no image"
            raise ConfigError(f"port() needs a port number here: {what}")
        return image.exposed_ports[0]

    def _user_ids(self, user: str | int) -> list | None:
        """[uid, gid, groups] for `user` over this sandbox's image, None for root."""
        from ..rootfs import users
        rootfs = self.rootfs
        if str(user) in users.ROOT:
            return None
        if rootfs is None or rootfs.ids is None:
            from . import idmap
            raise ConfigError(f"user={user!r}: this sandbox maps one uid, root, because "
                              f"{idmap.unavailable() or 'its rootfs is not an image'}")
        found = users.resolve(str(user), [rootfs.tree, *rootfs.lowers], rootfs.spec, rootfs.ids.size)
        return list(found) if found else None

    def _image_command(self) -> list[str]:
        """What the image runs when it is given no command (`docker run IMAGE`)."""
        image = self._image
        if image is None:
            raise ConfigError("a command is needed: only a sandbox over an image has one of its own")
        if not image.command:
            raise ConfigError(f"the image {self.rootfs.spec} has no Entrypoint or Cmd: give a command")  # type: ignore[union-attr]
        return image.command

    # -- commands ---------------------------------------------------------------------------
    def spawn(self, args: Command | None = None, *, stdin: Any = None, stdout: Any = None, stderr: Any = None,
              env: Mapping[str, str] | None = None, cwd: str | None = None,
              text: bool = True, shell: bool | None = None, tty: bool = False,
              errors: str = "replace", user: str | int | None = None) -> SandboxProcess:
        """Start a command and return at once, like `subprocess.Popen`.

        stdin/stdout/stderr take None (stdin: /dev/null; stdout/stderr: this process's own, so
        pytest captures them), PIPE, DEVNULL, STDOUT (stderr only), a file object or an fd.  A str
        runs through `/bin/sh -c` unless `shell=False`; `shell=True` with a list runs its first item
        through the shell with the rest as arguments, as in `subprocess`.  `tty=True` makes stdin,
        which must be a terminal (the slave of `openpty()`), the command's controlling
        terminal: job control and ^C work as in a login shell (`nsbox shell` does this).  With
        `text`, output is decoded as UTF-8 with `errors` ("replace": undecodable bytes become U+FFFD;
        "strict", "surrogateescape", ... as in `subprocess`); `text=False` gives bytes.  Over an
        image, no `args` runs the image's own command (its Entrypoint and Cmd), and commands run as
        its `User`; `user` ("root", a name of its /etc/passwd, "uid:gid") runs this one as another,
        as `docker exec --user` does, where the sandbox maps many ids (docs/images.md).
        """
        __tracebackhide__ = True
        self._live_channel()
        _check_errors(errors)
        if args is None:
            args = self._image_command()
        return self._start(args, _argv(args, shell), stdin, stdout, stderr, env, cwd, text, tty,
                           errors=errors, user=user)

    def _start(self, args: Command, argv: list[str], stdin: Any, stdout: Any, stderr: Any,
               env: Mapping[str, str] | None, cwd: str | None, text: bool, tty: bool,
               transfer: list[Any] | None = None, errors: str = "replace",
               user: str | int | None = None) -> SandboxProcess:
        """Start a command — or, with `transfer`, our own file transfer (transfer.py)."""
        __tracebackhide__ = True
        channel = self._live_channel()
        ids = self._user_ids(user) if user is not None else _UNSET
        streams = Streams.make(stdin, stdout, stderr)
        request_id = channel.next_id()
        message = {"op": "exec", "id": request_id, "argv": argv, "env": self._env(env),
                   "cwd": cwd or self._cwd(), "stdio": streams.layout(), "tty": bool(tty)}
        if transfer is not None:
            message["transfer"] = transfer
        if ids is not _UNSET:
            message["user"] = ids
        try:
            channel.send(message, streams.child_fds)
        finally:
            streams.close_child_ends()
        channel.wait_for(lambda: request_id in channel.replies or channel.eof, _ANSWER_TIMEOUT)
        reply = channel.replies.pop(request_id, None)
        if reply is None:
            streams.close_parent_ends()
            self._live_channel()  # raises SandboxClosed if the sandbox died meanwhile
            raise SandboxSetupError(f"the sandbox's init (pid {self.init_pid}) did not answer within "
                                    f"{_ANSWER_TIMEOUT:g} s{_stopped(self.init_pid)}")
        if reply["op"] == "failed":
            streams.close_parent_ends()
            if reply.get("expired"):
                channel.expired = True
                self._live_channel()  # raises SandboxClosed, naming the lifetime
            raise _exec_error(reply.get("errno", 0), reply["error"], argv,
                              message["cwd"] if reply.get("step") == "chdir" else None)
        record = CommandRecord(args)
        self.history.append(record)
        process = SandboxProcess(self, channel, reply["pid"], args, streams, text, record, errors)
        self._processes.append(process)
        return process

    def run(self, args: Command | None = None, *, input: str | bytes | None = None,
            env: Mapping[str, str] | None = None, cwd: str | None = None,
            timeout: float | None = None, check: bool = False, text: bool = True,
            capture_output: bool = True, shell: bool | None = None,
            output_max: int | str | None = _UNSET, errors: str = "replace",
            user: str | int | None = None) -> subprocess.CompletedProcess:
        """Run a command to completion, like `subprocess.run(..., capture_output=True)`.

        A `str` runs through `/bin/sh -c` (see `spawn` for `shell`).  On timeout every process the
        command started is killed and `subprocess.TimeoutExpired` raised; `check=True` raises
        `CalledProcessError`.  Of each of stdout and stderr, the first `output_max` bytes are kept
        (default: the sandbox's setting, 64 MiB); the rest is read and dropped, and a line saying
        how much ends the text.  `capture_output=False` leaves them to this process's own.
        `errors` says what becomes of bytes that are not UTF-8, and `user` who runs it (see `spawn`).
        """
        __tracebackhide__ = True
        limit = self.settings.output_max if output_max is _UNSET else _output_max(output_max)
        if args is None:
            args = self._image_command()
        _check_timeout(timeout)
        before = self._cgroup.stats() if self._cgroup else {}
        captured = PIPE if capture_output else None
        process = self.spawn(args, stdin=PIPE if input is not None else None, stdout=captured,
                             stderr=captured, env=env, cwd=cwd, text=text, shell=shell, errors=errors,
                             user=user)
        effective = self._effective_timeout(timeout)
        try:
            stdout, stderr = process._communicate(input, effective, limit)
        except subprocess.TimeoutExpired:
            process._finish_after_timeout()
            sandbox_limit = timeout is None or (effective is not None and effective < timeout)
            self._note_exit(process, before, "sandbox-timeout" if sandbox_limit else "timeout")
            raise
        finally:
            self._processes.remove(process)
            process._close_pipes()
        if process._ended_with_sandbox:
            raise SandboxClosed(f"the sandbox died while {_shell_form(args)!r} ran: {self._why_dead()}")
        self._note_exit(process, before, None, process._record.stderr_tail)
        if self.last_exit is not None and self.last_exit.reason == "sandbox-timeout":
            # Init's kill at the end of the lifetime came just before our own deadline: the same end.
            raise subprocess.TimeoutExpired(args, self.settings.timeout, output=stdout, stderr=stderr)
        result = subprocess.CompletedProcess(args, process.returncode, stdout, stderr)
        if check and process.returncode:
            # Raised here, not by check_returncode: the report shows the test's line, not subprocess's.
            raise subprocess.CalledProcessError(process.returncode, args, stdout, stderr)
        return result

    def _note_exit(self, process: SandboxProcess, before: dict[str, int], reason: str | None,
                   stderr_tail: str = "") -> None:
        after = self._cgroup.stats() if self._cgroup else {}
        code = process.returncode
        pids_hit = after.get("pids_max_hits", 0) > before.get("pids_max_hits", 0)
        oom = after.get("oom_kills", 0) > before.get("oom_kills", 0)
        if reason is None and self._channel is not None and self._channel.expired:
            reason = "sandbox-timeout"
        if reason is None:
            if oom and code == -9:
                reason = "oom"
            elif code is not None and code < 0:
                reason = "signal"
            elif pids_hit and code:
                reason = "pids"
            elif code and self.limits and self.limits.memory_mechanism == "rlimit" and \
                    _OUT_OF_MEMORY.search(stderr_tail):
                reason = "memory"  # RLIMIT_AS makes allocations fail; nothing is killed
        info = ExitInfo(code, reason, pids_hit, oom, after.get("pids_peak"), after.get("memory_peak"))
        process._record.exit = self.last_exit = info

    def stats(self) -> dict[str, int]:
        """The sandbox's cgroup counters (pids_current, pids_max_hits, oom_kills, peaks), if any."""
        return self._cgroup.stats() if self._cgroup else {}

    def _effective_timeout(self, timeout: float | None) -> float | None:
        if self._deadline is None:
            return timeout
        remaining = max(0.0, self._deadline - time.monotonic())
        return remaining if timeout is None else min(timeout, remaining)

    def _cwd(self) -> str:
        """The settings' cwd; over an image whose WorkingDir is set, that, unless cwd was given."""
        image = self._image
        if image is not None and image.working_dir and self.settings.cwd == "/":
            return image.working_dir
        return self.settings.cwd

    def _env(self, extra: Mapping[str, str] | None) -> dict[str, str]:
        image = dict(self._image.env) if self._image else {}
        env = {**BASE_ENV, **image, **self.settings.env, **(extra or {})}
        bad = [k for k, v in env.items() if not isinstance(k, str) or not isinstance(v, str) or "=" in k or not k]
        if bad:
            raise ConfigError(f"bad environment for the sandbox: {', '.join(map(repr, bad))}; a name is a "
                              "non-empty str without '=', and a value is a str")
        if any("\0" in k or "\0" in v for k, v in env.items()):
            raise ValueError("embedded null byte")  # as subprocess says
        return env

    # -- files ------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """The sandbox's whole filesystem as it is now — its rootfs, its layers and every change,
        but not /proc, /sys, /dev or host paths bound in — as a tarball at `path`, to use as a
        rootfs spec later (`Sandbox(rootfs=path)`: extracted once, then cached by its digest).
        Made by `tar` in the sandbox (Alpine's busybox has one), and never bigger than what the
        sandbox's filesystem holds; RootfsError if it fails.  Written under a fresh name, then
        renamed onto `path`: a symlink there is replaced, never written through, and on the way to
        its directory no symlink is followed that lies in a directory this process may write (a
        sandbox or an isolated test could have made it): RootfsError names it."""
        __tracebackhide__ = True
        commands = len(self.history)
        self._live_channel()
        try:
            return saving.save(self, Path(path))
        finally:
            del self.history[commands:]  # ours, not the caller's commands

    def write_file(self, path: str | os.PathLike[str], data: str | bytes, mode: int | None = None, *,
                   timeout: float | None = FILE_TIMEOUT) -> None:
        """Write a regular file inside the sandbox (in its writable layer), creating or replacing
        it, with `mode` if given; str is written as UTF-8.

        Done by our own code in a process like a command's, never by the sandbox's programs.
        FileNotFoundError if its directory does not exist, IsADirectoryError if `path` is a
        directory, as open() would; OSError naming the path for a FIFO, a device or any other
        failure; subprocess.TimeoutExpired after `timeout` seconds (None: no bound but the
        sandbox's lifetime).
        """
        __tracebackhide__ = True
        if mode is not None and (isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o7777):
            raise ConfigError(f"write_file(mode={mode!r}): a mode is an int from 0 to 0o7777, such as 0o644")
        what = "write_file(data=...): the data"
        if data is None:  # open().write(None) is a TypeError, not an empty file
            raise ConfigError(what.replace("...", "None", 1) + " is a str or bytes, not None")
        self._move("write", path, mode, encode(data, what), timeout, None)

    def read_file(self, path: str | os.PathLike[str], text: bool = True, *,
                  timeout: float | None = FILE_TIMEOUT) -> str | bytes:
        """A regular file's contents, read by our own code in a process like a command's, never by
        the sandbox's programs; FileNotFoundError or IsADirectoryError as open() would raise,
        OSError(EFBIG) for a file bigger than the sandbox's `output_max` (never a cut one), OSError
        naming the path for a FIFO, a device or any other failure, subprocess.TimeoutExpired after
        `timeout` seconds (None: no bound but the sandbox's lifetime)."""
        __tracebackhide__ = True
        limit = self.settings.output_max
        try:
            # (The cap is stderr's too: room for the transfer's "ERRNO detail" whatever output_max is.)
            data = self._move("read", path, limit, None, timeout,
                              None if limit is None else max(limit + 1, 4096))
        except OSError as exc:
            if exc.errno != errno.EFBIG:
                raise
            raise _too_big(os.fspath(path), limit or 0) from None  # refused before a byte was sent
        if limit is not None and len(data) > limit:
            raise _too_big(os.fspath(path), limit)  # it grew while it was read
        if text:  # as run(text=True) reads: UTF-8, universal newlines
            return io.TextIOWrapper(io.BytesIO(data), encoding="utf-8", errors="replace").read()
        return data

    def _move(self, verb: str, path: str | os.PathLike[str], arg: int | None, data: bytes | None,
              timeout: float | None, limit: int | None) -> bytes:
        """Run a file transfer (transfer.py: [verb, path, arg]) to its end within `timeout`, keeping
        at most `limit` bytes of its stdout and stderr; what it wrote to stdout."""
        __tracebackhide__ = True
        path = os.fspath(path) if isinstance(path, os.PathLike) else path
        if not isinstance(path, str):
            raise ConfigError(f"{verb}_file: a path in the sandbox is a str, not {path!r}")
        if "\0" in path:
            raise ValueError("embedded null byte")  # as open() says
        _check_timeout(timeout)
        self._live_channel()
        args = [f"{verb}_file", path]
        # Recorded as the call it was (a report reads `$ write_file('/etc/x')`), never as a command line.
        process = self._start(f"{verb}_file({path!r})", args, PIPE if data is not None else None,
                              PIPE if data is None else DEVNULL, PIPE, None, None, False, False, [verb, path, arg])
        effective = self._effective_timeout(timeout)
        try:
            out, err = process._communicate(data, effective, limit)
        except subprocess.TimeoutExpired:
            process._finish_after_timeout()
            raise subprocess.TimeoutExpired(f"{verb}_file({path!r}) in the sandbox", effective or 0) from None
        finally:
            self._processes.remove(process)
            process._close_pipes()
        if process._ended_with_sandbox:
            raise SandboxClosed(f"the sandbox died during {verb}_file({path!r}): {self._why_dead()}")
        if process.returncode != 0:
            self._live_channel()  # the sandbox's lifetime ended it: SandboxClosed says so
            raise _transfer_error(verb, path, process.returncode, err or b"")
        return out or b""

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"init pid {self.init_pid}"
        rootfs = self.rootfs.describe() if self.rootfs else repr(self.settings.rootfs)
        return f"<Sandbox rootfs={rootfs} network={self.settings.network} {state}>"


def live_descriptors() -> set[int]:
    """The descriptors of every open sandbox of this process: init's socket and pidfd, and the
    pipes of the commands it runs."""
    fds = set()
    for sandbox in list(_LIVE):
        channel = sandbox._channel
        if channel is None:
            continue
        fds.update((channel.sock.fileno(), sandbox._pidfd))
        for process in sandbox._processes:
            fds.update(process._descriptors())
    return {fd for fd in fds if fd >= 0}


def _argv(args: Command, shell: bool | None = None) -> list[str]:
    """argv for `args`: a str through /bin/sh -c (unless shell=False); with shell=True a list's
    first item goes to the shell and the rest are its arguments, as in subprocess."""
    if isinstance(args, (str, os.PathLike)):
        argv = [os.fspath(args)]
    else:
        try:
            argv = [os.fspath(a) for a in args]
        except TypeError:  # not a sequence, or an item that is no path: say what a command is
            argv = []
        if not argv or not all(isinstance(a, str) for a in argv):
            raise ConfigError(f"a command is a str (run by /bin/sh -c) or a non-empty list of str, not {args!r}")
    if any("\0" in a for a in argv):
        raise ValueError("embedded null byte")  # as subprocess says
    if shell or (shell is None and isinstance(args, str)):
        return ["/bin/sh", "-c", *argv]
    return argv


_WARNED_USERS: set[str] = set()


def _warn_of_users(rootfs: Rootfs) -> None:
    """Say, once per image, that an image made to run as another user runs as root here."""
    from ..rootfs.users import ROOT
    from . import idmap
    user = rootfs.image.user if rootfs.image else ""
    if user in ROOT or rootfs.spec in _WARNED_USERS:
        return
    _WARNED_USERS.add(rootfs.spec)
    warnings.warn(NsboxWarning(
        f"nsbox: the image {rootfs.spec} runs as user {user!r}, but its sandbox maps one uid, because "
        f"{idmap.unavailable()}. So its commands run as root (uid 0), every file of the image is root's, "
        "and programs that switch users themselves (setuid, gosu, su-exec, postgres's initdb) fail"),
        stacklevel=3)


def _check_errors(errors: object) -> None:
    import codecs
    try:
        codecs.lookup_error(errors)  # type: ignore[arg-type]
    except (LookupError, TypeError):
        raise ConfigError(f"errors={errors!r}: not a codec error handler; use 'replace' (the default), "
                          "'strict', 'surrogateescape', 'backslashreplace' or 'ignore'") from None


def _check_port(port: object) -> None:
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ConfigError(f"a port is a number from 1 to 65535, not {port!r}")


def _check_max_connections(value: object) -> None:
    ceiling = services.PROCESS_SLOTS.limit
    if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= ceiling:
        raise ConfigError(f"max_connections is a number from 1 to {ceiling}, what all published ports of "
                          f"this process may hold open at once (services.PROCESS_SLOTS), not {value!r}")


def _stopped(pid: int | None) -> str:
    """': it is stopped (...)' when a process that should answer is stopped, else ''."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""
    return f": it is stopped (SIGSTOP?); `kill -CONT {pid}` resumes it" if state in ("T", "t") else ""


def _shell_form(args: Command) -> str:
    import shlex
    return args if isinstance(args, str) else shlex.join(os.fspath(a) for a in args)


def _exec_error(code: int, text: str, argv: list[str], cwd: str | None = None) -> OSError:
    """A failed exec becomes the same exception subprocess would raise (FileNotFoundError...),
    naming the working directory when that is what failed, as subprocess does."""
    if code and cwd is not None:
        why = {errno.ENOENT: "does not exist", errno.ENOTDIR: "is not a directory"}.get(
            code, f"cannot be entered: {errno.errorcode.get(code, code)}")
        exc = OSError(code, f"{os.strerror(code)} in the sandbox: the working directory (cwd) {cwd} {why}; "
                      "give one that exists in the rootfs, or make it first", cwd)
        exc.nsbox_step = "chdir"  # type: ignore[attr-defined]  # `nsbox run --cwd` words it its own way
        return exc
    if code:
        return OSError(code, f"{os.strerror(code)} in the sandbox: {text}", argv[0])
    return SandboxSetupError(f"cannot start {argv!r} in the sandbox: {text}")


def _too_big(path: str, limit: int) -> OSError:
    return OSError(errno.EFBIG, f"cannot read {path} from the sandbox: it is bigger than output_max "
                   f"({limit} bytes), the most read_file keeps in memory; give the sandbox a bigger "
                   "output_max, or read the file in parts with run()", path)


def _transfer_error(verb: str, path: str, returncode: int, stderr: bytes) -> OSError:
    """The OSError a failed transfer means: transfer.py says "ERRNO detail" and exits 1."""
    head, _, detail = stderr.decode("utf-8", errors="replace").partition(" ")
    if returncode != 1 or not head.isdigit():
        how = f"was killed by signal {-returncode}" if returncode < 0 else f"exited {returncode}"
        return OSError(errno.EIO, f"cannot {verb} {path} in the sandbox: the process doing it {how} "
                       "(something in the sandbox signalled it?); try again", path)
    code = int(head)
    name = errno.errorcode.get(code, str(code))
    kernel_fs = next((top for top in ("/proc", "/sys") if path == top or path.startswith(top + "/")), None)
    if code == errno.ENOENT and verb == "write" and kernel_fs:
        what = f"{kernel_fs} is the kernel's own filesystem, where no file can be made"
    elif code == errno.ENOENT:
        what = "it does not exist" if verb == "read" else "it is in a directory that does not exist, " \
               "or one where no file can be made"
    elif code == errno.EISDIR:
        what = "it is a directory"
    elif code == errno.ELOOP:
        what = ("ELOOP: its path loops, or goes through a /proc magic link (/proc/self/fd/N, /proc/N/root, "
                "...), which read_file and write_file never follow")
    elif code == errno.ENOSPC:
        what = "ENOSPC: the sandbox's writable layer is full; give it a bigger tmpfs_size"
    elif detail.startswith("it is"):
        what = f"{detail}; read_file and write_file move regular files only (run() can read or write others)"
    else:
        what = f"{name} ({os.strerror(code)})"
    if code == errno.ENOENT or code == errno.EISDIR:
        what += f" ({name})"
    return OSError(code, f"cannot {verb} {path} in the sandbox: {what}", path)


def _kill_and_wait(pidfd: int, timeout: float) -> bool:
    """SIGKILL a sandbox's init by its pidfd; True once it and its PID namespace are gone."""
    if pidfd < 0:
        return True
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        return True
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _end(sock: socket.socket, pidfd: int) -> None:
    """The last thing a sandbox does, from close() or when it is garbage-collected unclosed."""
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except OSError:
        pass
    os.close(pidfd)
    sock.close()
