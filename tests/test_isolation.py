"""What a sandbox hides from its commands, and what it keeps from the host."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pytest_nsbox import settings


def test_uid_zero_inside(sandbox):
    assert sandbox.run(["id", "-u"]).stdout == "0\n"


def test_only_the_sandboxes_processes_are_visible(sandbox):
    lines = sandbox.run(["ps", "-o", "pid,comm"]).stdout.strip().splitlines()[1:]
    assert [line.split() for line in lines] == [["1", "nsbox-init"], ["2", "ps"]], lines


def test_every_namespace_differs_from_the_hosts(sandbox):
    for name, ident in sandbox.namespaces.items():
        assert ident != os.readlink(f"/proc/self/ns/{name}"), name


def test_hostname_is_isolated(sandbox_factory):
    before = socket.gethostname()
    box = sandbox_factory(hostname="box-1")
    assert box.run(["hostname"]).stdout == "box-1\n"
    assert box.run("hostname other; hostname").returncode != 0 or True
    assert socket.gethostname() == before


def test_default_network_has_only_loopback_and_it_is_up(sandbox):
    links = sandbox.run(["ip", "-o", "link"]).stdout.strip().splitlines()
    assert len(links) == 1 and ": lo:" in links[0] and "UP" in links[0]
    # Nothing but loopback is reachable: there is no route at all.
    assert sandbox.run(["ip", "route"]).stdout == ""
    assert all(" dev lo " in route for route in sandbox.run(["ip", "-6", "route"]).stdout.splitlines())


def test_low_ports_bind_inside_private_network(sandbox):
    server = sandbox.spawn(["nc", "-l", "-p", "80"])
    try:
        assert sandbox.run("for i in 1 2 3 4 5 6 7 8 9; do echo x | nc -w1 127.0.0.1 80 && exit 0; sleep 0.05; done; exit 1").returncode == 0
    finally:
        server.kill()


@pytest.mark.sandbox(network="host")
def test_host_network_shares_interfaces_and_dns_config(sandbox):
    host_links = len(os.listdir("/sys/class/net"))
    links = sandbox.run(["ip", "-o", "link"]).stdout.strip().splitlines()
    assert len(links) == host_links
    if os.path.exists("/etc/resolv.conf"):
        assert sandbox.read_file("/etc/resolv.conf") == Path("/etc/resolv.conf").read_text()
        assert sandbox.run("echo x > /etc/resolv.conf").returncode != 0


def test_environment_is_clean(sandbox, monkeypatch):
    monkeypatch.setenv("LEAKY_SECRET", "s3cret")
    env = dict(line.split("=", 1) for line in sandbox.run(["env"]).stdout.splitlines())
    env.pop("PWD", None)
    env.pop("SHLVL", None)
    assert env == dict(settings.BASE_ENV)


@pytest.mark.sandbox(env={"GREETING": "hi"})
def test_sandbox_and_run_env_are_merged(sandbox):
    assert sandbox.run('echo "$GREETING $X"', env={"X": "there"}).stdout == "hi there\n"


def test_host_files_are_invisible(sandbox, tmp_path):
    marker = tmp_path / "host-only"
    marker.write_text("secret")
    assert sandbox.run(["test", "-e", str(marker)]).returncode == 1
    assert sandbox.run(["test", "-e", "/etc/debian_version"]).returncode == 1


def test_proc_and_sys(sandbox):
    mounts = sandbox.run(["cat", "/proc/mounts"]).stdout
    assert " /proc proc " in mounts
    assert sandbox.run("ls /sys | wc -l").stdout.strip() == "0"


def test_dev_is_minimal_and_tmp_and_shm_are_writable(sandbox):
    names = set(sandbox.run(["ls", "/dev"]).stdout.split())
    assert names == {"null", "zero", "full", "random", "urandom", "tty", "pts", "ptmx", "shm",
                     "fd", "stdin", "stdout", "stderr"}
    assert sandbox.run("head -c 4 /dev/urandom | wc -c; echo x > /dev/null").stdout == "4\n"
    assert sandbox.run("echo a > /tmp/a && echo b > /dev/shm/b && echo c > /run/c").returncode == 0


def test_ping_works_over_the_private_loopback(sandbox):
    # ICMP echo sockets need the caller's group in ping_group_range; only gid 0 is mapped here.
    assert sandbox.read_file("/proc/sys/net/ipv4/ping_group_range").split() == ["0", "0"]
    result = sandbox.run(["ping", "-c", "1", "-W", "2", "127.0.0.1"])
    assert result.returncode == 0 and "1 packets received" in result.stdout, result.stderr
