"""Rootfs spec parsing and machine architectures."""

from __future__ import annotations

import pytest

from pytest_nsbox import ConfigError
from pytest_nsbox.rootfs.alpine import latest_minirootfs, machine_arch, parse_checksum_file, tarball_url
from pytest_nsbox.rootfs.specs import AlpineSpec, HostSpec, PathSpec, UrlSpec, parse

DIGEST = "a" * 64


@pytest.mark.parametrize("text, expected", [
    ("alpine", AlpineSpec()),
    ("alpine:3.20", AlpineSpec(branch="3.20")),
    ("alpine:3.20.3", AlpineSpec(branch="3.20", version="3.20.3")),
    (f"alpine:3.20.3@sha256:{DIGEST}", AlpineSpec(branch="3.20", version="3.20.3", digest=DIGEST)),
    (f"https://example.org/x.tar.gz#sha256={DIGEST}", UrlSpec("https://example.org/x.tar.gz", DIGEST)),
    ("host", HostSpec()),
])
def test_forms(text, expected):
    assert parse(text) == expected
    assert str(parse(text)) == text


def test_local_paths(tmp_path):
    archive = tmp_path / "root.tar.gz"
    archive.write_bytes(b"")
    assert parse(str(tmp_path)) == PathSpec(tmp_path, is_dir=True)
    assert parse(archive) == PathSpec(archive, is_dir=False)


@pytest.mark.parametrize("text", ["", "alpine:edge", "alpine:3", f"alpine@sha256:{DIGEST}",
                                  f"alpine:3.20@sha256:{DIGEST}", "alpine:3.20.3@sha256:abc",
                                  "https://example.org/x.tar.gz", "ftp://x/y.tar#sha256=" + DIGEST,
                                  "/no/such/dir", "/no/such/file.tar.gz"])
def test_bad_specs_list_the_forms(text):
    with pytest.raises(ConfigError, match="the forms are: alpine, alpine:X.Y, alpine:X.Y.Z, "):
        parse(text)


@pytest.mark.parametrize("machine, arch", [("x86_64", "x86_64"), ("aarch64", "aarch64"), ("armv7l", "armv7"),
                                           ("armv6l", "armhf"), ("i686", "x86"), ("ppc64le", "ppc64le"),
                                           ("s390x", "s390x"), ("riscv64", "riscv64"),
                                           ("loongarch64", "loongarch64")])
def test_architectures(machine, arch):
    assert machine_arch(machine) == arch


def test_mirror_layout_and_files():
    assert tarball_url("https://m/alpine", "3.20.3", "x86_64") == \
        "https://m/alpine/v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"
    yaml = ("---\n-\n  title: \"Standard\"\n  flavor: alpine-standard\n  version: 3.20.3\n"
            "-\n  flavor: alpine-minirootfs\n  arch: x86_64\n  version: 3.20.3\n  sha256: abc\n")
    release = latest_minirootfs(yaml, "x86_64")
    assert (release.version, release.sha256) == ("3.20.3", "abc")
    assert parse_checksum_file(f"{DIGEST}  f.tar.gz\n", "f.tar.gz") == DIGEST


def test_an_existing_file_named_like_alpine_is_a_path(tmp_path, monkeypatch):
    # The README's own example: Alpine's release file, next to the code that uses it.
    monkeypatch.chdir(tmp_path)
    name = "alpine-minirootfs-3.20.3-x86_64.tar.gz"
    (tmp_path / name).write_bytes(b"")
    assert parse(name) == PathSpec(tmp_path / name, is_dir=False)
    (tmp_path / "alpine3").mkdir()
    assert parse("alpine3") == PathSpec(tmp_path / "alpine3", is_dir=True)


def test_the_keywords_win_over_a_directory_of_that_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "alpine").mkdir()
    (tmp_path / "host").mkdir()
    assert parse("alpine") == AlpineSpec() and parse("host") == HostSpec()
    assert parse("./alpine") == PathSpec(tmp_path / "alpine", is_dir=True)


@pytest.mark.parametrize("text, message", [
    ("alpine-minirootfs-3.20.3-x86_64.tar.gz", "there is no file {cwd}/alpine-minirootfs-3.20.3-x86_64.tar.gz"),
    ("alpine3.20", "Alpine versions are written alpine:3.20 or alpine:3.20.3, and there is no file or "
                   "directory {cwd}/alpine3.20"),
    ("alpine:edge", "Alpine versions are written alpine:3.20 or alpine:3.20.3, not 'edge'"),
    ("alpine:3.20.3@sha256:abc", "a SHA-256 digest is 64 hex digits, this one has 3"),
    (f"alpine:3.20.3@sha256:{'g' * 64}", "a SHA-256 digest is 64 hex digits (0-9, a-f), this one has 'g'"),
    (f"alpine:3.20.3@md5:{DIGEST}", "a digest is written @sha256:<64 hex digits>"),
    ("https://example.org/x.tar.gz#sha256=abc", "a SHA-256 digest is 64 hex digits, this one has 3"),
    ("https://example.org/x.tar.gz", "a URL must end with #sha256=<64 hex digits>, the digest of the file"),
    (f"ftp://x/y.tar#sha256={DIGEST}", "a URL must be http:// or https://"),
])
def test_bad_specs_say_what_is_wrong(tmp_path, monkeypatch, text, message):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        parse(text)
    assert message.format(cwd=tmp_path) in str(caught.value)


def test_upper_case_digests_are_accepted():
    upper = "D4E6FD67DCF75E40C451560AC7265166C2B72A0F38DDC9AAE756A7DE3D1EFA0C"
    assert parse(f"alpine:3.20.3@sha256:{upper}").digest == upper.lower()
    assert parse(f"https://example.org/x.tar.gz#sha256={upper}") == UrlSpec("https://example.org/x.tar.gz",
                                                                           upper.lower())
