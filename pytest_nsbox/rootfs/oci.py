"""OCI and Docker image formats: indexes, manifests, configs, and the local forms images come in
(an OCI image layout, `oci-archive:`, `docker-archive:`).

Everything here reads documents someone else wrote: each JSON document is bounded in size and
checked for the fields we use, every digest is a `sha256:` of 64 hex digits (the only algorithm
we verify), and local layouts and archives are read by name under their own root, never through
a link.  Blobs are handed out as files to verify and extract (rootfs/images.py does both).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from ..errors import RootfsError

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEXES = (OCI_INDEX, DOCKER_LIST)
MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
#: What a registry is asked for, best first (the distribution spec's content negotiation).
ACCEPT = ", ".join((OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST))
#: A manifest, an index or a config is small; anything bigger is no document of ours.
MAX_DOCUMENT = 4 << 20
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
#: Docker builds at most 125 layers; overlayfs stacks at most 500 lower directories, and one
#: mount's options (a page) hold ~200: more is no image, only work done before the mount fails.
MAX_LAYERS = 128
#: The most headers (names, pax records) an image archive's members may take together: a few
#: dozen members with short names, not the memory a pax or GNU long-name bomb would take.
MAX_ARCHIVE_HEADERS = 16 << 20
#: Layer media types and how their bytes are compressed (archive.py reads gzip, xz and bzip2).
_LAYERS = {
    "application/vnd.oci.image.layer.v1.tar": "tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "tar",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "tar",
}
_ZSTD = ("application/vnd.oci.image.layer.v1.tar+zstd",
         "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd")


class Descriptor(NamedTuple):
    """A content descriptor: what a manifest says of a blob (or an index of a manifest)."""

    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    ref: str | None = None  # an index's org.opencontainers.image.ref.name


class ImageConfig(NamedTuple):
    """The parts of an image's config a sandbox honours."""

    env: tuple[tuple[str, str], ...] = ()
    working_dir: str = ""
    user: str = ""
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    exposed_ports: tuple[int, ...] = ()

    @property
    def command(self) -> list[str]:
        """What `docker run IMAGE` runs: the entrypoint with the cmd as its arguments."""
        return [*self.entrypoint, *self.cmd]

    def to_json(self) -> dict:
        return {"env": [list(pair) for pair in self.env], "working_dir": self.working_dir, "user": self.user,
                "entrypoint": list(self.entrypoint), "cmd": list(self.cmd),
                "exposed_ports": list(self.exposed_ports)}

    @classmethod
    def from_json(cls, data: dict) -> ImageConfig:
        return cls(tuple((str(k), str(v)) for k, v in data.get("env", ())), str(data.get("working_dir", "")),
                   str(data.get("user", "")), tuple(map(str, data.get("entrypoint", ()))),
                   tuple(map(str, data.get("cmd", ()))), tuple(int(p) for p in data.get("exposed_ports", ())))


class Image(NamedTuple):
    """A resolved image: its identity (the manifest's digest, or for `docker save` output the
    config's), its config, and its layers bottom first."""

    digest: str
    config: ImageConfig
    layers: tuple[Descriptor, ...]

    def to_json(self) -> dict:
        return {"digest": self.digest, "config": self.config.to_json(),
                "layers": [[layer.media_type, layer.digest, layer.size] for layer in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> Image:
        return cls(str(data["digest"]), ImageConfig.from_json(data["config"]),
                   tuple(Descriptor(str(m), check_digest(str(d), "a recorded layer"), int(n))
                         for m, d, n in data["layers"]))


def check_digest(text: object, what: str) -> str:
    if not isinstance(text, str) or not _DIGEST.fullmatch(text):
        if isinstance(text, str) and ":" in text and not text.startswith("sha256:"):
            raise RootfsError(f"{what} has the digest {text[:80]!r}: only sha256 digests are verified here")
        raise RootfsError(f"{what} has no valid digest ({str(text)[:80]!r}); a digest is sha256:<64 hex digits>")
    return text


def load(data: bytes, what: str) -> dict:
    """A JSON object from `data`, or a RootfsError naming `what` it should have been."""
    if len(data) > MAX_DOCUMENT:
        raise RootfsError(f"{what} is {len(data)} bytes, more than any image document needs ({MAX_DOCUMENT})")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise RootfsError(f"{what} is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise RootfsError(f"{what} is not a JSON object")
    return doc


def descriptor(entry: object, what: str) -> Descriptor:
    if not isinstance(entry, dict):
        raise RootfsError(f"{what} lists a descriptor that is not an object")
    size = entry.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise RootfsError(f"{what} lists a descriptor without a size")
    annotations = entry.get("annotations") if isinstance(entry.get("annotations"), dict) else {}
    return Descriptor(str(entry.get("mediaType", "")), check_digest(entry.get("digest"), what), size,
                      entry.get("platform") if isinstance(entry.get("platform"), dict) else None,
                      annotations.get("org.opencontainers.image.ref.name"))


def media_type(doc: dict, declared: str = "") -> str:
    """What a document is: its own mediaType, else what it was served or listed as, else its shape."""
    kind = doc.get("mediaType") or declared
    if not kind:
        kind = OCI_INDEX if "manifests" in doc else OCI_MANIFEST if "layers" in doc else ""
    return str(kind)


# -- platforms ------------------------------------------------------------------------------
_ARCHES = {"x86_64": ("amd64", None), "amd64": ("amd64", None), "aarch64": ("arm64", "v8"),
           "arm64": ("arm64", "v8"), "armv7l": ("arm", "v7"), "armv6l": ("arm", "v6"), "i686": ("386", None),
           "i386": ("386", None), "ppc64le": ("ppc64le", None), "s390x": ("s390x", None),
           "riscv64": ("riscv64", None)}


def host_platform() -> tuple[str, str | None]:
    """This machine as images name platforms: ("amd64", None), ("arm64", "v8")..."""
    machine = os.uname().machine
    return _ARCHES.get(machine, (machine, None))


def pick_platform(index: dict, what: str) -> Descriptor:
    """The manifest of an index that runs here (linux, this architecture), as docker pull picks it."""
    arch, variant = host_platform()
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise RootfsError(f"{what} is an index without a manifests list")
    listed = [descriptor(entry, what) for entry in entries]
    fits = [d for d in listed if d.platform and d.platform.get("os") == "linux"
            and d.platform.get("architecture") == arch]
    exact = [d for d in fits if variant is None or d.platform.get("variant") in (None, variant)]  # type: ignore[union-attr]
    if exact or fits:
        return (exact or fits)[0]
    unmarked = [d for d in listed if d.platform is None and d.media_type in MANIFESTS]
    if len(unmarked) == 1:
        return unmarked[0]
    offered = sorted({f"{d.platform.get('os')}/{d.platform.get('architecture')}" for d in listed if d.platform})
    raise RootfsError(f"{what} has no image for linux/{arch}; it offers {', '.join(offered) or 'none marked'}")


def manifest_parts(manifest: dict, what: str) -> tuple[Descriptor, tuple[Descriptor, ...]]:
    """A manifest's config and layers (bottom first), every layer of a kind we can extract."""
    config = descriptor(manifest.get("config"), what)
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        raise RootfsError(f"{what} lists no layers")
    if len(layers) > MAX_LAYERS:
        raise RootfsError(f"{what} lists {len(layers)} layers, more than any image has ({MAX_LAYERS}; "
                          "overlayfs stacks no more); squash the image")
    found = tuple(descriptor(layer, what) for layer in layers)
    for layer in found:
        layer_compression(layer.media_type, what)
    return config, found


def layer_compression(kind: str, what: str) -> str:
    if kind in _LAYERS:
        return _LAYERS[kind]
    if kind in _ZSTD:
        raise RootfsError(f"{what} has a zstd-compressed layer, which Python's standard library cannot "
                          "read before 3.14; pull a gzip variant of the image (e.g. `skopeo copy "
                          "--dest-compress-format gzip`) or use its docker-archive")
    raise RootfsError(f"{what} has a layer of media type {kind!r}, which is no filesystem layer "
                      "(an artifact rather than an image?)")


def image_config(data: dict, what: str) -> ImageConfig:
    """The parts of the config JSON a sandbox honours (image-spec's config.config)."""
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise RootfsError(f"{what} has a config that is not an object")
    env = []
    for item in config.get("Env") or ():
        name, eq, value = str(item).partition("=")
        if "\0" in name or "\0" in value:
            raise RootfsError(f"{what} has a config whose Env entry {str(item)[:80]!r} holds a NUL byte, "
                              "which no process's environment can; the image is broken")
        if eq and name:
            env.append((name, value))
    ports = []
    for port in config.get("ExposedPorts") or {}:
        number, _, proto = str(port).partition("/")
        if number.isdigit() and proto in ("", "tcp") and 0 < int(number) < 65536:
            ports.append(int(number))

    def words(key: str) -> tuple[str, ...]:
        value = config.get(key)
        if isinstance(value, str):
            return ("/bin/sh", "-c", value)
        return tuple(str(v) for v in value) if isinstance(value, list) else ()

    return ImageConfig(tuple(env), str(config.get("WorkingDir") or ""), str(config.get("User") or ""),
                       words("Entrypoint"), words("Cmd"), tuple(sorted(ports)))


# -- local forms -----------------------------------------------------------------------------
class LocalImage:
    """An image on disk: its manifest (or `docker save`'s) and a way to copy out each blob."""

    def __init__(self, label: str):
        self.label = label

    def image(self, ref: str | None) -> Image:
        raise NotImplementedError

    def copy_blob(self, digest: str, dest: Path) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Layout(LocalImage):
    """An OCI image layout directory: oci-layout, index.json, blobs/sha256/HEX."""

    def __init__(self, root: Path, label: str):
        super().__init__(label)
        self.root = root
        self._sizes: dict[str, int] = {}  # a layer's size as its descriptor says

    def read(self, name: str, most: int = MAX_DOCUMENT) -> bytes:
        fd = self._open(name)
        with os.fdopen(fd, "rb") as f:
            data = f.read(most + 1)
        if len(data) > most:
            raise RootfsError(f"{self.label}: {name} is bigger than any image document ({most} bytes)")
        return data

    def _open(self, name: str) -> int:
        """`name` under the layout's root, through no symlink: a layout is someone else's tree."""
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            parts = name.split("/")
            for part in parts[:-1]:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = nxt
            # O_NONBLOCK: a FIFO planted in the layout must not wait for a writer (it is refused below).
            target = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY,
                             dir_fd=fd)
        except OSError as exc:
            raise RootfsError(f"{self.label}: cannot read {name} in the image layout {self.root}: "
                              f"{exc.strerror}") from None
        finally:
            os.close(fd)
        if not stat.S_ISREG(os.fstat(target).st_mode):
            os.close(target)
            raise RootfsError(f"{self.label}: {name} in the image layout {self.root} is not a regular file")
        return target

    def image(self, ref: str | None) -> Image:
        index = load(self.read("index.json"), f"{self.label}: index.json")
        entries = index.get("manifests")
        if not isinstance(entries, list) or not entries:
            raise RootfsError(f"{self.label}: index.json lists no manifests")
        listed = [descriptor(entry, f"{self.label}: index.json") for entry in entries]
        if ref is not None:
            chosen = [d for d in listed if d.ref == ref]
            if not chosen:
                names = sorted({d.ref for d in listed if d.ref})
                raise RootfsError(f"{self.label}: no image tagged {ref!r} in {self.root}; it has "
                                  f"{', '.join(names) or 'no tagged images'}")
        else:
            chosen = listed
            if len(chosen) > 1:
                names = sorted({d.ref for d in listed if d.ref})
                raise RootfsError(f"{self.label}: {self.root} holds {len(chosen)} images; name one: "
                                  f"oci:{self.root}:REF with REF one of {', '.join(names) or '(untagged)'}")
        return self._resolve(chosen[0], 0)

    def _resolve(self, entry: Descriptor, depth: int) -> Image:
        what = f"{self.label}: manifest {entry.digest}"
        doc = load(self.blob(entry.digest, entry.size), what)
        kind = media_type(doc, entry.media_type)
        if kind in INDEXES:
            if depth > 2:
                raise RootfsError(f"{what}: indexes nested too deep")
            return self._resolve(pick_platform(doc, what), depth + 1)
        if kind not in MANIFESTS:
            raise RootfsError(f"{what} is a {kind or 'document of no known type'}, not an image manifest")
        config_entry, layers = manifest_parts(doc, what)
        config = image_config(load(self.blob(config_entry.digest, config_entry.size), f"{what}: config"), what)
        self._sizes.update((layer.digest, layer.size) for layer in layers)
        return Image(entry.digest, config, layers)

    def blob(self, digest: str, size: int) -> bytes:
        import hashlib
        data = self.read(_blob_name(digest), min(size, MAX_DOCUMENT))
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            raise RootfsError(f"{self.label}: blob {digest} does not match its digest (a damaged or "
                              "tampered image layout)")
        return data

    def copy_blob(self, digest: str, dest: Path) -> None:
        fd = self._open(_blob_name(digest))
        with os.fdopen(fd, "rb") as source:
            self._copy(source, dest, digest)

    def _copy(self, source, dest: Path, digest: str) -> None:  # source: a binary file object
        """Copy a blob, no more of it than its descriptor says (its digest is checked after)."""
        size = self._sizes.get(digest, 0)
        most = _most_blob()
        if size > most:
            raise RootfsError(f"{self.label}: the layer {digest[:19]} is {size} bytes, more than a rootfs may "
                              f"take (NSBOX_ROOTFS_MAX_BYTES); if it is genuine, raise that limit")
        with open(dest, "wb") as out:
            left = size + 1
            while left > 0 and (block := source.read(min(1 << 20, left))):
                out.write(block)
                left -= len(block)
        if left <= 0:
            raise RootfsError(f"{self.label}: the blob {digest[:19]} is bigger than the {size} bytes its "
                              "descriptor says: a damaged or tampered image; nothing of it was cached")


def _most_blob() -> int:
    """The biggest layer blob worth copying: what extraction accepts, and gzip's overhead."""
    from .archive import MAX_HEADERS, Limits
    most = Limits.from_env().max_bytes
    return most + most // 64 + MAX_HEADERS


def _blob_name(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/", 1)


class ArchiveLayout(Layout):
    """An OCI layout as a tarball (`oci-archive:`), or what `docker save` writes
    (`docker-archive:`, with its own manifest.json; Docker 25 and later also write an OCI layout
    in it).  Members are read by name from an index of the tarball made once."""

    def __init__(self, path: Path, label: str, docker: bool):
        super().__init__(path, label)
        import tarfile
        self.docker = docker
        self._layer_names: dict[str, str] = {}
        from .archive import _check_globals, _decompressor
        try:
            self._file = open(path, "rb")  # noqa: SIM115 - closed by close()
            self._tar = tarfile.open(fileobj=_Bounded(_decompressor(self._file), label), mode="r:")
            self._members = {}
            headers = 0
            for count, member in enumerate(self._tar):
                self._tar.members = []  # kept here, by name, only if it is a file
                _check_globals(self._tar, label)  # tarfile copies them into every member
                headers += member.offset_data - member.offset
                if count > 10_000 or headers > MAX_ARCHIVE_HEADERS:
                    raise RootfsError(f"{label}: {path} has more than 10000 members or {MAX_ARCHIVE_HEADERS} "
                                      "bytes of headers: no image archive")
                if member.isfile():
                    self._members[os.path.normpath(member.name).lstrip("/")] = member
        except (OSError, tarfile.TarError, EOFError, ValueError, RecursionError) as exc:
            raise RootfsError(f"{label}: {path} is not a readable tarball: {exc}") from None

    def close(self) -> None:
        self._tar.close()
        self._file.close()

    def _member(self, name: str):  # -> tarfile.TarInfo
        member = self._members.get(os.path.normpath(name).lstrip("/"))
        if member is None:
            raise RootfsError(f"{self.label}: {self.root} has no {name}")
        return member

    def read(self, name: str, most: int = MAX_DOCUMENT) -> bytes:
        member = self._member(name)
        if member.size > most:
            raise RootfsError(f"{self.label}: {name} is bigger than any image document ({most} bytes)")
        f = self._tar.extractfile(member)
        assert f is not None
        return f.read()

    def copy_blob(self, digest: str, dest: Path) -> None:
        # docker save's layers are members by name (<id>/layer.tar); an OCI layout's are blobs.
        self.copy_member(self._layer_names.get(digest) or _blob_name(digest), dest, digest)

    def copy_member(self, name: str, dest: Path, digest: str = "") -> None:
        f = self._tar.extractfile(self._member(name))
        assert f is not None
        self._copy(f, dest, digest)

    def image(self, ref: str | None) -> Image:
        if not self.docker or "index.json" in self._members and "manifest.json" not in self._members:
            return super().image(ref)
        return self._docker_image(ref)

    def _docker_image(self, ref: str | None) -> Image:
        """`docker save`'s manifest.json: [{Config, RepoTags, Layers}], layers as tar members."""
        import hashlib
        what = f"{self.label}: manifest.json"
        try:
            listed = json.loads(self.read("manifest.json"))
        except (ValueError, RecursionError) as exc:
            raise RootfsError(f"{what} is not JSON: {exc}") from None
        if not isinstance(listed, list) or not listed or not all(isinstance(e, dict) for e in listed):
            raise RootfsError(f"{what} lists no images")
        if ref is None and len(listed) > 1:
            tags = sorted(t for e in listed for t in e.get("RepoTags") or ())
            raise RootfsError(f"{self.label}: {self.root} holds {len(listed)} images; name one: "
                              f"docker-archive:{self.root}:TAG with TAG one of {', '.join(tags) or '(untagged)'}")
        entry = listed[0] if ref is None else next(
            (e for e in listed if any(_same_tag(t, ref) for t in e.get("RepoTags") or ())), None)
        if entry is None:
            tags = sorted(t for e in listed for t in e.get("RepoTags") or ())
            raise RootfsError(f"{self.label}: no image tagged {ref!r} in {self.root}; it has {', '.join(tags) or 'none'}")
        config_name = str(entry.get("Config", ""))
        config_bytes = self.read(config_name)
        config_digest = "sha256:" + hashlib.sha256(config_bytes).hexdigest()
        config = image_config(load(config_bytes, f"{what}: {config_name}"), what)
        layers = []
        for name in entry.get("Layers") or ():
            # A layer's digest is that of the member's bytes: hashed here, checked again when copied.
            member = self._member(str(name))
            if member.size > _most_blob():
                raise RootfsError(f"{what}: the layer {str(name)[:80]!r} is {member.size} bytes, more than a "
                                  "rootfs may take (NSBOX_ROOTFS_MAX_BYTES); if it is genuine, raise that limit")
            f = self._tar.extractfile(member)
            assert f is not None
            h = hashlib.sha256()
            size = 0
            while block := f.read(1 << 20):
                h.update(block)
                size += len(block)
            layers.append(Descriptor("application/vnd.docker.image.rootfs.diff.tar", "sha256:" + h.hexdigest(),
                                     size, ref=str(name)))
        if not layers or len(layers) > MAX_LAYERS:
            raise RootfsError(f"{what} lists {len(layers)} layers: an image has 1 to {MAX_LAYERS}")
        self._sizes = {layer.digest: layer.size for layer in layers}
        self._layer_names = {layer.digest: str(layer.ref) for layer in layers}
        return Image(config_digest, config, tuple(layers))



class _Bounded:
    """An image archive's decompressed stream, for tarfile: no single read bigger than any
    document or header of an image needs (tarfile reads a member's long name or pax header
    whole, in one read, before it yields the member)."""

    def __init__(self, stream, label: str):  # stream: a binary file object
        self.stream, self.label = stream, label

    def read(self, size: int = -1) -> bytes:
        if size < 0 or size > MAX_DOCUMENT + (1 << 20):
            raise RootfsError(f"{self.label}: a member of the archive has headers or a read of {size} bytes, "
                              "more than any image archive needs: refused")
        return self.stream.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()


def _same_tag(listed: str, wanted: str) -> bool:
    """Whether `docker save`'s RepoTags entry names `wanted` ("redis:7" is docker.io/library/redis:7)."""
    def normal(tag: str) -> str:
        name, _, version = tag.rpartition(":") if ":" in tag.rsplit("/", 1)[-1] else (tag, "", "latest")
        for prefix in ("docker.io/library/", "docker.io/", "library/"):
            name = name.removeprefix(prefix)
        return f"{name}:{version}"
    return normal(listed) == normal(wanted)


def open_local(transport: str, path: Path, label: str) -> LocalImage:
    if transport == "oci":
        return Layout(path, label)
    return ArchiveLayout(path, label, docker=transport == "docker-archive")

