"""The kernel interface: the few syscalls the stdlib lacks, and errors that explain themselves.

Only ctypes and the stdlib are used.  Everything here is safe to call in the spawner, in a freshly
forked child and in the sandbox's init; nothing here imports more than the stdlib.
"""

from __future__ import annotations

import ctypes
import errno
import os

# Namespace flags (linux/sched.h).
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

NAMESPACE_FLAGS = {
    "user": CLONE_NEWUSER,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
    "ipc": CLONE_NEWIPC,
    "uts": CLONE_NEWUTS,
    "cgroup": CLONE_NEWCGROUP,
    "net": CLONE_NEWNET,
}

# Mount flags (linux/mount.h).
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MS_RELATIME = 1 << 21
MNT_DETACH = 2

# statvfs f_flag bits that the kernel locks on a mount inherited into a user namespace: a remount
# must repeat them or it fails with EPERM.
_LOCKED_STATVFS_TO_MS = {
    os.ST_NOSUID: MS_NOSUID,
    os.ST_NODEV: MS_NODEV,
    os.ST_NOEXEC: MS_NOEXEC,
    os.ST_NOATIME: MS_NOATIME,
    os.ST_NODIRATIME: MS_NODIRATIME,
    os.ST_RELATIME: MS_RELATIME,
}

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203,
                   "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218, "armv6l": 218}

_MACHINE = os.uname().machine
_RELEASE = os.uname().release
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


class KernelError(OSError):
    """A syscall failed.  The message names the operation, the path, errno and the likely cause."""

    def __init__(self, errno_: int, operation: str, path: str | None = None, hint: str = ""):
        self.operation = operation
        self.path = path
        self.hint = hint
        super().__init__(errno_, describe(errno_, operation, path, hint))


def describe(errno_: int, operation: str, path: str | None, hint: str = "") -> str:
    """`mount /proc: EPERM (Operation not permitted). <hint>` — the form of every kernel error."""
    where = f" {path}" if path else ""
    name = errno.errorcode.get(errno_, str(errno_))
    text = f"{operation}{where}: {name} ({os.strerror(errno_)})"
    return f"{text}. {hint}" if hint else text


def _check(result: int, operation: str, path: str | None = None, hint: str = "") -> None:
    if result != 0:
        raise KernelError(ctypes.get_errno(), operation, path, hint)


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise KernelError(err, "unshare", None, unshare_hint(err, flags))


def unshare_hint(err: int, flags: int) -> str:
    """Why unshare(2) said no, in the order the causes are met in the field."""
    if err == errno.EINVAL and flags & CLONE_NEWUSER:
        return "a user namespace can only be made by a single-threaded process (this is a bug in pytest-nsbox)"
    if err == errno.ENOSPC:
        return ("the user namespace limit is reached or zero: check `sysctl user.max_user_namespaces` "
                "and raise it (e.g. `sysctl -w user.max_user_namespaces=15000`)")
    if err in (errno.EPERM, errno.EACCES):
        return userns_policy_hint()
    return ""


def userns_policy_hint(*, seccomp: bool = True) -> str:
    """The host policies that forbid unprivileged user namespaces, found by looking at the host."""
    checks = [
        ("/proc/sys/kernel/unprivileged_userns_clone", "0",
         "user namespaces are disabled: run `sysctl -w kernel.unprivileged_userns_clone=1`"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
         "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+): run "
         "`sysctl -w kernel.apparmor_restrict_unprivileged_userns=0` or add an AppArmor profile "
         "with `userns,` for this Python interpreter"),
        ("/proc/sys/user/max_user_namespaces", "0",
         "user namespaces are disabled: run `sysctl -w user.max_user_namespaces=15000`"),
    ]
    for path, bad, hint in checks:
        if read_text(path).strip() == bad:
            return hint
    if seccomp and (os.path.exists("/.dockerenv") or "docker" in read_text("/proc/1/cgroup")):
        return ("this looks like a Docker container, whose default seccomp profile blocks "
                "unshare(CLONE_NEWUSER): run the container with `--security-opt seccomp=unconfined` "
                "(or a profile that allows unshare)")
    return "unprivileged user namespaces are not allowed on this host"


def read_text(path: str) -> str:
    """A small file's text, or "" if it cannot be read (proc and cgroup files come and go)."""
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def reap_children():
    """Yield (pid, waitstatus) for every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None, operation: str | None = None) -> None:
    result = _libc.mount(_b(source), _b(target), _b(fstype), flags, _b(data))
    if result != 0:
        err = ctypes.get_errno()
        op = operation or ("bind mount" if flags & MS_BIND else f"mount {fstype}")
        raise KernelError(err, op, target, mount_hint(err, fstype))


def mount_hint(err: int, fstype: str | None) -> str:
    if fstype == "overlay" and err in (errno.EINVAL, errno.EPERM, errno.ENODEV):
        return ("overlayfs inside a user namespace needs Linux >= 5.11 (this is "
                f"{_RELEASE}); the rootfs cache must be on a filesystem overlayfs "
                "accepts as a lower layer (not another overlay or NFS)")
    if fstype == "proc" and err == errno.EPERM:
        return "a new /proc can only be mounted where the host's /proc is fully visible (not masked)"
    return ""


def remount_bind_readonly(target: str) -> None:
    """Make a bind mount read-only, repeating the flags the kernel locked on it."""
    locked = 0
    flags = os.statvfs(target).f_flag
    for st_bit, ms_bit in _LOCKED_STATVFS_TO_MS.items():
        if flags & st_bit:
            locked |= ms_bit
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | locked,
          operation="remount read-only")


# open_tree(2) and move_mount(2) (Linux 5.2) have the same numbers on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
_MOUNT_ATTR_RDONLY = 1


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def clone_mount(path: str, recursive: bool = False) -> int:
    """A detached bind mount of `path` (with its submounts if `recursive`), as a descriptor.

    Unlike a plain bind, it can still be attached after the mount it came from is detached, which
    is what lets binds be placed after pivot_root, inside the new root.
    """
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    fd = _libc.syscall(_SYS_OPEN_TREE, -100, _b(path), flags)
    if fd < 0:
        err = ctypes.get_errno()
        hint = "open_tree(2) needs Linux >= 5.2" if err == errno.ENOSYS else ""
        raise KernelError(err, "clone mount", path, hint)
    return fd


def set_read_only(fd: int, recursive: bool) -> None:
    """Make a detached mount tree read-only, every submount included (mount_setattr, Linux 5.12)."""
    attr = _MountAttr(_MOUNT_ATTR_RDONLY, 0, 0, 0)
    flags = _AT_EMPTY_PATH | (_AT_RECURSIVE if recursive else 0)
    result = _libc.syscall(_SYS_MOUNT_SETATTR, fd, b"", flags, ctypes.byref(attr), ctypes.sizeof(attr))
    if result != 0:
        err = ctypes.get_errno()
        raise KernelError(err, "make read-only", None,
                          "mount_setattr(2) needs Linux >= 5.12" if err == errno.ENOSYS else "")


def attach_mount(fd: int, target: str, source: str) -> None:
    """Attach a mount made by clone_mount() on `target`."""
    result = _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, _b(target), _MOVE_MOUNT_F_EMPTY_PATH)
    _check(result, f"bind {source} on", target)


def umount2(target: str, flags: int) -> None:
    _check(_libc.umount2(_b(target), flags), "umount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    number = _SYS_PIVOT_ROOT.get(_MACHINE)
    if number is None:
        raise KernelError(errno.ENOSYS, "pivot_root", new_root,
                          f"pytest-nsbox does not know pivot_root's number on {_MACHINE}")
    _check(_libc.syscall(number, _b(new_root), _b(put_old)), "pivot_root", new_root)


def prctl(option: int, arg: int = 0) -> None:
    _check(_libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), ctypes.c_ulong(0),
                       ctypes.c_ulong(0), ctypes.c_ulong(0)), f"prctl({option})")


def set_parent_death_signal(sig: int) -> None:
    prctl(PR_SET_PDEATHSIG, sig)


def become_subreaper() -> None:
    """Orphaned descendants are reparented to us instead of to the host's PID 1."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def set_dumpable(flag: bool) -> None:
    prctl(PR_SET_DUMPABLE, int(flag))


def set_process_name(name: str) -> None:
    _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]), ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))


def write_id_maps(uid: int, gid: int, inner: int = 0, pid: str = "self") -> None:
    """Map `inner` inside the current user namespace to `uid`/`gid` of its parent."""
    base = f"/proc/{pid}"
    try:
        _write(f"{base}/setgroups", "deny")
        _write(f"{base}/uid_map", f"{inner} {uid} 1\n")
        _write(f"{base}/gid_map", f"{inner} {gid} 1\n")
    except OSError as exc:
        raise KernelError(exc.errno or errno.EPERM, "write user namespace id map", exc.filename,
                          userns_policy_hint(seccomp=False) if exc.errno in (errno.EPERM, errno.EACCES) else "") from None


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


# posix_spawn(3) through glibc: a vfork-based spawn, so init's Python never runs in the child.
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80
_OPAQUE = 1024  # larger than glibc's posix_spawn_file_actions_t, posix_spawnattr_t and sigset_t


def spawn(path: str, argv: list[str], env: dict[str, str], cwd: str, stdio: list[int]) -> int:
    """Start `path` in a new session with `stdio` as fds 0-2, every other fd closed, default
    signal dispositions and an empty signal mask.  Returns the pid; raises OSError as exec would."""
    actions = ctypes.create_string_buffer(_OPAQUE)
    attr = ctypes.create_string_buffer(_OPAQUE)
    sigs = ctypes.create_string_buffer(_OPAQUE)
    empty = ctypes.create_string_buffer(_OPAQUE)
    _libc.posix_spawn_file_actions_init(actions)
    _libc.posix_spawnattr_init(attr)
    try:
        for target, fd in enumerate(stdio):
            _spawn_check(_libc.posix_spawn_file_actions_adddup2(actions, fd, target), path)
        _spawn_check(_libc.posix_spawn_file_actions_addchdir_np(actions, _b(cwd)), cwd)
        _spawn_check(_libc.posix_spawn_file_actions_addclosefrom_np(actions, 3), path)
        _libc.sigfillset(sigs)
        _libc.sigemptyset(empty)
        _libc.posix_spawnattr_setsigdefault(attr, sigs)
        _libc.posix_spawnattr_setsigmask(attr, empty)
        _libc.posix_spawnattr_setflags(attr, ctypes.c_short(
            _POSIX_SPAWN_SETSID | _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK))
        c_argv = (ctypes.c_char_p * (len(argv) + 1))(*[os.fsencode(a) for a in argv], None)
        env_items = [os.fsencode(f"{k}={v}") for k, v in env.items()]
        c_env = (ctypes.c_char_p * (len(env_items) + 1))(*env_items, None)
        pid = ctypes.c_int()
        _spawn_check(_libc.posix_spawn(ctypes.byref(pid), _b(path), actions, attr, c_argv, c_env), path)
        return pid.value
    finally:
        _libc.posix_spawn_file_actions_destroy(actions)
        _libc.posix_spawnattr_destroy(attr)


def _spawn_check(err: int, path: str) -> None:
    if err:
        raise OSError(err, os.strerror(err), path)
