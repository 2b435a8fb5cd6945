"""The sandbox's syscall filter: refuse the kernel surfaces tests never need and escapes go through.

Namespaces decide what a sandbox can *see*; the kernel itself is still shared with the host, and
most container escapes are a bug in some rarely used kernel interface (eBPF, io_uring,
userfaultfd-assisted races, keyrings, perf events) reached from inside.  This filter removes those
interfaces, plus the host-administration calls Docker's default profile also refuses.  Everything
else stays allowed — namespaces, mounts, ptrace — because tests build nested sandboxes and debug.

The filter is a deny-list keyed on the syscall number only, never on arguments: since Linux 5.11
the kernel then caches "allowed" per syscall number and never runs the filter for an allowed call
(about 10 ns more per syscall, measured).  See docs/seccomp.md for the table and the figures.

Loaded in the sandbox's init, forked from the small spawner: only ctypes, errno, os and struct.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from .kernel import KernelError

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing (see spawner.py)
if TYPE_CHECKING:
    from typing import Iterator

_GONE = ": ENOSYS, what kernels since then answer"

# syscall name -> (errno name, why).  The filter, docs/seccomp.md and tests/test_seccomp.py all
# read this table.
REFUSED = {
    "kexec_load": ("EPERM", "boots another kernel in place of the host's"),
    "kexec_file_load": ("EPERM", "boots another kernel in place of the host's"),
    "init_module": ("EPERM", "loads code into the kernel every sandbox and the host share"),
    "finit_module": ("EPERM", "loads code into the kernel every sandbox and the host share"),
    "delete_module": ("EPERM", "unloads a module from the shared kernel"),
    "bpf": ("EPERM", "eBPF's verifier and JIT: a large surface behind many kernel privilege "
                     "escalations; classic socket filters and seccomp do not need it"),
    "perf_event_open": ("EPERM", "performance counters: a long CVE record and a side channel on "
                                 "the host's CPUs; profile tests from outside the sandbox"),
    "userfaultfd": ("EPERM", "pauses the kernel in the middle of a copy from user memory: the usual "
                             "way exploits win kernel race conditions"),
    "io_uring_setup": ("ENOSYS", "a second syscall interface that seccomp cannot see into, with "
                                 "many privilege escalations; ENOSYS is what kernels without io_uring "
                                 "answer, so liburing, libuv and others fall back to epoll or threads"),
    "io_uring_enter": ("ENOSYS", "as io_uring_setup (without a ring it can only fail anyway)"),
    "io_uring_register": ("ENOSYS", "as io_uring_setup (without a ring it can only fail anyway)"),
    "keyctl": ("EPERM", "kernel keyrings are not isolated by namespaces: the sandbox inherits the "
                        "host user's session keyring and could read or change its keys"),
    "add_key": ("EPERM", "as keyctl: adds keys to keyrings shared with the host"),
    "request_key": ("EPERM", "as keyctl, and it can make the kernel run a host helper program"),
    "acct": ("EPERM", "switches the host's process accounting"),
    "quotactl": ("EPERM", "manages disk quotas of host filesystems"),
    "quotactl_fd": ("EPERM", "manages disk quotas of host filesystems"),
    "swapon": ("EPERM", "adds swap to the host"),
    "swapoff": ("EPERM", "removes swap from the host"),
    "reboot": ("EPERM", "restarts the host (host root), or ends the sandbox from inside (its root)"),
    "syslog": ("EPERM", "reads or clears the host kernel's log: kernel addresses, other users' "
                        "messages"),
    "open_by_handle_at": ("EPERM", "opens a file by handle, without a path: how the 'Shocker' "
                                   "escape read host files from Docker containers"),
    "iopl": ("EPERM", "raw access to the machine's I/O ports"),
    "ioperm": ("EPERM", "raw access to the machine's I/O ports"),
    "settimeofday": ("EPERM", "sets the host's clock: the wall clock is not namespaced"),
    "stime": ("EPERM", "sets the host's clock (i386 only)"),
    "clock_settime": ("EPERM", "sets the host's clock: the wall clock is not namespaced"),
    "clock_settime64": ("EPERM", "sets the host's clock (i386 only)"),
    "uselib": ("ENOSYS", "the a.out-era library loader, configured out of most kernels, where "
                         "ENOSYS is the answer too"),
    "lookup_dcookie": ("ENOSYS", "oprofile's path lookup, gone in 5.12" + _GONE),
    "nfsservctl": ("ENOSYS", "the old NFS server control, gone in 3.1" + _GONE),
    "_sysctl": ("ENOSYS", "binary sysctl, gone in 5.5" + _GONE),
    "create_module": ("ENOSYS", "Linux 2.4's module interface, gone in 2.6" + _GONE),
    "get_kernel_syms": ("ENOSYS", "Linux 2.4's module interface, gone in 2.6" + _GONE),
    "query_module": ("ENOSYS", "Linux 2.4's module interface, gone in 2.6" + _GONE),
    "vm86": ("ENOSYS", "virtual-8086 mode (i386 only): 64-bit kernels answer ENOSYS too"),
    "vm86old": ("ENOSYS", "virtual-8086 mode (i386 only): 64-bit kernels answer ENOSYS too"),
}

# Looked at and left allowed on purpose: syscall name(s) -> why.  For the doc and the tests.
KEPT = {
    ("clone", "clone3", "unshare", "setns", "mount", "umount2", "pivot_root", "fsopen", "fsconfig",
     "fsmount", "fspick", "move_mount", "open_tree", "mount_setattr"):
        "tests build nested sandboxes (bwrap, podman, pytest-nsbox itself); the user namespace "
        "already limits them to what the sandbox owns",
    ("ptrace", "process_vm_readv", "process_vm_writev"):
        "debuggers and profilers in tests need them; the PID namespace confines them to the "
        "sandbox's own processes",
    ("seccomp", "prctl"):
        "programs add their own filters (bwrap, systemd, browsers); a filter can only narrow",
    ("personality",):
        "gdb and setarch turn off address randomization with it; its flags only change the calling "
        "process, and the old personality tricks against setuid programs are void under "
        "no_new_privs",
    ("kcmp",):
        "Mesa and CRIU compare file descriptions with it; it needs ptrace access to both processes "
        "and answers only an ordering of obfuscated pointers",
    ("fanotify_init",):
        "file watchers may use it; without host privileges the kernel (5.13+) grants only the "
        "inotify-like unprivileged mode",
    ("name_to_handle_at",):
        "systemd and util-linux read mount ids with it; the handle is useless without "
        "open_by_handle_at",
    ("adjtimex", "clock_adjtime", "clock_adjtime64"):
        "ntp_gettime() and time-sync checks read the clock's state with them; changing it needs "
        "CAP_SYS_TIME on the host, which no sandbox has (Docker allows them too)",
}

# syscall name -> its number on (x86_64, i386, aarch64); None where that ABI lacks it.  Checked
# against the kernel's uapi headers by the tests.
_NUMBERS = {
    "kexec_load": (246, 283, 104),
    "kexec_file_load": (320, None, 294),
    "init_module": (175, 128, 105),
    "finit_module": (313, 350, 273),
    "delete_module": (176, 129, 106),
    "bpf": (321, 357, 280),
    "perf_event_open": (298, 336, 241),
    "userfaultfd": (323, 374, 282),
    "io_uring_setup": (425, 425, 425),
    "io_uring_enter": (426, 426, 426),
    "io_uring_register": (427, 427, 427),
    "keyctl": (250, 288, 219),
    "add_key": (248, 286, 217),
    "request_key": (249, 287, 218),
    "acct": (163, 51, 89),
    "quotactl": (179, 131, 60),
    "quotactl_fd": (443, 443, 443),
    "swapon": (167, 87, 224),
    "swapoff": (168, 115, 225),
    "reboot": (169, 88, 142),
    "syslog": (103, 103, 116),
    "open_by_handle_at": (304, 342, 265),
    "iopl": (172, 110, None),
    "ioperm": (173, 101, None),
    "settimeofday": (164, 79, 170),
    "stime": (None, 25, None),
    "clock_settime": (227, 264, 112),
    "clock_settime64": (None, 404, None),
    "uselib": (134, 86, None),
    "lookup_dcookie": (212, 253, 18),
    "nfsservctl": (180, 169, 42),
    "_sysctl": (156, 149, None),
    "create_module": (174, 127, None),
    "get_kernel_syms": (177, 130, None),
    "query_module": (178, 167, None),
    "vm86": (None, 166, None),
    "vm86old": (None, 113, None),
}

# seccomp_data.arch values (linux/audit.h): the ELF machine plus 64-bit and little-endian bits.
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
AUDIT_ARCH_AARCH64 = 0xC00000B7

# x32 shares x86_64's audit arch and marks its syscalls with this bit.  Refused as a whole with
# ENOSYS: that is what the many kernels built without x32 answer.
X32_SYSCALL_BIT = 0x40000000
X32_ERRNO = "ENOSYS"

# machine -> the ABIs its processes can enter the kernel through: (seccomp_data.arch, column of
# _NUMBERS).  i386 is listed so a 32-bit program (or int 0x80 from a 64-bit one) meets the same
# refusals.  Any other ABI — arm32 on aarch64, which needs a table of its own — kills the process:
# returning an errno for every call, exit included, would leave it running blind.
_ABIS = {
    "x86_64": ((AUDIT_ARCH_X86_64, 0), (AUDIT_ARCH_I386, 1)),
    "aarch64": ((AUDIT_ARCH_AARCH64, 2),),
}
ARCHITECTURES = tuple(_ABIS)

# Classic BPF (linux/filter.h, linux/seccomp.h).
_LD_W_ABS = 0x20
_JEQ_K = 0x15
_JGE_K = 0x35
_RET_K = 0x06
_OFFSET_NR = 0
_OFFSET_ARCH = 4
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO = 0x00050000
_RET_ALLOW = 0x7FFF0000

_PR_SET_SECCOMP = 22
_PR_SET_NO_NEW_PRIVS = 38
_SECCOMP_MODE_FILTER = 2

_cache: dict[str, bytes] = {}
_fprogs: dict[bytes, tuple] = {}


def program(arch: str | None = None) -> bytes:
    """The filter for `arch` (default: this machine) as raw BPF, `struct sock_filter`s end to end.

    Built once per arch and kept, with what install() passes to the kernel: the spawner can call
    this before forking, and each sandbox's init then only makes two prctl calls.  Raises
    KernelError (ENOSYS) for an architecture without a table.
    """
    arch = arch or _MACHINE
    if arch not in _cache:
        refused = {name: err for name, (err, _why) in REFUSED.items()}
        _cache[arch] = assemble(arch, refused, X32_ERRNO)
        _fprog(_cache[arch])
    return _cache[arch]


def install(prog: bytes | None = None) -> None:
    """Filter every syscall of this process and of all it will start, for good.

    `prog` defaults to program().  Sets no_new_privs first: the kernel lets only a process that can
    never gain privileges through exec install a filter without CAP_SYS_ADMIN.
    """
    fprog = _fprog(program() if prog is None else prog)
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "set no_new_privs")
    _prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, "install seccomp filter", ctypes.addressof(fprog))


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _fprog(prog: bytes) -> _SockFprog:
    if prog not in _fprogs:
        buffer = ctypes.create_string_buffer(prog, len(prog))
        _fprogs[prog] = (_SockFprog(len(prog) // 8, ctypes.addressof(buffer)), buffer)
    return _fprogs[prog][0]


_MACHINE = os.uname().machine
# Resolved at import, in the spawner, so that no sandbox's init pays for the symbol lookup.
_libc_prctl = ctypes.CDLL(None, use_errno=True).prctl
_libc_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _prctl(option: int, arg2: int, operation: str, arg3: int = 0) -> None:
    # prctl(PR_SET_SECCOMP) rather than seccomp(2): same kernel path, and no per-arch number.
    if _libc_prctl(option, arg2, arg3, 0, 0) != 0:
        err = ctypes.get_errno()
        hint = ("the kernel has no seccomp filters (CONFIG_SECCOMP_FILTER) or refused this "
                "program: pass seccomp=False to run without the filter" if err == errno.EINVAL else "")
        raise KernelError(err, operation, None, hint)


def assemble(arch: str, refused: dict[str, str], x32_errno: str) -> bytes:
    """The filter refusing each syscall of `refused` (name -> errno name) on every ABI of `arch`.

    program() is this with REFUSED; the tests use it to build variants.
    """
    abis = _ABIS.get(arch)
    if abis is None:
        raise KernelError(errno.ENOSYS, "seccomp filter", None,
                          f"pytest-nsbox knows the syscall numbers of {', '.join(ARCHITECTURES)}, "
                          f"not of {arch}: pass seccomp=False to run without the filter")
    code: list = [(_LD_W_ABS, _OFFSET_ARCH, None, None)]
    code += [(_JEQ_K, audit, f"abi{column}", None) for audit, column in abis]
    code.append((_RET_K, _RET_KILL_PROCESS, None, None))
    for audit, column in abis:
        code += _section(audit, column, refused, x32_errno)
    return _link(code)


def _section(audit: int, column: int, refused: dict[str, str], x32_errno: str) -> list:
    """One ABI's part of the filter: load the number, search it, the returns at the end."""
    at = f"abi{column}"
    numbers = sorted(_refusals(column, refused))
    code: list = [at, (_LD_W_ABS, _OFFSET_NR, None, None)]
    if audit == AUDIT_ARCH_X86_64:
        code.append((_JGE_K, X32_SYSCALL_BIT, f"{at}.{x32_errno}", None))
    code += _search(numbers, at)
    code += [f"{at}.allow", (_RET_K, _RET_ALLOW, None, None)]
    for err in sorted({x32_errno, *(err for _nr, err in numbers)}):
        code += [f"{at}.{err}", (_RET_K, _RET_ERRNO | getattr(errno, err), None, None)]
    return code


def _search(numbers: list[tuple[int, str]], at: str) -> list:
    """A binary search over the sorted refused numbers, ending in a few equality tests.

    Short paths matter more than they seem: at install, the kernel runs the filter once per
    syscall number and ABI to find the always-allowed ones, and that is most of install's cost.
    """
    if len(numbers) <= 3:
        tests = [(_JEQ_K, nr, f"{at}.{err}", None) for nr, err in numbers]
        if tests:  # the last test's miss goes straight to allow, past the other leaves
            tests[-1] = (_JEQ_K, numbers[-1][0], f"{at}.{numbers[-1][1]}", f"{at}.allow")
        return tests
    half = len(numbers) // 2
    right = f"{at}.{numbers[half][0]}"
    return ([(_JGE_K, numbers[half][0], right, None)] + _search(numbers[:half], at)
            + [right] + _search(numbers[half:], at))


def _refusals(column: int, refused: dict[str, str]) -> Iterator[tuple[int, str]]:
    for name, err in refused.items():
        nr = _NUMBERS[name][column]
        if nr is not None:
            yield nr, err


def _link(code: list) -> bytes:
    """Instructions (code, k, jump-if-true label, jump-if-false label) and labels -> raw BPF."""
    where, position = {}, 0
    for item in code:
        if isinstance(item, str):
            where[item] = position
        else:
            position += 1
    insns = [item for item in code if not isinstance(item, str)]
    # Little-endian whatever the host: both supported machines are, and a program may be built
    # for the other one.
    return b"".join(struct.pack("<HBBI", op, _jump(where, jt, i), _jump(where, jf, i), k)
                    for i, (op, k, jt, jf) in enumerate(insns))


def _jump(where: dict[str, int], label: str | None, here: int) -> int:
    """A conditional jump's 8-bit offset, counted past `here`; no label: the next instruction."""
    offset = 0 if label is None else where[label] - here - 1
    if not 0 <= offset <= 255:
        raise ValueError(f"BPF jump offset {offset} out of range")
    return offset
