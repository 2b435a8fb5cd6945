"""Running commands: exit codes, signals, stdio, check, timeouts, spawn — the subprocess contract."""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import time

import pytest

from pytest_nsbox import SandboxClosed

from .helpers import processes_in_pid_namespace, wait_until


def test_os_release_is_alpine(sandbox):
    result = sandbox.run(["cat", "/etc/os-release"])
    assert result.returncode == 0
    assert 'ID=alpine' in result.stdout
    assert 'VERSION_ID=3.20.3' in result.stdout


def test_string_runs_through_sh(sandbox):
    result = sandbox.run("echo $0; exit 3")
    assert result.returncode == 3
    assert result.stdout == "/bin/sh\n"
    assert result.args == "echo $0; exit 3"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL, signal.SIGABRT])
def test_signal_death_is_negative_returncode(sandbox, sig):
    assert sandbox.run(f"kill -{int(sig)} $$").returncode == -int(sig)


def test_stdin_input_and_env_and_cwd(sandbox):
    result = sandbox.run(["sh", "-c", 'tr a-z A-Z; echo "$X"; pwd'], input="hi\n", env={"X": "1"},
                         cwd="/tmp")
    assert result.stdout == "HI\n1\n/tmp\n"


def test_large_input_and_output_do_not_deadlock(sandbox):
    data = "x" * 3_000_000
    result = sandbox.run(["cat"], input=data)
    assert len(result.stdout) == len(data)


def test_bytes_mode(sandbox):
    result = sandbox.run(["printf", "\\377\\000"], text=False)
    assert result.stdout == b"\xff\x00"


def test_undecodable_output_follows_errors_as_in_subprocess(sandbox):
    command = ["printf", "\\377ok"]
    assert sandbox.run(command).stdout == "\ufffdok"  # the default: replaced, never an exception
    assert sandbox.run(command, errors="surrogateescape").stdout.encode("utf-8", "surrogateescape") == b"\xffok"
    with pytest.raises(UnicodeDecodeError):
        sandbox.run(command, errors="strict")
    process = sandbox.spawn(command, stdout=subprocess.PIPE, errors="backslashreplace")
    assert process.stdout.read() == "\\xffok"
    process.wait()


def test_stderr_is_separate(sandbox):
    result = sandbox.run("echo out; echo err >&2")
    assert (result.stdout, result.stderr) == ("out\n", "err\n")


def test_check_raises_called_process_error(sandbox):
    with pytest.raises(subprocess.CalledProcessError) as info:
        sandbox.run("echo oops >&2; exit 7", check=True)
    assert info.value.returncode == 7
    assert info.value.stderr == "oops\n"


def test_missing_program_raises_file_not_found(sandbox):
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        sandbox.run(["no-such-program"])


@pytest.mark.parametrize("command", ["true", ["true"]], ids=["shell", "argv"])
def test_a_missing_cwd_is_named_not_the_program(sandbox, command):
    with pytest.raises(FileNotFoundError) as info:
        sandbox.run(command, cwd="/nowhere")
    assert info.value.filename == "/nowhere"  # as subprocess names it, never '/bin/sh'
    assert "working directory (cwd) /nowhere does not exist" in str(info.value)
    assert "/bin/sh" not in str(info.value)


def test_a_cwd_that_is_a_file_is_not_a_directory(sandbox):
    with pytest.raises(NotADirectoryError) as info:
        sandbox.run(["true"], cwd="/etc/passwd")
    assert info.value.filename == "/etc/passwd"
    assert "is not a directory" in str(info.value)


def test_timeout_kills_background_children_promptly(sandbox):
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        # The background sleep holds stdout open: a naive communicate() would wait 60 s.
        sandbox.run("sleep 60 & sleep 61; echo never", timeout=0.5)
    assert time.monotonic() - started < 2.5
    # Killed; at most a zombie for the instant before init reaps it.
    live = [line for line in sandbox.run(["ps", "-o", "stat,args"]).stdout.splitlines()
            if "sleep" in line and not line.lstrip().startswith("Z")]
    assert live == []


def test_run_returns_when_command_exits_even_if_background_holds_pipes(sandbox):
    started = time.monotonic()
    result = sandbox.run("sleep 30 & echo done")
    assert result.stdout == "done\n"
    assert time.monotonic() - started < 5


def test_state_is_shared_between_runs(sandbox):
    sandbox.run("echo kept > /root/note; apk --version > /tmp/apk", check=True)
    assert sandbox.run(["cat", "/root/note"]).stdout == "kept\n"
    assert sandbox.read_file("/tmp/apk").startswith("apk-tools")


def test_write_and_read_file(sandbox):
    sandbox.write_file("/etc/motd", "hello\n")
    assert sandbox.read_file("/etc/motd") == "hello\n"
    sandbox.write_file("/usr/local/bin/greet", "#!/bin/sh\necho hi $1\n", mode=0o755)
    assert sandbox.run(["greet", "you"]).stdout == "hi you\n"
    sandbox.write_file("/tmp/bin", b"\x00\x01")
    assert sandbox.read_file("/tmp/bin", text=False) == b"\x00\x01"
    with pytest.raises(FileNotFoundError):
        sandbox.read_file("/no/such/file")


def test_spawned_server_is_reachable_over_loopback(sandbox):
    server = sandbox.spawn(["nc", "-l", "-p", "7777"], stdout=subprocess.PIPE)
    for _ in range(100):
        reply = sandbox.run("echo ping | nc -w 1 127.0.0.1 7777")
        if reply.returncode == 0:
            break
        time.sleep(0.02)
    assert server.wait(timeout=5) == 0
    assert server.stdout.read() == "ping\n"


def test_spawn_popen_interface(sandbox):
    process = sandbox.spawn(["sh", "-c", "read line; echo got $line; echo e >&2; exit 4"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.pid > 1
    assert process.poll() is None
    out, err = process.communicate("x\n", timeout=5)
    assert (out, err, process.returncode) == ("got x\n", "e\n", 4)


def test_a_command_on_the_sandboxs_own_terminal(sandbox):
    master, slave = sandbox.openpty()
    try:
        process = sandbox.spawn(["sh", "-c", "tty; ls /dev/pts; [ -t 0 ] && echo interactive"],
                                stdin=slave, stdout=slave, stderr=slave, tty=True)
        os.close(slave)
        assert process.wait(timeout=10) == 0
        out = b""
        while select.select([master], [], [], 0.5)[0]:
            try:
                out += os.read(master, 4096)
            except OSError:  # EIO: the command and its terminal are gone
                break
    finally:
        os.close(master)
    assert out.decode().split() == ["/dev/pts/0", "0", "ptmx", "interactive"]


def test_spawn_wait_timeout_terminate_and_kill(sandbox):
    process = sandbox.spawn(["sleep", "60"])
    with pytest.raises(subprocess.TimeoutExpired):
        process.wait(timeout=0.1)
    process.terminate()
    assert process.wait(timeout=5) == -signal.SIGTERM
    trapped = sandbox.spawn(["sh", "-c", "trap '' TERM; sleep 60"])
    time.sleep(0.1)
    trapped.kill()
    assert trapped.wait(timeout=5) == -signal.SIGKILL


def test_stdout_none_goes_to_callers_stdout(sandbox, capfd):
    sandbox.spawn(["echo", "to pytest"]).wait(timeout=5)
    assert "to pytest" in capfd.readouterr().out


def test_use_after_close_is_an_error(sandbox_factory):
    box = sandbox_factory()
    box.close()
    with pytest.raises(SandboxClosed):
        box.run(["true"])
    box.close()  # idempotent


@pytest.mark.sandbox(timeout=1)
def test_sandbox_lifetime_timeout(sandbox):
    process = sandbox.spawn(["sleep", "60"])
    assert process.wait(timeout=5) == -signal.SIGKILL
    with pytest.raises(SandboxClosed, match="lifetime"):
        sandbox.run(["true"])


@pytest.mark.parametrize("memory_max", [None, "256M"], ids=["spawn", "rlimit-fork"])
def test_exec_failures_are_the_errors_subprocess_raises(sandbox_factory, memory_max):
    # With memory_max and no cgroup, init forks to set RLIMIT_AS: both start paths must agree.
    box = sandbox_factory(memory_max=memory_max)
    with pytest.raises(FileNotFoundError, match="no-such-program"):
        box.run(["no-such-program"])
    box.write_file("/usr/local/bin/not-executable", "#!/bin/sh\n", mode=0o644)
    with pytest.raises(PermissionError):
        box.run(["/usr/local/bin/not-executable"])
    with pytest.raises(FileNotFoundError, match="/nowhere"):
        box.run(["true"], cwd="/nowhere")


def _sleeps(sandbox) -> list[str]:
    """The arguments of the sleeps alive in the sandbox, seen from the host: a command's fake /proc
    hides nothing from there."""
    found = []
    for pid in processes_in_pid_namespace(sandbox.namespaces["pid"]):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if argv[0].endswith(b"sleep"):
            found.append(argv[1].decode())
    return sorted(found)


def test_timeout_kills_what_the_command_started_however_it_hid(sandbox):
    # New sessions, double forks, a deeper user namespace, a fake /proc: all started by the command.
    hide = ("setsid sleep 1001 & (setsid sh -c 'sleep 1002 &' &); unshare -Ur sleep 1003 & "
            "sleep 0.2; mount -t tmpfs none /proc; exec sleep 1000")
    process = sandbox.spawn(["sh", "-c", hide])
    assert wait_until(lambda: _sleeps(sandbox) == ["1000", "1001", "1002", "1003"])
    process.kill()
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run(hide, timeout=1)
    assert wait_until(lambda: _sleeps(sandbox) == [])


def test_kill_ends_everything_a_command_started_and_nothing_else(sandbox):
    bystander = sandbox.spawn(["sleep", "1009"])
    process = sandbox.spawn(["sh", "-c", "setsid sleep 1001 & (setsid sleep 1002 &); exec sleep 1000"])
    assert wait_until(lambda: _sleeps(sandbox) == ["1000", "1001", "1002", "1009"])
    process.kill()
    assert process.wait(timeout=5) == -signal.SIGKILL
    assert wait_until(lambda: _sleeps(sandbox) == ["1009"])
    assert bystander.poll() is None


def test_output_kept_in_memory_is_capped_with_a_marker(sandbox):
    result = sandbox.run("head -c 5000000 /dev/zero | tr '\\0' x; echo done >&2", output_max="1M")
    kept, marker = result.stdout[:1 << 20], result.stdout[1 << 20:]
    assert kept == "x" * (1 << 20)
    assert marker == f"\n[nsbox: {5000000 - (1 << 20)} more bytes of stdout were dropped: output_max is {1 << 20}]\n"
    assert result.stderr == "done\n"


def test_read_file_never_returns_a_cut_file(sandbox_factory):
    box = sandbox_factory(output_max="1M")
    box.run("head -c 1048576 /dev/urandom > /root/fits; head -c 1048577 /dev/zero > /root/too-big", check=True)
    assert len(box.read_file("/root/fits", text=False)) == 1 << 20
    with pytest.raises(OSError, match="cannot read /root/too-big from the sandbox: it is bigger than output_max") as raised:
        box.read_file("/root/too-big")
    assert raised.value.errno == errno.EFBIG
    with pytest.raises(OSError, match="it is a character device, not a regular file"):
        box.read_file("/dev/zero")  # endless, as a FIFO may be: regular files only


def test_a_flood_cannot_take_the_test_process_down(sandbox):
    rss = _rss()
    result = sandbox.run(f"head -c {1 << 30} /dev/zero", text=False)
    assert result.stdout[:64 << 20] == bytes(64 << 20)  # the default cap, 64 MiB, kept
    assert result.stdout[64 << 20:].startswith(b"\n[nsbox: 1006632960 more bytes of stdout were dropped")
    assert _rss() - rss < 400 << 20  # that, and the copies of it made on the way


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
