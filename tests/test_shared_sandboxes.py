"""Sandboxes shared by a module or the session: first-class fixtures, configured like the test's
own, closed after their last user, reported with the failing test that used them."""

from __future__ import annotations

import os
import textwrap

import pytest


def _gone(pids_file) -> None:
    pids = [int(line) for line in pids_file.read_text().split()]
    assert pids
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}"), f"init {pid} outlived its scope"


def test_a_module_sandbox_is_shared_by_its_module_configured_by_its_marker_and_closed_after_it(pytester):
    pids = pytester.path / "pids"
    pytester.makepyfile(test_a=textwrap.dedent(f"""
        import pytest
        pytestmark = pytest.mark.sandbox(hostname="module-a", env={{"WHO": "a"}})

        def test_writes(module_sandbox):
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{module_sandbox.init_pid}}\\n")
            module_sandbox.run("echo kept > /root/state", check=True)

        def test_sees_what_the_first_wrote(module_sandbox):
            assert module_sandbox.run("hostname; echo $WHO; cat /root/state").stdout == "module-a\\na\\nkept\\n"
    """), test_b=textwrap.dedent(f"""
        import os

        def test_another_module_gets_a_fresh_one(module_sandbox):
            assert module_sandbox.run("cat /root/state").returncode == 1
            assert module_sandbox.run("hostname").stdout == "nsbox\\n"
            for pid in open({str(pids)!r}).read().split():
                assert not os.path.exists(f"/proc/{{pid}}"), "module a's sandbox is still running"
    """))
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=3)
    _gone(pids)


def test_a_session_sandbox_and_the_shared_factory_serve_every_module(pytester):
    pids = pytester.path / "pids"
    pytester.makeconftest(textwrap.dedent(f"""
        import pytest

        @pytest.fixture(scope="session")
        def server(shared_sandbox_factory):
            box = shared_sandbox_factory(hostname="server", network="none")
            with open({str(pids)!r}, "a") as f:
                f.write(f"{{box.init_pid}}\\n")
            return box
    """))
    for name in ("test_one", "test_two"):
        pytester.makepyfile(**{name: textwrap.dedent(f"""
            def test_it(session_sandbox, server):
                with open({str(pids)!r}, "a") as f:
                    f.write(f"{{session_sandbox.init_pid}}\\n")
                assert server.run("hostname").stdout == "server\\n"
                session_sandbox.run("echo {name} >> /root/visits", check=True)
                server.run("echo {name} >> /root/visits", check=True)
        """)})
    pytester.makepyfile(test_zlast=textwrap.dedent("""
        def test_both_saw_every_visit(session_sandbox, server):
            assert session_sandbox.run("cat /root/visits").stdout == "test_one\\ntest_two\\n"
            assert server.run("cat /root/visits").stdout == "test_one\\ntest_two\\n"
    """))
    pytester.runpytest_subprocess("-p", "no:randomly").assert_outcomes(passed=3)
    assert len(set(pids.read_text().split())) == 2  # one server, one session sandbox
    _gone(pids)


def test_a_bad_module_marker_fails_its_tests_with_one_sentence(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        pytestmark = pytest.mark.sandbox(netwrok="host")

        def test_it(module_sandbox):
            pass
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unknown sandbox setting 'netwrok'; allowed: *network*"])
    assert "Traceback" not in result.stdout.str()


def test_a_failed_test_reports_the_module_sandbox_commands_it_ran(pytester):
    pytester.makepyfile(textwrap.dedent("""
        def test_passes(module_sandbox):
            module_sandbox.run("echo from the first test")

        def test_fails(module_sandbox):
            assert module_sandbox.run("echo second >&2; exit 4").returncode == 0
    """))
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- nsbox sandbox commands (call) -*", "  $ echo second >&2; exit 4  -> exit 4*"])
    assert "from the first test" not in result.stdout.str()


@pytest.mark.parametrize("isolate", [False, True], ids=["plain", "isolated"])
def test_shared_sandboxes_work_for_isolated_tests_too(pytester, isolate):
    pytester.makepyfile(textwrap.dedent("""
        def test_one(module_sandbox, session_sandbox):
            module_sandbox.run("touch /root/one", check=True)
            assert session_sandbox.run("echo hi").stdout == "hi\\n"

        def test_two(module_sandbox):
            assert module_sandbox.run("ls /root").stdout == "one\\n"
    """))
    args = ["-p", "no:randomly"] + (["--nsbox-isolate"] if isolate else [])
    pytester.runpytest_subprocess(*args).assert_outcomes(passed=2)
