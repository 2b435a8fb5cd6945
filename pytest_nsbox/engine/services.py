"""Servers in sandboxes: published ports, and waiting until a server is ready.

Published ports: a server in a sandbox's private network, reached from the host.

`Sandbox.port(8080)` listens on 127.0.0.1:<random> on the host. For each connection accepted there,
the sandbox's init makes a TCP socket *in the sandbox's network namespace* and hands it over; the
socket is connected from here to the sandbox's 127.0.0.1:8080 (a socket keeps the namespace it was
made in), and two threads copy bytes both ways. Nothing in the sandbox listens on the host, and
the host port is the kernel's pick, so xdist workers never clash. A sandbox on the host's network
needs none of this: its ports are the host's.

Any local user may connect to 127.0.0.1, as often as it likes, and the relay runs in the test
process: so connections open at once have a ceiling per port (MAX_CONNECTIONS, or the port's
`max_connections`) and one for the whole process (PROCESS_SLOTS), each costing at most two threads
and two BUFFER_SIZE buffers. A connection beyond either is reset as soon as it is accepted, and the
port says how many it turned away once, when it closes.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import resource
import select
import shlex
import socket
import struct
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from ..errors import ConfigError, ServerNotReady, hide_our_frames

# pytest shows our errors at the test's line, without this module's validators under them.
__tracebackhide__ = hide_our_frames

#: Bytes one direction of a relayed connection reads at once (smaller ones slow bulk transfers).
BUFFER_SIZE = 1 << 18
#: Connections a published port relays at once, unless `Sandbox.port(max_connections=...)` says.
MAX_CONNECTIONS = 64
# accept() errors that pass: out of descriptors or memory for now, or a client that gave up.
_TRANSIENT = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM, errno.ECONNABORTED, errno.EPROTO,
              errno.EPERM}
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST, and keeps no state


class PublishedPort(NamedTuple):
    """Where the host reaches a sandbox's port."""

    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "http", path: str = "/") -> str:
        if not isinstance(scheme, str) or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
            from ..errors import ConfigError
            raise ConfigError(f"url({scheme!r}): the first argument is the scheme, such as 'http'; give a "
                              f"path as url(path={scheme!r})")
        return f"{scheme}://{self.host}:{self.port}{path}"


class ConnectionSlots:
    """A ceiling on connections open at once, for one port or for every port of the process."""

    def __init__(self, limit: int):
        self.limit = limit
        self.open = 0
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.open >= self.limit:
                return False
            self.open += 1
            return True

    def give(self) -> None:
        with self._lock:
            self.open -= 1

    def forget_all(self) -> None:
        """In a fork: none of the threads that hold slots (or maybe the lock) exist there."""
        self.open = 0
        self._lock = threading.Lock()


def _process_limit() -> int:
    """128 (at most 2 x 128 threads and 64 MB of buffers), or fewer where descriptors are scarce: a
    connection holds two, and a flood must leave the test most of its own (an eighth of
    RLIMIT_NOFILE; the usual 1024 gives 128)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 128
    return max(16, min(128, soft // 8))


#: Connections all published ports of this process relay at once.
PROCESS_SLOTS = ConnectionSlots(_process_limit())
os.register_at_fork(after_in_child=PROCESS_SLOTS.forget_all)  # --nsbox-isolate forks this process


class Forwarder:
    """One published port of one sandbox: a listener on the host, and the connections it relays."""

    def __init__(self, inner_port: int, make_inner_socket: Callable[[], socket.socket],
                 max_connections: int = MAX_CONNECTIONS):
        self.inner_port = inner_port
        self._inner_socket = make_inner_socket
        self.slots = ConnectionSlots(max_connections)
        self.refused = {"port": 0, "process": 0}  # connections reset at once, by the limit that did
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.published = PublishedPort("127.0.0.1", self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._start(self._accept, f"nsbox port {inner_port}")

    def _start(self, target: Callable[..., None], name: str, *args: Any) -> None:
        thread = threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True)
        with self._lock:
            self._threads.add(thread)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._threads.discard(thread)
            raise

    def _run(self, target: Callable[..., None], *args: Any) -> None:
        try:
            target(*args)
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError as exc:
                if self._closed or exc.errno not in _TRANSIENT:
                    return
                time.sleep(0.05)  # the port stays; the client waits in the backlog meanwhile
                continue
            which = self._admit()
            if which is not None:
                self.refused[which] += 1
                _reset(client)
                continue
            try:
                self._start(self._relay, f"nsbox port {self.inner_port} relay", client)
            except RuntimeError:  # no thread to be had: as refused
                self._release()
                _reset(client)

    def _admit(self) -> str | None:
        """None if a connection may open now, else which limit it would break."""
        if not self.slots.take():
            return "port"
        if not PROCESS_SLOTS.take():
            self.slots.give()
            return "process"
        return None

    def _release(self) -> None:
        PROCESS_SLOTS.give()
        self.slots.give()

    def _relay(self, client: socket.socket) -> None:
        inner = None
        try:
            inner = self._inner_socket()
            inner.connect(("127.0.0.1", self.inner_port))
        except Exception:  # noqa: BLE001 - nothing listens in there (yet), or the sandbox is gone
            if inner is not None:
                inner.close()
            client.close()  # as a refused connection looks to the client: closed at once
            self._release()
            return
        try:
            with self._lock:
                if self._closed:
                    return
                self._open.update((client, inner))
            back = threading.Thread(target=_copy, args=(inner, client), daemon=True,
                                    name=f"nsbox port {self.inner_port} relay back")
            back.start()
            try:
                _copy(client, inner)
            finally:
                back.join()
        except RuntimeError:  # no thread for the way back: as refused
            pass
        finally:
            # Only this thread closes the pair: a descriptor closed under a thread still using it
            # could be reused by another file meanwhile.
            with self._lock:
                self._open.difference_update((client, inner))
            client.close()
            inner.close()
            self._release()

    def close(self) -> None:
        """Stop listening, and end every relayed connection (their threads close them)."""
        with self._lock:
            self._closed = True
            sockets = list(self._open)
        # close() alone leaves a socket listening while the accept thread is blocked on it.
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join(self, timeout: float) -> None:
        """Wait, at most `timeout` s, until the threads of a closed port are gone."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                threads = list(self._threads)
            if not threads or time.monotonic() >= deadline:
                return
            threads[0].join(max(0.0, deadline - time.monotonic()))

    def refusals(self) -> str | None:
        """What this port turned away, in a sentence, or None."""
        by_port, by_process = self.refused["port"], self.refused["process"]
        if not by_port + by_process:
            return None
        why = []
        if by_port:
            why.append(f"{by_port} beyond its limit of {self.slots.limit} open at once "
                       f"(Sandbox.port({self.inner_port}, max_connections=N) sets it)")
        if by_process:
            why.append(f"{by_process} beyond the limit of {PROCESS_SLOTS.limit} for all published ports "
                       "of this process")
        return (f"nsbox: the published port {self.published.address} (the sandbox's port {self.inner_port}) "
                f"closed connections at once: {' and '.join(why)}")


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except OSError:
        pass
    sock.close()


def _copy(source: socket.socket, target: socket.socket) -> None:
    """Bytes from `source` to `target` until `source` ends; then end `target`'s writing side, as
    `source`'s peer did. If `source`'s peer is gone instead (reset), end both ways of both: the other
    direction must not wait, holding its slot, on a server that waits for more of a dead client."""
    buffer = bytearray(BUFFER_SIZE)
    view = memoryview(buffer)
    while True:
        try:
            count = source.recv_into(buffer)
        except OSError:
            for sock in (source, target):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            return
        if not count:
            break
        try:
            target.sendall(view[:count])
        except OSError:
            break  # `target` reads no more; what it still sends goes the other way meanwhile
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass


# -- readiness -------------------------------------------------------------------------------------
# Each wait calls an attempt until it succeeds, stops at once when waiting is pointless (the server
# exited, the sandbox is gone), and raises ServerNotReady with __tracebackhide__ set all the way
# down: pytest then shows the test's own line and the message, not this module's source.

_NOT_YET: Any = object()  # what an attempt returns while the server is not ready
#: How far before new output a match may start: the search never rescans all that came before.
MATCH_SPAN = 64 << 10
_TAIL_CHARS = 2000
#: Lines of a server's output that an error or the failure report shows, and characters of each.
TAIL_LINES = 20
LINE_CHARS = 300
#: Unread output a failed wait or the report takes from one pipe at once: more than a pipe holds
#: (64 KiB by default, 1 MiB at most unless raised), so a server that floods cannot keep it reading.
PENDING_BUDGET = 1 << 20


class Server:
    """What a wait knows of the server it waits for (if it was given one), to stop at once when
    waiting is pointless, and to say what became of it."""

    def __init__(self, check_sandbox: Callable[[], object], process: Any | None):
        self._check_sandbox = check_sandbox
        self.process = process

    def gone(self) -> str | None:
        """Why nothing will get ready: the server exited; None while it may still. A closed or
        dead sandbox raises SandboxClosed, now."""
        __tracebackhide__ = True
        self._check_sandbox()
        process = self.process
        if process is None or process.poll() is None:
            return None
        return f"its server `{shell_form(process.args)}` exited with status {process.returncode}"

    def still(self) -> str:
        """'; its server `...` is still running after N s', or '' if the wait names no server."""
        if self.process is None or self.process.poll() is not None:
            return ""
        return (f"; its server `{shell_form(self.process.args)}` is still running after "
                f"{running_for(self.process):.1f} s")

    def ended(self) -> str:
        """'; its stderr ended:' and the last lines the server left in its pipe (stdout if stderr
        has none), or '' if it printed nothing we can read."""
        if self.process is None:
            return ""
        for stream in ("stderr", "stdout"):
            lines, _earlier = tail_lines(pending_output(self.process, stream), 5)
            if lines:
                return f"; its {stream} ended:\n" + "\n".join(f"  {line}" for line in lines)
        return ""


def poll_until(attempt: Callable[[float], Any], timeout: float, server: Server,
               fail: Callable[[str | None], str], interval: float | None = None) -> Any:
    """`attempt(seconds left)` until it returns anything but _NOT_YET, and that. ServerNotReady with
    `fail(why)` as soon as the server is gone, or `fail(None)` after `timeout` s. Without an
    `interval` the pause doubles from 5 ms to 100 ms: a quick server is seen at once, a slow one
    costs little."""
    __tracebackhide__ = True
    deadline = time.monotonic() + timeout
    pause = interval or 0.005
    while True:
        result = attempt(max(0.05, deadline - time.monotonic()))
        if result is not _NOT_YET:
            return result
        why = server.gone()
        if why is not None:
            raise ServerNotReady(fail(why) + server.ended())
        left = deadline - time.monotonic()
        if left <= 0:
            raise ServerNotReady(fail(None))
        time.sleep(min(pause, left))
        if interval is None:
            pause = min(pause * 2, 0.1)


def wait_until_connectable(make_inner_socket: Callable[[], socket.socket], port: int, timeout: float,
                           server: Server) -> None:
    """Until something in the sandbox accepts a connection on its 127.0.0.1:`port`."""
    __tracebackhide__ = True

    def attempt(left: float) -> Any:
        __tracebackhide__ = True
        sock = make_inner_socket()
        try:
            sock.settimeout(left)
            sock.connect(("127.0.0.1", port))
            return None
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ETIMEDOUT, None) and not isinstance(exc, TimeoutError):
                raise
            return _NOT_YET
        finally:
            sock.close()

    def fail(why: str | None) -> str:
        if why is not None:
            return f"nothing will listen on port {port} in the sandbox: {why}"
        return (f"nothing listened on port {port} in the sandbox within {timeout:g} s{server.still()}: "
                f"the server must listen on port {port} of 127.0.0.1 (or 0.0.0.0) in there, or take a "
                "longer timeout=")
    poll_until(attempt, timeout, server, fail)


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float, server: Server) -> Any:
    """`predicate()` until it returns something true, and that. What it raised counts as "not yet"
    (a client refused, a half-started server): the error names the last of it."""
    __tracebackhide__ = True
    name = f"wait_until({callable_name(predicate)})"
    last = ["it was not called"]

    def attempt(_left: float) -> Any:
        try:
            value = predicate()
        except Exception as exc:  # noqa: BLE001 - the predicate's own "not yet"; named in the error
            last[0] = f"it raised {describe_exception(exc)}"
            return _NOT_YET
        if value:
            return value
        last[0] = f"it returned {_short_repr(value)}"
        return _NOT_YET

    def fail(why: str | None) -> str:
        if why is not None:
            return f"{name} will not be true (last: {last[0]}): {why}"
        return (f"{name} was not true within {timeout:g} s; last: {last[0]}{server.still()} "
                "(a longer timeout= gives it more time)")
    return poll_until(attempt, timeout, server, fail, interval)


def http_status(status: object) -> tuple[Callable[[int], bool], str]:
    """A check of `wait_for_http`'s `status=` (a code, several, or a callable on the code), and
    its words for the error; ConfigError for anything else."""
    if isinstance(status, int) and not isinstance(status, bool):
        return (lambda code: code == status), f"status {status}"
    if callable(status):
        return (lambda code: bool(status(code))), f"a status {callable_name(status)} accepts"
    if isinstance(status, (tuple, list, set, frozenset, range)) and status and \
            all(isinstance(code, int) and not isinstance(code, bool) for code in status):
        codes = frozenset(status)
        return (lambda code: code in codes), f"a status in {', '.join(map(str, sorted(codes)))}"
    raise ConfigError(f"wait_for_http(status={status!r}): a status is an HTTP status code (200), several "
                      "((200, 204)), or a callable that takes the code and says whether it means ready")


def wait_for_http(url: str, where: str, status: tuple[Callable[[int], bool], str], timeout: float,
                  server: Server) -> None:
    """Until a GET of `url` answers with a status that `status` accepts (redirects followed, as
    urllib does). No proxy: the host's proxy settings must not send 127.0.0.1 elsewhere."""
    __tracebackhide__ = True
    import http.client
    import urllib.error
    import urllib.request
    accept, wanted = status
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    last = ["no answer"]

    def attempt(left: float) -> Any:
        __tracebackhide__ = True
        try:
            with opener.open(url, timeout=left) as response:
                code = response.status
        except urllib.error.HTTPError as exc:
            code = exc.code
            exc.close()
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            last[0] = f"no answer ({describe_exception(reason)})"
            return _NOT_YET
        if accept(code):
            return None
        last[0] = f"status {code}"
        return _NOT_YET

    def fail(why: str | None) -> str:
        if why is not None:
            return f"{url} ({where}) will not answer with {wanted} (last: {last[0]}): {why}"
        return (f"{url} ({where}) did not answer with {wanted} within {timeout:g} s; last: {last[0]}"
                f"{server.still()} (a longer timeout= gives it more time)")
    poll_until(attempt, timeout, server, fail)


def wait_for_output(process: Any, pattern: str | re.Pattern[str], timeout: float, stream: str) -> re.Match[str]:
    """Read `process`'s `stream` (a PIPE) until `pattern` matches in what it printed.

    What is read is kept in `process.output_seen[stream]` (the pipe gives it only once): its last
    `output_max` characters.  A match may span reads but not more than MATCH_SPAN characters
    before the newest one, so that a flood costs linear time.  On a timeout, or if the process ends
    first, ServerNotReady says so and shows the last lines it printed.
    """
    __tracebackhide__ = True
    pipe = getattr(process, stream, None)
    if pipe is None:
        raise ConfigError(f"wait_for_output reads the process's {stream}: spawn it with {stream}=PIPE")
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    seen = process.output_seen
    seen.setdefault(stream, "")
    fd = pipe.fileno()
    deadline = time.monotonic() + timeout
    ended = False
    start = 0
    while True:
        found = regex.search(seen[stream], start)
        if found:
            return found
        remaining = deadline - time.monotonic()
        if ended or remaining <= 0:
            tail = "\n".join(seen[stream][-_TAIL_CHARS:].splitlines()[-10:]) or "(nothing)"
            why = _how_it_ended(process, stream) if ended else \
                f"not within {timeout:g} s (a longer timeout= gives it more time)"
            raise ServerNotReady(f"{stream} of `{shell_form(process.args)}` never matched {regex.pattern!r}: "
                                 f"{why}; its last lines:\n{tail}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.1))
        if ready:
            chunk = os.read(fd, 65536)
            ended = not chunk
            before = len(seen[stream])
            cut = _keep(process, stream, chunk)
            start = max(0, before - MATCH_SPAN - cut)
        elif process.poll() is not None:
            ended = not select.select([fd], [], [], 0)[0]


def _how_it_ended(process: Any, stream: str) -> str:
    try:
        return f"it exited with status {process.wait(timeout=2)}"
    except Exception:  # noqa: BLE001 - still running: it only closed the stream
        return f"it closed its {stream}"


def _keep(process: Any, stream: str, chunk: bytes) -> int:
    """Add `chunk` (b"" at the end) to `process.output_seen[stream]`, which keeps its last
    `output_max` characters; how many were cut from its front."""
    decoder = process.output_decoders.setdefault(stream, codecs.getincrementaldecoder("utf-8")("replace"))
    keep = process.sandbox.settings.output_max
    text = process.output_seen.get(stream, "") + decoder.decode(chunk, final=not chunk)
    cut = 0
    if keep is not None and len(text) > keep:
        cut = len(text) - keep
        text = text[-keep:]
    process.output_seen[stream] = text
    return cut


def pending_output(process: Any, stream: str, budget: int = PENDING_BUDGET) -> str:
    """What `process` printed to its `stream` pipe: what wait_for_output read, and what is there
    unread now. The latter is taken without blocking and kept in `output_seen`, where a later
    wait_for_output finds it: the report shows a server's output even if the test never read it."""
    pipe = getattr(process, stream, None)
    try:
        fd = pipe.fileno()  # type: ignore[union-attr]
    except (AttributeError, OSError, ValueError):  # not a pipe, or one the test closed
        return process.output_seen.get(stream, "")
    while budget > 0:
        try:
            if not select.select([fd], [], [], 0)[0]:
                break
            chunk = os.read(fd, min(65536, budget))
        except OSError:
            break
        _keep(process, stream, chunk)
        if not chunk:
            break
        budget -= len(chunk)
    return process.output_seen.get(stream, "")


_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def printable(line: str) -> str:
    """`line` with every control character but tab shown escaped (ESC as \\x1b): what a sandbox
    printed must not drive the terminal a report is read on (hide the `again:` line, set its
    clipboard) or forge a line of the report."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", line)


def tail_lines(text: str, count: int = TAIL_LINES) -> tuple[list[str], int]:
    """The last `count` lines of `text`, each cut at LINE_CHARS and made printable, and how many
    lines came before."""
    text = text.rstrip("\n")
    if not text:
        return [], 0
    lines = [printable(line) for line in text.rsplit("\n", count)[-count:]]
    earlier = text.count("\n") + 1 - len(lines)
    return [line if len(line) <= LINE_CHARS else f"{line[:LINE_CHARS]} [{len(line) - LINE_CHARS} more characters]"
            for line in lines], earlier


def running_for(process: Any) -> float:
    """Seconds since `process` started."""
    return time.time() - process._record.started


def shell_form(args: str | Sequence[str]) -> str:
    return args if isinstance(args, str) else shlex.join(args)


def callable_name(fn: object) -> str:
    """A callable as a user would find it: its name, or a lambda's file and line."""
    name = getattr(fn, "__qualname__", None)
    if not isinstance(name, str):
        return _short_repr(fn)
    code = getattr(fn, "__code__", None)
    if name.endswith("<lambda>") and code is not None:
        return f"<lambda> at {os.path.basename(code.co_filename)}:{code.co_firstlineno}"
    return name.split("<locals>.")[-1]


def describe_exception(exc: BaseException | object) -> str:
    if isinstance(exc, BaseException):
        text = str(exc)
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return str(exc)


def _short_repr(value: object) -> str:
    import reprlib
    return reprlib.repr(value)


def check_wait(what: str, timeout: object, interval: object = 1.0) -> None:
    """ConfigError unless `timeout` (>= 0) and `interval` (> 0) are numbers of seconds."""
    for name, value, least in (("timeout", timeout, "0 or more"), ("interval", interval, "more than 0")):
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not number or not (value >= 0 if name == "timeout" else value > 0):  # type: ignore[operator]
            raise ConfigError(f"{what}({name}={value!r}): {name} is a number of seconds, {least}")
