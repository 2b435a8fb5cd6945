"""The filesystem layout of a sandbox, built by its init inside fresh user and mount namespaces.

Order matters, and each step has a reason:

1. Make every mount private, so nothing we mount propagates to the host.
2. Take every host path we need before anything is mounted over it: the rootfs tree as an O_PATH
   descriptor (the overlay's lowerdir is /proc/self/fd/N), bind sources and device nodes as
   detached mount clones (open_tree), made read-only before they are attached anywhere.  A host
   path is resolved once, on the host, and never again through a tree the sandbox could shape.
3. One sized tmpfs holds everything writable: the overlay's upper and work dirs, and what becomes
   /tmp, /run, /dev and /dev/shm — one budget for the whole sandbox.
4. Stack the overlay and close the tree's descriptor at once: no descriptor of the host stays open
   for a rootfs symlink through /proc/self/fd to reach.  Mount the new /proc while the host's is
   still visible (the kernel only lets a user namespace mount proc where a full proc is visible).
5. pivot_root into the overlay and detach the old root: nothing of the host stays reachable.
6. Attach /dev, /tmp, /run and the binds inside the new root, on mount points resolved with
   openat2(RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS): absolute symlinks in the rootfs resolve inside
   the sandbox, magic links are refused, and nothing is ever created outside it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import stat
import struct

from . import kernel
from .kernel import MOUNT_ATTR_NODEV, MOUNT_ATTR_NOSUID, MOUNT_ATTR_RDONLY
from .kernel import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing (see spawner.py)
if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
HOST_NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts")
#: Where the staging tmpfs goes before the pivot (in our private copy of the host's mounts).
STAGING = "/tmp"
#: Writable places carved out of the staging tmpfs: name -> mode.
WRITABLE = {"tmp": 0o1777, "run": 0o755, "shm": 0o1777}
#: Kernel knobs under /proc that host root could write through any procfs (bubblewrap's list).
PROC_READ_ONLY = ("sys", "sysrq-trigger", "irq", "bus", "fs")
#: Where binds may not go (nor onto / itself), whatever the rootfs's symlinks say.
RESERVED = ("/proc", "/dev")
_IN_ROOT = kernel.RESOLVE_IN_ROOT | kernel.RESOLVE_NO_MAGICLINKS
#: Every mount taken from the host: a device node on it never opens, setuid bits are inert.  When
#: uid 0 inside is the host's root it passes a root-owned node's mode, and a block device planted
#: in a bound directory would be a disk.  Commands cannot clear these: their mount namespaces
#: belong to less privileged user namespaces, so the kernel locks the flags.
HOST_MOUNT_ATTRIBUTES = MOUNT_ATTR_NODEV | MOUNT_ATTR_NOSUID


class BindSpec:
    """A bind mount to make: host `source` on `target` inside, read-only unless `rw`."""

    __slots__ = ("source", "target", "rw")

    def __init__(self, source: str, target: str, rw: bool):
        self.source, self.target, self.rw = source, target, rw


def build(tree: str, binds: list[BindSpec], host_network: bool, tmpfs_size: int,
          host_root: bool = False, layers: Sequence[str] = (),
          host_opened: Callable[[], None] | None = None) -> None:
    """Make the sandbox's root and pivot into it.  Raises KernelError naming the failed step.

    The root is an overlay: `layers` (lowest first) over `tree`, all read-only, under a writable
    upper layer on the staging tmpfs.  With `host_root`, the root is a read-only recursive clone of
    the host's own tree instead (the `host` rootfs spec): nothing is copied, nothing of the host
    can be written.  Every host path is opened first; then `host_opened` is called (root's init,
    mapping many ids, leaves host root there, who alone may walk root's private directories).
    """
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE, operation="make mounts private")
    if host_network:
        binds = [BindSpec(p, p, False) for p in HOST_NETWORK_FILES if os.path.exists(p)] + binds
    sources = [_clone_source(b) for b in binds]
    devices = {name: kernel.clone_mount(f"/dev/{name}") for name in DEVICES}
    if host_root:
        lower = kernel.clone_mount("/", recursive=True)
        kernel.set_mount_attributes(lower, MOUNT_ATTR_RDONLY | HOST_MOUNT_ATTRIBUTES, recursive=True)
    else:
        lowers = [_open_tree_dir(path) for path in (tree, *layers)]
    if host_opened is not None:
        host_opened()

    inodes = max(4096, tmpfs_size // 4096)
    # Its root is never reachable from inside: after the pivot only the places carved out of it are.
    kernel.mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV,
                 f"mode=0755,size={tmpfs_size},nr_inodes={inodes}", operation="mount staging tmpfs")
    for name, mode in {"upper": 0o755, "work": 0o700, "root": 0o755, "dev": 0o755, **WRITABLE}.items():
        os.mkdir(f"{STAGING}/{name}")
        os.chmod(f"{STAGING}/{name}", mode)  # not mkdir's mode: the owner's umask would apply
    new_root = f"{STAGING}/root"
    if host_root:
        kernel.attach_mount(lower, new_root, "/")
        os.close(lower)
    else:
        # overlayfs lists lower layers top first.
        stack = ":".join(f"/proc/self/fd/{fd}" for fd in reversed(lowers))
        # A user namespace's overlay is nodev anyway (SB_I_NODEV); said here so it stays so.
        kernel.mount("overlay", new_root, "overlay", MS_NOSUID | MS_NODEV,
                     f"lowerdir={stack},upperdir={STAGING}/upper,workdir={STAGING}/work,userxattr")
        for fd in lowers:
            os.close(fd)  # from here on, nothing of the host is open for the rootfs to reach

    root = os.open(new_root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    proc = _fixed_mount_point(root, "proc")
    kernel.mount("proc", f"/proc/self/fd/{proc}", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                 operation="mount /proc")
    os.close(proc)
    dev = _build_dev(devices)
    places = {name: kernel.clone_mount(f"{STAGING}/{name}") for name in ("tmp", "run")}
    os.close(root)

    os.chdir(new_root)
    kernel.pivot_root(".", ".")
    # The old root now sits on top of the new one: detach it, and with it the staging tmpfs
    # (the overlay and the clones keep what they need of it alive).
    kernel.umount2(".", kernel.MNT_DETACH)
    os.chdir("/")

    root = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    pending = [dev, *places.values(), *sources]  # closed whatever happens
    try:
        _attach(dev, _fixed_mount_point(root, "dev"), "/dev")
        for name, fd in places.items():
            _attach(fd, _fixed_mount_point(root, name), f"/{name}")
        for bind, fd in zip(binds, sources):
            _attach(fd, _bind_target(root, bind.target, stat.S_ISDIR(os.fstat(fd).st_mode)), bind.source)
    finally:
        os.close(root)
        for fd in pending:
            try:
                os.close(fd)
            except OSError:
                pass  # attached, and closed by _attach


def _clone_source(bind: BindSpec) -> int:
    """A detached clone of a bind's source, nodev and nosuid, and read-only unless `rw`, to its
    last submount."""
    fd = kernel.clone_mount(bind.source, recursive=True)
    attributes = HOST_MOUNT_ATTRIBUTES | (0 if bind.rw else MOUNT_ATTR_RDONLY)
    try:
        kernel.set_mount_attributes(fd, attributes, recursive=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_tree_dir(tree: str) -> int:
    try:
        return os.open(tree, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel.KernelError(exc.errno or 0, "open the rootfs tree", tree) from None


def _build_dev(devices: dict[str, int]) -> int:
    """Fill the staging /dev and return a clone of it, submounts included, ready to attach."""
    dev = f"{STAGING}/dev"
    for name, fd in devices.items():
        os.close(os.open(f"{dev}/{name}", os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644))
        kernel.attach_mount(fd, f"{dev}/{name}", f"/dev/{name}")
        os.close(fd)
    os.mkdir(f"{dev}/pts", 0o755)
    kernel.mount("devpts", f"{dev}/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir(f"{dev}/shm", 0o755)
    shm = kernel.clone_mount(f"{STAGING}/shm")
    kernel.attach_mount(shm, f"{dev}/shm", "/dev/shm")
    os.close(shm)
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"{dev}/{name}")
    return kernel.clone_mount(dev, recursive=True)


def _attach(fd: int, target: int, source: str) -> None:
    try:
        kernel.attach_mount(fd, target, source)
    finally:
        os.close(target)


def _fixed_mount_point(root: int, name: str) -> int:
    """/proc, /dev, /tmp, /run: a directory of the rootfs (made if missing), never a symlink."""
    try:
        return kernel.openat2(root, name, os.O_PATH | os.O_DIRECTORY, kernel.RESOLVE_NO_SYMLINKS)
    except kernel.KernelError as exc:
        if exc.errno != errno.ENOENT:
            raise kernel.KernelError(exc.errno or 0, "prepare mount point", f"/{name}",
                                     "the rootfs must have a directory there, or nothing") from None
    os.mkdir(name, 0o755, dir_fd=root)
    return kernel.openat2(root, name, os.O_PATH | os.O_DIRECTORY, kernel.RESOLVE_NO_SYMLINKS)


def _bind_target(root: int, path: str, directory: bool) -> int:
    """An O_PATH descriptor of a bind's mount point inside the new root, made if missing.

    Each missing component is created in its parent as resolved so far, and every step resolves
    inside the root: a rootfs symlink may redirect a bind (Alpine's /var/run -> /run, Debian's
    dangling /etc/resolv.conf -> ../run/...), never out of the sandbox, never through a magic
    link, never into /proc or /dev.
    """
    parts = [part for part in path.split("/") if part]
    depth, hops = 0, 0
    while depth < len(parts):
        sub = "/".join(parts[:depth + 1])
        fd = _open_in_root(root, sub)
        if fd is not None:
            os.close(fd)
            depth += 1
            continue
        parent = _open_in_root(root, "/".join(parts[:depth]) or ".")
        if parent is None:
            raise kernel.KernelError(errno.ENOENT, "prepare mount point", path)
        try:
            link = _readlink(parent, parts[depth])
            if link is None:
                _create(parent, parts[depth], directory or depth < len(parts) - 1, path)
                continue
        finally:
            os.close(parent)
        # A symlink to nothing: follow its text, still inside the root (openat2 keeps it there).
        hops += 1
        if hops > 40:
            raise kernel.KernelError(errno.ELOOP, "prepare mount point", path)
        base = [] if link.startswith("/") else parts[:depth]
        parts = base + [part for part in link.split("/") if part] + parts[depth + 1:]
        depth = 0
    return _checked_target(_open_in_root(root, "/".join(parts)), path, directory)


def _checked_target(fd: int | None, path: str, directory: bool) -> int:
    if fd is None:
        raise kernel.KernelError(errno.ENOENT, "prepare mount point", path)
    try:
        where = kernel.fd_path(fd)
        if where == "/" or any(where == top or where.startswith(top + "/") for top in RESERVED):
            raise kernel.KernelError(errno.EPERM, "prepare mount point", path,
                                     f"the rootfs's symlinks lead it to {where}, where binds may not go")
        if stat.S_ISDIR(os.fstat(fd).st_mode) != directory:
            kind = "a directory" if directory else "a file"
            raise kernel.KernelError(errno.ENOTDIR if directory else errno.EISDIR, "prepare mount point",
                                     path, f"the source is {kind}, the target in the rootfs is not")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_in_root(root: int, path: str) -> int | None:
    try:
        return kernel.openat2(root, path, os.O_PATH, _IN_ROOT)
    except kernel.KernelError as exc:
        if exc.errno == errno.ENOENT:
            return None
        raise kernel.KernelError(exc.errno or 0, "prepare mount point", f"/{path}",
                                 "a magic link or a loop in the rootfs's symlinks"
                                 if exc.errno in (errno.ELOOP, errno.EXDEV) else "") from None


def _readlink(parent: int, name: str) -> str | None:
    try:
        return os.readlink(name, dir_fd=parent)
    except OSError:
        return None  # not a symlink (or nothing at all)


def _create(parent: int, name: str, directory: bool, path: str) -> None:
    """Make `name` in `parent`, never through a symlink."""
    try:
        if directory:
            os.mkdir(name, 0o755, dir_fd=parent)
        else:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o644, dir_fd=parent))
    except FileExistsError:
        pass  # made meanwhile: the caller opens it next
    except OSError as exc:
        raise kernel.KernelError(exc.errno or 0, "create mount point", path) from None


def protect_proc() -> None:
    """Bind the host-wide kernel knobs under /proc read-only over themselves.

    The kernel checks most sysctls by file owner alone, and the host's root owns them: when uid 0
    inside is the host's root, a fresh procfs would let the sandbox write kernel.core_pattern.
    """
    for name in PROC_READ_ONLY:
        path = f"/proc/{name}"
        if not os.path.exists(path):
            continue
        fd = kernel.clone_mount(path, recursive=True)
        try:
            kernel.set_read_only(fd, recursive=True)
            kernel.attach_mount(fd, path, path)
        finally:
            os.close(fd)


def own_cgroup_namespace() -> bool:
    """Enter a cgroup namespace rooted at our own cgroup: /proc/self/cgroup shows `/` inside.

    False where cgroup namespaces are forbidden already (we run in a sandbox, or an isolated test,
    that called forbid_cgroup_namespaces): we stay in the enclosing one, which nobody here may
    mount either, since its user namespace is not ours.
    """
    try:
        kernel.unshare(kernel.CLONE_NEWCGROUP)
    except kernel.KernelError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        return False
    return True


CGROUP_NAMESPACES_MAX = "user/max_cgroup_namespaces"


def forbid_cgroup_namespaces(proc: str = "/proc") -> None:
    """From now on, no process in our user namespace or any below it may make a cgroup namespace.

    Mounting cgroupfs takes CAP_SYS_ADMIN over the user namespace that owns the caller's cgroup
    namespace.  A command owns its own user namespace, so a cgroup namespace it made would let it
    mount every cgroup v1 hierarchy, and, when uid 0 is the host's root, write its own pids.max
    and memory limit or (for a controller we made no cgroup in) the host's cgroups.  Without one
    it is left with ours, which it cannot mount.  The per-user-namespace counts nest: a limit of 0
    here holds in every user namespace below, whatever they set for themselves.

    The knob written is the calling process's user namespace's, whichever /proc it goes through.
    Call it after making our own cgroup namespace, while we still hold CAP_SYS_RESOURCE in our
    user namespace, and before /proc/sys is made read-only.
    """
    path = f"{proc}/sys/{CGROUP_NAMESPACES_MAX}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, b"0")
        finally:
            os.close(fd)
    except OSError as exc:
        raise kernel.KernelError(exc.errno or 0, "forbid cgroup namespaces: write 0 to", path,
                                 "it needs CAP_SYS_RESOURCE in this process's user namespace and a "
                                 "writable /proc/sys (this is a bug in pytest-nsbox)") from None


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def bring_up_loopback() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def write_sysctls(values: dict[str, str]) -> None:
    """Write /proc/sys knobs of the sandbox's own namespaces; a knob this kernel lacks is skipped."""
    for name, value in values.items():
        try:
            fd = os.open(f"/proc/sys/{name}", os.O_WRONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def private_network_sysctls(gids: int = 1) -> dict[str, str]:
    """In a private network namespace, let the sandbox's users bind low ports and ping, as root
    may on a host.

    Commands run in user namespaces that do not own the network namespace, so without this they
    could not bind port 80 — a surprise for a test that starts a web server.  Every group the
    sandbox maps (0..gids-1: one, or an image's many) may ping; the kernel refuses a group beyond
    the map.  Nothing here reaches the host: the namespace has only its own loopback.
    """
    return {"net/ipv4/ip_unprivileged_port_start": "0", "net/ipv4/ping_group_range": f"0 {gids - 1}"}


def ipc_sysctls(tmpfs_size: int) -> dict[str, str]:
    """SysV shared memory of the sandbox's IPC namespace, capped like its tmpfs.

    Segments outlive the processes that fill them, so without a cap a loop of shmget/shmat/shmdt
    would grow host memory past any per-process limit.
    """
    return {"kernel/shmmax": str(tmpfs_size), "kernel/shmall": str(max(1, tmpfs_size // 4096)),
            "kernel/shmmni": "4096"}
