"""Messages between the test process, the spawner and each sandbox's init.

They travel over AF_UNIX SOCK_SEQPACKET sockets, so every message keeps its boundaries and carries
its file descriptors (SCM_RIGHTS) with it.  A message is one dict of plain values; its `op` names
it.  It is encoded with marshal: every peer is one of our own processes running the same
interpreter (no sandboxed code holds these sockets), and unlike json, marshal imports nothing —
which keeps the spawner, and so every fork of it, small.
"""

from __future__ import annotations

import array
import errno
import marshal
import os
import socket


MAX_MESSAGE = 1 << 20
MAX_FDS = 8

Message = dict  # of str keys and plain values (str, int, float, bool, None, list, dict)


class MessageTooLarge(ValueError):
    pass


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = ()) -> None:
    data = marshal.dumps(message)
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds))
        else:
            sock.send(data)
    except OSError as exc:
        if exc.errno == errno.EMSGSIZE:
            raise MessageTooLarge(f"a {len(data)}-byte request is more than a socket message can carry "
                                  "(about 200 kB): pass large data as input= or with write_file()") from None
        raise


# The spawner and init are single-threaded and receive large requests (an exec's environment):
# one buffer, made once, serves them; a fresh 1 MiB buffer per call cost more than the rest of
# receiving.  The test process may receive from many threads, and only small replies: it passes
# shared=False and gets a small buffer of its own per call.
_buffer = bytearray(MAX_MESSAGE)
_SMALL = 1 << 16


def receive(sock: socket.socket, flags: int = 0, shared: bool = True) -> tuple[Message | None, list[int]]:
    """One message and the fds that came with it; (None, []) once the peer is gone."""
    # Not socket.recv_fds: before Python 3.12 it drops `flags` (MSG_DONTWAIT would block).
    buffer = _buffer if shared else bytearray(_SMALL)
    size, ancillary, _flags, _addr = sock.recvmsg_into([buffer], socket.CMSG_SPACE(MAX_FDS * 4), flags)
    data = bytes(buffer[:size])
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    fds = list(fds)
    if not data:
        for fd in fds:
            _close(fd)
        return None, []
    return marshal.loads(data), fds


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
