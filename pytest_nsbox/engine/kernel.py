"""The kernel interface: the few syscalls the stdlib lacks, and errors that explain themselves.

Only ctypes and the stdlib are used.  Everything here is safe to call in the spawner, in a freshly
forked child and in the sandbox's init; nothing here imports more than the stdlib.
"""

from __future__ import annotations

import ctypes
import errno
import os

from . import hints

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
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_BIND = 4096
MS_REC = 16384
MS_PRIVATE = 1 << 18
MNT_DETACH = 2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_NAME = 15
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "riscv64": 41, "loongarch64": 41, "ppc64le": 203,
                   "s390x": 217, "i686": 217, "i386": 217, "armv7l": 218, "armv6l": 218}

_MACHINE = os.uname().machine
_RELEASE = os.uname().release
_libc = ctypes.CDLL(None, use_errno=True)
# The same C library, called with the GIL held: for clone3, whose child must find the interpreter
# exactly as the parent left it (holding the GIL), as after fork().
_libc_gil = ctypes.PyDLL(None, use_errno=True)
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


# clone3(2) (Linux 5.3) has the same number everywhere; its argument is a struct, not registers.
_SYS_CLONE3 = 435
CLONE_PIDFD = 0x1000
CLONE_INTO_CGROUP = 0x200000000


class _CloneArgs(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in (
        "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size", "tls",
        "set_tid", "set_tid_size", "cgroup")]


def clone(flags: int, cgroup_fd: int = -1, what: str = "clone") -> tuple[int, int]:
    """fork(), with namespaces and a pidfd: (pid, pidfd) in the parent, (0, -1) in the child.

    The child runs on a copy of the parent's stack, as after fork().  Python's at-fork handlers do
    not run: only single-threaded processes that register none (the spawner, init) may call this.
    """
    pidfd = ctypes.c_int(-1)
    args = _CloneArgs(flags=flags | CLONE_PIDFD, pidfd=ctypes.addressof(pidfd),
                      exit_signal=17)  # SIGCHLD: the parent is told, and may wait for it
    if cgroup_fd >= 0:
        args.flags |= CLONE_INTO_CGROUP
        args.cgroup = cgroup_fd
    pid = _libc_gil.syscall(_SYS_CLONE3, ctypes.byref(args), ctypes.sizeof(args))
    if pid < 0:
        err = ctypes.get_errno()
        raise KernelError(err, what, None, clone_hint(err, flags))
    return pid, (pidfd.value if pid else -1)


def clone_hint(err: int, flags: int) -> str:
    if err == errno.EAGAIN:
        return ("no more processes may be created: a PID cap (RLIMIT_NPROC, `ulimit -u`, or a "
                "cgroup's pids.max) is reached")
    if err == errno.ENOSYS:
        return f"clone3(2) needs Linux >= 5.3 (this is {_RELEASE})"
    return unshare_hint(err, flags)


def unshare(flags: int) -> None:
    if _libc.unshare(ctypes.c_int(flags)) != 0:
        err = ctypes.get_errno()
        raise KernelError(err, "unshare", None, unshare_hint(err, flags))


def join_user_namespace(fd: int, what: str) -> None:
    """setns(2) into the user namespace `fd` refers to (os.setns is Python >= 3.12)."""
    if _libc.setns(ctypes.c_int(fd), ctypes.c_int(CLONE_NEWUSER)) != 0:
        err = ctypes.get_errno()
        hint = ("only a single-threaded process may join a user namespace (this is a bug in pytest-nsbox)"
                if err == errno.EINVAL else "")
        raise KernelError(err, what, fd_path(fd), hint)


def unshare_hint(err: int, flags: int) -> str:
    """Why unshare(2) said no, in the order the causes are met in the field."""
    if err == errno.EINVAL and flags & CLONE_NEWUSER:
        return "a user namespace can only be made by a single-threaded process (this is a bug in pytest-nsbox)"
    if err == errno.ENOSPC:
        if hints.read("/proc/sys/user/max_user_namespaces").strip() == "0":
            return hints.userns_refused()  # zero: disabled, which it says with its fix
        if flags & CLONE_NEWCGROUP:
            return ("either the user namespace limit is reached (`sysctl user.max_user_namespaces`), "
                    "or cgroup namespaces are forbidden here: every pytest-nsbox sandbox and isolated "
                    "test sets user.max_cgroup_namespaces to 0 for what runs inside it")
        return ("the user namespace limit is reached: check `sysctl user.max_user_namespaces` "
                "and raise it (e.g. `sudo sysctl -w user.max_user_namespaces=15000`)")
    if err in (errno.EPERM, errno.EACCES):
        return hints.userns_refused()
    return ""


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
        return hints.proc_refused()
    if err in (errno.EPERM, errno.EACCES):
        return hints.mount_refused()
    return ""


# open_tree(2) and move_mount(2) (Linux 5.2) have the same numbers on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_OPEN_TREE_CLONE = 1
_MOVE_MOUNT_F_EMPTY_PATH = 4
_MOVE_MOUNT_T_EMPTY_PATH = 0x40
_AT_EMPTY_PATH = 0x1000
_AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 1
MOUNT_ATTR_NOSUID = 2
MOUNT_ATTR_NODEV = 4
_MOUNT_ATTR_RDONLY = MOUNT_ATTR_RDONLY


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def clone_mount(path: str, recursive: bool = False, dirfd: int = -100) -> int:
    """A detached bind mount of `path` (with its submounts if `recursive`), as a descriptor.

    Unlike a plain bind, it can still be attached after the mount it came from is detached, which
    is what lets binds be placed after pivot_root, inside the new root.  An empty `path` clones
    `dirfd` itself.
    """
    flags = _OPEN_TREE_CLONE | os.O_CLOEXEC | (_AT_RECURSIVE if recursive else 0)
    if not path:
        flags |= _AT_EMPTY_PATH
    fd = _libc.syscall(_SYS_OPEN_TREE, dirfd, _b(path), flags)
    if fd < 0:
        err = ctypes.get_errno()
        hint = "open_tree(2) needs Linux >= 5.2" if err == errno.ENOSYS else ""
        raise KernelError(err, "clone mount", path, hint)
    return fd


def set_read_only(fd: int, recursive: bool) -> None:
    """Make a detached mount tree read-only, every submount included (mount_setattr, Linux 5.12)."""
    set_mount_attributes(fd, _MOUNT_ATTR_RDONLY, recursive)


def set_mount_attributes(fd: int, attributes: int, recursive: bool = False, path: str = "") -> None:
    """Set MOUNT_ATTR_* flags on the mount `fd` refers to, or on `path` relative to it (and their
    submounts if `recursive`)."""
    attr = _MountAttr(attributes, 0, 0, 0)
    flags = (0 if path else _AT_EMPTY_PATH) | (_AT_RECURSIVE if recursive else 0)
    result = _libc.syscall(_SYS_MOUNT_SETATTR, fd, _b(path), flags, ctypes.byref(attr), ctypes.sizeof(attr))
    if result != 0:
        err = ctypes.get_errno()
        raise KernelError(err, "set mount attributes", path or fd_path(fd),
                          "mount_setattr(2) needs Linux >= 5.12" if err == errno.ENOSYS else "")


def make_tree_read_only(path: str) -> None:
    """Every mount at and below `path`, in our mount namespace, read-only."""
    set_mount_attributes(-100, _MOUNT_ATTR_RDONLY, recursive=True, path=path)


_pythonapi = ctypes.pythonapi


def fork_into(flags: int, cgroup_fd: int = -1, what: str = "fork") -> tuple[int, int]:
    """clone3() of this (possibly multi-threaded) Python process, with namespaces and a pidfd, as
    os.fork() would do it: Python's own before/after-fork work runs (locks, threads, at-fork
    handlers), so the child finds the interpreter in order.  (pid, pidfd), or (0, -1) in the child.
    """
    # A thread that waits a switch interval for the GIL asks its holder to drop it.  os.fork()
    # clears that request in C before the child runs any bytecode; here the child runs a few
    # before PyOS_AfterFork_Child, and a request copied into it makes it wait forever for a
    # thread it does not have.  So no request may fall due while we fork, and a pending one is
    # served first (sleep(0) hands the GIL over).
    import sys
    import time
    interval = sys.getswitchinterval()
    sys.setswitchinterval(_FORK_INTERVAL)
    try:
        time.sleep(0)
        _pythonapi.PyOS_BeforeFork()
        try:
            pid, pidfd = clone(flags, cgroup_fd, what)
        except BaseException:
            _pythonapi.PyOS_AfterFork_Parent()
            raise
        if pid == 0:
            _pythonapi.PyOS_AfterFork_Child()
        else:
            _pythonapi.PyOS_AfterFork_Parent()
    finally:
        sys.setswitchinterval(interval)
    return pid, pidfd


_FORK_INTERVAL = 100.0  # seconds: longer than any fork takes


def attach_mount(fd: int, target: str | int, source: str) -> None:
    """Attach a mount made by clone_mount() on `target`: a path, or a descriptor of the mount point."""
    if isinstance(target, int):
        result = _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", target, b"",
                               _MOVE_MOUNT_F_EMPTY_PATH | _MOVE_MOUNT_T_EMPTY_PATH)
        where = fd_path(target)
    else:
        result = _libc.syscall(_SYS_MOVE_MOUNT, fd, b"", -100, _b(target), _MOVE_MOUNT_F_EMPTY_PATH)
        where = target
    _check(result, f"bind {source} on", where)


def fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"<fd {fd}>"


_SYS_OPENAT2 = 437
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_IN_ROOT = 0x10


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def openat2(dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
    """open(2) relative to `dirfd`, with path resolution restricted by `resolve` (Linux 5.6)."""
    how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
    # With RESOLVE_IN_ROOT, a ".." is refused with EAGAIN if any mount or rename happened on the
    # machine meanwhile (another sandbox being built): the kernel asks us to try again.
    for _attempt in range(_OPENAT2_TRIES):
        fd = _libc.syscall(_SYS_OPENAT2, dirfd, _b(path), ctypes.byref(how), ctypes.sizeof(how))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        if err != errno.EAGAIN:
            break
    raise KernelError(err, "open", path, "openat2(2) needs Linux >= 5.6" if err == errno.ENOSYS else "")


_OPENAT2_TRIES = 1000


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


_TIOCSCTTY = 0x540E
_TIOCSPTLCK = 0x40045431  # _IOW('T', 0x31, int)
_TIOCGPTPEER = 0x5441     # _IO('T', 0x41), Linux >= 4.13


def open_pty(devpts: int) -> tuple[int, int]:
    """A new terminal of the devpts instance whose root is `devpts`: (master, slave), both
    close-on-exec.  The slave is opened from the master (TIOCGPTPEER), never by a path."""
    master = os.open("ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC, dir_fd=devpts)
    try:
        unlock = ctypes.c_int(0)
        _check(_libc.ioctl(master, _TIOCSPTLCK, ctypes.byref(unlock)), "unlock the pty", "/dev/pts/ptmx")
        slave = _libc.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
        if slave < 0:
            raise KernelError(ctypes.get_errno(), "open the pty's terminal", "/dev/pts/ptmx",
                              "TIOCGPTPEER needs Linux >= 4.13")
    except BaseException:
        os.close(master)
        raise
    return master, slave


def set_controlling_terminal(fd: int) -> None:
    """Make the terminal open on `fd` this session leader's controlling terminal."""
    _check(_libc.ioctl(fd, _TIOCSCTTY, 0), "make the controlling terminal", fd_path(fd))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def drop_capabilities() -> None:
    """Give up every capability (effective, permitted, inheritable; ambient goes with them): a
    process that owns its user namespace holds them all there, which lets it read its own files
    whatever their mode, as a normal user cannot."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    nothing = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), nothing), "drop capabilities")


def set_no_new_privs() -> None:
    """No exec may grant privileges again (setuid bits, file capabilities); needed for seccomp."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)


_SYS_KEYCTL = {"x86_64": 250, "aarch64": 219, "riscv64": 219, "loongarch64": 219}
_KEYCTL_JOIN_SESSION_KEYRING = 1


def join_new_session_keyring() -> None:
    """Leave the owner's session keyring for a fresh anonymous one (runc does the same)."""
    number = _SYS_KEYCTL.get(_MACHINE)
    if number is None:
        return  # the seccomp filter refuses keyctl anyway; nothing to leave on unknown machines
    result = _libc.syscall(number, _KEYCTL_JOIN_SESSION_KEYRING, None)
    if result < 0:
        err = ctypes.get_errno()
        # ENOSYS: a kernel without keys has no keyring to leave.  EPERM: a seccomp filter around
        # us (Docker's, or an isolated test's) refuses keyctl, and will refuse it to the sandbox too.
        if err not in (errno.ENOSYS, errno.EPERM):
            raise KernelError(err, "join a new session keyring")


def set_process_name(name: str) -> None:
    _libc.prctl(ctypes.c_int(PR_SET_NAME), ctypes.c_char_p(name.encode()[:15]), ctypes.c_ulong(0),
                ctypes.c_ulong(0), ctypes.c_ulong(0))


def write_id_maps(uid: int, gid: int, inner_uid: int = 0, inner_gid: int = 0, pid: str = "self") -> None:
    """Map `inner_uid`/`inner_gid` inside the current user namespace to `uid`/`gid` of its parent."""
    base = f"/proc/{pid}"
    try:
        _write(f"{base}/setgroups", "deny")
        _write(f"{base}/uid_map", f"{inner_uid} {uid} 1\n")
        _write(f"{base}/gid_map", f"{inner_gid} {gid} 1\n")
    except OSError as exc:
        raise KernelError(exc.errno or errno.EPERM, "write user namespace id map", exc.filename,
                          hints.userns_refused() if exc.errno in (errno.EPERM, errno.EACCES) else "") from None


#: The distribution's setuid helpers (package uidmap), which grant the ranges of /etc/subuid and
#: /etc/subgid; only their absolute paths, never a PATH lookup.
NEWUIDMAP = "/usr/bin/newuidmap"
NEWGIDMAP = "/usr/bin/newgidmap"


def map_ranges(pid: int, ranges: dict, helpers: bool, proc: int | None = None) -> None:
    """Give the user namespace of process `pid` (a child namespace of ours) the id ranges
    `ranges` = {"uid": [[inside, outside, count], ...], "gid": [...]}, from outside it.

    With `helpers`, newuidmap/newgidmap write them (a normal user's /etc/subuid ranges); else we
    do, holding CAP_SETUID and CAP_SETGID over the parent namespace (host root; a sandbox's init
    for its commands).  setgroups stays allowed: an image's programs switch groups.  The kernel
    wants each line to fall within one line of the parent's map, so nested maps repeat its lines."""
    if helpers:
        for tool, kind in ((NEWUIDMAP, "uid"), (NEWGIDMAP, "gid")):
            _run_helper(tool, [str(pid), *(str(n) for line in ranges[kind] for n in line)])
        return
    for kind in ("uid", "gid"):
        text = "".join(f"{inside} {outside} {count}\n" for inside, outside, count in ranges[kind])
        path = f"{pid}/{kind}_map" if proc is not None else f"/proc/{pid}/{kind}_map"
        try:
            _write(path, text, dir_fd=proc)
        except OSError as exc:
            raise KernelError(exc.errno or errno.EPERM, f"write the {kind} ranges {text.strip()!r}",
                              f"/proc/{pid}/{kind}_map") from None


def _run_helper(tool: str, args: list[str]) -> None:
    """Run newuidmap/newgidmap with a clean environment and wait; its complaint is the error."""
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        child = os.posix_spawn(tool, [tool, *args], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
                               file_actions=[(os.POSIX_SPAWN_DUP2, err_w, 2),
                                             (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                                             (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0)])
    except OSError as exc:
        os.close(err_r)
        os.close(err_w)
        raise KernelError(exc.errno or errno.ENOENT, "run", tool,
                          "install the package uidmap (apt install uidmap)") from None
    os.close(err_w)
    said = b""
    try:
        while len(said) < 4096 and (chunk := os.read(err_r, 4096)):
            said += chunk
    finally:
        os.close(err_r)
    _, status = os.waitpid(child, 0)
    if status != 0:
        text = said.decode(errors="replace").strip().replace("\n", "; ") or f"wait status {status}"
        raise KernelError(errno.EPERM, "run " + " ".join([tool, *args]), None,
                          f"it said: {text}. The ranges must be yours in /etc/subuid and /etc/subgid")


def _write(path: str, text: str, dir_fd: int | None = None) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _b(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)
