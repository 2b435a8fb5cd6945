"""Many uids: the id ranges an image's sandbox maps, where the system grants them.

Images own files by many uids, and their programs switch users (redis runs as 999, postgres as
70).  A sandbox that maps one uid shows all of those files as nobody's, and no setuid() inside can
succeed.  So an image's sandbox maps 65536 ids or more, as rootless podman does:

- a normal user: uid 0 inside is the user, and 1..65536 the first ids of the user's ranges in
  /etc/subuid and /etc/subgid, which only the distribution's setuid newuidmap/newgidmap (package
  uidmap) may grant;
- root: 0..65535 inside are an unprivileged range, never host root: root's own /etc/subuid and
  /etc/subgid range where it has one, else DEFAULT_ROOT_BASE.. (the last 64Ki slice of the range
  systemd sets aside for containers, 524288..1879048191).

Where there is no range (or no helper, or we already run in a user namespace: an isolated test),
sandboxes map one uid and `unavailable()` says what is missing and the fix.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pwd
import stat
from dataclasses import dataclass

from . import kernel

SUBUID, SUBGID = "/etc/subuid", "/etc/subgid"
#: Ids above the container's root: enough for every id an image uses (nobody is 65534).
RANGE = 65536
DEFAULT_ROOT_BASE = 1879048192 - RANGE
_WHOLE = ["0", "0", "4294967295"]  # the initial user namespace's map

Line = tuple[int, int, int]  # inside, outside, count


@dataclass(frozen=True)
class IdMap:
    """What a sandbox's namespace maps: its lines for uids and gids, and who writes them."""

    uid: tuple[Line, ...]
    gid: tuple[Line, ...]
    helpers: bool  # written by newuidmap/newgidmap (a normal user), not by us (root)

    @property
    def size(self) -> int:
        """How many ids exist inside: 0..size-1."""
        return sum(count for _inside, _outside, count in self.uid)

    @property
    def key(self) -> str:
        """Names the trees made for this map: their files' owners on the host depend on it."""
        text = repr((self.uid, self.gid))
        return "ids-" + hashlib.sha256(text.encode()).hexdigest()[:12]

    def host_uid(self, inside: int) -> int | None:
        for start, outside, count in self.uid:
            if start <= inside < start + count:
                return outside + inside - start
        return None

    def to_json(self) -> dict:
        return {"uid": [list(line) for line in self.uid], "gid": [list(line) for line in self.gid],
                "helpers": self.helpers}

    def nested(self) -> dict:
        """The maps init writes for each command: the same ids, one line per line of its own."""
        return {kind: [[inside, inside, count] for inside, _outside, count in getattr(self, kind)]
                for kind in ("uid", "gid")}

    def describe(self) -> str:
        lines = ", ".join(f"{inside}..{inside + count - 1} -> {outside}..{outside + count - 1}"
                          for inside, outside, count in self.uid)
        how = "through newuidmap/newgidmap" if self.helpers else "as root"
        return f"uids {lines} ({how})"


def available() -> IdMap | None:
    found = _detect()
    return found if isinstance(found, IdMap) else None


def unavailable() -> str:
    """Why sandboxes map one uid here, and what to do; "" if they map many."""
    found = _detect()
    return "" if isinstance(found, IdMap) else found


@functools.lru_cache(maxsize=None)
def _detect() -> IdMap | str:
    try:
        with open("/proc/self/uid_map") as f:
            if f.read().split()[:3] != _WHOLE:
                return ("this process already runs in a user namespace (an isolated test, a container): "
                        "only its host can map more ids")
    except OSError as exc:
        return f"cannot read /proc/self/uid_map ({exc.strerror})"
    uid, gid = os.geteuid(), os.getegid()
    name = _name(uid)
    if uid == 0:
        base_u = _subordinate(SUBUID, name, uid)
        base_g = _subordinate(SUBGID, name, uid)
        u = base_u[0] if base_u and base_u[1] >= RANGE else DEFAULT_ROOT_BASE
        g = base_g[0] if base_g and base_g[1] >= RANGE else DEFAULT_ROOT_BASE
        return IdMap(((0, u, RANGE),), ((0, g, RANGE),), helpers=False)
    missing = [tool for tool in (kernel.NEWUIDMAP, kernel.NEWGIDMAP) if not _setuid_root(tool)]
    if missing:
        return (f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing (or not setuid root): "
                "install the package uidmap (apt install uidmap; dnf install shadow-utils)")
    ranges = {}
    for path in (SUBUID, SUBGID):
        found = _subordinate(path, name, uid)
        if found is None:
            return (f"{path} grants {name} no range of ids: add one, as root, with `usermod "
                    f"--add-subuids 100000-165535 --add-subgids 100000-165535 {name}` (any range no other "
                    "user has)")
        ranges[path] = found
    (u, u_count), (g, g_count) = ranges[SUBUID], ranges[SUBGID]
    return IdMap(((0, uid, 1), (1, u, min(u_count, RANGE))), ((0, gid, 1), (1, g, min(g_count, RANGE))),
                 helpers=True)


def _subordinate(path: str, name: str, uid: int) -> tuple[int, int] | None:
    """The user's first range in /etc/subuid or /etc/subgid (`name:start:count`, or the uid for
    the name, as shadow allows), if it has one."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.strip().split(":")
        if len(fields) != 3 or fields[0] not in (name, str(uid)):
            continue
        try:
            start, count = int(fields[1]), int(fields[2])
        except ValueError:
            continue
        if start > 0 and count > 0:
            return start, count
    return None


def _setuid_root(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return st.st_uid == 0 and bool(st.st_mode & stat.S_ISUID)


def _name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)
