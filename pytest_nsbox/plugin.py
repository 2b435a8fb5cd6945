"""The pytest glue: options, the `sandbox` marker, fixtures, the header and failure sections.

Everything of substance lives in `Sandbox`; this module only maps pytest's conventions onto it.
Precedence of run-wide settings: ini < environment (NSBOX_*) < command line < marker keywords.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from . import client
from .errors import ConfigError, NsboxError, SandboxUnavailable
from .rootfs import default_cache_dir
from .sandbox import Sandbox
from .settings import SandboxSettings

UNAVAILABLE_CHOICES = ("fail", "skip")
MARKER_HELP = ("sandbox(**settings): configure this test's `sandbox` fixture with the keywords of "
               "pytest_nsbox.Sandbox: " + ", ".join(SandboxSettings.keys()))


@dataclass(frozen=True)
class RunOptions:
    """The run-wide settings, resolved once from ini, environment and command line."""

    rootfs: str | None
    cache_dir: str
    unavailable: str

    @classmethod
    def from_config(cls, config: pytest.Config) -> RunOptions:
        unavailable = _option(config, "nsbox_unavailable", "NSBOX_UNAVAILABLE") or "fail"
        if unavailable not in UNAVAILABLE_CHOICES:
            raise pytest.UsageError(f"--nsbox-unavailable must be one of {', '.join(UNAVAILABLE_CHOICES)}, "
                                    f"not {unavailable!r}")
        return cls(rootfs=_option(config, "nsbox_rootfs", "NSBOX_ROOTFS", path=True),
                   cache_dir=_option(config, "nsbox_cache_dir", "NSBOX_CACHE_DIR", path=True)
                   or str(default_cache_dir()),
                   unavailable=unavailable)

    def defaults(self) -> SandboxSettings:
        return SandboxSettings(rootfs=self.rootfs, cache_dir=self.cache_dir)


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


_OPTIONS = pytest.StashKey[RunOptions]()
_SANDBOXES = pytest.StashKey[list[Sandbox]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("nsbox", "hermetic Linux sandboxes (pytest-nsbox)")
    group.addoption("--nsbox-rootfs", dest="nsbox_rootfs", metavar="PATH", default=None,
                    help="root filesystem of sandboxes: an Alpine minirootfs tarball or directory "
                         "(env NSBOX_ROOTFS, ini nsbox_rootfs)")
    group.addoption("--nsbox-cache-dir", dest="nsbox_cache_dir", metavar="DIR", default=None,
                    help="where extracted root filesystems are kept (env NSBOX_CACHE_DIR, ini "
                         "nsbox_cache_dir; default $XDG_CACHE_HOME/pytest-nsbox)")
    group.addoption("--nsbox-unavailable", dest="nsbox_unavailable", choices=UNAVAILABLE_CHOICES,
                    default=None, help="what sandboxed tests do where this kernel cannot make "
                                       "sandboxes: fail (default) or skip (ini nsbox_unavailable)")
    parser.addini("nsbox_rootfs", "root filesystem of sandboxes (tarball or directory)", default=None)
    parser.addini("nsbox_cache_dir", "where extracted root filesystems are kept", default=None)
    parser.addini("nsbox_unavailable", "fail or skip sandboxed tests where sandboxes cannot be made",
                  default=None)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.stash[_OPTIONS] = RunOptions.from_config(config)


def pytest_report_header(config: pytest.Config) -> list[str]:
    options = config.stash[_OPTIONS]
    ok, why = client.probe("none")
    state = "available" if ok else f"UNAVAILABLE: {why}"
    return [f"nsbox: rootfs {options.rootfs or '(none: set --nsbox-rootfs)'}, cache {options.cache_dir}",
            f"nsbox: namespaces user,mnt,pid,ipc,uts,cgroup,net: {state}"]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    sandboxes = item.stash.get(_SANDBOXES, [])
    if report.failed and any(sb.history for sb in sandboxes):
        report.sections.append((f"nsbox sandbox commands ({report.when})", _describe(sandboxes)))
    return report


def _describe(sandboxes: list[Sandbox]) -> str:
    lines = []
    for number, sb in enumerate(sandboxes, 1):
        lines.append(f"sandbox {number}: rootfs {sb.settings.rootfs}, network {sb.settings.network}")
        for record in sb.history:
            status = "timed out" if record.timed_out else f"exit {record.returncode}" \
                if record.returncode is not None else "still running"
            lines.append(f"  $ {_shell_form(record.args)}  -> {status} ({record.duration * 1000:.0f} ms)")
            for line in record.stderr_tail.splitlines():
                lines.append(f"    stderr| {line}")
    return "\n".join(lines)


def _shell_form(args: Any) -> str:
    import shlex
    return args if isinstance(args, str) else shlex.join(args)


class SandboxFactory:
    """Makes sandboxes for one test (keywords as for `Sandbox`); closes them all after it."""

    def __init__(self, options: RunOptions, item: pytest.Item):
        self._options = options
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
        if resolved.rootfs is None:
            raise ConfigError("no rootfs configured: pass --nsbox-rootfs=PATH (an Alpine minirootfs "
                              "tarball or tree), set NSBOX_ROOTFS, or nsbox_rootfs in the ini file")
        ok, why = client.probe(resolved.network)
        if not ok:
            raise SandboxUnavailable(f"this machine cannot make sandboxes: {why}")
        sandbox = Sandbox.from_settings(resolved)
        self.sandboxes.append(sandbox)
        return sandbox.start()

    def close(self) -> None:
        for sandbox in self.sandboxes:
            sandbox.close()


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest) -> Iterator[SandboxFactory]:
    """Make sandboxes in a test: `sandbox_factory(network="host")`; all are closed after it."""
    factory = SandboxFactory(request.config.stash[_OPTIONS], request.node)
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
    return pytestconfig.stash[_OPTIONS].defaults()
