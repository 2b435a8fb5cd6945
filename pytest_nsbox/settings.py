"""What a sandbox is made of: the settings dataclasses and their validation.

The same keywords configure `Sandbox(...)`, `sandbox_factory(...)` and `@pytest.mark.sandbox(...)`,
so validation lives here, once, and names the offending key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

from .errors import ConfigError, hide_our_frames

# pytest shows a bad setting's error at the test's line, without the validator under it.
__tracebackhide__ = hide_our_frames

#: Overlayfs takes up to 500 lower layers; far fewer keep its mount options short.
MAX_LAYERS = 64
#: PIDs are capped unless a caller says otherwise: a fork bomb must never reach the host.
DEFAULT_PIDS_MAX = 512
#: Below this a sandbox's own /dev and /run cannot even be made.
MIN_TMPFS_SIZE = 1 << 20
#: Below this a sandbox's init (a Python process) and a shell do not fit: they would be OOM-killed
#: (cgroup) or unable to map their libraries (RLIMIT_AS).
MIN_MEMORY_MAX = 16 << 20
#: What `run()` keeps of each of stdout and stderr; the rest is read and dropped, with a marker.
DEFAULT_OUTPUT_MAX = 64 << 20

NETWORK_MODES = ("none", "host")
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")

#: The environment every command starts from; nothing of the host's environment leaks in.
BASE_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "TERM": "dumb",
    "LANG": "C.UTF-8",
}


@dataclass(frozen=True)
class Mount:
    """A host path bound into the sandbox: read-only unless `rw`."""

    source: Path
    target: str
    rw: bool = False

    @classmethod
    def coerce(cls, value: Mount | tuple[Any, ...] | list[Any]) -> Mount:
        """Accept `Mount(...)`, `(source, target)`, `(source, target, "rw")` or `(..., "ro")`."""
        if isinstance(value, Mount):
            mount = value
        elif isinstance(value, (tuple, list)) and len(value) in (2, 3):
            mode = value[2] if len(value) == 3 else "ro"
            if mode not in ("ro", "rw"):
                raise ConfigError(f"mount mode must be 'ro' or 'rw', not {mode!r} (in {value!r})")
            mount = cls(Path(value[0]), str(value[1]), mode == "rw")
        else:
            raise ConfigError(f"a mount is (source, target) or (source, target, 'rw'), not {value!r}")
        return mount.validated()

    def validated(self) -> Mount:
        source = Path(os.path.abspath(os.fspath(self.source)))
        if not source.exists():
            raise ConfigError(f"mount source {source} does not exist")
        target = os.fspath(self.target)
        if not target.startswith("/") or ".." in target.split("/"):
            raise ConfigError(f"mount target must be an absolute path without '..', not {target!r}")
        target = posixpath.normpath(target)
        if target == "/" or target.split("/")[1] in ("proc", "dev"):
            raise ConfigError(f"mount target {target!r} would hide the sandbox's own / /proc or /dev")
        return dataclasses.replace(self, source=source, target=target, rw=bool(self.rw))


@dataclass(frozen=True)
class SandboxSettings:
    """Everything that defines one sandbox.  Keyword names are the public `Sandbox(...)` ones."""

    #: A spec (see pytest_nsbox.rootfs.specs), a path, or a Rootfs already resolved; None means "alpine".
    #: A list is the rootfs followed by its layers.
    rootfs: Union[str, os.PathLike[str], Any, None] = None
    #: Trees laid over the rootfs, lowest first (specs, paths or Rootfs): read-only overlay layers.
    layers: Union[tuple[Any, ...], list[Any]] = ()
    cache_dir: Union[str, os.PathLike[str], None] = None
    network: Literal["none", "host"] = "none"
    hostname: str = "nsbox"
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: tuple[Mount, ...] = ()
    cwd: str = "/"
    pids_max: int | None = DEFAULT_PIDS_MAX
    memory_max: Union[int, str, None] = None
    timeout: float | None = None
    #: Everything the sandbox writes (its root's changes, /tmp, /run, /dev/shm) shares one tmpfs of
    #: this size; None: memory_max if set, else 1 GiB or an eighth of the RAM, whichever is less.
    tmpfs_size: Union[int, str, None] = None
    #: The syscall filter of docs/security.md; False turns it off.
    seccomp: bool = True
    #: Bytes of each of stdout and stderr that `run()` keeps (None: no cap).
    output_max: Union[int, str, None] = DEFAULT_OUTPUT_MAX

    def __post_init__(self) -> None:
        if isinstance(self.rootfs, (list, tuple)):
            if not self.rootfs:
                raise ConfigError(_bad("rootfs", self.rootfs, "a spec, or a list of a spec and its layers"))
            object.__setattr__(self, "layers", (*self.rootfs[1:], *self.layers))
            object.__setattr__(self, "rootfs", self.rootfs[0])
        if isinstance(self.layers, (str, bytes, os.PathLike)) or not isinstance(self.layers, Iterable):
            raise ConfigError(_bad("layers", self.layers, "a list of specs or paths, lowest first"))
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) > MAX_LAYERS:
            raise ConfigError(_bad("layers", f"{len(self.layers)} layers", f"at most {MAX_LAYERS}"))
        if self.network not in NETWORK_MODES:
            raise ConfigError(_bad("network", self.network, "'none' or 'host'"))
        if not isinstance(self.hostname, str) or not _HOSTNAME.match(self.hostname):
            raise ConfigError(_bad("hostname", self.hostname, "a valid host name (letters, digits, '-', '.')"))
        if not isinstance(self.env, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and k and "=" not in k and "\0" not in k + v
                for k, v in self.env.items()):
            raise ConfigError(_bad("env", self.env, "a mapping of str names (without '=') to str values"))
        object.__setattr__(self, "env", dict(self.env))
        if isinstance(self.mounts, (str, bytes)) or not isinstance(self.mounts, Iterable):
            raise ConfigError(_bad("mounts", self.mounts, "a list of (source, target[, 'rw']) tuples"))
        object.__setattr__(self, "mounts", tuple(Mount.coerce(m) for m in self.mounts))
        if not isinstance(self.cwd, str) or not self.cwd.startswith("/"):
            raise ConfigError(_bad("cwd", self.cwd, "an absolute path inside the sandbox"))
        if self.pids_max is not None and (isinstance(self.pids_max, bool) or not isinstance(self.pids_max, int)
                                          or self.pids_max < 1):
            raise ConfigError(_bad("pids_max", self.pids_max, "a positive int, or None for no cap"))
        try:
            object.__setattr__(self, "memory_max", parse_size(self.memory_max))
        except ValueError as exc:
            raise ConfigError(_bad("memory_max", self.memory_max, f"bytes or a size such as '256M' ({exc})")) from None
        if self.memory_max is not None and self.memory_max < MIN_MEMORY_MAX:
            raise ConfigError(_bad("memory_max", self.memory_max,
                                   f"at least {MIN_MEMORY_MAX >> 20}M, what the sandbox's init and a shell "
                                   "need; a bare number is bytes (did you mean "
                                   f"'{self.memory_max}M'?)"))
        if self.timeout is not None and (isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float))
                                         or not self.timeout > 0 or math.isinf(self.timeout)):
            raise ConfigError(_bad("timeout", self.timeout, "a positive number of seconds or None"))
        for key in ("tmpfs_size", "output_max"):
            try:
                object.__setattr__(self, key, parse_size(getattr(self, key)))
            except ValueError as exc:
                raise ConfigError(_bad(key, getattr(self, key), f"bytes or a size such as '256M' ({exc})")) from None
        if self.tmpfs_size is not None and self.tmpfs_size < MIN_TMPFS_SIZE:
            raise ConfigError(_bad("tmpfs_size", self.tmpfs_size, f"at least {MIN_TMPFS_SIZE >> 20} MiB"))
        if not isinstance(self.seccomp, bool):
            raise ConfigError(_bad("seccomp", self.seccomp, "True or False"))

    @classmethod
    def keys(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, Any], *, defaults: SandboxSettings | None = None,
                    source: str = "Sandbox()", also_allowed: tuple[str, ...] = ()) -> SandboxSettings:
        """Build settings from keywords, naming `source` (e.g. the test) when a key is unknown;
        `also_allowed` are the keywords the caller takes besides these (a marker's `profile`),
        for the message."""
        unknown = sorted(set(kwargs) - set(cls.keys()))
        if unknown:
            raise unknown_keywords(source, unknown, (*also_allowed, *cls.keys()))
        base = defaults or cls()
        try:
            return dataclasses.replace(base, **kwargs)
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None


#: The keywords whose values are, or hold, host paths.
PATH_KEYWORDS = ("rootfs", "layers", "mounts", "cache_dir")


def anchored(keywords: Mapping[str, Any], base: str | os.PathLike[str]) -> dict[str, Any]:
    """`keywords` with their relative host paths made absolute against `base`: a rootfs or layer
    that is a path (not a spec word such as `alpine`), a mount's source, `cache_dir`.

    One rule for each place keywords are written, so that where pytest was started from does not
    matter: a profile's paths are relative to its pyproject.toml, a marker's and `sandbox_factory`'s
    to pytest's rootdir.  (`Sandbox(...)` itself, a Python API, takes them relative to the cwd.)
    """
    result = dict(keywords)
    if "rootfs" in result:
        rootfs = result["rootfs"]
        result["rootfs"] = ([_anchored_spec(spec, base) for spec in rootfs] if isinstance(rootfs, (list, tuple))
                            else _anchored_spec(rootfs, base))
    if isinstance(result.get("layers"), (list, tuple)):
        result["layers"] = [_anchored_spec(spec, base) for spec in result["layers"]]
    if isinstance(result.get("mounts"), (list, tuple)):
        result["mounts"] = [_anchored_mount(mount, base) for mount in result["mounts"]]
    if isinstance(result.get("cache_dir"), (str, os.PathLike)):
        result["cache_dir"] = _anchored_path(result["cache_dir"], base)
    return result


#: Image specs that name a local path after their transport (see rootfs/specs.py).
_PATH_TRANSPORTS = ("oci-archive:", "docker-archive:", "oci:")


def is_path_spec(spec: str) -> bool:
    """Whether a rootfs string is a path rather than one of the spec words (see rootfs/specs.py)."""
    text = spec.strip()
    return not (text in ("alpine", "host") or text.startswith(("alpine:", "alpine@", *_PATH_TRANSPORTS))
                or re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", text))


def _anchored_spec(spec: Any, base: str | os.PathLike[str]) -> Any:
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.strip() and is_path_spec(spec)):
        return _anchored_path(spec, base)
    if isinstance(spec, str):
        transport = next((t for t in _PATH_TRANSPORTS if spec.strip().startswith(t)), None)
        if transport is not None:  # oci:DIR[:REF]: the path is anchored as any other
            rest = spec.strip()[len(transport):]
            if rest and not os.path.isabs(os.path.expanduser(rest)):
                return transport + os.fspath(_anchored_path(rest, base))
    return spec  # a spec word, a resolved Rootfs, or a bad value that validation names


def _anchored_mount(mount: Any, base: str | os.PathLike[str]) -> Any:
    if isinstance(mount, Mount):
        return dataclasses.replace(mount, source=Path(_anchored_path(mount.source, base)))
    if isinstance(mount, (list, tuple)) and mount and isinstance(mount[0], (str, os.PathLike)):
        return type(mount)([_anchored_path(mount[0], base), *mount[1:]])
    return mount


def _anchored_path(path: str | os.PathLike[str], base: str | os.PathLike[str]) -> Any:
    text = os.path.expanduser(os.fspath(path))
    if not os.path.isabs(text):
        text = os.path.normpath(os.path.join(os.fspath(base), text))
    return Path(text) if isinstance(path, os.PathLike) else text


_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str | None) -> int | None:
    """Bytes from an int or a string such as '256M', '1G', '512k', '1048576'; None stays None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return _bad_size(value)
    if isinstance(value, int):
        return value if value > 0 else _bad_size(value)
    match = re.fullmatch(r"\s*(\d+)\s*([kmgtKMGT]?)i?[bB]?\s*", str(value))
    if not match or int(match[1]) <= 0:
        return _bad_size(value)
    return int(match[1]) * _UNITS[match[2].lower()]


def _bad_size(value: object) -> int:
    raise ValueError(f"{value!r} is not a size: write bytes (an int) or a number with K, M, G or T")


def unknown_keywords(source: str, unknown: Iterable[str], allowed: Iterable[str]) -> ConfigError:
    return ConfigError(f"{source}: unknown sandbox setting {', '.join(map(repr, sorted(unknown)))}; "
                       f"allowed: {', '.join(allowed)}")


def _bad(key: str, value: object, allowed: str) -> str:
    return f"bad value for {key!r}: {value!r}; allowed: {allowed}"
