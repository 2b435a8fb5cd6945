"""Rootfs specs: the strings users write in --nsbox-rootfs, ini files, markers and Sandbox(rootfs=).

    alpine                         the Alpine release this plugin pins (see alpine-releases.json)
    alpine:3.20                    the newest release of that branch (resolved once, then cached)
    alpine:3.20.3                  that exact release
    alpine:3.20.3@sha256:HEX       that release, with a digest the caller pins
    https://host/x.tar.gz#sha256=HEX   any tarball, pinned by its digest
    /path/to/tree | /path/to/x.tar.gz  a local directory or tarball
    host                           the host's own filesystem, read-only, with a private /tmp
    docker://[REGISTRY/]NAME[:TAG][@sha256:HEX]   an image in a registry (Docker Hub by default)
    oci:DIR[:REF]                  an image in an OCI image layout (REF: a tag in its index)
    oci-archive:FILE[:REF]         the same, as a tarball
    docker-archive:FILE[:REF]      what `docker save` writes (REF: one of its repo tags)
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple, Union

from ..errors import ConfigError
from .archive import ARCHIVE_SUFFIXES

FORMS = ("alpine", "alpine:X.Y", "alpine:X.Y.Z", "alpine:X.Y.Z@sha256:HEX", "https://URL#sha256=HEX",
         "a local directory", f"a local tarball ({', '.join(ARCHIVE_SUFFIXES)})", "host",
         "docker://[REGISTRY/]NAME[:TAG][@sha256:HEX]", "oci:DIR[:REF]", "oci-archive:FILE[:REF]",
         "docker-archive:FILE[:REF]")
#: The image transports of a spec, named as skopeo and podman name them; `path` forms first.
PATH_TRANSPORTS = ("oci-archive", "docker-archive", "oci")
DOCKER_HUB = "docker.io"  # as references name it; its API is at registry-1.docker.io
_NAME_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

_VERSION = re.compile(r"\d+\.\d+(?:\.\d+)?")
_HEX = re.compile(r"[0-9a-fA-F]{64}")


# NamedTuples, not dataclasses: the plugin checks --nsbox-rootfs at start-up, and defining four
# dataclasses cost every pytest run more than the rest of this module.
class AlpineSpec(NamedTuple):
    branch: str | None = None   # "3.20"
    version: str | None = None  # "3.20.3"
    digest: str | None = None   # caller-pinned sha256

    def __str__(self) -> str:
        text = "alpine" + (f":{self.version or self.branch}" if self.version or self.branch else "")
        return text + (f"@sha256:{self.digest}" if self.digest else "")


class UrlSpec(NamedTuple):
    url: str
    digest: str

    def __str__(self) -> str:
        return f"{self.url}#sha256={self.digest}"


class PathSpec(NamedTuple):
    path: Path
    is_dir: bool

    def __str__(self) -> str:
        return str(self.path)


class HostSpec(NamedTuple):
    def __str__(self) -> str:
        return "host"


class ImageSpec(NamedTuple):
    """An OCI/Docker image: in a registry (`transport` "docker": `registry`, `name`, `tag`,
    `digest`) or in a local layout or archive (`path`, and `tag` picks one of several)."""

    transport: str
    registry: str | None = None   # "docker.io", "127.0.0.1:5000"
    name: str | None = None       # "library/redis"
    tag: str | None = None
    digest: str | None = None     # "sha256:HEX"
    path: Path | None = None

    def __str__(self) -> str:
        if self.transport == "docker":
            text = f"docker://{self.registry}/{self.name}"
            text += f":{self.tag}" if self.tag else ""
            return text + (f"@{self.digest}" if self.digest else "")
        return f"{self.transport}:{self.path}" + (f":{self.tag}" if self.tag else "")


RootfsSpec = Union[AlpineSpec, UrlSpec, PathSpec, HostSpec, ImageSpec]


def parse(spec: str | os.PathLike[str], kind: str = "rootfs") -> RootfsSpec:
    """Parse a spec; a bad one is a ConfigError that says what is wrong and lists the forms, and
    calls it a `kind` ("rootfs", or "layer" for a tree laid over one).

    `alpine`, `alpine:...`, `alpine@...` and `host` are keywords even where a file of that name
    exists (write `./alpine` for that); any other spec that names an existing path is that path,
    whatever its name (`alpine-minirootfs-3.20.3-x86_64.tar.gz`).
    """
    try:
        return _parse(spec)
    except _BadSpec as exc:
        raise ConfigError(f"bad {kind} {exc.spec!r}: {exc.why}; the forms are: {', '.join(FORMS)}") from None


def _parse(spec: str | os.PathLike[str]) -> RootfsSpec:
    if isinstance(spec, os.PathLike):
        return _path_spec(os.fspath(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(spec, "it is empty")
    text = spec.strip()
    if text == "host":
        return HostSpec()
    if text == "alpine" or text.startswith(("alpine:", "alpine@")):
        return _alpine_spec(spec, text)
    if text.startswith("docker://"):
        return _docker_spec(spec, text[len("docker://"):])
    transport = next((t for t in PATH_TRANSPORTS if text.startswith(t + ":")), None)
    if transport is not None:
        return _local_image_spec(spec, transport, text[len(transport) + 1:])
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text):
        return _url_spec(spec, text)
    return _path_spec(text)


def _alpine_spec(spec: str, text: str) -> AlpineSpec:
    rest, _, pin = text[len("alpine"):].partition("@")
    version = rest[1:] if rest else None
    if version is not None and not _VERSION.fullmatch(version):
        raise _bad(spec, f"Alpine versions are written alpine:3.20 or alpine:3.20.3, not {version!r}")
    digest = None
    if pin:
        if not pin.startswith("sha256:"):
            raise _bad(spec, "a digest is written @sha256:<64 hex digits>")
        digest = _digest(spec, pin[len("sha256:"):])
    if digest and (version is None or version.count(".") != 2):
        raise _bad(spec, "a digest pins one exact release: alpine:X.Y.Z@sha256:HEX")
    if version and version.count(".") == 1:
        return AlpineSpec(branch=version)
    return AlpineSpec(version=version, branch=version.rsplit(".", 1)[0] if version else None, digest=digest)


def _url_spec(spec: str, text: str) -> UrlSpec:
    if not text.startswith(("http://", "https://")):
        raise _bad(spec, "a URL must be http:// or https://")
    url, hash_sign, fragment = text.partition("#")
    if not hash_sign or not fragment.startswith("sha256=") or " " in url:
        raise _bad(spec, "a URL must end with #sha256=<64 hex digits>, the digest of the file")
    return UrlSpec(url, _digest(spec, fragment[len("sha256="):]))


def _docker_spec(spec: str, text: str) -> ImageSpec:
    """docker://[REGISTRY/]NAME[:TAG][@sha256:HEX], as the distribution spec's references are
    written: the first component is a registry when it has a '.' or a ':' or is `localhost`;
    Docker Hub's one-component names are `library/NAME`; no tag and no digest is `latest`."""
    rest, at, pin = text.partition("@")
    digest = None
    if at:
        if not pin.startswith("sha256:"):
            raise _bad(spec, "an image digest is written @sha256:<64 hex digits>")
        digest = "sha256:" + _digest(spec, pin[len("sha256:"):])
    first, slash, remainder = rest.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, path = first, remainder
    else:
        registry, path = DOCKER_HUB, rest
    name, tag = path, None
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = path.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise _bad(spec, f"{tag!r} is not a tag (letters, digits, '_', '.', '-'; at most 128)")
    if not name or not all(_NAME_COMPONENT.fullmatch(c) for c in name.split("/")):
        raise _bad(spec, f"{name!r} is not an image name (lower-case components separated by '/', "
                         "such as library/redis or myorg/app)")
    if registry == DOCKER_HUB and "/" not in name:
        name = f"library/{name}"
    if tag is None and digest is None:
        tag = "latest"
    return ImageSpec("docker", registry=registry, name=name, tag=tag, digest=digest)


def _local_image_spec(spec: str, transport: str, text: str) -> ImageSpec:
    """oci:DIR[:REF], oci-archive:FILE[:REF], docker-archive:FILE[:REF]: the path is the longest
    prefix that exists, so that a path may hold ':' (as in skopeo)."""
    if not text:
        raise _bad(spec, f"{transport}: needs a path: {transport}:PATH[:REF]")
    path, ref = text, None
    if not os.path.exists(os.path.expanduser(path)):
        # The longest prefix before a ':' that exists is the path; the rest is the reference.
        cuts = [i for i, c in enumerate(text) if c == ":"]
        found = [i for i in cuts if os.path.exists(os.path.expanduser(text[:i]))]
        if found or cuts:
            cut = found[-1] if found else cuts[-1]
            path, ref = text[:cut], text[cut + 1:]
    where = Path(os.path.abspath(os.path.expanduser(path)))
    want_dir = transport == "oci"
    if not (where.is_dir() if want_dir else where.is_file()):
        kind = "OCI image layout directory (with index.json)" if want_dir else "file"
        raise _bad(spec, f"there is no {kind} at {where}")
    return ImageSpec(transport, tag=ref or None, path=where)


def _digest(spec: str, text: str) -> str:
    """A SHA-256 in hex, either case (sha256sum writes lower, some tools upper); stored lower."""
    if _HEX.fullmatch(text):
        return text.lower()
    wrong = sorted(set(text) - set("0123456789abcdefABCDEF"))
    if wrong:
        raise _bad(spec, f"a SHA-256 digest is 64 hex digits (0-9, a-f), this one has {''.join(wrong)!r}")
    raise _bad(spec, f"a SHA-256 digest is 64 hex digits, this one has {len(text)}")


def _path_spec(text: str) -> PathSpec:
    path = Path(os.path.abspath(os.path.expanduser(text)))
    if path.is_dir():
        return PathSpec(path, is_dir=True)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        if not path.is_file():
            raise _bad(text, f"there is no file {path}")
        return PathSpec(path, is_dir=False)
    if path.exists():
        raise _bad(text, f"{path} is neither a directory nor a tarball")
    if text.startswith("alpine"):
        raise _bad(text, f"Alpine versions are written alpine:3.20 or alpine:3.20.3, and there is no file "
                         f"or directory {path}")
    raise _bad(text, f"it is neither a directory nor a tarball that exists (looked at {path})")


class _BadSpec(ConfigError):
    """A spec that does not parse; `parse` names it as the rootfs or layer it was meant to be."""

    def __init__(self, spec: object, why: str):
        super().__init__(f"bad rootfs {spec!r}: {why}; the forms are: {', '.join(FORMS)}")
        self.spec, self.why = spec, why


def _bad(spec: object, why: str) -> ConfigError:
    return _BadSpec(spec, why)
