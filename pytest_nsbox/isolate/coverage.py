"""Coverage of an isolated test's call: measured in the child, sent as data, merged here.

The child may not write next to the project (it is read-only in the sandbox), and ends with
os._exit, which saves nothing; so the lines (or arcs) it measured travel back with its report.
As data: coverage.py's own dumps() is an SQL script, and loading one runs it in the pytest process.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

import pytest

from ..errors import NsboxWarning
from .reports import BadReport, dict_of, either, is_bool, is_int, list_of, record, tuple_of

#: coverage.py keeps a file's lines as a bitmap of max(line) bits: bounds on what one test may add.
MAX_LINE = 1_000_000
MAX_LINE_BITS = 16 << 20  # bytes of bitmaps one test's lines may take in the pytest process

_COVERAGE = pytest.StashKey[Any]()


_MEASURED_HERE: list[Any] = []  # in the child: the in-memory data its collector records into


def measure_in_memory() -> None:
    """In the child, before the call: coverage.py records into memory, not into the data file
    the parent opened.  The project is read-only in the sandbox, and pytest-cov's --cov-context
    switches contexts during the call, which writes what was measured so far."""
    collector = _collector()
    if collector is None or _MEASURED_HERE:
        return
    import coverage
    data = coverage.CoverageData(no_disk=True)
    context = getattr(getattr(collector, "covdata", None), "_current_context", None)  # pytest-cov's, say
    collector.use_data(data, getattr(collector, "static_context", None))
    data.set_context(context)
    _MEASURED_HERE.append(data)


def _collector() -> Any:
    if "coverage" not in sys.modules:
        return None
    import coverage
    return getattr(coverage.Coverage.current(), "_collector", None)


def measured() -> dict[str, Any] | None:
    """The lines (or arcs) the child measured, by context, for the parent: the child may not write
    next to the project (it is read-only in the sandbox), and ends with os._exit, which saves
    nothing.  Sent as data: coverage.py's own dumps() is an SQL script, run by loads()."""
    collector = _collector()
    if collector is None:
        return None
    measure_in_memory()  # if the child did not yet: the lines since the parent last saved
    import coverage
    coverage.Coverage.current().stop()
    data = _MEASURED_HERE[0]
    collector.flush_data()
    arcs = data.has_arcs()
    contexts = {}
    for name in sorted(data.measured_contexts()):
        data.set_query_context(name)
        measured = {path: (data.arcs(path) if arcs else data.lines(path)) or [] for path in data.measured_files()}
        contexts[name] = {path: [list(arc) for arc in numbers] if arcs else numbers
                          for path, numbers in measured.items() if numbers}
    tracers = {path: data.file_tracer(path) for path in data.measured_files()}
    return {"arcs": arcs, "contexts": contexts, "tracers": {k: v for k, v in tracers.items() if v}}


def _is_path(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 4096 and "\0" not in v


def _is_line(v: Any) -> bool:
    return is_int(v) and 0 < v <= MAX_LINE


def _is_arc_end(v: Any) -> bool:
    return is_int(v) and -MAX_LINE <= v <= MAX_LINE  # negative: entries to and exits from code objects


_COVERAGE_SHAPE = record({
    "arcs": is_bool,
    "contexts": dict_of(lambda v: isinstance(v, str) and len(v) <= 4096,
                         dict_of(_is_path, either(list_of(_is_line), list_of(tuple_of(_is_arc_end, _is_arc_end))))),
    "tracers": dict_of(_is_path, lambda v: isinstance(v, str) and 0 < len(v) <= 200)})


def checked(sent: Any) -> dict[str, Any] | None:
    """What the child measured, checked: the shape `measured` makes, line numbers that
    coverage.py's bitmaps can hold, arcs if and only if it said so."""
    if sent is None:
        return None
    what = "the test's sandbox sent back coverage data that does not read"
    if not _COVERAGE_SHAPE(sent):
        raise BadReport(f"{what} (not measured files mapped to line numbers of at most {MAX_LINE}, or to arcs)")
    bits = 0
    for measured in sent["contexts"].values():
        for numbers in measured.values():
            if numbers and isinstance(numbers[0], list) != sent["arcs"]:
                raise BadReport(f"{what} (lines and arcs mixed)")
            if not sent["arcs"]:
                bits += max(numbers, default=0) // 8 + 1
    if bits > MAX_LINE_BITS:
        raise BadReport(f"{what} (its lines would take more than {MAX_LINE_BITS >> 20} MiB)")
    return sent


def merge(config: pytest.Config, sent: dict[str, Any]) -> None:
    """Add what the child measured (checked) to the run's isolated lines, through coverage.py's
    API for data: never a script.  Nothing to add to if this process measures nothing."""
    import coverage
    cov = coverage.Coverage.current()
    if cov is None:
        return
    if sent["arcs"] != bool(cov.get_option("run:branch")):
        # Or one test's arcs would make every other test's lines fail to merge, and the run's too.
        raise BadReport("the test's sandbox sent back coverage data that does not read "
                        f"({'arcs' if sent['arcs'] else 'lines'}, but this run measures "
                        f"{'arcs' if cov.get_option('run:branch') else 'lines'})")
    merged = config.stash.get(_COVERAGE, None)
    if merged is None:
        merged = config.stash[_COVERAGE] = coverage.CoverageData(no_disk=True)
    try:
        for context, measured in sent["contexts"].items():
            merged.set_context(context)
            if sent["arcs"]:
                merged.add_arcs({path: [tuple(arc) for arc in arcs] for path, arcs in measured.items()})
            else:
                merged.add_lines(measured)
        merged.add_file_tracers(sent["tracers"])
    except coverage.CoverageException as exc:
        raise BadReport(f"the test's sandbox sent back coverage data that does not read ({exc})") from None


def flush(config: pytest.Config) -> None:
    """At the end of the run, before pytest-cov saves: the isolated tests' lines join the rest."""
    merged = config.stash.get(_COVERAGE, None)
    if merged is None:
        return
    import coverage
    cov = coverage.Coverage.current()
    if cov is None:
        return
    try:
        cov.get_data().update(merged)
    except coverage.CoverageException as exc:  # lines against branches, or a tracer against another
        warnings.warn(NsboxWarning(f"nsbox: the isolated tests' coverage could not be added to the run's: {exc}; "
                                   "measure them all with the same options (--cov-branch, plugins)"))
