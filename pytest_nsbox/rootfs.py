"""The rootfs store: turn a spec into a read-only tree on the host, fetching and extracting once.

Cache layout (`--nsbox-cache-dir`, default `$XDG_CACHE_HOME/pytest-nsbox`)::

    trees/sha256-<digest>/        an extracted tree, named by its archive's SHA-256; only ever an
                                  overlay lower layer, so sandboxes never change it
    trees/sha256-<digest>.json    where it came from (spec, version, arch, trust, source, size);
                                  its mtime is the entry's "last used"
    trees/sha256-<digest>.lock    held while the entry is fetched or extracted
    resolutions.json              spec -> version and digest, so `alpine:3.20` resolves offline

Every entry is written to a temp name and renamed into place under its lock, so N xdist workers
or N concurrent pytest runs fetch and extract it exactly once, and an entry half-written by a
killed process is never mistaken for a complete one (its temp files are swept next time).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from . import alpine, archive
from .download import Progress, fetch_file, fetch_text
from .errors import NetworkError, RootfsError
from .specs import AlpineSpec, HostSpec, PathSpec, RootfsSpec, UrlSpec, parse

TRUST_NOTES = {
    "pinned": "digest pinned by pytest-nsbox",
    "caller": "digest pinned by the caller",
    "mirror": "digest from the mirror: trust on first use",
    "local": "local file",
    "host": "the host's filesystem",
}


@dataclass(frozen=True)
class Rootfs:
    """A resolved rootfs: the tree to use as the lower layer, and where it came from."""

    spec: str
    tree: Path
    digest: str | None = None
    version: str | None = None
    arch: str | None = None
    trust: str = "local"
    host: bool = False

    def describe(self) -> str:
        parts = [self.spec]
        if self.version and self.spec != f"alpine:{self.version}":
            parts.append(f"-> {self.version}")
        if self.arch:
            parts.append(self.arch)
        if self.digest:
            parts.append(f"sha256:{self.digest[:12]}")
        return f"{' '.join(parts)} ({TRUST_NOTES[self.trust]})"


@dataclass(frozen=True)
class Entry:
    """One cached tree, as `nsbox rootfs list` shows it."""

    digest: str
    tree: Path
    meta: dict
    size: int
    last_used: float


def default_cache_dir() -> Path:
    env = os.environ.get("NSBOX_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pytest-nsbox"


def env_offline() -> bool:
    return os.environ.get("NSBOX_OFFLINE", "").lower() in ("1", "true", "yes", "on")


class RootfsStore:
    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, mirror: str | None = None,
                 offline: bool | None = None, progress: Progress | None = None):
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.mirror = alpine.mirror_url(mirror)
        self.offline = env_offline() if offline is None else offline
        self.progress = progress
        self.trees = self.cache_dir / "trees"
        self._memo: dict[str, Rootfs] = {}
        self._lock = threading.Lock()

    # -- resolving --------------------------------------------------------------------------
    def resolve(self, spec: str | os.PathLike[str] | RootfsSpec, refresh: bool = False) -> Rootfs:
        """The tree for `spec`, fetching and extracting it if it is not cached yet."""
        parsed = spec if isinstance(spec, (AlpineSpec, UrlSpec, PathSpec, HostSpec)) else parse(spec)
        key = str(parsed)
        with self._lock:
            hit = None if refresh else self._memo.get(key)
        if hit is not None and (hit.host or hit.tree.is_dir()):
            return hit
        result = self._resolve(parsed, key, refresh)
        with self._lock:
            self._memo[key] = result
        return result

    def cached(self, spec: str | os.PathLike[str]) -> Rootfs | None:
        """The tree for `spec` if it can be had without network or extraction, else None."""
        try:
            return RootfsStore(self.cache_dir, self.mirror, offline=True)._resolve_offline(parse(spec))
        except RootfsError:
            return None

    def _resolve(self, spec: RootfsSpec, key: str, refresh: bool) -> Rootfs:
        if isinstance(spec, HostSpec):
            return Rootfs("host", Path("/"), trust="host", host=True)
        if isinstance(spec, PathSpec):
            if spec.is_dir:
                return Rootfs(key, spec.path)
            digest = file_sha256(spec.path)
            tree = self._materialize(digest, lambda dest: shutil.copyfile(spec.path, dest),
                                     {"source": str(spec.path), "spec": key, "trust": "local"})
            return Rootfs(key, tree, digest)
        if isinstance(spec, UrlSpec):
            return self._fetch(key, spec.url, spec.digest, "caller", None, None)
        return self._resolve_alpine(spec, key, refresh)

    def _resolve_offline(self, spec: RootfsSpec) -> Rootfs:
        if isinstance(spec, HostSpec):
            return Rootfs("host", Path("/"), trust="host", host=True)
        if isinstance(spec, PathSpec) and not spec.is_dir:
            digest = file_sha256(spec.path)
            if not (self.trees / f"sha256-{digest}").is_dir():
                raise RootfsError(f"{spec.path} is not extracted yet")
        return self._resolve(spec, str(spec), refresh=False)

    def _resolve_alpine(self, spec: AlpineSpec, key: str, refresh: bool) -> Rootfs:
        arch = alpine.machine_arch()
        pins = alpine.pins()
        record_key = f"{key}/{arch}"
        if not refresh and not spec.digest:
            recorded = self._resolutions().get(record_key)
            if recorded and (self.trees / f"sha256-{recorded['digest']}").is_dir():
                return self._hit(key, recorded["digest"], recorded["version"], arch, recorded["trust"])
        if spec.version is None and spec.branch is None:
            version, digest, trust = pins.default, pins.digest(pins.default, arch), "pinned"
        elif spec.version is None:
            version, digest, trust = self._latest_of_branch(key, spec.branch, arch, pins)
        else:
            version = spec.version
            digest, trust = (spec.digest, "caller") if spec.digest else (pins.digest(version, arch), "pinned")
        if digest is None:
            digest, trust = self._mirror_digest(key, version, arch), "mirror"
        rootfs = self._fetch(key, alpine.tarball_url(self.mirror, version, arch), digest, trust, version, arch)
        self._record(record_key, {"version": version, "digest": digest, "trust": trust})
        return rootfs

    def _latest_of_branch(self, key: str, branch: str, arch: str, pins: alpine.Pins) -> tuple[str, str | None, str]:
        url = f"{alpine.release_dir(self.mirror, branch, arch)}/latest-releases.yaml"
        release = alpine.latest_minirootfs(self._fetch_text(key, url), arch)
        pinned = pins.digest(release.version, arch)
        if pinned and release.sha256 and pinned != release.sha256:
            raise RootfsError(f"the mirror {self.mirror} lists alpine {release.version} ({arch}) with SHA-256 "
                              f"{release.sha256}, but pytest-nsbox pins {pinned}: refusing a tampered or "
                              "broken mirror")
        if pinned:
            return release.version, pinned, "pinned"
        return release.version, release.sha256, "mirror"

    def _mirror_digest(self, key: str, version: str, arch: str) -> str:
        url = alpine.tarball_url(self.mirror, version, arch) + ".sha256"
        digest = alpine.parse_checksum_file(self._fetch_text(key, url), alpine.file_name(version, arch))
        if not digest:
            raise RootfsError(f"{url} holds no SHA-256 for {alpine.file_name(version, arch)}")
        return digest

    def _fetch_text(self, key: str, url: str) -> str:
        if self.offline:
            raise self._miss(key, "--nsbox-offline is set")
        try:
            return fetch_text(url)
        except NetworkError as exc:
            raise self._miss(key, str(exc)) from None

    def _fetch(self, key: str, url: str, digest: str, trust: str, version: str | None,
               arch: str | None) -> Rootfs:
        tree = self.trees / f"sha256-{digest}"
        if tree.is_dir():
            return self._hit(key, digest, version, arch, trust)
        if self.offline:
            raise self._miss(key, "--nsbox-offline is set")

        def download(dest: Path) -> None:
            try:
                fetch_file(url, dest, digest, self.progress)
            except NetworkError as exc:
                raise self._miss(key, str(exc)) from None

        meta = {"source": url, "spec": key, "version": version, "arch": arch, "trust": trust}
        self._materialize(digest, download, meta)
        return Rootfs(key, tree, digest, version, arch, trust)

    def _hit(self, key: str, digest: str, version: str | None, arch: str | None, trust: str) -> Rootfs:
        _touch(self.trees / f"sha256-{digest}.json")
        return Rootfs(key, self.trees / f"sha256-{digest}", digest, version, arch, trust)

    def _miss(self, key: str, why: str) -> RootfsError:
        return RootfsError(
            f"rootfs {key} is not in the cache {self.cache_dir} and cannot be fetched ({why}). "
            f"Fill the cache where there is network with `nsbox rootfs pull {key} --cache-dir "
            f"{self.cache_dir}`, or use a local tarball: --nsbox-rootfs=PATH")

    # -- the cache --------------------------------------------------------------------------
    def _materialize(self, digest: str, produce: Callable[[Path], None], meta: dict) -> Path:
        """Make trees/sha256-<digest> exist, once, whoever else is trying at the same time."""
        tree = self.trees / f"sha256-{digest}"
        if tree.is_dir():
            return tree
        try:
            self.trees.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RootfsError(f"cannot create the rootfs cache {self.trees}: {exc.strerror}; choose "
                              "another with --nsbox-cache-dir or NSBOX_CACHE_DIR") from None
        try:
            with FileLock(str(tree) + ".lock"):
                return self._materialize_locked(tree, digest, produce, meta)
        except OSError as exc:
            # A full disk or an unwritable cache, not a bug: say where, and what to do.
            raise RootfsError(f"cannot cache {meta['source']} in {self.trees}: {exc.strerror or exc} "
                              f"({exc.filename or 'while extracting'}); free some space or choose "
                              "another cache with --nsbox-cache-dir or NSBOX_CACHE_DIR") from None

    def _materialize_locked(self, tree: Path, digest: str, produce: Callable[[Path], None],
                            meta: dict) -> Path:
        if tree.is_dir():
            return tree
        # We hold the entry's lock: any temp file of this entry is a killed process's leftover.
        for stale in self.trees.glob(f"{tree.name}.tmp-*"):
            remove_tree(stale) if stale.is_dir() else stale.unlink()
        tarball = self.trees / f"{tree.name}.tmp-{os.getpid()}.tar"
        staging = self.trees / f"{tree.name}.tmp-{os.getpid()}"
        try:
            produce(tarball)
            if file_sha256(tarball) != digest:
                raise RootfsError(f"{meta['source']} changed while it was being cached; try again")
            staging.mkdir()
            archive.extract(tarball, staging)
            meta = {**meta, "digest": digest, "created": time.time(), "size": _tree_size(staging)}
            _write_json(self.trees / f"{tree.name}.json", meta)
            os.rename(staging, tree)
        finally:
            if tarball.exists():
                tarball.unlink()
            if staging.exists():
                remove_tree(staging)
        return tree

    def _resolutions(self) -> dict:
        try:
            return json.loads((self.cache_dir / "resolutions.json").read_text())
        except (OSError, ValueError):
            return {}

    def _record(self, key: str, value: dict) -> None:
        path = self.cache_dir / "resolutions.json"
        with FileLock(str(path) + ".lock"):
            data = self._resolutions()
            if data.get(key) != value:
                data[key] = value
                _write_json(path, data)

    def entries(self) -> list[Entry]:
        found = []
        for meta_path in sorted(self.trees.glob("sha256-*.json")) if self.trees.is_dir() else []:
            tree = meta_path.with_suffix("")
            if not tree.is_dir():
                continue
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
            found.append(Entry(tree.name.removeprefix("sha256-"), tree, meta, int(meta.get("size", 0)),
                               meta_path.stat().st_mtime))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def prune(self, keep: int = 0) -> list[Entry]:
        """Remove all but the `keep` most recently used trees; return the removed ones."""
        removed = []
        for entry in self.entries()[keep:]:
            with FileLock(str(entry.tree) + ".lock"):
                remove_tree(entry.tree)
                entry.tree.with_suffix(".json").unlink(missing_ok=True)
            entry.tree.with_suffix(".lock").unlink(missing_ok=True)
            removed.append(entry)
        return removed


_default_stores: dict[tuple[str, str, bool], RootfsStore] = {}


def resolve(spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Rootfs:
    """Resolve with a store configured from the environment (what `Sandbox(rootfs=...)` uses)."""
    store = RootfsStore(cache_dir)
    key = (str(store.cache_dir), store.mirror, store.offline)
    store = _default_stores.setdefault(key, store)
    return store.resolve(spec)


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()  # Python 3.10
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()


def remove_tree(path: Path) -> None:
    """rmtree that also removes read-only directories."""
    def make_writable_and_retry(func, p, _exc):
        os.chmod(os.path.dirname(p), 0o700)
        func(p)
    if not (path.exists() or path.is_symlink()):
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=make_writable_and_retry)
    else:
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _tree_size(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


_touched: set[Path] = set()


def _touch(path: Path) -> None:
    """Mark an entry used, once per process (a hit must stay a few stat calls)."""
    if path not in _touched:
        _touched.add(path)
        try:
            os.utime(path)
        except OSError:
            pass
