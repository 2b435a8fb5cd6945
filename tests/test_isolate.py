"""Isolate mode: whole tests of an unmodified suite, each in a sandbox of its own.

Every test here runs a small suite with pytester, in a pytest of its own, with and without
--nsbox-isolate, and compares what a user would see.
"""

from __future__ import annotations

import re
import textwrap

import pytest


OUTCOMES = textwrap.dedent("""
    import os, subprocess, sys, time
    import pytest

    @pytest.fixture
    def broken_setup():
        raise RuntimeError("setup broke")

    @pytest.fixture
    def broken_teardown():
        yield
        raise RuntimeError("teardown broke")

    def test_passes(tmp_path):
        (tmp_path / "written").write_text("where tests may write")
        assert os.getuid() == int(os.environ["EXPECTED_UID"])  # the user's own uid, isolated or not

    def test_fails():
        assert 1 + 1 == 3

    def test_skips():
        pytest.skip("not today")

    @pytest.mark.xfail(reason="known bug", strict=True)
    def test_xfails():
        assert False

    def test_errors_in_setup(broken_setup):
        pass

    def test_errors_in_teardown(broken_teardown):
        pass

    def test_exits_hard():
        os._exit(7)

    def test_crashes():
        import ctypes
        ctypes.string_at(0)  # a real fault: kill(getpid(), SIGSEGV) is ignored by a namespace's init

    def test_after_the_crashes():
        pass

    class CustomWarning(UserWarning):
        pass

    def test_warns():
        import warnings
        warnings.warn(CustomWarning("careful"))
""")


@pytest.fixture
def suite(pytester, monkeypatch):
    import os
    monkeypatch.setenv("EXPECTED_UID", str(os.getuid()))
    pytester.makepyfile(test_outcomes=OUTCOMES)
    return pytester


def _outcomes(result) -> dict[str, int]:
    return {k: v for k, v in result.parseoutcomes().items() if k not in ("seconds",)}


def test_outcomes_are_those_of_a_plain_run_and_crashes_say_how(suite):
    plain = suite.runpytest_subprocess("-k", "not exits_hard and not crashes")
    isolated = suite.runpytest_subprocess("--nsbox-isolate", "-k", "not exits_hard and not crashes")
    assert _outcomes(isolated) == _outcomes(plain) == {
        "passed": 3, "failed": 1, "skipped": 1, "xfailed": 1, "errors": 2, "deselected": 3, "warnings": 1}
    isolated.stdout.fnmatch_lines(["*test_outcomes.py:*: CustomWarning: careful"])
    crashed = suite.runpytest_subprocess("--nsbox-isolate", "-k", "exits_hard or crashes or after")
    crashed.assert_outcomes(passed=1, failed=2)
    crashed.stdout.fnmatch_lines([
        "*test_exits_hard*", "nsbox: the test's process exited with status 7 (os._exit?) before its report was made",
        "*test_crashes*", "nsbox: the test's process was killed by SIGSEGV"], consecutive=False)


def test_report_fidelity_junitxml_equal_but_for_times(suite):
    args = ("-k", "not exits_hard and not crashes", "-rA")
    suite.runpytest_subprocess(*args, "--junitxml=plain.xml")
    suite.runpytest_subprocess(*args, "--junitxml=isolated.xml", "--nsbox-isolate")

    def normal(name: str) -> str:
        xml = (suite.path / name).read_text()
        return re.sub(r' (time|timestamp|hostname)="[^"]*"', "", xml)

    assert normal("isolated.xml") == normal("plain.xml")


def test_subtests_and_their_failures_are_counted_as_in_a_plain_run(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import unittest

        class Case(unittest.TestCase):
            def test_sub(self):
                for i in range(4):
                    with self.subTest(i=i):
                        self.assertLess(i, 2)

        def test_subtests(subtests):
            for i in range(3):
                with subtests.test(i=i):
                    assert i != 1
    """))
    plain = pytester.runpytest_subprocess("-v")
    isolated = pytester.runpytest_subprocess("-v", "--nsbox-isolate")

    def summary(result) -> str:
        return re.sub(r" in [0-9.]+s.*", "", result.stdout.lines[-1].strip("= "))

    assert summary(isolated) == summary(plain) == "4 failed, 1 passed, 4 subtests passed"


def test_the_x_and_maxfail_and_lf_options_see_the_isolated_reports(suite):
    suite.runpytest_subprocess("--nsbox-isolate", "-x").assert_outcomes(passed=1, failed=1)
    last_failed = suite.runpytest_subprocess("--nsbox-isolate", "--lf", "-p", "cacheprovider",
                                             "-k", "not exits_hard and not crashes")
    last_failed.stdout.fnmatch_lines(["*run-last-failure*"])


def test_fixture_scopes_keep_their_meaning(pytester):
    pytester.makeconftest(textwrap.dedent("""
        import pytest

        @pytest.fixture(scope="session")
        def session_thing(tmp_path_factory):
            log = tmp_path_factory.getbasetemp() / "log"
            with open(log, "a") as f:
                f.write("session setup\\n")
            yield "S"
            with open(log, "a") as f:
                f.write("session teardown\\n")

        @pytest.fixture(scope="module")
        def module_thing(tmp_path_factory):
            with open(tmp_path_factory.getbasetemp() / "log", "a") as f:
                f.write("module setup\\n")
            return "M"
    """))
    for module in ("a", "b"):
        pytester.makepyfile(**{f"test_{module}": textwrap.dedent("""
            import pytest
            @pytest.mark.parametrize("n", range(3))
            def test_uses(session_thing, module_thing, n):
                assert (session_thing, module_thing) == ("S", "M")
        """)})
    result = pytester.runpytest_subprocess("--nsbox-isolate", "--basetemp", str(pytester.path / "bt"))
    result.assert_outcomes(passed=6)
    assert (pytester.path / "bt" / "log").read_text().splitlines() == [
        "session setup", "module setup", "module setup", "session teardown"]


def test_a_session_server_on_localhost_is_reached_and_network_none_is_cut_off(pytester):
    pytester.makeconftest(textwrap.dedent("""
        import http.server, threading, pytest

        @pytest.fixture(scope="session")
        def server():
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            yield f"http://127.0.0.1:{httpd.server_address[1]}/"
            httpd.shutdown()
    """))
    pytester.makepyfile(textwrap.dedent("""
        import urllib.request, pytest

        def test_reaches_the_session_server(server):
            assert urllib.request.urlopen(server, timeout=5).status == 200

        @pytest.mark.sandbox(network="none")
        def test_a_private_network_does_not(server):
            with pytest.raises(OSError):
                urllib.request.urlopen(server, timeout=5)
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=2)


def test_what_a_test_leaves_behind_dies_with_it_and_writes_stay_inside(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, subprocess, pytest

        def test_leaks_a_daemon():
            subprocess.Popen(["sleep", "300.5"], start_new_session=True)

        def test_writes_outside(pytestconfig):
            with pytest.raises(OSError, match="Read-only file system"):
                (pytestconfig.rootpath / "written-by-a-test").write_text("x")

        def test_has_a_private_tmp():
            with open("/tmp/left-by-a-test", "w") as f:
                f.write("x")
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=3)
    assert not (pytester.path / "written-by-a-test").exists()
    assert not __import__("os").path.exists("/tmp/left-by-a-test")
    assert not _processes_with_argv(["sleep", "300.5"])


def test_tmp_holds_what_fixtures_made_there_and_keeps_what_the_test_writes(pytester):
    """Under the private /tmp lies the host's, copy-on-write: a module fixture's tempfile.mkdtemp()
    is seen (python-dateutil's suite does this), what the test writes there stays in its sandbox."""
    pytester.makepyfile(textwrap.dedent("""
        import os, shutil, tempfile, pytest

        @pytest.fixture(scope="module")
        def data_dir():
            where = tempfile.mkdtemp(prefix="nsbox-fixture-", dir="/tmp")
            with open(os.path.join(where, "zone"), "w") as f:
                f.write("made by the fixture")
            yield where
            assert sorted(os.listdir(where)) == ["zone"]  # the tests' writes stayed in their sandboxes
            with open(os.path.join(where, "zone")) as f:
                assert f.read() == "made by the fixture"
            shutil.rmtree(where)

        @pytest.mark.parametrize("n", range(2))
        def test_sees_and_changes_it(data_dir, n):
            with open(os.path.join(data_dir, "zone")) as f:
                assert f.read() == "made by the fixture"
            with open(os.path.join(data_dir, "zone"), "a") as f:
                f.write(" and changed by a test")
            with open(os.path.join(data_dir, f"new-{n}"), "w") as f:
                f.write("x")
            assert sorted(os.listdir(data_dir)) == [f"new-{n}", "zone"]
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-W", "error::pytest_nsbox.NsboxWarning")
    result.assert_outcomes(passed=2)


def test_file_permissions_hold_as_in_a_plain_run(pytester):
    """A normal user's isolated test has no capability in its user namespace (it would read its
    own mode-0 files); root keeps root's, as in a plain run."""
    pytester.makepyfile(textwrap.dedent("""
        import os

        def test_a_mode_0_file(tmp_path):
            secret = tmp_path / "secret"
            secret.write_text("x")
            secret.chmod(0)
            with open("/proc/self/status") as f:
                effective = next(line.split()[1] for line in f if line.startswith("CapEff:"))
            if os.getuid() == 0:
                assert os.access(secret, os.R_OK)
            else:
                assert not os.access(secret, os.R_OK) and int(effective, 16) == 0
                try:
                    secret.read_text()
                except PermissionError:
                    pass
                else:
                    raise AssertionError("read a mode-0 file")
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)


def test_hypothesis_keeps_its_example_database_as_in_a_plain_run(pytester):
    pytest.importorskip("hypothesis")  # CI: python-dateutil's suite in .ci/third-party uses it
    # Hypothesis keeps no database under CI=true (its "ci" profile): name the plain run's one.
    pytester.makepyfile(textwrap.dedent("""
        from hypothesis import given, settings, strategies as st
        from hypothesis.database import DirectoryBasedExampleDatabase

        settings.register_profile("plain", database=DirectoryBasedExampleDatabase(".hypothesis/examples"))
        settings.load_profile("plain")

        @given(st.integers())
        def test_property(n):
            assert n + 0 == n
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-W", "error")  # no "database unusable" warning
    result.assert_outcomes(passed=1)
    assert (pytester.path / ".hypothesis" / "examples").is_dir()


def test_what_a_test_started_is_gone_before_the_next_test_starts(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, subprocess, threading, time, pytest

        def leftovers():
            found = []
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        found += [pid] if f.read() == b"sleep\\x00300.25\\x00" else []
                except OSError:
                    pass
            return found

        @pytest.mark.sandbox(isolate=True)
        def test_leaves_a_daemon():
            subprocess.Popen(["sleep", "300.25"], start_new_session=True)

        def test_sees_none_after_the_daemon():  # not isolated: it sees the host's processes
            assert not leftovers()

        @pytest.mark.sandbox(isolate=True)
        def test_leaves_a_thread_that_keeps_forking():
            def fork_forever():
                while True:
                    subprocess.Popen(["sleep", "300.25"])
                    time.sleep(0.001)
            threading.Thread(target=fork_forever, daemon=True).start()
            time.sleep(0.05)

        def test_sees_none_after_the_thread():
            assert not leftovers()
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=4)


def test_a_project_reached_through_a_symlink_under_tmp_is_still_reached(pytester, tmp_path_factory,
                                                                       monkeypatch):
    link = tmp_path_factory.mktemp("links") / "project"
    link.symlink_to(pytester.path)
    (pytester.path / "data.txt").write_text("x")
    pytester.makepyfile(textwrap.dedent(f"""
        import os
        def test_sees_the_project_through_the_link():
            assert open({str(link / "data.txt")!r}).read() == "x"
    """))
    monkeypatch.setenv("PWD", str(link))  # as a shell that entered the link sets it
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)


def test_the_limits_hold_and_the_report_names_the_one_hit(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess, time, pytest

        @pytest.mark.sandbox(timeout=1)
        def test_hangs():
            time.sleep(60)

        @pytest.mark.sandbox(pids_max=32)
        def test_fork_bombs():
            with pytest.raises(subprocess.TimeoutExpired):
                # The sleep and the bomb's subshell are forked before the bomb fills the cap: the shell
                # that waits never forks again, so a refused fork cannot end it early.
                subprocess.run(["sh", "-c", "sleep 60.75 & (bomb() { bomb | bomb & }; bomb) 2>/dev/null; wait $!"],
                               timeout=2)

        def test_next_one_is_fine():
            assert subprocess.run(["true"]).returncode == 0
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate")
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["nsbox: the test was killed at its timeout of 1 s, with everything it started"])
    assert not _processes_with_argv(["sleep", "60.75"])


def test_marker_isolates_chosen_tests_and_a_bad_one_fails_the_test(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, pytest

        @pytest.mark.sandbox(isolate=True)
        def test_isolated():
            assert os.getpid() == 1

        def test_not_isolated():
            assert os.getpid() != 1

        @pytest.mark.sandbox(isolate=True, network="internet")
        def test_badly_marked():
            pass
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=2, failed=1)
    result.stdout.fnmatch_lines(["*bad value for 'network': 'internet'*"])
    assert "PytestWarning" not in result.stdout.str()  # isolate=True configures something


def test_debuggers_are_refused_not_hung(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-isolate", "--pdb")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: --nsbox-isolate runs each test in a sandboxed copy of pytest, "
                                 "where --pdb cannot reach your terminal*"])


def test_works_under_xdist(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, pytest

        @pytest.mark.parametrize("n", range(6))
        def test_many(n, tmp_path):
            assert os.getpid() == 1
            (tmp_path / "n").write_text(str(n))
    """))
    pytester.runpytest_subprocess("--nsbox-isolate", "-n", "2").assert_outcomes(passed=6)


COVERED = dict(mod=textwrap.dedent("""
    def covered(x):
        if x:
            return "yes"
        return "no"

    def not_covered():
        return 1
"""), test_mod=textwrap.dedent("""
    import mod
    def test_a():
        assert mod.covered(True) == "yes"
    def test_b():
        assert mod.covered(False) == "no"
"""))


def test_coverage_numbers_are_the_same(pytester):
    pytester.makepyfile(**COVERED)
    totals = []
    for args in ((), ("--nsbox-isolate",)):
        result = pytester.runpytest_subprocess("--cov=mod", "--cov-report=term-missing", *args)
        result.assert_outcomes(passed=2)
        totals.append([line for line in result.stdout.lines if line.startswith("mod.py")])
    assert totals[0] == totals[1] and totals[0] and "83%" in totals[0][0], totals


def test_pytest_timeout_fails_the_test_and_the_run_goes_on(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import time
        def test_slow():
            time.sleep(30)
        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "--timeout=2", "--timeout-method=signal")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*Failed: Timeout (>2.0s) from pytest-timeout.", "(nsbox: raised in the pytest process while the isolated test ran)"])


def test_a_sandbox_inside_an_isolated_test_is_capped(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, subprocess, pytest

        @pytest.fixture
        def made_in_setup(sandbox_factory):
            return sandbox_factory()  # in the pytest process

        @pytest.mark.sandbox(pids_max=40)
        def test_nested(sandbox_factory, made_in_setup):
            assert made_in_setup.run(["echo", "alive"]).stdout == "alive\\n"
            if os.getuid() == 0:
                # The test's /proc/sys is read-only (root's sysctls are the host's), so the kernel
                # mounts no fresh /proc in here: the error says so, and what to do.
                with pytest.raises(pytest.fail.Exception, match="make the sandbox in a fixture"):
                    sandbox_factory()
                return
            box = sandbox_factory()  # made in the test's call, inside its sandbox
            assert box.limits.pids_mechanism == "rlimit", box.limits.describe()
            with pytest.raises(subprocess.TimeoutExpired):
                box.run("(bomb() { bomb | bomb & }; bomb) & exec sleep 60", timeout=2)
            assert box.run(["echo", "alive"]).stdout == "alive\\n"
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)


def _processes_with_argv(argv: list[str]) -> list[int]:
    import os
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f.read().split(b"\0")[:-1] == [a.encode() for a in argv]:
                        found.append(int(pid))
            except OSError:
                continue
    return found


def test_the_docs_saved_rootfs_recipe_works_in_an_isolated_test(pytester):
    # usage.md's "a saved rootfs" recipe: a session fixture saves a tarball, the test's call makes a
    # sandbox over it.  The cache is read-only in the call, so the tarball's tree is extracted where
    # that test alone may write; another test extracts its own.
    pytester.makepyfile(textwrap.dedent("""
        import os, pytest
        from pytest_nsbox import Sandbox

        @pytest.fixture(scope="session")
        def saved(tmp_path_factory):
            tarball = tmp_path_factory.mktemp("saved") / "alpine-marked.tar"
            with Sandbox() as sb:
                sb.write_file("/etc/marked", "yes")
                sb.save(tarball)
            return str(tarball)

        @pytest.mark.parametrize("n", [1, 2])
        def test_over_the_saved_rootfs(sandbox_factory, saved, n):
            if os.getuid() == 0:
                pytest.skip("as root no sandbox is made in an isolated call (test_isolate's capped test)")
            box = sandbox_factory(rootfs=saved)
            assert box.run(["cat", "/etc/marked"]).stdout == "yes"
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-rs")
    if __import__("os").getuid() == 0:
        result.assert_outcomes(skipped=2)
    else:
        result.assert_outcomes(passed=2)
