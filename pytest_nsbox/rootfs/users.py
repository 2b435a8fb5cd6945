"""An image's `User` as the ids its commands run with, read from the image's own /etc/passwd
and /etc/group as Docker does: `name`, `uid`, `name:group` or `uid:gid`; a named user also gets
the groups that list it.

The files are read once, from the layer trees on the host (the highest layer that has them, or
hides them with a whiteout), before any command runs: nothing the sandbox's commands do to their
own /etc/passwd changes who they run as.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from ..errors import ConfigError

_MAX_BYTES = 4 << 20  # an /etc/passwd is kilobytes; a bigger one is not read whole
#: The spellings of "root, as every command runs anyway".
ROOT = frozenset({"", "root", "0", "root:root", "0:0"})
Ids = tuple[int, int, list[int]]
#: Layer trees never change once made (they are named by their digest), so neither do their
#: users: resolved once per process, not at every sandbox's start.
_resolved: dict[tuple[str, tuple[Path, ...], int], Ids | None] = {}


def resolve(user: str, trees: list[Path], spec: str, ids: int) -> Ids | None:
    """(uid, gid, supplementary groups) for `user` over `trees` (bottom layer first); None for
    root with no groups to add, which is how every command runs anyway."""
    if user in ROOT:
        return None
    key = (user, tuple(trees), ids)
    if key not in _resolved:
        _resolved[key] = _resolve(user, trees, spec, ids)
    return _resolved[key]


def _resolve(user: str, trees: list[Path], spec: str, ids: int) -> Ids | None:
    name, _, group = user.partition(":")
    passwd = _table(trees, "etc/passwd", spec)
    uid = gid = None
    if _is_id(name):
        uid = int(name)
        entry = next((fields for fields in passwd if fields[2] == name), None)
    else:
        entry = next((fields for fields in passwd if fields[0] == name), None)
        if entry is None:
            raise ConfigError(f"the image {spec} runs as user {name!r}, which its /etc/passwd does not list")
    if entry is not None:
        if not (_is_id(entry[2]) and _is_id(entry[3])):
            # int("-1") is -1, and setresuid(-1) changes nothing: the command would stay root.
            raise ConfigError(f"the image {spec} runs as user {name!r}, whose /etc/passwd line gives "
                              f"{entry[2]!r}:{entry[3]!r}, not a uid and gid: fix the image's /etc/passwd")
        uid = int(entry[2]) if uid is None else uid
        gid = int(entry[3])
    groups_table = _table(trees, "etc/group", spec)
    if group:
        gid = int(group) if _is_id(group) else _group_id(groups_table, group, spec)
    assert uid is not None
    gid = 0 if gid is None else gid
    member_of = {int(fields[2]) for fields in groups_table
                 if entry is not None and entry[0] in fields[3].split(",") and _is_id(fields[2])}
    groups = sorted(member_of | {gid})
    too_big = [n for n in (uid, gid, *groups) if n >= ids]
    if too_big:
        raise ConfigError(f"the image {spec} runs as {user!r} ({uid}:{gid}), beyond the ids 0..{ids - 1} "
                          "that its sandbox maps")
    return uid, gid, groups


def _is_id(text: str) -> bool:
    """Decimal ASCII digits, as /etc/passwd writes an id ("-1", "+70" and "٧٠" are not)."""
    return text.isascii() and text.isdigit()


def _group_id(table: list[list[str]], group: str, spec: str) -> int:
    for fields in table:
        if fields[0] == group and _is_id(fields[2]):
            return int(fields[2])
    raise ConfigError(f"the image {spec} runs as group {group!r}, which its /etc/group does not list")


def _table(trees: list[Path], name: str, spec: str) -> list[list[str]]:
    """The lines (split on ':', at least 4 fields) of the highest layer's copy of `name`."""
    for tree in reversed(trees):
        fd = _open_in(tree, name)
        if fd is None:
            continue
        if fd < 0:
            return []  # a whiteout (or not a file): the image has none
        try:
            data = os.read(fd, _MAX_BYTES)
        finally:
            os.close(fd)
        return [fields for line in data.decode(errors="replace").splitlines()
                if len(fields := line.split(":")) >= 4]
    return []


def _open_in(tree: Path, name: str) -> int | None:
    """A read descriptor of tree/name, walked without following a link; None if no layer entry
    is there, -1 if one is but hides or is not a regular file."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tree, flags | os.O_DIRECTORY)
    try:
        *dirs, leaf = name.split("/")
        for part in dirs:
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if not stat.S_ISDIR(st.st_mode):
                return -1  # a whiteout of /etc, a link: nothing the host should follow
            nxt = os.open(part, flags | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        try:
            st = os.stat(leaf, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return -1 if _opaque(fd) else None  # an opaque /etc hides the layers' below
        if not stat.S_ISREG(st.st_mode):
            return -1
        return os.open(leaf, flags, dir_fd=fd)
    except PermissionError:
        raise ConfigError(f"cannot read the image's /{name} in {tree}: permission denied") from None
    finally:
        os.close(fd)


def _opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, "user.overlay.opaque") == b"y"
    except OSError:
        return False
