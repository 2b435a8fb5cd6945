"""The rootfs store: turn a spec into a read-only tree on the host, fetching and extracting once.

Cache layout (`--nsbox-cache-dir`, default `$XDG_CACHE_HOME/pytest-nsbox`)::

    trees/                        0700: the trees below are reachable by their owner only
    trees/sha256-<digest>/        an extracted tree, named by its archive's SHA-256; only ever an
                                  overlay lower layer, so sandboxes never change it
    trees/sha256-<digest>.json    where it came from (spec, version, arch, trust, source, size);
                                  its mtime is the entry's "last used"
    trees/sha256-<digest>.lock    held while the entry is fetched, extracted or pruned
    trees/sha256-<digest>.tmp-*   being made (or left by a killed process: swept under the lock)
    trees/sha256-<digest>.trash-* being removed (or left by a killed prune: swept later)
    resolutions.json              alpine:X.Y (and unpinned releases) -> version and digest, so
                                  they resolve offline
    fetches/<url hash>.lock       held while a pytest run fetches that URL (one process at a time)
    fetches/<run>-<url hash>.failed.json
                                  that URL failed in pytest run <run>: its other tests and xdist
                                  workers fail at once with the same sentence (swept after a day)

Every entry is made under a temp name and renamed into place under its lock, and removed by being
renamed away under its lock first, so N xdist workers or N concurrent pytest runs fetch and extract
it exactly once, and a tree is either complete or invisible, whoever was killed when.

The cache holds the code every sandbox runs, so it must be the user's alone: the cache directory,
trees/ and every entry must be owned by the user and not writable by group or others, or they are
refused with a sentence. Directories are made 0700 and files 0600, temp names are random and
created exclusively, and no symlink inside the cache is ever followed.

Import cost matters (the plugin loads this module in every pytest run): hashlib, json, tarfile,
shutil, filelock and the download code are imported by the functions that use them.
"""

from __future__ import annotations

import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext as _nothing, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, TypeVar

from ..errors import (ArchiveLimitError, ConfigError, DigestMismatch, NetworkError, NsboxError, RemoteNotFound,
                      RootfsError, UnsafeCacheError)
from . import alpine
from .specs import AlpineSpec, HostSpec, ImageSpec, PathSpec, RootfsSpec, UrlSpec, parse

TYPE_CHECKING = False
if TYPE_CHECKING:
    from .download import Progress

TRUST_NOTES = {
    "pinned": "digest pinned by pytest-nsbox",
    "caller": "digest pinned by the caller",
    "mirror": "digest from the mirror: trust on first use",
    "local": "local file",
    "host": "the host's filesystem",
    "image": "an image, each blob checked against its digest",
    "image-tag": "an image tag, resolved once and pinned in the cache",
}
_OTHER_CACHE = "choose another cache with --nsbox-cache-dir or NSBOX_CACHE_DIR"
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_SYMLINKS = 40  # as the kernel's path walk
_T = TypeVar("_T")
if TYPE_CHECKING:
    from ..engine.idmap import IdMap
    from .oci import ImageConfig


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
    #: An image's layers above `tree` (its bottom layer), bottom first; and its config.
    lowers: tuple[Path, ...] = ()
    image: ImageConfig | None = None
    #: The many ids the trees were made for (their files' owners); None: one, the user's.
    ids: IdMap | None = None

    def describe(self) -> str:
        parts = [self.spec]
        if self.version and self.spec != f"alpine:{self.version}":
            parts.append(f"-> {self.version}")
        if self.arch:
            parts.append(self.arch)
        if self.digest:
            parts.append(f"sha256:{self.digest[:12]}")
        if self.lowers:
            parts.append(f"{len(self.lowers) + 1} layers")
        return f"{' '.join(parts)} ({TRUST_NOTES[self.trust]})"


class Entry(NamedTuple):
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
    return xdg_cache_dir()


def xdg_cache_dir() -> Path:
    """The default cache without NSBOX_CACHE_DIR: what `nsbox` uses in a fresh shell."""
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(xdg) / "pytest-nsbox"


def env_offline() -> bool:
    return os.environ.get("NSBOX_OFFLINE", "").lower() in ("1", "true", "yes", "on")


DOWNLOAD_TIMEOUT = 30.0


def env_download_timeout() -> float:
    """NSBOX_DOWNLOAD_TIMEOUT (seconds a download may wait: to connect, and for each read), else 30."""
    text = os.environ.get("NSBOX_DOWNLOAD_TIMEOUT")
    if not text:
        return DOWNLOAD_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise ConfigError(f"NSBOX_DOWNLOAD_TIMEOUT takes a positive number of seconds, not {text!r}")
    return value


class RootfsStore:
    def __init__(self, cache_dir: str | os.PathLike[str] | None = None, mirror: str | None = None,
                 offline: bool | None = None, progress: Progress | None = None,
                 timeout: float | None = None, run_id: str | None = None):
        """`timeout`: seconds a download may wait for the server, to connect and for each read
        (default NSBOX_DOWNLOAD_TIMEOUT, else 30). `run_id`: a pytest run (shared by its xdist
        workers) in which a failed download is tried once: it fails again at once, in any process
        of the run using this cache. Without one, every resolve tries again."""
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.mirror = alpine.mirror_url(mirror)
        self.offline = env_offline() if offline is None else offline
        self.progress = progress
        self.trees = self.cache_dir / "trees"
        self.run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)[:64] if run_id else None
        self._timeout = timeout
        self._memo: dict[tuple[str, bool], Rootfs] = {}
        self._failures: dict[str, RootfsError] = {}
        self._lock = threading.Lock()
        self._checked = False

    @property
    def timeout(self) -> float:
        # Read when a download needs it: a bad NSBOX_DOWNLOAD_TIMEOUT must not break a cache hit.
        if self._timeout is None:
            self._timeout = env_download_timeout()
        return self._timeout

    # -- resolving --------------------------------------------------------------------------
    def resolve(self, spec: str | os.PathLike[str] | RootfsSpec, refresh: bool = False,
                layer: bool = False) -> Rootfs:
        """The tree for `spec`, fetching and extracting it if it is not cached yet.  A root
        filesystem must have an executable /bin/sh; a `layer` (files laid over one) need not."""
        parsed = spec if isinstance(spec, (AlpineSpec, UrlSpec, PathSpec, HostSpec, ImageSpec)) \
            else parse(spec, "layer" if layer else "rootfs")
        key = str(parsed)
        if layer and isinstance(parsed, HostSpec):
            raise ConfigError("'host' is a whole root filesystem, not a layer to lay over one")
        with self._lock:
            hit = None if refresh else self._memo.get((key, layer))
        if hit is not None and (hit.host or hit.tree.is_dir()):
            return hit
        result = self._resolve(parsed, key, refresh, whole=not layer)
        if not (layer or result.host or result.image):  # (an image need not have a shell)
            check_tree(result.tree, key)
        copied = isinstance(parsed, PathSpec) and parsed.is_dir and result.tree != parsed.path
        if not copied:  # a copy must be checked against its tree again each time (_own_copy)
            with self._lock:
                self._memo[(key, layer)] = result
        return result

    def cached(self, spec: str | os.PathLike[str]) -> Rootfs | None:
        """The tree for `spec` if it can be had without network or extraction, else None."""
        try:
            return RootfsStore(self.cache_dir, self.mirror, offline=True,
                               timeout=self._timeout)._resolve_offline(parse(spec))
        except NsboxError:
            return None

    def _resolve(self, spec: RootfsSpec, key: str, refresh: bool, whole: bool = True) -> Rootfs:
        if isinstance(spec, HostSpec):
            return Rootfs("host", Path("/"), trust="host", host=True)
        if isinstance(spec, PathSpec):
            if spec.is_dir:
                if _owner(spec.path) == os.geteuid():
                    return Rootfs(key, spec.path)
                return self._own_copy(key, spec.path, whole)
            digest = _local_sha256(spec.path)
            tree = self._materialize(key, digest, lambda dest: _copy_into(spec.path, dest),
                                     {"source": str(spec.path), "spec": key, "trust": "local"}, whole)
            return Rootfs(key, tree, digest)
        if isinstance(spec, UrlSpec):
            return self._fetch(key, spec.url, spec.digest, "caller", None, None, whole)
        if isinstance(spec, ImageSpec):
            if not whole:
                raise ConfigError(f"{key} is an image, a whole root filesystem: give it as the rootfs, "
                                  "and its layers are laid as the image has them")
            from . import images
            return images.resolve(self, spec, key, refresh)
        return self._resolve_alpine(spec, key, refresh)

    def _own_copy(self, key: str, path: Path, whole: bool) -> Rootfs:
        """A tree another uid owns (a checkout in a root container on hosted CI) is nobody's in
        the sandbox, where nothing can be made in it, not even a mount point: the sandbox runs
        over a copy the cache owns instead, made again whenever the tree changes."""
        digest = _tree_digest(path)
        tree = self._materialize(key, digest, lambda dest: _tar_of(path, dest),
                                 {"source": str(path), "spec": key, "trust": "local",
                                  "copy_of": "a directory owned by another user"}, whole, exact=False)
        return Rootfs(key, tree, digest)

    def _resolve_offline(self, spec: RootfsSpec) -> Rootfs:
        if isinstance(spec, PathSpec) and not spec.is_dir:
            digest = _local_sha256(spec.path)
            if not self._tree_ready(self.trees / f"sha256-{digest}"):
                raise RootfsError(f"{spec.path} is not extracted yet")
        return self._resolve(spec, str(spec), refresh=False)

    def _resolve_alpine(self, spec: AlpineSpec, key: str, refresh: bool) -> Rootfs:
        arch = alpine.machine_arch()
        pins = alpine.pins()
        if spec.version is None and spec.branch is None:
            # `alpine` is whatever this version of pytest-nsbox pins, never an older record.
            spec = AlpineSpec(branch=pins.default.rsplit(".", 1)[0], version=pins.default)
        pinned = spec.digest or (pins.digest(spec.version, arch) if spec.version else None)
        if spec.version and pinned:
            trust = "caller" if spec.digest else "pinned"
            return self._fetch(key, alpine.tarball_url(self.mirror, spec.version, arch), pinned, trust,
                               spec.version, arch)
        # Only the mirror knows the rest: what it said is recorded, so that it resolves offline.
        record_key = f"{str(spec) if key == 'alpine' else key}/{arch}"
        if not refresh:
            recorded = self._resolutions().get(record_key)
            if recorded and self._tree_ready(self.trees / f"sha256-{recorded['digest']}"):
                return self._hit(key, recorded["digest"], recorded["version"], arch, recorded["trust"])
        if spec.version is None:
            assert spec.branch is not None
            version, digest, trust = self._latest_of_branch(key, spec.branch, arch, pins)
        else:
            version, digest, trust = spec.version, self._mirror_digest(key, spec.version, arch, pins), "mirror"
        rootfs = self._fetch(key, alpine.tarball_url(self.mirror, version, arch), digest, trust, version, arch)
        self._record(key, record_key, {"version": version, "digest": digest, "trust": trust})
        return rootfs

    def _latest_of_branch(self, key: str, branch: str, arch: str, pins: alpine.Pins) -> tuple[str, str, str]:
        url = f"{alpine.release_dir(self.mirror, branch, arch)}/latest-releases.yaml"
        try:
            text = self._fetch_text(key, url)
        except RemoteNotFound:
            raise self._no_such_release(key, branch, arch, pins) from None
        try:
            release = alpine.latest_minirootfs(text, arch)
        except RootfsError:  # the server answered, with something else (a portal's page, a typo's site)
            raise RootfsError(f"{key}: {url} lists no alpine-minirootfs for {arch}: is {self.mirror} an Alpine "
                              f"mirror? (it serves v{branch}/releases/{arch}/latest-releases.yaml); "
                              f"{alpine.ANOTHER_MIRROR}") from None
        pinned = pins.digest(release.version, arch)
        if pinned and release.sha256 and pinned != release.sha256:
            raise RootfsError(f"the mirror {self.mirror} lists alpine {release.version} ({arch}) with SHA-256 "
                              f"{release.sha256}, but pytest-nsbox pins {pinned}: refusing a tampered or "
                              f"broken mirror; {alpine.ANOTHER_MIRROR}")
        if pinned:
            return release.version, pinned, "pinned"
        if not release.sha256:
            return release.version, self._mirror_digest(key, release.version, arch, pins), "mirror"
        return release.version, release.sha256, "mirror"

    def _mirror_digest(self, key: str, version: str, arch: str, pins: alpine.Pins) -> str:
        url = alpine.tarball_url(self.mirror, version, arch) + ".sha256"
        try:
            text = self._fetch_text(key, url)
        except RemoteNotFound:
            raise self._no_such_release(key, version, arch, pins) from None
        digest = alpine.parse_checksum_file(text, alpine.file_name(version, arch))
        if not digest:
            raise RootfsError(f"{url} holds no SHA-256 for {alpine.file_name(version, arch)}")
        return digest

    def _no_such_release(self, key: str, version: str, arch: str, pins: alpine.Pins,
                         why: str = "") -> RootfsError:
        from .download import fetch_text
        branch = version if version.count(".") == 1 else version.rsplit(".", 1)[0]
        timeout = min(10.0, self.timeout)  # only to list the choices: not worth a long wait
        known = []
        try:
            url = f"{alpine.release_dir(self.mirror, branch, arch)}/"
            versions = alpine.listed_versions(self._fetch_once(url, lambda: fetch_text(url, timeout)), arch)
        except RootfsError:
            versions = []
        if versions:
            known.append(f"releases of {branch} on the mirror: {', '.join(versions)}")
        else:
            with suppress(RootfsError):
                url = f"{self.mirror}/"
                branches = alpine.listed_branches(self._fetch_once(url, lambda: fetch_text(url, timeout)))
                if branches:
                    known.append(f"branches on the mirror: {', '.join(branches)}")
        known.append(f"pinned releases: {', '.join(pins.versions(arch)) or 'none for ' + arch}")
        if version in pins.versions(arch):
            # A release we pin is one every Alpine mirror has: this mirror is not one, or lags.
            return RootfsError(f"{key}: {self.mirror} has no Alpine {version} ({arch})"
                               + (f" ({why})" if why else "") + ", a release every Alpine mirror keeps; "
                               + "; ".join(known[:-1] or ["it lists nothing there"])
                               + f"; is it an Alpine mirror? Use one that has {version}: {alpine.MIRROR_OPTIONS}")
        return RootfsError(f"{key}: no such Alpine release {version} ({arch}) on {self.mirror}"
                           + (f" ({why})" if why else "") + "; " + "; ".join(known)
                           + "; ask for one of these (alpine:X.Y.Z, or alpine:X.Y for the newest of a "
                           f"branch), or use a mirror that has {version}: {alpine.MIRROR_OPTIONS}")

    def _fetch_text(self, key: str, url: str) -> str:
        from .download import fetch_text
        if self.offline:
            raise self._miss(key, "--nsbox-offline is set")
        try:
            return self._fetch_once(url, lambda: fetch_text(url, self.timeout))
        except RemoteNotFound:
            raise  # the caller says which release is missing
        except RootfsError as exc:
            raise self._cannot_fetch(key, exc) from None

    def _fetch(self, key: str, url: str, digest: str, trust: str, version: str | None,
               arch: str | None, whole: bool = True) -> Rootfs:
        if self._tree_ready(self.trees / f"sha256-{digest}"):
            return self._hit(key, digest, version, arch, trust)
        if self.offline:
            raise self._miss(key, "--nsbox-offline is set")
        url_spec = version is None  # a https://URL#sha256= spec; else an Alpine release
        kind = "rootfs" if whole else "layer"

        def failed(exc: RootfsError) -> RootfsError:
            if isinstance(exc, DigestMismatch):
                return self._digest_mismatch(key, exc, trust, url_spec, kind)
            if isinstance(exc, RemoteNotFound) and not url_spec:
                assert version is not None and arch is not None
                return self._no_such_release(key, version, arch, alpine.pins(), why=str(exc))
            return self._cannot_fetch(key, exc, url_spec, kind)

        if self.run_id is not None:
            known = self._failed(url)  # before waiting for the entry's lock another worker holds
            if known is not None:
                raise failed(known)

        def download(dest: Path) -> None:
            from .download import fetch_file
            try:
                # Under the entry's lock: one fetch at a time, so a failure is seen by who waited.
                self._fetch_once(url, lambda: fetch_file(url, dest, digest, self.progress, self.timeout),
                                 locked=False)
            except RootfsError as exc:
                raise failed(exc) from None

        meta = {"source": url, "spec": key, "version": version, "arch": arch, "trust": trust}
        tree = self._materialize(key, digest, download, meta, whole)
        return Rootfs(key, tree, digest, version, arch, trust)

    def _hit(self, key: str, digest: str, version: str | None, arch: str | None, trust: str) -> Rootfs:
        _touch(self.trees / f"sha256-{digest}.json")
        return Rootfs(key, self.trees / f"sha256-{digest}", digest, version, arch, trust)

    def _miss(self, key: str, why: str) -> RootfsError:
        import shlex
        return RootfsError(
            f"rootfs {key} is not in the cache {self.cache_dir} and cannot be fetched ({why}). "
            f"Fill the cache where there is network with `nsbox rootfs pull {shlex.quote(key)} --cache-dir "
            f"{shlex.quote(str(self.cache_dir))}`, or use a local tarball: --nsbox-rootfs=PATH")

    # -- why a download failed, and the fix that fits ------------------------------------------
    def _cannot_fetch(self, key: str, exc: RootfsError, url_spec: bool = False,
                      kind: str = "rootfs") -> RootfsError:
        """The sentence for a download that failed: what happened, then the fix — filling the cache
        elsewhere only where there may be no network, since that is no fix where there is."""
        import shlex

        from .download import refused, unreachable
        check = "check the URL" if url_spec else f"check the mirror {self.mirror} or {alpine.ANOTHER_MIRROR}"
        if unreachable(exc):
            fix = (f"without network, fill the cache where there is network (`nsbox rootfs pull "
                   f"{shlex.quote(key)} --cache-dir {shlex.quote(str(self.cache_dir))}`) or use a local "
                   f"tarball (--nsbox-rootfs=PATH); with network, {check}")
        elif refused(exc):  # never reached: a typo in the host or port, or a server not started
            fix = f"nothing answers there: {check} (its host and port)"
        elif url_spec and isinstance(exc, RemoteNotFound):
            fix = "the server has no file there: check the URL"
        elif url_spec:
            fix = ("the server was reached but failed: check the URL, or fetch the file another way and "
                   "use it as a local tarball (--nsbox-rootfs=PATH)")
        else:
            fix = (f"the mirror was reached but failed: try again later, {alpine.ANOTHER_MIRROR}, or use a "
                   "local tarball (--nsbox-rootfs=PATH)")
        error = type(exc)(f"{kind} {key} is not in the cache {self.cache_dir} and cannot be fetched: {exc}; "
                          f"{fix}{self._once_note()}")
        error.unreachable = unreachable(exc)  # type: ignore[attr-defined]
        return error

    def _digest_mismatch(self, key: str, exc: RootfsError, trust: str, url_spec: bool,
                         kind: str) -> RootfsError:
        actual = getattr(exc, "actual", "HEX")
        if url_spec:
            url = key.partition("#")[0]
            fix = (f"check the URL or the digest: if the file at the URL changed on purpose and you have "
                   f"checked it another way, pin its new digest ({url}#sha256={actual})")
        elif trust == "caller":
            fix = (f"check the digest in {key}, or the mirror may be tampered or broken: "
                   f"{alpine.ANOTHER_MIRROR}")
        else:
            fix = f"the mirror sent another file (tampered or broken): {alpine.ANOTHER_MIRROR}"
        return type(exc)(f"{kind} {key}: {exc}; {fix}{self._once_note()}")

    def _once_note(self) -> str:
        return "; a failed download is tried once per pytest run" if self.run_id is not None else ""

    # -- failed downloads, remembered for one pytest run ------------------------------------------
    def _fetch_once(self, url: str, fetch: Callable[[], _T], locked: bool = True) -> _T:
        """`fetch()` of `url` — unless it already failed in this run, in this process or another
        (an xdist worker) using this cache: then that error again, at once. With `locked`, one
        process of the run fetches at a time, so the others see its failure instead of repeating it."""
        if self.run_id is None:
            return fetch()
        known = self._failed(url)
        if known is not None:
            raise known
        with self._fetch_lock(url) if locked else _nothing():
            known = self._failed(url)  # failed in another worker while this one waited
            if known is not None:
                raise known
            try:
                return fetch()
            except RootfsError as exc:
                self._remember(url, exc)
                raise

    @contextmanager
    def _fetch_lock(self, url: str) -> Iterator[None]:
        """fetches/<url hash>.lock, where it can be had: a read-only cache fetches without it."""
        from filelock import FileLock
        directory = self._failure_dir(create=True)
        lock = None
        if directory is not None:
            path = directory / f"{_url_hash(url)}.lock"
            st = _lstat(path)
            if st is not None:
                check_private(path, st, "lock ")
            try:
                lock = FileLock(str(path), mode=0o600)
                lock.acquire()
            except OSError:
                lock = None
        try:
            yield
        finally:
            if lock is not None:
                lock.release()

    def _failure_dir(self, create: bool) -> Path | None:
        """fetches/, the user's own; None where it cannot be had (a read-only cache: the failures
        are then remembered by this process only)."""
        path = self.cache_dir / "fetches"
        try:
            if not self._open_cache(create=create):
                return None
            st = _lstat(path)
            if st is None:
                if not create:
                    return None
                with suppress(FileExistsError):
                    os.mkdir(path, 0o700)
                st = os.lstat(path)
        except (OSError, RootfsError):
            return None
        check_private(path, st, "directory ")
        return path

    def _failure_file(self, directory: Path, url: str) -> Path:
        return directory / f"{self.run_id}-{_url_hash(url)}.failed.json"

    def _failed(self, url: str) -> RootfsError | None:
        known = self._failures.get(url)
        if known is not None:
            return known
        directory = self._failure_dir(create=False)
        if directory is None or _lstat(self._failure_file(directory, url)) is None:
            return None
        try:
            data = _read_json(self._failure_file(directory, url))
        except OSError:
            return None
        if data.get("url") != url or not isinstance(data.get("message"), str):
            return None
        kinds = {cls.__name__: cls for cls in (RootfsError, NetworkError, RemoteNotFound, DigestMismatch)}
        known = kinds.get(str(data.get("kind")), RootfsError)(data["message"])
        known.unreachable = bool(data.get("unreachable"))  # type: ignore[attr-defined]
        if data.get("actual"):
            known.actual = str(data["actual"])  # type: ignore[attr-defined]
        self._failures[url] = known
        return known

    def _remember(self, url: str, exc: RootfsError) -> None:
        self._failures[url] = exc
        directory = self._failure_dir(create=True)
        if directory is None:
            return
        data = {"url": url, "kind": type(exc).__name__, "message": str(exc),
                "unreachable": bool(getattr(exc, "unreachable", False)), "actual": getattr(exc, "actual", None)}
        with suppress(OSError):
            _write_json(self._failure_file(directory, url), data)
            # Other runs' records are no use once they are over: a day is longer than any run.
            for old in directory.glob("*.failed.json"):
                if not old.name.startswith(f"{self.run_id}-") and time.time() - os.lstat(old).st_mtime > 86400:
                    os.unlink(old)

    # -- the cache and its owner --------------------------------------------------------------
    def _open_cache(self, create: bool) -> bool:
        """Check the cache directory and trees/ are the user's own; with `create`, make them.

        Returns False if they do not exist (and `create` is off).
        """
        if self._checked:
            return True
        try:
            try:
                st = os.stat(self.cache_dir)  # the directory itself may be a link the user made
            except FileNotFoundError:
                if not create:
                    return False
                _make_private_dirs(self.cache_dir)
                st = os.stat(self.cache_dir)
            if not stat.S_ISDIR(st.st_mode):
                raise RootfsError(f"the rootfs cache {self.cache_dir} is not a directory; {_OTHER_CACHE}")
            check_private(self.cache_dir, st, "")
            st = _lstat(self.trees)
            if st is None:
                if not create:
                    return False
                with suppress(FileExistsError):  # another worker was first
                    os.mkdir(self.trees, 0o700)
                st = os.lstat(self.trees)
            check_private(self.trees, st, "directory ")
            if stat.S_IMODE(st.st_mode) & 0o077:
                # Left open by an older version: nobody else may reach the trees (their /tmp is 1777).
                with suppress(OSError):
                    os.chmod(self.trees, 0o700)
        except OSError as exc:
            raise RootfsError(f"cannot use the rootfs cache {self.cache_dir}: {exc.strerror or exc} "
                              f"({exc.filename or self.cache_dir}); {_OTHER_CACHE}") from None
        self._checked = True
        return True

    def _tree_ready(self, tree: Path) -> bool:
        """Whether `tree` is a complete entry; one that someone else could have planted is refused."""
        if not self._open_cache(create=False):
            return False
        try:
            st = _lstat(tree)
            if st is None:
                return False
            check_private(tree, st, "entry ")
            if not stat.S_ISDIR(st.st_mode):
                raise UnsafeCacheError(f"the rootfs cache entry {tree} is not a directory; remove it "
                                       f"(rm {tree}) or {_OTHER_CACHE}")
            meta = _lstat(tree.with_name(tree.name + ".json"))
            if meta is not None:
                check_private(tree.with_name(tree.name + ".json"), meta, "entry ")
        except OSError as exc:
            raise RootfsError(f"cannot use the rootfs cache {self.cache_dir}: {exc.strerror} "
                              f"({exc.filename}); {_OTHER_CACHE}") from None
        return True

    @contextmanager
    def _locked(self, path: Path) -> Iterator[None]:
        from filelock import FileLock
        st = _lstat(path)
        if st is not None:
            check_private(path, st, "lock ")
        with FileLock(str(path), mode=0o600):
            yield

    def _write_error(self, label: str, path: Path, exc: OSError) -> RootfsError:
        import errno
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = f"free some space or {_OTHER_CACHE}"
        elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            fix = f"make {self.cache_dir} writable or {_OTHER_CACHE}"
        else:
            fix = _OTHER_CACHE
        if exc.filename and ".tmp-" not in os.path.basename(exc.filename):
            path = Path(exc.filename)  # a temp file's random name would say nothing to the user
        return RootfsError(f"{label}: cannot write {path}: {exc.strerror or exc}; {fix}")

    def _materialize(self, key: str, digest: str, produce: Callable[[Path], None], meta: dict,
                     whole: bool = True, exact: bool = True, oci: bool = False,
                     ids: IdMap | None = None) -> Path:
        """Make trees/sha256-<digest> exist, once, whoever else is trying at the same time.  A
        `whole` root filesystem without /bin/sh is refused before it is cached.  `exact`: the
        archive `produce` writes must have `digest` as its sha256 (else `digest` names what it
        was made from).  `oci`: an image layer, with whiteouts (archive.py).  `ids`: with its
        owners, for a sandbox that maps those ids (mapped.py): a tree of its own per map."""
        tree = self.trees / (f"sha256-{digest}-{ids.key}" if ids else f"sha256-{digest}")
        if self._tree_ready(tree):
            return tree
        spill = self._spill()
        if spill is not None:
            return spill._materialize(key, digest, produce, meta, whole, exact, oci, ids)
        self._open_cache(create=True)
        try:
            with self._locked(self.trees / f"{tree.name}.lock"):
                return self._materialize_locked(tree, digest, produce, meta, whole, exact, oci, ids)
        except OSError as exc:
            # A full disk or an unwritable cache, not a bug: say where, and what to do.
            raise self._write_error(key, self.trees, exc) from None

    def _spill(self) -> RootfsStore | None:
        """Where an isolated test's call extracts what the read-only cache lacks: a cache of its
        own in its private /tmp, which no other test can reach and which ends with the test."""
        place = os.environ.get(SPILL_ENV)
        if not place or not _read_only(self.cache_dir):
            return None
        if place not in _spills:
            import tempfile
            _spills[place] = RootfsStore(tempfile.mkdtemp(prefix="nsbox-cache-", dir=place),
                                         mirror=self.mirror, offline=self.offline, progress=self.progress,
                                         timeout=self._timeout, run_id=self.run_id)
        return _spills[place]

    def _materialize_locked(self, tree: Path, digest: str, produce: Callable[[Path], None],
                            meta: dict, whole: bool, exact: bool = True, oci: bool = False,
                            ids: IdMap | None = None) -> Path:
        import tempfile

        from . import archive
        if self._tree_ready(tree):
            return tree
        self._sweep(tree.name)
        fd, name = tempfile.mkstemp(prefix=f"{tree.name}.tmp-", suffix=".tar", dir=self.trees)
        os.close(fd)
        tarball, staging = Path(name), None
        try:
            produce(tarball)
            if exact and file_sha256(tarball) != digest:
                raise RootfsError(f"{meta['source']} changed while it was being cached; try again")
            staging = Path(tempfile.mkdtemp(prefix=f"{tree.name}.tmp-", dir=self.trees))
            if ids:
                from . import mapped
                size = mapped.extract(tarball, staging, meta["source"], ids)
                meta = {**meta, "ids": ids.describe()}
            else:
                size = archive.extract(tarball, staging, source=meta["source"], oci=oci)
            if whole:
                check_tree(staging, meta["source"])
            _write_json(tree.with_name(tree.name + ".json"),
                        {**meta, "digest": digest, "created": time.time(), "size": size})
            os.rename(staging, tree)
            staging = None
        finally:
            # What cannot be removed now (a read-only or full disk) is swept next time.
            with suppress(OSError):
                os.unlink(tarball)
            if staging is not None:
                with suppress(OSError, RootfsError):
                    _remove(staging)
        return tree

    def _sweep(self, entry: str) -> None:
        """Remove what killed processes left of `entry`; we hold its lock, so none is in flight."""
        for pattern in (f"{entry}.tmp-*", f"{entry}.trash-*"):
            for stale in self.trees.glob(pattern):
                _remove(stale)

    def _resolutions(self) -> dict:
        path = self.cache_dir / "resolutions.json"
        if not self._open_cache(create=False) or _lstat(path) is None:
            return {}
        return _read_json(path)

    def _record(self, key: str, record_key: str, value: dict) -> None:
        path = self.cache_dir / "resolutions.json"
        try:
            with self._locked(self.cache_dir / "resolutions.json.lock"):
                for stale in self.cache_dir.glob("resolutions.json.tmp-*"):
                    os.unlink(stale)
                data = self._resolutions()
                if data.get(record_key) != value:
                    data[record_key] = value
                    _write_json(path, data)
        except OSError as exc:
            raise self._write_error(key, path, exc) from None

    # -- list and prune -----------------------------------------------------------------------
    def entries(self) -> list[Entry]:
        if not self._open_cache(create=False):
            return []
        found = []
        for meta_path in sorted(self.trees.glob("sha256-*.json")):
            tree = meta_path.with_suffix("")
            if not self._tree_ready(tree):
                continue
            meta = _read_json(meta_path)
            found.append(Entry(tree.name.removeprefix("sha256-"), tree, meta, int(meta.get("size", 0)),
                               os.lstat(meta_path).st_mtime))
        return sorted(found, key=lambda e: e.last_used, reverse=True)

    def prune(self, keep: int = 0) -> list[Entry]:
        """Remove all but the `keep` most recently used trees; return the removed ones.

        A tree is renamed away under its lock before it is deleted, so a prune killed midway leaves
        a trash name that no sandbox uses and the next prune or extraction removes.
        """
        if keep < 0:
            raise ConfigError(f"prune keeps a number of trees, 0 or more, not {keep}")
        removed = []
        for entry in self.entries()[keep:]:
            json_path = entry.tree.with_name(entry.tree.name + ".json")
            try:
                with self._locked(entry.tree.with_name(entry.tree.name + ".lock")):
                    if not self._tree_ready(entry.tree):
                        continue  # pruned by someone else meanwhile
                    trash = entry.tree.with_name(f"{entry.tree.name}.trash-{os.urandom(6).hex()}")
                    os.rename(entry.tree, trash)
                    with suppress(FileNotFoundError):
                        os.unlink(json_path)
                _remove(trash)
            except OSError as exc:
                raise self._write_error("nsbox rootfs prune", entry.tree, exc) from None
            removed.append(entry)
        if self._open_cache(create=False):
            self._sweep_trash()
        return removed

    def _sweep_trash(self) -> None:
        for trash in self.trees.glob("sha256-*.trash-*"):
            claimed = trash.with_name(f"{trash.name.split('.trash-')[0]}.trash-{os.urandom(6).hex()}")
            try:
                os.rename(trash, claimed)  # two sweepers: one wins the rename, the other moves on
            except FileNotFoundError:
                continue
            _remove(claimed)


_default_stores: dict[tuple[str, str, bool], RootfsStore] = {}


def resolve(spec: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None,
            layer: bool = False) -> Rootfs:
    """Resolve with a store configured from the environment (what `Sandbox(rootfs=...)` uses)."""
    store = RootfsStore(cache_dir)
    key = (str(store.cache_dir), store.mirror, store.offline)
    store = _default_stores.setdefault(key, store)
    return store.resolve(spec, layer=layer)


# -- trees --------------------------------------------------------------------------------------
def check_tree(tree: Path, label: str) -> None:
    """Refuse a tree that is no root filesystem: sandboxes run commands through /bin/sh."""
    try:
        found = _lstat_in_tree(tree, "bin/sh")
    except PermissionError as exc:
        raise RootfsError(f"{label}: cannot read {exc.filename or tree}: permission denied; a rootfs "
                          "directory must be readable and searchable by you (chmod -R u+rX, or "
                          "chown -R to your user)") from None
    if isinstance(found, str):
        why = found
    elif not stat.S_ISREG(found.st_mode):
        why = "it is not a file"
    elif not found.st_mode & 0o111:
        why = "it is not executable"
    else:
        return
    raise RootfsError(f"{label} has no executable /bin/sh ({why}); a rootfs must be a whole root "
                      "filesystem with a shell, such as Alpine's minirootfs")


def _lstat_in_tree(root: Path, path: str) -> os.stat_result | str:
    """lstat `path` as a sandbox over `root` sees it, or say why it cannot be found.

    Symlinks are resolved against `root`, as they are inside the sandbox (Alpine's
    /bin/sh -> /bin/busybox), so a link never reaches the host's files.
    """
    todo = [part for part in reversed(path.split("/")) if part]
    current: list[str] = []
    found: os.stat_result | None = None
    links = 0
    while todo:
        part = todo.pop()
        if part == ".":
            continue
        if part == "..":
            if current:
                current.pop()
            continue
        here = root.joinpath(*current, part)
        try:
            found = os.lstat(here)
        except (FileNotFoundError, NotADirectoryError):
            return f"/{'/'.join([*current, part])} does not exist in the tree"
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > _MAX_SYMLINKS:
                return "too many levels of symbolic links"
            target = os.readlink(here)
            if target.startswith("/"):
                current = []
            todo.extend(p for p in reversed(target.split("/")) if p)
            continue
        current.append(part)
        if todo and not stat.S_ISDIR(found.st_mode):
            return f"/{'/'.join(current)} is not a directory"
    return found if found is not None else os.lstat(root)


def recorded_size(tree: Path) -> int | None:
    """The size a cache entry was counted at when it was extracted (its .json); None for a tree
    that is no entry of a cache (a directory of the user's, whose neighbour says nothing)."""
    if tree.parent.name != "trees" or not tree.name.startswith("sha256-"):
        return None
    try:
        return int(_read_json(tree.with_name(tree.name + ".json"))["size"])
    except (OSError, RootfsError, KeyError, TypeError, ValueError):
        return None


def _remove(path: Path) -> None:
    """remove_tree, or, for a tree many of the user's ids own (mapped.py), the same as their root."""
    try:
        remove_tree(path)
    except PermissionError:
        from ..engine import idmap
        ids = idmap.available()
        if ids is None or not ids.helpers:
            raise
        from . import mapped
        mapped.remove(path, ids)


def remove_tree(path: Path) -> None:
    """Remove a file or a whole tree: no recursion, no link ever followed, any depth.

    One directory descriptor is open at a time: it goes down by name with O_NOFOLLOW and back up
    by '..', which no one can move meanwhile (the store removes only its own entries, in
    directories only the user can write). Read-only directories are made writable first.
    """
    st = _lstat(path)
    if st is None:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    top = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    fd = -1
    try:
        fd = _open_removable(top, path.name)
        down: list[str] = []
        while True:
            child = _empty_but_directories(fd)
            if child is not None:
                nxt = _open_removable(fd, child)
                os.close(fd)
                fd = nxt
                down.append(child)
            elif down:
                up = os.open("..", _O_DIR, dir_fd=fd)
                os.close(fd)
                fd = up
                os.rmdir(down.pop(), dir_fd=fd)
            else:
                break
        os.close(fd)
        fd = -1
        os.rmdir(path.name, dir_fd=top)
    finally:
        if fd >= 0:
            os.close(fd)
        os.close(top)


def _open_removable(parent: int, name: str) -> int:
    st = os.stat(name, dir_fd=parent, follow_symlinks=False)
    if stat.S_IMODE(st.st_mode) & 0o700 != 0o700:
        os.chmod(name, 0o700, dir_fd=parent)  # lstat said directory, in a directory only we write
    return os.open(name, _O_DIR, dir_fd=parent)


def _empty_but_directories(fd: int) -> str | None:
    """Unlink every non-directory in `fd`; return one subdirectory left, or None if it is empty."""
    for name in os.listdir(fd):
        if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            return name
        os.unlink(name, dir_fd=fd)
    return None


# -- files --------------------------------------------------------------------------------------
def check_private(path: Path, st: os.stat_result, what: str) -> None:
    """Refuse a cache directory or file another user owns or may write: it could plant a rootfs."""
    me = os.geteuid()
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeCacheError(f"the rootfs cache {what}{path} is a symlink, which the cache never makes; "
                               f"remove it (rm {path}) or {_OTHER_CACHE}")
    if st.st_uid != me:
        raise UnsafeCacheError(
            f"the rootfs cache {what}{path} belongs to {_user(st.st_uid)}, not to you ({_user(me)}): "
            "its trees would run in your sandboxes, and appear there owned by nobody; use a cache of "
            "your own with --nsbox-cache-dir or NSBOX_CACHE_DIR")
    if st.st_mode & 0o022:
        raise UnsafeCacheError(
            f"the rootfs cache {what}{path} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}), "
            f"who could plant a rootfs in it; make it private (chmod go-w {path}) or {_OTHER_CACHE}")


def _user(uid: int) -> str:
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _make_private_dirs(path: Path) -> None:
    """mkdir -p with mode 0700 for every directory made (as XDG asks of ~/.cache)."""
    missing = []
    while True:
        try:
            os.stat(path)
            break
        except FileNotFoundError:
            missing.append(path)
            path = path.parent
    for directory in reversed(missing):
        with suppress(FileExistsError):
            os.mkdir(directory, 0o700)


def _read_json(path: Path) -> dict:
    import json
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        check_private(path, os.fstat(fd), "entry ")
        try:
            data = json.loads(f.read())
        except ValueError:
            return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict) -> None:
    import json
    import tempfile
    # mkstemp: a random name, O_EXCL|O_NOFOLLOW, mode 0600; os.replace never follows `path`.
    fd, tmp = tempfile.mkstemp(prefix=f"{path.name}.tmp-", dir=path.parent)
    try:
        with open(fd, "w") as f:
            f.write(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _copy_into(source: Path, dest: Path) -> None:
    import shutil
    try:
        src = open(source, "rb")
    except OSError as exc:
        raise RootfsError(f"cannot read {source}: {exc.strerror}") from None
    with src, open(os.open(dest, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC), "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)


def _local_sha256(path: Path) -> str:
    try:
        return file_sha256(path)
    except OSError as exc:
        raise RootfsError(f"cannot read {path}: {exc.strerror}") from None


def file_sha256(path: Path) -> str:
    import hashlib
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        h = hashlib.sha256()  # Python 3.10
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
        return h.hexdigest()


def _url_hash(url: str) -> str:
    import hashlib
    return hashlib.sha256(url.encode()).hexdigest()[:24]


def _owner(path: Path) -> int:
    try:
        return os.stat(path).st_uid
    except OSError as exc:
        raise RootfsError(f"cannot use {path} as a rootfs: {exc.strerror}") from None


def _tree_digest(top: Path) -> str:
    """What a directory holds, as make judges it (names, types, modes, owners, sizes, times; the
    ctime too, which no one can set back), hashed: a copy is made again when this changes."""
    import hashlib
    h = hashlib.sha256()
    pending = [""]
    try:
        while pending:
            rel = pending.pop()
            with os.scandir(top / rel if rel else top) as it:
                entries = sorted(it, key=lambda e: e.name)
            for entry in entries:
                st = entry.stat(follow_symlinks=False)
                name = f"{rel}/{entry.name}" if rel else entry.name
                link = os.readlink(entry.path) if stat.S_ISLNK(st.st_mode) else ""
                h.update(repr((name, st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns,
                               st.st_ctime_ns, st.st_ino, link)).encode("utf-8", "surrogateescape"))
                if stat.S_ISDIR(st.st_mode):
                    pending.append(name)
    except OSError as exc:
        raise RootfsError(f"cannot read {exc.filename or top} to copy the tree {top} another user owns: "
                          f"{exc.strerror}; make it readable to you, or own it (chown -R)") from None
    return h.hexdigest()


def _tar_of(top: Path, dest: Path) -> None:
    """`top` as an archive at `dest`, for archive.extract's checks.  The tree is another user's, who
    may change it while it is read: it is walked by directory descriptors opened with O_NOFOLLOW,
    each file is opened the same way (and O_NONBLOCK: a FIFO swapped in cannot hang us) and must be
    the regular file that was listed; what it holds is counted against the archive limits before it
    is written; links are kept as links, hard links as hard links; FIFOs, sockets and device nodes
    are left out (a sandbox's /dev is its own)."""
    import tarfile

    from .archive import Limits, human_size
    limits = Limits.from_env()
    state = {"bytes": 0, "members": 0}
    seen: dict[tuple[int, int], str] = {}

    def charge(size: int, name: str) -> None:
        state["bytes"] += size + archive_block
        state["members"] += 1
        if state["bytes"] > limits.max_bytes or state["members"] > limits.max_members:
            raise ArchiveLimitError(f"the tree {top} another user owns holds more than "
                                    f"{human_size(limits.max_bytes)} or {limits.max_members} entries (at {name}); "
                                    "if it is a genuine root filesystem, raise NSBOX_ROOTFS_MAX_BYTES or "
                                    "NSBOX_ROOTFS_MAX_MEMBERS")

    def info_of(name: str, st: os.stat_result, kind: bytes) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.uid, info.gid = kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        info.mtime = st.st_mtime
        return info

    def walk(tar: tarfile.TarFile, fd: int, rel: str) -> None:
        for entry in sorted(os.listdir(fd)):
            name = f"{rel}/{entry}" if rel else entry
            st = os.stat(entry, dir_fd=fd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                charge(0, name)
                sub = os.open(entry, _O_DIR, dir_fd=fd)
                try:
                    if os.fstat(sub).st_ino != st.st_ino:
                        raise RootfsError(f"{top}/{name} changed while it was copied; try again")
                    tar.addfile(info_of(name, st, tarfile.DIRTYPE))
                    walk(tar, sub, name)
                finally:
                    os.close(sub)
            elif stat.S_ISLNK(st.st_mode):
                charge(0, name)
                info = info_of(name, st, tarfile.SYMTYPE)
                info.linkname = os.readlink(entry, dir_fd=fd)
                tar.addfile(info)
            elif stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1 and (st.st_dev, st.st_ino) in seen:
                    charge(0, name)
                    info = info_of(name, st, tarfile.LNKTYPE)
                    info.linkname = seen[(st.st_dev, st.st_ino)]
                    tar.addfile(info)
                    continue
                charge(st.st_size, name)
                file_fd = os.open(entry, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=fd)
                with os.fdopen(file_fd, "rb") as f:
                    now = os.fstat(file_fd)
                    if not stat.S_ISREG(now.st_mode) or now.st_ino != st.st_ino:
                        raise RootfsError(f"{top}/{name} changed while it was copied; try again")
                    info = info_of(name, st, tarfile.REGTYPE)
                    info.size = st.st_size  # tarfile reads exactly this much, or fails if it shrank
                    tar.addfile(info, f)
                seen[(st.st_dev, st.st_ino)] = name

    archive_block = 4096  # every entry costs a block at least, as archive.py counts them
    try:
        root = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # the path the user gave
        try:
            with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as tar:
                walk(tar, root, "")
        finally:
            os.close(root)
    except OSError as exc:
        raise RootfsError(f"cannot read {exc.filename or top} to copy the tree {top} another user owns: "
                          f"{exc.strerror}; make it readable to you, or own it (chown -R)") from None


_touched: set[Path] = set()
#: Set in an isolated test's call (isolate/protocol.py) to its private /tmp: see `RootfsStore._spill`.
SPILL_ENV = "NSBOX_ISOLATED_SPILL"
_spills: dict[str, RootfsStore] = {}


def _read_only(path: Path) -> bool:
    """Whether `path`, or the nearest directory above it that exists, is on a read-only mount."""
    for place in (path, *path.parents):
        try:
            return bool(os.statvfs(place).f_flag & os.ST_RDONLY)
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


def _touch(path: Path) -> None:
    """Mark an entry used, once per process (a hit must stay a few stat calls)."""
    if path not in _touched:
        _touched.add(path)
        with suppress(OSError):  # a read-only cache still serves its trees
            os.utime(path, follow_symlinks=False)
