"""The rootfs store: turn a rootfs spec into a read-only tree on the host, extracting it once.

A tree in the store is only ever used as an overlay lower layer, so sandboxes never change it.
Archives are extracted by the calling user (files owned by an unmapped uid could not be changed
through the overlay) with our own member checks: Alpine's busybox links are absolute symlinks that
are legitimate inside the tree, which Python 3.14's `data` filter would refuse.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import sys
import tarfile
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from filelock import FileLock

from .errors import RootfsError, UnsafeArchiveError

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True)
class Rootfs:
    """A resolved rootfs: the tree to use as the lower layer, and where it came from."""

    spec: str
    tree: Path
    digest: str | None = None


def default_cache_dir() -> Path:
    env = os.environ.get("NSBOX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pytest-nsbox"


_resolved: dict[tuple[str, str, int, int, int], Rootfs] = {}
_resolved_lock = threading.Lock()


def resolve(spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Rootfs:
    """A local directory is used as it is; a local tarball is extracted into the cache once."""
    path = Path(os.path.abspath(os.path.expanduser(os.fspath(spec))))
    if path.is_dir():
        return Rootfs(str(spec), path)
    if not path.is_file():
        raise RootfsError(
            f"rootfs {os.fspath(spec)!r} is neither a directory nor a tarball that exists "
            f"(looked at {path}); pass --nsbox-rootfs=PATH to an Alpine minirootfs tarball or tree")
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise RootfsError(f"rootfs {path} is not a directory or a tarball ({', '.join(ARCHIVE_SUFFIXES)})")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    st = path.stat()
    key = (str(path), str(cache), st.st_size, st.st_mtime_ns, st.st_ino)
    with _resolved_lock:
        found = _resolved.get(key)
    if found is None:
        found = _extract_cached(path, cache, str(spec))
        with _resolved_lock:
            _resolved[key] = found
    return found


def _extract_cached(archive: Path, cache: Path, spec: str) -> Rootfs:
    digest = file_sha256(archive)
    trees = cache / "trees"
    tree = trees / f"sha256-{digest}"
    if tree.is_dir():
        return Rootfs(spec, tree, digest)
    try:
        trees.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RootfsError(f"cannot create the rootfs cache {trees}: {exc.strerror}; "
                          "choose another with --nsbox-cache-dir or NSBOX_CACHE_DIR") from None
    with FileLock(str(tree) + ".lock"):
        if tree.is_dir():
            return Rootfs(spec, tree, digest)
        # A process killed mid-extraction leaves its temp dir behind; we hold the lock, so any
        # temp dir of this entry is stale.
        for stale in trees.glob(f"{tree.name}.tmp-*"):
            remove_tree(stale)
        staging = trees / f"{tree.name}.tmp-{os.getpid()}"
        staging.mkdir()
        try:
            extract(archive, staging)
            os.rename(staging, tree)
        except BaseException:
            remove_tree(staging)
            raise
    return Rootfs(spec, tree, digest)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest() if hasattr(hashlib, "file_digest") \
            else _sha256_stream(f)


def _sha256_stream(f) -> str:  # Python 3.10
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only directories, which Alpine's tree has."""
    def make_writable_and_retry(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o700)
        func(p)
    if not (path.exists() or path.is_symlink()):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


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
