"""A sandbox's filesystem as a tarball (`Sandbox.save`), made by the sandbox's own `tar`.

That tar is the sandbox's: its commands may have replaced it.  So what it writes goes through a pipe
to us, and stops at the most the sandbox's filesystem can hold — its lower trees, its writable
tmpfs (data, and a header per inode) — where a file handed to it would let it fill the host's disk.
The tarball itself is untrusted when it is used again: the rootfs store checks it as any archive.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import ConfigError, RootfsError
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
    most = most_bytes([box.rootfs.tree, *(layer.tree for layer in box.layers)], box.limits.tmpfs_size or 0)
    # Host paths bound in are the host's, not the sandbox's filesystem: left out.
    excluded = ["./proc", "./sys", "./dev", *(f".{m.target.rstrip('/')}" for m in box.settings.mounts)]
    argv = ["tar", "-c", "-f", "-", *(f"--exclude={path}" for path in excluded), "-C", "/", "."]
    try:
        tar = box.spawn(argv, stdout=PIPE, stderr=PIPE, text=False, shell=False)
    except FileNotFoundError:
        raise RootfsError(f"cannot save the sandbox's filesystem to {target}: it has no `tar` "
                          "to make the tarball with") from None
    try:
        with open(target, "wb") as out:
            written, stderr = _drain(tar, out, most)
        if written > most:
            raise RootfsError(f"cannot save the sandbox's filesystem to {target}: its tar wrote more "
                              f"than {most >> 20} MiB, more than this sandbox's filesystem holds "
                              "(was /bin/tar replaced inside?)")
        if tar.wait(timeout=TAR_TIMEOUT) != 0:
            text = stderr.decode(errors="replace").strip()[-300:]
            raise RootfsError(f"cannot save the sandbox's filesystem to {target}: tar exited "
                              f"{tar.returncode}: {text}")
    except BaseException:
        if tar.poll() is None:
            tar.kill()
        target.unlink(missing_ok=True)
        raise
    finally:
        tar.stdout.close()
        tar.stderr.close()
    return target


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
        while stack:
            with os.scandir(stack.pop()) as entries:
                for entry in entries:
                    total += _HEADER
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
                    elif entry.is_file(follow_symlinks=False):
                        total += entry.stat(follow_symlinks=False).st_size
        _tree_sizes[key] = total
    return _tree_sizes[key]
