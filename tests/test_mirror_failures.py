"""A mirror that breaks costs a run one fetch, not one per test: the failure is remembered for the
pytest run, per cache and across xdist workers, and every test that needs the download fails at
once with the same sentence — which says what happened (no network, or the server answered and then
broke) and the fix that fits, never "fill the cache where there is network" when there is network.

The mirror is a real HTTP server on 127.0.0.1 that misbehaves on purpose (tests/mirror.py); the
fetches are counted on its side.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time

import pytest

from pytest_nsbox import ConfigError, RootfsError
from pytest_nsbox.errors import DigestMismatch, NetworkError
from pytest_nsbox.rootfs.store import RootfsStore


TARBALL = "v3.20/releases/x86_64/alpine-minirootfs-3.20.3-x86_64.tar.gz"
SHA_320 = "d4e6fd67dcf75e40c451560ac7265166c2b72a0f38ddc9aae756a7de3d1efa0c"
XDIST = ("-p", "xdist", "-n", "2")
FOUR_TESTS = textwrap.dedent("""
    import pytest

    @pytest.mark.parametrize("n", range(4))
    def test_release(sandbox, n):
        assert "VERSION_ID=3.20.3" in sandbox.run(["cat", "/etc/os-release"]).stdout
""")


@pytest.fixture
def cold(pytester, monkeypatch):
    """A pytester project with a cold cache of its own, run as CI runs (CI=true: whole summary lines)."""
    monkeypatch.delenv("NSBOX_ROOTFS")
    monkeypatch.setenv("NSBOX_CACHE_DIR", str(pytester.path / "cache"))
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(FOUR_TESTS)
    return pytester


def _run(pytester, mirror, *args):
    return pytester.runpytest_subprocess("--nsbox-rootfs=alpine:3.20.3", f"--nsbox-alpine-mirror={mirror.url}",
                                         "--nsbox-download-timeout=1", *args)


def _errors(result) -> list[str]:
    """The sentence of each test's error, from the short summary (CI=true: never cut)."""
    return [line.split(" - ", 1)[1] for line in result.stdout.lines if line.startswith("ERROR ")]


def _break(mirror, breakage: str) -> None:
    if breakage == "stall":
        mirror.stall[TARBALL] = 1_200_000
    elif breakage == "close":
        mirror.truncate.add(TARBALL)
    elif breakage == "silent":
        mirror.silent.add(TARBALL)
    else:
        mirror.fail[TARBALL] = int(breakage)


@pytest.mark.parametrize("workers", [(), XDIST], ids=["one-process", "two-xdist-workers"])
@pytest.mark.parametrize("breakage, said", [
    ("stall", "stalled: nothing came for 1 s after 1.2 MB of 3.5 MB"),
    ("close", "closed the connection after 1.7 MB of 3.5 MB"),
    ("silent", "accepted the connection, then sent nothing for 1 s"),
    ("500", "HTTP 500"),
], ids=["stall", "close", "silent", "500"])
def test_a_broken_mirror_fails_the_run_once(cold, mirror, workers, breakage, said):
    if workers:
        pytest.importorskip("xdist")
    _break(mirror, breakage)
    started = time.monotonic()
    result = _run(cold, mirror, *workers)
    elapsed = time.monotonic() - started
    result.assert_outcomes(errors=4)
    assert mirror.downloads(TARBALL) == 1
    errors = _errors(result)
    assert len(errors) == 4 and len(set(errors)) == 1, errors
    sentence = errors[0]
    assert said in sentence and f"{mirror.url}/{TARBALL}" in sentence
    assert "where there is network" not in sentence and "--nsbox-alpine-mirror" in sentence
    assert "tried once per pytest run" in sentence
    # One wait for the mirror, not four: pytest's start-up (and xdist's) is most of this.
    assert elapsed < 20, elapsed


@pytest.mark.parametrize("workers", [(), (*XDIST, "--testrunuid=fixed")], ids=["one-process", "xdist-fixed-testrunuid"])
def test_a_failure_is_remembered_for_one_run_only(cold, mirror, workers):
    if workers:
        pytest.importorskip("xdist")
    _break(mirror, "close")
    _run(cold, mirror, *workers).assert_outcomes(errors=4)
    mirror.truncate.clear()
    _run(cold, mirror, *workers).assert_outcomes(passed=4)
    assert mirror.downloads(TARBALL) == 2


def test_a_stalled_branch_lookup_is_tried_once_across_workers(cold, mirror):
    pytest.importorskip("xdist")
    mirror.stall["v3.20/releases/x86_64/latest-releases.yaml"] = 10
    result = cold.runpytest_subprocess("--nsbox-rootfs=alpine:3.20", f"--nsbox-alpine-mirror={mirror.url}",
                                       "--nsbox-download-timeout=1", *XDIST)
    result.assert_outcomes(errors=4)
    assert mirror.downloads("latest-releases.yaml") == 1
    assert len(set(_errors(result))) == 1
    assert "stalled: nothing came for 1 s after 10 bytes of" in _errors(result)[0]


def test_workers_of_one_run_share_the_failure_and_other_caches_do_not(tmp_path, mirror):
    _break(mirror, "close")
    first = RootfsStore(tmp_path / "a", mirror.url, run_id="run1")
    with pytest.raises(NetworkError) as caught:
        first.resolve("alpine:3.20.3")
    # Another worker of the same run: the same sentence at once, no request.
    with pytest.raises(NetworkError) as again:
        RootfsStore(tmp_path / "a", mirror.url, run_id="run1").resolve("alpine:3.20.3")
    assert str(again.value) == str(caught.value)
    assert mirror.downloads(TARBALL) == 1
    # Another cache, or another run, tries for itself.
    for cache, run in ((tmp_path / "b", "run1"), (tmp_path / "a", "run2")):
        with pytest.raises(NetworkError):
            RootfsStore(cache, mirror.url, run_id=run).resolve("alpine:3.20.3")
    assert mirror.downloads(TARBALL) == 3


def test_without_a_run_nothing_is_remembered(tmp_path, mirror):
    _break(mirror, "close")
    store = RootfsStore(tmp_path / "cache", mirror.url)
    for _ in range(2):
        with pytest.raises(NetworkError):
            store.resolve("alpine:3.20.3")
    assert mirror.downloads(TARBALL) == 2


def test_no_network_says_so_and_how_to_fill_the_cache_elsewhere(tmp_path):
    store = RootfsStore(tmp_path / "cache", "http://nonexistent.invalid/alpine")
    with pytest.raises(NetworkError) as caught:
        store.resolve("alpine:3.20.3")
    message = str(caught.value)
    assert "cannot look up nonexistent.invalid (" in message and "no network, or no DNS)" in message
    assert "nsbox rootfs pull alpine:3.20.3 --cache-dir" in message
    assert "--nsbox-alpine-mirror" in message  # a typo in the mirror's name looks the same


def test_a_refused_connection_is_the_mirror_not_the_network(tmp_path):
    store = RootfsStore(tmp_path / "cache", "http://127.0.0.1:9/alpine")
    with pytest.raises(NetworkError) as caught:
        store.resolve("alpine:3.20.3")
    message = str(caught.value)
    assert "refused the connection" in message and "--nsbox-alpine-mirror" in message
    assert "where there is network" not in message and "nsbox rootfs pull" not in message
    # Before: "the mirror was reached but failed: try again later", of a mirror never reached.
    assert "was reached" not in message and "try again later" not in message
    assert "nothing answers there: check the mirror http://127.0.0.1:9/alpine or use another mirror" in message


def test_a_release_missing_from_the_mirror_says_which_and_how_to_choose(tmp_path, mirror):
    (mirror.root / TARBALL).unlink()
    with pytest.raises(RootfsError) as caught:
        RootfsStore(tmp_path / "cache", mirror.url).resolve("alpine:3.20.3")
    message = str(caught.value)
    # 3.20.3 is pinned: every Alpine mirror keeps it, so the mirror is the thing to change.
    assert message.startswith(f"alpine:3.20.3: {mirror.url} has no Alpine 3.20.3 (x86_64)")
    assert "HTTP 404" in message and "a release every Alpine mirror keeps" in message
    assert "ask for one of these" not in message
    assert re.search(r"is it an Alpine mirror\? Use one that has 3\.20\.3: --nsbox-alpine-mirror", message)


def test_a_url_rootfs_that_is_not_found_points_at_the_url(tmp_path, mirror):
    spec = f"{mirror.url}/nope.tar.gz#sha256={SHA_320}"
    with pytest.raises(RootfsError) as caught:
        RootfsStore(tmp_path / "cache", mirror.url).resolve(spec)
    message = str(caught.value)
    assert f"{mirror.url}/nope.tar.gz" in message and "HTTP 404" in message
    assert "check the URL" in message and "--nsbox-alpine-mirror" not in message


def test_a_url_digest_mismatch_points_at_the_url_or_the_digest(tmp_path, mirror):
    wrong = "0" * 64
    with pytest.raises(DigestMismatch) as caught:
        RootfsStore(tmp_path / "cache", mirror.url).resolve(f"{mirror.url}/{TARBALL}#sha256={wrong}")
    message = str(caught.value)
    assert f"SHA-256 {SHA_320}, expected {wrong}" in message
    assert "the URL or the digest" in message and "#sha256=" in message
    assert "--nsbox-alpine-mirror" not in message


def test_a_broken_url_rootfs_points_at_the_url_not_the_alpine_mirror(tmp_path, mirror):
    mirror.truncate.add(TARBALL)
    with pytest.raises(NetworkError) as caught:
        RootfsStore(tmp_path / "cache", mirror.url).resolve(f"{mirror.url}/{TARBALL}#sha256={SHA_320}")
    message = str(caught.value)
    assert "closed the connection after 1.7 MB of 3.5 MB" in message
    assert "--nsbox-alpine-mirror" not in message and "where there is network" not in message


def test_a_bad_download_timeout_is_a_usage_error(cold):
    result = cold.runpytest_subprocess("--nsbox-download-timeout=0")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--nsbox-download-timeout takes a positive number of seconds, not '0'*"])


def test_the_first_download_shows_progress_once_under_xdist(cold, mirror):
    pytest.importorskip("xdist")
    result = _run(cold, mirror, *XDIST)
    result.assert_outcomes(passed=4)
    lines = [line for line in result.stdout.lines + result.stderr.lines if re.search(r"nsbox: .*download(ed|ing) ", line)]
    assert len(lines) == 1, lines
    assert re.fullmatch(r"nsbox: \[gw[01]\] downloaded alpine-minirootfs-3\.20\.3-x86_64\.tar\.gz \(3\.5 MB\)",
                        lines[0]), lines


def test_nsbox_rootfs_pull_gives_up_on_a_stalled_mirror_after_the_timeout(tmp_path, mirror):
    mirror.stall[TARBALL] = 1_200_000
    env = {**os.environ, "NSBOX_DOWNLOAD_TIMEOUT": "1"}
    started = time.monotonic()
    pulled = subprocess.run([sys.executable, "-m", "pytest_nsbox", "rootfs", "--cache-dir", str(tmp_path / "cache"),
                             "--mirror", mirror.url, "pull", "alpine:3.20.3"], capture_output=True, text=True, env=env)
    assert time.monotonic() - started < 10
    assert pulled.returncode == 1 and "Traceback" not in pulled.stderr
    assert "the server stalled: nothing came for 1 s after 1.2 MB of 3.5 MB" in pulled.stderr
    assert "`nsbox rootfs --mirror URL`" in pulled.stderr and "tried once per pytest run" not in pulled.stderr


def test_a_bad_download_timeout_in_the_environment_is_a_sentence(tmp_path, mirror, monkeypatch):
    monkeypatch.setenv("NSBOX_DOWNLOAD_TIMEOUT", "soon")
    with pytest.raises(ConfigError, match=r"NSBOX_DOWNLOAD_TIMEOUT takes a positive number of seconds, not 'soon'"):
        RootfsStore(tmp_path / "cache", mirror.url).resolve("alpine:3.20.3")


def test_a_mirror_that_is_not_an_alpine_mirror_says_so_and_how_to_choose(tmp_path, mirror):
    # Before: "latest-releases.yaml lists no alpine-minirootfs for x86_64", naming neither the
    # mirror nor a fix, for a URL that answers with something else (a captive portal, a web page).
    (mirror.root / "v3.20/releases/x86_64/latest-releases.yaml").write_text("<html>sign in</html>\n")
    with pytest.raises(RootfsError) as caught:
        RootfsStore(tmp_path / "cache", mirror.url).resolve("alpine:3.20")
    message = str(caught.value)
    assert f"{mirror.url}/v3.20/releases/x86_64/latest-releases.yaml lists no alpine-minirootfs" in message
    assert f"is {mirror.url} an Alpine mirror?" in message and "--nsbox-alpine-mirror" in message
