"""What pytest-nsbox knows of Alpine's mirrors: architectures, URLs, pinned digests, release lists."""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from .errors import RootfsError

DEFAULT_MIRROR = "https://dl-cdn.alpinelinux.org/alpine"

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
    machine = machine or platform.machine()
    try:
        return _ARCHES[machine]
    except KeyError:
        raise RootfsError(f"Alpine publishes no minirootfs for this machine ({machine}); "
                          "use a local rootfs tarball or directory instead") from None


def mirror_url(explicit: str | None = None) -> str:
    return (explicit or os.environ.get("NSBOX_ALPINE_MIRROR") or DEFAULT_MIRROR).rstrip("/")


def file_name(version: str, arch: str) -> str:
    return f"alpine-minirootfs-{version}-{arch}.tar.gz"


def release_dir(mirror: str, branch: str, arch: str) -> str:
    return f"{mirror}/v{branch}/releases/{arch}"


def tarball_url(mirror: str, version: str, arch: str) -> str:
    branch = version.rsplit(".", 1)[0]
    return f"{release_dir(mirror, branch, arch)}/{file_name(version, arch)}"


@dataclass(frozen=True)
class Pins:
    default: str
    digests: dict[tuple[str, str], str]

    def digest(self, version: str, arch: str) -> str | None:
        return self.digests.get((version, arch))


def pins() -> Pins:
    data = json.loads((Path(__file__).with_name("alpine-releases.json")).read_text())
    digests = {(version, arch): entry["sha256"]
               for version, arches in data["releases"].items() for arch, entry in arches.items()}
    return Pins(default=data["default"], digests=digests)


@dataclass(frozen=True)
class Release:
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
