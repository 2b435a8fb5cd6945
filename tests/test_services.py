"""Servers in sandboxes: published ports reach a private network's server, readiness helpers wait."""

from __future__ import annotations

import os
import socket
import subprocess
import textwrap

import pytest

from pytest_nsbox import ConfigError, SandboxClosed

from .helpers import talk

ECHO = ["nc", "-lk", "-p", "8080", "-e", "cat"]  # busybox: a persistent echo server



def test_a_server_in_a_private_network_is_reached_through_its_published_port(sandbox):
    server = sandbox.spawn(ECHO)
    published = sandbox.wait_for_port(8080, process=server)
    assert published.host == "127.0.0.1" and published.address == f"127.0.0.1:{published.port}"
    assert talk(published, b"hello\n") == b"hello\n"
    big = os.urandom(5 << 20)
    assert talk(published, big) == big  # bytes arrive whole, in order, both ways
    assert sandbox.port(8080) == published  # one forwarder per port


def test_two_sandboxes_serve_the_same_port_without_a_clash_and_reach_each_other(sandbox_factory):
    ports = []
    for name in ("a", "b"):
        box = sandbox_factory(hostname=name)
        server = box.spawn(["nc", "-lk", "-p", "8080", "-e", "hostname"])
        ports.append(box.wait_for_port(8080, process=server))
    assert ports[0].port != ports[1].port
    assert [talk(p, b"").strip() for p in ports] == [b"a", b"b"]
    # Another sandbox on the host's network reaches a published port, as any host process does.
    client = sandbox_factory(network="host")
    reply = client.run(["nc", "-w", "5", "127.0.0.1", str(ports[1].port)], input="")
    assert reply.stdout.strip() == "b"


def test_a_published_port_connects_whenever_the_server_listens(sandbox):
    published = sandbox.port(8080)
    with socket.create_connection(published, timeout=10) as early:
        try:
            assert early.recv(64) == b""  # nothing listens yet: closed at once, as refused
        except ConnectionResetError:
            pass
    server = sandbox.spawn(ECHO)
    sandbox.wait_for_port(8080, process=server)
    assert talk(published, b"now") == b"now"


def test_a_closed_sandbox_takes_its_published_ports_with_it(sandbox_factory):
    box = sandbox_factory()
    box.spawn(ECHO)
    published = box.wait_for_port(8080)
    box.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(published, timeout=5).close()
    with pytest.raises(SandboxClosed):
        box.port(8080)


def test_on_the_hosts_network_a_port_is_itself(sandbox_factory):
    box = sandbox_factory(network="host")
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    server = box.spawn(["nc", "-lk", "-p", str(port), "-e", "cat"])
    assert box.wait_for_port(port, process=server) == ("127.0.0.1", port)
    assert talk(("127.0.0.1", port), b"direct") == b"direct"


def test_wait_for_port_says_when_the_server_died_or_never_came(sandbox):
    dead = sandbox.spawn(["sh", "-c", "echo cannot bind >&2; exit 2"])
    with pytest.raises(TimeoutError, match=r"nothing will listen on port 8080 in the sandbox: its server "
                                           r"`sh -c .*` exited with status 2"):
        sandbox.wait_for_port(8080, timeout=10, process=dead)
    with pytest.raises(TimeoutError, match="nothing listened on port 8081 in the sandbox within 0.2 s"):
        sandbox.wait_for_port(8081, timeout=0.2)
    with pytest.raises(ConfigError, match="a port is a number from 1 to 65535, not 0"):
        sandbox.port(0)


def test_wait_for_output_returns_the_match_or_shows_the_last_lines(sandbox):
    server = sandbox.spawn(["sh", "-c", "echo starting; sleep 0.2; echo listening on 8080; sleep 30"],
                           stdout=subprocess.PIPE)
    assert server.wait_for_output(r"listening on (\d+)").group(1) == "8080"
    assert server.output_seen["stdout"] == "starting\nlistening on 8080\n"
    failing = sandbox.spawn(["sh", "-c", "echo loading config; echo bad config >&2; exit 1"],
                            stdout=subprocess.PIPE)
    with pytest.raises(TimeoutError) as raised:
        failing.wait_for_output("listening", timeout=10)
    assert "never matched 'listening': it exited with status 1; its last lines:\nloading config" in str(raised.value)
    with pytest.raises(ValueError, match="spawn it with stdout=PIPE"):
        sandbox.spawn(["true"]).wait_for_output("x")


def test_wait_for_output_keeps_a_bounded_tail_of_a_flood(sandbox_factory):
    """A server that floods before it is ready costs bounded memory and linear time; a line split
    between reads, or a UTF-8 character, is still found whole."""
    box = sandbox_factory(output_max="1M")
    flood = box.spawn(["sh", "-c", "head -c 200000000 /dev/zero | tr '\\0' x; printf 'ready: caf\\303'; "
                                   "sleep 0.1; printf '\\251\\n'; sleep 30"], stdout=subprocess.PIPE)
    assert flood.wait_for_output(r"ready: (\w+)\n", timeout=60).group(1) == "café"
    seen = flood.output_seen["stdout"]
    assert len(seen) <= 1 << 20 and seen.endswith("xxxready: café\n")
    endless = box.spawn(["sh", "-c", "while :; do head -c 1000000 /dev/zero | tr '\\0' y; done"], stdout=subprocess.PIPE)
    with pytest.raises(TimeoutError) as raised:
        endless.wait_for_output("never", timeout=1)
    assert len(str(raised.value)) < 3000 and str(raised.value).endswith("yyy")


def test_published_ports_under_xdist(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import socket, pytest

        @pytest.mark.parametrize("n", range(4))
        def test_serves_8080(sandbox, n):
            server = sandbox.spawn(["nc", "-lk", "-p", "8080", "-e", "echo", str(n)])
            published = sandbox.wait_for_port(8080, process=server)
            with socket.create_connection(published, timeout=10) as sock:
                assert sock.recv(64).strip() == str(n).encode()
    """))
    pytester.runpytest_subprocess("-n", "2").assert_outcomes(passed=4)
