"""The pytest face of the plugin: options, ini, marker, fixtures, header, reports, xdist."""

from __future__ import annotations

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
    ('netwrok="none"', "*test_bad*unknown sandbox setting 'netwrok'*allowed: rootfs*network*"),
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


def test_header_names_rootfs_and_namespaces(pytester):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess()
    result.stdout.fnmatch_lines(["nsbox: rootfs *alpine-minirootfs-3.20.3-x86_64.tar.gz sha256:d4e6fd67dcf7 (local file); cache *",
                                 "nsbox: namespaces user,mnt,pid,ipc,uts,cgroup,net: available"])


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
    result.stderr.fnmatch_lines(["*--nsbox-unavailable must be one of fail, skip, not 'maybe'*"])


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
