"""Images the tests build themselves: OCI image layouts (and `docker save` archives) written from
the Alpine minirootfs plus layers made here — whiteouts, opaque directories, hard links, several
owners — as skopeo and docker write them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import NamedTuple

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


class Entry(NamedTuple):
    """One member of a layer: a file (data), a directory, a symlink, a hard link, a whiteout."""

    name: str
    data: bytes | None = None
    kind: str = "file"  # file | dir | symlink | link
    target: str = ""
    mode: int = 0o644
    uid: int = 0
    xattrs: tuple[tuple[str, bytes], ...] = ()  # as GNU tar and Docker write them: SCHILY.xattr.NAME


def layer_tar(entries: list[Entry]) -> bytes:
    """An uncompressed layer tarball of `entries`, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.mode, info.uid, info.gid, info.mtime = entry.mode, entry.uid, entry.uid, 1_700_000_000
            info.pax_headers = {f"SCHILY.xattr.{name}": value.decode("utf-8", "surrogateescape")
                                for name, value in entry.xattrs}
            data = None
            if entry.kind == "dir":
                info.type, info.mode = tarfile.DIRTYPE, entry.mode if entry.mode != 0o644 else 0o755
            elif entry.kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, entry.target
            elif entry.kind == "link":
                info.type, info.linkname = tarfile.LNKTYPE, entry.target
            else:
                data = entry.data or b""
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return out.getvalue()


def _blob(root: Path, data: bytes) -> tuple[str, int]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest.split(":")[1]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest, len(data)


def config_json(layers: list[bytes], env=("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",),
                cmd=("/bin/sh",), entrypoint=None, workdir="", user="", ports=()) -> bytes:
    config = {"Env": list(env), "Cmd": list(cmd) if cmd else None, "WorkingDir": workdir, "User": user}
    if entrypoint:
        config["Entrypoint"] = list(entrypoint)
    if ports:
        config["ExposedPorts"] = {f"{p}/tcp": {} for p in ports}
    return json.dumps({
        "architecture": {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine),
        "os": "linux", "config": config,
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + hashlib.sha256(t).hexdigest() for t in layers]},
    }).encode()


def oci_layout(root: Path, layers: list[bytes], tag: str = "latest", **config) -> str:
    """Write (or add to) an OCI image layout at `root`: gzip layers, a config, a manifest tagged
    `tag` in index.json. Returns the manifest digest."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    described = []
    for tar in layers:
        digest, size = _blob(root, gzip.compress(tar, mtime=0))
        described.append({"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": size})
    config_digest, config_size = _blob(root, config_json(layers, **config))
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": config_size},
                           "layers": described}).encode()
    digest, size = _blob(root, manifest)
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"schemaVersion": 2, "manifests": []}
    index["manifests"] = [m for m in index["manifests"]
                          if m.get("annotations", {}).get("org.opencontainers.image.ref.name") != tag]
    index["manifests"].append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                               "annotations": {"org.opencontainers.image.ref.name": tag}})
    index_path.write_text(json.dumps(index))
    return digest


def docker_archive(path: Path, layers: list[bytes], tag: str = "test/image:latest", **config) -> None:
    """What `docker save` writes (the classic form): manifest.json, <id>.json, <id>/layer.tar."""
    config_bytes = config_json(layers, **config)
    config_name = hashlib.sha256(config_bytes).hexdigest() + ".json"
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        names = []
        for number, layer in enumerate(layers):
            name = f"{hashlib.sha256(layer).hexdigest()}/layer.tar"
            add(name, layer)
            names.append(name)
        add(config_name, config_bytes)
        add("manifest.json", json.dumps([{"Config": config_name, "RepoTags": [tag], "Layers": names}]).encode())


def alpine_layer(alpine_tarball: Path) -> bytes:
    """The Alpine minirootfs as a layer: its tarball, decompressed."""
    return gzip.decompress(alpine_tarball.read_bytes())


def app_layers() -> list[bytes]:
    """Two layers over Alpine: the first adds files (a hard link, an owner other than root, a
    directory with content), the second deletes one (whiteout) and replaces a directory (opaque)."""
    first = layer_tar([
        Entry("srv", kind="dir"),
        Entry("srv/old", kind="dir"),
        Entry("srv/old/a", b"old a\n"),
        Entry("srv/old/b", b"old b\n"),
        Entry("srv/keep", b"kept\n"),
        Entry("srv/gone", b"to be deleted\n"),
        Entry("srv/linked", kind="link", target="srv/keep"),
        Entry("srv/owned", b"owned by 70\n", uid=70),
        Entry("usr/local/bin/hello", b"#!/bin/sh\necho hello from the image \"$@\"\n", mode=0o755),
    ])
    second = layer_tar([
        Entry("srv/.wh.gone", b""),
        Entry("srv/old", kind="dir"),
        Entry("srv/old/.wh..wh..opq", b""),
        Entry("srv/old/new", b"new\n"),
        Entry("etc/.wh.motd", b""),
    ])
    return [first, second]
