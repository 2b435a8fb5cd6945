"""Safe extraction of rootfs archives, written for hostile input.

Members are checked before anything is written: absolute paths, `..` components, symlinks that
climb out of the tree, hard links to outside it, device nodes and FIFOs are refused.  Writing walks
the tree with directory descriptors and O_NOFOLLOW, so even a symlink planted by an earlier member
is never followed on the host.  Absolute symlinks are kept: inside the sandbox they resolve against
the sandbox's root (Alpine's `bin/sh -> /bin/busybox`), which Python 3.14's tarfile `data` filter
would refuse.  Files are owned by the calling user; setuid and setgid bits are dropped.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
from pathlib import Path, PurePosixPath

from .errors import RootfsError, UnsafeArchiveError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def extract(archive: Path, dest: Path) -> None:
    """Extract `archive` into the empty directory `dest`, never following a link on the host."""
    root_fd = os.open(dest, _O_DIR)
    dir_modes: list[tuple[tuple[str, ...], int]] = []
    try:
        with tarfile.open(archive) as tar:
            for member in tar:
                parts = member_parts(member.name)
                if not parts:
                    continue
                _check_member(member, parts)
                _extract_member(tar, member, parts, root_fd, dir_modes)
        # Directories get their real modes last, so that a read-only one could still be filled.
        for parts, mode in reversed(dir_modes):
            fd = _walk(root_fd, parts, member="/".join(parts))
            try:
                os.chmod(fd, mode)
            finally:
                os.close(fd)
    except tarfile.TarError as exc:
        raise RootfsError(f"{archive} is not a readable tarball: {exc}") from None
    finally:
        os.close(root_fd)


def member_parts(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {name!r} has a '..' component")
    return parts


def _check_member(member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
    if member.isdev() or member.isfifo():
        raise UnsafeArchiveError(f"archive member {member.name!r} is a device node or FIFO")
    if member.issym():
        target = member.linkname
        # An absolute target is resolved inside the sandbox's root, so it stays in the tree;
        # a relative one must not climb above the tree's root from where the link stands.
        if not target.startswith("/") and _escapes(parts[:-1], target):
            raise UnsafeArchiveError(f"archive member {member.name!r} is a symlink that escapes the "
                                     f"tree ({member.name} -> {target})")
    elif member.islnk():
        member_parts(member.linkname)
    elif not (member.isfile() or member.isdir()):
        raise UnsafeArchiveError(f"archive member {member.name!r} has an unsupported type")


def _escapes(base: tuple[str, ...], target: str) -> bool:
    depth = len(base)
    for part in PurePosixPath(target).parts:
        if part == "..":
            depth -= 1
            if depth < 0:
                return True
        elif part not in ("", "."):
            depth += 1
    return False


def _walk(root_fd: int, parts: tuple[str, ...], member: str, create: bool = False) -> int:
    """Open the directory `parts` below root_fd, refusing any symlink on the way.

    With `create`, missing directories are made (archives need not list every parent).
    """
    fd = os.dup(root_fd)
    for part in parts:
        try:
            if create:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
            nxt = os.open(part, _O_DIR, dir_fd=fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (40, 20):  # ELOOP, ENOTDIR: a symlink or a file stands in the way
                raise UnsafeArchiveError(
                    f"archive member {member!r} would be written through {part!r}, which is not "
                    "a directory in the tree (a symlink?)") from None
            raise
        os.close(fd)
        fd = nxt
    return fd


def _extract_member(tar: tarfile.TarFile, member: tarfile.TarInfo, parts: tuple[str, ...],
                    root_fd: int, dir_modes: list[tuple[tuple[str, ...], int]]) -> None:
    parent = _walk(root_fd, parts[:-1], member.name, create=True)
    name = parts[-1]
    try:
        if member.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise UnsafeArchiveError(f"archive member {member.name!r} replaces a non-directory")
            dir_modes.append((parts, member.mode & 0o1777 | 0o700))
            return
        _unlink_existing(name, parent)
        if member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            src_parts = member_parts(member.linkname)
            src_parent = _walk(root_fd, src_parts[:-1], member.name)
            try:
                os.link(src_parts[-1], name, src_dir_fd=src_parent, dst_dir_fd=parent,
                        follow_symlinks=False)
            finally:
                os.close(src_parent)
        else:
            # setuid/setgid bits are dropped: the tree is owned by the calling user on the host.
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         member.mode & 0o777, dir_fd=parent)
            with os.fdopen(fd, "wb") as out:
                source = tar.extractfile(member)
                assert source is not None
                shutil.copyfileobj(source, out, 1 << 20)
                os.chmod(out.fileno(), member.mode & 0o777)
        if not member.islnk():
            os.utime(name, ns=(member.mtime * 10**9, member.mtime * 10**9), dir_fd=parent,
                     follow_symlinks=False)
    finally:
        os.close(parent)


def _unlink_existing(name: str, parent: int) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeArchiveError(f"archive member {name!r} would replace a directory")
    os.unlink(name, dir_fd=parent)
