"""The pytest face of the plugin: options, ini, marker, fixtures, header, reports, xdist."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest


def test_sandbox_fixture_and_marker_keywords(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(hostname="marked", env={"A": "b"})
        def test_marked(sandbox):
            assert sandbox.run('hostname; echo $A').stdout == "marked\\nb\\n"

        def test_plain(sandbox):
            assert sandbox.run(["hostname"]).stdout == "nsbox\\n"
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_marker_on_class_and_module_applies(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        pytestmark = pytest.mark.sandbox(hostname="from-module")

        def test_module(sandbox):
            assert sandbox.run(["hostname"]).stdout == "from-module\\n"

        @pytest.mark.sandbox(hostname="from-class")
        class TestC:
            def test_class(self, sandbox):
                assert sandbox.run(["hostname"]).stdout == "from-class\\n"
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


@pytest.mark.parametrize("marker, message", [
    ('netwrok="none"', "*test_bad*unknown sandbox setting 'netwrok'*allowed: isolate, profile, rootfs*network*"),
    ('network="internet"', "*test_bad*bad value for 'network': 'internet'; allowed: 'none' or 'host'*"),
])
def test_bad_marker_fails_naming_test_and_setting(pytester, marker, message):
    pytester.makepyfile(textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandbox({marker})
        def test_bad(sandbox):
            pass
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])
    assert "Traceback" not in result.stdout.str()


def test_marker_is_registered_for_strict_markers(pytester):
    pytester.makepyfile("import pytest\n@pytest.mark.sandbox()\ndef test_x():\n    pass\n")
    pytester.runpytest_subprocess("--strict-markers").assert_outcomes(passed=1)
    pytester.runpytest_subprocess("--markers").stdout.fnmatch_lines(["@pytest.mark.sandbox(**settings)*"])


def test_report_names_rootfs_and_namespaces_once_sandboxed_tests_are_collected(pytester):
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["collected 1 item",
                                 "nsbox: rootfs *alpine-minirootfs-3.20.3-x86_64.tar.gz sha256:d4e6fd67dcf7 (local file); cache *",
                                 "nsbox: namespaces user,mnt,pid,ipc,uts,cgroup,net: available"])


def test_a_run_without_sandboxed_tests_starts_nothing(pytester):
    # No report lines, and no spawner: the plugin costs such a run next to nothing.
    pytester.makepyfile(textwrap.dedent("""
        import sys
        def test_x():
            assert "pytest_nsbox.engine.client" not in sys.modules
            assert "pytest_nsbox.rootfs.store" not in sys.modules
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1)
    assert "nsbox:" not in result.stdout.str()


def test_failure_report_lists_sandbox_commands(pytester):
    pytester.makepyfile(textwrap.dedent("""
        def test_fails(sandbox):
            sandbox.run("echo fine")
            r = sandbox.run("echo 'apk: no such package' >&2; exit 3")
            assert r.returncode == 0
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*- nsbox sandbox commands (call) -*",
        "sandbox 1: rootfs *",
        "  $ echo fine  -> exit 0*",
        "  $ echo 'apk: no such package' >&2; exit 3  -> exit 3*",
        "    stderr| apk: no such package",
    ])


def test_the_report_ends_with_the_nsbox_shell_line_that_makes_the_sandbox_again(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(network="host", hostname="builder", pids_max=64, env={"MODE": "ci x"}, cwd="/tmp")
        def test_fails(sandbox):
            assert sandbox.run("false").returncode == 0
    """))
    result = pytester.runpytest_subprocess()
    line = next(line for line in result.stdout.lines if line.startswith("  again: "))
    assert line.endswith("--network host --hostname builder --pids-max 64 --env 'MODE=ci x' --cwd /tmp")
    assert " shell --rootfs " in line
    # The line works as printed, pasted into a fresh shell (here a pipe): no virtualenv activated,
    # none of this run's NSBOX_* variables.
    command = line.removeprefix("  again: ").replace(" shell ", " run ", 1) + " -- sh -c 'hostname; echo $MODE; pwd'"
    made = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, env=_fresh_shell())
    assert made.stdout.splitlines() == ["builder", "ci x", "/tmp"], made.stderr


def _fresh_shell() -> dict[str, str]:
    """The environment of a new terminal: the system's PATH (no virtualenv), no NSBOX_* settings."""
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root"),
            **{k: v for k, v in os.environ.items() if k in ("XDG_CACHE_HOME", "XDG_RUNTIME_DIR", "LANG")}}


def test_the_again_line_names_the_cache_the_run_used(pytester, tmp_path, cache_dir):
    pytester.makepyfile("def test_fails(sandbox):\n    assert sandbox.run('false').returncode == 0\n")
    result = pytester.runpytest_subprocess("--nsbox-cache-dir", str(cache_dir), "--nsbox-keep-on-failure")
    line = next(line for line in result.stdout.lines if line.startswith("  again: "))
    assert f"--cache-dir {cache_dir}" in line  # the kept tarball is extracted there, not in ~/.cache
    command = line.removeprefix("  again: ").replace(" shell ", " run ", 1) + " -- true"
    made = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60, env=_fresh_shell())
    assert made.returncode == 0, made.stderr


def test_file_transfers_are_reported_as_the_calls_they_were(pytester):
    pytester.makepyfile(textwrap.dedent("""
        def test_fails(sandbox):
            sandbox.write_file("/root/x", "data")
            assert sandbox.read_file("/root/x") == "other"
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  $ write_file('/root/x')  -> exit 0*", "  $ read_file('/root/x')  -> exit 0*"])
    assert "/bin/sh" not in result.stdout.str() and "nsbox-write" not in result.stdout.str()


def test_a_module_sandbox_used_by_a_failed_test_is_in_its_report(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        from pytest_nsbox import Sandbox

        @pytest.fixture(scope="module")
        def shared(nsbox_defaults):
            with Sandbox.from_settings(nsbox_defaults) as sb:
                yield sb

        def test_passes(shared):
            shared.run("echo from the first test")

        def test_fails(shared):
            assert shared.run("echo second >&2; exit 4").returncode == 0
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*- nsbox sandbox commands (call) -*", "sandbox 1: rootfs *",
                                 "  $ echo second >&2; exit 4  -> exit 4*", "    stderr| second", "  again: * shell *"])
    assert "from the first test" not in result.stdout.str()  # the other test's commands are its own


def test_keep_on_failure_keeps_the_filesystem_for_the_shell_line(pytester):
    pytester.makepyfile(textwrap.dedent("""
        def test_fails(sandbox):
            sandbox.write_file("/root/evidence", "what the test left")
            assert False
    """))
    result = pytester.runpytest_subprocess("--nsbox-keep-on-failure", "--basetemp", str(pytester.path / "bt"))
    kept = next(line.split(": ", 1)[1] for line in result.stdout.lines
                if line.startswith("  its filesystem at the failure: "))
    assert kept.startswith(str(pytester.path / "bt" / "nsbox-kept")) and kept.endswith(".tar")
    line = next(line for line in result.stdout.lines if line.startswith("  again: "))
    assert f"--rootfs {kept}" in line and "tar -c" not in result.stdout.str()
    shown = subprocess.run([sys.executable, "-m", "pytest_nsbox", "run", "--rootfs", kept, "--",
                            "cat", "/root/evidence"], capture_output=True, text=True, timeout=60)
    assert shown.stdout == "what the test left", shown.stderr


def test_keep_on_failure_keeps_a_shared_sandbox_as_the_failed_test_left_it(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        from pytest_nsbox import Sandbox

        @pytest.fixture(scope="module")
        def shared(nsbox_defaults):
            with Sandbox.from_settings(nsbox_defaults) as sb:
                yield sb

        def test_fails(shared):
            shared.write_file("/root/evidence", "left by test_fails")
            assert False

        def test_fails_without_commands(shared):
            assert False
    """))
    result = pytester.runpytest_subprocess("--nsbox-keep-on-failure")
    result.assert_outcomes(failed=2)
    kept = [line.split(": ", 1)[1] for line in result.stdout.lines if line.startswith("  its filesystem at the failure: ")]
    # Both were handed the sandbox; the second ran nothing in it, so it names the same tarball.
    assert len(kept) == 2 and kept[0] == kept[1] and kept[0].endswith(".tar"), result.stdout.str()
    shown = subprocess.run([sys.executable, "-m", "pytest_nsbox", "run", "--rootfs", kept[0], "--",
                            "cat", "/root/evidence"], capture_output=True, text=True, timeout=60)
    assert shown.stdout == "left by test_fails", shown.stderr


def test_keep_on_failure_stops_at_its_budget_and_says_so(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("n", [1, 2])
        def test_fails(sandbox, n):
            assert sandbox.run("false").returncode == 0
    """))
    # A fresh Alpine sandbox saves as about 8 MB: one fits in 12M, two do not.
    result = pytester.runpytest_subprocess("--nsbox-keep-on-failure", "--nsbox-keep-on-failure-max", "12M")
    result.assert_outcomes(failed=2)
    said = [line for line in result.stdout.lines if line.startswith("  its filesystem at the failure: ")]
    assert said[0].endswith(".tar")
    assert "not kept: this test process already kept 1 tarballs" in said[1]
    assert "--nsbox-keep-on-failure-max" in said[1]


@pytest.mark.parametrize("mode, outcome", [("fail", "errors"), ("skip", "skipped")])
def test_not_linux_fails_or_skips_sandboxed_tests_with_the_reason_and_leaves_the_rest(pytester, mode, outcome):
    pytester.makeconftest("import sys\nsys.platform = 'darwin'  # as the plugin would find it on a Mac\n")
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        def test_plain():
            pass

        @pytest.mark.sandbox(network="host")
        def test_sandboxed(sandbox):
            pass
    """))
    # (Hypothesis's plugin, where installed, reads sysconfig data that the fake platform lacks.)
    result = pytester.runpytest_subprocess(f"--nsbox-unavailable={mode}", "-rs", "-p", "no:hypothesispytest")
    result.assert_outcomes(passed=1, **{outcome: 1})
    result.stdout.fnmatch_lines(["*nsbox: this machine cannot make sandboxes: pytest-nsbox needs Linux "
                                 "namespaces; this is darwin*"])
    assert "Traceback" not in result.stdout.str()


def test_factory_sandboxes_do_not_share_files(pytester):
    pytester.makepyfile(textwrap.dedent("""
        def test_two(sandbox_factory):
            a, b = sandbox_factory(), sandbox_factory(hostname="b")
            a.write_file("/root/only-a", "x")
            assert b.run(["test", "-e", "/root/only-a"]).returncode == 1
            assert a.namespaces["mnt"] != b.namespaces["mnt"]
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_module_scoped_sandbox_recipe(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        from pytest_nsbox import Sandbox

        @pytest.fixture(scope="module")
        def box(nsbox_defaults):
            with Sandbox.from_settings(nsbox_defaults) as sb:
                yield sb

        def test_one(box):
            box.write_file("/root/state", "kept")

        def test_two(box):
            assert box.read_file("/root/state") == "kept"
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_rootfs_from_cli_ini_and_env_precedence(pytester, alpine_tarball, monkeypatch):
    pytester.makepyfile("def test_x(sandbox):\n    print(sandbox.settings.rootfs)\n"
                        "    assert sandbox.run(['true']).returncode == 0\n")
    monkeypatch.delenv("NSBOX_ROOTFS")
    pytester.makeini(f"[pytest]\nnsbox_rootfs = {alpine_tarball}\n")
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    result = pytester.runpytest_subprocess("--nsbox-rootfs=/does/not/exist")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*bad rootfs '/does/not/exist': it is neither a directory nor a tarball*"
                                 "the forms are: alpine, alpine:X.Y, *host*"])
    monkeypatch.setenv("NSBOX_ROOTFS", "/from/env")
    pytester.runpytest_subprocess().stderr.fnmatch_lines(["*bad rootfs '/from/env'*"])


def test_default_rootfs_is_alpine_and_an_offline_miss_says_how_to_fill_the_cache(pytester, monkeypatch):
    monkeypatch.delenv("NSBOX_ROOTFS")
    monkeypatch.setenv("NSBOX_CACHE_DIR", str(pytester.path / "empty-cache"))
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-offline")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["nsbox: rootfs alpine (not cached yet: fetched on first use); cache *; offline",
                                 "*rootfs alpine is not in the cache * and cannot be fetched (--nsbox-offline is set)."
                                 " Fill the cache where there is network with `nsbox rootfs pull alpine --cache-dir *`*"])


def test_bad_unavailable_option_is_a_usage_error(pytester):
    pytester.makeini("[pytest]\nnsbox_unavailable = maybe\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: nsbox_unavailable in tox.ini must be one of fail, skip, not 'maybe'"])


def test_patched_popen_does_not_intercept_sandboxes(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import subprocess

        def test_x(sandbox, monkeypatch):
            def refuse(*a, **k):
                raise AssertionError("Popen was called")
            monkeypatch.setattr(subprocess, "Popen", refuse)
            assert sandbox.run(["echo", "real"]).stdout == "real\\n"
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_works_under_xdist(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("n", range(8))
        def test_many(sandbox, n):
            assert sandbox.run(f"echo {n} > /tmp/n; cat /tmp/n").stdout == f"{n}\\n"
    """))
    result = pytester.runpytest_subprocess("-n", "2", "-W", "error::DeprecationWarning")
    result.assert_outcomes(passed=8)


@pytest.mark.parametrize("args, ini, message", [
    (["--nsbox-pids-max=0"], "", "ERROR: --nsbox-pids-max is 0, which would turn the fork-bomb cap off*"),
    ([], "nsbox_pids_max = 0", "ERROR: nsbox_pids_max in tox.ini is 0, which would turn the fork-bomb cap off*"),
    ([], "nsbox_offline = maybe", "ERROR: nsbox_offline in tox.ini must be true or false*not 'maybe'"),
    ([], "nsbox_require_caps = yess", "ERROR: nsbox_require_caps in tox.ini must be true or false*not 'yess'"),
    ([], "nsbox_timeout = soon", "ERROR: nsbox_timeout in tox.ini takes a positive number of seconds, not 'soon'"),
], ids=["pids-0-cli", "pids-0-ini", "offline-maybe", "require-caps-typo", "timeout-word"])
def test_a_bad_run_wide_value_is_never_read_as_off(pytester, args, ini, message):
    pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    result = pytester.runpytest_subprocess(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_pids_max_zero_from_the_environment_is_refused_too(pytester, monkeypatch):
    monkeypatch.setenv("NSBOX_PIDS_MAX", "0")
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    result = pytester.runpytest_subprocess()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: NSBOX_PIDS_MAX is 0, which would turn the fork-bomb cap off*"])


def test_relative_ini_paths_are_relative_to_the_ini_file(pytester, monkeypatch, alpine_tarball):
    # Run from a subdirectory: the cache named in the ini must still be next to the ini file.
    monkeypatch.delenv("NSBOX_CACHE_DIR")
    monkeypatch.delenv("NSBOX_ROOTFS")
    (pytester.path / "rootfs.tar.gz").write_bytes(alpine_tarball.read_bytes())
    pytester.makeini("[pytest]\nnsbox_cache_dir = .nsbox-cache\nnsbox_rootfs = rootfs.tar.gz\n")
    sub = pytester.mkdir("tests")
    (sub / "test_x.py").write_text("def test_x(sandbox):\n    assert sandbox.run(['true']).returncode == 0\n")
    monkeypatch.chdir(sub)
    pytester.runpytest_subprocess("test_x.py").assert_outcomes(passed=1)
    assert (pytester.path / ".nsbox-cache" / "trees").is_dir()
    assert not (sub / ".nsbox-cache").exists()


def test_markers_merge_keyword_by_keyword_the_closest_winning(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest
        pytestmark = pytest.mark.sandbox(network="host", hostname="from-module")

        @pytest.mark.sandbox(hostname="from-class")
        class TestC:
            @pytest.mark.sandbox(env={"A": "1"})
            def test_all_three(self, sandbox):
                assert sandbox.settings.network == "host"
                assert sandbox.run("hostname; echo $A").stdout == "from-class\\n1\\n"

        @pytest.mark.sandbox(hostname="from-function")
        def test_function_over_module(sandbox_factory):
            box = sandbox_factory(env={"B": "2"})  # the factory starts from the markers too
            assert box.settings.network == "host"
            assert box.run("hostname; echo $B").stdout == "from-function\\n2\\n"
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=2)


def test_a_marker_that_configures_nothing_warns(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(network="none")
        def test_unsandboxed():
            pass
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*PytestWarning: test_a_marker_that_configures_nothing_warns.py::test_unsandboxed "
                                 "is marked @pytest.mark.sandbox but takes neither the `sandbox` nor the "
                                 "`sandbox_factory` fixture*"])


def test_the_report_speaks_of_sizes_in_units(pytester):
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-memory-max=512M")
    result.stdout.fnmatch_lines(["nsbox: caps: * default pids_max 512, memory_max 512M"])
