"""The rootfs store: real downloads from a loopback Alpine mirror, real digests, a shared cache."""

from __future__ import annotations

import hashlib
import io
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import pytest

from pytest_nsbox import RootfsError, Sandbox, UnsafeArchiveError
from pytest_nsbox.errors import DigestMismatch
from pytest_nsbox.rootfs.store import RootfsStore

from .helpers import wait_until

SHA_320 = "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
SHA_319 = "a2a87004e87720cbb0372c08b7de9b80748afdfd7fd72d2eab2ec0b074b92211"
TARBALL_320 = "v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"


@pytest.fixture
def store(tmp_path, mirror):
    return RootfsStore(tmp_path / "cache", mirror.url, offline=False)


def _cache_leftovers(store):
    return sorted(p.name for p in store.trees.iterdir() if not p.name.endswith(".lock")) \
        if store.trees.exists() else []


@pytest.mark.parametrize("spec, version, digest", [("alpine:3.20.3", "3.20.3", SHA_320),
                                                   ("alpine:3.19.4", "3.19.4", SHA_319)])
def test_cold_download_and_use(store, mirror, spec, version, digest):
    rootfs = store.resolve(spec)
    assert (rootfs.version, rootfs.arch, rootfs.digest, rootfs.trust) == (version, "x86_64", digest, "pinned")
    assert mirror.downloads(f"alpine-minirootfs-{version}-x86_64.tar.gz") == 1
    with Sandbox(rootfs=rootfs) as box:
        assert f"VERSION_ID={version}" in box.run(["cat", "/etc/os-release"]).stdout


def test_default_alpine_is_the_pinned_release(store):
    rootfs = store.resolve("alpine")
    assert (rootfs.version, rootfs.digest, rootfs.trust) == ("3.20.3", SHA_320, "pinned")


def test_warm_cache_makes_no_request(store, mirror, tmp_path):
    store.resolve("alpine:3.20.3")
    mirror.requests.clear()
    again = RootfsStore(tmp_path / "cache", mirror.url)
    started = time.perf_counter()
    rootfs = again.resolve("alpine:3.20.3")
    print(f"warm cache hit: {(time.perf_counter() - started) * 1000:.2f} ms")
    assert rootfs.digest == SHA_320
    assert mirror.requests == []


def test_branch_resolves_through_latest_releases_and_then_offline(store, mirror, tmp_path):
    rootfs = store.resolve("alpine:3.19")
    assert (rootfs.version, rootfs.digest) == ("3.19.4", SHA_319)
    assert mirror.downloads("v3.19/releases/x86_64/latest-releases.yaml") == 1
    mirror.requests.clear()
    offline = RootfsStore(tmp_path / "cache", "http://127.0.0.1:9", offline=True)
    assert offline.resolve("alpine:3.19").digest == SHA_319
    assert "3.19.4" in offline.resolve("alpine:3.19").describe()
    assert mirror.requests == []


def test_caller_pinned_digest_wins_and_is_checked(store, mirror):
    assert store.resolve(f"alpine:3.20.3@sha256:{SHA_320}").trust == "caller"
    wrong = "0" * 64
    with pytest.raises(DigestMismatch, match=f"alpine-minirootfs-3.20.3-x86_64.tar.gz .*SHA-256 {SHA_320}, expected {wrong}"):
        RootfsStore(store.cache_dir / "other", mirror.url).resolve(f"alpine:3.20.3@sha256:{wrong}")


def test_tampered_tarball_is_refused_and_not_cached(store, mirror):
    path = mirror.root / TARBALL_320
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    actual = hashlib.sha256(data).hexdigest()
    with pytest.raises(DigestMismatch, match=f"SHA-256 {actual}, expected {SHA_320}"):
        store.resolve("alpine:3.20.3")
    assert _cache_leftovers(store) == []


def test_unpinned_release_trusts_the_mirror_on_first_use(store, mirror):
    # A release pytest-nsbox does not pin: the mirror's .sha256 is believed, and the header says so.
    release = mirror.root / "v3.20/releases/x86_64"
    (release / "alpine-minirootfs-3.20.9-x86_64.tar.gz").write_bytes((mirror.root / TARBALL_320).read_bytes())
    (release / "alpine-minirootfs-3.20.9-x86_64.tar.gz.sha256").write_text(
        f"{SHA_320}  alpine-minirootfs-3.20.9-x86_64.tar.gz\n")
    rootfs = store.resolve("alpine:3.20.9")
    assert rootfs.trust == "mirror"
    assert "trust on first use" in rootfs.describe()


def test_mirror_contradicting_a_pin_is_refused(store, mirror):
    yaml = mirror.root / "v3.20/releases/x86_64/latest-releases.yaml"
    yaml.write_text(yaml.read_text().replace(SHA_320, "f" * 64))
    with pytest.raises(RootfsError, match="tampered or broken mirror"):
        store.resolve("alpine:3.20")


def test_truncated_download_is_not_cached(store, mirror):
    mirror.truncate.add("3.20.3-x86_64.tar.gz")
    with pytest.raises(RootfsError, match="closed the connection after 1.7 MB of 3.5 MB"):
        store.resolve("alpine:3.20.3")
    assert _cache_leftovers(store) == []


@pytest.mark.parametrize("status", [404, 500])
def test_server_errors_are_reported(store, mirror, status):
    mirror.fail["3.20.3-x86_64.tar.gz"] = status
    with pytest.raises(RootfsError, match=f"HTTP {status}"):
        store.resolve("alpine:3.20.3")
    assert _cache_leftovers(store) == []


@pytest.mark.parametrize("spec, known", [
    ("alpine:9.99", "branches on the mirror: 3.19, 3.20; pinned releases: 3.19.4, 3.20.3"),
    ("alpine:3.18.99", "branches on the mirror: 3.19, 3.20; pinned releases: 3.19.4, 3.20.3"),
    ("alpine:3.20.99", "releases of 3.20 on the mirror: 3.20.3; pinned releases: 3.19.4, 3.20.3"),
])
def test_unknown_release_is_a_clear_error(store, spec, known):
    version = spec.split(":")[1]
    with pytest.raises(RootfsError, match=rf"{spec}: no such Alpine release {version} \(x86_64\) on "
                                          rf"{store.mirror}; {known}"):
        store.resolve(spec)


def test_unknown_release_on_an_unlisted_mirror_names_the_pinned_ones(store, mirror):
    mirror.fail["/"] = 403  # a mirror that lists no directories
    with pytest.raises(RootfsError, match=r"no such Alpine release 9.99 \(x86_64\) on [^;]*; pinned releases: 3.19.4, "
                                          r"3.20.3; ask for one of these"):
        store.resolve("alpine:9.99")


def test_offline_hit_and_miss(store, tmp_path):
    store.resolve("alpine:3.20.3")
    offline = RootfsStore(tmp_path / "cache", "http://127.0.0.1:9", offline=True)
    assert offline.resolve("alpine:3.20.3").digest == SHA_320
    with pytest.raises(RootfsError, match=r"alpine:3.19.4 is not in the cache .*--nsbox-offline is set.*"
                                          r"nsbox rootfs pull alpine:3.19.4"):
        offline.resolve("alpine:3.19.4")


def test_network_failure_uses_the_cache_or_says_how_to_fill_it(store, tmp_path):
    store.resolve("alpine:3.20.3")
    unreachable = RootfsStore(tmp_path / "cache", "http://nonexistent.invalid")  # as without DNS
    assert unreachable.resolve("alpine:3.20.3").digest == SHA_320
    with pytest.raises(RootfsError, match=r"alpine:3.19 is not in the cache .*nsbox rootfs pull alpine:3.19"):
        unreachable.resolve("alpine:3.19")


def test_url_spec_with_digest(store, mirror):
    rootfs = store.resolve(f"{mirror.url}/{TARBALL_320}#sha256={SHA_320}")
    assert rootfs.digest == SHA_320 and rootfs.trust == "caller"


def test_malicious_tarball_from_a_url_leaves_nothing(store, mirror):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        link = tarfile.TarInfo("etc")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc"
        tar.addfile(link)
        evil = tarfile.TarInfo("etc/cron.d/evil")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))
    (mirror.root / "evil.tar.gz").write_bytes(buffer.getvalue())
    digest = hashlib.sha256(buffer.getvalue()).hexdigest()
    with pytest.raises(UnsafeArchiveError, match="'etc/cron.d/evil'"):
        store.resolve(f"{mirror.url}/evil.tar.gz#sha256={digest}")
    assert _cache_leftovers(store) == []


RACER = textwrap.dedent("""
    import os, sys, time
    from pytest_nsbox.rootfs.store import RootfsStore
    while not os.path.exists(sys.argv[3]):
        time.sleep(0.001)
    print(RootfsStore(sys.argv[1], sys.argv[2]).resolve("alpine:3.19.4").tree)
""")


def test_racing_processes_download_exactly_once(tmp_path, mirror):
    go = tmp_path / "go"
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path / "cache"), mirror.url, str(go)],
                               stdout=subprocess.PIPE, text=True) for _ in range(8)]
    time.sleep(0.3)
    go.touch()
    trees = {racer.communicate(timeout=60)[0].strip() for racer in racers}
    assert [r.returncode for r in racers] == [0] * 8
    assert len(trees) == 1 and os.path.isdir(trees.pop())
    assert mirror.downloads("alpine-minirootfs-3.19.4-x86_64.tar.gz") == 1


KILLED_MID_EXTRACT = textwrap.dedent("""
    import sys, time
    from pytest_nsbox.rootfs import archive
    from pytest_nsbox.rootfs.store import RootfsStore
    real = archive.extract
    def slow(tarball, dest, **kwargs):
        real(tarball, dest, **kwargs)
        time.sleep(300)  # killed here: the tree is extracted but never renamed into place
    archive.extract = slow
    RootfsStore(sys.argv[1], sys.argv[2]).resolve("alpine:3.20.3")
""")


def test_entry_left_by_a_killed_process_is_rebuilt(tmp_path, mirror):
    cache = tmp_path / "cache"
    victim = subprocess.Popen([sys.executable, "-c", KILLED_MID_EXTRACT, str(cache), mirror.url])
    try:
        assert wait_until(lambda: any((cache / "trees").glob("*.tmp-*/bin/busybox")), timeout=30)
    finally:
        victim.send_signal(signal.SIGKILL)
        victim.wait()
    store = RootfsStore(cache, mirror.url)
    rootfs = store.resolve("alpine:3.20.3")
    assert (rootfs.tree / "bin/busybox").is_file()
    assert not list((cache / "trees").glob("*.tmp-*"))


def test_host_spec_is_read_only_with_private_tmp(tmp_path):
    marker = tmp_path / "host-tmp-file"
    marker.write_text("x")
    with Sandbox(rootfs="host") as box:
        # The host's own tree (not Alpine's).
        assert box.read_file("/etc/os-release") == Path("/etc/os-release").read_text()
        assert box.run(["sh", "-c", "echo x > /usr/nsbox-probe"]).returncode != 0
        if str(marker).startswith("/tmp/"):
            assert box.run(["test", "-e", str(marker)]).returncode != 0
        assert box.run(["sh", "-c", "echo ok > /tmp/inside && cat /tmp/inside"]).stdout == "ok\n"
        assert box.run(["hostname"]).stdout == "nsbox\n"
    assert not os.path.exists("/tmp/inside")
    assert not os.path.exists("/usr/nsbox-probe")


def _nsbox(*args):
    return subprocess.run([sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True,
                          timeout=120)


def test_cli_pull_path_list_prune(tmp_path, mirror):
    cache = str(tmp_path / "cache")
    pulled = _nsbox("rootfs", "--cache-dir", cache, "--mirror", mirror.url, "pull", "alpine:3.19")
    assert pulled.returncode == 0, pulled.stderr
    assert "alpine:3.19 -> 3.19.4 x86_64 sha256:a2a87004e877 (digest pinned by pytest-nsbox)" in pulled.stdout
    path = _nsbox("rootfs", "--cache-dir", cache, "--offline", "path", "alpine:3.19")
    assert path.stdout.strip().endswith(f"sha256-{SHA_319}")
    _nsbox("rootfs", "--cache-dir", cache, "--mirror", mirror.url, "pull", "alpine:3.20.3")
    listing = _nsbox("rootfs", "--cache-dir", cache, "list").stdout.splitlines()
    assert listing[0].split() == ["SPEC", "VERSION", "ARCH", "DIGEST", "SIZE", "LAST", "USED"]
    assert any(line.split()[:4] == ["alpine:3.19", "3.19.4", "x86_64", "sha256:a2a87004e877"] for line in listing)
    assert len(listing) == 3
    pruned = _nsbox("rootfs", "--cache-dir", cache, "prune", "--keep", "1")
    assert pruned.stdout.count("removed") == 1
    assert len(_nsbox("rootfs", "--cache-dir", cache, "list").stdout.splitlines()) == 2
    missing = _nsbox("rootfs", "--cache-dir", cache, "--offline", "path", "alpine:3.18.1")
    assert missing.returncode == 1 and "nsbox: rootfs alpine:3.18.1 is not in the cache" in missing.stderr
    bad = _nsbox("rootfs", "--cache-dir", cache, "path", "alpine:edge")
    assert bad.returncode == 1 and "the forms are: alpine, alpine:X.Y" in bad.stderr


def test_pytest_with_two_xdist_workers_on_a_cold_cache(pytester, mirror, monkeypatch):
    pytest.importorskip("xdist")
    monkeypatch.delenv("NSBOX_ROOTFS")
    monkeypatch.setenv("NSBOX_CACHE_DIR", str(pytester.path / "cache"))
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.parametrize("n", range(6))
        def test_release(sandbox, n):
            assert "VERSION_ID=3.19.4" in sandbox.run(["cat", "/etc/os-release"]).stdout
    """))
    result = pytester.runpytest_subprocess("-n", "2", "--nsbox-rootfs=alpine:3.19",
                                           f"--nsbox-alpine-mirror={mirror.url}")
    result.assert_outcomes(passed=6)
    assert mirror.downloads("alpine-minirootfs-3.19.4-x86_64.tar.gz") == 1
    header = pytester.runpytest_subprocess("--nsbox-rootfs=alpine:3.19", "--nsbox-offline", "--co")
    header.stdout.fnmatch_lines(["nsbox: rootfs alpine:3.19 -> 3.19.4 x86_64 sha256:a2a87004e877 (digest pinned by pytest-nsbox); *"])


def test_first_download_shows_progress(pytester, mirror, monkeypatch):
    monkeypatch.delenv("NSBOX_ROOTFS")
    monkeypatch.setenv("NSBOX_CACHE_DIR", str(pytester.path / "cache"))
    pytester.makepyfile("def test_x(sandbox):\n    assert sandbox.run(['true']).returncode == 0\n")
    result = pytester.runpytest_subprocess("--nsbox-rootfs=alpine:3.20.3", f"--nsbox-alpine-mirror={mirror.url}")
    result.assert_outcomes(passed=1)
    # Not a terminal: one line once it is done, not a line every 0.2 s into a log.
    assert result.stdout.str().count("nsbox: download") == 1
    result.stdout.fnmatch_lines(["nsbox: downloaded alpine-minirootfs-3.20.3-x86_64.tar.gz (3.5 MB)"])
