"""The test process's side of the spawner: start it once, ask it for sandboxes.

`subprocess.Popen` is captured at import time, so test doubles that patch it (pytest-subprocess,
unittest.mock) never intercept sandboxes.
"""

from __future__ import annotations

import atexit
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from dataclasses import dataclass
from typing import IO, Any
from collections.abc import Mapping

from ..errors import SandboxSetupError, SandboxUnavailable
from . import protocol, systemd
from .caps import CapPlan

_Popen = subprocess.Popen
_DEVNULL = subprocess.DEVNULL
_PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent.parent)
_HANDSHAKE_TIMEOUT = 30.0
#: The spawner answers a request in milliseconds (it never waits for a sandbox's setup).
_REQUEST_TIMEOUT = 30.0
_CLOSE_TIMEOUT = 5.0
_BOOT = ("import sys; sys.path.insert(0, {path!r}); "
         "from pytest_nsbox.engine.spawner import main; main({fd}, {replies}, {owner}, {owner_pidfd})")


class Spawner:
    """One per test process (a forked child of the test process gets its own).

    The spawner serves only the process that started it (the kernel names each message's sender),
    and answers on a second socket, whose copy every fork of ours closes (_forget_in_forks): a fork
    that kept the first can neither be served nor read our answers.  Every answer echoes its
    request's id: one that comes too late for its request is never taken for the next one's.
    """

    _instance: Spawner | None = None
    _instance_lock = threading.Lock()

    @classmethod
    def get(cls) -> Spawner:
        with cls._instance_lock:
            current = cls._instance
            if current is None or current.owner_pid != os.getpid() or not current.alive():
                current = cls._instance = cls()
            return current

    def __init__(self) -> None:
        if sys.platform != "linux":
            raise SandboxUnavailable(f"pytest-nsbox needs Linux namespaces; this is {sys.platform}")
        self.owner_pid = os.getpid()
        self.lock = threading.Lock()
        self._replies: socket.socket | None = None  # our end of the socket the spawner answers on
        decision = systemd.decide()
        env = spawner_environment(os.environ)
        if decision.scope is not None:
            try:
                self._start(decision.scope.argv, {**env, systemd.UNIT_ENV: decision.scope.unit},
                            handshake=True)
                return
            except SandboxUnavailable as exc:
                decision = systemd.Decision(None, f"systemd-run --user --scope failed: {exc}")
        if decision.reason:
            env[systemd.NOTE_ENV] = decision.reason  # for the header: why caps fell back
        self._start((), env, handshake=False)

    def _start(self, prefix: tuple[str, ...], env: dict[str, str], handshake: bool) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Before our first request: a message sent before the spawner asks for credentials has none.
        protocol.require_credentials(theirs)
        replies, their_replies = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owner_pidfd = os.pidfd_open(os.getpid())  # the spawner leaves when we are gone
        passed = [theirs.fileno(), their_replies.fileno(), owner_pidfd]
        code = _BOOT.format(path=_PACKAGE_PARENT, fd=theirs.fileno(), replies=their_replies.fileno(),
                            owner=os.getpid(), owner_pidfd=owner_pidfd)
        debug = bool(os.environ.get("NSBOX_DEBUG"))
        # A wrapper's complaints (systemd-run's) are kept to explain a failed start.
        errors = tempfile.TemporaryFile() if handshake and not debug else None
        try:
            # -I -S: no site-packages, no user site, no environment: a small, predictable process.
            self.process = _Popen([*prefix, sys.executable, "-I", "-S", "-B", "-c", code],
                                  pass_fds=passed, stdin=_DEVNULL, env=env,
                                  stdout=None if debug else _DEVNULL,
                                  stderr=None if debug else (errors or _DEVNULL),
                                  start_new_session=True)
        except OSError as exc:
            ours.close()
            replies.close()
            raise SandboxUnavailable(f"cannot start the sandbox spawner "
                                     f"{prefix[0] if prefix else sys.executable}: {exc}") from None
        finally:
            theirs.close()
            their_replies.close()
            os.close(owner_pidfd)
        self.sock = ours
        self._replies = replies
        ours.settimeout(_REQUEST_TIMEOUT)  # for sends: its queue is full only if it is hung
        if not handshake:
            return
        try:
            # systemd-run waits on D-Bus, which may never answer
            self.request({"op": "hello"}, timeout=_HANDSHAKE_TIMEOUT)
        except (SandboxUnavailable, SandboxSetupError):  # no answer, or no answer in time
            raise SandboxUnavailable(self._failed_start(errors)) from None
        finally:
            if errors is not None:
                errors.close()

    def _failed_start(self, errors: IO[bytes] | None) -> str:
        """End a spawner that never said hello, and say why: its wrapper's last words if any."""
        hung = self.process.poll() is None
        if hung:
            self.process.kill()
        self.process.wait()
        self.sock.close()
        self._forget_replies()
        said = b""
        if errors is not None:
            errors.seek(0)
            said = errors.read(4096).strip()
        if said:
            return said.decode(errors="replace").splitlines()[-1]
        return f"no answer within {_HANDSHAKE_TIMEOUT:g} s" if hung else f"exit status {self.process.returncode}"

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self, timeout: float = _CLOSE_TIMEOUT) -> None:
        """Let the spawner end its sandboxes and leave; reap it, so that not even a zombie stays."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # EOF, even if a fork of ours holds the socket too
        except OSError:
            pass  # the spawner is gone already
        self.sock.close()
        self._forget_replies()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # it finishes on its own; the process is not worth blocking the exit for

    def request(self, message: dict[str, Any], timeout: float | None = None) -> tuple[dict[str, Any], list[int]]:
        """Send a request, numbered; its answer and the fds that came with it."""
        timeout = timeout or _REQUEST_TIMEOUT
        with self.lock:
            # Random, not counted: a fork that may claim our PID (root's may) cannot guess which
            # id our next request carries, so the answer to its request is never taken for ours.
            request_id = int.from_bytes(os.urandom(8), "little")
            try:
                if self._replies is None:
                    raise OSError("its answers were closed in this process")
                protocol.send(self.sock, {**message, "id": request_id})
                reply, fds = _answer(self._replies, request_id, time.monotonic() + timeout)
            except TimeoutError:
                raise SandboxSetupError(self._no_answer()) from None
            except OSError as exc:
                reply, fds = None, []
                error = str(exc)
            else:
                error = "it exited"
            if reply is None:
                reply = self._last_words()
        if reply is None:
            code = self.process.poll()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise SandboxUnavailable(f"the sandbox spawner (pid {self.process.pid}, {sys.executable}) "
                                     f"stopped answering: {error} ({how}); set NSBOX_DEBUG=1 to see its stderr")
        if reply.get("op") == "error":
            raise (SandboxUnavailable if reply.get("unavailable") else SandboxSetupError)(reply["message"])
        return reply, fds

    def _forget_replies(self) -> None:
        replies, self._replies = self._replies, None
        if replies is not None:
            replies.close()

    def _last_words(self) -> dict[str, Any] | None:
        """Why the spawner failed, if it said so before it exited: on its own socket, which only
        it writes to."""
        try:
            if not select.select([self.sock], [], [], 0)[0]:
                return None  # (the socket's timeout would make a receive wait)
            said, fds = protocol.receive(self.sock, socket.MSG_DONTWAIT, shared=False)
        except (OSError, ValueError, EOFError, TypeError):
            return None
        for fd in fds:
            os.close(fd)
        return said if isinstance(said, dict) and said.get("op") == "error" else None

    def _no_answer(self) -> str:
        pid = self.process.pid
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        if state in ("T", "t"):
            why = f"it is stopped (SIGSTOP?): `kill -CONT {pid}` resumes it"
        else:
            why = "it is alive but busy or hung; set NSBOX_DEBUG=1 to see its stderr"
        return f"the sandbox spawner (pid {pid}) did not answer within {_REQUEST_TIMEOUT:g} s: {why}"

    def create(self, spec: dict[str, Any]) -> tuple[socket.socket, int, dict[str, Any]]:
        """A new sandbox's socket, its init's pidfd, and what the spawner says of it (caps, cgroup)."""
        reply, fds = self.request({"op": "create", "spec": spec})
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            raise SandboxSetupError(f"the spawner answered {reply!r} without a sandbox")
        return socket.socket(fileno=fds[0]), fds[1], reply

    def probe(self, network: str = "none") -> Probe:
        reply, _ = self.request({"op": "probe", "network": network})
        return Probe(bool(reply["ok"]), reply.get("error", ""), CapPlan.from_json(reply["caps"]))


def _answer(sock: socket.socket, request_id: int, deadline: float) -> tuple[dict[str, Any] | None, list[int]]:
    """The reply to request `request_id` on `sock`; any other is dropped, with its fds, so that
    a stale answer can never be taken for this one.  Raises TimeoutError at `deadline`."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)
        reply, fds = protocol.receive(sock, shared=False)
        if reply is None or reply.get("id") == request_id:
            return reply, fds
        for fd in fds:
            os.close(fd)


#: What the spawner (and systemd-run before it) may see of the test process's environment.  Every
#: sandbox's init is a copy of the spawner's memory: the user's tokens and passwords stay out of it.
_SPAWNER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR",
                "DBUS_SESSION_BUS_ADDRESS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")


def spawner_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in environ.items()
            if key in _SPAWNER_ENV or key.startswith(("NSBOX_", "LC_"))}


def _forget_in_forks() -> None:
    """In a fork of the test process: drop its copy of the socket its spawner answers on, before
    the fork runs anything else (a fork that wants sandboxes gets a spawner of its own)."""
    spawner = Spawner._instance
    if spawner is not None and spawner.owner_pid != os.getpid():
        spawner._forget_replies()


os.register_at_fork(after_in_child=_forget_in_forks)


@atexit.register
def _close_at_exit() -> None:
    spawner = Spawner._instance
    if spawner is not None and spawner.owner_pid == os.getpid():
        spawner.close()


@dataclass(frozen=True)
class Probe:
    """Can this machine make sandboxes, and how are they capped?"""

    ok: bool
    error: str
    caps: CapPlan | None = None


_probe_cache: dict[str, Probe] = {}


def probe(network: str = "none") -> Probe:
    """Whether sandboxes can be made here, why not, and the cap mechanism (cached per process)."""
    if network not in _probe_cache:
        try:
            _probe_cache[network] = Spawner.get().probe(network)
        except SandboxUnavailable as exc:
            _probe_cache[network] = Probe(False, str(exc))
    return _probe_cache[network]
