"""The syscall filter, tried on the real kernel: each refusal, the ABIs around it, what stays allowed.

Every probe runs in a forked child (a filter is for life).  The children that call refused
syscalls first enter a fresh user namespace, where they hold no capability of the host: should the
filter ever miss one, the kernel refuses it too, so no probe can change the host.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import pathlib
import shutil
import signal
import struct
import subprocess
import sys
import traceback

import pytest

from pytest_nsbox.engine import kernel, seccomp
from pytest_nsbox.engine.kernel import KernelError

MACHINE = os.uname().machine
COLUMN = {"x86_64": 0, "aarch64": 2}.get(MACHINE)
I386 = 1
# An errno no syscall probed here returns by itself: a filter built with it shows which calls the
# filter answered, even those the kernel would also refuse with EPERM.
MARKER = "ENOTUNIQ"
REPO = pathlib.Path(__file__).resolve().parent.parent

needs_filter = pytest.mark.skipif(COLUMN is None, reason=f"no syscall table for {MACHINE}")
x86_64_only = pytest.mark.skipif(MACHINE != "x86_64", reason="x86_64 ABIs")

libc = ctypes.CDLL(None, use_errno=True)


def syscall(nr: int, *args: int) -> int:
    """The raw result: the value, or -errno."""
    result = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
    return -ctypes.get_errno() if result == -1 else result


def in_child(fn, *args):
    """fn(*args) in a forked child; its JSON result, or its traceback raised here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            data, code = json.dumps(fn(*args)).encode(), 0
        except BaseException:
            data, code = traceback.format_exc().encode(), 1
        os.write(w, data)
        os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        raise AssertionError(f"child killed by {signal.Signals(os.WTERMSIG(status)).name}")
    if os.WEXITSTATUS(status):
        raise AssertionError(data.decode())
    return json.loads(data)


def refused_numbers(column: int) -> dict[str, int]:
    numbers = {name: seccomp._NUMBERS[name][column] for name in seccomp.REFUSED}
    return {name: nr for name, nr in numbers.items() if nr is not None}


def marker_program() -> bytes:
    return seccomp.assemble(MACHINE, {name: MARKER for name in seccomp.REFUSED}, MARKER)


def probe(call, numbers: dict[str, int], prog: bytes | None = None) -> dict[str, str]:
    """Install `prog` in a process without host privileges, call each number with zero arguments."""
    kernel.unshare(kernel.CLONE_NEWUSER)
    seccomp.install(prog)
    return {name: errno.errorcode.get(-call(nr), "OK") for name, nr in numbers.items()}


@needs_filter
def test_refused_syscalls_answer_their_errno():
    numbers = refused_numbers(COLUMN)
    answers = in_child(probe, syscall, numbers)
    assert answers == {name: seccomp.REFUSED[name][0] for name in numbers}


@needs_filter
def test_the_filter_itself_answers_every_refused_syscall():
    numbers = refused_numbers(COLUMN)
    assert in_child(probe, syscall, numbers, marker_program()) == dict.fromkeys(numbers, MARKER)


@x86_64_only
def test_x32_abi_is_refused():
    x32 = {"getpid": seccomp.X32_SYSCALL_BIT | 39, "keyctl": seccomp.X32_SYSCALL_BIT | 250}
    assert in_child(probe, syscall, x32) == dict.fromkeys(x32, "ENOSYS")
    # ENOSYS is also what a kernel without x32 answers: the marker shows the filter answered.
    assert in_child(probe, syscall, x32, marker_program()) == dict.fromkeys(x32, MARKER)


# int 0x80 from a 64-bit process enters the kernel through the i386 ABI, with i386 numbers: the
# classic way around a filter that checks only x86_64's.  push rbx; mov eax, edi; zero ebx, ecx,
# edx, esi, edi; int 0x80; pop rbx; ret.
INT80 = bytes.fromhex("53 89f8 31db 31c9 31d2 31f6 31ff cd80 5b c3")


def int80_call():
    code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    code.write(INT80)
    address = ctypes.addressof(ctypes.c_char.from_buffer(code))
    function = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int)(address)
    function.keep = code  # the mapping must live as long as the function
    return function


def int80_getpid() -> list[int]:
    return [int80_call()(20), os.getpid()]


@pytest.fixture
def int80():
    if MACHINE != "x86_64":
        pytest.skip("x86_64 ABIs")
    try:
        pid, expected = in_child(int80_getpid)
    except AssertionError as exc:  # SIGSEGV: the kernel runs without ia32 emulation
        pytest.skip(f"no i386 syscalls here: {exc}")
    assert pid == expected


def int80_probe(numbers: dict[str, int], marked: bool) -> dict[str, str]:
    return probe(int80_call(), numbers, marker_program() if marked else None)


def test_i386_abi_meets_the_same_refusals(int80):
    numbers = refused_numbers(I386)
    assert in_child(int80_probe, numbers, False) == {name: seccomp.REFUSED[name][0]
                                                     for name in numbers}
    assert in_child(int80_probe, numbers, True) == dict.fromkeys(numbers, MARKER)
    assert in_child(int80_probe, {"getpid": 20, "getppid": 64}, False) == {"getpid": "OK",
                                                                          "getppid": "OK"}


I386_PROGRAM = r"""
static int sc(int nr, int a, int b, int c) {
    int r;
    __asm__ volatile ("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}
static const int numbers[] = {NUMBERS};
static unsigned char out[sizeof numbers / sizeof numbers[0]];
void _start(void) {
    for (unsigned i = 0; i < sizeof out; i++) {
        int r = sc(numbers[i], 0, 0, 0);
        out[i] = r < 0 && r > -4096 ? -r : 0;
    }
    sc(4, 1, (int)out, sizeof out);  /* write */
    sc(1, 0, 0, 0);                  /* exit */
}
"""


@pytest.fixture
def i386_binary(tmp_path):
    """A static 32-bit program that calls each i386 number and writes one errno byte per call."""
    if MACHINE != "x86_64" or not shutil.which("gcc"):
        pytest.skip("needs x86_64 and gcc")
    numbers = {"getpid": 20, **refused_numbers(I386)}
    source = tmp_path / "probe.c"
    source.write_text(I386_PROGRAM.replace("NUMBERS", ", ".join(map(str, numbers.values()))))
    binary = tmp_path / "probe"
    build = subprocess.run(["gcc", "-m32", "-static", "-nostdlib", "-ffreestanding", "-fno-pie",
                            "-no-pie", "-O1", "-o", str(binary), str(source)],
                           capture_output=True, text=True)
    if build.returncode:
        pytest.skip(f"gcc -m32 cannot build a static 32-bit program: {build.stderr[-300:]}")
    return binary, list(numbers)


def run_filtered(binary: pathlib.Path) -> list[int]:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            kernel.unshare(kernel.CLONE_NEWUSER)
            seccomp.install()
            os.dup2(w, 1)
            os.execv(binary, [str(binary)])
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return list(out)


def test_a_32_bit_program_meets_the_same_refusals(i386_binary):
    binary, names = i386_binary
    answers = dict(zip(names, (errno.errorcode.get(e, "OK") for e in run_filtered(binary))))
    assert answers == {"getpid": "OK", **{name: seccomp.REFUSED[name][0] for name in names[1:]}}


KCMP = {"x86_64": 312, "aarch64": 272}
PTRACE_TRACEME, PTRACE_CONT = 0, 7


class _Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


def traced_read(secret) -> str:
    """Fork a tracee, see it stop, read its memory like a debugger, let it finish."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the grandchild
        ok = libc.ptrace(PTRACE_TRACEME, 0, None, None) == 0
        os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSTOPPED(status) and os.WSTOPSIG(status) == signal.SIGSTOP
    copy = ctypes.create_string_buffer(len(secret))
    local = _Iovec(ctypes.addressof(copy), len(secret))
    remote = _Iovec(ctypes.addressof(secret), len(secret))
    assert libc.process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0) == len(secret)
    assert libc.ptrace(PTRACE_CONT, pid, None, None) == 0
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    return copy.value.decode()


def nested_sandbox(where: str) -> str:
    """What a test building its own sandbox does: user and mount namespaces, tmpfs, new mount API."""
    uid, gid = os.getuid(), os.getgid()
    kernel.unshare(kernel.CLONE_NEWUSER | kernel.CLONE_NEWNS)
    kernel.write_id_maps(uid, gid)
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
    os.makedirs(f"{where}/a")
    os.makedirs(f"{where}/b")
    kernel.mount("tmpfs", f"{where}/a", "tmpfs")
    with open(f"{where}/a/file", "w") as f:
        f.write("inside")
    kernel.attach_mount(kernel.clone_mount(f"{where}/a"), f"{where}/b", f"{where}/a")
    with open(f"{where}/b/file") as f:
        return f.read()


def fork_exit_code(code: int) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the grandchild
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def allowed_calls(where: str) -> dict:
    seccomp.install()
    secret = ctypes.create_string_buffer(b"nsbox")
    handle = ctypes.create_string_buffer(struct.pack("=Ii", 0, 0), 64)
    mount_id = ctypes.c_int()
    timex = ctypes.create_string_buffer(256)  # modes = 0: only read the clock's state
    fd = os.open("/", os.O_RDONLY)
    results = {
        "getpid": libc.getpid() == os.getpid(),
        "fork": fork_exit_code(7) == 7,
        "ptrace+process_vm_readv": traced_read(secret),
        "personality": libc.personality(0xFFFFFFFF) >= 0,
        "kcmp": syscall(KCMP[MACHINE], os.getpid(), os.getpid(), 0, fd, fd) == 0,
        # EOVERFLOW, with the size it needs, is how a handle's size is asked for.
        "name_to_handle_at": libc.name_to_handle_at(-100, b"/", handle, ctypes.byref(mount_id), 0) == -1
                             and ctypes.get_errno() == errno.EOVERFLOW,
        "adjtimex": libc.adjtimex(timex) >= 0,
    }
    seccomp.install()  # a second filter on top: seccomp and prctl stay usable
    results["nested sandbox"] = nested_sandbox(where)
    return results


@needs_filter
def test_what_tests_need_stays_allowed(tmp_path):
    assert in_child(allowed_calls, str(tmp_path)) == {
        "getpid": True, "fork": True, "ptrace+process_vm_readv": "nsbox", "personality": True,
        "kcmp": True, "name_to_handle_at": True, "adjtimex": True, "nested sandbox": "inside"}


def without_privileges() -> str:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
    with open("/proc/self/status") as f:
        status = dict(line.split(":\t", 1) for line in f.read().splitlines())
    assert int(status["CapEff"], 16) == 0, status["CapEff"]
    seccomp.install()
    return errno.errorcode[-syscall(seccomp._NUMBERS["keyctl"][COLUMN], 0)]


@needs_filter
@pytest.mark.skipif(os.geteuid() != 0, reason="this run is unprivileged already: every test shows it")
def test_installs_without_any_privilege():
    # no_new_privs is what lets a process without CAP_SYS_ADMIN install a filter.
    assert in_child(without_privileges) == "EPERM"


def test_unknown_architecture_is_refused_with_a_clear_error():
    with pytest.raises(KernelError) as info:
        seccomp.program("riscv64")
    assert info.value.errno == errno.ENOSYS
    assert "riscv64" in str(info.value) and "seccomp=False" in str(info.value)


def broken_install() -> list:
    try:
        seccomp.install(b"")
    except KernelError as exc:
        return [exc.errno, exc.strerror]
    return []


def test_a_refused_install_names_the_operation():
    err, message = in_child(broken_install)
    assert err == errno.EINVAL
    assert message.startswith("install seccomp filter: EINVAL")


def test_program_is_built_once_and_reused():
    assert seccomp.program("x86_64") is seccomp.program("x86_64")
    assert seccomp.program("aarch64") != seccomp.program("x86_64")


# A classic BPF interpreter for the few instructions the filter uses, to check the decisions of
# the program for an architecture this machine cannot run, and every number of this one.
def run_bpf(prog: bytes, nr: int, arch: int) -> int:
    data = struct.pack("<II", nr & 0xFFFFFFFF, arch) + bytes(56)
    pc = acc = 0
    while True:
        code, jt, jf, k = struct.unpack_from("<HBBI", prog, pc * 8)
        pc += 1
        if code == 0x20:
            acc = struct.unpack_from("<I", data, k)[0]
        elif code in (0x15, 0x35):
            pc += jt if (acc == k if code == 0x15 else acc >= k) else jf
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"unexpected BPF instruction {code:#x}")


ALLOW, KILL = 0x7FFF0000, 0x80000000
ERRNO = {name: 0x50000 | getattr(errno, name) for name in ("EPERM", "ENOSYS")}


@pytest.mark.parametrize("arch, abis", [
    ("x86_64", [(seccomp.AUDIT_ARCH_X86_64, 0), (seccomp.AUDIT_ARCH_I386, 1)]),
    ("aarch64", [(seccomp.AUDIT_ARCH_AARCH64, 2)]),
])
def test_every_number_gets_the_decision_of_the_table(arch, abis):
    prog = seccomp.program(arch)
    for audit, column in abis:
        refused = {nr: seccomp.REFUSED[name][0] for name, nr in refused_numbers(column).items()}
        for nr in range(1024):
            expected = ERRNO[refused[nr]] if nr in refused else ALLOW
            assert run_bpf(prog, nr, audit) == expected, (arch, audit, nr)
    foreign = {"x86_64": 0x40000028, "aarch64": 0x40000028}[arch]  # arm32 (and anything else)
    assert run_bpf(prog, 20, foreign) == KILL
    assert run_bpf(prog, 20, 0) == KILL


def test_x32_numbers_are_refused_whatever_they_are():
    prog = seccomp.program("x86_64")
    for nr in (0, 39, 512, 0x3FFFFFFF, 0xFFFFFFFF):
        assert run_bpf(prog, seccomp.X32_SYSCALL_BIT | nr, seccomp.AUDIT_ARCH_X86_64) == ERRNO["ENOSYS"]


HEADERS = {  # column -> candidate uapi headers, Debian's multiarch path first
    0: ["/usr/include/x86_64-linux-gnu/asm/unistd_64.h", "/usr/include/asm/unistd_64.h"],
    1: ["/usr/include/x86_64-linux-gnu/asm/unistd_32.h", "/usr/include/asm/unistd_32.h"],
    2: ["/usr/include/asm-generic/unistd.h"],
}


def header_numbers(path: str) -> dict[str, int]:
    """__NR_name -> number, leaving out asm-generic's blocks for 32-bit architectures only."""
    numbers, skipping = {}, False
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith("#if") and "__BITS_PER_LONG == 32" in line:
            skipping = True
        elif line.startswith("#endif"):
            skipping = False
        elif line.startswith("#define __NR_") and not skipping:
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                numbers[parts[1][len("__NR_"):]] = int(parts[2])
    return numbers


@pytest.mark.parametrize("column", [0, 1, 2], ids=["x86_64", "i386", "aarch64"])
def test_numbers_match_the_kernel_headers(column):
    path = next((p for p in HEADERS[column] if os.path.exists(p)), None)
    if path is None:
        pytest.skip(f"no uapi header here among {HEADERS[column]}")
    known = header_numbers(path)
    # Equal where the ABI has the syscall, None where it lacks it: no refusal is missing on any ABI.
    assert {name: seccomp._NUMBERS[name][column] for name in seccomp.REFUSED} == \
           {name: known.get(name) for name in seccomp.REFUSED}


def test_every_refusal_has_numbers_and_a_reason():
    assert set(seccomp.REFUSED) == set(seccomp._NUMBERS)
    for name, (err, why) in seccomp.REFUSED.items():
        assert err in ("EPERM", "ENOSYS") and why, name
    kept = {name for names in seccomp.KEPT for name in names}
    assert not kept & set(seccomp.REFUSED)


def doc_rows(heading: str) -> list[list[str]]:
    """The cells of the table under `heading` in docs/seccomp.md, backquotes removed."""
    section = (REPO / "docs/seccomp.md").read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split(" | ") for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip().replace("`", "") for cell in row] for row in rows[2:]]  # past the header


def test_the_doc_tables_are_the_module_tables():
    def numbers(name):
        return " / ".join("–" if nr is None else str(nr) for nr in seccomp._NUMBERS[name])

    assert doc_rows("Refused") == [[name, err, numbers(name), why]
                                   for name, (err, why) in seccomp.REFUSED.items()]
    assert doc_rows("Left allowed on purpose") == [[", ".join(names), why]
                                                   for names, why in seccomp.KEPT.items()]


def test_spawner_side_imports_stay_small():
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); import pytest_nsbox.engine.kernel; "
            "before = set(sys.modules); import pytest_nsbox.engine.seccomp as s; s.program(); "
            "print(' '.join(sorted(set(sys.modules) - before)))")
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], check=True,
                         capture_output=True, text=True).stdout.split()
    assert set(out) <= {"pytest_nsbox.engine.seccomp", "struct", "_struct"}, out
