"""Confining a copy of the test process: isolate mode's sandbox, built around pytest itself.

A `Sandbox` runs commands over a root filesystem of its own.  Isolate mode runs a test's own Python
code, so the sandbox is built around a copy of the pytest process instead: `fork()` clones it into
new user, mount, PID, IPC, UTS and cgroup namespaces (and a network namespace with
network="none"), and `confine()`, in that child, makes what it sees:

- the host's filesystem, every mount read-only, but the paths it may write (`writable`: pytest's
  basetemp, and what the user lists), bound back writable;
- a private, sized /tmp and /dev/shm (the writable paths below them bound back in), a fresh /proc;
  under the private /tmp lies the host's, copy-on-write: files that setup and session fixtures
  made there (tempfile.mkdtemp() is common) are seen, what the test writes there is its own;
- the user's own uid and gid, and for a normal user no capability: tests that check os.getuid(),
  file owners or permissions see no change;
- the PID cap (RLIMIT_NPROC in this user namespace, or the cgroup the parent made), no_new_privs,
  the syscall filter, a fresh session keyring.

The child is PID 1 of its PID namespace: when it exits, the kernel kills everything the test
started.  Being PID 1, it adopts the test's orphans, and a signal it sends itself whose action is
the default one is ignored (see docs/isolate.md).
"""

from __future__ import annotations

import errno
import functools
import os
import resource
import select
import signal
import stat
from typing import NamedTuple

from ..engine import hints, kernel, layout, seccomp
from ..engine.kernel import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

FLAGS = (kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS | kernel.CLONE_NEWPID | kernel.CLONE_NEWIPC
         | kernel.CLONE_NEWUTS)
PRIVATE_PLACES = ("/tmp", "/dev/shm")
HOST_VIEW = "/tmp"  # the private place laid over a copy-on-write view of the host's
_NO_DEVICES = kernel.MOUNT_ATTR_NOSUID | kernel.MOUNT_ATTR_NODEV
_HOST_ATTRIBUTES = kernel.MOUNT_ATTR_RDONLY | _NO_DEVICES


def fork(network: str, cgroup_fd: int = -1) -> tuple[int, int]:
    """The test process, cloned into its own namespaces: (pid, pidfd), or (0, -1) in the child."""
    flags = FLAGS | (kernel.CLONE_NEWNET if network == "none" else 0)
    return kernel.fork_into(flags, cgroup_fd, what="fork the test into its sandbox")


def die_with(parent_pidfd: int) -> None:
    """In the child: die if the test process does (SIGKILL included); and if it died already, now."""
    kernel.set_parent_death_signal(signal.SIGKILL)
    if select.select([parent_pidfd], [], [], 0)[0]:
        os._exit(1)


class Places(NamedTuple):
    """The host paths a confined test may write, and must still see under the private /tmp and
    /dev/shm, with the symlinks on the way to them: worked out once, in the test process, so that
    each test's child only makes the mounts."""

    writable: tuple[str, ...]
    hidden: tuple[str, ...]
    links: tuple[tuple[str, str], ...]


@functools.lru_cache(maxsize=32)
def places(writable: tuple[str, ...], visible: tuple[str, ...]) -> Places:
    """`visible` are paths the test must still see, read-only, if they lie under the private /tmp
    or /dev/shm: the project, the interpreter, sys.path (a checkout or a venv in /tmp is common)."""
    real = tuple(dict.fromkeys(os.path.realpath(p) for p in writable))
    return Places(real, tuple(_hidden(visible, real)), tuple(_links([*writable, *visible])))


def confine(uid: int, gid: int, where: Places, network: str, tmpfs_size: int, pids_max: int | None,
            rlimit_pids: bool, memory_max: int | None, rlimit_memory: bool, filter_syscalls: bool) -> list[str]:
    """In the child fork() made: build its sandbox.  Raises KernelError naming the failed step;
    returns notes on what was done differently (a /tmp without the host's under it)."""
    kernel.write_id_maps(uid, gid, inner_uid=uid, inner_gid=gid)
    # Rooted at the test's cgroup (the parent placed us); none where an enclosing sandbox forbids them.
    layout.own_cgroup_namespace()
    # No process below may make one: in a cgroup namespace of its own it could mount cgroupfs and,
    # as the host's root, raise its own limits (cgroup v1 has no delegation boundary).
    layout.forbid_cgroup_namespaces()
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE, operation="make mounts private")
    holes = _take(where.writable)
    devices = {name: kernel.clone_mount(f"/dev/{name}") for name in layout.DEVICES
               if os.path.exists(f"/dev/{name}")}
    # No device node of the host's works in here but those of the private /dev: read-only does not
    # stop a write to a block device, nodev does.
    kernel.set_mount_attributes(-100, _HOST_ATTRIBUTES, recursive=True, path="/")
    taken = {path for path, _fd in holes}
    holes += _take([path for path in where.hidden if not _under_any(path, taken)])  # read-only clones now
    _private_dev(devices, tmpfs_size)
    notes = []
    for place in PRIVATE_PLACES:
        if os.path.isdir(place):
            note = _private(place, tmpfs_size, copy_of_host=place == HOST_VIEW)
            if note:
                notes.append(note)
    for link, target in where.links:  # only needed where /tmp is empty, but harmless where not
        _make_link(link, target)
    kernel.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, operation="mount /proc")
    if uid == 0:
        layout.protect_proc()  # the kernel lets the host's uid 0 write most sysctls, caps or not
        os.environ[hints.ISOLATED_ROOT_ENV] = "1"  # why a sandbox made in here gets no /proc
    # Outer paths first: a writable basetemp inside a read-only project stays on top of it.
    for path, fd in sorted(holes, key=lambda hole: hole[0].count("/")):
        try:
            kernel.set_mount_attributes(fd, _NO_DEVICES, recursive=True)
            _make_mount_point(path, stat.S_ISDIR(os.fstat(fd).st_mode))
            kernel.attach_mount(fd, path, path)
        finally:
            os.close(fd)
    if network == "none":
        layout.bring_up_loopback()
    kernel.join_new_session_keyring()
    if uid == 0:
        _lock_mounts()
    if pids_max and rlimit_pids:
        # Counted per user namespace (Linux >= 5.14): the test's processes, not the user's.
        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        cap = pids_max if hard == resource.RLIM_INFINITY else min(pids_max, hard)
        resource.setrlimit(resource.RLIMIT_NPROC, (cap, cap))
    if memory_max and rlimit_memory:
        # The test process is a copy of pytest, already this big: the cap is on what it adds.
        limit = _address_space() + memory_max
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    if uid != 0:
        # As the user is outside: no capability, so a file's mode holds for its owner too (a test
        # that chmods a file to 0 and expects EACCES sees it), and no mount can be changed. Root
        # keeps root's, as outside, but over mounts it can no longer change (_lock_mounts).
        kernel.drop_capabilities()
    if filter_syscalls:
        seccomp.install()
    else:
        kernel.set_no_new_privs()
    return notes


def _lock_mounts() -> None:
    """Root's test keeps its capabilities, and so could clear read-only or nodev on mounts its
    own user namespace made.  Copied into a user namespace of its own, every mount and every flag
    is locked: the kernel refuses to change or unmount them, whatever the capabilities."""
    kernel.unshare(kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS)
    kernel.write_id_maps(0, 0, inner_uid=0, inner_gid=0)


def _private_dev(devices: dict[str, int], tmpfs_size: int) -> None:
    """A /dev of our own, as a sandbox's: the usual character devices bound from the host's, a
    devpts of our own (ptys work), /dev/shm (made private next), the usual links."""
    try:
        kernel.mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC | MS_NODEV,
                     "mode=0755,size=1m,nr_inodes=256", operation="mount a private /dev")
        for name, fd in devices.items():
            path = f"/dev/{name}"
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
            kernel.attach_mount(fd, path, path)
        os.mkdir("/dev/pts", 0o755)
        kernel.mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                     "newinstance,ptmxmode=0666,mode=0620", operation="mount /dev/pts")
        os.mkdir("/dev/shm", 0o1777)
        for name, target in layout.DEV_LINKS.items():
            os.symlink(target, f"/dev/{name}")
    finally:
        for fd in devices.values():
            os.close(fd)


def _private(place: str, tmpfs_size: int, copy_of_host: bool) -> str | None:
    """A sized tmpfs over `place`; with `copy_of_host`, the host's `place` laid under it,
    copy-on-write (an overlay whose upper layer is in the tmpfs): what setup and session fixtures
    left there is seen, what the test writes there is its own.  A note if that could not be done."""
    lower = os.open(place, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC) if copy_of_host else -1
    try:
        inodes = max(4096, tmpfs_size // 4096)
        kernel.mount("tmpfs", place, "tmpfs", MS_NOSUID | MS_NODEV,
                     f"mode=1777,size={tmpfs_size},nr_inodes={inodes}", operation=f"mount a private {place}")
        if lower < 0:
            return None
        upper, work = f"{place}/.nsbox-upper", f"{place}/.nsbox-work"  # hidden by the overlay over them
        os.mkdir(upper, 0o755)
        os.mkdir(work, 0o700)
        os.chmod(upper, 0o1777)  # as /tmp: the overlay's root takes its upper dir's mode
        # The lower layer by our own descriptor, taken before the tmpfs covered the path: nothing
        # of the test runs yet, and /proc is still the host's, so the magic link is ours alone.
        try:
            kernel.mount("overlay", place, "overlay", MS_NOSUID | MS_NODEV,
                         f"lowerdir=/proc/self/fd/{lower},upperdir={upper},workdir={work},userxattr",
                         operation=f"lay the host's {place} under the private one")
        except OSError as exc:
            return (f"{place} is private and empty in isolated tests: the host's could not be laid under "
                    f"it ({exc}); files fixtures made there are not seen")
        return None
    finally:
        if lower >= 0:
            os.close(lower)


def _take(paths: Sequence[str]) -> list[tuple[str, int]]:
    """Clones of the (real) paths that exist: writable if taken before the tree is made read-only."""
    return [(path, kernel.clone_mount(path, recursive=True)) for path in paths if os.path.exists(path)]


def _under_any(path: str, tops: set[str]) -> bool:
    return any(path == top or path.startswith(top.rstrip("/") + "/") for top in tops)


def _hidden(paths: Sequence[str], writable: Sequence[str]) -> list[str]:
    """The paths a private /tmp or /dev/shm would hide, but for those a writable path holds."""
    def under(path: str, top: str) -> bool:
        return path == top or path.startswith(top.rstrip("/") + "/")
    return [path for path in dict.fromkeys(os.path.realpath(p) for p in paths)
            if any(under(path, place) for place in PRIVATE_PLACES)
            and not any(under(path, hole) for hole in writable)]


def _links(paths: Sequence[str]) -> list[tuple[str, str]]:
    """The symlinks under /tmp or /dev/shm on the way to these paths (a checkout reached through
    /tmp/work -> /srv/work): made again in the private /tmp, so that the paths still lead there."""
    links: dict[str, str] = {}
    for path in paths:
        path = os.path.abspath(path)
        if not path.startswith(tuple(place + "/" for place in PRIVATE_PLACES)):
            continue
        parts = path.split("/")
        for end in range(3, len(parts) + 1):
            prefix = "/".join(parts[:end])
            where = os.path.join(os.path.realpath(os.path.dirname(prefix)), parts[end - 1])
            if where.startswith(tuple(place + "/" for place in PRIVATE_PLACES)) and os.path.islink(where):
                links.setdefault(where, os.readlink(where))
    return list(links.items())


def _make_link(link: str, target: str) -> None:
    try:
        os.makedirs(os.path.dirname(link), 0o700, exist_ok=True)
        os.symlink(target, link)
    except FileExistsError:
        pass
    except OSError as exc:
        raise kernel.KernelError(exc.errno or errno.EIO, "make again the symlink", link) from None


def _make_mount_point(path: str, directory: bool) -> None:
    """A writable path under a private /tmp is gone from the fresh tmpfs: make it again there."""
    if os.path.lexists(path):
        return
    if not any(path.startswith(place + "/") for place in PRIVATE_PLACES):
        raise kernel.KernelError(errno.ENOENT, "prepare writable path", path)
    try:
        if directory:
            os.makedirs(path, 0o700)
        else:
            os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError as exc:
        raise kernel.KernelError(exc.errno or errno.EIO, "prepare writable path", path) from None


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0
