"""Messages between the test process, the spawner and each sandbox's init.

They travel over AF_UNIX SOCK_SEQPACKET sockets, so every message keeps its boundaries and carries
its file descriptors (SCM_RIGHTS) with it.  A message is one JSON object; its `op` names it.
"""

from __future__ import annotations

import array
import json
import os
import socket
from typing import Any

MAX_MESSAGE = 1 << 20
MAX_FDS = 8

Message = dict[str, Any]


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = json.dumps(message, separators=(",", ":")).encode()
    if fds:
        socket.send_fds(sock, [data], list(fds))
    else:
        sock.send(data)


def receive(sock: socket.socket, flags: int = 0) -> tuple[Message | None, list[int]]:
    """One message and the fds that came with it; (None, []) once the peer is gone."""
    # Not socket.recv_fds: before Python 3.12 it drops `flags` (MSG_DONTWAIT would block).
    data, ancillary, _flags, _addr = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(MAX_FDS * 4), flags)
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    fds = list(fds)
    if not data:
        for fd in fds:
            _close(fd)
        return None, []
    return json.loads(data), fds


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
