"""Isolate mode: each test of an unmodified suite runs in a sandbox of its own (--nsbox-isolate).

Where the phases run, and why (docs/isolate.md has the trade-offs):

- **setup and teardown run in the pytest process**, every fixture scope: a session or module
  fixture is made once and torn down once, in the one process that holds it, and a server it
  starts keeps running between tests;
- **the call runs in a sandbox**: a clone of the pytest process (confine.py) in new namespaces, PID
  1 of its own, with the PID cap, memory cap and timeout of the limits; the test's own code, and
  every process, file and socket it makes, is confined there.  When the call is over the sandbox is
  killed whole, and only then is its report made;
- **the report travels back** through pytest's own serialization (transport.py),
  so the terminal, -rA, -x, --maxfail, --lf, junitxml and --durations see what they see without
  isolation.  A child that dies without a report (a crash, os._exit, a cap) is a failed test whose
  report says how it died and which limit it hit.

The network namespace is the host's by default (network="host"), so that a server a session
fixture started on localhost is reachable; network="none" in the test's marker gives it a private
loopback.
"""

from __future__ import annotations

import functools
import json
import os
import select
import signal
import sys
import time
import traceback
import warnings
from typing import TYPE_CHECKING, NamedTuple

import pytest
from _pytest.reports import TestReport
from _pytest.runner import call_and_report, show_test_item

from ..engine import caps, seccomp
from ..errors import NsboxWarning
from ..rootfs.store import SPILL_ENV
from . import confine, coverage, descriptors, transport

if TYPE_CHECKING:
    from ..settings import SandboxSettings

#: How long a killed test's sandbox may take to vanish before its report is made anyway.
_KILL_PATIENCE = 10.0
_WALL = 0x40000000  # waitpid's __WALL: children of any kind, those cloned without SIGCHLD too
_exit = os._exit  # the test may replace os._exit; the child still leaves


class Isolation(NamedTuple):
    """How one test is isolated: its settings, the host paths it may write and those it must see;
    or why it cannot be (a bad marker), which fails its call."""

    settings: SandboxSettings | None
    writable: tuple[str, ...]
    visible: tuple[str, ...] = ()
    error: str = ""


_SEEN = pytest.StashKey[tuple[object, tuple[str, ...]]]()


def must_see(config: pytest.Config) -> tuple[str, ...]:
    """What an isolated test must still see if it lies under the private /tmp or /dev/shm: the
    project, the current directory, the interpreter, sys.path, and the packages imported so far
    (an editable install is found through an import hook, not sys.path).  Worked out again only
    when one of those changed."""
    key = (os.getcwd(), tuple(sys.path), len(sys.modules))
    cached = config.stash.get(_SEEN, None)
    if cached is None or cached[0] != key:
        config.stash[_SEEN] = cached = (key, _must_see(config))
    return cached[1]


def _must_see(config: pytest.Config) -> tuple[str, ...]:
    cwd = os.getcwd()
    seen = [str(config.rootpath), cwd, sys.prefix, sys.base_prefix, *sys.path]
    shell_cwd = os.environ.get("PWD", "")  # the current directory as the user reached it: symlinks kept
    if shell_cwd and os.path.realpath(shell_cwd) == cwd:
        seen.append(shell_cwd)
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None)
        if where and where.startswith(confine.PRIVATE_PLACES) and "." not in name:
            seen.append(os.path.dirname(where))
    return tuple(p for p in seen if p and os.path.isabs(p) and os.path.exists(p))


def caches_tests_write() -> tuple[str, ...]:
    """Caches that plugins write from inside the test call, so writable in isolated tests as in a
    plain run: Hypothesis's example database (`.hypothesis/` in the current directory, or
    $HYPOTHESIS_STORAGE_DIRECTORY, or where the active settings profile puts it).  Made here if
    missing, as Hypothesis would make them, so that they can be bound in."""
    if "hypothesis" not in sys.modules:
        return ()
    places = [os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY") or os.path.join(os.getcwd(), ".hypothesis")]
    try:
        from hypothesis import settings
        database = settings.default.database
    except Exception:  # noqa: BLE001 - an unusual Hypothesis: its default place still holds
        database = None
    path = getattr(database, "path", None)  # DirectoryBasedExampleDatabase
    if isinstance(path, (str, os.PathLike)):
        places.append(os.fspath(path))
    return _made(tuple(dict.fromkeys(os.path.abspath(p) for p in places)))


@functools.lru_cache(maxsize=8)
def _made(places: tuple[str, ...]) -> tuple[str, ...]:
    """Those of `places` that exist or could be made: once per session, not once per test."""
    made = []
    for place in places:
        try:
            os.makedirs(place, exist_ok=True)
        except OSError:
            continue  # read-only here too: Hypothesis falls back to memory, in both runs alike
        made.append(place)
    return tuple(made)


def run_protocol(item: pytest.Item, nextitem: pytest.Item | None, isolation: Isolation) -> bool:
    """pytest's runtest protocol, but for the call, which runs in a sandbox."""
    ihook = item.ihook
    ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    hasrequest = hasattr(item, "_request")
    if hasrequest and not item._request:  # type: ignore[attr-defined]
        item._initrequest()  # type: ignore[attr-defined]  # a re-run, as pytest-rerunfailures does
    try:
        setup = call_and_report(item, "setup", log=True)
        if setup.passed:
            setup_only = item.config.getoption("setuponly", False)
            if item.config.getoption("setupshow", False):
                show_test_item(item, add_space=not setup_only)
            if not setup_only:
                ihook.pytest_runtest_logreport(report=call_in_sandbox(item, isolation))
        if item.session.shouldfail or item.session.shouldstop:
            nextitem = None
        call_and_report(item, "teardown", log=True, nextitem=nextitem)
    finally:
        if hasrequest:
            item._request = False  # type: ignore[attr-defined]
            item.funcargs = None  # type: ignore[attr-defined]
    ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def call_in_sandbox(item: pytest.Item, isolation: Isolation) -> TestReport:
    settings = isolation.settings
    if settings is None:
        return _failed(item, time.time(), isolation.error)
    _reap(item.config, block=False)
    plan = _plan(item.config)
    cgroup = caps.SandboxCgroup.create(plan, os.getpid(), settings.pids_max, settings.memory_max,
                                       prefix=caps.TEST_PREFIX)
    parent = os.pidfd_open(os.getpid())
    r, w = os.pipe2(os.O_CLOEXEC)
    # cgroup v1 has no CLONE_INTO_CGROUP: we place the child, which waits for that before the test.
    go_r, go_w = os.pipe2(os.O_CLOEXEC) if cgroup is not None and cgroup.version == 1 else (-1, -1)
    started = time.time()
    raised = ""
    ids = (os.getuid(), os.getgid())  # in the child's new user namespace they read 65534 until mapped
    if settings.seccomp:
        seccomp.program()  # built once, here: every child inherits it ready
    try:
        cgroup_fd = cgroup.open() if cgroup is not None and cgroup.version == 2 else -1
        try:
            # What the child may keep of our descriptors: judged here, in the host's view.
            held = descriptors.plan(item.config, isolation.writable, settings.network,
                                    {fd for fd in (r, w, parent, go_r, go_w, cgroup_fd) if fd >= 0})
            pid, pidfd = confine.fork(settings.network, cgroup_fd)
        finally:
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
    except OSError as exc:
        for fd in (r, w, parent, go_r, go_w):
            if fd >= 0:
                os.close(fd)
        if cgroup is not None:
            cgroup.destroy()
        return _failed(item, started, f"nsbox: cannot fork the test into its sandbox: {exc}")
    if pid == 0:
        try:
            descriptors.close_off(held)
            os.close(r)
            if go_w >= 0:
                os.close(go_w)
        except BaseException:  # noqa: BLE001 - the child must never go on as pytest
            _exit(1)
        _child(item, isolation, plan, ids, w, parent, go_r, held)
        _exit(1)
    for fd in (w, parent, go_r):
        if fd >= 0:
            os.close(fd)
    try:
        if go_w >= 0:
            try:
                cgroup.join(pid)  # type: ignore[union-attr]
                os.write(go_w, b"g")
            finally:
                os.close(go_w)
        data, timed_out = _read_until(r, pidfd, settings.timeout, transport.limit(settings.output_max))
    except (Exception, pytest.fail.Exception) as exc:
        # Raised in this process while the test ran: a pytest-timeout alarm, say.  It fails the
        # test, as it would have without isolation; Ctrl-C and exits still end the run.
        data, timed_out = b"", False
        raised = f"{type(exc).__name__}: {exc}\n(nsbox: raised in the pytest process while the isolated test ran)"
    except BaseException:
        _Exiting(pid, pidfd, cgroup).end()
        raise
    finally:
        os.close(r)
    try:
        # The test's code could write anything to this pipe: what does not read fails the test,
        # and only it.  Cut short (a timeout, an alarm here), it is no report at all.
        result = {} if raised or timed_out else transport.parse(data, transport.limit(settings.output_max))
        unreadable = ""
    except transport.BadReport as exc:
        result, unreadable = {}, f"nsbox: {exc}"
    del data
    # Everything the test started is gone before its report is made, and this process, not the
    # test, decides it: init is killed whatever its report says (no code of the test runs after
    # that), and only if it was alone — no child, no other thread — may its exit finish later.
    exiting = _Exiting(pid, pidfd, cgroup)
    exiting.kill()
    if "report" in result and not (raised or timed_out or unreadable) and _alone(pid):
        item.config.stash.setdefault(_EXITING, []).append(exiting)
        status, stats = 0, {}
    else:
        status, stats = exiting.end()
    if raised:
        return _failed(item, started, raised)
    if unreadable:
        return _failed(item, started, unreadable)
    try:
        if "report" in result:
            return transport.deliver(item, result)
    except transport.BadReport as exc:
        return _failed(item, started, f"nsbox: {exc}")
    except Exception as exc:  # noqa: BLE001 - checked, and still it does not replay: the test's failure
        return _failed(item, started, f"nsbox: the test's sandbox sent back a report that does not read ({exc!r})")
    return _failed(item, started, _how_it_died(status, timed_out, settings, stats, result.get("error")))


def _child(item: pytest.Item, isolation: Isolation, plan: caps.CapPlan, ids: tuple[int, int],
           w: int, parent: int, go: int, held: descriptors.Plan) -> None:
    """In the sandbox: run the call, hand its report (and coverage) back, leave.  Never returns."""
    status = 1
    try:
        confine.die_with(parent)
        os.close(parent)
        # A session of our own: no controlling terminal (no TIOCSTI into the user's shell), and
        # the terminal's signals (Ctrl-C) reach pytest, which ends us, not the test.
        os.setsid()
        settings = isolation.settings
        notes = confine.confine(*ids, confine.places(isolation.writable, isolation.visible), settings.network,
                        caps.tmpfs_size(settings.tmpfs_size, settings.memory_max, caps.default_tmpfs_size()),
                        settings.pids_max, plan.mechanism == "rlimit",
                        settings.memory_max, plan.memory_mechanism == "rlimit", settings.seccomp)
        descriptors.reopen(held)
        os.environ[SPILL_ENV] = confine.HOST_VIEW  # a rootfs the read-only cache lacks is extracted there
        if settings.pids_max and plan.mechanism.startswith("cgroup"):
            os.environ[caps.ENCLOSING_ENV] = str(settings.pids_max)  # for sandboxes made in here
        # (cgroup v1: the parent moved us meanwhile; a move costs an RCU grace period, ~1-2 ms)
        if go >= 0 and os.read(go, 1) != b"g":
            raise RuntimeError("the test process could not place the test in its cgroup")
        logged = transport.LoggedHere(item)
        coverage.measure_in_memory()
        with warnings.catch_warnings(record=True) as caught:  # under the filters pytest set
            for note in notes:
                warnings.warn(NsboxWarning(f"nsbox: {note}"))
            report = call_and_report(item, "call", log=False)
        _end_the_rest()  # so that the test process finds us alone, and need not wait for our exit
        payload = transport.collect(item, report, logged, caught)
        status = 0
    except BaseException:  # noqa: BLE001 - whatever stops the child is the test's failure
        payload = {"error": traceback.format_exc()}
    try:
        _write_all(w, json.dumps(payload).encode())
        os.close(w)  # the end of the report: the test process need not wait for our exit
    finally:
        _exit(status)


def _end_the_rest() -> None:
    """In the child, PID 1 of the test's namespaces: kill every process the test started and reap
    them all, so that the report can go before this process's own (slower) exit.  Nothing done if
    a thread the test left running here could start more: the test process then waits for the
    kernel to kill the whole namespace."""
    if len(os.listdir("/proc/self/task")) > 1:
        return
    try:
        os.kill(-1, signal.SIGKILL)  # from a namespace's init: everything in it but init
    except ProcessLookupError:
        pass  # nothing to kill
    while True:
        try:
            os.waitpid(-1, _WALL)
        except ChildProcessError:
            return


def _alone(pid: int) -> bool:
    """Whether the test's init, killed by now, was all that was left of its namespace: one thread,
    no child.  Every process of a PID namespace descends from its init (orphans are re-parented to
    it), and a killed process can no longer fork, so no child can appear after this look."""
    try:
        if os.listdir(f"/proc/{pid}/task") != [str(pid)]:
            return False
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return not f.read().strip()
    except OSError:
        return False


def _read_until(r: int, pidfd: int, timeout: float | None, most: int) -> tuple[bytearray, bool]:
    """What the child writes, until it closes the pipe, but never more than `most` + 1 bytes (the
    test's code can write to the pipe: beyond that it is too big, and the child is killed
    unread); (data, whether the timeout ran out)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    data = bytearray()
    while len(data) <= most:
        wait = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _, _ = select.select([r], [], [], wait)
        if not ready:
            return data, True
        chunk = os.read(r, min(1 << 16, most + 1 - len(data)))
        if not chunk:
            break
        data += chunk
    return data, False


class _Exiting(NamedTuple):
    """A test's sandbox that is over: its PID 1 (a pidfd to it) and its cgroup."""

    pid: int
    pidfd: int
    cgroup: caps.SandboxCgroup | None

    def end(self) -> tuple[int, dict[str, int]]:
        """Kill the sandbox (its PID 1: the kernel kills the rest), wait until the kernel has reaped
        all of it, remove its cgroup: (wait status, the cgroup's counters)."""
        self.kill()
        select.select([self.pidfd], [], [], _KILL_PATIENCE)
        os.close(self.pidfd)
        _pid, status = os.waitpid(self.pid, 0)
        stats = self.cgroup.stats() if self.cgroup is not None else {}
        if self.cgroup is not None:
            self.cgroup.destroy()
        return status, stats

    def kill(self) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def exited(self) -> bool:
        return bool(select.select([self.pidfd], [], [], 0)[0])


_EXITING = pytest.StashKey[list[_Exiting]]()


def _reap(config: pytest.Config, block: bool) -> None:
    """End the sandboxes of tests that reported alone: their PID 1 was only exiting.  One still
    there at the next test (or at the end) is killed: its test's code outlived its own report."""
    left = []
    for exiting in config.stash.get(_EXITING, []):
        if block or exiting.exited():
            exiting.end()
        else:
            exiting.kill()  # harmless to a process that is exiting; the end of one that is not
            left.append(exiting)
    config.stash[_EXITING] = left


def _how_it_died(status: int, timed_out: bool, settings: SandboxSettings, stats: dict[str, int],
                 error: str | None) -> str:
    if error:
        return f"nsbox: the test's sandbox failed before the test could run:\n{error}"
    if timed_out:
        return f"nsbox: the test was killed at its timeout of {settings.timeout:g} s, with everything it started"
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        how = f"the test's process was killed by {name}"
    else:
        how = f"the test's process exited with status {code} (os._exit?) before its report was made"
    if stats.get("oom_kills"):
        how += f"; the out-of-memory killer acted at its memory_max of {settings.memory_max >> 20}M"
    if stats.get("pids_max_hits"):
        how += f"; forks were refused at its pids_max of {settings.pids_max}"
    return f"nsbox: {how}"


def _failed(item: pytest.Item, started: float, longrepr: str) -> TestReport:
    stopped = time.time()
    return TestReport(item.nodeid, item.location, {name: 1 for name in item.keywords}, "failed",
                      longrepr, "call", duration=stopped - started, start=started, stop=stopped,
                      user_properties=item.user_properties)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


_PLAN = pytest.StashKey[caps.CapPlan]()


def _plan(config: pytest.Config) -> caps.CapPlan:
    """How the test processes of this pytest process are capped: chosen once, as the spawner does."""
    if _PLAN not in config.stash:
        config.stash[_PLAN] = caps.detect()
    return config.stash[_PLAN]


def finish(config: pytest.Config) -> None:
    """The run is over: end the sandboxes still exiting, remove the shared cgroup parents if
    nothing else uses them."""
    _reap(config, block=True)
    plan = config.stash.get(_PLAN, None)
    if plan is not None:
        caps.remove_parents(plan)


