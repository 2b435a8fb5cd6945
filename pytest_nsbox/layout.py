"""The filesystem layout of a sandbox, built by its init inside fresh user and mount namespaces.

Order matters, and each step has a reason:

1. Make every mount private, so nothing we mount propagates to the host.
2. Take every host path we need before anything is mounted over it: the rootfs tree as an O_PATH
   descriptor (the overlay's lowerdir is /proc/self/fd/N), bind sources and device nodes as
   detached mount clones (open_tree).  A host path is resolved once, on the host, and never again
   through a tree the sandbox could have shaped.
3. Stack an overlay (the cached tree as its read-only lower layer, upper and work dirs on a private
   tmpfs) and mount the new /proc on it while the host's /proc is still visible (the kernel only
   lets a user namespace mount proc where a full proc is already visible).
4. pivot_root into the overlay and detach the old root: nothing of the host stays reachable.
5. Mount /dev, /tmp, /run and attach the binds inside the new root, so that absolute symlinks in
   the rootfs resolve inside the sandbox, never on the host.
"""

from __future__ import annotations

import fcntl
import os
import socket
import stat
import struct

from . import kernel
from .kernel import MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_PRIVATE, MS_REC

DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
HOST_NETWORK_FILES = ("/etc/resolv.conf", "/etc/hosts")
STAGING = "/tmp"


class BindSpec:
    """A bind mount to make: host `source` on `target` inside, read-only unless `rw`."""

    __slots__ = ("source", "target", "rw")

    def __init__(self, source: str, target: str, rw: bool):
        self.source, self.target, self.rw = source, target, rw


def build(tree: str, binds: list[BindSpec], host_network: bool, host_root: bool = False) -> None:
    """Make the sandbox's root and pivot into it.  Raises KernelError naming the failed step.

    With `host_root`, the root is a read-only recursive clone of the host's own tree instead of an
    overlay (the `host` rootfs spec): nothing is copied, nothing of the host can be written.
    """
    kernel.mount(None, "/", None, MS_REC | MS_PRIVATE, operation="make mounts private")
    lower = kernel.clone_mount("/", recursive=True) if host_root else _open_path(tree)
    devices = {name: kernel.clone_mount(f"/dev/{name}") for name in DEVICES}
    if host_network:
        binds = [BindSpec(p, p, False) for p in HOST_NETWORK_FILES if os.path.exists(p)] + binds
    sources = [kernel.clone_mount(b.source) for b in binds]

    kernel.mount("tmpfs", STAGING, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0700",
                 operation="mount staging tmpfs")
    for name in ("upper", "work", "root"):
        os.mkdir(f"{STAGING}/{name}", 0o755)
    new_root = f"{STAGING}/root"
    if host_root:
        kernel.set_read_only(lower, recursive=True)
        kernel.attach_mount(lower, new_root, "/")
    else:
        kernel.mount("overlay", new_root, "overlay", 0,
                     f"lowerdir=/proc/self/fd/{lower},upperdir={STAGING}/upper,"
                     f"workdir={STAGING}/work,userxattr")
    _ensure_dir(f"{new_root}/proc")
    kernel.mount("proc", f"{new_root}/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)

    os.chdir(new_root)
    kernel.pivot_root(".", ".")
    # The old root now sits on top of the new one: detach it, and with it the staging tmpfs
    # (the overlay keeps its upper and work dirs alive).
    kernel.umount2(".", kernel.MNT_DETACH)
    os.chdir("/")

    _build_dev(devices)
    _mount_tmpfs("/tmp", "mode=1777")
    _mount_tmpfs("/run", "mode=0755")
    for bind, fd in zip(binds, sources):
        _bind(fd, bind)
    for fd in [lower, *devices.values(), *sources]:
        os.close(fd)


def _open_path(path: str) -> int:
    try:
        return os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError as exc:
        raise kernel.KernelError(exc.errno or 0, "open", path) from None


def _ensure_dir(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        os.makedirs(path, 0o755)
        return
    if not stat.S_ISDIR(st.st_mode):
        # A symlink here would be followed on the host before pivot_root: refuse it.
        raise kernel.KernelError(20, "prepare mount point", path,
                                 "the rootfs has something other than a directory there")


def _mount_tmpfs(target: str, options: str) -> None:
    _ensure_dir(target)
    kernel.mount("tmpfs", target, "tmpfs", MS_NOSUID | MS_NODEV, options)


def _build_dev(devices: dict[str, int]) -> None:
    _mount_tmpfs("/dev", "mode=0755")
    for name, fd in devices.items():
        _touch(f"/dev/{name}")
        kernel.attach_mount(fd, f"/dev/{name}", f"/dev/{name}")
    os.mkdir("/dev/pts", 0o755)
    kernel.mount("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC,
                 "newinstance,ptmxmode=0666,mode=0620")
    os.mkdir("/dev/shm", 0o1777)
    kernel.mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for name, target in DEV_LINKS.items():
        os.symlink(target, f"/dev/{name}")


def _touch(path: str) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _bind(fd: int, bind: BindSpec) -> None:
    # The detached clone is still reachable through its descriptor: is the source a directory?
    if os.path.isdir(f"/proc/self/fd/{fd}"):
        os.makedirs(bind.target, 0o755, exist_ok=True)
    else:
        os.makedirs(os.path.dirname(bind.target), 0o755, exist_ok=True)
        if not os.path.exists(bind.target):
            _touch(bind.target)
    # The clone is not recursive: a read-only remount only reaches the top mount, so submounts of
    # the source would stay writable.
    kernel.attach_mount(fd, bind.target, bind.source)
    if not bind.rw:
        kernel.remount_bind_readonly(bind.target)


def set_hostname(name: str) -> None:
    socket.sethostname(name)


def bring_up_loopback() -> None:
    SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | IFF_UP))


def relax_private_network() -> None:
    """In a private network namespace, let sandbox root bind low ports and ping, as on a host.

    Commands run in a nested user namespace that does not own the network namespace, so without
    this they could not bind port 80 — a surprise for a test that starts a web server.
    """
    for path, value in (("/proc/sys/net/ipv4/ip_unprivileged_port_start", "0"),
                        ("/proc/sys/net/ipv4/ping_group_range", "0 2147483647")):
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError:
            pass  # a convenience, not isolation: older kernels lack these knobs
