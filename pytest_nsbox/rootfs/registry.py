"""The registry side of `docker://` images: the distribution spec's pull, with the standard library.

    GET /v2/<name>/manifests/<tag|digest>   Accept: oci.ACCEPT; an index is followed to this platform
    GET /v2/<name>/blobs/<digest>           the config, then each layer (often a redirect to storage)

A manifest's digest is the sha256 of the bytes served, checked against Docker-Content-Digest and any
digest the user pinned; every blob is hashed as it arrives and refused unless it matches.  Documents
are read up to oci.MAX_DOCUMENT, a blob up to the size its manifest gives it.

Authentication as Docker Hub, GHCR, Quay and the CNCF registry ask for it: a 401 with
`WWW-Authenticate: Bearer realm=,service=,scope=` is answered by fetching a token from the realm
(anonymously, or with the user's credentials), a 401 with `Basic` by the credentials themselves.
Credentials come from the files podman, skopeo and docker write (`credential_files`).

Plain HTTP is used for loopback registries only (127.0.0.0/8, ::1, localhost), as Docker treats them;
every other registry, token realm or redirect is HTTPS, and credentials never leave the registry's
own host: a redirect elsewhere (blob storage) is followed without them.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import json
import os
import socket
import ssl
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from ..errors import DigestMismatch, NetworkError, RemoteNotFound, RootfsError
from . import oci
from .download import Progress, _body_error, _connect_error, _network_error, _reason, size, unreachable
from .specs import DOCKER_HUB, ImageSpec

if TYPE_CHECKING:
    from .store import RootfsStore

_T = TypeVar("_T")
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = (DOCKER_HUB, "index.docker.io", DOCKER_HUB_API, "registry.hub.docker.com")
_SCHEMA1 = ("application/vnd.docker.distribution.manifest.v1+json",
            "application/vnd.docker.distribution.manifest.v1+prettyjws")
_REDIRECTS = (301, 302, 303, 307, 308)
_MAX_REDIRECTS = 5
_CHUNK = 1 << 16
_LOGIN = "log in: `skopeo login {host}` or `podman login {host}`, which write auth.json"


class Credentials(NamedTuple):
    user: str
    password: str
    source: str  # the file they came from, for the sentence when they are refused


class Challenge(NamedTuple):
    scheme: str  # "bearer" | "basic"
    params: dict[str, str]


class Response(NamedTuple):
    url: str      # after redirects
    status: int
    headers: http.client.HTTPMessage
    body: http.client.HTTPResponse


# -- where a registry is, and how it may be reached -----------------------------------------------
def api_host(registry: str) -> str:
    """The host[:port] a registry's API is served on: Docker Hub's is not docker.io."""
    return DOCKER_HUB_API if registry in _HUB_ALIASES else registry


def is_loopback(host: str) -> bool:
    """Whether `host` (no port; IPv6 without brackets) is this machine: 127.0.0.0/8, ::1, localhost."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def base_url(registry: str) -> str:
    """https://HOST, or http://HOST for a loopback registry (which rarely has a certificate)."""
    host = api_host(registry)
    hostname = urllib.parse.urlsplit(f"//{host}").hostname or host
    return f"{'http' if is_loopback(hostname) else 'https'}://{host}"


def check_scheme(url: str, what: str) -> None:
    """Refuse plain HTTP (or anything but HTTP(S)) to a host that is not this machine: a token, a
    credential or a layer could be read or changed on the way."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and parts.hostname and is_loopback(parts.hostname):
        return
    raise RootfsError(f"{what} is {url[:200]}: plain HTTP is used only for registries on this machine "
                      "(127.0.0.0/8, ::1, localhost), as Docker treats them; anything else must be https://")


# -- credentials ------------------------------------------------------------------------------------
def credential_files() -> list[Path]:
    """Where credentials are looked for, in podman's and skopeo's order, then docker's."""
    files = []
    if os.environ.get("REGISTRY_AUTH_FILE"):
        files.append(Path(os.environ["REGISTRY_AUTH_FILE"]))
    if os.environ.get("XDG_RUNTIME_DIR"):
        files.append(Path(os.environ["XDG_RUNTIME_DIR"]) / "containers" / "auth.json")
    home = Path(os.path.expanduser("~"))
    files.append(home / ".config" / "containers" / "auth.json")
    files.append(Path(os.environ["DOCKER_CONFIG"]) / "config.json" if os.environ.get("DOCKER_CONFIG")
                 else home / ".docker" / "config.json")
    return files


def _normal_key(key: str) -> str:
    """An `auths` key as host[/path]: docker writes "https://index.docker.io/v1/", podman "quay.io"."""
    text = key.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.rstrip("/")
    for suffix in ("/v1", "/v2"):
        text = text.removesuffix(suffix)
    host, slash, path = text.partition("/")
    if host in _HUB_ALIASES:
        host = DOCKER_HUB
    return host + slash + path


def find_credentials(registry: str, name: str) -> tuple[Credentials | None, list[str]]:
    """The user's credentials for `registry`/`name` (the most specific key of the first file that
    has one), and notes on what could not be used (credential helpers, unreadable files)."""
    host = DOCKER_HUB if registry in _HUB_ALIASES else registry
    wanted = [f"{host}/{name}"]
    parts = name.split("/")
    wanted += [f"{host}/{'/'.join(parts[:n])}" for n in range(len(parts) - 1, 0, -1)] + [host]
    notes: list[str] = []
    for path in credential_files():
        try:
            with open(path, "rb") as f:
                data = json.loads(f.read(oci.MAX_DOCUMENT))
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            notes.append(f"{path} could not be read ({_reason(exc) if isinstance(exc, OSError) else 'not JSON'})")
            continue
        if not isinstance(data, dict):
            continue
        auths = data.get("auths") if isinstance(data.get("auths"), dict) else {}
        entries = {_normal_key(k): v for k, v in auths.items() if isinstance(v, dict)}
        for key in wanted:
            found = _entry_credentials(entries.get(key), path)
            if found is not None:
                return found, notes
        helpers = data.get("credHelpers") if isinstance(data.get("credHelpers"), dict) else {}
        helper = next((v for k, v in helpers.items() if _normal_key(k) == host), None) or data.get("credsStore")
        if isinstance(helper, str) and helper:
            notes.append(f"{path} keeps credentials in the helper docker-credential-{helper}, which "
                         "pytest-nsbox does not run")
    return None, notes


def _entry_credentials(entry: object, path: Path) -> Credentials | None:
    if not isinstance(entry, dict):
        return None
    if isinstance(entry.get("auth"), str) and entry["auth"]:
        try:
            user, colon, password = base64.b64decode(entry["auth"]).decode("utf-8").partition(":")
        except (ValueError, UnicodeDecodeError):
            return None
        return Credentials(user, password, str(path)) if colon else None
    if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
        return Credentials(entry["username"], entry["password"], str(path))
    return None


def parse_challenge(header: str) -> Challenge | None:
    """The first Bearer or Basic challenge of a WWW-Authenticate header (RFC 7235: a scheme, then
    name=value pairs, values maybe quoted, separated by commas)."""
    text = header.strip()
    scheme, _, rest = text.partition(" ")
    if scheme.lower() not in ("bearer", "basic"):
        return None
    params: dict[str, str] = {}
    i = 0
    while i < len(rest):
        while i < len(rest) and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        name = rest[i:eq].strip().lower()
        i = eq + 1
        if i < len(rest) and rest[i] == '"':
            value, i = [], i + 1
            while i < len(rest) and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < len(rest):
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1
            params[name] = "".join(value)
        else:
            end = rest.find(",", i)
            end = len(rest) if end < 0 else end
            params[name] = rest[i:end].strip()
            i = end
    return Challenge(scheme.lower(), params)


# -- the image --------------------------------------------------------------------------------------
class RegistryImage:
    """One image in a registry: its manifest (followed to this platform) and its blobs.

    `store`, when given, is the rootfs store pulling it: a fetch that failed in this pytest run fails
    again at once, in any of its xdist workers (store._fetch_once), and its sentences name the cache.
    """

    def __init__(self, spec: ImageSpec, key: str, timeout: float = 30.0, progress: Progress | None = None,
                 store: RootfsStore | None = None):
        assert spec.transport == "docker" and spec.registry and spec.name
        self.spec, self.key, self.timeout, self.progress, self.store = spec, key, timeout, progress, store
        self.base = base_url(spec.registry)
        self.host = urllib.parse.urlsplit(self.base).netloc
        self.display_host = spec.registry  # what `skopeo login` is given
        self._auth: str | None = None       # the Authorization header the registry accepted
        self._credentials: Credentials | None = None
        self._notes: list[str] = []
        self._looked_up = False
        self._sizes: dict[str, int] = {}
        self._context: ssl.SSLContext | None = None

    def close(self) -> None:
        pass  # one connection per request: nothing is held between them

    # -- what the store calls ------------------------------------------------------------------
    def image(self, ref: str | None) -> oci.Image:
        reference = self.spec.digest or self.spec.tag or "latest"
        url = f"{self.base}/v2/{self.spec.name}/manifests/{reference}"
        return self._once(url, lambda: self._image(reference), locked=True)

    def copy_blob(self, digest: str, dest: Path) -> None:
        url = f"{self.base}/v2/{self.spec.name}/blobs/{digest}"
        self._once(url, lambda: self._copy_blob(url, digest, dest), locked=False)

    # -- manifests -------------------------------------------------------------------------------
    def _image(self, reference: str) -> oci.Image:
        data, kind, digest = self._manifest(reference, None)
        if self.spec.digest is not None and digest != self.spec.digest:
            url = f"{self.base}/v2/{self.spec.name}/manifests/{reference}"
            raise self._failed(DigestMismatch(
                f"GET {url}: the registry served the manifest {digest} for {self.spec.digest}: tampered, or "
                "a broken registry"), url, fix="check the digest you pinned, or pull from another registry")
        top = digest
        what = f"{self.key}: the manifest {digest}"
        doc = oci.load(data, what)
        kind = oci.media_type(doc, kind)
        if kind in oci.INDEXES:
            chosen = oci.pick_platform(doc, what)
            data, kind, digest = self._manifest(chosen.digest, chosen)
            what = f"{self.key}: the manifest {digest} for this platform"
            doc = oci.load(data, what)
            kind = oci.media_type(doc, kind or chosen.media_type)
        if kind in _SCHEMA1 or doc.get("schemaVersion") == 1:
            raise RootfsError(f"{what} is a Docker schema 1 manifest, a format registries no longer accept "
                              "(deprecated since 2017, refused by Docker Hub since 2019); push the image "
                              "again with a current docker, podman or skopeo, which write schema 2 or OCI")
        if kind not in oci.MANIFESTS:
            raise RootfsError(f"{what} is a {kind or 'document of no known type'}, not an image manifest "
                              "(an artifact, a signature or a Helm chart rather than an image?)")
        config_entry, layers = oci.manifest_parts(doc, what)
        config_bytes = self._document_blob(config_entry)
        config = oci.image_config(oci.load(config_bytes, f"{what}: its config"), what)
        self._sizes = {layer.digest: layer.size for layer in layers}
        return oci.Image(top, config, layers)

    def _manifest(self, reference: str, expected: oci.Descriptor | None) -> tuple[bytes, str, str]:
        """The bytes of a manifest or index, its served media type and its digest, checked against
        Docker-Content-Digest, and against `expected` (an index's entry) when given."""
        url = f"{self.base}/v2/{self.spec.name}/manifests/{reference}"
        with self._get(url, accept=oci.ACCEPT) as response:
            data = self._read_document(response, f"the manifest {reference}")
            kind = (response.headers.get("Content-Type") or "").split(";")[0].strip()
            served = (response.headers.get("Docker-Content-Digest") or "").strip()
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if served.startswith("sha256:") and served != digest:
            raise self._failed(DigestMismatch(
                f"GET {url}: the registry says the manifest is {served}, but the bytes it sent hash to {digest}: "
                "damaged or tampered on the way"), url, fix="try again, or pull from another registry")
        if expected is not None and (digest != expected.digest or len(data) != expected.size):
            raise self._failed(DigestMismatch(
                f"GET {url}: the index lists {expected.digest} ({expected.size} bytes), but the registry sent "
                f"{digest} ({len(data)} bytes): damaged or tampered"), url,
                fix="try again, or pull from another registry")
        return data, kind, digest

    def _document_blob(self, entry: oci.Descriptor) -> bytes:
        url = f"{self.base}/v2/{self.spec.name}/blobs/{entry.digest}"
        if entry.size > oci.MAX_DOCUMENT:
            raise RootfsError(f"{self.key}: its config {entry.digest} is {entry.size} bytes, more than any "
                              f"image config needs ({oci.MAX_DOCUMENT})")
        with self._get(url) as response:
            data = self._read_document(response, f"the config {entry.digest}")
        if "sha256:" + hashlib.sha256(data).hexdigest() != entry.digest:
            raise self._failed(DigestMismatch(f"GET {url}: the config blob does not have the digest {entry.digest} its "
                                              "manifest lists: damaged or tampered"), url,
                               fix="try again, or pull from another registry")
        return data

    def _read_document(self, response: Response, what: str) -> bytes:
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > oci.MAX_DOCUMENT:
            raise RootfsError(f"{self.key}: {what} at {response.url} is {length} bytes, more than any image "
                              f"document needs ({oci.MAX_DOCUMENT}): not an image")
        chunks, done = [], 0
        while True:
            chunk = self._read(response, done, None)
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
            if done > oci.MAX_DOCUMENT:
                raise RootfsError(f"{self.key}: {what} at {response.url} is more than {oci.MAX_DOCUMENT} "
                                  "bytes, more than any image document needs: not an image")
        return b"".join(chunks)

    # -- blobs -------------------------------------------------------------------------------------
    def _copy_blob(self, url: str, digest: str, dest: Path) -> None:
        most = self._sizes.get(digest)
        label = f"{self.spec.name}@{digest[:19]}"
        hasher = hashlib.sha256()
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._get(url) as response, open(os.open(dest, flags, 0o600), "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else most
            done = 0
            if self.progress:
                self.progress(label, 0, total)
            while True:
                chunk = self._read(response, done, total)
                if not chunk:
                    break
                done += len(chunk)
                if most is not None and done > most:
                    raise self._failed(DigestMismatch(
                        f"GET {response.url}: the registry sent more than the {most} bytes the manifest gives the blob {digest}: "
                        "damaged or tampered; nothing of it was cached"), response.url,
                        fix="try again, or pull from another registry")
                out.write(chunk)
                hasher.update(chunk)
                if self.progress:
                    self.progress(label, done, total)
            if total is not None and done < total:
                raise self._failed(_network_error(f"GET {response.url}: the server closed the connection "
                                                  f"after {size(done)} of {size(total)}"), url)
            if self.progress and total is None:
                self.progress(label, done, done)
        got = "sha256:" + hasher.hexdigest()
        if got != digest:
            error = DigestMismatch(f"GET {response.url}: the registry sent a blob whose digest is {got}, not {digest}: "
                                   "damaged or tampered; nothing of it was cached")
            error.actual = got  # type: ignore[attr-defined]
            raise self._failed(error, response.url, fix="try again, or pull from another registry")

    # -- HTTP ----------------------------------------------------------------------------------------
    @contextmanager
    def _get(self, url: str, accept: str | None = None) -> Iterator[Response]:
        """GET `url` from the registry, authenticating as it asks and following redirects; any answer
        but 200 is a sentence."""
        response = self._request(url, accept, self._auth)
        try:
            if response.status == 401:
                challenge = parse_challenge(response.headers.get("WWW-Authenticate") or "")
                self._drain(response)
                self._auth = self._authenticate(url, challenge)
                response = self._request(url, accept, self._auth)
                if response.status == 401:
                    self._drain(response)
                    raise self._unauthorized(url, refused=True)
            if response.status != 200:
                raise self._status_error(response)
            yield response
        finally:
            response.body.close()

    def _request(self, url: str, accept: str | None, auth: str | None) -> Response:
        """One GET, following redirects; Authorization only ever goes to the registry's own host."""
        from .. import __version__
        for _ in range(_MAX_REDIRECTS + 1):
            check_scheme(url, f"{self.key}: a URL of the registry {self.display_host}")
            parts = urllib.parse.urlsplit(url)
            headers = {"User-Agent": f"pytest-nsbox/{__version__}"}
            if accept:
                headers["Accept"] = accept
            if auth and parts.netloc == self.host and parts.scheme == urllib.parse.urlsplit(self.base).scheme:
                headers["Authorization"] = auth
            body = self._send(url, parts, headers)
            if body.status in _REDIRECTS and body.getheader("Location"):
                location = urllib.parse.urljoin(url, body.getheader("Location") or "")
                body.read(oci.MAX_DOCUMENT)
                body.close()
                url = location
                continue
            return Response(url, body.status, body.headers, body)
        raise self._failed(RootfsError(f"GET {url}: more than {_MAX_REDIRECTS} redirects"), url)

    def _send(self, url: str, parts: urllib.parse.SplitResult, headers: dict[str, str]) -> http.client.HTTPResponse:
        host, port = parts.hostname or "", parts.port
        conn: http.client.HTTPConnection
        if parts.scheme == "https":
            if self._context is None:
                self._context = ssl.create_default_context()
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout, context=self._context)
        else:
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._failed(_connect_error(url, exc, self.timeout), url) from None
        try:
            conn.request("GET", path or "/", headers=headers)
            response = conn.getresponse()
        except (TimeoutError, socket.timeout):
            conn.close()
            raise self._failed(_network_error(f"GET {url}: the server accepted the connection, then sent "
                                              f"nothing for {self.timeout:g} s"), url) from None
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise self._failed(_network_error(f"GET {url}: the server closed the connection before "
                                              f"answering ({_reason(exc)})"), url) from None
        # One connection per request: the socket is handed to the response, and closes with it (as
        # http.client does for `Connection: close`), so that nothing is left open between requests.
        sock, conn.sock = conn.sock, None
        if sock is not None:
            sock.close()  # deferred by the socket until the response's file is closed
        return response

    def _read(self, response: Response, done: int, total: int | None) -> bytes:
        # read1: one recv at most, so the timeout bounds each wait for data (see download.py).
        try:
            return response.body.read1(_CHUNK)
        except (OSError, http.client.HTTPException) as exc:
            raise self._failed(_body_error(response.url, exc, done, total, self.timeout), response.url) from None

    def _drain(self, response: Response) -> None:
        try:
            response.body.read(oci.MAX_DOCUMENT)
        except (OSError, http.client.HTTPException):
            pass
        response.body.close()

    # -- authentication ----------------------------------------------------------------------------
    def _lookup(self) -> Credentials | None:
        if not self._looked_up:
            assert self.spec.registry and self.spec.name
            self._credentials, self._notes = find_credentials(self.spec.registry, self.spec.name)
            self._looked_up = True
        return self._credentials

    def _basic(self, credentials: Credentials) -> str:
        pair = f"{credentials.user}:{credentials.password}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")

    def _authenticate(self, url: str, challenge: Challenge | None) -> str:
        """The Authorization header that answers the registry's challenge."""
        credentials = self._lookup()
        if challenge is None:
            raise self._failed(RootfsError(f"GET {url}: the registry answered 401 without a Bearer or Basic "
                                           "challenge (WWW-Authenticate), so there is no way to log in to it"),
                               url, fix="check the registry's address")
        if challenge.scheme == "basic":
            if credentials is None:
                raise self._unauthorized(url, refused=False)
            return self._basic(credentials)
        return "Bearer " + self._token(url, challenge.params, credentials)

    def _token(self, url: str, params: dict[str, str], credentials: Credentials | None) -> str:
        """A token from the challenge's realm (the distribution spec's token authentication)."""
        realm = params.get("realm")
        if not realm:
            raise self._failed(RootfsError(f"GET {url}: the registry's Bearer challenge names no realm to ask "
                                           "for a token"), url, fix="check the registry's address")
        check_scheme(realm, f"{self.key}: the token service of {self.display_host}")
        query = {k: params[k] for k in ("service", "scope") if params.get(k)}
        query.setdefault("scope", f"repository:{self.spec.name}:pull")
        token_url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
        from .. import __version__
        headers = {"User-Agent": f"pytest-nsbox/{__version__}"}
        if credentials is not None:
            headers["Authorization"] = self._basic(credentials)
        parts = urllib.parse.urlsplit(token_url)
        for _ in range(_MAX_REDIRECTS + 1):
            body = self._send(token_url, parts, headers)
            if body.status in _REDIRECTS and body.getheader("Location"):
                body.close()
                new = urllib.parse.urljoin(token_url, body.getheader("Location") or "")
                check_scheme(new, f"{self.key}: the token service of {self.display_host}")
                if urllib.parse.urlsplit(new).netloc != parts.netloc:
                    headers.pop("Authorization", None)
                token_url, parts = new, urllib.parse.urlsplit(new)
                continue
            break
        response = Response(token_url, body.status, body.headers, body)
        try:
            if response.status in (401, 403):
                raise self._unauthorized(token_url, refused=credentials is not None)
            if response.status != 200:
                raise self._status_error(response)
            data = self._read_document(response, "the token")
        finally:
            body.close()
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        token = answer.get("token") or answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise self._failed(RootfsError(f"GET {token_url.split('?')[0]}: the token service answered "
                                           "without a token"), token_url, fix="check the registry's address")
        return token

    # -- sentences ---------------------------------------------------------------------------------
    def _unauthorized(self, url: str, refused: bool) -> RootfsError:
        login = _LOGIN.format(host=self.display_host)
        if refused and self._credentials is not None:
            what = (f"GET {url.split('?')[0]}: the registry refused the credentials of {self._credentials.user!r} "
                    f"for {self.display_host} (from {self._credentials.source})")
            fix = f"check them, or {login} again; or the image does not exist, or that user may not pull it"
        else:
            what = f"GET {url.split('?')[0]}: the registry {self.display_host} asks for credentials, and none were found"
            files = ", ".join(str(p) for p in credential_files())
            fix = (f"{login} (looked in {files}); or the image does not exist: registries such as Docker Hub "
                   "answer 401 for names they do not have")
        if self._notes:
            fix += "; note: " + "; ".join(self._notes)
        return self._failed(RootfsError(what), url, fix=fix)

    def _status_error(self, response: Response) -> RootfsError:
        status = response.status
        code, message = self._registry_error(response)
        said = f"HTTP {status}" + (f" {code}" if code else "") + (f" ({message})" if message else "")
        url = response.url.split("?")[0]
        reference = self.spec.digest or self.spec.tag
        if status in (404, 410):
            if code == "NAME_UNKNOWN":
                why = f"the registry {self.display_host} has no image named {self.spec.name}"
            elif "/manifests/" in url:
                why = f"{self.spec.name} has no tag or digest {reference} in {self.display_host}"
            else:
                why = "the registry lacks a blob its manifest lists"
            return self._failed(RemoteNotFound(f"GET {url}: {said}: {why}"), url,
                                fix="check the name and the tag (`skopeo list-tags docker://"
                                    f"{self.display_host}/{self.spec.name}` lists the tags)")
        if status == 403:
            return self._failed(RootfsError(f"GET {url}: {said}: the registry forbids pulling it"), url,
                                fix=f"check that you may pull it, or {_LOGIN.format(host=self.display_host)}")
        if status == 429:
            return self._failed(RootfsError(f"GET {url}: {said}: too many requests"), url,
                                fix=f"try again later, or {_LOGIN.format(host=self.display_host)} (Docker "
                                    "Hub limits anonymous pulls more than logged-in ones)")
        return self._failed(RootfsError(f"GET {url}: the registry answered {said}"), url,
                            fix="try again later, or pull from another registry")

    def _registry_error(self, response: Response) -> tuple[str, str]:
        """The distribution spec's error body: {"errors": [{"code", "message"}]}, if there is one."""
        try:
            data = json.loads(response.body.read(1 << 16))
            first = data["errors"][0]
            return str(first.get("code", ""))[:40], str(first.get("message", ""))[:200]
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError, AttributeError):
            return "", ""

    def _failed(self, exc: RootfsError, url: str, fix: str | None = None) -> RootfsError:
        """`exc` as the sentence a user reads: the image, what happened (naming the URL), the fix."""
        cache = f" in the cache {self.store.cache_dir}" if self.store is not None else ""
        if fix is None:
            if unreachable(exc):
                pull = f"`nsbox rootfs pull {self.key}" + (f" --cache-dir {self.store.cache_dir}`" if self.store else "`")
                fix = (f"without network, pull it where there is network ({pull}) and copy the cache, or save it "
                       "as an archive (docker-archive:FILE, oci-archive:FILE); with network, check the "
                       f"registry's address {self.display_host}")
            elif isinstance(exc, NetworkError):
                fix = (f"check the registry's address {self.display_host} (is it running?), try again later, "
                       "or pull from another registry")
            else:
                fix = "the registry was reached but failed: try again later, or pull from another registry"
        note = self.store._once_note() if self.store is not None else ""
        error = type(exc)(f"image {self.key} is not{cache} and cannot be pulled: {exc}; {fix}{note}")
        error.unreachable = unreachable(exc)  # type: ignore[attr-defined]
        if getattr(exc, "actual", None):
            error.actual = exc.actual  # type: ignore[attr-defined]
        return error

    def _once(self, url: str, fetch: Callable[[], _T], locked: bool) -> _T:
        """`fetch()`, tried once per pytest run across xdist workers where the store knows the run."""
        if self.store is None:
            return fetch()
        return self.store._fetch_once(url, fetch, locked=locked)
