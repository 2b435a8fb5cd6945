"""What `nsbox` says and exits with when something is wrong: a wrapper script can tell nsbox's own
errors (125) from the command's status, and every sentence names the `nsbox` option to use."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest


def nsbox(*args: str, cwd=None, stdin=subprocess.DEVNULL, env: dict[str, str] | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True,
                          stdin=stdin, cwd=cwd, timeout=timeout, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args, message", [
    (("run", "--bogus", "--", "true"), "nsbox run: unrecognized arguments: --bogus (see `nsbox run --help`)"),
    (("run", "--timeout", "soon", "--", "true"), "nsbox run: argument --timeout: invalid float value: 'soon'"),
    (("run", "--network", "wifi", "--", "true"), "nsbox run: argument --network: invalid choice: 'wifi'"),
    (("shell", "--bogus"), "nsbox shell: unrecognized arguments: --bogus"),
])
def test_a_usage_error_of_run_or_shell_is_125_and_one_line(args, message):
    result = nsbox(*args)
    assert result.returncode == 125
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


def test_the_commands_own_status_2_is_not_a_usage_error():
    assert nsbox("run", "--", "sh", "-c", "exit 2").returncode == 2


def test_other_commands_keep_status_2_for_usage_errors():
    result = nsbox("rootfs", "pull")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "nsbox rootfs pull: the following arguments are required: SPEC" in result.stderr
    assert nsbox("doctor", "--bogus").returncode == 2


def test_a_missing_cwd_is_nsboxs_error_and_names_the_directory():
    result = nsbox("run", "--cwd", "/nope", "--", "true")
    assert result.returncode == 125
    assert result.stderr.startswith("nsbox: --cwd /nope: cannot change into it in the sandbox: ENOENT")
    assert "'true'" not in result.stderr  # it does not read as if `true` were missing


def test_a_missing_program_is_127_and_one_that_cannot_run_126():
    missing = nsbox("run", "--", "no-such-program")
    assert missing.returncode == 127
    assert missing.stderr == "nsbox: no-such-program: not found on the sandbox's PATH; give its full path, or a --rootfs or --layer that has it\n"
    not_executable = nsbox("run", "--", "/etc/passwd")
    assert not_executable.returncode == 126 and "Traceback" not in not_executable.stderr
    assert not_executable.stderr == "nsbox: /etc/passwd: cannot be executed in the sandbox: EACCES (Permission denied)\n"


def test_the_end_of_the_lifetime_is_124_and_one_line_saying_so():
    started = time.monotonic()
    result = nsbox("run", "--timeout", "1", "--", "sleep", "10")
    assert time.monotonic() - started < 8
    assert result.returncode == 124
    assert result.stderr == ("nsbox: the sandbox's lifetime of 1 s ran out (--timeout): everything in it "
                             "was killed\n")


def test_a_command_killed_before_the_lifetime_ends_is_137_without_that_line():
    result = nsbox("run", "--timeout", "30", "--", "sh", "-c", "kill -KILL $$")
    assert (result.returncode, result.stderr) == (137, "")


@pytest.mark.parametrize("stdin", ["pipe", "devnull"])
def test_shell_refuses_a_stdin_that_is_not_a_terminal(stdin):
    started = time.monotonic()
    if stdin == "pipe":
        result = subprocess.run([sys.executable, "-m", "pytest_nsbox", "shell"], input="echo hi\n",
                                capture_output=True, text=True, timeout=60)
    else:
        result = nsbox("shell", timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode == 125 and result.stdout == ""  # no prompt, no terminal codes
    assert result.stderr.startswith("nsbox: nsbox shell needs a terminal on its stdin")
    assert "nsbox run" in result.stderr


def test_cli_errors_name_the_nsbox_options_not_pytests(tmp_path):
    miss = nsbox("run", "--offline", "--cache-dir", str(tmp_path / "cache"), "--rootfs", "alpine:3.19", "--", "true")
    assert miss.returncode == 125, miss.stderr
    assert "--nsbox-" not in miss.stderr and "--rootfs PATH" in miss.stderr, miss.stderr
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    unsafe = nsbox("run", "--cache-dir", str(shared), "--rootfs", "alpine:3.19", "--", "true")
    assert unsafe.returncode == 125 and "writable by other users" in unsafe.stderr, unsafe.stderr
    assert "--nsbox-" not in unsafe.stderr and "--cache-dir" in unsafe.stderr, unsafe.stderr
    rootfs = nsbox("rootfs", "--offline", "--cache-dir", str(tmp_path / "cache"), "path", "alpine:3.19")
    assert rootfs.returncode == 1 and "--nsbox-" not in rootfs.stderr, rootfs.stderr
    mirror = nsbox("rootfs", "--mirror", "ftp://x", "list")
    assert mirror.returncode == 1 and "--nsbox-" not in mirror.stderr, mirror.stderr


def test_a_profile_without_a_pyproject_is_a_sentence(tmp_path):
    result = nsbox("run", "--profile", "web", "--", "true", cwd=tmp_path)
    assert result.returncode == 125
    assert result.stderr == (f"nsbox: --profile: no sandbox profile 'web': there is no pyproject.toml at or above "
                             f"{tmp_path}; define the profile as [tool.nsbox.profiles.web] in your project's "
                             "pyproject.toml\n")
