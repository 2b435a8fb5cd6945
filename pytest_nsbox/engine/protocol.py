"""Messages between the test process, the spawner and each sandbox's init.

They travel over AF_UNIX SOCK_SEQPACKET sockets, so every message keeps its boundaries and carries
its file descriptors (SCM_RIGHTS) with it.  A message is one dict of plain values; its `op` names
it.  It is encoded with marshal: unlike json, marshal imports nothing, which keeps the spawner,
and so every fork of it, small.  marshal is not safe against hostile data (a few bytes can make
it allocate gigabytes), so what may come from anyone but one of our own processes is decoded
only after the kernel has said who sent it (`receive_from`).
"""

from __future__ import annotations

import array
import errno
import marshal
import os
import socket
import sys


MAX_MESSAGE = 1 << 20
MAX_FDS = 8

Message = dict  # of str keys and plain values (str, int, float, bool, None, list, dict)


class MessageTooLarge(ValueError):
    pass


class Dropped(ValueError):
    """A message that was not from the expected sender, or not a message: read and thrown away."""


def send(sock: socket.socket, message: Message, fds: list[int] | tuple[int, ...] = (), flags: int = 0) -> None:
    data = marshal.dumps(message)
    try:
        if fds:
            socket.send_fds(sock, [data], list(fds), flags)
        else:
            sock.send(data, flags)
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
    fds = _descriptors(ancillary)
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


# -- from one process only -------------------------------------------------------------------------
_CREDENTIALS = socket.CMSG_SPACE(12)  # struct ucred: pid, uid, gid; and no room for descriptors


def require_credentials(sock: socket.socket) -> None:
    """Have the kernel attach the sender's credentials to every message this socket receives.
    Set it before the first message is sent: one sent before carries none, and is dropped."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)


def receive_from(sock: socket.socket, pid: int, flags: int = 0) -> Message | None:
    """The next message, which process `pid` sent, without descriptors; None once every sender
    is gone.

    Raises Dropped, the message read and thrown away, if another process sent it or it does not
    decode to a dict, so that marshal never sees a stranger's bytes.  Descriptors sent along are
    never installed (there is no room for them): closing one, say of a FUSE file, could block us.
    The kernel fills in the sender's PID, as our PID namespace numbers it; a sender may name
    another only with CAP_SYS_ADMIN over its own PID namespace, and only a process of that
    namespace, so no process in a namespace below ours can pass for one in ours.
    """
    size, ancillary, got, _addr = sock.recvmsg_into([_buffer], _CREDENTIALS, flags)
    if not ancillary:
        return None  # EOF: with SO_PASSCRED on, every message, an empty one too, has credentials
    if _sender(ancillary) != pid:
        raise Dropped("not from the owner")
    if got & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or not size:
        raise Dropped(f"a message of {size} bytes, empty, cut short, or with descriptors")
    try:
        message = marshal.loads(_buffer[:size])
    except Exception as exc:  # noqa: BLE001 - whatever the bytes make marshal raise
        raise Dropped(f"not a message: {exc!r}") from None
    if not isinstance(message, dict):
        raise Dropped(f"not a message: a {type(message).__name__}")
    return message


def _sender(ancillary: list[tuple[int, int, bytes]]) -> int:
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= 4:
            return int.from_bytes(payload[:4], sys.byteorder, signed=True)
    return 0  # none: sent before SO_PASSCRED was set


def _descriptors(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    return list(fds)
