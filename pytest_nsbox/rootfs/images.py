"""Images as root filesystems: a stack of per-layer trees in the rootfs cache, used as overlay
lower directories as the image has them, never flattened into one copy.

Each layer is a cache entry of its own, `trees/sha256-<blob digest>`, fetched, checked against its
digest and extracted once under its lock (store.py), with whiteouts and opaque directories made as
overlayfs reads them (archive.py): two images on one base share its trees, and a second pull
fetches only the layers it lacks.  A registry tag is resolved once and pinned in the cache's
`resolutions.json` with the image's manifest digest, config and layers, so that later runs need
no network (`nsbox rootfs pull --refresh` asks again).  Where sandboxes map many ids
(engine/idmap.py), a layer is extracted with its owners inside that map (mapped.py), as a tree of
its own, `trees/sha256-<blob digest>-ids-<map>`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..engine import idmap
from ..errors import DigestMismatch, NetworkError, RootfsError
from .oci import Descriptor, Image, host_platform, open_local
from .specs import ImageSpec

if TYPE_CHECKING:
    from ..engine.idmap import IdMap
    from .store import Rootfs, RootfsStore


class Source(Protocol):
    """Where an image's documents and blobs come from: a local layout or archive, a registry."""

    def image(self, ref: str | None) -> Image: ...
    def copy_blob(self, digest: str, dest: Path) -> None: ...
    def close(self) -> None: ...


def resolve(store: RootfsStore, spec: ImageSpec, key: str, refresh: bool) -> Rootfs:
    """The image's layer trees, pulled and extracted as needed, as a Rootfs whose `tree` is the
    bottom layer and whose `lowers` are the rest."""
    record_key = f"{key}/{'/'.join(filter(None, host_platform()))}"
    remote = spec.transport == "docker"
    ids = idmap.available()
    if remote and not refresh:
        recorded = store._resolutions().get(record_key)
        if recorded:
            image = Image.from_json(recorded)
            trees = [store.trees / _tree_name(layer, ids) for layer in image.layers]
            if all(store._tree_ready(tree) for tree in trees):
                return _rootfs(key, image, trees, "image-tag" if spec.digest is None else "image", ids)
    if remote and store.offline:
        raise NetworkError(f"{key} is not in the cache {store.cache_dir}, and downloads are off "
                           f"(--nsbox-offline): pull it where the registry can be reached, with `nsbox "
                           f"rootfs pull {key} --cache-dir {store.cache_dir}`, then copy the cache here")
    source = _open(store, spec, key)
    try:
        image = source.image(None if remote else spec.tag)
        if spec.digest is not None and image.digest != spec.digest and remote:
            raise DigestMismatch(f"{key}: the registry served the manifest {image.digest}, not {spec.digest}")
        trees = [_layer(store, source, key, layer, number, len(image.layers), ids)
                 for number, layer in enumerate(image.layers, 1)]
    finally:
        source.close()
    if remote:
        from .store import _read_only
        try:
            store._record(key, record_key, image.to_json())
        except RootfsError:
            if not _read_only(store.cache_dir):
                raise  # (an isolated test's read-only cache: the pin is only an economy, used next run)
    return _rootfs(key, image, trees, "image-tag" if remote and spec.digest is None else "image", ids)


def _open(store: RootfsStore, spec: ImageSpec, key: str) -> Source:
    if spec.transport == "docker":
        from .registry import RegistryImage
        return RegistryImage(spec, key, timeout=store.timeout, progress=store.progress, store=store)
    assert spec.path is not None
    return open_local(spec.transport, spec.path, key)


def _tree_name(layer: Descriptor, ids: IdMap | None) -> str:
    digest = layer.digest.removeprefix("sha256:")
    return f"sha256-{digest}-{ids.key}" if ids else f"sha256-{digest}"


def _layer(store: RootfsStore, source: Source, key: str, layer: Descriptor, number: int, count: int,
           ids: IdMap | None) -> Path:
    digest = layer.digest.removeprefix("sha256:")
    label = f"{key} layer {number}/{count} ({layer.digest[:19]})"

    def produce(dest: Path) -> None:
        source.copy_blob(layer.digest, dest)
        from .store import file_sha256
        got = file_sha256(dest)
        if got != digest:
            raise DigestMismatch(f"{label}: its blob has the digest sha256:{got}, not the one the image "
                                 "lists: damaged or tampered; nothing of it was cached")

    return store._materialize(label, digest, produce, {"source": label, "spec": key, "trust": "image",
                                                       "layer": layer.digest}, whole=False, exact=False, oci=True,
                             ids=ids)


def _rootfs(key: str, image: Image, trees: list[Path], trust: str, ids: IdMap | None) -> Rootfs:
    from .store import Rootfs
    if not trees:
        raise RootfsError(f"{key} has no layers")
    return Rootfs(key, trees[0], image.digest.removeprefix("sha256:"), trust=trust,
                  lowers=tuple(trees[1:]), image=image.config, ids=ids)


