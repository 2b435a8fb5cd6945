"""`docker://` images from a registry: the distribution spec's pull, against a real registry
(Debian's docker-registry on 127.0.0.1, anonymous and with htpasswd basic auth) holding images the
tests build and push with skopeo; a proxy in front of it (tests/registry.py) counts requests,
tampers with answers, redirects blobs to another host, and stands for a bearer-token registry
(Docker Hub, GHCR and Quay are out of reach from the tests: its token endpoint follows the spec).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_nsbox import RootfsError, Sandbox
from pytest_nsbox.errors import DigestMismatch, NetworkError, RemoteNotFound
from pytest_nsbox.rootfs import registry as reg
from pytest_nsbox.rootfs.oci import host_platform
from pytest_nsbox.rootfs.specs import parse

from .images import Entry, alpine_layer, app_layers, layer_tar, oci_layout
from .registry import Proxy, flip_last_bytes, need_tools, platform_index, start_registry

ALPINE = Path(os.environ["NSBOX_ROOTFS"])


def _version_layer(text: str) -> bytes:
    return layer_tar([Entry("srv", kind="dir"), Entry("srv/version", text.encode())])


@pytest.fixture(scope="session")
def layouts(tmp_path_factory) -> Path:
    """One OCI layout with the tags app (Alpine + whiteouts, hard links, uid 70...), v1 and v2."""
    root = tmp_path_factory.mktemp("images") / "layout"
    base = alpine_layer(ALPINE)
    oci_layout(root, [base, *app_layers()], tag="app", cmd=("cat", "/srv/keep"),
               env=("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "GREETING=from the registry"))
    oci_layout(root, [base, _version_layer("1\n")], tag="v1", cmd=("cat", "/srv/version"))
    oci_layout(root, [base, _version_layer("2\n")], tag="v2", cmd=("cat", "/srv/version"))
    return root


@pytest.fixture(scope="session")
def registry(tmp_path_factory, layouts):
    need_tools()
    served = start_registry(tmp_path_factory.mktemp("registry") / "anonymous")
    try:
        served.push(layouts, "app", "test/app:1")
        yield served
    finally:
        served.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory, layouts):
    need_tools()
    served = start_registry(tmp_path_factory.mktemp("registry") / "htpasswd", users={"tester": "s3cret"})
    try:
        served.push(layouts, "app", "private/app:1")
        yield served
    finally:
        served.stop()


@pytest.fixture
def proxy(registry):
    served = Proxy(registry.host).start()
    yield served
    served.stop()


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    """A home of the test's own: the user's real auth files must not answer for it."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for name in ("REGISTRY_AUTH_FILE", "XDG_RUNTIME_DIR", "DOCKER_CONFIG"):
        monkeypatch.delenv(name, raising=False)
    return home


def _nsbox(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest_nsbox", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, **(env or {})})


def _trees(cache: Path) -> set[str]:
    return {p.name for p in (cache / "trees").glob("sha256-*") if p.is_dir()}


def test_an_image_is_pulled_once_and_runs_warm_with_the_registry_gone(proxy, tmp_path):
    cache = tmp_path / "cache"
    image = f"docker://{proxy.host}/test/app:1"
    with Sandbox(rootfs=image, cache_dir=cache) as box:
        assert box.run().stdout == "kept\n"  # the image's Cmd
        assert box.run("cat /srv/linked /srv/old/new; ls /srv/old; echo $GREETING").stdout == \
            "kept\nnew\nnew\nfrom the registry\n"
        assert box.rootfs.describe().endswith("3 layers (an image tag, resolved once and pinned in the cache)")
    blobs = proxy.paths("/v2/test/app/blobs/")
    assert len(blobs) == 4 and len(set(blobs)) == 4  # a config and three layers, each fetched once
    assert len(_trees(cache)) == 3
    proxy.stop()  # warm: the tag is pinned in the cache, so nothing needs the registry now
    result = _nsbox("run", "--rootfs", image, "--cache-dir", str(cache))
    assert (result.returncode, result.stdout) == (0, "kept\n"), result.stderr
    result = _nsbox("rootfs", "pull", image, "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(f"{image} sha256:")
    assert sum(line.startswith("  layer ") for line in result.stdout.splitlines()) == 3
    assert "nsbox rootfs pull --refresh" in result.stdout


def test_a_re_pushed_tag_stays_pinned_until_pull_refresh(registry, layouts, tmp_path):
    cache = tmp_path / "cache"
    image = f"docker://{registry.host}/test/moving:latest"
    registry.push(layouts, "v1", "test/moving:latest")
    result = _nsbox("rootfs", "pull", image, "--cache-dir", str(cache))
    assert result.returncode == 0 and "downloaded" in result.stderr, result.stderr
    registry.push(layouts, "v2", "test/moving:latest")
    assert _nsbox("run", "--rootfs", image, "--cache-dir", str(cache)).stdout == "1\n"
    assert _nsbox("rootfs", "pull", image, "--cache-dir", str(cache)).returncode == 0
    assert _nsbox("run", "--rootfs", image, "--cache-dir", str(cache)).stdout == "1\n"  # still pinned
    result = _nsbox("rootfs", "pull", "--refresh", image, "--cache-dir", str(cache))
    assert result.returncode == 0, result.stderr
    assert _nsbox("run", "--rootfs", image, "--cache-dir", str(cache)).stdout == "2\n"


def test_a_pinned_digest_is_pulled_and_checked(registry, layouts, tmp_path, proxy):
    cache = tmp_path / "cache"
    digest = registry.push(layouts, "v1", "test/pinned:1")
    registry.push(layouts, "v2", "test/pinned:1")  # the tag moved: the digest still names v1
    for spec in (f"docker://{registry.host}/test/pinned@{digest}", f"docker://{registry.host}/test/pinned:1@{digest}"):
        with Sandbox(rootfs=spec, cache_dir=cache) as box:
            assert box.run().stdout == "1\n"
            assert box.rootfs.digest == digest.removeprefix("sha256:")
    missing = "sha256:" + "0" * 64
    with pytest.raises(RemoteNotFound, match=rf"test/pinned has no tag or digest {missing}.*skopeo list-tags"):
        Sandbox(rootfs=f"docker://{registry.host}/test/pinned@{missing}", cache_dir=cache).start()
    # A registry that answers a pinned digest with other bytes (and no Docker-Content-Digest) is refused.
    proxy.alter[f"/manifests/{digest}"] = lambda body, headers: (body + b"\n", {
        k: v for k, v in headers.items() if k.lower() != "docker-content-digest"})
    with pytest.raises(DigestMismatch, match=f"the registry served the manifest sha256:[0-9a-f]{{64}} for {digest}"):
        Sandbox(rootfs=f"docker://{proxy.host}/test/pinned@{digest}", cache_dir=tmp_path / "other").start()
    # ... and so is one whose bytes do not hash to the Docker-Content-Digest it sends.
    proxy.alter[f"/manifests/{digest}"] = lambda body, headers: (body + b"\n", headers)
    with pytest.raises(DigestMismatch, match=f"the registry says the manifest is {digest}, but the bytes"):
        Sandbox(rootfs=f"docker://{proxy.host}/test/pinned@{digest}", cache_dir=tmp_path / "other").start()


def test_a_tampered_blob_is_refused_and_nothing_is_cached(proxy, registry, tmp_path):
    cache = tmp_path / "cache"
    manifest = json.loads(_get(registry, "/v2/test/app/manifests/1"))
    top = manifest["layers"][-1]["digest"]
    proxy.alter[f"/blobs/{top}"] = flip_last_bytes
    with pytest.raises(DigestMismatch) as caught:
        Sandbox(rootfs=f"docker://{proxy.host}/test/app:1", cache_dir=cache).start()
    said = str(caught.value)
    assert f"image docker://{proxy.host}/test/app:1" in said and f"/v2/test/app/blobs/{top}" in said
    assert f"not {top}: damaged or tampered; nothing of it was cached" in said
    assert not any(top.split(":")[1] in name and not name.endswith(".lock") for name in os.listdir(cache / "trees"))
    assert not (cache / "resolutions.json").exists() or f"{proxy.host}" not in (cache / "resolutions.json").read_text()


def test_the_host_platform_is_picked_from_an_index_and_docker_manifests_work(registry, tmp_path):
    arch, _ = host_platform()
    other = "arm64" if arch != "arm64" else "amd64"
    base = alpine_layer(ALPINE)
    multi = tmp_path / "multi"
    platform_index(multi, {f"linux/{other}": [base, _version_layer(other)],
                           f"linux/{arch}": [base, _version_layer(arch)]}, tag="multi")
    index_digest = registry.push(multi, "multi", "test/multi:1", "--all")
    cache = tmp_path / "cache"
    with Sandbox(rootfs=f"docker://{registry.host}/test/multi:1", cache_dir=cache) as box:
        assert box.run("cat /srv/version").stdout == arch
        assert box.rootfs.digest == index_digest.removeprefix("sha256:")  # the image is named by its index
    with Sandbox(rootfs=f"docker://{registry.host}/test/multi@{index_digest}", cache_dir=cache) as box:
        assert box.run("cat /srv/version").stdout == arch
    # Docker's own formats (v2 schema 2), as `docker push` writes them.
    single = tmp_path / "single"
    oci_layout(single, [base, _version_layer("docker\n")], tag="d")
    registry.push(single, "d", "test/docker-format:1", "--format", "v2s2")
    served = json.loads(_get(registry, "/v2/test/docker-format/manifests/1"))
    assert served["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    with Sandbox(rootfs=f"docker://{registry.host}/test/docker-format:1", cache_dir=cache) as box:
        assert box.run("cat /srv/version").stdout == "docker\n"


def test_a_schema_1_manifest_and_a_non_image_are_refused_with_a_sentence(proxy, tmp_path):
    proxy.alter["/manifests/1"] = lambda body, headers: (
        json.dumps({"schemaVersion": 1, "name": "test/app", "tag": "1", "fsLayers": []}).encode(),
        {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"})
    with pytest.raises(RootfsError, match="is a Docker schema 1 manifest.*push the image again"):
        Sandbox(rootfs=f"docker://{proxy.host}/test/app:1", cache_dir=tmp_path / "cache").start()
    proxy.alter["/manifests/1"] = lambda body, headers: (b"x" * (5 << 20), headers)
    with pytest.raises(RootfsError, match="more than any image document needs"):
        Sandbox(rootfs=f"docker://{proxy.host}/test/app:1", cache_dir=tmp_path / "cache").start()


def test_basic_auth_credentials_come_from_the_auth_file(auth_registry, tmp_path, monkeypatch, no_credentials):
    auth_file = tmp_path / "auth.json"
    token = base64.b64encode(b"tester:s3cret").decode()
    auth_file.write_text(json.dumps({"auths": {auth_registry.host: {"auth": token}}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
    with Sandbox(rootfs=f"docker://{auth_registry.host}/private/app:1", cache_dir=tmp_path / "cache") as box:
        assert box.run().stdout == "kept\n"


def test_a_401_without_credentials_says_how_to_log_in(auth_registry, tmp_path, monkeypatch, no_credentials):
    image = f"docker://{auth_registry.host}/private/app:1"
    with pytest.raises(RootfsError) as caught:
        Sandbox(rootfs=image, cache_dir=tmp_path / "cache").start()
    said = str(caught.value)
    assert f"image {image} is not in the cache" in said
    assert f"the registry {auth_registry.host} asks for credentials, and none were found" in said
    assert f"`skopeo login {auth_registry.host}` or `podman login {auth_registry.host}`" in said
    # Wrong credentials are named, with the file they came from; a credential helper is noted.
    docker_config = no_credentials / ".docker" / "config.json"
    docker_config.parent.mkdir()
    docker_config.write_text(json.dumps({"auths": {auth_registry.host: {"auth": base64.b64encode(b"tester:wrong").decode()}},
                                         "credsStore": "desktop"}))
    with pytest.raises(RootfsError, match=rf"refused the credentials of 'tester' for {auth_registry.host} "
                                          rf"\(from {docker_config}\)"):
        Sandbox(rootfs=image, cache_dir=tmp_path / "cache").start()
    docker_config.write_text(json.dumps({"auths": {}, "credsStore": "desktop"}))
    with pytest.raises(RootfsError, match="keeps credentials in the helper docker-credential-desktop, which "
                                          "pytest-nsbox does not run"):
        Sandbox(rootfs=image, cache_dir=tmp_path / "cache").start()


@pytest.mark.parametrize("token_field", ["token", "access_token"])
def test_a_bearer_token_challenge_is_answered_as_docker_hub_asks(registry, tmp_path, monkeypatch, no_credentials,
                                                                  token_field):
    """The flow Docker Hub, GHCR and Quay use, against a token endpoint of our own (they are out of
    reach here); blobs are redirected to "storage" on another host, which gets no credentials."""
    storage = Proxy(registry.host).start()
    hub = Proxy(registry.host, bearer=True, token_field=token_field, blobs_at=storage).start()
    try:
        with Sandbox(rootfs=f"docker://{hub.host}/test/app:1", cache_dir=tmp_path / "cache") as box:
            assert box.run().stdout == "kept\n"
        assert hub.token_requests and all(r["service"] == "nsbox-test" and r["scope"] == "repository:test/app:pull"
                                          and r["authorization"] == "" for r in hub.token_requests)
        assert len(hub.token_requests) == 1  # one token for the whole pull
        assert all(auth and auth.startswith("Bearer ") for path, auth in hub.requests[1:] if path.startswith("/v2/"))
        assert len(storage.paths("/v2/test/app/blobs/")) == 4
        assert all(auth is None for _, auth in storage.requests)  # credentials stay with the registry's host
        # A private repository: the token endpoint wants the user's credentials.
        hub.token_users = {"tester": "s3cret"}
        hub._token = "another"
        with pytest.raises(RootfsError, match="asks for credentials, and none were found.*skopeo login"):
            Sandbox(rootfs=f"docker://{hub.host}/test/app:1", cache_dir=tmp_path / "private").start()
        auth_file = tmp_path / "auth.json"
        auth_file.write_text(json.dumps({"auths": {f"http://{hub.host}": {
            "auth": base64.b64encode(b"tester:s3cret").decode()}}}))
        monkeypatch.setenv("REGISTRY_AUTH_FILE", str(auth_file))
        with Sandbox(rootfs=f"docker://{hub.host}/test/app:1", cache_dir=tmp_path / "private") as box:
            assert box.run().stdout == "kept\n"
        assert hub.token_requests[-1]["authorization"] == "Basic " + base64.b64encode(b"tester:s3cret").decode()
    finally:
        hub.stop()
        storage.stop()


def test_plain_http_is_used_only_for_registries_on_this_machine(proxy, tmp_path):
    assert reg.base_url("docker.io") == "https://registry-1.docker.io"
    assert reg.base_url("ghcr.io") == "https://ghcr.io"
    assert reg.base_url("10.0.0.5:5000") == "https://10.0.0.5:5000"
    assert reg.base_url("registry.local:5000") == "https://registry.local:5000"
    for loopback in ("127.0.0.1:5000", "127.1.2.3:5000", "localhost:5000", "[::1]:5000"):
        assert reg.base_url(loopback) == f"http://{loopback}"
    for url in ("http://10.0.0.5:5000/v2/", "http://example.com/token", "ftp://127.0.0.1/x"):
        with pytest.raises(RootfsError, match="plain HTTP is used only for registries on this machine"):
            reg.check_scheme(url, "a URL")
    # A loopback registry that redirects a blob to plain HTTP elsewhere is refused before connecting.
    hostile = Proxy(proxy.upstream).start()
    hostile.blobs_at = Proxy(proxy.upstream)
    hostile.blobs_at.url = "http://192.0.2.1"  # storage "elsewhere", never reached
    try:
        with pytest.raises(RootfsError, match=r"is http://192\.0\.2\.1/v2/test/app/blobs/.*plain HTTP is used only"):
            Sandbox(rootfs=f"docker://{hostile.host}/test/app:1", cache_dir=tmp_path / "cache").start()
    finally:
        hostile.stop()


def test_a_registry_that_does_not_answer_is_a_sentence(tmp_path, no_credentials):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once it is closed
    image = f"docker://127.0.0.1:{port}/test/app:1"
    with pytest.raises(NetworkError) as caught:
        Sandbox(rootfs=image, cache_dir=tmp_path / "cache").start()
    assert str(caught.value) == (
        f"image {image} is not in the cache {tmp_path / 'cache'} and cannot be pulled: GET "
        f"http://127.0.0.1:{port}/v2/test/app/manifests/1: 127.0.0.1 refused the connection (nothing serves "
        f"that port); check the registry's address 127.0.0.1:{port} (is it running?), try again later, or "
        "pull from another registry")


def test_credentials_are_found_as_podman_and_docker_write_them(tmp_path, monkeypatch, no_credentials):
    def auth(user: str) -> dict:
        return {"auth": base64.b64encode(f"{user}:pw".encode()).decode()}
    docker = no_credentials / ".docker" / "config.json"
    docker.parent.mkdir()
    docker.write_text(json.dumps({"auths": {"https://index.docker.io/v1/": auth("hub-user"),
                                            "quay.io": auth("quay-docker")}}))
    podman = no_credentials / ".config" / "containers" / "auth.json"
    podman.parent.mkdir(parents=True)
    podman.write_text(json.dumps({"auths": {"quay.io": auth("quay-podman"), "quay.io/team": auth("team")}}))
    found = {}
    for registry, name in (("docker.io", "library/redis"), ("quay.io", "other/x"), ("quay.io", "team/app"),
                           ("ghcr.io", "x/y")):
        credentials, _ = reg.find_credentials(registry, name)
        found[f"{registry}/{name}"] = credentials.user if credentials else None
    assert found == {"docker.io/library/redis": "hub-user", "quay.io/other/x": "quay-podman",
                     "quay.io/team/app": "team", "ghcr.io/x/y": None}
    first = tmp_path / "first.json"
    first.write_text(json.dumps({"auths": {"quay.io": auth("from-env")}}))
    monkeypatch.setenv("REGISTRY_AUTH_FILE", str(first))
    assert reg.find_credentials("quay.io", "other/x")[0].user == "from-env"
    assert reg.parse_challenge('Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
                               'scope="repository:library/redis:pull"') == reg.Challenge("bearer", {
                                   "realm": "https://auth.docker.io/token", "service": "registry.docker.io",
                                   "scope": "repository:library/redis:pull"})
    assert parse("docker://redis").registry == "docker.io"


TWO_TESTS = """
    import pytest

    @pytest.mark.sandbox(rootfs="{image}")
    def test_one(sandbox):
        assert sandbox.run().stdout == "{out}"

    @pytest.mark.sandbox(rootfs="{image}")
    def test_two(sandbox):
        assert sandbox.run(["cat", "/srv/keep"]).stdout == "kept\\n"
"""


def test_two_xdist_workers_pull_each_blob_once_through_the_marker(pytester, registry, layouts, monkeypatch):
    pytest.importorskip("xdist")
    registry.push(layouts, "app", "concurrent/app:1")
    manifest = json.loads(_get(registry, "/v2/concurrent/app/manifests/1"))
    monkeypatch.setenv("NSBOX_CACHE_DIR", str(pytester.path / "cache"))
    monkeypatch.setenv("CI", "true")
    pytester.makepyfile(textwrap.dedent(TWO_TESTS.format(image=f"docker://{registry.host}/concurrent/app:1",
                                                         out="kept\\n")))
    result = pytester.runpytest_subprocess("-p", "xdist", "-n", "2")
    result.assert_outcomes(passed=2)
    for layer in manifest["layers"]:
        assert len(registry.gets(f"/v2/concurrent/app/blobs/{layer['digest']}")) == 1, layer


@pytest.mark.parametrize("workers", [(), ("-p", "xdist", "-n", "2")], ids=["one-process", "two-xdist-workers"])
def test_a_failed_pull_fails_the_run_once(pytester, proxy, monkeypatch, workers):
    if workers:
        pytest.importorskip("xdist")
    monkeypatch.setenv("NSBOX_CACHE_DIR", str(pytester.path / "cache"))
    monkeypatch.setenv("CI", "true")
    proxy.fail["/manifests/1"] = 500
    pytester.makepyfile(textwrap.dedent(TWO_TESTS.format(image=f"docker://{proxy.host}/test/app:1", out="")))
    result = pytester.runpytest_subprocess(*workers)
    result.assert_outcomes(errors=2)
    assert len(proxy.paths("/v2/test/app/manifests/1")) == 1
    errors = [line.split(" - ", 1)[1] for line in result.stdout.lines if line.startswith("ERROR ")]
    assert len(errors) == 2 and len(set(errors)) == 1, errors
    assert "HTTP 500 UNKNOWN (broken on purpose)" in errors[0]
    assert "a failed download is tried once per pytest run" in errors[0]


def _get(registry, path: str) -> bytes:
    import http.client
    conn = http.client.HTTPConnection(registry.host, timeout=30)
    conn.request("GET", path, headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                                                 "application/vnd.docker.distribution.manifest.v2+json"})
    data = conn.getresponse().read()
    conn.close()
    return data
