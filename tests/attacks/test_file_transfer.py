"""`read_file` and `write_file` trust nothing the sandbox can change — not its /bin/sh, its cat, its
FIFOs or its links — and end within their timeout whatever runs inside."""

from __future__ import annotations

import errno
import subprocess
import threading
import time

import pytest

#: How long a transfer may take here before the test calls it hung (the old code never returned).
PATIENCE = 20.0


def within(box, seconds, call):
    """`call()`'s result, or a failure if it has not returned within `seconds` (the sandbox is then
    closed, which ends the call)."""
    outcome: dict = {}

    def target():
        try:
            outcome["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    started = time.monotonic()
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        box.close()
        thread.join(10)
        pytest.fail(f"still blocked after {seconds:g} s")
    outcome["elapsed"] = time.monotonic() - started
    return outcome


def replace_sh(box, script: str | None) -> None:
    """Remove the sandbox's /bin/sh, and put `script` there instead (by busybox itself: no sh needed)."""
    box.run(["/bin/busybox", "rm", "/bin/sh"], check=True)
    if script is not None:
        box.run(["/bin/busybox", "sh", "-c", 'printf "%s" "$1" > /bin/sh && chmod 755 /bin/sh', "sh", script],
                check=True)
    assert box.run(["/bin/busybox", "sh", "-c", "test -e /bin/sh"]).returncode == (0 if script else 1)


@pytest.mark.parametrize("script", ["#!/bin/busybox sh\nexec /bin/busybox sleep 1000\n", None],
                         ids=["hanging-sh", "no-sh"])
def test_read_and_write_file_work_whatever_became_of_bin_sh(sandbox, script):
    sandbox.run(["/bin/busybox", "sh", "-c", "echo before > /root/note"], check=True)
    replace_sh(sandbox, script)
    read = within(sandbox, PATIENCE, lambda: sandbox.read_file("/root/note", timeout=10))
    assert read.get("value") == "before\n", read
    written = within(sandbox, PATIENCE, lambda: sandbox.write_file("/root/note", "after\n", timeout=10))
    assert "error" not in written, written
    assert sandbox.run(["/bin/busybox", "cat", "/root/note"]).stdout == "after\n"


def test_a_fifo_at_the_path_is_refused_at_once(sandbox):
    sandbox.run("mkfifo /root/fifo", check=True)
    for call in (lambda: sandbox.read_file("/root/fifo", timeout=10),
                 lambda: sandbox.write_file("/root/fifo", "x", timeout=10)):
        outcome = within(sandbox, PATIENCE, call)
        error = outcome.get("error")
        assert isinstance(error, OSError) and "/root/fifo" in str(error), outcome
        assert "not a regular file" in str(error), error


def test_a_device_is_refused(sandbox):
    with pytest.raises(OSError, match="cannot read /dev/zero in the sandbox: it is a character device, not a "
                                      "regular file"):
        sandbox.read_file("/dev/zero")
    with pytest.raises(OSError, match="cannot write /dev/null in the sandbox: it is a character device"):
        sandbox.write_file("/dev/null", "x")


def test_a_transfer_the_sandbox_stops_ends_at_its_timeout(sandbox):
    """A command may signal the transfer's process (they share the uid): stopped, it stalls nothing."""
    sandbox.run("head -c 4000000 /dev/zero > /root/big", check=True)
    stopper = sandbox.spawn(["/bin/busybox", "sh", "-c",
                             "while :; do pkill -STOP nsbox-transfer; done"])
    try:
        outcome = within(sandbox, PATIENCE, lambda: sandbox.read_file("/root/big", text=False, timeout=2))
    finally:
        stopper.kill()
    error = outcome.get("error")
    assert isinstance(error, subprocess.TimeoutExpired), outcome
    assert "read_file('/root/big')" in str(error) and "after 2 seconds" in str(error)
    assert outcome["elapsed"] < 2 + 10
    sandbox.write_file("/root/small", "fine\n")
    assert sandbox.read_file("/root/small") == "fine\n"  # the sandbox goes on


def test_a_command_stopped_before_exec_cannot_freeze_init(sandbox):
    """Between clone and exec a command's process is init's copy, and init waits to hear from it:
    a command that stops it there (SIGSTOP) gets it killed after a while, never a frozen init."""
    stopper = sandbox.spawn(["/bin/busybox", "sh", "-c",
                             "while :; do for p in $(pgrep nsbox-init); do [ $p != 1 ] && kill -STOP $p; done; "
                             "done"])
    try:
        for _attempt in range(30):
            # The stopper may also catch `true` just after its exec: a stopped command, not a frozen
            # init, which the run's timeout ends (and the loop tries again).
            outcome = within(sandbox, PATIENCE, lambda: sandbox.run(["true"], timeout=8))
            if isinstance(outcome.get("error"), subprocess.TimeoutExpired):
                continue
            if "error" in outcome:
                assert "SIGSTOP" in str(outcome["error"]) and outcome["elapsed"] < 5 + 5, outcome
                break
    finally:
        stopper.kill()
    assert sandbox.run(["echo", "still here"]).stdout == "still here\n"


def test_a_link_to_an_absolute_path_resolves_inside_the_sandbox_never_on_the_host(sandbox, tmp_path):
    canary = tmp_path / "canary"
    canary.write_text("the host's\n")
    sandbox.run(f"mkdir -p {tmp_path} && echo inside > {canary} && ln -s {canary} /root/link", check=True)
    assert sandbox.read_file("/root/link") == "inside\n"
    sandbox.write_file("/root/link", "written\n")
    assert canary.read_text() == "the host's\n"
    assert sandbox.run(["cat", str(canary)]).stdout == "written\n"
    sandbox.run(f"ln -s {tmp_path}/only-on-the-host /root/dangling", check=True)
    (tmp_path / "only-on-the-host").write_text("the host's\n")
    with pytest.raises(FileNotFoundError, match="/root/dangling"):
        sandbox.read_file("/root/dangling")


def test_file_errors_name_the_path_and_the_errno(sandbox):
    with pytest.raises(OSError, match=r"cannot write /proc/x in the sandbox: .*(ENOENT|EACCES|EROFS)") as raised:
        sandbox.write_file("/proc/x", "data")
    assert "nsbox-write" not in str(raised.value) and raised.value.errno != errno.EIO
    with pytest.raises(OSError, match="cannot read /proc/self/fd/0 in the sandbox: .*magic link"):
        sandbox.read_file("/proc/self/fd/0")


def test_a_big_file_is_refused_before_it_is_sent(sandbox_factory):
    box = sandbox_factory(output_max="1M")
    box.run("head -c 2000000 /dev/zero > /root/big", check=True)
    with pytest.raises(OSError, match="bigger than output_max") as raised:
        box.read_file("/root/big")
    assert raised.value.errno == errno.EFBIG


def test_the_timeout_is_checked(sandbox):
    from pytest_nsbox.errors import ConfigError
    with pytest.raises(ConfigError, match="timeout"):
        sandbox.read_file("/etc/hostname", timeout="soon")


def test_a_path_may_be_a_path_object(sandbox):
    from pathlib import PurePosixPath
    sandbox.write_file(PurePosixPath("/root/p"), b"bytes")
    assert sandbox.read_file(PurePosixPath("/root/p"), text=False) == b"bytes"
