"""Relative paths in markers and `sandbox_factory(...)` are relative to pytest's rootdir, so a suite
finds the same files wherever pytest is started from (`cd tests && pytest`)."""

from __future__ import annotations

import shutil
import textwrap

import pytest

SUITE = textwrap.dedent("""
    from pathlib import Path

    import pytest

    @pytest.mark.sandbox(layers=["tests/rootfs-extra"], mounts=[("tests/data", "/srv")])
    def test_a_markers_paths(sandbox):
        assert sandbox.run("greet; cat /srv/index").stdout == "hello from the layer\\nserved"

    def test_a_factorys_paths(sandbox_factory):
        box = sandbox_factory(layers=[Path("tests/rootfs-extra")], mounts=[["tests/data", "/srv", "ro"]])
        assert box.run("greet; cat /srv/index").stdout == "hello from the layer\\nserved"

    @pytest.mark.sandbox(rootfs=["alpine.tar.gz", "tests/rootfs-extra"])
    def test_a_relative_rootfs_and_its_layers(sandbox):
        assert sandbox.run("greet").stdout == "hello from the layer\\n"

    @pytest.mark.sandbox(profile="data")
    def test_a_profiles_paths_are_the_pyprojects(sandbox):
        assert sandbox.run("cat /srv/index").stdout == "served"
""")


@pytest.fixture
def project(pytester, alpine_tarball):
    pytester.makefile(".toml", pyproject=textwrap.dedent("""
        [tool.pytest.ini_options]
        addopts = "-p no:cacheprovider"

        [tool.nsbox.profiles.data]
        mounts = [["tests/data", "/srv"]]
    """))
    tests = pytester.path / "tests"
    tool = tests / "rootfs-extra" / "usr" / "local" / "bin" / "greet"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho hello from the layer\n")
    tool.chmod(0o755)
    (tests / "data").mkdir()
    (tests / "data" / "index").write_text("served")
    shutil.copy(alpine_tarball, pytester.path / "alpine.tar.gz")
    (tests / "test_paths.py").write_text(SUITE)
    return pytester


@pytest.mark.parametrize("where", [".", "tests"])
def test_marker_and_factory_paths_are_the_rootdirs_wherever_pytest_starts(project, monkeypatch, where):
    monkeypatch.chdir(project.path / where)
    result = project.runpytest_subprocess()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines([f"rootdir: {project.path}*"])


def test_a_missing_layer_is_called_a_layer_and_named_at_the_rootdir(project, monkeypatch):
    (project.path / "tests" / "test_paths.py").write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(layers=["tests/no-such-layer"])
        def test_missing(sandbox):
            pass
    """))
    monkeypatch.chdir(project.path / "tests")
    result = project.runpytest_subprocess()
    result.assert_outcomes(errors=1)
    text = result.stdout.str()
    assert "bad layer 'tests/no-such-layer'" not in text  # the path as anchored, not as written
    assert f"bad layer '{project.path / 'tests' / 'no-such-layer'}'" in text, text
    assert "bad rootfs" not in text


def test_a_markers_mistakes_are_reported_once_and_list_every_keyword(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox("alpine")
        def test_positional(sandbox):
            pass

        @pytest.mark.sandbox(netwrk="host")
        def test_typo(sandbox):
            pass

        def test_factory_typo(sandbox_factory):
            sandbox_factory(isolate=True)
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(errors=2, failed=1)
    text = result.stdout.str()
    assert "During handling" not in text
    # The summary repeats each message in full where pytest does not cut lines (CI=true), so count
    # the messages above it.
    errors = text.split("short test summary")[0]
    assert errors.count("@pytest.mark.sandbox takes keywords only, got ('alpine',)") == 1
    assert "allowed: isolate, profile, rootfs, layers" in text
    assert "test_typo: @pytest.mark.sandbox: unknown sandbox setting 'netwrk'; allowed: isolate, profile, rootfs" in text
    assert "test_factory_typo: unknown sandbox setting 'isolate'; allowed: profile, rootfs" in text
