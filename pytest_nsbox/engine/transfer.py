"""`read_file` and `write_file` inside a sandbox: done by our own code, never by a program of the
sandbox's, whose commands may have replaced /bin/sh, cat or head with anything.

A command's process is a clone of init that becomes the command at exec (init.py).  For a file
transfer the same clone never execs: with a command's privileges, no more — its own user and mount
namespaces, the seccomp filter, none of init's descriptors, the sandbox's root as its root, so an
absolute symlink resolves inside the sandbox — it opens the file itself and moves its bytes over its
stdin or stdout, pipes to the owner.  It opens without blocking (a FIFO does not wait for a peer)
and moves regular files only; the owner bounds it in time as it does any command, so a command that
stops it (same uid: it may signal it) stalls nothing.  It fails with "ERRNO detail" on stderr.

This module is loaded by the spawner before any sandbox exists: the spawner's import rules hold
(see spawner.py), and nothing may be imported lazily, since the host's stdlib is gone after pivot_root.
"""

from __future__ import annotations

import errno
import os
import stat

from . import kernel

_AT_FDCWD = -100
_CHUNK = 1 << 16
#: Opening never waits: not for a FIFO's peer, not for a terminal to become ours.
_OPEN = os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_KINDS = {stat.S_IFIFO: "FIFO", stat.S_IFCHR: "character device", stat.S_IFBLK: "block device",
          stat.S_IFSOCK: "socket", stat.S_IFDIR: "directory"}


def serve(request: list) -> int:
    """Do the transfer `request` asks (["read", path, limit] or ["write", path, mode]) over fds 0/1,
    saying why on fd 2 if it fails; the exit status."""
    op, path, arg = request
    try:
        if op == "read":
            _read(path, arg)
        else:
            _write(path, arg)
    except OSError as exc:
        code = exc.errno or errno.EIO
        detail = exc.strerror if isinstance(exc, _Refused) else errno.errorcode.get(code, str(code))
        _write_all(2, f"{code} {detail}".encode("utf-8", "replace"))
        return 1
    return 0


class _Refused(OSError):
    """A refusal of ours: its strerror is the whole detail."""


def _open(path: str, flags: int) -> int:
    # No magic link (/proc/self/fd/N, /proc/N/root): a transfer reaches files by their names.
    mode = 0o666 if flags & os.O_CREAT else 0  # openat2 refuses a mode it would not use
    try:
        fd = kernel.openat2(_AT_FDCWD, path, flags | _OPEN, kernel.RESOLVE_NO_MAGICLINKS, mode)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, a socket: say which
            kind = _KINDS.get(stat.S_IFMT(os.stat(path).st_mode))
            if kind:
                raise _Refused(errno.EINVAL, f"it is a {kind}, not a regular file") from None
        raise
    try:
        kind = stat.S_IFMT(os.fstat(fd).st_mode)
        if kind != stat.S_IFREG:
            name = _KINDS.get(kind, "special file")
            code = errno.EISDIR if kind == stat.S_IFDIR else errno.EINVAL
            raise _Refused(code, f"it is a {name}" + ("" if code == errno.EISDIR else ", not a regular file"))
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(path: str, limit: int | None) -> None:
    fd = _open(path, os.O_RDONLY)
    try:
        if limit is not None and os.fstat(fd).st_size > limit:
            raise _Refused(errno.EFBIG, "bigger than output_max")  # not a byte sent for nothing
        # One byte past the limit at most: the owner tells a file that grew meanwhile by it.
        left = None if limit is None else limit + 1
        while left is None or left > 0:
            data = os.read(fd, _CHUNK if left is None else min(_CHUNK, left))
            if not data:
                return
            _write_all(1, data)
            if left is not None:
                left -= len(data)
    finally:
        os.close(fd)


def _write(path: str, mode: int | None) -> None:
    # Truncated only once it is known to be a regular file: O_TRUNC would not wait for the check.
    fd = _open(path, os.O_WRONLY | os.O_CREAT)
    try:
        os.ftruncate(fd, 0)
        while True:
            data = os.read(0, _CHUNK)
            if not data:
                break
            _write_all(fd, data)
        if mode is not None:
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
