"""A real registry for the tests: Debian's `docker-registry` (the CNCF distribution server) on
127.0.0.1, images pushed to it with `skopeo`, and a small HTTP proxy in front of it that counts,
tampers, redirects blobs to a "storage" host and can ask for bearer tokens as Docker Hub does.

The real Docker Hub, GHCR and Quay are out of reach from the tests; the proxy's token endpoint
follows the distribution spec's token authentication (a 401 with `WWW-Authenticate: Bearer
realm=,service=,scope=`; GET realm?service=&scope= answers {"token": ...}), which is what they do.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from .images import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, _blob, config_json

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
TOOLS = ("docker-registry", "skopeo", "htpasswd")


def need_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing and os.environ.get("NSBOX_EXPECT_CAPS"):  # set by .ci/run, which installs them
        pytest.fail(f".ci/run should have installed {', '.join(missing)} (docker-registry, skopeo, apache2-utils)")
    if missing:
        pytest.skip(f"the registry tests need {', '.join(missing)} (Debian packages docker-registry, skopeo, "
                    "apache2-utils; .ci/run installs them)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Registry:
    """A running docker-registry: `host` is 127.0.0.1:PORT; its access log is `log`."""

    host: str
    log: Path
    process: subprocess.Popen
    creds: str | None = None  # user:pass, for pushing

    def push(self, layout: Path, ref: str, dest: str, *options: str) -> str:
        """skopeo copy oci:LAYOUT:REF to NAME:TAG here; returns the manifest digest it wrote."""
        digestfile = layout.parent / f"digest-{os.urandom(4).hex()}"
        args = ["skopeo", "--insecure-policy", "copy", "-q", "--dest-tls-verify=false", f"--digestfile={digestfile}",
                *options]
        if self.creds:
            args.append(f"--dest-creds={self.creds}")
        subprocess.run([*args, f"oci:{layout}:{ref}", f"docker://{self.host}/{dest}"], check=True, timeout=120,
                       env={**os.environ, "HOME": str(layout.parent)})
        digest = digestfile.read_text().strip()
        digestfile.unlink()
        return digest

    def gets(self, path_prefix: str) -> list[str]:
        """The paths of the successful GETs under `path_prefix` in the access log."""
        found = []
        for line in self.log.read_text(errors="replace").splitlines():
            match = re.search(r'"GET (\S+) HTTP/[\d.]+" (\d+)', line)
            if match and match.group(2) == "200" and match.group(1).startswith(path_prefix):
                found.append(match.group(1))
        return found

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_registry(root: Path, users: dict[str, str] | None = None) -> Registry:
    """docker-registry on 127.0.0.1 with its storage, config and log under `root`; with `users`,
    htpasswd basic auth (bcrypt, as the registry requires)."""
    root.mkdir(parents=True)
    auth = ""
    if users:
        lines = [subprocess.run(["htpasswd", "-Bbn", user, password], check=True, capture_output=True,
                                text=True).stdout.strip() for user, password in users.items()]
        (root / "htpasswd").write_text("\n".join(lines) + "\n")
        auth = f"auth:\n  htpasswd:\n    realm: nsbox-test\n    path: {root / 'htpasswd'}\n"
    for attempt in range(5):
        port = _free_port()
        (root / "config.yml").write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {root / 'data'}\n"
            f"  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: nsbox-test\n{auth}")
        log = root / f"log-{attempt}.txt"
        with open(log, "wb") as out:
            process = subprocess.Popen(["docker-registry", "serve", str(root / "config.yml")], stdout=out,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and process.poll() is None:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
                conn.request("GET", "/v2/")
                status = conn.getresponse().status
                conn.close()
                if status in (200, 401):
                    creds = ":".join(next(iter(users.items()))) if users else None
                    return Registry(f"127.0.0.1:{port}", log, process, creds)
            except OSError:
                time.sleep(0.05)
        process.kill()
        process.wait()
    raise RuntimeError(f"docker-registry did not start: {log.read_text(errors='replace')[-2000:]}")


# -- images ---------------------------------------------------------------------------------------
def platform_index(root: Path, images: dict[str, list[bytes]], tag: str) -> str:
    """An OCI layout at `root` whose `tag` is an image index of one image per "os/arch" of `images`
    (what `docker buildx --platform a,b` pushes). Returns the index's digest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    manifests = []
    for platform, layers in images.items():
        os_name, arch = platform.split("/")
        described = []
        for tar in layers:
            digest, size = _blob(root, gzip.compress(tar, mtime=0))
            described.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size})
        config = json.loads(config_json(layers))
        config["architecture"], config["os"] = arch, os_name
        config_digest, config_size = _blob(root, json.dumps(config).encode())
        manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                               "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                               "layers": described}).encode()
        digest, size = _blob(root, manifest)
        manifests.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                          "platform": {"architecture": arch, "os": os_name}})
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests}).encode()
    digest, size = _blob(root, index)
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_INDEX, "digest": digest, "size": size,
         "annotations": {"org.opencontainers.image.ref.name": tag}}]}))
    return digest


# -- a proxy in front of the registry ---------------------------------------------------------------
Alter = Callable[[bytes, dict], "tuple[bytes, dict]"]


@dataclass
class Proxy:
    """An HTTP server on 127.0.0.1 passing GETs on to `upstream` (host:port), which records each
    (path, Authorization) and can alter answers (`alter`: path suffix -> fn(body, headers)), fail
    them (`fail`: path suffix -> status), ask for a bearer token (`bearer`), send blob GETs on to
    another server (`blobs_at`: a Proxy standing for blob storage) by a 307 redirect."""

    upstream: str
    url: str = ""
    host: str = ""
    requests: list[tuple[str, str | None]] = field(default_factory=list)
    alter: dict[str, Alter] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)
    bearer: bool = False
    token_field: str = "token"
    token_users: dict[str, str] | None = None  # basic credentials the token endpoint requires
    token_requests: list[dict[str, str]] = field(default_factory=list)
    blobs_at: Proxy | None = None
    _token: str = field(default_factory=lambda: os.urandom(8).hex())
    _stop: Callable[[], None] | None = None

    def paths(self, prefix: str = "") -> list[str]:
        return [path for path, _ in self.requests if path.startswith(prefix)]

    def start(self) -> Proxy:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                proxy.requests.append((self.path, self.headers.get("Authorization")))
                path = self.path.split("?")[0]
                if path == "/token":
                    return self._token()
                for suffix, status in proxy.fail.items():
                    if path.endswith(suffix):
                        return self._send(status, b'{"errors":[{"code":"UNKNOWN","message":"broken on purpose"}]}',
                                          {"Content-Type": "application/json"})
                if proxy.bearer and self.headers.get("Authorization") != f"Bearer {proxy._token}":
                    name = path.removeprefix("/v2/").split("/manifests/")[0].split("/blobs/")[0]
                    challenge = (f'Bearer realm="{proxy.url}/token",service="nsbox-test",'
                                 f'scope="repository:{name}:pull"')
                    return self._send(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                                      {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
                if proxy.blobs_at is not None and "/blobs/" in path:
                    return self._send(307, b"", {"Location": f"{proxy.blobs_at.url}{self.path}?signature=x"})
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("accept", "authorization")}
                if proxy.bearer:
                    headers.pop("Authorization", None)
                conn.request("GET", path, headers=headers)
                answer = conn.getresponse()
                body = answer.read()
                kept = {k: v for k, v in answer.getheaders()
                        if k.lower() in ("content-type", "docker-content-digest", "www-authenticate", "location")}
                conn.close()
                for suffix, alter in proxy.alter.items():
                    if path.endswith(suffix):
                        body, kept = alter(body, kept)
                self._send(answer.status, body, kept)

            def _token(self):
                query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.path).query))
                proxy.token_requests.append({**query, "authorization": self.headers.get("Authorization") or ""})
                if proxy.token_users is not None:
                    given = self.headers.get("Authorization") or ""
                    wanted = {"Basic " + base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in proxy.token_users.items()}
                    if given not in wanted:
                        return self._send(401, b'{"details":"incorrect username or password"}',
                                          {"Content-Type": "application/json"})
                if query.get("service") != "nsbox-test" or not re.fullmatch(r"repository:[a-z0-9/._-]+:pull",
                                                                              query.get("scope", "")):
                    return self._send(400, b'{"details":"bad service or scope"}', {})
                body = json.dumps({proxy.token_field: proxy._token, "expires_in": 300}).encode()
                self._send(200, body, {"Content-Type": "application/json"})

            def _send(self, status: int, body: bytes, headers: dict) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.host = f"127.0.0.1:{server.server_address[1]}"
        self.url = f"http://{self.host}"
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join()

        self._stop = stop
        return self

    def stop(self) -> None:
        if self._stop is not None:
            self._stop()
            self._stop = None


def flip_last_bytes(body: bytes, headers: dict) -> tuple[bytes, dict]:
    return body[:-8] + bytes(b ^ 0xFF for b in body[-8:]), headers


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()
