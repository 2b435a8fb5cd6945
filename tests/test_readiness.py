"""Waiting until a server in a sandbox is ready: one clear error at the test's line when it is not,
and the server's own output, bounded, in the failure report."""

from __future__ import annotations

import re
import subprocess
import textwrap
import time

import pytest

from pytest_nsbox import ConfigError, NsboxError, SandboxClosed, ServerNotReady

# A health endpoint over busybox nc: 503 until /tmp/ready exists, then 200. It reads the request
# first (a reply to an unread request may be reset before the client sees it).
HTTP_SCRIPT = r"""while IFS= read -r line; do [ "${#line}" -le 1 ] && break; done
if [ -e /tmp/ready ]; then printf 'HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok'
else printf 'HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n'; fi
"""
HTTP_SERVER = ["nc", "-lk", "-p", "8080", "-e", "sh", "/srv/health.sh"]


def _failures(output: str) -> dict[str, str]:
    """Each failed test's block of pytest's FAILURES section, by test name."""
    body = output.split("= FAILURES =", 1)[1].split("short test summary info", 1)[0]
    parts = re.split(r"^_{3,} (\S+) _{3,}$", body, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def test_a_server_that_is_never_ready_fails_at_the_tests_line_with_its_unread_output_in_the_report(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess, pytest

        @pytest.fixture
        def server(sandbox):
            return sandbox.spawn(["sh", "-c", "echo booting; echo 'config error: no port' >&2; sleep 30"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def test_port(sandbox, server):
            sandbox.wait_for_port(8080, timeout=0.5, process=server)

        def test_output(server):
            server.wait_for_output("listening", timeout=0.5)

        def test_until(sandbox, server):
            sandbox.wait_until(lambda: False, timeout=0.5, process=server)

        def test_http(sandbox, server):
            sandbox.wait_for_http(8080, path="/health", timeout=0.5, process=server)
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=4)
    blocks = _failures(result.stdout.str())
    calls = {"test_port": "sandbox.wait_for_port(8080, timeout=0.5, process=server)",
             "test_output": 'server.wait_for_output("listening", timeout=0.5)',
             "test_until": "sandbox.wait_until(lambda: False, timeout=0.5, process=server)",
             "test_http": 'sandbox.wait_for_http(8080, path="/health", timeout=0.5, process=server)'}
    for name, call in calls.items():
        block = blocks[name]
        traceback, section = block.split("- nsbox sandbox commands (call) -", 1)
        # One error, shown at the test's own line: none of the plugin's frames or source.
        assert f">       {call}" in traceback, block
        assert "pytest_nsbox" not in traceback.replace("pytest_nsbox.errors.ServerNotReady", ""), block
        assert len(traceback.strip().splitlines()) < 16, block
        assert re.search(r"^E   +pytest_nsbox\.errors\.ServerNotReady: ", traceback, re.M), block
        # The server's output, unread by the test (or read only by wait_for_output), and its true state.
        assert re.search(r"-> still running after \d+\.\d s$", section, re.M), section
        assert "(0 ms)" not in section
        assert "    stdout| booting\n" in section and "    stderr| config error: no port\n" in section, section


def test_a_server_ended_by_its_with_block_keeps_its_output_for_the_report(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess

        def test_with(sandbox):
            with sandbox.spawn("echo booting; echo 'config error: no port' >&2; sleep 30",
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE) as server:
                sandbox.wait_for_port(8080, timeout=0.5, process=server)
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*- nsbox sandbox commands (call) -*", "sandbox 1: *", "  caps: *",
                                 "  $ echo booting; * -> killed by signal 9 (* ms)",
                                 "    stdout| booting", "    stderr| config error: no port"])


def test_a_shared_sandboxs_running_server_is_in_the_report_of_a_test_that_used_it(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess, pytest
        from pytest_nsbox import Sandbox

        @pytest.fixture(scope="module")
        def shared(nsbox_defaults):
            with Sandbox.from_settings(nsbox_defaults) as sb:
                sb.spawn("echo 'done early'").wait()
                sb.spawn("echo 'serving'; echo 'slow query' >&2; sleep 30",
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                yield sb

        def test_passes(shared):
            shared.run("true")

        def test_fails(shared):
            assert shared.run("echo 'no rows'; exit 1").returncode == 0
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- nsbox sandbox commands (call) -*", "sandbox 1: *", "  caps: *",
                                 "  $ echo 'serving'; * -> still running after * s  (started before this test)",
                                 "    stdout| serving", "    stderr| slow query",
                                 "  $ echo 'no rows'; exit 1  -> exit 1 (* ms)", "  again: *"])
    assert "done early" not in result.stdout.str()  # what ended before the test is not its own


def test_a_servers_output_in_the_report_is_its_last_lines_only(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess

        def test_flood(sandbox):
            server = sandbox.spawn("seq 1 100000 >&2; sleep 30", stderr=subprocess.PIPE)
            sandbox.wait_for_port(8080, timeout=0.5, process=server)
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    section = result.stdout.str().split("- nsbox sandbox commands (call) -", 1)[1]
    lines = [line for line in section.splitlines() if line.startswith("    stderr| ")]
    assert 5 <= len(lines) <= 20 and len(section) < 4000, section
    assert re.search(r"^    \(\d+ earlier lines of stderr not shown\)$", section, re.M), section


def test_a_server_that_exited_says_so_in_the_error_and_the_report(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess

        def test_dies(sandbox):
            server = sandbox.spawn("echo 'bind: address in use' >&2; exit 3", stderr=subprocess.PIPE)
            sandbox.wait_for_port(8080, timeout=30, process=server)
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "E *.ServerNotReady: nothing will listen on port 8080 in the sandbox: its server "
        "`echo 'bind: address in use' >&2; exit 3` exited with status 3; its stderr ended:",
        "E * bind: address in use",
        "*- nsbox sandbox commands (call) -*",
        "  $ echo 'bind: address in use' >&2; exit 3  -> exit 3 (* ms)",
        "    stderr| bind: address in use",
    ])


def test_a_readiness_timeout_is_a_timeout_error_of_our_own(sandbox):
    with pytest.raises(ServerNotReady) as raised:
        sandbox.wait_for_port(8080, timeout=0.1)
    assert isinstance(raised.value, TimeoutError) and isinstance(raised.value, NsboxError)
    assert "timeout=" in str(raised.value)  # what the user may do: listen there, or wait longer


# -- wait_until --------------------------------------------------------------------------------

def test_wait_until_returns_the_predicates_first_true_value(sandbox):
    calls = []

    def ready() -> int:
        calls.append(1)
        return len(calls) if len(calls) >= 3 else 0

    assert sandbox.wait_until(ready, timeout=10, interval=0.01) == 3


def test_wait_until_names_the_predicate_and_its_last_exception(sandbox):
    def database_answers() -> bool:
        raise ConnectionRefusedError(111, "Connection refused")

    started = time.monotonic()
    with pytest.raises(ServerNotReady) as raised:
        sandbox.wait_until(database_answers, timeout=0.3, interval=0.05)
    assert 0.3 <= time.monotonic() - started < 5
    message = str(raised.value)
    assert "database_answers" in message and "within 0.3 s" in message
    assert "ConnectionRefusedError: [Errno 111] Connection refused" in message
    with pytest.raises(ServerNotReady, match=r"wait_until\(<lambda> at .*test_readiness.py:\d+\).*returned None"):
        sandbox.wait_until(lambda: None, timeout=0.1)


def test_wait_until_fails_at_once_when_the_server_exits(sandbox):
    server = sandbox.spawn("sleep 0.2; echo 'no config' >&2; exit 2", stderr=subprocess.PIPE)
    started = time.monotonic()
    with pytest.raises(ServerNotReady, match=r"its server `sleep 0.2; .*` exited with status 2; "
                                             r"its stderr ended:\n  no config"):
        sandbox.wait_until(lambda: False, timeout=30, process=server)
    assert time.monotonic() - started < 10


def test_wait_until_takes_only_a_callable_and_numbers(sandbox):
    with pytest.raises(ConfigError, match="wait_until takes a callable"):
        sandbox.wait_until(True)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="interval"):
        sandbox.wait_until(lambda: True, interval=0)
    with pytest.raises(ConfigError, match="timeout"):
        sandbox.wait_until(lambda: True, timeout="5")  # type: ignore[arg-type]


# -- wait_for_http -----------------------------------------------------------------------------

@pytest.fixture
def health(sandbox):
    sandbox.write_file("/srv/health.sh", HTTP_SCRIPT)
    return sandbox.spawn(HTTP_SERVER)


def test_wait_for_http_waits_for_the_status_through_the_published_port(sandbox, health, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # a proxy would never reach the sandbox
    monkeypatch.setenv("no_proxy", "")
    with pytest.raises(ServerNotReady, match=r"http://127\.0\.0\.1:\d+/health \(the sandbox's port 8080\) "
                                             r"did not answer with status 200 within 1 s; last: status 503"):
        sandbox.wait_for_http(8080, path="/health", timeout=1, process=health)
    published = sandbox.wait_for_http(8080, status=503, process=health)
    assert published == sandbox.port(8080)
    sandbox.run("touch /tmp/ready", check=True)
    assert sandbox.wait_for_http(8080, path="/health", process=health) == published
    assert sandbox.wait_for_http(8080, status=lambda code: code < 400) == published
    assert sandbox.wait_for_http(8080, status=(200, 204)) == published


def test_wait_for_http_fails_at_once_when_the_server_exits_or_the_sandbox_is_gone(sandbox_factory):
    box = sandbox_factory()
    dead = box.spawn("echo 'no such module' >&2; exit 1", stderr=subprocess.PIPE)
    started = time.monotonic()
    with pytest.raises(ServerNotReady, match=r"its server `.*` exited with status 1; its stderr ended:\n  no such module"):
        box.wait_for_http(8080, timeout=30, process=dead)
    assert time.monotonic() - started < 10
    with pytest.raises(ServerNotReady, match=r"last: no answer \(.*\)"):
        box.wait_for_http(8080, timeout=0.2)
    box.close()
    with pytest.raises(SandboxClosed):
        box.wait_for_http(8080, timeout=5)


def test_wait_for_http_refuses_a_bad_path_or_status(sandbox):
    with pytest.raises(ConfigError, match="path must start with '/'"):
        sandbox.wait_for_http(8080, path="health")
    with pytest.raises(ConfigError, match="status"):
        sandbox.wait_for_http(8080, status="200")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="non-ASCII"):
        sandbox.wait_for_http(8080, path="/café")


def test_wait_for_http_on_the_hosts_network_asks_the_port_itself(sandbox_factory):
    import socket
    box = sandbox_factory(network="host")
    with socket.create_server(("127.0.0.1", 0)) as free:
        port = free.getsockname()[1]
    box.write_file("/srv/health.sh", HTTP_SCRIPT)
    box.run("touch /tmp/ready", check=True)
    server = box.spawn(["nc", "-lk", "-p", str(port), "-e", "sh", "/srv/health.sh"])
    assert box.wait_for_http(port, process=server) == ("127.0.0.1", port)
    server.kill()
    server.wait(10)
    with pytest.raises(ServerNotReady, match=rf"http://127\.0\.0\.1:{port}/ \(port {port} on the host's network\) "
                                             r"will not answer with status 200 .*exited with status -9"):
        box.wait_for_http(port, timeout=30, process=server)
