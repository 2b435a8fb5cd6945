"""The `nsbox` command: option positions, prune's safety, help, the project's ini file, progress."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_nsbox import __version__


SHA_319 = "a2a87004e87720cbb0372c08b7de9b80748afdfd7fd72d2eab2ec0b074b92211"


def _env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NSBOX_")}
    env.update({k: v for k, v in changes.items() if v is not None})
    return env


def nsbox(*args: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env=env if env is not None else _env())


def test_version():
    result = nsbox("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"nsbox (pytest-nsbox) {__version__}")


def test_options_go_before_or_after_the_action(tmp_path, mirror):
    cache = str(tmp_path / "cache")
    after = nsbox("rootfs", "pull", "alpine:3.19", "--cache-dir", cache, "--mirror", mirror.url)
    assert after.returncode == 0, after.stderr
    assert after.stdout.strip().endswith(f"sha256-{SHA_319}")
    before = nsbox("rootfs", "--cache-dir", cache, "--offline", "path", "alpine:3.19")
    assert before.stdout.strip().endswith(f"sha256-{SHA_319}")
    mixed = nsbox("rootfs", "--offline", "path", "alpine:3.19", "--cache-dir", cache)
    assert mixed.stdout == before.stdout


def test_the_offline_hint_is_a_command_that_works(tmp_path, mirror):
    cache = tmp_path / "cache"
    miss = nsbox("rootfs", "--cache-dir", str(cache), "--offline", "path", "alpine:3.19")
    assert miss.returncode == 1
    hint = miss.stderr.split("`")[1]
    assert hint == f"nsbox rootfs pull alpine:3.19 --cache-dir {cache}"
    pulled = nsbox(*hint.split()[1:], "--mirror", mirror.url)
    assert pulled.returncode == 0, pulled.stderr


def test_prune_needs_all_or_keep(tmp_path, mirror):
    cache = str(tmp_path / "cache")
    nsbox("rootfs", "--cache-dir", cache, "--mirror", mirror.url, "pull", "alpine:3.19.4")
    unasked = nsbox("rootfs", "--cache-dir", cache, "prune")
    assert unasked.returncode == 2 and "one of the arguments --all --keep is required" in unasked.stderr
    negative = nsbox("rootfs", "--cache-dir", cache, "prune", "--keep", "-1")
    assert negative.returncode == 2 and "--keep takes a number of trees, 0 or more, not '-1'" in negative.stderr
    assert len(nsbox("rootfs", "--cache-dir", cache, "list").stdout.splitlines()) == 2
    assert nsbox("rootfs", "--cache-dir", cache, "prune", "--keep", "1").stdout == ""
    everything = nsbox("rootfs", "--cache-dir", cache, "prune", "--all")
    assert everything.returncode == 0 and everything.stdout.count("removed") == 1
    assert "no rootfs cached" in nsbox("rootfs", "--cache-dir", cache, "list").stdout


def test_pull_help_lists_the_spec_forms():
    text = nsbox("rootfs", "pull", "--help").stdout
    for form in ("alpine:X.Y.Z@sha256:HEX", "https://URL#sha256=HEX", "host", ".tar.gz", "directory"):
        assert form in text
    assert "--cache-dir" in text


@pytest.mark.parametrize("name, text", [
    ("pytest.ini", "[pytest]\nnsbox_cache_dir = rel/cache\n"),
    ("pyproject.toml", '[tool.pytest.ini_options]\nnsbox_cache_dir = "rel/cache"\n'),
    ("tox.ini", "[tox]\n[pytest]\nnsbox_cache_dir = rel/cache\n"),
    ("setup.cfg", "[metadata]\nname = x\n[tool:pytest]\nnsbox_cache_dir = rel/cache\n"),
])
def test_the_projects_cache_dir_is_read_from_its_ini_file(tmp_path, name, text):
    project = tmp_path / "project"
    (project / "sub" / "dir").mkdir(parents=True)
    (project / name).write_text(text)
    listing = nsbox("rootfs", "list", cwd=project / "sub" / "dir")
    assert listing.stdout.strip() == f"no rootfs cached in {project / 'rel' / 'cache'}"
    from_env = nsbox("rootfs", "list", cwd=project / "sub", env=_env(NSBOX_CACHE_DIR=str(tmp_path / "env")))
    assert from_env.stdout.strip() == f"no rootfs cached in {tmp_path / 'env'}"
    from_option = nsbox("rootfs", "list", "--cache-dir", str(tmp_path / "opt"), cwd=project,
                        env=_env(NSBOX_CACHE_DIR=str(tmp_path / "env")))
    assert from_option.stdout.strip() == f"no rootfs cached in {tmp_path / 'opt'}"


def test_an_ini_without_pytest_settings_is_passed_over(tmp_path):
    outer, inner = tmp_path / "outer", tmp_path / "outer" / "inner"
    inner.mkdir(parents=True)
    (outer / "pytest.ini").write_text("[pytest]\nnsbox_cache_dir = c\n")
    (inner / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    (inner / "setup.cfg").write_text("[metadata]\nname = x\n")
    assert nsbox("rootfs", "list", cwd=inner).stdout.strip() == f"no rootfs cached in {outer / 'c'}"
    (inner / "tox.ini").write_text("[pytest]\naddopts = -q\n")  # the nearest ini, without the setting
    home = tmp_path / "home"
    default = nsbox("rootfs", "list", cwd=inner, env=_env(XDG_CACHE_HOME=str(home)))
    assert default.stdout.strip() == f"no rootfs cached in {home / 'pytest-nsbox'}"


def test_a_broken_ini_file_is_a_sentence(tmp_path):
    (tmp_path / "pyproject.toml").write_text("[tool.pytest.ini_options\n")
    result = nsbox("rootfs", "list", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"nsbox: cannot read {tmp_path / 'pyproject.toml'}" in result.stderr


def test_progress_is_one_line_when_not_a_terminal(tmp_path, mirror):
    pulled = nsbox("rootfs", "--cache-dir", str(tmp_path / "cache"), "--mirror", mirror.url, "pull", "alpine:3.20.3")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stderr == "downloaded alpine-minirootfs-3.20.3-x86_64.tar.gz (3.5 MB)\n"


def test_progress_is_redrawn_on_a_terminal(tmp_path, mirror):
    controller, terminal = pty.openpty()
    pulled = subprocess.run([sys.executable, "-m", "pytest_nsbox", "rootfs", "--cache-dir", str(tmp_path / "cache"),
                             "--mirror", mirror.url, "pull", "alpine:3.20.3"],
                            stdout=subprocess.PIPE, stderr=terminal, env=_env(), timeout=120)
    os.close(terminal)
    seen = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(controller)
    assert pulled.returncode == 0
    assert b"\rdownloading alpine-minirootfs-3.20.3-x86_64.tar.gz 3.5/3.5 MB" in seen


def test_failures_are_sentences_not_tracebacks(tmp_path):
    bad_mirror = nsbox("rootfs", "--mirror", "not a url", "list")
    assert bad_mirror.returncode == 1 and "Traceback" not in bad_mirror.stderr
    assert "nsbox: the Alpine mirror 'not a url' is not an http(s) URL" in bad_mirror.stderr
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o777)
    unsafe = nsbox("rootfs", "--cache-dir", str(cache), "path", "alpine")
    assert unsafe.returncode == 1 and "Traceback" not in unsafe.stderr
    assert f"nsbox: the rootfs cache {cache} is writable by other users" in unsafe.stderr
