"""Safe extraction of rootfs archives, written for hostile input.

An archive is read twice. The first pass reads headers only: absolute paths, `..` components,
symlinks that leave the tree, hard links to outside it, device nodes and FIFOs are refused, and so
is an archive bomb — more members, more bytes or deeper paths than `Limits` allow — all before
anything is written. Bytes are counted as the disk and the memory pay them: every header byte
(GNU long names and link names, pax headers, sparse maps), and for every entry, whatever its type,
at least one 4 KiB block plus its data rounded up to blocks (a sparse member at its real size);
directories the archive does not list but its members need count too. The decompressed stream
itself is bounded (`_Reader`): tarfile reads a member's extended headers with one read(size)
before it yields the member, so a read that would pass the limits is refused before it allocates.

A relative symlink is resolved as the host would resolve it, through the links already in the tree,
component by component, and refused if it climbs above the tree's root (`a/l2 -> ..` makes
`a/l2/..` the tree's parent on the host, though it is `a` lexically); only the archive's final
state counts, so a link replaced later, or copied by a hard link, is checked where it ends up.
Absolute symlinks are kept: inside the sandbox they resolve against the sandbox's root (Alpine's
`bin/sh -> /bin/busybox`), which Python 3.14's tarfile `data` filter would refuse. On the host they
point outside the tree by nature, so no host-side code follows any link inside a tree: the second
pass writes by walking directory descriptors with O_NOFOLLOW (a member that would be written
through a symlink is refused, in the first pass already), the /bin/sh check resolves links against
the tree's root, and removal and Sandbox.save's sizing never follow one. Files are owned by the
calling user — or, with `owners` (inside a user namespace that maps that many ids: mapped.py), by
the ids the archive names, which must all be below `owners`; setuid and setgid bits are dropped.

An image layer (`oci=True`) is extracted as overlayfs lays layers: `.wh.NAME` becomes a whiteout
(a 0/0 character device, which the kernel lets anyone make) hiding NAME in the layers below, and
`.wh..wh..opq` marks its directory opaque (`user.overlay.opaque`, as overlayfs reads it in a user
namespace); device nodes and FIFOs are skipped (the sandbox's /dev is its own), not refused.

Modes are kept as the archive has them (Alpine's /tmp and /var/tmp are 1777, which a non-root user
inside the sandbox relies on; overlayfs copy-up keeps the lower layer's mode), except the tree's own
root, which never gets group or other write: the tree lives in the cache's private `trees/`
directory, which no other user can enter, so its modes are only ever seen inside sandboxes.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple

from ..errors import ArchiveLimitError, ConfigError, RootfsError, UnsafeArchiveError

TYPE_CHECKING = False
if TYPE_CHECKING:
    import tarfile
    from collections.abc import Iterator

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
#: What an entry costs on disk at the least: a directory's block (an inode and a directory entry
#: for the rest, counted alike so that no type of entry is free).
BLOCK = 4096
#: The most one member's headers may take: a name is at most max_depth components of 255 bytes
#: (65 KiB), and pax records, xattrs included, sparse maps of thousands of holes are far below it.
MAX_HEADERS = 1 << 20
_CHUNK = 1 << 18  # file data is copied, and skipped, in pieces this big
_MAX_SYMLINKS = 40  # as the kernel's path walk
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


WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"


def extract(archive: Path, dest: Path, source: str | None = None, limits: Limits | None = None,
            oci: bool = False, owners: int = 0) -> int:
    """Extract `archive` into the empty directory `dest`, never following a link on the host;
    with `oci`, as an image layer (whiteouts, opaque directories: see above).

    `source` is how errors name the archive (the user's path or URL, not a temp file's name).
    Returns the bytes it was counted at against `limits.max_bytes`: about what it takes on disk.
    """
    import tarfile
    source = source or str(archive)
    limits = limits or Limits.from_env()
    try:
        total = _survey(archive, source, limits, oci)
        _write(archive, dest, source, limits, oci, owners)
    except ArchiveLimitError:
        raise
    except UnsafeArchiveError as exc:
        raise UnsafeArchiveError(f"{source}: {exc}; refusing to use it as a rootfs") from None
    except RecursionError:
        # tarfile reads a chain of extended headers by calling itself once a header.
        raise UnsafeArchiveError(f"{source}: a member comes after a chain of hundreds of extended headers "
                                 "(GNU long names or pax headers), which no real archive has; refusing to "
                                 "use it as a rootfs") from None
    except (tarfile.TarError, EOFError, ValueError) as exc:
        # ValueError: tarfile's parsing of a malformed pax record or sparse map.
        raise RootfsError(f"{source} is not a readable tarball: {exc}") from None
    return total


class _Reader:
    """The decompressed archive, for tarfile: read forward only, and never past the limits.

    tarfile reads a member's extended headers (GNU long names, pax headers, sparse maps) with
    fileobj.read() before it yields the member, so this is the only place where they can be
    counted before they are in memory: a read that would make one member's headers pass
    MAX_HEADERS, or the whole stream pass `most`, is refused before anything is read. A member's
    headers are what is read since the last seek (tarfile seeks over data, and before each read of
    it) or the last `headers()`.
    """

    def __init__(self, archive: Path, source: str, limits: Limits):
        self.file = open(archive, "rb")  # noqa: SIM115 - closed by close()
        self.stream = _decompressor(self.file)
        self.source, self.limits = source, limits
        self.most = limits.max_bytes + MAX_HEADERS  # the end-of-archive blocks, at least, are not charged
        self.position = self.headers_from = 0

    def read(self, size: int = -1) -> bytes:
        import tarfile
        if size < 0:
            raise tarfile.ReadError("a read of the whole archive")  # tarfile never asks for one
        if self.position + size - self.headers_from > MAX_HEADERS:
            raise ArchiveLimitError(
                f"{self.source}: a member's headers take more than {human_size(MAX_HEADERS)} (from byte "
                f"{self.headers_from} of the archive on), which no real root filesystem needs: a GNU long "
                "name, long link name, pax header or sparse map that large is an archive bomb; refusing "
                "to use it as a rootfs")
        self._charge(self.position + size)
        data = self._read(size)
        self.position += len(data)
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        import tarfile
        if whence != 0 or offset < self.position:
            raise tarfile.ReadError(f"members out of order at byte {self.position}")
        self._charge(offset)
        while self.position < offset:
            skipped = len(self._read(min(_CHUNK, offset - self.position)))
            if not skipped:
                break  # tarfile's next read says the data ended early
            self.position += skipped
        self.headers_from = self.position
        return self.position

    def headers(self) -> int:
        """The bytes of headers read since the last call: the member just yielded's."""
        taken, self.headers_from = self.position - self.headers_from, self.position
        return taken

    def tell(self) -> int:
        return self.position

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        try:
            self.stream.close()
        finally:
            self.file.close()

    def _charge(self, end: int) -> None:
        if end > self.most:
            raise ArchiveLimitError(
                f"{self.source} holds more than {human_size(self.limits.max_bytes)} once extracted (its "
                f"decompressed stream passes {self.most} bytes); if it is a genuine root filesystem, raise "
                f"the limit: NSBOX_ROOTFS_MAX_BYTES={_next_limit(end)}")

    def _read(self, size: int) -> bytes:
        import lzma
        import tarfile
        import zlib
        try:
            return self.stream.read(size)
        except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
            raise tarfile.ReadError(f"cannot decompress it: {exc}") from None


def _decompressor(file):  # -> a binary file object
    """`file` decompressed as its first bytes say (tarfile's own test), or as it is."""
    magic = file.read(10)
    file.seek(0)
    if magic.startswith(b"\x1f\x8b\x08"):
        import gzip
        return gzip.GzipFile(fileobj=file, mode="rb")
    if magic[:3] == b"BZh" and magic[4:10] == b"1AY&SY":
        import bz2
        return bz2.BZ2File(file)
    if magic.startswith((b"\x5d\x00\x00\x80", b"\xfd7zXZ")):
        import lzma
        return lzma.LZMAFile(file)
    return file


@contextmanager
def _members(archive: Path, source: str, limits: Limits) -> Iterator[tuple[tarfile.TarFile, _Reader]]:
    import tarfile
    reader = _Reader(archive, source, limits)
    try:
        with tarfile.open(fileobj=reader, mode="r:") as tar:  # type: ignore[call-overload]
            yield tar, reader
    finally:
        reader.close()


def _survey(archive: Path, source: str, limits: Limits, oci: bool = False) -> int:
    """Check every header against the rules and the limits; returns the bytes counted."""
    members = total = 0
    links = _Links()
    made: tuple[str, ...] = ()  # directories known to exist: the last member's, and their parents
    with _members(archive, source, limits) as (tar, reader):
        for member in tar:
            tar.members = []  # a survey keeps no list: a million headers would not fit in memory
            headers = reader.headers()
            members += 1
            if members > limits.max_members:
                raise ArchiveLimitError(
                    f"{source} has more than {limits.max_members} members; if it is a genuine root "
                    f"filesystem, raise the limit: NSBOX_ROOTFS_MAX_MEMBERS={limits.max_members * 2}")
            _check_globals(tar, source)
            parts = member_parts(member.name)
            deepest = max(len(parts), _depth(member.linkname) if member.islnk() or member.issym() else 0)
            if deepest > limits.max_depth:
                raise ArchiveLimitError(
                    f"{source}: member {_shown(member.name)} is deeper than {limits.max_depth} "
                    f"directories; if it is a genuine root filesystem, raise the limit: "
                    f"NSBOX_ROOTFS_MAX_DEPTH={max(deepest, limits.max_depth * 2)}")
            if parts and oci and _layer_only(member, parts):
                pass  # a whiteout or a skipped node: nothing a link could reach
            elif parts:
                _check_member(member, parts)
                links.add(member, parts)
            # A sparse member counts at its real size; the parents it needs that no member made, a
            # block each (those of the member before are there: tar lists a tree depth first).
            parents = parts[:-1]
            total += headers + _blocks(member.size if member.isfile() else 0) + _new_parents(made, parents)
            made = parts if member.isdir() else parents
            if total > limits.max_bytes:
                raise ArchiveLimitError(
                    f"{source} holds more than {human_size(limits.max_bytes)} once extracted (member "
                    f"{_shown(member.name)} brings it to {total} bytes, headers and a {BLOCK // 1024} KiB block "
                    f"an entry included); if it is a genuine root filesystem, raise the limit: "
                    f"NSBOX_ROOTFS_MAX_BYTES={_next_limit(total)}")
    links.check()
    return total


def _new_parents(made: tuple[str, ...], parents: tuple[str, ...]) -> int:
    """What the directories of `parents` below those it shares with `made` cost, made on the way."""
    shared = 0
    for have, need in zip(made, parents):
        if have != need:
            break
        shared += 1
    return (len(parents) - shared) * BLOCK


def _blocks(size: int) -> int:
    return max(BLOCK, -(-size // BLOCK) * BLOCK)


def _depth(path: str) -> int:
    return len(PurePosixPath(path).parts)


def _check_globals(tar: tarfile.TarFile, source: str) -> None:
    """pax global headers accumulate for the rest of the archive: together, one member's worth."""
    if tar.pax_headers and (len(tar.pax_headers) > 64 or sum(
            len(k) + len(v) for k, v in tar.pax_headers.items()) > MAX_HEADERS):
        raise ArchiveLimitError(f"{source}: its pax global headers take more than {human_size(MAX_HEADERS)} "
                                "or 64 records, which no real root filesystem needs; refusing to use it as a rootfs")


def _next_limit(total: int) -> str:
    gib = 1 << 30
    return f"{(total + gib - 1) // gib}G"


def _shown(name: str) -> str:
    return repr(name) if len(name) <= 100 else repr(f"{name[:60]}...{name[-30:]}")


def _layer_only(member: tarfile.TarInfo, parts: tuple[str, ...]) -> bool:
    """Whether an image layer's member is one of its own kinds (a whiteout, the opaque marker) or
    one it skips (a device node, a FIFO); a whiteout must name an entry, and hide only it."""
    name = parts[-1]
    if member.isdev() or member.isfifo():
        return True
    if not name.startswith(WHITEOUT):
        return False
    hidden = name[len(WHITEOUT):]
    if name != OPAQUE and (not hidden or hidden in (".", "..") or hidden.startswith(WHITEOUT)):
        if hidden.startswith(".wh."):
            return True  # aufs's own bookkeeping (.wh..wh.plnk, ...): no meaning to overlayfs
        raise UnsafeArchiveError(f"archive member {_shown(member.name)} is a whiteout of nothing")
    return True


def _write_layer_only(member: tarfile.TarInfo, parts: tuple[str, ...], root_fd: int) -> None:
    name = parts[-1]
    if member.isdev() or member.isfifo() or (name.startswith(WHITEOUT + WHITEOUT) and name != OPAQUE):
        return
    parent = _walk(root_fd, parts[:-1], member.name, create=True)
    try:
        if name == OPAQUE:
            os.setxattr(parent, "user.overlay.opaque", b"y")
            return
        hidden = name[len(WHITEOUT):]
        _unlink_existing(hidden, parent)
        os.mknod(hidden, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=parent)
    finally:
        os.close(parent)


def _write(archive: Path, dest: Path, source: str, limits: Limits, oci: bool = False, owners: int = 0) -> None:
    root_fd = os.open(dest, _O_DIR)
    root_mode = 0o755
    dir_modes: list[tuple[tuple[str, ...], int]] = []
    try:
        with _members(archive, source, limits) as (tar, reader):
            for member in tar:
                tar.members = []
                reader.headers()  # the same bounds as in the survey, should the file have changed since
                parts = member_parts(member.name)
                if not parts:
                    if member.isdir():
                        root_mode = member.mode & 0o755
                    continue
                if oci and _layer_only(member, parts):
                    _write_layer_only(member, parts, root_fd)
                    continue
                _extract_member(tar, member, parts, root_fd, dir_modes, owners)
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
    if member.islnk():
        member_parts(member.linkname)
    elif not (member.isfile() or member.isdir() or member.issym()):
        raise UnsafeArchiveError(f"archive member {member.name!r} has an unsupported type")


_ESCAPES, _ABSOLUTE, _LOOP, _BUSY = "escapes", "absolute", "loop", "busy"


class _Node:
    """A name in the tree being extracted: a symlink (`target`), or a directory above one."""

    __slots__ = ("parent", "children", "target", "resolved")

    def __init__(self, parent: _Node | None):
        self.parent = parent
        self.children: dict[str, _Node] | None = None
        self.target: str | None = None
        self.resolved: object = None  # where the link leads: (node, depth below it), or a sentinel

    def child(self, name: str) -> _Node | None:
        return self.children.get(name) if self.children else None


class _Links:
    """The symlinks of the archive, as its members leave them in the tree, kept to resolve the
    relative ones as the host would once all are in place.

    Only links and the directories above them are kept, so memory grows with the links (each
    counted against max_bytes), not with the files. The survey refuses here what the write pass
    would refuse later anyway, a member written through a symlink, so that the tree is exactly
    what this keeps: links below real directories only.
    """

    def __init__(self) -> None:
        self.root = _Node(None)
        self.kept: list[tuple[str, _Node]] = []

    def add(self, member: tarfile.TarInfo, parts: tuple[str, ...]) -> None:
        node = self._find(parts, member.name)
        if member.isdir():
            if node is not None and node.target is not None:
                raise UnsafeArchiveError(f"archive member {_shown(member.name)} replaces a non-directory")
            return
        if node is not None and node.children:
            raise UnsafeArchiveError(f"archive member {_shown(member.name)} would replace a directory")
        target = member.linkname if member.issym() else None
        if member.islnk():
            source = self._find(member_parts(member.linkname), member.name)
            target = source.target if source is not None else None  # a hard link to a symlink is one
        if target is None:
            if node is not None:
                node.target = node.resolved = None
            return
        if node is None:
            node = self._make(parts)
        if node.target is None:
            self.kept.append((member.name, node))
        node.target, node.resolved = target, None

    def check(self) -> None:
        for name, node in self.kept:
            if node.target is not None and self._resolve(node, 0) is _ESCAPES:
                raise UnsafeArchiveError(
                    f"archive member {_shown(name)} is a symlink that leaves the tree on the host "
                    f"({_shown(name)} -> {_shown(node.target)}, following the archive's other links, '..' "
                    "goes above the tree's root)")

    def _find(self, parts: tuple[str, ...], name: str) -> _Node | None:
        """The node of `parts`, if one is kept; refuses a path through a symlink."""
        node = self.root
        for depth, part in enumerate(parts):
            nxt = node.child(part)
            if nxt is None:
                return None
            if nxt.target is not None and depth < len(parts) - 1:
                raise UnsafeArchiveError(f"archive member {_shown(name)} would be written through "
                                         f"{_shown('/'.join(parts[:depth + 1]))}, a symlink in the tree")
            node = nxt
        return node

    def _make(self, parts: tuple[str, ...]) -> _Node:
        node = self.root
        for part in parts:
            nxt = node.child(part)
            if nxt is None:
                nxt = _Node(node)
                if node.children is None:
                    node.children = {}
                node.children[part] = nxt
            node = nxt
        return node

    def _resolve(self, link: _Node, hops: int) -> object:
        """Where `link` leads on the host: (node, depth below it), or _ESCAPES, _ABSOLUTE, _LOOP."""
        if link.resolved is _BUSY or hops > _MAX_SYMLINKS:
            return _LOOP  # the kernel gives up too: ELOOP
        if link.resolved is not None:
            return link.resolved
        link.resolved = _BUSY
        assert link.target is not None and link.parent is not None
        where = self._walk(link.parent, link.target, hops)
        link.resolved = None if where is _LOOP else where  # a loop found from here may not be one from elsewhere
        return where

    def _walk(self, node: _Node, target: str, hops: int) -> object:
        if target.startswith("/"):
            return _ABSOLUTE  # out of the tree on the host as every absolute link is; inside, at its root
        below = 0  # components under `node` that no link lives under: lexical from there
        for part in PurePosixPath(target).parts:
            if part == "..":
                if below:
                    below -= 1
                elif node.parent is None:
                    return _ESCAPES
                else:
                    node = node.parent
            elif below:
                below += 1
            else:
                nxt = node.child(part)
                if nxt is None:
                    below = 1
                elif nxt.target is None:
                    node = nxt
                else:
                    where = self._resolve(nxt, hops + 1)
                    if not isinstance(where, tuple):
                        return where
                    node, below = where
        return node, below


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
                    root_fd: int, dir_modes: list[tuple[tuple[str, ...], int]], owners: int = 0) -> None:
    if owners and (member.uid >= owners or member.gid >= owners) and not member.islnk():
        raise UnsafeArchiveError(f"archive member {_shown(member.name)} is owned by {member.uid}:{member.gid}, "
                                 f"beyond the ids 0..{owners - 1} that a sandbox maps")
    parent = _walk(root_fd, parts[:-1], member.name, create=True)
    name = parts[-1]
    try:
        if member.isdir():
            try:
                os.mkdir(name, 0o700, dir_fd=parent)
            except FileExistsError:
                if not stat.S_ISDIR(os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode):
                    raise UnsafeArchiveError(f"archive member {member.name!r} replaces a non-directory")
            if owners:
                os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
            dir_modes.append((parts, member.mode & 0o1777 | 0o700))
            return
        _unlink_existing(name, parent)
        if member.issym():
            os.symlink(member.linkname, name, dir_fd=parent)
        elif member.islnk():
            src_parts = member_parts(member.linkname)
            try:
                src_parent = _walk(root_fd, src_parts[:-1], member.name)
                try:
                    os.link(src_parts[-1], name, src_dir_fd=src_parent, dst_dir_fd=parent,
                            follow_symlinks=False)
                finally:
                    os.close(src_parent)
            except FileNotFoundError:
                # Not a write failure of the cache: the archive links to something it does not hold.
                raise UnsafeArchiveError(f"archive member {_shown(member.name)} is a hard link to "
                                         f"{_shown(member.linkname)}, which the archive does not hold before "
                                         "it (an image layer may link only to files of its own layer)") from None
        else:
            _write_file(tar, member, name, parent)
        if not member.islnk():
            if owners:  # after the data and the mode: a chown drops setuid bits, which we drop anyway
                os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
                if member.isfile():
                    _keep_capabilities(member, name, parent)  # after the chown, which drops them
            mtime = int(member.mtime * 10**9)  # a float in PAX archives (Python's tarfile makes them)
            os.utime(name, ns=(mtime, mtime), dir_fd=parent, follow_symlinks=False)
    finally:
        os.close(parent)


def _keep_capabilities(member: tarfile.TarInfo, name: str, parent: int) -> None:
    """A layer's file capabilities (`setcap`, as GNU tar and Docker record them), where the tree is
    made by the root of a namespace of many ids (mapped.py): the kernel then stores them as that
    root's (v3), so they mean nothing to host root.  Elsewhere they could not be written, and
    inside a sandbox no_new_privs makes them inert anyway, as it does setuid bits: they are kept
    so that the tree is the image's.  A value the kernel refuses is left out, as a device node is."""
    value = member.pax_headers.get("SCHILY.xattr." + _CAPABILITY)
    if value is None:
        return
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
    try:
        os.setxattr(fd, _CAPABILITY, value.encode("utf-8", "surrogateescape"))
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EPERM, errno.ENOTSUP, errno.EOVERFLOW):
            raise
    finally:
        os.close(fd)


_CAPABILITY = "security.capability"


def _write_file(tar: tarfile.TarFile, member: tarfile.TarInfo, name: str, parent: int) -> None:
    # setuid/setgid bits are dropped: the tree is owned by the calling user on the host.
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 member.mode & 0o777, dir_fd=parent)
    with os.fdopen(fd, "wb") as out:
        source = tar.extractfile(member)
        assert source is not None
        while block := source.read(_CHUNK):
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
