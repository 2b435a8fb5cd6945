"""A sandbox's filesystem as a tarball (`Sandbox.save`), made by the sandbox's own `tar`.

That tar is the sandbox's: its commands may have replaced it.  So what it writes goes through a pipe
to us, and stops at the most the sandbox's filesystem can hold — its lower trees, its writable
tmpfs (data, and a header per inode) — where a file handed to it would let it fill the host's disk.
The tarball itself is untrusted when it is used again: the rootfs store checks it as any archive.

Where it is written may be the sandbox's too (a rw bind), or an isolated test's (the basetemp, for
--nsbox-keep-on-failure): both act as this user, so either can have planted a symlink at the name,
or made a directory on the way a symlink.  So the tarball is made under a fresh name with O_EXCL and
O_NOFOLLOW, in a directory opened once and walked without following such links, and renamed onto
its name by that descriptor: a link at the name is replaced, never written through.  The sandbox
may also swap our file for a link of its own while its tar runs: the name is checked to be our
inode before and after the rename, and what took its place is removed.
"""

from __future__ import annotations

import errno
import os
import select
import stat
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, RootfsError, SandboxSetupError
from .process import PIPE

if TYPE_CHECKING:
    from .sandbox import Sandbox

TAR_TIMEOUT = 300.0
_HEADER = 1024  # a tar header and the padding of its data, at most, per entry
_SLACK = 16 << 20
_CHUNK = 1 << 16
_tree_sizes: dict[str, int] = {}  # cached trees never change once made


def save(box: Sandbox, target: Path) -> Path:
    __tracebackhide__ = True
    assert box.rootfs is not None and box.limits is not None
    if box.rootfs.host:
        raise ConfigError("the 'host' rootfs cannot be saved: it is the host's own tree")
    where = f"cannot save the sandbox's filesystem to {target}"
    if target.name in ("", ".", ".."):
        raise RootfsError(f"{where}: that is a directory, not a file name; name the tarball")
    most = most_bytes([box.rootfs.tree, *box.rootfs.lowers, *(layer.tree for layer in box.layers)],
                      box.limits.tmpfs_size or 0)
    try:
        directory = open_directory(str(target.parent))
    except OSError as exc:
        raise RootfsError(f"{where}: {exc.strerror}") from None
    try:
        _save_into(box, directory, target, most, where)
    finally:
        os.close(directory)
    return target


def _save_into(box: Sandbox, directory: int, target: Path, most: int, where: str) -> None:
    __tracebackhide__ = True
    # Host paths bound in are the host's, not the sandbox's filesystem: left out.
    excluded = ["./proc", "./sys", "./dev", *(f".{m.target.rstrip('/')}" for m in box.settings.mounts)]
    argv = ["tar", "-c", "-f", "-", *(f"--exclude={path}" for path in excluded), "-C", "/", "."]
    try:
        tar = box.spawn(argv, stdout=PIPE, stderr=PIPE, text=False, shell=False,
                        user="root")  # an image's User may not read everything
    except FileNotFoundError:
        raise RootfsError(f"{where}: it has no `tar` to make the tarball with") from None
    partial = None
    try:
        partial, fd = _create(directory)
        with open(fd, "wb") as out:
            written, stderr = _drain(tar, out, most)
            if written > most:
                raise RootfsError(f"{where}: its tar wrote more than {most >> 20} MiB, more than this "
                                  "sandbox's filesystem holds (was /bin/tar replaced inside?)")
            if tar.wait(timeout=TAR_TIMEOUT) != 0:
                text = stderr.decode(errors="replace").strip()[-300:]
                raise RootfsError(f"{where}: tar exited {tar.returncode}: {text}")
            out.flush()
            os.fsync(out.fileno())  # whole on disk before it takes the name: no cut tarball after a crash
            ours = os.fstat(out.fileno())
            # The sandbox may reach the directory: it can have moved our file away and put a link of
            # its own at the temporary name, which the rename would then give the tarball's name.
            if not _is(ours, directory, partial):
                raise RootfsError(f"{where}: {_SWAPPED}")
            try:
                os.rename(partial, target.name, src_dir_fd=directory, dst_dir_fd=directory)
            except OSError as exc:
                raise RootfsError(f"{where}: {target.name} cannot be replaced ({exc.strerror}); "
                                  "remove it or choose another name") from None
            partial = None
            if not _is(ours, directory, target.name):  # swapped between that look and the rename
                _remove(directory, target.name)
                raise RootfsError(f"{where}: {_SWAPPED}")
    except BaseException:
        if tar.poll() is None:
            tar.kill()
        raise
    finally:
        if partial is not None:
            try:
                os.unlink(partial, dir_fd=directory)
            except OSError:
                pass  # the sandbox removed it already: it could reach it
        tar.stdout.close()
        tar.stderr.close()


#: A symlink in a directory this user owns or may write is never followed on the way to a tarball.
_WALK = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # as many as the kernel follows in one path


def _vouches_for_links(directory: int) -> bool:
    """Whether nothing acting as this user can have made a link in `directory` (sudoedit's rule).

    Not writable is not enough: a directory this user owns, the sandbox or an isolated test may
    chmod back and forth (make the link, then take write permission away).  So it must be another
    uid's as well.  Root may write any directory: none vouches for a link then."""
    euid = os.geteuid()
    if euid == 0 or os.fstat(directory).st_uid == euid:
        return False
    return not os.access(".", os.W_OK, dir_fd=directory, effective_ids=True)


def open_directory(path: str) -> int:
    """`path`, a directory, as an O_PATH descriptor, walked one component at a time.

    A sandbox (through a rw bind) and an isolated test (in the basetemp) act as this user, so they
    can have made any symlink in a directory this user owns or may write — owning it, they may
    chmod it read-only after: such a link is refused (ELOOP, naming it).  A link in a directory
    only another uid may change (`/var/lock -> /run/lock`, made by root) is followed, as sudoedit
    does.  For root every directory is writable: it follows none.
    """
    absolute = path.startswith("/")
    pending = [part for part in reversed(path.split("/")) if part not in ("", ".")]
    fd = os.open("/" if absolute else ".", _WALK)
    walked = "" if absolute else "."
    links = 0
    try:
        while pending:
            name = pending.pop()
            here = f"{walked}/{name}"
            if stat.S_ISLNK(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, f"{path} goes through more than {_MAX_LINKS} symlinks", path)
                if not _vouches_for_links(fd):
                    raise OSError(errno.ELOOP, f"{here} is a symlink in a directory this user owns or may "
                                  "write, where a sandbox (a rw bind) or an isolated test (the basetemp) "
                                  "could have made it: it is not followed; give a path without it", path)
                target = os.readlink(name, dir_fd=fd)
                pending.extend(part for part in reversed(target.split("/")) if part not in ("", "."))
                if target.startswith("/"):
                    os.close(fd)
                    fd, walked = os.open("/", _WALK), ""
                continue
            # Not a link when we looked: if it is one now, O_NOFOLLOW|O_DIRECTORY refuses it.
            step = os.open(name, _WALK, dir_fd=fd)
            os.close(fd)
            fd, walked = step, here
        return fd
    except OSError as exc:
        os.close(fd)
        if exc.filename == path:
            raise
        raise OSError(exc.errno, f"{path}: {os.strerror(exc.errno or errno.EIO)}", path) from None
    except BaseException:
        os.close(fd)
        raise


_SWAPPED = ("the sandbox replaced the tarball while it was written (it can write that directory), so "
            "it was not saved; save where the sandbox cannot write")


def _is(ours: os.stat_result, directory: int, name: str) -> bool:
    """Whether `name` in `directory` is still the file `ours` describes (a link there is not)."""
    try:
        there = os.stat(name, dir_fd=directory, follow_symlinks=False)
    except OSError:
        return False
    return (there.st_dev, there.st_ino) == (ours.st_dev, ours.st_ino)


def _remove(directory: int, name: str) -> None:
    """Whatever the sandbox put at `name`, gone, never followed; best effort (it may act again)."""
    try:
        os.unlink(name, dir_fd=directory)
    except IsADirectoryError:
        try:
            os.rmdir(name, dir_fd=directory)
        except OSError:
            pass
    except OSError:
        pass


def _create(directory: int) -> tuple[str, int]:
    """A new file of ours in `directory`, under a name nobody else chose: (name, descriptor)."""
    for _attempt in range(100):
        name = f".nsbox-save-{os.urandom(8).hex()}.part"
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
            return name, os.open(name, flags, 0o666, dir_fd=directory)
        except FileExistsError:
            continue  # (something made that name meanwhile: never ours to open)
    raise RootfsError("cannot make a temporary file for the tarball: every name tried was taken")


def _drain(tar, out, most: int) -> tuple[int, bytes]:
    """Copy tar's stdout to `out` until it ends or more than `most` bytes came (then kill it);
    keep the tail of its stderr.  Both at once, so that neither pipe can stall the other; within
    TAR_TIMEOUT."""
    deadline = time.monotonic() + TAR_TIMEOUT
    written, stderr = 0, b""
    streams = {tar.stdout.fileno(): "out", tar.stderr.fileno(): "err"}
    while streams:
        remaining = deadline - time.monotonic()
        ready = select.select(list(streams), [], [], max(0.0, remaining))[0] if remaining > 0 else []
        if not ready:
            tar.kill()
            raise subprocess.TimeoutExpired(tar.args, TAR_TIMEOUT)
        for fd in ready:
            data = os.read(fd, _CHUNK)
            if not data:
                del streams[fd]
            elif streams[fd] == "err":
                stderr = (stderr + data)[-4096:]
            else:
                written += len(data)
                if written > most:
                    tar.kill()
                    return written, stderr
                out.write(data)
    return written, stderr


def most_bytes(trees: list[Path], tmpfs_size: int) -> int:
    """The largest tarball a sandbox over `trees` with this writable tmpfs can make."""
    inodes = max(4096, tmpfs_size // 4096)  # as layout.build mounts it
    return sum(_tree_bytes(tree) for tree in trees) + tmpfs_size + inodes * _HEADER + _SLACK


def _tree_bytes(tree: Path) -> int:
    """Bytes of a tree's files plus a header per entry; a walk with a stack, never recursion."""
    key = str(tree)
    if key not in _tree_sizes:
        total, stack = 0, [key]
        try:
            while stack:
                with os.scandir(stack.pop()) as entries:
                    for entry in entries:
                        total += _HEADER
                        if entry.is_dir(follow_symlinks=False):
                            stack.append(entry.path)
                        elif entry.is_file(follow_symlinks=False):
                            total += entry.stat(follow_symlinks=False).st_size
        except PermissionError:
            # A layer whose directories the image's other users own (many ids): the size the
            # store counted it at when it extracted it, which is never less.
            from ..rootfs.store import recorded_size
            recorded = recorded_size(tree)
            if recorded is None:
                raise SandboxSetupError(f"cannot size {tree} to save it: a directory in it is not readable, "
                                        "and it is no entry of a rootfs cache, which records its size") from None
            total = recorded
        _tree_sizes[key] = total
    return _tree_sizes[key]
