"""Trees whose files many uids own: made and removed from inside the id map they are made for.

A normal user can neither chown a file to one of their subordinate uids nor remove a directory
one of those uids owns; root of a user namespace that maps the ranges can.  So an image layer for
a sandbox with many ids (engine/idmap.py) is extracted, and such a tree removed, by a fresh
interpreter — unshare(CLONE_NEWUSER) wants a single-threaded process, which an xdist worker is
not — that enters a namespace with that map: it forks a process that stays outside and writes the
map (newuidmap/newgidmap, or root itself), then works as root inside on the descriptors its
parent passed, never on a path through the cache (as root, the ids are unprivileged ones, which
cannot enter the cache's private trees/ directory).  Its parent reads one line of JSON back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .. import errors
from ..engine.idmap import IdMap

_ERRORS = {cls.__name__: cls for cls in (errors.RootfsError, errors.UnsafeArchiveError,
                                         errors.ArchiveLimitError, errors.SandboxUnavailable)}


def extract(archive: Path, staging: Path, source: str, ids: IdMap) -> int:
    """archive.extract of an image layer into the empty directory `staging`, owners kept."""
    root = ids.host_uid(0)
    assert root is not None
    if not ids.helpers:
        # Host root's, they would be nobody's inside, where the child reopens them by descriptor.
        os.chown(staging, root, ids.gid[0][1])
        os.chown(archive, root, ids.gid[0][1])
    tar = os.open(archive, os.O_RDONLY | os.O_CLOEXEC)
    top = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        size = _run({"op": "extract", "archive": tar, "dest": top, "source": source}, ids, [tar, top])
    finally:
        os.close(tar)
        os.close(top)
    if not ids.helpers:
        os.chown(staging, 0, 0)  # the cache's entries are its owner's (store.check_private)
    return int(size)


def remove(path: Path, ids: IdMap) -> None:
    """store.remove_tree of `path`, as root of the map its files were made for."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _run({"op": "remove", "parent": parent, "name": path.name}, ids, [parent])
    finally:
        os.close(parent)


def _run(request: dict, ids: IdMap, fds: list[int]) -> object:
    request["ids"] = ids.to_json()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest_nsbox.rootfs.mapped"], input=json.dumps(request),
                              capture_output=True, text=True, pass_fds=fds, check=False,
                              env={**os.environ, "PYTHONSAFEPATH": "1"})
    except OSError as exc:
        raise errors.RootfsError(f"cannot start {sys.executable} to work in the cache as the ids' root: "
                                 f"{exc.strerror or exc}") from None
    lines = done.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except ValueError:
        answer = {}
    if "ok" in answer:
        return answer["ok"]
    cls = _ERRORS.get(answer.get("error", ""), errors.RootfsError)
    message = answer.get("message") or (done.stderr.strip().splitlines() or ["no answer"])[-1]
    raise cls(message)


# -- the child ------------------------------------------------------------------------------------
def _enter(ids: IdMap) -> None:
    """Become root of a new user namespace that maps `ids`; the map is written from outside."""
    from ..engine import kernel
    ready_r, ready_w = os.pipe()
    said_r, said_w = os.pipe()
    me = os.getpid()
    mapper = os.fork()
    if mapper == 0:
        os.close(ready_w)
        os.close(said_r)
        code = 1
        try:
            if os.read(ready_r, 1) == b"u":
                kernel.map_ranges(me, ids.to_json(), ids.helpers)
                code = 0
        except OSError as exc:
            os.write(said_w, str(exc).encode()[:4000])
        os._exit(code)
    os.close(ready_r)
    os.close(said_w)
    kernel.unshare(kernel.CLONE_NEWUSER)
    os.write(ready_w, b"u")
    os.close(ready_w)
    _, status = os.waitpid(mapper, 0)
    said = os.read(said_r, 4096).decode(errors="replace")
    if status != 0:
        raise errors.SandboxUnavailable(f"cannot map {ids.describe()} for the cache's work: "
                                        f"{said or 'the mapping process failed'}")
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)


def main() -> None:
    # Everything is imported before the ids change: as root's unprivileged range we may not
    # read the interpreter's own files (pyenv's under /root, mode 700).
    import bz2, gzip, lzma, tarfile, zlib  # noqa: E401,F401 - archive.py's lazy imports
    from ..engine import kernel
    from . import archive, store
    kernel.set_parent_death_signal(9)  # nothing of ours outlives the process that asked
    request = json.loads(sys.stdin.read())
    raw = request["ids"]
    ids = IdMap(tuple(map(tuple, raw["uid"])), tuple(map(tuple, raw["gid"])), raw["helpers"])
    try:
        _enter(ids)
        # The directory we were given becomes our cwd: "." is a path that follows no link.
        if request["op"] == "extract":
            os.fchdir(request["dest"])
            result: object = archive.extract(Path(f"/proc/self/fd/{request['archive']}"), Path("."),
                                             request["source"], oci=True, owners=ids.size)
        else:
            os.fchdir(request["parent"])
            store.remove_tree(Path(request["name"]))
            result = None
        print(json.dumps({"ok": result}))
    except errors.NsboxError as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    except OSError as exc:
        print(json.dumps({"error": "RootfsError", "message": f"{exc.strerror or exc} ({exc.filename or '?'})"}))


if __name__ == "__main__":
    main()
