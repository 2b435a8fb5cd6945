"""Rootfs specs: the strings users write in --nsbox-rootfs, ini files, markers and Sandbox(rootfs=).

    alpine                         the Alpine release this plugin pins (see alpine-releases.json)
    alpine:3.20                    the newest release of that branch (resolved once, then cached)
    alpine:3.20.3                  that exact release
    alpine:3.20.3@sha256:HEX       that release, with a digest the caller pins
    https://host/x.tar.gz#sha256=HEX   any tarball, pinned by its digest
    /path/to/tree | /path/to/x.tar.gz  a local directory or tarball
    host                           the host's own filesystem, read-only, with a private /tmp
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Union

from .archive import ARCHIVE_SUFFIXES
from .errors import ConfigError

FORMS = ("alpine", "alpine:X.Y", "alpine:X.Y.Z", "alpine:X.Y.Z@sha256:HEX", "https://URL#sha256=HEX",
         "a local directory", f"a local tarball ({', '.join(ARCHIVE_SUFFIXES)})", "host")

_ALPINE = re.compile(r"^alpine(?::(?P<version>\d+\.\d+(?:\.\d+)?))?(?:@sha256:(?P<digest>[0-9a-f]{64}))?$")
_URL = re.compile(r"^(?P<url>https?://[^#\s]+)#sha256=(?P<digest>[0-9a-f]{64})$")


@dataclass(frozen=True)
class AlpineSpec:
    branch: str | None = None   # "3.20"
    version: str | None = None  # "3.20.3"
    digest: str | None = None   # caller-pinned sha256

    def __str__(self) -> str:
        text = "alpine" + (f":{self.version or self.branch}" if self.version or self.branch else "")
        return text + (f"@sha256:{self.digest}" if self.digest else "")


@dataclass(frozen=True)
class UrlSpec:
    url: str
    digest: str

    def __str__(self) -> str:
        return f"{self.url}#sha256={self.digest}"


@dataclass(frozen=True)
class PathSpec:
    path: Path
    is_dir: bool

    def __str__(self) -> str:
        return str(self.path)


@dataclass(frozen=True)
class HostSpec:
    def __str__(self) -> str:
        return "host"


RootfsSpec = Union[AlpineSpec, UrlSpec, PathSpec, HostSpec]


def parse(spec: str | os.PathLike[str]) -> RootfsSpec:
    """Parse a spec; a bad one is a ConfigError that lists the forms that exist."""
    if isinstance(spec, os.PathLike):
        return _path_spec(os.fspath(spec))
    if not isinstance(spec, str) or not spec.strip():
        raise _bad(spec, "it is empty")
    text = spec.strip()
    if text == "host":
        return HostSpec()
    match = _ALPINE.match(text)
    if match:
        version, digest = match["version"], match["digest"]
        if digest and (version is None or version.count(".") != 2):
            raise _bad(spec, "a digest pins one exact release: alpine:X.Y.Z@sha256:HEX")
        if version and version.count(".") == 1:
            return AlpineSpec(branch=version)
        return AlpineSpec(version=version, branch=version.rsplit(".", 1)[0] if version else None,
                          digest=digest)
    if text.startswith("alpine"):
        raise _bad(spec, "Alpine versions are written alpine:3.20 or alpine:3.20.3")
    if re.match(r"^[a-z]+://", text):
        match = _URL.match(text)
        if not match:
            raise _bad(spec, "a URL must be http(s) and end with #sha256=<64 hex digits>")
        return UrlSpec(match["url"], match["digest"])
    return _path_spec(text)


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
    raise _bad(text, f"it is neither a directory nor a tarball that exists (looked at {path})")


def _bad(spec: object, why: str) -> ConfigError:
    return ConfigError(f"bad rootfs {spec!r}: {why}; the forms are: {', '.join(FORMS)}")
