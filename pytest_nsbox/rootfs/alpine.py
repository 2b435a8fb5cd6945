"""What pytest-nsbox knows of Alpine's mirrors: architectures, URLs, pinned digests, release lists."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import NamedTuple

from ..errors import ConfigError, RootfsError

DEFAULT_MIRROR = "https://dl-cdn.alpinelinux.org/alpine"
#: Every way to choose the mirror, for the sentences that advise another one.
MIRROR_OPTIONS = ("--nsbox-alpine-mirror=URL (ini nsbox_alpine_mirror, env NSBOX_ALPINE_MIRROR, "
                  "or `nsbox rootfs --mirror URL`)")
ANOTHER_MIRROR = f"use another mirror: {MIRROR_OPTIONS}"

# `uname -m` to Alpine's architecture names.
_ARCHES = {
    "x86_64": "x86_64", "amd64": "x86_64",
    "aarch64": "aarch64", "arm64": "aarch64",
    "armv7l": "armv7", "armv8l": "armv7",
    "armv6l": "armhf",
    "i386": "x86", "i486": "x86", "i586": "x86", "i686": "x86",
    "ppc64le": "ppc64le", "s390x": "s390x", "riscv64": "riscv64", "loongarch64": "loongarch64",
}


def machine_arch(machine: str | None = None) -> str:
    if not machine:
        import platform
        machine = platform.machine()
    try:
        return _ARCHES[machine]
    except KeyError:
        raise RootfsError(f"Alpine publishes no minirootfs for this machine ({machine}); "
                          "use a local rootfs tarball or directory instead") from None


_URL = re.compile(r"https?://[^/\s?#]+(/[^\s?#]*)?")


def mirror_url(explicit: str | None = None) -> str:
    """The mirror to use: `explicit` (an option), else NSBOX_ALPINE_MIRROR, else Alpine's CDN."""
    env = os.environ.get("NSBOX_ALPINE_MIRROR")
    url = explicit or env or DEFAULT_MIRROR
    if not _URL.fullmatch(url):
        named = f"the Alpine mirror {url!r}" if explicit else f"NSBOX_ALPINE_MIRROR={url!r}"
        raise ConfigError(f"{named} is not an http(s) URL (--nsbox-alpine-mirror, nsbox_alpine_mirror, "
                          f"NSBOX_ALPINE_MIRROR, or `nsbox rootfs --mirror`); write it like {DEFAULT_MIRROR}")
    return url.rstrip("/")


def file_name(version: str, arch: str) -> str:
    return f"alpine-minirootfs-{version}-{arch}.tar.gz"


def release_dir(mirror: str, branch: str, arch: str) -> str:
    return f"{mirror}/v{branch}/releases/{arch}"


def tarball_url(mirror: str, version: str, arch: str) -> str:
    branch = version.rsplit(".", 1)[0]
    return f"{release_dir(mirror, branch, arch)}/{file_name(version, arch)}"


class Pins(NamedTuple):
    default: str
    digests: dict[tuple[str, str], str]

    def digest(self, version: str, arch: str) -> str | None:
        return self.digests.get((version, arch))

    def versions(self, arch: str) -> list[str]:
        return sorted((v for v, a in self.digests if a == arch), key=version_key)


def version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def pins() -> Pins:
    import json
    data = json.loads((Path(__file__).with_name("alpine-releases.json")).read_text())
    digests = {(version, arch): entry["sha256"]
               for version, arches in data["releases"].items() for arch, entry in arches.items()}
    return Pins(default=data["default"], digests=digests)


class Release(NamedTuple):
    version: str
    sha256: str | None


def latest_minirootfs(yaml_text: str, arch: str) -> Release:
    """The minirootfs entry of a branch's latest-releases.yaml.

    The file is a flat list of mappings of scalars, so a few lines read it without a YAML library.
    """
    entries: list[dict[str, str]] = []
    for raw in yaml_text.splitlines():
        line = raw.rstrip()
        if line.startswith("-"):
            entries.append({})
            line = " " + line[1:]
        if entries and line.startswith("  ") and not line.startswith("   ") and ":" in line:
            key, _, value = line.strip().partition(":")
            entries[-1][key.strip()] = value.strip().strip('"')
    for entry in entries:
        if entry.get("flavor") == "alpine-minirootfs" and entry.get("arch", arch) == arch:
            if "version" in entry:
                return Release(entry["version"], entry.get("sha256"))
    raise RootfsError(f"latest-releases.yaml lists no alpine-minirootfs for {arch}")


def parse_checksum_file(text: str, name: str) -> str | None:
    """The digest for `name` in a `HEX  name` checksum file (Alpine's .sha256)."""
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[-1].lstrip("*") == name:
            return parts[0].lower()
        if len(parts) == 1 and len(parts[0]) == 64:
            return parts[0].lower()
    return None


def listed_versions(listing: str, arch: str) -> list[str]:
    """The minirootfs releases a mirror's directory listing (an HTML index) links to."""
    found = re.findall(rf'href="alpine-minirootfs-(\d+\.\d+\.\d+)-{re.escape(arch)}\.tar\.gz"', listing)
    return sorted(set(found), key=version_key)


def listed_branches(listing: str) -> list[str]:
    """The release branches (v3.20/...) a mirror's top directory listing links to."""
    return sorted(set(re.findall(r'href="v(\d+\.\d+)/"', listing)), key=version_key)
