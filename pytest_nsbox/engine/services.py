"""Servers in sandboxes: published ports, and waiting until a server is ready.

Published ports: a server in a sandbox's private network, reached from the host.

`Sandbox.port(8080)` listens on 127.0.0.1:<random> on the host. For each connection accepted there,
the sandbox's init makes a TCP socket *in the sandbox's network namespace* and hands it over; the
socket is connected from here to the sandbox's 127.0.0.1:8080 (a socket keeps the namespace it was
made in), and two threads copy bytes both ways. Nothing in the sandbox listens on the host, and
the host port is the kernel's pick, so xdist workers never clash. A sandbox on the host's network
needs none of this: its ports are the host's.
"""

from __future__ import annotations

import codecs
import errno
import os
import re
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple

_BUFFER = 1 << 18


class PublishedPort(NamedTuple):
    """Where the host reaches a sandbox's port."""

    host: str
    port: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def url(self, scheme: str = "http", path: str = "/") -> str:
        return f"{scheme}://{self.host}:{self.port}{path}"


class Forwarder:
    """One published port of one sandbox: a listener on the host, and the connections it relays."""

    def __init__(self, inner_port: int, make_inner_socket: Callable[[], socket.socket]):
        self.inner_port = inner_port
        self._inner_socket = make_inner_socket
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.published = PublishedPort("127.0.0.1", self._listener.getsockname()[1])
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name=f"nsbox port {inner_port}", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        inner = None
        try:
            inner = self._inner_socket()
            inner.connect(("127.0.0.1", self.inner_port))
        except Exception:  # noqa: BLE001 - nothing listens in there (yet), or the sandbox is gone
            if inner is not None:
                inner.close()
            client.close()  # as a refused connection looks to the client: closed at once
            return
        with self._lock:
            if self._closed:
                client.close()
                inner.close()
                return
            self._open.update((client, inner))
        done = threading.Event()
        threading.Thread(target=_copy, args=(inner, client, done, self._forget), daemon=True).start()
        _copy(client, inner, done, self._forget)

    def _forget(self, *sockets: socket.socket) -> None:
        with self._lock:
            self._open.difference_update(sockets)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._open = self._open, set()
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
            sock.close()


def _copy(source: socket.socket, target: socket.socket, done: threading.Event,
          forget: Callable[..., None]) -> None:
    """Bytes from `source` to `target` until `source` ends; then end `target`'s writing side. The
    second direction to finish closes both."""
    buffer = bytearray(_BUFFER)
    view = memoryview(buffer)
    try:
        while True:
            count = source.recv_into(buffer)
            if not count:
                break
            target.sendall(view[:count])
    except OSError:
        pass
    try:
        target.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    if done.is_set():
        forget(source, target)
        source.close()
        target.close()
    else:
        done.set()


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
