"""The pytest glue: options, the `sandbox` marker, fixtures, report lines and failure sections.

Everything of substance lives in `Sandbox`; this module only maps pytest's conventions onto it.
A run that makes no sandbox pays for nothing but this module and `options`: the engine, the rootfs
store and the spawner are loaded and started when the first sandboxed test is collected.

Precedence of settings: ini < environment (NSBOX_*) < command line < marker keywords, the marker
closest to the test winning keyword by keyword (function, then class, then module).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import pytest

from ..errors import ConfigError, NsboxError, SandboxUnavailable
from ..settings import SandboxSettings, anchored, unknown_keywords
from .options import RunOptions, add_options, human_size

if TYPE_CHECKING:
    from ..engine.sandbox import Sandbox
    from ..rootfs.store import RootfsStore

MARKER_HELP = ("sandbox(isolate=False, profile=None, **settings): configure this test's `sandbox` and "
               "`sandbox_factory` fixtures with the keywords of pytest_nsbox.Sandbox ("
               + ", ".join(SandboxSettings.keys()) + "); profile= a [tool.nsbox.profiles.NAME] of "
               "pyproject.toml under them; isolate=True runs the test itself in a sandbox")
#: A test that takes one of these makes sandboxes.
SANDBOX_FIXTURES = ("sandbox", "sandbox_factory", "nsbox_defaults", "module_sandbox", "session_sandbox",
                    "shared_sandbox_factory")

_OPTIONS = pytest.StashKey[RunOptions]()
_STORE = pytest.StashKey["RootfsStore"]()
_SANDBOXES = pytest.StashKey[list["Sandbox"]]()
_ISOLATING = pytest.StashKey[bool]()
_DEFAULTS = pytest.StashKey[SandboxSettings]()
_PROFILES = pytest.StashKey[tuple[Any, dict[str, Any]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    options = config.stash[_OPTIONS] = RunOptions.from_config(config)
    debugger = [flag for flag, dest in (("--pdb", "usepdb"), ("--trace", "trace")) if config.getoption(dest, False)]
    if options.isolate and debugger:
        raise pytest.UsageError(f"--nsbox-isolate runs each test in a sandboxed copy of pytest, where "
                                f"{debugger[0]} cannot reach your terminal: drop --nsbox-isolate to debug")
    # A bad run-wide setting, or profile, is a usage error now, not in every test.
    try:
        _defaults(config)
    except NsboxError as exc:
        raise pytest.UsageError(f"nsbox: {exc}") from None
    from ..rootfs.alpine import mirror_url
    from ..rootfs.specs import parse as parse_spec
    try:
        mirror_url(options.mirror)
    except NsboxError as exc:
        raise pytest.UsageError(f"nsbox: {exc}") from None
    try:
        parse_spec(options.rootfs)
    except NsboxError as exc:
        raise pytest.UsageError(f"--nsbox-rootfs: {exc}") from None


def _defaults(config: pytest.Config) -> SandboxSettings:
    """The run-wide settings: ini < environment < command line, then --nsbox-profile's."""
    if _DEFAULTS not in config.stash:
        options = config.stash[_OPTIONS]
        defaults = options.defaults()
        if options.profile:
            defaults = SandboxSettings.from_kwargs(_profile(config, options.profile, "--nsbox-profile"),
                                                   defaults=defaults, source=f"profile {options.profile!r}")
        config.stash[_DEFAULTS] = defaults
    return config.stash[_DEFAULTS]


def _profile(config: pytest.Config, name: object, asked_by: str) -> dict[str, Any]:
    from .. import profiles
    if _PROFILES not in config.stash:
        path = profiles.find_pyproject(config.rootpath)
        config.stash[_PROFILES] = (path, profiles.load(path))
    path, found = config.stash[_PROFILES]
    return profiles.pick(found, name, path, asked_by, searched=config.rootpath)


def with_profile(config: pytest.Config, keywords: dict[str, Any], source: str) -> dict[str, Any]:
    """A marker's (or factory's) keywords with its `profile=` expanded under them."""
    if "profile" not in keywords:
        return keywords
    keywords = dict(keywords)
    name = keywords.pop("profile")
    return {**_profile(config, name, f"{source}: profile="), **keywords}


def _store(config: pytest.Config) -> RootfsStore:
    """The rootfs store, made on first use (its module loads the cache and download code)."""
    if _STORE not in config.stash:
        from ..rootfs.store import RootfsStore
        from .downloads import Progress, run_id
        options = config.stash[_OPTIONS]
        config.stash[_STORE] = RootfsStore(options.cache_dir, options.mirror, options.offline,
                                           progress=Progress(config), timeout=options.download_timeout,
                                           run_id=run_id(config))
    return config.stash[_STORE]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("sandbox") is not None and not _makes_sandboxes(item) \
                and not _isolated(item):
            item.warn(pytest.PytestWarning(
                f"{item.nodeid} is marked @pytest.mark.sandbox but takes neither the `sandbox` nor the "
                "`sandbox_factory` fixture: the marker configures nothing, and the test runs on the "
                "host, unsandboxed"))


def _makes_sandboxes(item: pytest.Item) -> bool:
    names = getattr(item, "fixturenames", ())
    return any(name in names for name in SANDBOX_FIXTURES)


def pytest_report_header(config: pytest.Config) -> list[str]:
    # An xdist controller collects nothing and makes no sandbox: say what its workers will use.
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        options = config.stash[_OPTIONS]
        return [f"nsbox: rootfs {options.rootfs}; cache {_store(config).cache_dir}"
                + ("; offline" if options.offline else "")]
    return []


def pytest_report_collectionfinish(config: pytest.Config, items: Sequence[pytest.Item]) -> list[str]:
    """Where the sandboxes come from, whether this machine can make them, and how they are
    capped — once sandboxed tests are collected, so a run without any starts nothing."""
    if not any(_makes_sandboxes(item) for item in items):
        return []
    from ..engine import client
    options, store = config.stash[_OPTIONS], _store(config)
    cached = store.cached(options.rootfs)
    rootfs = cached.describe() if cached else f"{options.rootfs} (not cached yet: fetched on first use)"
    probe = client.probe("none")
    state = "available" if probe.ok else f"UNAVAILABLE: {probe.error} (`nsbox doctor` checks each step)"
    lines = [f"nsbox: rootfs {rootfs}; cache {store.cache_dir}" + ("; offline" if options.offline else ""),
             f"nsbox: namespaces user,mnt,pid,ipc,uts,cgroup,net: {state}"]
    if probe.caps is not None:
        defaults = _defaults(config)
        lines.append(f"nsbox: caps: {probe.caps.describe()}; default pids_max {defaults.pids_max or 'none'}"
                     + (f", memory_max {human_size(defaults.memory_max)}" if defaults.memory_max else "")
                     + (f", timeout {defaults.timeout:g} s" if defaults.timeout else ""))
    return lines


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    report = yield
    if not report.failed or "pytest_nsbox.engine.sandbox" not in sys.modules:
        return report  # (a run that made no sandbox loads nothing for its failures)
    from ..engine.sandbox import LIVE
    own = item.stash.get(_SANDBOXES, [])
    # The test's own sandboxes, those of module or session fixtures it ran commands in, and those
    # it was handed (a session's server it only talked to through a published port).
    handed = {id(value) for value in (getattr(item, "funcargs", None) or {}).values()}
    used = [(sb, 0.0) for sb in own if sb.history]
    used += [(sb, call.start) for sb in list(LIVE) if sb not in own
             and (id(sb) in handed or any(record.started >= call.start for record in sb.history))]
    if used:
        from .report import describe
        kept = {}
        if item.config.stash[_OPTIONS].keep_on_failure:
            keeper = _keeper(item.config)
            # A module's or session's sandbox too: its tree as this test left it.
            kept = {id(sb): keeper.keep(sb, f"{item.nodeid}-{number}") for number, (sb, _since) in enumerate(used, 1)}
        report.sections.append((f"nsbox sandbox commands ({report.when})", describe(used, kept)))
    return report


_KEEPER = pytest.StashKey[Any]()


def _keeper(config: pytest.Config) -> Any:
    from .report import Keeper
    if _KEEPER not in config.stash:
        where = config._tmp_path_factory.getbasetemp() / "nsbox-kept"  # type: ignore[attr-defined]
        config.stash[_KEEPER] = Keeper(where, config.stash[_OPTIONS].keep_on_failure_max)
    return config.stash[_KEEPER]


#: What the marker takes: its own keywords, then those of `Sandbox(...)`.
MARKER_KEYWORDS = ("isolate", "profile", *SandboxSettings.keys())


def marker_keywords(item: pytest.Item) -> dict[str, Any]:
    """The keywords of every `sandbox` marker on the test, the closest winning keyword by keyword,
    with relative paths anchored at the rootdir (as `cd tests && pytest` must find the same files);
    raises NsboxError (ConfigError) on positional arguments and unknown keywords."""
    merged = _merged_kwargs(item)
    for marker in item.iter_markers("sandbox"):
        if marker.args:
            raise ConfigError(f"{item.nodeid}: @pytest.mark.sandbox takes keywords only, got "
                              f"{marker.args!r}; allowed: {', '.join(MARKER_KEYWORDS)}")
    unknown = set(merged) - set(MARKER_KEYWORDS)
    if unknown:
        raise unknown_keywords(f"{item.nodeid}: @pytest.mark.sandbox", unknown, MARKER_KEYWORDS)
    return anchored(merged, item.config.rootpath)


def _merged_kwargs(item: pytest.Item) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for marker in reversed(list(item.iter_markers("sandbox"))):
        merged.update(marker.kwargs)
    return merged


def marker_settings(item: pytest.Item) -> dict[str, Any]:
    """The marker keywords that configure the test's sandboxes (all but `isolate`)."""
    # pytest.fail outside the except block: the report shows the sentence once, without "during
    # handling of the above exception".
    try:
        merged = marker_keywords(item)
    except NsboxError as exc:
        problem = str(exc)
    else:
        merged.pop("isolate", None)
        return merged
    pytest.fail(problem, pytrace=False)


def _isolated(item: pytest.Item) -> bool:
    # From the keywords alone: a marker with a mistake still isolates (and reports the mistake).
    return bool(_merged_kwargs(item).get("isolate", item.config.stash[_OPTIONS].isolate))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> bool | None:
    """Isolated tests run their call in a sandbox (isolate/protocol.py); others run as pytest runs them."""
    if not _isolated(item):
        return None
    config = item.config
    if config.getoption("usepdb", False) or config.getoption("trace", False):
        # Only marked tests get here (run-wide isolation refuses --pdb): they run unisolated.
        item.warn(pytest.PytestWarning(f"{item.nodeid} runs without isolation under --pdb/--trace"))
        return None
    from ..isolate.protocol import Isolation, caches_tests_write, must_see, run_protocol
    config.stash[_ISOLATING] = True
    options = config.stash[_OPTIONS]
    try:
        keywords = marker_keywords(item)
        keywords.pop("isolate", None)
        keywords = with_profile(config, keywords, item.nodeid)
        settings = SandboxSettings.from_kwargs({"network": "host", **keywords}, defaults=_defaults(config),
                                               source=item.nodeid, also_allowed=("profile",))
    except NsboxError as exc:
        return run_protocol(item, nextitem, Isolation(None, (), (), f"nsbox: {exc}"))
    writable = (str(config._tmp_path_factory.getbasetemp()), *options.isolate_writable,  # type: ignore[attr-defined]
                *caches_tests_write())
    visible = must_see(config)
    if _makes_sandboxes(item):
        # The rootfs store is read-only inside: fetch and extract the test's rootfs out here, once.
        spec = settings.rootfs or options.rootfs
        try:
            _store(config).resolve(spec)
        except NsboxError:
            pass  # the fixture, inside, reports it
        visible += (str(_store(config).cache_dir),)
        if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec):
            visible += (os.path.abspath(spec),)  # a local tarball: the store checks it is still there
    return run_protocol(item, nextitem, Isolation(settings, writable, visible))


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtestloop(session: pytest.Session) -> Iterator[Any]:
    # Inner to pytest-cov's wrapper: the isolated tests' coverage is merged before it saves.
    try:
        return (yield)
    finally:
        if session.config.stash.get(_ISOLATING, False):
            from ..isolate.coverage import flush
            flush(session.config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """pytest-xdist, before a worker starts: hand it this run's id (see plugin/downloads.py)."""
    from .downloads import WORKER_KEY, run_id
    node.workerinput[WORKER_KEY] = run_id(node.config)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config.stash.get(_ISOLATING, False):
        from ..isolate.protocol import finish
        finish(config)


class SandboxFactory:
    """Makes sandboxes for one test (keywords as for `Sandbox`, over the test's marker keywords);
    closes them all after it.  For a module or the session, `item` is that node: its markers
    (a module's `pytestmark`) configure the sandboxes, which are closed after its last test."""

    def __init__(self, config: pytest.Config, item: pytest.Node):
        self._config = config
        self._options = config.stash[_OPTIONS]
        self._item = item
        self._label = item.nodeid or "shared_sandbox_factory"  # (the session's nodeid is "")
        self._marked = marker_settings(item)
        self.sandboxes: list[Sandbox] = item.stash.setdefault(_SANDBOXES, [])

    def __call__(self, **settings: Any) -> Sandbox:
        # pytest.fail/skip are called outside the except blocks so that the report shows our
        # sentence alone, not "during handling of the above exception...".
        try:
            # As the marker's: relative paths are the rootdir's, wherever pytest was started.
            return self._make({**self._marked, **anchored(settings, self._config.rootpath)})
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
        from ..engine import client
        from ..engine.sandbox import Sandbox
        from ..rootfs.store import Rootfs
        settings = with_profile(self._config, settings, self._label)
        resolved = SandboxSettings.from_kwargs(settings, defaults=_defaults(self._config),
                                               source=self._label, also_allowed=("profile",))
        probe = client.probe(resolved.network)
        if not probe.ok:
            raise SandboxUnavailable(f"this machine cannot make sandboxes: {probe.error}")
        if self._options.require_caps and resolved.pids_max and probe.caps and probe.caps.mechanism == "none":
            raise SandboxUnavailable(f"--nsbox-require-caps: {probe.caps.describe()}; run as a normal "
                                     "user (RLIMIT_NPROC) or give pytest a writable cgroup")
        store = _store(self._config)
        if not isinstance(resolved.rootfs, Rootfs):
            resolved = replace(resolved, rootfs=store.resolve(resolved.rootfs))
        if resolved.layers:
            resolved = replace(resolved, layers=tuple(
                layer if isinstance(layer, Rootfs) else store.resolve(layer, layer=True) for layer in resolved.layers))
        sandbox = Sandbox.from_settings(resolved)
        self.sandboxes.append(sandbox)
        return sandbox.start()

    def close(self) -> None:
        for sandbox in self.sandboxes:
            sandbox.close()


@pytest.fixture
def sandbox_factory(request: pytest.FixtureRequest) -> Iterator[SandboxFactory]:
    """Make sandboxes in a test: `sandbox_factory(network="host")`; all are closed after it."""
    factory = SandboxFactory(request.config, request.node)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def sandbox(sandbox_factory: SandboxFactory) -> Sandbox:
    """A fresh sandbox for this test, configured by its `@pytest.mark.sandbox(...)` keywords."""
    return sandbox_factory()


@pytest.fixture(scope="session")
def shared_sandbox_factory(request: pytest.FixtureRequest) -> Iterator[SandboxFactory]:
    """Make sandboxes in a fixture of any scope, closed at the end of the session (or by their
    `close()`): `shared_sandbox_factory(rootfs=..., network="host")` in a session fixture that
    starts a server.  Keywords as for `sandbox_factory`; no marker applies."""
    factory = SandboxFactory(request.config, request.session)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """One sandbox for every test of the module that asks for it, configured by the module's
    `pytestmark = pytest.mark.sandbox(...)`; closed after the module's last test."""
    factory = SandboxFactory(request.config, request.node)
    try:
        yield factory()
    finally:
        factory.close()


@pytest.fixture(scope="session")
def session_sandbox(shared_sandbox_factory: SandboxFactory) -> Sandbox:
    """One sandbox for the whole session (each xdist worker has its own), with the run-wide
    settings (--nsbox-rootfs, --nsbox-profile, ...)."""
    return shared_sandbox_factory()


@pytest.fixture(scope="session")
def nsbox_defaults(pytestconfig: pytest.Config) -> SandboxSettings:
    """The run-wide sandbox settings, to build sandboxes shared by a module or session::

        @pytest.fixture(scope="module")
        def box(nsbox_defaults):
            with Sandbox.from_settings(nsbox_defaults) as sb:
                yield sb
    """
    options = pytestconfig.stash[_OPTIONS]
    try:
        rootfs = _store(pytestconfig).resolve(options.rootfs)
    except NsboxError as exc:
        problem = str(exc)
    else:
        return replace(_defaults(pytestconfig), rootfs=rootfs)
    pytest.fail(f"nsbox: {problem}", pytrace=False)
