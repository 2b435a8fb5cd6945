"""The test process's side of the spawner: start it once, ask it for sandboxes.

`subprocess.Popen` is captured at import time, so test doubles that patch it (pytest-subprocess,
unittest.mock) never intercept sandboxes.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import tempfile
import threading
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
         "from pytest_nsbox.engine.spawner import main; main({fd})")


class Spawner:
    """One per test process (a forked child of the test process gets its own)."""

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
        code = _BOOT.format(path=_PACKAGE_PARENT, fd=theirs.fileno())
        debug = bool(os.environ.get("NSBOX_DEBUG"))
        # A wrapper's complaints (systemd-run's) are kept to explain a failed start.
        errors = tempfile.TemporaryFile() if handshake and not debug else None
        try:
            # -I -S: no site-packages, no user site, no environment: a small, predictable process.
            self.process = _Popen([*prefix, sys.executable, "-I", "-S", "-B", "-c", code],
                                  pass_fds=[theirs.fileno()], stdin=_DEVNULL, env=env,
                                  stdout=None if debug else _DEVNULL,
                                  stderr=None if debug else (errors or _DEVNULL),
                                  start_new_session=True)
        except OSError as exc:
            raise SandboxUnavailable(f"cannot start the sandbox spawner "
                                     f"{prefix[0] if prefix else sys.executable}: {exc}") from None
        finally:
            theirs.close()
        self.sock = ours
        if not handshake:
            return
        ours.settimeout(_HANDSHAKE_TIMEOUT)  # systemd-run waits on D-Bus, which may never answer
        try:
            self.request({"op": "hello"})
        except (SandboxUnavailable, SandboxSetupError):  # no answer, or no answer in time
            raise SandboxUnavailable(self._failed_start(errors)) from None
        finally:
            if errors is not None:
                errors.close()
        ours.settimeout(None)

    def _failed_start(self, errors: IO[bytes] | None) -> str:
        """End a spawner that never said hello, and say why: its wrapper's last words if any."""
        hung = self.process.poll() is None
        if hung:
            self.process.kill()
        self.process.wait()
        self.sock.close()
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
        self.sock.close()  # EOF: the spawner shuts down
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass  # it finishes on its own; the process is not worth blocking the exit for

    def request(self, message: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self.lock:
            timeout = self.sock.gettimeout()
            self.sock.settimeout(timeout or _REQUEST_TIMEOUT)
            try:
                protocol.send(self.sock, message)
                reply, fds = protocol.receive(self.sock, shared=False)
            except TimeoutError:
                raise SandboxSetupError(self._no_answer()) from None
            except OSError as exc:
                reply, fds = None, []
                error = str(exc)
            else:
                error = "it exited"
            finally:
                self.sock.settimeout(timeout)
        if reply is None:
            code = self.process.poll()
            how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
            raise SandboxUnavailable(f"the sandbox spawner (pid {self.process.pid}, {sys.executable}) "
                                     f"stopped answering: {error} ({how}); set NSBOX_DEBUG=1 to see its stderr")
        if reply.get("op") == "error":
            raise (SandboxUnavailable if reply.get("unavailable") else SandboxSetupError)(reply["message"])
        return reply, fds

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


#: What the spawner (and systemd-run before it) may see of the test process's environment.  Every
#: sandbox's init is a copy of the spawner's memory: the user's tokens and passwords stay out of it.
_SPAWNER_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "TMPDIR", "XDG_RUNTIME_DIR",
                "DBUS_SESSION_BUS_ADDRESS", "PYTEST_XDIST_WORKER", "PYTEST_XDIST_WORKER_COUNT")


def spawner_environment(environ: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in environ.items()
            if key in _SPAWNER_ENV or key.startswith(("NSBOX_", "LC_"))}


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
