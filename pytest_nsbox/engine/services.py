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
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

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


def wait_until_connectable(make_inner_socket: Callable[[], socket.socket], port: int, timeout: float,
                           gone: Callable[[], str | None]) -> None:
    """Until something in the sandbox accepts a connection on its 127.0.0.1:`port`; TimeoutError
    after `timeout` seconds, or at once if `gone()` says why waiting is pointless (the server
    exited)."""
    deadline = time.monotonic() + timeout
    pause = 0.005
    while True:
        sock = make_inner_socket()
        try:
            sock.settimeout(max(0.05, deadline - time.monotonic()))
            sock.connect(("127.0.0.1", port))
            return
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ETIMEDOUT, None) and not isinstance(exc, TimeoutError):
                raise
        finally:
            sock.close()
        why = gone()
        if why is not None:
            raise TimeoutError(f"nothing will listen on port {port} in the sandbox: {why}")
        if time.monotonic() + pause > deadline:
            raise TimeoutError(f"nothing listened on port {port} in the sandbox within {timeout:g} s")
        time.sleep(pause)
        pause = min(pause * 2, 0.1)


#: How far before new output a match may start: the search never rescans all that came before.
MATCH_SPAN = 64 << 10
_TAIL_CHARS = 2000


def wait_for_output(process: Any, pattern: str | re.Pattern[str], timeout: float, stream: str) -> re.Match[str]:
    """Read `process`'s `stream` (a PIPE) until `pattern` matches in what it printed.

    What is read is kept in `process.output_seen[stream]` (the pipe gives it only once): its last
    `output_max` characters.  A match may span reads but not more than MATCH_SPAN characters
    before the newest one, so that a flood costs linear time.  On a timeout, or if the process ends
    first, TimeoutError says so and shows the last lines it printed.
    """
    pipe = getattr(process, stream, None)
    if pipe is None:
        raise ValueError(f"wait_for_output reads the process's {stream}: spawn it with {stream}=PIPE")
    regex = re.compile(pattern) if isinstance(pattern, str) else pattern
    seen = process.output_seen
    seen.setdefault(stream, "")
    decoder = process.output_decoders.setdefault(stream, codecs.getincrementaldecoder("utf-8")("replace"))
    keep = process.sandbox.settings.output_max
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
            why = _how_it_ended(process, stream) if ended else f"not within {timeout:g} s"
            raise TimeoutError(f"{stream} of {process.args!r} never matched {regex.pattern!r}: {why}; "
                               f"its last lines:\n{tail}")
        ready, _, _ = select.select([fd], [], [], min(remaining, 0.1))
        if ready:
            chunk = os.read(fd, 65536)
            ended = not chunk
            text = seen[stream] + decoder.decode(chunk, final=ended)
            start = len(seen[stream]) - MATCH_SPAN
            if keep is not None and len(text) > keep:
                start -= len(text) - keep
                text = text[-keep:]
            seen[stream], start = text, max(0, start)
        elif process.poll() is not None:
            ended = not select.select([fd], [], [], 0)[0]


def _how_it_ended(process: Any, stream: str) -> str:
    try:
        return f"it exited with status {process.wait(timeout=2)}"
    except Exception:  # noqa: BLE001 - still running: it only closed the stream
        return f"it closed its {stream}"
