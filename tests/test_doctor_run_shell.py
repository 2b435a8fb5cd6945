"""`nsbox doctor`, `nsbox run` and `nsbox shell`, driven as a user would: as subprocesses, on a pty."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from .conftest import REPO


def nsbox(*args: str, input: str | None = None, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True,
                          input=input, timeout=timeout, env={**os.environ, **(env or {})})


def on_a_pty(*args: str, keys: bytes, settle: float = 2.0, timeout: float = 30) -> tuple[str, int]:
    """Run `nsbox ARGS` on a new pty, type `keys` once it has settled, read until it ends."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "pytest_nsbox", *args])
    out = b""
    typed = False
    started = time.monotonic()
    try:
        while time.monotonic() - started < timeout:
            if not typed and time.monotonic() - started > settle:
                os.write(fd, keys)
                typed = True
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 4096)
                except OSError:  # EIO: nsbox is gone
                    break
                if not data:
                    break
                out += data
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return out.decode(errors="replace"), os.waitstatus_to_exitcode(status)


# -- doctor ---------------------------------------------------------------------------------------
def test_doctor_performs_every_step_and_says_sandboxes_work():
    result = nsbox("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("user namespace and id maps", "mount namespace", "PID namespace and a fresh /proc",
                 "network namespace and loopback", "overlay in a user namespace", "/dev: device binds",
                 "pivot_root", "seccomp filter and no_new_privs", "PID and memory caps", "rootfs cache",
                 "a sandbox, end to end"):
        assert any(line.split()[0] == "ok" and step in line for line in result.stdout.splitlines()), step
    assert result.stdout.rstrip().endswith("sandboxes work here")


def test_doctor_json_is_one_object_for_machines():
    report = json.loads(nsbox("doctor", "--json").stdout)
    assert report["ok"] is True
    assert {check["status"] for check in report["checks"]} <= {"ok", "info"}
    assert all(set(check) == {"name", "status", "detail", "fix"} for check in report["checks"])


DISABLED_USERNS = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from pytest_nsbox.engine import kernel
    uid, gid = os.getuid(), os.getgid()
    kernel.unshare(kernel.CLONE_NEWUSER)
    kernel.write_id_maps(uid, gid)
    # A user namespace's own limit, as `sysctl user.max_user_namespaces=0` sets the host's.
    with open("/proc/sys/user/max_user_namespaces", "w") as f:
        f.write("0")
    os.execv(sys.executable, [sys.executable, "-m", "pytest_nsbox", "doctor", *sys.argv[2:]])
""")


def test_doctor_on_a_host_without_user_namespaces_names_the_sysctl():
    run = [sys.executable, "-c", DISABLED_USERNS, str(REPO)]
    text = subprocess.run(run, capture_output=True, text=True, timeout=60)
    assert text.returncode == 1 and "Traceback" not in text.stdout + text.stderr, text.stderr
    assert "MISSING  user namespace and id maps" in text.stdout
    assert "fix: user namespaces are disabled: run `sudo sysctl -w user.max_user_namespaces=15000`" in text.stdout
    assert text.stdout.rstrip().endswith("sandboxes cannot be made here: fix what is MISSING above")
    machine = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=60).stdout)
    (userns,) = [check for check in machine["checks"] if check["name"] == "user namespace and id maps"]
    assert machine["ok"] is False and userns["status"] == "missing"
    assert userns["detail"].startswith("create a user namespace and id maps: ENOSPC")


# -- run ----------------------------------------------------------------------------------------
def test_run_passes_stdio_and_the_exit_status_through():
    result = nsbox("run", "--env", "GREETING=hi", "--hostname", "box", "--",
                   "sh", "-c", "read line; echo \"$GREETING $line from $(hostname)\"; echo oops >&2; exit 3",
                   input="there\n")
    assert (result.returncode, result.stdout, result.stderr) == (3, "hi there from box\n", "oops\n")


def test_run_a_signal_is_128_plus_its_number_and_a_missing_program_127():
    assert nsbox("run", "--", "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    missing = nsbox("run", "--", "no-such-program")
    assert missing.returncode == 127 and "no-such-program" in missing.stderr


def test_run_binds_caps_and_network(tmp_path):
    (tmp_path / "data").write_text("from the host\n")
    result = nsbox("run", "--bind", f"{tmp_path}:/mnt/host", "--bind", f"{tmp_path}:/mnt/rw:rw", "--pids-max", "32",
                   "--", "sh", "-c", "cat /mnt/host/data; touch /mnt/host/x 2>/dev/null || echo read-only; "
                   "echo written > /mnt/rw/out; ip -o link | cut -d: -f2 | tr -d ' '")
    assert result.stdout.splitlines() == ["from the host", "read-only", "lo"], result.stderr
    assert (tmp_path / "out").read_text() == "written\n"
    bomb = nsbox("run", "--pids-max", "16", "--timeout", "10", "--", "sh", "-c", "bomb() { bomb | bomb & }; bomb; wait")
    assert "can't fork" in bomb.stderr  # the cap held


@pytest.mark.parametrize("args, message", [
    (("--pids-max", "0", "--", "true"), "--pids-max takes a number of processes (1 or more) or none, not '0'"),
    (("--bind", "nocolon", "--", "true"), "--bind takes SRC:DST or SRC:DST:rw, not 'nocolon'"),
    (("--env", "=x", "--", "true"), "--env takes NAME=VALUE, not '=x'"),
    (("--memory-max", "lots", "--", "true"), "memory_max"),
    ((), "nsbox run needs a command"),
])
def test_run_bad_options_are_sentences_and_status_125(args, message):
    result = nsbox("run", *args)
    assert result.returncode == 125 and "Traceback" not in result.stderr
    assert result.stderr.startswith("nsbox: ") and message in result.stderr, result.stderr


# -- shell --------------------------------------------------------------------------------------
def test_shell_is_interactive_with_job_control_and_its_exit_status():
    out, code = on_a_pty("shell", "--hostname", "poke",
                         keys=b"echo answer=$((6*7)) on $(hostname); sleep 30 & jobs; exit 5\n")
    assert "answer=42 on poke" in out
    assert "Running" in out and "sleep 30" in out  # a job table: the shell has its terminal
    assert code == 5


def test_shell_runs_a_given_shell_and_ends_when_it_does():
    out, code = on_a_pty("shell", "--", "sh", "-c", "echo only this; exit 0", keys=b"")
    assert "only this" in out and code == 0


def test_shell_terminal_is_the_sandboxs_own_and_follows_resizes():
    """`tty` names the terminal (one of the sandbox's /dev/pts, not the host's), and a window
    resize reaches the shell's terminal (the kernel then sends it SIGWINCH).  (Markers are computed by the shell,
    so that the terminal's echo of what we type never matches them.)"""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "pytest_nsbox", "shell", "--", "sh"])
    out = b""
    status = None

    def read_until(marker: bytes, timeout: float = 30) -> None:
        nonlocal out
        deadline = time.monotonic() + timeout
        while marker not in out and time.monotonic() < deadline:
            if select.select([fd], [], [], 0.1)[0]:
                out += os.read(fd, 4096)
        assert marker in out, out.decode(errors="replace")

    try:
        _set_window_size(fd, 24, 80)
        read_until(b"# ")  # the prompt: what is typed before it, ash's line editor drops
        os.write(fd, b"echo T=$(tty) S=$(stty size) $((6*7))\n")
        read_until(b"S=24 80 42")
        _set_window_size(fd, 33, 111)
        os.kill(pid, signal.SIGWINCH)  # what a terminal emulator's resize does to nsbox
        time.sleep(0.5)
        os.write(fd, b"echo now $(stty size) $((6*7))\n")
        read_until(b"now 33 111 42")
        os.write(fd, b"exit 4\n")
        _, status = os.waitpid(pid, 0)
    finally:
        if status is None:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert "T=/dev/pts/0 S=24 80 42" in text
    assert os.waitstatus_to_exitcode(status) == 4


def _set_window_size(fd: int, rows: int, columns: int) -> None:
    import fcntl
    import struct
    import termios
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


# -- the probe and the doctor take the same steps ------------------------------------------------
REFUSE_PIVOT_ROOT = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[1])
    from pytest_nsbox.engine import seccomp
    # As a container's seccomp profile may: every mount works, pivot_root does not.
    seccomp._NUMBERS["pivot_root"] = (155, 217, 41)
    seccomp.install(seccomp.assemble(os.uname().machine, {"pivot_root": "EPERM"}, seccomp.X32_ERRNO))
    os.execv(sys.executable, [sys.executable, *sys.argv[2:]])
""")


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "aarch64"), reason="syscall numbers of x86_64 and aarch64")
def test_a_step_the_host_refuses_is_missing_in_doctor_and_skips_sandboxed_tests(pytester):
    refused = [sys.executable, "-c", REFUSE_PIVOT_ROOT, str(REPO)]
    doctor = subprocess.run([*refused, "-m", "pytest_nsbox", "doctor"], capture_output=True, text=True, timeout=60)
    assert doctor.returncode == 1, doctor.stdout + doctor.stderr
    assert [line.split()[0] for line in doctor.stdout.splitlines() if "pivot_root" in line] == ["MISSING"]
    pytester.makepyfile("def test_sandboxed(sandbox):\n    pass\n\ndef test_plain():\n    pass\n")
    result = pytester.run(*refused, "-m", "pytest", "--nsbox-unavailable=skip",
                          "-rs", str(pytester.path), timeout=120)
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*this machine cannot make sandboxes*pivot_root*"])
