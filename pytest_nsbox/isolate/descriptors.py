"""Which of the pytest process's descriptors an isolated test may keep.

The test's sandbox is a fork of pytest, so it starts with every descriptor pytest holds, opened
before any of the sandbox's walls existed: a file opened there writes through the host's own,
writable mount (and any descriptor of a file can be re-opened for writing through
/proc/self/fd); a socket or pipe to another process speaks to that process, unconfined.  So before
the test's code runs, each descriptor is looked at once (in the pytest process, which sees the
host's view) and then, in the child:

- kept: the standard streams (pytest points them at its capture files during the call), pytest's
  capture files, deleted files (temporary files: no path leads to them), files under the writable
  paths, the sandboxes the test may use (their init sockets and pidfds), the usual character
  devices, sockets bound or connected to an address the test could reach itself (the host's
  network with network="host", a Unix socket's path), and kernel objects of the process alone
  (epoll, eventfd, timerfd, signalfd, inotify);
- renewed: pipes and socket pairs whose both ends the test holds (an event loop's wake-up pipe):
  new ones in their place, since pytest holds the same ends and would read what the test wrote;
- re-opened through the sandbox's own view: directories (under a writable path too: `..` from
  the host's descriptor would climb the host's mounts), and other files, read-only (a session
  fixture's data file still reads; writing it fails with EBADF);
- replaced by /dev/null (the number stays valid, so no object of pytest's writes into a file the
  test opens later under the same number): everything else — pytest's saved terminal descriptors,
  terminals, pipes and socket pairs that lead out of the process (the spawner's socket,
  pytest-xdist's channel, a fixture's subprocess), pidfds of other processes, netlink sockets,
  and network sockets when network="none".

Shared memory mappings (a fixture's mmap of a host file, multiprocessing's semaphores) become
private copies in the child: a write to one would reach the host's file, or the pytest process.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
import struct
from typing import NamedTuple

import pytest

#: The character devices a test may keep open: null, zero, full, random, urandom (major 1).
_HARMLESS_DEVICES = {os.makedev(1, minor) for minor in (3, 5, 7, 8, 9)}
#: Kernel objects that belong to the process alone: nothing outside is reached through them.
_OWN_OBJECTS = ("anon_inode:[eventpoll]", "anon_inode:[eventfd]", "anon_inode:[timerfd]",
                "anon_inode:[signalfd]", "anon_inode:inotify")


class Reopen(NamedTuple):
    fd: int
    path: str
    ino: int
    offset: int
    flags: int  # O_PATH, O_DIRECTORY as the original had them
    inheritable: bool


class Fresh(NamedTuple):
    """A pipe or socket pair both of whose ends the test holds: it gets a new one, so that what
    it writes there never reaches the pytest process, which holds the same ends (its buffer is
    theirs).  `ends` are the descriptors of each end (a socket pair's two sockets, a pipe's read
    and write ends), with their status flags."""

    kind: int  # 0 for a pipe, else the socket type
    ends: tuple[tuple[tuple[int, ...], int], tuple[tuple[int, ...], int]]


class Plan(NamedTuple):
    null: tuple[int, ...]
    reopen: tuple[Reopen, ...]
    fresh: tuple[Fresh, ...] = ()


def plan(config: pytest.Config, writable: tuple[str, ...], network: str, keep: set[int]) -> Plan:
    """In the pytest process, right before the fork: what the child does with each descriptor."""
    keep = keep | _capture_files(config) | _sandboxes()
    null = set(_saved_streams(config)) - keep
    table = _table()
    pipes = _pipe_ends(table)
    unix = _unix_peers([fd for fd, (st, _link) in table.items() if stat.S_ISSOCK(st.st_mode)])
    own_sockets = {os.fstat(fd).st_ino: fd for fd in unix}
    reopen = []
    pipe_fds: dict[int, list[int]] = {}
    pair_fds: dict[int, list[int]] = {}
    for fd, (st, link) in table.items():
        if fd in keep or fd in null or fd <= 2:
            continue
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            # Even under a writable path: `..` from a descriptor of the host's tree climbs the host's
            # mounts, not ours.  A deleted directory has no path to be opened again by.
            if link.endswith(" (deleted)") or not link.startswith("/"):
                null.add(fd)
            else:
                reopen.append(_reopen(fd, st, link))
        elif stat.S_ISREG(mode):
            if link.endswith(" (deleted)") or not link.startswith("/") or _under(link, writable):
                continue
            reopen.append(_reopen(fd, st, link))
        elif stat.S_ISCHR(mode):
            if st.st_rdev not in _HARMLESS_DEVICES:
                null.add(fd)  # a terminal above all: TIOCSTI, or the user's screen
        elif stat.S_ISFIFO(mode):
            if link.startswith("pipe:") and pipes.get(st.st_ino, 0) == 3:  # both ends held here
                pipe_fds.setdefault(st.st_ino, []).append(fd)
            else:
                null.add(fd)  # a named FIFO, or a pipe to another process
        elif stat.S_ISSOCK(mode):
            verdict = _socket_stays(fd, network, unix.get(fd), own_sockets)
            if verdict == "pair":
                pair_fds.setdefault(st.st_ino, []).append(fd)
            elif not verdict:
                null.add(fd)
        elif not link.startswith(_OWN_OBJECTS):
            null.add(fd)  # pidfds, perf events, io_uring, BPF objects, symlinks opened O_PATH
    fresh = [_fresh_pipe(fds) for fds in pipe_fds.values()]
    fresh += _fresh_pairs(pair_fds, unix, null)
    return Plan(tuple(sorted(null)), tuple(reopen), tuple(fresh))


def _fresh_pipe(fds: list[int]) -> Fresh:
    read = tuple(fd for fd in fds if _status_flags(fd) & os.O_ACCMODE == os.O_RDONLY)
    write = tuple(fd for fd in fds if fd not in read)
    flags = tuple(_status_flags(group[0]) if group else 0 for group in (read, write))
    return Fresh(0, ((read, flags[0]), (write, flags[1])))


def _fresh_pairs(pair_fds: dict[int, list[int]], peers: dict[int, int | None], null: set[int]) -> list[Fresh]:
    """Socket pairs both of whose sockets are here, each once; a socket whose peer does not name
    it back (a datagram socket connected to a third) is closed off."""
    fresh, done = [], set()
    for ino, fds in pair_fds.items():
        if ino in done:
            continue
        other = peers.get(fds[0])
        back = pair_fds.get(other) if other is not None else None
        if not back or peers.get(back[0]) != ino:
            null.update(fds)
            continue
        done.update((ino, other))
        sock = socket.socket(fileno=fds[0])
        try:
            kind = sock.type
        finally:
            sock.detach()
        fresh.append(Fresh(int(kind), ((tuple(fds), _status_flags(fds[0])), (tuple(back), _status_flags(back[0])))))
    return fresh


def close_off(plan: Plan) -> None:
    """In the child, first thing: /dev/null over every descriptor that must not cross, new pipes
    and socket pairs for those the test shares with the pytest process, and private copies of the
    memory it shares with it."""
    _private_memory()
    for fresh in plan.fresh:
        _renew(fresh)
    if not plan.null:
        return
    import fcntl
    opened = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
    # Above every number to cover: one of them may be free by now (an at-fork handler closed it).
    devnull = fcntl.fcntl(opened, fcntl.F_DUPFD_CLOEXEC, max(plan.null) + 1)
    os.close(opened)
    try:
        for fd in plan.null:
            os.dup2(devnull, fd, inheritable=False)
    finally:
        os.close(devnull)


def _renew(fresh: Fresh) -> None:
    import fcntl
    if fresh.kind == 0:
        new = os.pipe2(os.O_CLOEXEC)
    else:
        pair = socket.socketpair(socket.AF_UNIX, fresh.kind)
        new = tuple(sock.detach() for sock in pair)
    try:
        for (fds, flags), fd in zip(fresh.ends, new):
            for target in fds:
                os.dup2(fd, target, inheritable=False)
            if fds:
                fcntl.fcntl(fds[0], fcntl.F_SETFL, flags)
    finally:
        for fd in new:
            os.close(fd)


def _private_memory() -> None:
    """Every shared mapping the fork kept (a session fixture's mmap of a host file, a sqlite -shm,
    multiprocessing's semaphores and shared values) becomes a private copy: what the test writes
    there stays its own, as its writes to /tmp do.  Read-only ones too, since mprotect could make a
    mapping of a file opened for writing writable again."""
    import ctypes
    shared = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 2 and fields[1][3] == "s":
                start, end = (int(x, 16) for x in fields[0].split("-"))
                shared.append((start, end - start, fields[1]))
    if not shared:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    for start, size, perms in shared:
        readable = perms[0] == "r"
        content = ctypes.string_at(start, size) if readable else b""
        prot = 0x1 | 0x2  # read and write while we fill it
        got = libc.mmap(start, size, prot, 0x02 | 0x20 | 0x10, -1, 0)  # MAP_PRIVATE|MAP_ANONYMOUS|MAP_FIXED
        if got != start:
            raise OSError(ctypes.get_errno(), "make a shared mapping private")
        if content:
            ctypes.memmove(start, content, size)
        final = (0x1 if readable else 0) | (0x2 if perms[1] == "w" else 0) | (0x4 if perms[2] == "x" else 0)
        libc.mprotect(start, size, final)


def reopen(plan: Plan) -> None:
    """In the child, once its mounts are made: the host files it held, read-only through its own
    view.  A file that is no longer where it was (or is something else now) becomes /dev/null."""
    for entry in plan.reopen:
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | entry.flags)
        except OSError:
            fd = -1
        if fd >= 0 and os.fstat(fd).st_ino != entry.ino:
            os.close(fd)
            fd = -1
        if fd < 0:
            fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        elif not entry.flags & os.O_PATH:
            os.set_blocking(fd, True)
            if entry.offset:
                os.lseek(fd, entry.offset, os.SEEK_SET)
        try:
            os.dup2(fd, entry.fd, inheritable=entry.inheritable)
        finally:
            os.close(fd)


def _table() -> dict[int, tuple[os.stat_result, str]]:
    table = {}
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            table[fd] = (os.fstat(fd), os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the listing's own descriptor, closed by now
    return table


def _reopen(fd: int, st: os.stat_result, link: str) -> Reopen:
    flags = os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0
    status = _status_flags(fd)
    if status & os.O_PATH:
        flags |= os.O_PATH
    offset = 0
    if stat.S_ISREG(st.st_mode) and not status & os.O_PATH:
        try:
            offset = os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            pass
    return Reopen(fd, link, st.st_ino, offset, flags, os.get_inheritable(fd))


def _status_flags(fd: int) -> int:
    import fcntl
    return fcntl.fcntl(fd, fcntl.F_GETFL)


def _under(path: str, tops: tuple[str, ...]) -> bool:
    return any(path == top or path.startswith(top.rstrip("/") + "/") for top in tops)


def _pipe_ends(table: dict[int, tuple[os.stat_result, str]]) -> dict[int, int]:
    """pipe inode -> which of its ends this process holds (1 read, 2 write, 3 both)."""
    ends: dict[int, int] = {}
    for fd, (st, _link) in table.items():
        if stat.S_ISFIFO(st.st_mode):
            access = _status_flags(fd) & os.O_ACCMODE
            end = 3 if access == os.O_RDWR else (1 if access == os.O_RDONLY else 2)
            ends[st.st_ino] = ends.get(st.st_ino, 0) | end
    return ends


def _socket_stays(fd: int, network: str, peer_ino: int | None, own_sockets: dict[int, int]) -> bool | str:
    sock = socket.socket(fileno=fd)
    try:
        family = sock.family
        if family in (socket.AF_INET, socket.AF_INET6):
            return network == "host"  # the test could connect there again itself
        if family != socket.AF_UNIX:
            return False  # netlink (the host's routes, audit, uevents), packet sockets
        peer = _name(sock.getpeername) or _name(sock.getsockname)
        if peer.startswith("/"):
            return True  # reachable by its path anyway
        if peer.startswith("\0"):
            return network == "host"  # abstract names live in the network namespace
        # A pair held here, both ends: renewed, since the pytest process holds them too.
        return "pair" if peer_ino is not None and peer_ino in own_sockets else False
    except OSError:
        return False
    finally:
        sock.detach()


def _name(call: object) -> str:
    try:
        name = call()  # type: ignore[operator]
    except OSError:
        return ""
    return os.fsdecode(name) if isinstance(name, (str, bytes)) else ""


# -- the other end of a Unix socket: sock_diag(7) ------------------------------------------------
_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_UDIAG_SHOW_PEER = 0x4
_UNIX_DIAG_PEER = 2


def _unix_peers(fds: list[int]) -> dict[int, int | None]:
    """For each Unix socket among `fds`, the inode of its peer (None if unconnected or unknown).
    Asked of the kernel in the host's network namespace, where the sockets live."""
    peers: dict[int, int | None] = {}
    candidates = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        try:
            if sock.family == socket.AF_UNIX:
                candidates.append(fd)
                peers[fd] = None
        finally:
            sock.detach()
    if not candidates:
        return peers
    try:
        diag = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    except OSError:
        return peers  # unknown peers: those sockets are closed off
    with diag:
        for seq, fd in enumerate(candidates, 1):
            request = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, os.fstat(fd).st_ino,
                                  _UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
            try:
                diag.send(struct.pack("=IHHII", 16 + len(request), _SOCK_DIAG_BY_FAMILY, 1, seq, 0) + request)
                peers[fd] = _peer_of(diag.recv(8192))
            except OSError as exc:
                if exc.errno not in (errno.ENOENT, errno.EINVAL, errno.EOPNOTSUPP):
                    raise
    return peers


def _peer_of(reply: bytes) -> int | None:
    if len(reply) < 32:
        return None
    _length, kind, _flags, _seq, _pid = struct.unpack_from("=IHHII", reply)
    if kind == _NLMSG_ERROR:
        return None
    offset = 32  # nlmsghdr, then unix_diag_msg (16 bytes); attributes follow
    while offset + 4 <= len(reply):
        size, attribute = struct.unpack_from("=HH", reply, offset)
        if size < 4:
            break
        if attribute == _UNIX_DIAG_PEER and size >= 8:
            return struct.unpack_from("=I", reply, offset + 4)[0]
        offset += (size + 3) & ~3
    return None


# -- what pytest and nsbox hold for themselves ------------------------------------------------------
def _capture_files(config: pytest.Config) -> set[int]:
    """The files pytest captures the test's output in (its own and capfd's): the report reads them."""
    fds = set()
    for capture in _fd_captures(config):
        tmpfile = getattr(capture, "tmpfile", None)
        try:
            fds.add(tmpfile.fileno())  # type: ignore[union-attr]
        except (AttributeError, OSError, ValueError):
            pass
    return fds


def _saved_streams(config: pytest.Config) -> set[int]:
    """Where pytest keeps the streams it captures: the user's terminal, as a rule.  The child's
    capture puts these back on 1 and 2 when the call ends; /dev/null is what it then finds."""
    saved = set()
    for capture in _fd_captures(config):
        fd = getattr(capture, "targetfd_save", None)
        if isinstance(fd, int) and fd > 2:
            saved.add(fd)
    try:
        from _pytest.faulthandler import fault_handler_stderr_fd_key
        saved.add(config.stash[fault_handler_stderr_fd_key])
    except (ImportError, KeyError):
        pass
    return saved


def _fd_captures(config: pytest.Config) -> list[object]:
    capman = config.pluginmanager.getplugin("capturemanager")
    found = []
    multis = [getattr(capman, "_global_capturing", None)]
    fixture = getattr(capman, "_capture_fixture", None)
    multis.append(getattr(fixture, "_capture", None))
    for multi in multis:
        for name in ("in_", "out", "err"):
            capture = getattr(multi, name, None)
            if capture is not None and hasattr(capture, "targetfd_save"):
                found.append(capture)
    return found


def _sandboxes() -> set[int]:
    from ..engine.sandbox import live_descriptors
    return live_descriptors()
