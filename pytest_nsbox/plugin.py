"""The pytest glue: options, the `sandbox` marker, fixtures, the header and failure sections.

Everything of substance lives in `Sandbox`; this module only maps pytest's conventions onto it.
Precedence of run-wide settings: ini < environment (NSBOX_*) < command line < marker keywords.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from . import client
from .errors import NsboxError, SandboxUnavailable
from .rootfs import Rootfs, RootfsStore, default_cache_dir
from .sandbox import Sandbox
from .settings import SandboxSettings
from .specs import parse as parse_spec

UNAVAILABLE_CHOICES = ("fail", "skip")
MARKER_HELP = ("sandbox(**settings): configure this test's `sandbox` fixture with the keywords of "
               "pytest_nsbox.Sandbox: " + ", ".join(SandboxSettings.keys()))


@dataclass(frozen=True)
class RunOptions:
    """The run-wide settings, resolved once from ini, environment and command line."""

    rootfs: str
    cache_dir: str
    unavailable: str
    mirror: str | None
    offline: bool
    pids_max: int | None
    memory_max: str | None
    timeout: float | None
    require_caps: bool

    @classmethod
    def from_config(cls, config: pytest.Config) -> RunOptions:
        unavailable = _option(config, "nsbox_unavailable", "NSBOX_UNAVAILABLE") or "fail"
        if unavailable not in UNAVAILABLE_CHOICES:
            raise pytest.UsageError(f"--nsbox-unavailable must be one of {', '.join(UNAVAILABLE_CHOICES)}, "
                                    f"not {unavailable!r}")
        offline = _flag(config, "nsbox_offline", "NSBOX_OFFLINE")
        return cls(rootfs=_option(config, "nsbox_rootfs", "NSBOX_ROOTFS", path=True) or "alpine",
                   cache_dir=_option(config, "nsbox_cache_dir", "NSBOX_CACHE_DIR", path=True)
                   or str(default_cache_dir()),
                   unavailable=unavailable,
                   mirror=_option(config, "nsbox_alpine_mirror", "NSBOX_ALPINE_MIRROR"),
                   offline=offline,
                   pids_max=_pids_max(_option(config, "nsbox_pids_max", "NSBOX_PIDS_MAX")),
                   memory_max=_option(config, "nsbox_memory_max", "NSBOX_MEMORY_MAX"),
                   timeout=_number("--nsbox-timeout", _option(config, "nsbox_timeout", "NSBOX_TIMEOUT")),
                   require_caps=_flag(config, "nsbox_require_caps", "NSBOX_REQUIRE_CAPS"))

    def defaults(self) -> SandboxSettings:
        try:
            return SandboxSettings(rootfs=self.rootfs, cache_dir=self.cache_dir, pids_max=self.pids_max,
                                   memory_max=self.memory_max, timeout=self.timeout)
        except NsboxError as exc:
            raise pytest.UsageError(f"nsbox run-wide settings: {exc}") from None


def _option(config: pytest.Config, name: str, env: str, path: bool = False) -> str | None:
    value = config.getoption(name)
    if value is None:
        value = os.environ.get(env) or None
    if value is None:
        value = config.getini(name) or None
        # A relative path in an ini file means relative to that file, as for pytest's own paths.
        if value and path and config.inipath is not None and "/" in value \
                and not os.path.isabs(value):
            value = os.path.normpath(config.inipath.parent / value)
    return value


def _flag(config: pytest.Config, name: str, env: str) -> bool:
    if config.getoption(name):
        return True
    value = os.environ.get(env) or config.getini(name) or ""
    return value.strip().lower() in ("1", "true", "yes", "on")


def _pids_max(value: str | None) -> int | None:
    from .settings import DEFAULT_PIDS_MAX
    if value is None:
        return DEFAULT_PIDS_MAX
    if value.strip().lower() in ("0", "none", "off"):
        return None
    if not value.strip().isdigit():
        raise pytest.UsageError(f"--nsbox-pids-max takes a positive number or 'none', not {value!r}")
    return int(value)


def _number(option: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise pytest.UsageError(f"{option} takes a positive number of seconds, not {value!r}")
    return number


_OPTIONS = pytest.StashKey[RunOptions]()
_STORE = pytest.StashKey[RootfsStore]()
_SANDBOXES = pytest.StashKey[list[Sandbox]]()


@dataclass(frozen=True)
class _Option:
    """One run-wide setting: `--nsbox-NAME` on the command line, `nsbox_NAME` in the ini file and
    NSBOX_NAME in the environment."""

    name: str
    help: str
    metavar: str | None = None   # None: a flag
    choices: tuple[str, ...] | None = None

    @property
    def flag(self) -> str:
        return "--nsbox-" + self.name.replace("_", "-")


_RUN_OPTIONS = (
    _Option("rootfs", "root filesystem of sandboxes: alpine (default), alpine:X.Y, alpine:X.Y.Z"
            "[@sha256:HEX], https://URL#sha256=HEX, a tarball or directory, or host", "SPEC"),
    _Option("alpine_mirror", "Alpine mirror to download from (default "
            "https://dl-cdn.alpinelinux.org/alpine)", "URL"),
    _Option("offline", "never download: use the rootfs cache only"),
    _Option("cache_dir", "where root filesystems are kept (default $XDG_CACHE_HOME/pytest-nsbox)", "DIR"),
    _Option("pids_max", "default cap on a sandbox's processes, or 'none' (default 512)", "N"),
    _Option("memory_max", "default memory cap of a sandbox, e.g. 256M", "SIZE"),
    _Option("timeout", "default lifetime of a sandbox, in seconds", "SECONDS"),
    _Option("require_caps", "fail sandboxed tests where PIDs cannot be capped"),
    _Option("unavailable", "what sandboxed tests do where this machine cannot make sandboxes: "
            "fail (default) or skip", "MODE", UNAVAILABLE_CHOICES),
)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nsbox", "hermetic Linux sandboxes (pytest-nsbox)")
    for option in _RUN_OPTIONS:
        dest = f"nsbox_{option.name}"
        where = f" (ini {dest}, env {dest.upper()})"
        if option.metavar is None:
            group.addoption(option.flag, dest=dest, action="store_true", default=None,
                            help=option.help + where)
            parser.addini(dest, option.help + " (true/false)", default=None)
        else:
            group.addoption(option.flag, dest=dest, metavar=option.metavar, default=None,
                            choices=option.choices, help=option.help + where)
            parser.addini(dest, option.help, default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    options = config.stash[_OPTIONS] = RunOptions.from_config(config)
    try:
        store = RootfsStore(options.cache_dir, options.mirror, options.offline,
                            progress=_Progress(config))
        parse_spec(options.rootfs)
    except NsboxError as exc:
        raise pytest.UsageError(f"--nsbox-rootfs: {exc}") from None
    config.stash[_STORE] = store
    options.defaults()  # a bad run-wide setting is a usage error now, not in every test


def pytest_report_header(config: pytest.Config) -> list[str]:
    options, store = config.stash[_OPTIONS], config.stash[_STORE]
    cached = store.cached(options.rootfs)
    rootfs = cached.describe() if cached else f"{options.rootfs} (not cached yet: fetched on first use)"
    probe = client.probe("none")
    state = "available" if probe.ok else f"UNAVAILABLE: {probe.error}"
    lines = [f"nsbox: rootfs {rootfs}; cache {options.cache_dir}" + ("; offline" if options.offline else ""),
             f"nsbox: namespaces user,mnt,pid,ipc,uts,cgroup,net: {state}"]
    if probe.caps is not None:
        defaults = options.defaults()
        lines.append(f"nsbox: caps: {probe.caps.describe()}; default pids_max "
                     f"{defaults.pids_max or 'none'}" + (f", memory_max {defaults.memory_max}" if defaults.memory_max else "")
                     + (f", timeout {defaults.timeout:g} s" if defaults.timeout else ""))
    return lines


class _Progress:
    """Download progress on the terminal: one line, rewritten, from the process that downloads.

    xdist workers have no terminal and print nothing.
    """

    def __init__(self, config: pytest.Config):
        self._config = config
        self._last = 0.0

    def __call__(self, name: str, done: int, total: int | None) -> None:
        import time
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None or hasattr(self._config, "workerinput"):
            return
        now = time.monotonic()
        finished = total is not None and done >= total
        if not finished and done and now - self._last < 0.2:
            return
        self._last = now
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
        capture = self._config.pluginmanager.get_plugin("capturemanager")
        with capture.global_and_fixture_disabled() if capture else _nothing():
            reporter.write(f"\rnsbox: downloading {name} {size}", flush=True)
            if finished:
                reporter.write("\n", flush=True)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    sandboxes = item.stash.get(_SANDBOXES, [])
    if report.failed and any(sb.history for sb in sandboxes):
        report.sections.append((f"nsbox sandbox commands ({report.when})", _describe(sandboxes)))
    return report


def _nothing() -> contextlib.AbstractContextManager[None]:
    return contextlib.nullcontext()


def _describe(sandboxes: list[Sandbox]) -> str:
    lines = []
    for number, sb in enumerate(sandboxes, 1):
        rootfs = sb.rootfs.describe() if sb.rootfs else sb.settings.rootfs
        lines.append(f"sandbox {number}: rootfs {rootfs}, network {sb.settings.network}")
        if sb.limits:
            lines.append(f"  caps: {sb.limits.describe()}")
        for record in sb.history:
            if record.exit is not None:
                status = record.exit.describe()
            else:
                status = f"exit {record.returncode}" if record.returncode is not None else "still running"
            lines.append(f"  $ {_shell_form(record.args)}  -> {status} ({record.duration * 1000:.0f} ms)")
            for line in record.stderr_tail.splitlines():
                lines.append(f"    stderr| {line}")
    return "\n".join(lines)


def _shell_form(args: Any) -> str:
    import shlex
    return args if isinstance(args, str) else shlex.join(args)


class SandboxFactory:
    """Makes sandboxes for one test (keywords as for `Sandbox`); closes them all after it."""

    def __init__(self, options: RunOptions, store: RootfsStore, item: pytest.Item):
        self._options = options
        self._store = store
        self._item = item
        self.sandboxes: list[Sandbox] = item.stash.setdefault(_SANDBOXES, [])

    def __call__(self, **settings: Any) -> Sandbox:
        # pytest.fail/skip are called outside the except blocks so that the report shows our
        # sentence alone, not "during handling of the above exception...".
        try:
            return self._make(settings)
        except SandboxUnavailable as exc:
            unavailable: str | None = str(exc)
            problem = None
        except NsboxError as exc:
            unavailable, problem = None, str(exc)
        if unavailable is not None:
            if self._options.unavailable == "skip":
                pytest.skip(f"nsbox: {unavailable}")
            pytest.fail(f"nsbox: {unavailable}\n(use --nsbox-unavailable=skip to skip sandboxed "
                        "tests on such machines)", pytrace=False)
        pytest.fail(f"nsbox: {problem}", pytrace=False)

    def _make(self, settings: dict[str, Any]) -> Sandbox:
        resolved = SandboxSettings.from_kwargs(settings, defaults=self._options.defaults(),
                                               source=self._item.nodeid)
        probe = client.probe(resolved.network)
        if not probe.ok:
            raise SandboxUnavailable(f"this machine cannot make sandboxes: {probe.error}")
        if self._options.require_caps and resolved.pids_max and probe.caps and probe.caps.mechanism == "none":
            raise SandboxUnavailable(f"--nsbox-require-caps: {probe.caps.describe()}; run as a normal "
                                     "user (RLIMIT_NPROC) or give pytest a writable cgroup")
        if not isinstance(resolved.rootfs, Rootfs):
            resolved = replace(resolved, rootfs=self._store.resolve(resolved.rootfs))
        sandbox = Sandbox.from_settings(resolved)
        self.sandboxes.append(sandbox)
        return sandbox.start()

    def close(self) -> None:
        for sandbox in self.sandboxes:
            sandbox.close()


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest) -> Iterator[SandboxFactory]:
    """Make sandboxes in a test: `sandbox_factory(network="host")`; all are closed after it."""
    factory = SandboxFactory(request.config.stash[_OPTIONS], request.config.stash[_STORE], request.node)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, sandbox_factory: SandboxFactory) -> Sandbox:
    """A fresh sandbox for this test, configured by its `@pytest.mark.sandbox(...)` keywords."""
    marker = request.node.get_closest_marker("sandbox")
    if marker is not None and marker.args:
        pytest.fail(f"{request.node.nodeid}: @pytest.mark.sandbox takes keywords only, got "
                    f"{marker.args!r}; allowed: {', '.join(SandboxSettings.keys())}", pytrace=False)
    return sandbox_factory(**(marker.kwargs if marker else {}))


@pytest.fixture(scope="session")
def nsbox_defaults(pytestconfig: pytest.Config) -> SandboxSettings:
    """The run-wide sandbox settings, to build sandboxes shared by a module or session::

        @pytest.fixture(scope="module")
        def box(nsbox_defaults):
            with Sandbox.from_settings(nsbox_defaults) as sb:
                yield sb
    """
    options, store = pytestconfig.stash[_OPTIONS], pytestconfig.stash[_STORE]
    try:
        rootfs = store.resolve(options.rootfs)
    except NsboxError as exc:
        problem = str(exc)
    else:
        return replace(options.defaults(), rootfs=rootfs)
    pytest.fail(f"nsbox: {problem}", pytrace=False)
