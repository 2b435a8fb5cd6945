"""`SandboxProcess`, the Popen-like handle of a command in a sandbox, and what is kept of each command."""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any, Union

from ..errors import ConfigError, hide_our_frames
from . import services

# pytest shows our errors at the test's line, without this module's validators under them.
__tracebackhide__ = hide_our_frames

if TYPE_CHECKING:
    import re

    from .channel import Channel
    from .sandbox import Sandbox

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL
STDOUT = subprocess.STDOUT
Command = Union[str, Sequence[str]]
CLOSE_TIMEOUT = 10.0
_READ_CHUNK = 1 << 16


@dataclass
class CommandRecord:
    """One command run in a sandbox, kept for the failure report."""

    args: Command
    returncode: int | None = None
    stderr_tail: str = ""
    duration: float = 0.0
    exit: ExitInfo | None = None
    dropped: dict[str, int] = field(default_factory=dict)  # stream -> bytes beyond output_max
    started: float = field(default_factory=time.time)


@dataclass(frozen=True)
class ExitInfo:
    """Why a command ended, as data rather than an ambiguous 128+N."""

    returncode: int | None
    reason: str | None = None     # timeout | sandbox-timeout | oom | memory | pids | signal | None
    pids_cap_hit: bool = False
    oom_killed: bool = False
    peak_pids: int | None = None
    peak_memory: int | None = None

    def describe(self) -> str:
        notes = {
            "timeout": "killed: the run's timeout expired",
            "sandbox-timeout": "killed: the sandbox's lifetime expired",
            "oom": "killed by the kernel: out of memory at the sandbox's memory_max",
            "memory": f"exit {self.returncode}: an allocation failed at the sandbox's memory_max (RLIMIT_AS)",
            "pids": "failed after hitting the sandbox's pids_max (fork refused)",
            "signal": f"killed by signal {-(self.returncode or 0)}",
        }
        text = notes.get(self.reason or "", f"exit {self.returncode}")
        if self.pids_cap_hit and self.reason != "pids":
            text += "; hit pids_max"
        return text


class SandboxProcess:
    """A command running in a sandbox, shaped like `subprocess.Popen`.

    `pid` is the command's PID inside the sandbox.
    """

    def __init__(self, sandbox: Sandbox, channel: Channel, pid: int, args: Command,
                 streams: Streams, text: bool, record: CommandRecord, errors: str = "replace"):
        self.sandbox = sandbox
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self._ended_with_sandbox = False
        self._channel = channel
        self._text = text
        self._errors = errors
        self._record = record
        self._started = time.monotonic()
        self.stdin: IO[Any] | None = streams.open_parent("stdin", text, errors)
        self.stdout: IO[Any] | None = streams.open_parent("stdout", text, errors)
        self.stderr: IO[Any] | None = streams.open_parent("stderr", text, errors)
        #: What wait_for_output() read from each stream (a pipe gives its data only once).
        self.output_seen: dict[str, str] = {}
        self.output_decoders: dict[str, Any] = {}  # wait_for_output's, so a character may span reads

    def wait_for_output(self, pattern: str | re.Pattern[str], timeout: float = 10.0,
                        stream: str = "stdout") -> re.Match[str]:
        """Read the command's `stream` (spawned with PIPE) until `pattern` matches; the match.
        ServerNotReady (a TimeoutError), with the last lines it printed, if not within `timeout` or
        if it exits first."""
        __tracebackhide__ = True
        services.check_wait("wait_for_output", timeout)
        return services.wait_for_output(self, pattern, timeout, stream)

    def poll(self) -> int | None:
        if self.returncode is None:
            self._channel.pump(0)
            self._collect()
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        __tracebackhide__ = True
        if self.returncode is None:
            self._channel.wait_for(lambda: self.pid in self._channel.exits or self._channel.eof, timeout)
            if not self._collect():
                raise subprocess.TimeoutExpired(self.args, timeout)
        assert self.returncode is not None
        return self.returncode

    def _collect(self) -> bool:
        exits = self._channel.exits
        if self.pid in exits:
            self._set_returncode(exits.pop(self.pid))
        elif self._channel.eof:
            self._ended_with_sandbox = True  # no exit status: the whole sandbox went away
            self._set_returncode(-9)
        return self.returncode is not None

    def _set_returncode(self, code: int) -> None:
        self.returncode = code
        self._record.returncode = code
        self._record.duration = time.monotonic() - self._started

    def send_signal(self, sig: int, *, session: bool = False) -> None:
        """Signal the command (with session=True, every process it started too)."""
        if self.returncode is None and not self._channel.eof:
            self._channel.send({"op": "signal", "pid": self.pid, "signal": int(sig), "session": session})

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9, session=True)

    def communicate(self, input: str | bytes | None = None,
                    timeout: float | None = None) -> tuple[Any, Any]:
        """Feed stdin, read stdout/stderr until the command exits, then return what it wrote.

        Returns once the command has exited and its pipes are drained, even if processes it left
        in the background still hold them open (their later output is not collected).  Keeps at
        most the sandbox's `output_max` bytes of each stream, like `Sandbox.run`.
        """
        __tracebackhide__ = True
        return self._communicate(input, timeout, self.sandbox.settings.output_max)

    def _communicate(self, input: str | bytes | None, timeout: float | None,
                     limit: int | None) -> tuple[Any, Any]:
        __tracebackhide__ = True
        deadline = None if timeout is None else time.monotonic() + timeout
        captures = {"stdout": _Capture("stdout", limit), "stderr": _Capture("stderr", limit)}
        poller = select.poll()
        names: dict[int, str] = {}
        pending_input = encode(input)
        if self.stdin is not None:
            self.stdin.flush()
            if pending_input:
                os.set_blocking(self.stdin.fileno(), False)
                names[self.stdin.fileno()] = "stdin"
                poller.register(self.stdin.fileno(), select.POLLOUT)
            else:
                self._close_stream("stdin")
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None:
                os.set_blocking(stream.fileno(), False)
                names[stream.fileno()] = name
                poller.register(stream.fileno(), select.POLLIN)
        poller.register(self._channel.sock, select.POLLIN)  # our exit arrives here
        while self.poll() is None:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout, captures["stdout"].value(),
                                                captures["stderr"].value())
            wait = 0.1 if remaining is None else min(remaining, 0.1)
            for fd, _event in poller.poll(wait * 1000):
                name = names.get(fd)
                if name == "stdin":
                    pending_input = self._feed(poller, fd, pending_input)
                elif name is not None and not captures[name].read(fd):
                    poller.unregister(fd)
                    del names[fd]
        # The command is gone: what it wrote is in the pipes now.  A process it left in the
        # background may go on writing into them: take what a pipe can hold, not a byte more.
        for name in ("stdout", "stderr"):
            stream = getattr(self, name)
            if stream is not None:
                captures[name].drain(stream.fileno())
        out, err = captures["stdout"].value(), captures["stderr"].value()
        self._record.stderr_tail = tail(err)
        self._record.dropped = {name: c.dropped for name, c in captures.items() if c.dropped}
        if self.stdout is None:
            out = None
        if self.stderr is None:
            err = None
        return (self._decode(out), self._decode(err))

    def _finish_after_timeout(self) -> None:
        """Kill every process the command started, wait for it, and keep its output for the report."""
        self.kill()
        self.wait(timeout=CLOSE_TIMEOUT)

    def _feed(self, poller: select.poll, fd: int, data: bytes) -> bytes:
        try:
            written = os.write(fd, data[:_READ_CHUNK])
        except BlockingIOError:
            return data
        except BrokenPipeError:
            written = len(data)
        data = data[written:]
        if not data:
            poller.unregister(fd)
            self._close_stream("stdin")
        return data

    def _decode(self, data: bytes | None) -> Any:
        if data is None or not self._text:
            return data
        return data.decode("utf-8", errors=self._errors)

    def _close_stream(self, name: str) -> None:
        stream = getattr(self, name)
        if stream is not None:
            try:
                stream.close()
            except OSError:
                pass
            setattr(self, name, None)

    def _close_pipes(self) -> None:
        for name in ("stdin", "stdout", "stderr"):
            self._close_stream(name)

    def _descriptors(self) -> list[int]:
        """Our ends of the command's pipes (an isolated test may read a fixture's server)."""
        fds = []
        for stream in (self.stdin, self.stdout, self.stderr):
            try:
                fds.append(stream.fileno())  # type: ignore[union-attr]
            except (AttributeError, OSError, ValueError):
                pass
        return fds

    def __enter__(self) -> SandboxProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # A failed test's report is made after this: keep what the server left unread (bounded).
        for stream in ("stdout", "stderr"):
            services.pending_output(self, stream)
        self._close_pipes()
        if self.returncode is None:
            self.kill()
            self.wait(CLOSE_TIMEOUT)

    def __repr__(self) -> str:
        return f"<SandboxProcess pid={self.pid} returncode={self.returncode} args={self.args!r}>"


@dataclass
class Streams:
    """The three stdio slots of a command: what the child gets, and what we keep."""

    child: list[int | None] = field(default_factory=lambda: [None, None, None])
    parent: dict[str, int] = field(default_factory=dict)
    owned_child: list[int] = field(default_factory=list)

    @classmethod
    def make(cls, stdin: Any, stdout: Any, stderr: Any) -> Streams:
        streams = cls()
        try:
            for slot, (name, spec) in enumerate((("stdin", stdin), ("stdout", stdout), ("stderr", stderr))):
                streams._set(slot, name, spec)
        except BaseException:
            streams.close_child_ends()
            streams.close_parent_ends()
            raise
        return streams

    def _set(self, slot: int, name: str, spec: Any) -> None:
        if spec is None:
            self.child[slot] = None if slot == 0 else slot  # inherit our stdout/stderr
        elif spec == DEVNULL:
            self.child[slot] = None
        elif spec == PIPE:
            r, w = os.pipe2(os.O_CLOEXEC)
            child, parent = (r, w) if slot == 0 else (w, r)
            self.child[slot] = child
            self.owned_child.append(child)
            self.parent[name] = parent
        elif spec == STDOUT and slot == 2:
            self.child[2] = self.child[1] if self.child[1] is not None else None
        elif isinstance(spec, int) and spec >= 0:
            self.child[slot] = spec
        elif hasattr(spec, "fileno"):
            self.child[slot] = spec.fileno()
        else:
            raise ConfigError(f"{name} must be None, PIPE, DEVNULL, a file object or an fd, not {spec!r}")

    def layout(self) -> list[str | None]:
        return ["fd" if fd is not None else None for fd in self.child]

    @property
    def child_fds(self) -> list[int]:
        return [fd for fd in self.child if fd is not None]

    def close_child_ends(self) -> None:
        for fd in self.owned_child:
            os.close(fd)
        self.owned_child.clear()

    def close_parent_ends(self) -> None:
        for fd in self.parent.values():
            os.close(fd)
        self.parent.clear()

    def open_parent(self, name: str, text: bool, errors: str = "replace") -> IO[Any] | None:
        fd = self.parent.pop(name, None)
        if fd is None:
            return None
        mode = "w" if name == "stdin" else "r"
        if text:
            return open(fd, mode, encoding="utf-8", errors=errors)
        return open(fd, mode + "b", buffering=0)


class _Capture:
    """What is kept of one output stream: its first `limit` bytes; the rest is read and counted."""

    #: After the command has exited, read at most this much more: what a pipe can hold (up to
    #: /proc/sys/fs/pipe-max-size, 1 MiB by default), not whatever a background writer adds.
    DRAIN = 4 << 20

    def __init__(self, name: str, limit: int | None):
        self.name = name
        self.limit = limit
        self.chunks: list[bytes] = []
        self.kept = 0
        self.dropped = 0

    def read(self, fd: int) -> bool:
        """Read what is there; False at EOF or when nothing more is available right now."""
        try:
            data = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return False
        if not data:
            return False
        room = len(data) if self.limit is None else max(0, self.limit - self.kept)
        if room:
            self.chunks.append(data[:room])
            self.kept += min(room, len(data))
        self.dropped += len(data) - min(room, len(data))
        return True

    def drain(self, fd: int) -> None:
        budget = self.DRAIN
        before = self.kept + self.dropped
        while self.kept + self.dropped - before < budget and self.read(fd):
            pass

    def value(self) -> bytes:
        data = b"".join(self.chunks)
        if self.dropped:
            data += (f"\n[nsbox: {self.dropped} more bytes of {self.name} were dropped: output_max "
                     f"is {self.limit}]\n").encode()
        return data


def encode(data: str | bytes | None, what: str = "run(input=...): the input") -> bytes:
    if data is None:
        return b""
    if isinstance(data, str):
        return data.encode()
    # Only what open().write() takes: bytes(42) would be 42 NUL bytes, bytes([1, 2]) two bytes.
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ConfigError(what.replace("...", repr(data), 1) + f" is a str or bytes, not {type(data).__name__}")
    return bytes(data)


def tail(data: bytes, lines: int = 10) -> str:
    return "\n".join(data.decode("utf-8", errors="replace").splitlines()[-lines:])


def check_timeout(timeout: object) -> None:
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
        raise ConfigError(f"run(timeout={timeout!r}): a timeout is a number of seconds (int or float), or None")
