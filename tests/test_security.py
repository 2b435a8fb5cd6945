"""Each security promise of the sandbox, tried the way an attacker inside would try it."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import time
from pathlib import Path

import pytest

from pytest_nsbox.engine import caps

from .helpers import host_python, processes_in_pid_namespace


def test_cached_tree_is_never_modified(sandbox, sandbox_factory):
    tree = sandbox.rootfs.tree
    before = (tree / "etc/passwd").read_bytes()
    assert sandbox.run("echo evil >> /etc/passwd; rm -f /bin/busybox.keep; rm -rf /usr/share; "
                       "touch /new-file").returncode == 0
    assert sandbox.run(["grep", "-c", "evil", "/etc/passwd"]).stdout == "1\n"
    assert (tree / "etc/passwd").read_bytes() == before
    assert (tree / "usr/share").is_dir()
    assert not (tree / "new-file").exists()
    fresh = sandbox_factory()
    assert fresh.run(["grep", "-c", "evil", "/etc/passwd"]).stdout == "0\n"
    assert fresh.run(["test", "-e", "/new-file"]).returncode == 1


def test_read_only_bind_cannot_be_written_remounted_or_unmounted(sandbox_factory, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("original")
    box = sandbox_factory(mounts=[(data, "/data")])
    assert box.read_file("/data/f") == "original"
    assert box.run("echo x > /data/f").returncode != 0
    assert box.run("mount -o remount,rw /data").returncode != 0
    assert box.run("mount -o remount,bind,rw /data").returncode != 0
    assert box.run("umount /data").returncode != 0
    assert box.run("umount -l /data").returncode != 0
    assert box.run("echo x > /data/f").returncode != 0
    assert (data / "f").read_text() == "original"


def test_rw_bind_is_writable_and_shared_with_host(sandbox_factory, tmp_path):
    box = sandbox_factory(mounts=[(tmp_path, "/work", "rw"), (tmp_path, "/ro")])
    box.run("echo from-sandbox > /work/out", check=True)
    assert (tmp_path / "out").read_text() == "from-sandbox\n"
    assert box.run("echo x > /ro/other").returncode != 0


def test_single_file_bind(sandbox_factory, tmp_path):
    host_file = tmp_path / "config.ini"
    host_file.write_text("[x]\n")
    box = sandbox_factory(mounts=[(host_file, "/etc/app/config.ini")])
    assert box.read_file("/etc/app/config.ini") == "[x]\n"


def test_bind_target_through_absolute_symlink_stays_inside(sandbox_factory, tmp_path):
    # /var/run -> /run in Alpine: the bind must land in the sandbox's /run, not the host's.
    (tmp_path / "f").write_text("x")
    box = sandbox_factory(mounts=[(tmp_path, "/var/run/thing")])
    assert box.read_file("/run/thing/f") == "x"
    assert not os.path.exists("/run/thing")


def test_host_interpreter_is_unreachable_through_proc_1_exe(sandbox):
    import sys
    assert sandbox.run("cat /proc/1/exe > /dev/null").returncode != 0
    assert sandbox.run("echo x >> /proc/1/exe").returncode != 0
    assert sandbox.run("readlink /proc/1/exe").returncode != 0
    assert sandbox.run(["ls", "/proc/1/root/"]).returncode != 0
    assert os.path.getsize(sys.executable) > 0


def test_only_stdio_descriptors_are_inherited(sandbox):
    leaked = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        sleeper = sandbox.spawn(["sleep", "30"])
    finally:
        os.close(leaked)
    fds = sandbox.run(["ls", f"/proc/{sleeper.pid}/fd"]).stdout.split()
    assert sorted(fds, key=int) == ["0", "1", "2"]
    assert sandbox.run(["readlink", "/proc/self/cwd"]).stdout == "/\n"


def test_commands_run_in_a_new_session_without_terminal(sandbox):
    fields = sandbox.run(["sh", "-c", "cat /proc/$$/stat"]).stdout.rsplit(")", 1)[1].split()
    pid = int(sandbox.run(["sh", "-c", "echo $$"]).stdout)  # a later pid, same shape
    session, tty_nr = int(fields[3]), int(fields[4])
    assert tty_nr == 0
    assert session != 1 and pid > 1
    assert sandbox.run("exec 3</dev/tty").returncode != 0  # no controlling terminal to attack


def test_no_capabilities_over_the_outer_namespaces(sandbox):
    # Commands are root in a nested user namespace: they cannot rename the host-facing UTS
    # namespace or reconfigure the network namespace the sandbox was given.
    assert sandbox.run("hostname evil").returncode != 0
    assert sandbox.run("ip link add dummy0 type dummy").returncode != 0


def test_unavailable_namespaces_fail_loudly(pytester):
    """With user namespaces forbidden, nothing runs unsandboxed: the test fails with the cause."""
    pytester.makepyfile("def test_x(sandbox):\n    sandbox.run(['true'])\n")
    result = _run_without_user_namespaces(pytester)
    result.stdout.fnmatch_lines(["*nsbox: this machine cannot make sandboxes*max_user_namespaces*"])
    assert result.ret == 1
    skipped = _run_without_user_namespaces(pytester, "--nsbox-unavailable=skip")
    skipped.stdout.fnmatch_lines(["*1 skipped*"])


def _run_without_user_namespaces(pytester, *args):
    """Run pytest in a user namespace whose max_user_namespaces is 0 (as bwrap --disable-userns)."""
    import sys
    script = (
        "import os, sys\n"
        "from pytest_nsbox.engine import kernel\n"
        "uid, gid = os.getuid(), os.getgid()\n"
        "kernel.unshare(kernel.CLONE_NEWUSER)\n"
        "kernel.write_id_maps(uid, gid)\n"
        "open('/proc/sys/user/max_user_namespaces', 'w').write('0')\n"
        "import pytest\n"
        "sys.exit(pytest.main(sys.argv[1:]))\n")
    return pytester.run(sys.executable, "-c", script, "-p", "no:cacheprovider", *args, timeout=60)


@pytest.mark.skipif(not caps.is_global_root(), reason="only the host's root owns the host's sysctls")
def test_host_sysctls_are_read_only_when_the_owner_is_root(sandbox):
    # The same value back: harmless if the write went through, which is the bug.
    value = Path("/proc/sys/kernel/printk_ratelimit").read_text().strip()
    result = sandbox.run(f"echo {value} > /proc/sys/kernel/printk_ratelimit")
    assert result.returncode != 0 and "Read-only file system" in result.stderr
    mounts = sandbox.run(["cat", "/proc/mounts"]).stdout.splitlines()
    for path in ("/proc/sys", "/proc/irq", "/proc/bus"):
        options = [line.split()[3] for line in mounts if line.split()[1] == path]
        assert options and options[-1].startswith("ro,"), (path, options)


_KEYCTL = {"x86_64": (248, 250)}  # add_key, keyctl


@pytest.mark.skipif(os.uname().machine not in _KEYCTL, reason="syscall numbers known for x86_64 only")
@pytest.mark.parametrize("seccomp", [True, False], ids=["filtered", "unfiltered"])
def test_the_owners_session_keyring_is_out_of_reach(sandbox_factory, seccomp):
    add_key, keyctl = _KEYCTL[os.uname().machine]
    libc = ctypes.CDLL(None, use_errno=True)
    key = libc.syscall(add_key, b"user", b"nsbox-test-secret", b"s3cret", 6, -3)  # @s
    if key < 0:
        pytest.skip(f"no session keyring here: errno {ctypes.get_errno()}")
    try:
        box = sandbox_factory(rootfs="host", seccomp=seccomp)
        read = ("import ctypes; libc = ctypes.CDLL(None, use_errno=True); "
                "buf = ctypes.create_string_buffer(64); "
                f"n = libc.syscall({keyctl}, 11, {key}, buf, 64); "  # KEYCTL_READ
                "print(n, ctypes.get_errno(), buf.raw[:max(n, 0)].decode())")
        out = box.run([host_python(), "-I", "-S", "-c", read]).stdout.split()
        assert out[0] == "-1" and "s3cret" not in out, out
        # The filter refuses keyctl outright; without it, the key is simply not ours to read.
        assert int(out[1]) == (errno.EPERM if seccomp else errno.EACCES), out
    finally:
        libc.syscall(keyctl, 3, key)  # KEYCTL_REVOKE


_REFUSED_PROBES = {  # name: (x86_64 number, args) that succeed or fail otherwise without the filter
    "keyctl": (250, "0, -3, 0"),             # KEYCTL_GET_KEYRING_ID of @s
    "io_uring_setup": (425, "0, 0"),         # EINVAL without the filter
    "perf_event_open": (298, "0, 0, -1, -1, 0"),
}


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="syscall numbers known for x86_64 only")
def test_the_syscall_filter_is_on_by_default_and_can_be_turned_off(sandbox_factory):
    script = ("import ctypes, sys; libc = ctypes.CDLL(None, use_errno=True); "
              "n = libc.syscall(*map(int, sys.argv[1:])); print(ctypes.get_errno() if n < 0 else 0)")
    filtered, unfiltered = sandbox_factory(rootfs="host"), sandbox_factory(rootfs="host", seccomp=False)
    assert "Seccomp:\t2" in filtered.read_file("/proc/self/status")
    assert "NoNewPrivs:\t1" in unfiltered.read_file("/proc/self/status")
    for name, (number, args) in _REFUSED_PROBES.items():
        argv = [host_python(), "-I", "-S", "-c", script, str(number), *args.replace(",", " ").split()]
        expected = errno.ENOSYS if name.startswith("io_uring") else errno.EPERM
        assert int(filtered.run(argv).stdout) == expected, name
        assert int(unfiltered.run(argv).stdout) != expected, name


def test_commands_cannot_wedge_init_through_a_fake_proc(sandbox):
    # Init once read a process's state from the /proc its commands could mount over: a FIFO there
    # hung it, and with it timeouts, lifetimes and close().
    pids = " ".join(str(n) for n in range(2, 40))
    plant = (f"mount -t tmpfs none /proc && for p in {pids}; do mkdir /proc/$p && mkfifo /proc/$p/stat; "
             "done; yes > /dev/null & sleep 300")
    pid_ns = sandbox.namespaces["pid"]
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run(plant, timeout=1)
    assert time.monotonic() - started < 5
    assert sandbox.run(["pgrep", "-x", "yes"]).returncode == 1  # killed with its command
    sandbox.close()
    assert time.monotonic() - started < 8
    assert processes_in_pid_namespace(pid_ns) == []


def test_one_command_cannot_trace_or_read_another(sandbox):
    # Each command has a user namespace of its own, and tracing across them takes CAP_SYS_PTRACE
    # there: a command cannot read another's memory or environment (nor a command being started,
    # which is briefly a copy of init).
    other = sandbox.spawn(["sleep", "300"], env={"SECRET": "s3cret"})
    result = sandbox.run(f"cat /proc/{other.pid}/environ; head -c 1 /proc/{other.pid}/mem")
    assert "s3cret" not in result.stdout
    assert result.stderr.count("Permission denied") == 2, result.stderr
    assert sandbox.run(f"tr '\\0' '\\n' < /proc/{other.pid}/cmdline").stdout == "sleep\n300\n"


SPAWNER_ENVIRON = """
import sys
from pytest_nsbox import Sandbox
from pytest_nsbox.engine import client
with Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]) as box:
    with open(f"/proc/{client.Spawner.get().process.pid}/environ", "rb") as f:
        print(sorted(entry.split(b"=")[0].decode() for entry in f.read().split(b"\\0") if entry))
"""


def test_the_owners_environment_never_reaches_the_sandboxs_memory(alpine_tarball, cache_dir):
    # Every init is a copy of the spawner's memory: what the spawner never had, no init holds.
    import sys
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": "s3cret", "NSBOX_PREFORK": "0"}
    out = subprocess.run([sys.executable, "-c", SPAWNER_ENVIRON, str(alpine_tarball), str(cache_dir)],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "AWS_SECRET_ACCESS_KEY" not in out.stdout and "NSBOX_PREFORK" in out.stdout
