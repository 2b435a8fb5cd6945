"""The run-wide settings: `--nsbox-NAME` on the command line, `NSBOX_NAME` in the environment,
`nsbox_NAME` in the ini file — in that order of precedence — read and checked once per run.

A bad value is a `pytest.UsageError` that names where it came from; nothing is silently read as
"off".  A relative path in the ini file is relative to that file, as pytest's own ini paths are;
on the command line and in the environment it is relative to the current directory.
"""

from __future__ import annotations

import math
import os
import re
from typing import NamedTuple

import pytest

from ..errors import NsboxError
from ..settings import DEFAULT_PIDS_MAX, SandboxSettings, parse_size

UNAVAILABLE_CHOICES = ("fail", "skip")
#: What --nsbox-keep-on-failure may keep per test process: a few hundred Alpine trees, not a full disk.
KEEP_ON_FAILURE_MAX = 1 << 30
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
# A rootfs written like these is a spec, not a path (see pytest_nsbox.rootfs.specs).
_SPEC_WORDS = re.compile(r"^(alpine([:@].*)?|host|[a-z]+://.*|(oci|oci-archive|docker-archive):.*)$")


class Option(NamedTuple):
    """One run-wide setting and its three spellings."""

    name: str
    help: str
    metavar: str | None = None   # None: a flag
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--nsbox-" + self.name.replace("_", "-")

    @property
    def dest(self) -> str:
        return f"nsbox_{self.name}"

    @property
    def env(self) -> str:
        return f"NSBOX_{self.name.upper()}"


OPTIONS = (
    Option("rootfs", "root filesystem of sandboxes: alpine (default), alpine:X.Y, alpine:X.Y.Z"
           "[@sha256:HEX], https://URL#sha256=HEX, a tarball or directory, or host", "SPEC"),
    Option("alpine_mirror", "Alpine mirror to download from (default "
           "https://dl-cdn.alpinelinux.org/alpine)", "URL"),
    Option("offline", "never download: use the rootfs cache only"),
    Option("download_timeout", "seconds a rootfs download may wait for the server: to connect, and for "
           "each read (default 30); a download that fails is tried once per run", "SECONDS"),
    Option("cache_dir", "where root filesystems are kept (default $XDG_CACHE_HOME/pytest-nsbox)", "DIR"),
    Option("pids_max", f"default cap on a sandbox's processes, or 'none' (default {DEFAULT_PIDS_MAX})", "N"),
    Option("memory_max", "default memory cap of a sandbox, e.g. 256M", "SIZE"),
    Option("timeout", "default lifetime of a sandbox, in seconds", "SECONDS"),
    Option("require_caps", "fail sandboxed tests where PIDs cannot be capped"),
    Option("unavailable", "what sandboxed tests do where this machine cannot make sandboxes: "
           "fail (default) or skip", "MODE", UNAVAILABLE_CHOICES),
    Option("profile", "a sandbox profile of pyproject.toml's [tool.nsbox.profiles] for every sandbox "
           "(markers' keywords and profile= win)", "NAME"),
    Option("keep_on_failure", "keep a failed test's sandbox filesystem as a tarball in the basetemp, "
           "for the `nsbox shell` line of its report"),
    Option("keep_on_failure_max", "the most the tarballs kept by --nsbox-keep-on-failure may take in one "
           "test process (default 1G); failures past it say they were not kept", "SIZE"),
    Option("isolate", "run every test in a sandbox of its own (docs/isolate.md)"),
    Option("isolate_writable", "a path isolated tests may write, besides pytest's basetemp "
           "(repeatable; ini: one per line; env: separated by ':')", "PATH"),
)
_BY_NAME = {option.name: option for option in OPTIONS}
_LISTS = ("isolate_writable",)


def add_options(parser: pytest.Parser) -> None:
    group = parser.getgroup("nsbox", "hermetic Linux sandboxes (pytest-nsbox)")
    for option in OPTIONS:
        where = f" (ini {option.dest}, env {option.env})"
        if option.name in _LISTS:
            group.addoption(option.flag, dest=option.dest, metavar=option.metavar, action="append",
                            default=None, help=option.help + where)
            parser.addini(option.dest, option.help, type="paths", default=[])
        elif option.metavar is None:
            group.addoption(option.flag, dest=option.dest, action="store_true", default=None,
                            help=option.help + where)
            parser.addini(option.dest, option.help + " (true/false)", default=None)
        else:
            group.addoption(option.flag, dest=option.dest, metavar=option.metavar, default=None,
                            choices=option.choices, help=option.help + where)
            parser.addini(option.dest, option.help, default=None)


class _Reader:
    """Reads one setting from the command line, the environment or the ini file, and says where
    it came from (for error messages)."""

    def __init__(self, config: pytest.Config):
        self.config = config
        self.inifile = os.path.basename(config.inipath) if config.inipath else "the ini file"

    def get(self, name: str, path: bool = False) -> tuple[str | None, str]:
        option = _BY_NAME[name]
        value = self.config.getoption(option.dest)
        if value is not None:
            return (str(value) if value is not True else "true"), option.flag
        value = os.environ.get(option.env) or None
        if value is not None:
            return value, option.env
        value = self.config.getini(option.dest) or None
        where = f"{option.dest} in {self.inifile}"
        if value is not None and path and self.config.inipath is not None:
            value = self._relative_to_ini(value, name)
        return value, where

    def _relative_to_ini(self, value: str, name: str) -> str:
        value = os.path.expanduser(value)
        if os.path.isabs(value) or (name == "rootfs" and _SPEC_WORDS.match(value)):
            return value
        assert self.config.inipath is not None
        return os.path.normpath(os.path.join(os.path.dirname(self.config.inipath), value))

    def paths(self, name: str) -> tuple[str, ...]:
        """A list of paths: every --flag given, else the environment's (':'-separated), else the
        ini file's lines (pytest resolves those against the ini file)."""
        option = _BY_NAME[name]
        given = self.config.getoption(option.dest)
        if given:
            return tuple(os.path.abspath(os.path.expanduser(p)) for p in given)
        env = os.environ.get(option.env)
        if env:
            return tuple(os.path.abspath(os.path.expanduser(p)) for p in env.split(os.pathsep) if p)
        return tuple(str(p) for p in self.config.getini(option.dest))

    def flag(self, name: str) -> bool:
        value, where = self.get(name)
        if value is None:
            return False
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
        raise pytest.UsageError(f"{where} must be true or false (or yes/no, on/off, 1/0), not {value!r}")


class RunOptions(NamedTuple):
    """The run-wide settings, resolved once.  (NamedTuples here, not dataclasses: this module is
    loaded by every pytest run, and defining a dataclass costs a millisecond.)"""

    rootfs: str
    cache_dir: str | None  # None: the default, $XDG_CACHE_HOME/pytest-nsbox (see rootfs/store.py)
    unavailable: str
    mirror: str | None
    offline: bool
    download_timeout: float | None  # None: NSBOX_DOWNLOAD_TIMEOUT's or 30 s (see rootfs/store.py)
    pids_max: int | None
    memory_max: int | None
    timeout: float | None
    require_caps: bool
    profile: str | None
    keep_on_failure: bool
    keep_on_failure_max: int
    isolate: bool
    isolate_writable: tuple[str, ...]

    @classmethod
    def from_config(cls, config: pytest.Config) -> RunOptions:
        read = _Reader(config)
        unavailable, where = read.get("unavailable")
        if unavailable is not None and unavailable not in UNAVAILABLE_CHOICES:
            raise pytest.UsageError(f"{where} must be one of {', '.join(UNAVAILABLE_CHOICES)}, "
                                    f"not {unavailable!r}")
        return cls(rootfs=read.get("rootfs", path=True)[0] or "alpine",
                   cache_dir=read.get("cache_dir", path=True)[0],
                   unavailable=unavailable or "fail",
                   mirror=read.get("alpine_mirror")[0],
                   offline=read.flag("offline"),
                   download_timeout=_seconds(*read.get("download_timeout")),
                   pids_max=_pids_max(*read.get("pids_max")),
                   memory_max=_size(*read.get("memory_max")),
                   timeout=_seconds(*read.get("timeout")),
                   require_caps=read.flag("require_caps"),
                   profile=read.get("profile")[0],
                   keep_on_failure=read.flag("keep_on_failure"),
                   keep_on_failure_max=_size(*read.get("keep_on_failure_max"), KEEP_ON_FAILURE_MAX),
                   isolate=read.flag("isolate"),
                   isolate_writable=read.paths("isolate_writable"))

    def defaults(self) -> SandboxSettings:
        try:
            return SandboxSettings(rootfs=self.rootfs, cache_dir=self.cache_dir, pids_max=self.pids_max,
                                   memory_max=self.memory_max, timeout=self.timeout)
        except NsboxError as exc:
            raise pytest.UsageError(f"nsbox run-wide settings: {exc}") from None


def _pids_max(value: str | None, where: str) -> int | None:
    if value is None:
        return DEFAULT_PIDS_MAX
    word = value.strip().lower()
    if word in ("none", "off"):
        return None
    if word == "0":
        raise pytest.UsageError(f"{where} is 0, which would turn the fork-bomb cap off without saying "
                                "so: write 'none' for no cap, or a number of processes")
    if not word.isdigit():
        raise pytest.UsageError(f"{where} takes a number of processes, or 'none', not {value!r}")
    return int(word)


def _size(value: str | None, where: str, default: int | None = None) -> int | None:
    if value is None:
        return default
    try:
        return parse_size(value)
    except ValueError as exc:
        raise pytest.UsageError(f"{where}: {exc}") from None


def _seconds(value: str | None, where: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not number > 0 or math.isinf(number):
        raise pytest.UsageError(f"{where} takes a positive number of seconds, not {value!r}")
    return number


def human_size(size: int) -> str:
    for unit, shift in (("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size} bytes"
