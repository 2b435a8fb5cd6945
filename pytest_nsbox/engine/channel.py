"""The owner's end of a sandbox's control socket: requests out, events in, sorted by whom they concern."""

from __future__ import annotations

import os
import select
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, SandboxClosed
from . import protocol


class Channel:
    """The owner's end of a sandbox's socket: requests out, events in, sorted by whom they concern.

    Any thread may pump events; each waiter re-checks the shared tables, so an event read by one
    thread is seen by another.
    """

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.replies: dict[int, dict[str, Any]] = {}
        self.exits: dict[int, int] = {}
        self.events: list[dict[str, Any]] = []
        self.expired = False
        self.eof = False
        self._next_id = 0
        self._poller = select.poll()
        self._poller.register(sock, select.POLLIN)

    def next_id(self) -> int:
        with self.lock:
            self._next_id += 1
            return self._next_id

    def send(self, message: dict[str, Any], fds: Sequence[int] = ()) -> None:
        try:
            protocol.send(self.sock, message, fds)
        except protocol.MessageTooLarge as exc:
            raise ConfigError(str(exc)) from None
        except OSError as exc:
            raise SandboxClosed(f"the sandbox is gone ({exc.strerror})") from None

    def pump(self, timeout: float | None) -> None:
        """Read the events that arrive within `timeout` (at most 0.1 s, so threads take turns)."""
        wait = 0.1 if timeout is None else max(0.0, min(timeout, 0.1))
        if not self.lock.acquire(timeout=wait):
            return
        try:
            if self.eof:
                time.sleep(wait)
                return
            if not self._poller.poll(wait * 1000):
                return
            while True:
                try:
                    message, fds = protocol.receive(self.sock, socket.MSG_DONTWAIT, shared=False)
                except BlockingIOError:
                    return
                except ConnectionResetError:
                    # Init went away with our last message unread: the kernel says so before it
                    # hands over what init sent first (its error, say), which is still queued.
                    continue
                except OSError:
                    message, fds = None, []
                if message is None:
                    self.eof = True
                    return
                self._dispatch(message, fds)
        finally:
            self.lock.release()

    def _dispatch(self, message: dict[str, Any], fds: list[int]) -> None:
        op = message.get("op")
        if op == "socket" and len(fds) == 1:
            message["fd"] = fds.pop()  # the waiter takes it
        elif op == "pty" and len(fds) == 2:
            message["fds"], fds = fds, []
        for fd in fds:
            os.close(fd)
        if op in ("started", "failed", "socket", "pty"):
            self.replies[message["id"]] = message
        elif op == "exited":
            self.exits[message["pid"]] = message["returncode"]
        elif op == "expired":
            self.expired = True
        else:
            self.events.append(message)

    def wait_for(self, predicate, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not predicate():
            if self.eof:
                return predicate()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self.pump(remaining)
        return True

    def next_event(self, timeout: float) -> dict[str, Any] | None:
        self.wait_for(lambda: bool(self.events), timeout)
        return self.events.pop(0) if self.events else None
