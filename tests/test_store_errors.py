"""Every way the cache can be unusable is a sentence naming the input and the fix, never a traceback.

Read-only and full file systems are real ones: a read-only bind mount or a small tmpfs when root,
mode bits or RLIMIT_FSIZE otherwise.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_nsbox import ConfigError, RootfsError
from pytest_nsbox.rootfs.alpine import mirror_url
from pytest_nsbox.rootfs.store import RootfsStore

from .conftest import ALPINE_319

ROOT = os.geteuid() == 0


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[None]:
    if ROOT:  # root writes through mode bits: only a read-only mount stops it
        subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
        try:
            subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
            yield
        finally:
            subprocess.run(["umount", str(path)], check=True)
    else:
        for d in (path, path / "trees"):
            d.chmod(0o500)
        try:
            yield
        finally:
            for d in (path, path / "trees"):
                d.chmod(0o700)


def test_a_read_only_cache_is_a_sentence(tmp_path, mirror):
    cache = tmp_path / "cache"
    RootfsStore(cache, mirror.url).resolve("alpine:3.20.3")
    with read_only(cache):
        # What is cached and recorded still works...
        assert RootfsStore(cache, mirror.url).resolve("alpine:3.20.3").version == "3.20.3"
        # ...and what needs writing says so.
        with pytest.raises(RootfsError, match=rf"alpine:3.20: cannot write .*{cache}.*(Read-only file system|"
                                              r"Permission denied).* make .* writable or choose another "
                                              r"cache with --nsbox-cache-dir or NSBOX_CACHE_DIR"):
            RootfsStore(cache, mirror.url).resolve("alpine:3.20")
        cli = subprocess.run([sys.executable, "-m", "pytest_nsbox", "rootfs", "--cache-dir", str(cache),
                              "--mirror", mirror.url, "pull", "alpine:3.20"], capture_output=True, text=True)
        assert cli.returncode == 1 and "Traceback" not in cli.stderr
        assert cli.stderr.startswith("nsbox: alpine:3.20: cannot write")


def test_a_read_only_cache_still_says_why_a_download_failed(tmp_path, mirror):
    # An isolated test's call sees the cache read-only: a failed fetch is remembered in the process
    # only, and is still its sentence, not an OSError from the record or its lock.
    cache = tmp_path / "cache"
    RootfsStore(cache, mirror.url, run_id="run").resolve("alpine:3.19")  # a branch lookup: fetches/ and a lock
    assert list((cache / "fetches").glob("*.lock"))
    mirror.fail["latest-releases.yaml"] = 500
    store = RootfsStore(cache, mirror.url, run_id="run")
    with read_only(cache):
        for _ in range(2):
            with pytest.raises(RootfsError, match=r"rootfs alpine:3.20 is not in the cache .* cannot be fetched: "
                                                  r"GET .*latest-releases.yaml: the server answered HTTP 500"):
                store.resolve("alpine:3.20")
    assert mirror.downloads("v3.20/releases/x86_64/latest-releases.yaml") == 1


@pytest.mark.skipif(ROOT, reason="root reads every directory")
def test_a_cache_under_an_unreadable_parent_is_a_sentence(tmp_path, alpine_tarball):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o000)
    try:
        with pytest.raises(RootfsError, match=rf"cannot use the rootfs cache {parent}/cache: Permission denied "
                                              r".*choose another cache with --nsbox-cache-dir"):
            RootfsStore(parent / "cache").resolve(alpine_tarball)
    finally:
        parent.chmod(0o700)


FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    from pytest_nsbox import NsboxError
    from pytest_nsbox.rootfs.store import RootfsStore
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
    try:
        RootfsStore(sys.argv[1], sys.argv[2]).resolve("alpine:3.20")
    except NsboxError as exc:
        print(exc)
""")


@pytest.mark.skipif(ROOT, reason="root reads every directory")
def test_an_unreadable_rootfs_directory_is_a_sentence(tmp_path, alpine_tarball, cache_dir):
    import tarfile

    from pytest_nsbox import Sandbox
    tree = tmp_path / "tree"
    tree.mkdir()
    with tarfile.open(alpine_tarball) as tar:
        tar.extractall(tree, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    tree.chmod(0)
    try:
        with pytest.raises(RootfsError, match=r"cannot read .*tree/bin: permission denied; .*chmod -R u\+rX"):
            Sandbox(rootfs=tree, cache_dir=cache_dir).start()
    finally:
        tree.chmod(0o755)


def test_a_failed_write_of_resolutions_is_a_sentence_and_leaves_nothing(tmp_path, mirror):
    cache = tmp_path / "cache"
    RootfsStore(cache, mirror.url).resolve("alpine:3.20.3")
    result = subprocess.run([sys.executable, "-c", FULL_DISK, str(cache), mirror.url], capture_output=True, text=True)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    assert f"alpine:3.20: cannot write {cache / 'resolutions.json'}: File too large" in result.stdout
    assert sorted(p.name for p in cache.iterdir()) == ["resolutions.json.lock", "trees"]


@pytest.mark.skipif(not ROOT, reason="mounting a small tmpfs needs root")
def test_a_full_disk_is_a_sentence_and_leaves_nothing(tmp_path, mirror):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m,mode=700", "none", str(cache)], check=True)
    try:
        RootfsStore(cache, mirror.url).resolve("alpine:3.20.3")
        with open(cache / "filler", "wb", buffering=0) as filler, contextlib.suppress(OSError):
            while True:
                filler.write(bytes(1 << 12))
        with pytest.raises(RootfsError, match=rf"alpine:3.20: cannot write {cache / 'resolutions.json'}: "
                                              r"No space left on device.*free some space"):
            RootfsStore(cache, mirror.url).resolve("alpine:3.20")
        assert sorted(p.name for p in cache.iterdir()) == ["filler", "resolutions.json.lock", "trees"]
        with pytest.raises(RootfsError, match=rf"{ALPINE_319}: cannot write .*{cache}.*No space left"):
            RootfsStore(cache).resolve(ALPINE_319)
        assert not [p for p in (cache / "trees").iterdir() if ".tmp-" in p.name]
    finally:
        subprocess.run(["umount", str(cache)], check=True)


@pytest.mark.parametrize("url", ["not a url", "ftp://mirror/alpine", "https://", "dl-cdn.alpinelinux.org/alpine"])
def test_a_bad_mirror_url_is_a_config_error(url):
    with pytest.raises(ConfigError, match=rf"the Alpine mirror {url!r} is not an http\(s\) URL .*"
                                          r"--nsbox-alpine-mirror"):
        mirror_url(url)
    with pytest.raises(ConfigError):
        RootfsStore("/nonexistent", url)


def test_a_bad_mirror_from_the_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("NSBOX_ALPINE_MIRROR", "not a url")
    with pytest.raises(ConfigError, match=r"NSBOX_ALPINE_MIRROR='not a url' is not an http\(s\) URL"):
        mirror_url()
    assert mirror_url("https://m.example/alpine/") == "https://m.example/alpine"


def test_the_plugin_refuses_a_bad_mirror(pytester, alpine_tarball):
    pytester.makepyfile("def test_x():\n    pass\n")
    result = pytester.runpytest_subprocess("--nsbox-alpine-mirror=not a url")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*the Alpine mirror 'not a url' is not an http(s) URL*"])
