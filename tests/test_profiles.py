"""Sandbox profiles: named settings in pyproject.toml, for markers, the run and `nsbox run`."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

PYPROJECT = textwrap.dedent("""
    [tool.nsbox.profiles.web]
    network = "host"
    hostname = "webbox"
    env = { APP_ENV = "test" }
    mounts = [["data", "/srv"]]

    [tool.nsbox.profiles.tight]
    pids_max = 16
    memory_max = "64M"
""")


@pytest.fixture
def project(pytester):
    pytester.makefile(".toml", pyproject=PYPROJECT)
    (pytester.path / "data").mkdir()
    (pytester.path / "data" / "index").write_text("served")
    return pytester


def test_a_marker_names_a_profile_and_its_keywords_win(project):
    project.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(profile="web")
        def test_web(sandbox):
            assert sandbox.run("hostname; echo $APP_ENV; cat /srv/index").stdout == "webbox\\ntest\\nserved"
            assert sandbox.settings.network == "host"

        @pytest.mark.sandbox(profile="web", hostname="other")
        def test_keyword_wins(sandbox):
            assert sandbox.run("hostname").stdout == "other\\n"

        pytestmark = pytest.mark.sandbox(profile="tight")

        def test_module_profile(sandbox):
            assert (sandbox.limits.pids_max, sandbox.limits.memory_max) == (16, 64 << 20)
    """))
    project.runpytest_subprocess().assert_outcomes(passed=3)


def test_the_run_wide_profile_sits_under_markers(project):
    project.makepyfile(textwrap.dedent("""
        import pytest

        def test_from_the_run(sandbox):
            assert sandbox.settings.hostname == "webbox"

        @pytest.mark.sandbox(hostname="mine")
        def test_marker_wins(sandbox):
            assert sandbox.settings.hostname == "mine" and sandbox.settings.network == "host"
    """))
    project.runpytest_subprocess("--nsbox-profile", "web").assert_outcomes(passed=2)


@pytest.mark.parametrize("pyproject, message", [
    ('[tool.nsbox.profiles.web]\nnetwrk = "host"\n',
     "pyproject.toml [tool.nsbox.profiles.web]: unknown key 'netwrk'; allowed: rootfs, layers, network"),
    ('[tool.nsbox.profiles.web]\npids_max = -3\n',
     "pyproject.toml [tool.nsbox.profiles.web]: bad value for 'pids_max': -3"),
    ("[tool.nsbox.profiles]\nweb = 3\n", "pyproject.toml [tool.nsbox.profiles.web] must be a table"),
])
def test_bad_profile_content_names_the_file_the_table_and_the_key(pytester, pyproject, message):
    pytester.makefile(".toml", pyproject=pyproject)
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(profile="web")
        def test_web(sandbox):
            pass
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    assert message in result.stdout.str() and "Traceback" not in result.stdout.str()


def test_a_bad_profile_fails_only_the_tests_that_use_it(pytester):
    pytester.makefile(".toml", pyproject=PYPROJECT.replace("[tool.nsbox.profiles.tight]",
                                                           '[tool.nsbox.profiles.bad]\nnetwrk = "host"\n\n'
                                                           "[tool.nsbox.profiles.tight]"))
    (pytester.path / "data").mkdir()
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(profile="tight")
        def test_good(sandbox):
            assert sandbox.limits.pids_max == 16

        @pytest.mark.sandbox(profile="bad")
        def test_bad(sandbox):
            pass

        @pytest.mark.sandbox(profile=3)
        def test_not_a_name(sandbox):
            pass
    """))
    result = pytester.runpytest_subprocess("-p", "no:randomly")
    result.assert_outcomes(passed=1, errors=2)
    result.stdout.fnmatch_lines(["*[[]tool.nsbox.profiles.bad]: unknown key 'netwrk'*",
                                 "*a profile is the name of a [[]tool.nsbox.profiles.NAME] table, a str, not 3*"])


def test_an_unknown_profile_lists_the_known_ones(project):
    project.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(profile="wbe")
        def test_typo(sandbox):
            pass
    """))
    result = project.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*no sandbox profile 'wbe' in *pyproject.toml (profiles: tight, web)*"])
    usage = project.runpytest_subprocess("--nsbox-profile", "nope")
    assert usage.ret == pytest.ExitCode.USAGE_ERROR
    usage.stderr.fnmatch_lines(["*--nsbox-profile: no sandbox profile 'nope'*"])


def test_nsbox_run_takes_a_profile_and_its_options_win(project):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "pytest_nsbox", "run", *args], cwd=project.path,
                              capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert run("--profile", "web", "--", "sh", "-c", "hostname; cat /srv/index").stdout == "webbox\nserved"
    assert run("--profile", "web", "--hostname", "cli", "--", "hostname").stdout == "cli\n"
    missing = run("--profile", "nope", "--", "true")
    assert missing.returncode == 125 and "no sandbox profile 'nope'" in missing.stderr
