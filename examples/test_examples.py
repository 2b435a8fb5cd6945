"""A tour of pytest-nsbox: each test gets a fresh Alpine sandbox, as a normal user."""

import subprocess

import pytest


def test_alpine_tools_are_there(sandbox):
    result = sandbox.run("apk --version")
    assert result.returncode == 0
    assert result.stdout.startswith("apk-tools")


def test_a_shell_script_in_a_clean_box(sandbox):
    sandbox.write_file("/usr/local/bin/count-words", '#!/bin/sh\nwc -w | tr -d " "\n', mode=0o755)
    assert sandbox.run(["count-words"], input="one two three\n").stdout == "3\n"


def test_results_come_back_through_a_writable_bind(sandbox_factory, tmp_path):
    box = sandbox_factory(mounts=[(tmp_path, "/out", "rw")])
    box.run("uname -a > /out/uname.txt", check=True)
    assert (tmp_path / "uname.txt").read_text().startswith("Linux nsbox")


@pytest.mark.sandbox(network="none")
def test_no_network_but_loopback(sandbox):
    server = sandbox.spawn(["nc", "-l", "-p", "8080"], stdout=subprocess.PIPE)
    sandbox.run("until echo hello | nc -w 1 127.0.0.1 8080; do sleep 0.02; done", timeout=10)
    assert server.wait(timeout=5) == 0
    assert server.stdout.read() == "hello\n"
    assert sandbox.run(["ip", "route"]).stdout == ""  # no route anywhere but loopback


def test_mess_stays_in_the_box(sandbox):
    sandbox.run("rm -rf /usr/share /etc/apk; echo gone > /etc/hostname")
    assert sandbox.run(["cat", "/etc/hostname"]).stdout == "gone\n"


def test_the_next_box_is_clean(sandbox):
    assert sandbox.run(["test", "-d", "/etc/apk"]).returncode == 0


@pytest.mark.sandbox(pids_max=64)
def test_a_fork_bomb_stays_in_its_box(sandbox):
    if sandbox.limits.pids_mechanism == "none":
        pytest.skip(f"PIDs cannot be capped here: {sandbox.limits.describe()}")
    with pytest.raises(subprocess.TimeoutExpired):
        # The bomb forks in a subshell and the script then execs: had it to fork `sleep` itself
        # once the cap is reached, it would fail at once instead of hanging.
        sandbox.run("(bomb() { bomb | bomb & }; bomb) & exec sleep 10", timeout=2)
    assert sandbox.run(["echo", "still here"]).stdout == "still here\n"


def test_hung_commands_time_out(sandbox):
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run("sleep 60 & sleep 60", timeout=0.5)
