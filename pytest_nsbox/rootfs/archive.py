"""Safe extraction of rootfs archives, written for hostile input.

An archive is read twice. The first pass reads headers only: absolute paths, `..` components,
symlinks that climb out of the tree, hard links to outside it, device nodes and FIFOs are refused,
and so is an archive bomb — more members, more bytes (a sparse member counts at its real size) or
deeper paths than `Limits` allow — all before anything is written. The second pass writes, walking
the tree with directory descriptors and O_NOFOLLOW, so even a symlink planted by an earlier member
is never followed on the host. Absolute symlinks are kept: inside the sandbox they resolve against
the sandbox's root (Alpine's `bin/sh -> /bin/busybox`), which Python 3.14's tarfile `data` filter
would refuse. Files are owned by the calling user; setuid and setgid bits are dropped.

Modes are kept as the archive has them (Alpine's /tmp and /var/tmp are 1777, which a non-root user
inside the sandbox relies on; overlayfs copy-up keeps the lower layer's mode), except the tree's own
root, which never gets group or other write: the tree lives in the cache's private `trees/`
directory, which no other user can enter, so its modes are only ever seen inside sandboxes.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from ..errors import ArchiveLimitError, ConfigError, RootfsError, UnsafeArchiveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import tarfile

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class Limits(NamedTuple):  # a NamedTuple costs a tenth of a dataclass to define, at every import
    """How much one archive may extract to; raised with NSBOX_ROOTFS_MAX_BYTES/_MEMBERS/_DEPTH.

    Alpine's minirootfs is 8 MB in ~520 members, 6 directories deep. The defaults leave room for
    custom root filesystems of a few GB (a full Debian or Fedora with compilers is 1-3 GB in
    100-200k files), while a bomb stops at a size a CI machine's disk survives; no real tree is
    256 directories deep (PATH_MAX, 4096 bytes, allows ~2000).
    """

    max_bytes: int = 4 << 30
    max_members: int = 500_000
    max_depth: int = 256

    @classmethod
    def from_env(cls) -> Limits:
        defaults = cls()
        return cls(max_bytes=_env_limit("NSBOX_ROOTFS_MAX_BYTES", defaults.max_bytes, units=True),
                   max_members=_env_limit("NSBOX_ROOTFS_MAX_MEMBERS", defaults.max_members),
                   max_depth=_env_limit("NSBOX_ROOTFS_MAX_DEPTH", defaults.max_depth))


def _env_limit(name: str, default: int, units: bool = False) -> int:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    match = re.fullmatch(r"(\d+)\s*([KMGT]?)(?:I?B)?" if units else r"(\d+)()", raw.upper())
    value = int(match[1]) * _UNITS[match[2]] if match else 0
    if value <= 0:
        what = "a positive number of bytes, optionally with K, M, G or T (e.g. 8G)" if units \
            else "a positive whole number"
        raise ConfigError(f"{name}={raw!r} is not allowed: it takes {what}; unset it for the default "
                          f"({human_size(default) if units else default})")
    return value


def human_size(n: int) -> str:
    for unit, size in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size} {unit}"
    return f"{n} bytes"


def extract(archive: Path, dest: Path, source: str | None = None, limits: Limits | None = None) -> int:
    """Extract `archive` into the empty directory `dest`, never following a link on the host.

    `source` is how errors name the archive (the user's path or URL, not a temp file's name).
    Returns the bytes of file data written.
    """
    import tarfile
    source = source or str(archive)
    limits = limits or Limits.from_env()
    try:
        total = _survey(archive, source, limits)
        _write(archive, dest)
    except ArchiveLimitError:
        raise
    except UnsafeArchiveError as exc:
        raise UnsafeArchiveError(f"{source}: {exc}; refusing to use it as a rootfs") from None
    except (tarfile.TarError, EOFError) as exc:
        raise RootfsError(f"{source} is not a readable tarball: {exc}") from None
    return total


def _survey(archive: Path, source: str, limits: Limits) -> int:
    """Check every header against the rules and the limits; returns the bytes of file data."""
    import tarfile
    members = total = 0
    with tarfile.open(archive, "r|*") as tar:
        for member in tar:
            tar.members = []  # a survey keeps no list: a million headers would not fit in memory
            members += 1
            if members > limits.max_members:
                raise ArchiveLimitError(
                    f"{source} has more than {limits.max_members} members; if it is a genuine root "
                    f"filesystem, raise the limit: NSBOX_ROOTFS_MAX_MEMBERS={limits.max_members * 2}")
            parts = member_parts(member.name)
            deepest = max(len(parts), len(member_parts(member.linkname)) if member.islnk() else 0)
            if deepest > limits.max_depth:
                raise ArchiveLimitError(
                    f"{source}: member {_shown(member.name)} is deeper than {limits.max_depth} "
                    f"directories; if it is a genuine root filesystem, raise the limit: "
                    f"NSBOX_ROOTFS_MAX_DEPTH={max(deepest, limits.max_depth * 2)}")
            if parts:
                _check_member(member, parts)
            if member.isfile():  # sparse members included, at their real size; links take none
                total += member.size
                if total > limits.max_bytes:
                    raise ArchiveLimitError(
                        f"{source} holds more than {human_size(limits.max_bytes)} once extracted (member "
                        f"{_shown(member.name)} brings it to {total} bytes); if it is a genuine root "
                        f"filesystem, raise the limit: NSBOX_ROOTFS_MAX_BYTES={_next_limit(total)}")
    return total


def _next_limit(total: int) -> str:
    gib = 1 << 30
    return f"{(total + gib - 1) // gib}G"


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 100 else repr(f"{name[:60]}...{name[-30:]}")


def _write(archive: Path, dest: Path) -> None:
    import tarfile
    root_fd = os.open(dest, _O_DIR)
    root_mode = 0o755
    dir_modes: list[tuple[tuple[str, ...], int]] = []
    try:
        with tarfile.open(archive, "r|*") as tar:
            for member in tar:
                tar.members = []
                parts = member_parts(member.name)
                if not parts:
                    if member.isdir():
                        root_mode = member.mode & 0o755
                    continue
                _extract_member(tar, member, parts, root_fd, dir_modes)
        # Directories get their real modes last, so that a read-only one could still be filled.
        for parts, mode in reversed(dir_modes):
            fd = _walk(root_fd, parts, member="/".join(parts))
            try:
                os.chmod(fd, mode)
            finally:
                os.close(fd)
        os.chmod(root_fd, root_mode)
    finally:
        os.close(root_fd)


def member_parts(name: str) -> tuple[str, ...]:
    path = PurePosixPath(name)
    if path.is_absolute():
        raise UnsafeArchiveError(f"archive member {_shown(name)} has an absolute path")
    parts = tuple(p for p in path.parts if p not in ("", "."))
    if ".." in parts:
        raise UnsafeArchiveError(f"archive member {_shown(name)} has a '..' component")
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
            _write_file(tar, member, name, parent)
        if not member.islnk():
            mtime = int(member.mtime * 10**9)  # a float in PAX archives (Python's tarfile makes them)
            os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, parent: int) -> None:
    # setuid/setgid bits are dropped: the tree is owned by the calling user on the host.
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 member.mode & 0o777, dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        source = tar.extractfile(member)
        assert source is not None
        while block := source.read(1 << 20):
            out.write(block)
        os.chmod(out.fileno(), member.mode & 0o777)


def _unlink_existing(name: str, parent: int) -> None:
    try:
        st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        raise UnsafeArchiveError(f"archive member {name!r} would replace a directory")
    os.unlink(name, dir_fd=parent)
