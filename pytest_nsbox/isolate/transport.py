"""What crosses from an isolated test's call back to the pytest process, and how.

The child sends one JSON object when the call is over: the call's report through pytest's own
report serialization, the reports logged during the call (one per subtest), pytest's count of
failed subtests, the warnings caught, and the lines coverage.py measured.  The parent replays each
where pytest would have seen it without isolation.

The test's own code runs in the child and can write anything to that pipe, so all of it is read as
hostile data: never pickle (unpickling runs code), never coverage.py's SQL dumps (loading one runs
its script in the pytest process), a size limit, a depth limit, and a check of every field against
what pytest itself makes before anything is replayed.  A payload that fails a check fails only its
test, with a sentence saying what was wrong (`BadReport`).
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
from _pytest.reports import TestReport

from ..settings import DEFAULT_OUTPUT_MAX
from . import coverage
from .reports import (WARNING, BadReport, check_field, check_report, is_bool, is_count, is_dict, is_str, list_of,
                      optional)

#: Deepest nesting of a payload: pytest's reports nest about 12 deep (a chained traceback's
#: entries); deeper data would only feed recursion in whatever replays it (xdist's channel too).
MAX_DEPTH = 64
#: Most JSON values (numbers, strings, containers) in one payload: a 64 MiB payload of `[[],[],...`
#: would otherwise take 20 times its size once parsed.  A test covering 100k lines sends 100k.
MAX_VALUES = 1 << 20
_COUNT_ABOVE = 1 << 20  # smaller payloads cannot grow past ~20 MiB once parsed: not worth counting
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')


def limit(output_max: int | None) -> int:
    """The most bytes a test's sandbox may send back: its output_max (the report carries its
    captured output, which pytest holds in memory anyway), 64 MiB if that is None: the pytest
    process must never hold an unbounded write of the test's."""
    return output_max if output_max is not None else DEFAULT_OUTPUT_MAX


def parse(data: bytes | bytearray, most: int) -> dict[str, Any]:
    """The child's payload (b"" if it sent none: {}), read as hostile: BadReport unless it is a
    JSON object of at most `most` bytes, MAX_VALUES values and MAX_DEPTH levels."""
    if len(data) > most:
        raise BadReport(f"the test's sandbox sent back a report bigger than {_size(most)}, its output_max: "
                        "its captured output is too big, or its code wrote to the report pipe; if the "
                        "output is expected, raise output_max in the test's sandbox marker")
    if not data:
        return {}
    if len(data) > _COUNT_ABOVE and _values(data) > MAX_VALUES:
        raise _unreadable(f"more than {MAX_VALUES} values")
    try:
        result = json.loads(data)
    except RecursionError:
        raise _unreadable(f"nested deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:  # UnicodeDecodeError too
        raise _unreadable(f"not JSON: {exc}") from None
    if not isinstance(result, dict):
        raise _unreadable("not a JSON object")
    if _depth(result) > MAX_DEPTH:
        raise _unreadable(f"nested deeper than {MAX_DEPTH} levels")
    check_field("the test's sandbox sent back a report", result, "error", optional(is_str))
    check_field("the test's sandbox sent back a report", result, "alone", optional(is_bool))
    return result


def _values(data: bytes | bytearray) -> int:
    """At least how many values `data` holds, if it is JSON: one more than its commas and opening
    brackets outside strings.  Counted in strings too first, as that is fast; and only if that
    is too many, again without what is in strings (captured output full of commas)."""
    def count(text: bytes | bytearray) -> int:
        return text.count(b",") + text.count(b"[") + text.count(b"{") + 1
    values = count(data)
    return values if values <= MAX_VALUES else count(_STRING.sub(b'""', data))


def _unreadable(why: str) -> BadReport:
    return BadReport(f"the test's sandbox sent back a report that does not read ({why})")


def _size(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 and not n % (1 << 20) else f"{n} bytes"


def _depth(value: Any) -> int:
    """How deep `value` nests (up to MAX_DEPTH + 1), level by level: without recursion, since
    json.loads may have made it as deep as its own limit."""
    depth, level = 0, [value] if isinstance(value, (dict, list)) else []
    while level and depth <= MAX_DEPTH:
        depth += 1
        below: list[Any] = []
        for container in level:
            below.extend(v for v in (container.values() if isinstance(container, dict) else container)
                         if isinstance(v, (dict, list)))
        level = below
    return depth


def collect(item: pytest.Item, report: TestReport, logged: LoggedHere,
            caught: Sequence[warnings.WarningMessage]) -> dict[str, Any]:
    """In the child, after the call: all the pytest process needs to know of it."""
    return {"report": serialize(item, report), "logged": logged.reports,
            "failed_subtests": failed_subtests(item),
            "warnings": [_warning_data(w) for w in caught],
            "coverage": coverage.measured() if "coverage" in sys.modules else None,
            "log_file": logged.log_file_text()}


def deliver(item: pytest.Item, sent: dict[str, Any]) -> TestReport:
    """In the pytest process: what `collect` sent, checked whole, then replayed here; the call's
    report.  BadReport for anything but the item's own call report and subtests' reports of the
    shapes pytest makes; the caller fails the test with it, and anything else that raises."""
    what = "the test's sandbox sent back"
    if not isinstance(sent.get("report"), dict):
        raise BadReport(f"{what} no report of the test's call")
    check_report(item, sent["report"], subtest=False)
    check_field(f"{what} a report", sent, "logged", optional(list_of(is_dict)))
    for logged in sent.get("logged") or ():
        check_report(item, logged, subtest=True)
    check_field(f"{what} a report", sent, "failed_subtests", optional(is_count))
    check_field(f"{what} a report", sent, "warnings", optional(list_of(WARNING)))
    check_field(f"{what} a report", sent, "log_file", optional(is_str))
    measured = coverage.checked(sent.get("coverage"))
    report = deserialize(item, sent["report"])
    if type(report) is not TestReport:
        raise BadReport(f"{what} a {type(report).__name__}, not a test's report")
    subtests = [deserialize(item, logged) for logged in sent.get("logged") or ()]
    if not all(isinstance(logged, TestReport) for logged in subtests):
        raise BadReport(f"{what} subtests' reports, but subtests are off in this pytest (-p no:subtests?)")
    if measured is not None:
        coverage.merge(item.config, measured)
    _warn_again(sent.get("warnings") or ())
    for logged in subtests:
        item.ihook.pytest_runtest_logreport(report=logged)
    failed_subtests(item, sent.get("failed_subtests") or 0)
    _write_log_file(item.config, sent.get("log_file") or "")
    return report


class LoggedHere:
    """In the child: reports logged during the call (subtests log one per subTest) are kept for
    the pytest process to log, where the terminal and junitxml count them, instead of here; so
    are the records for --log-file, which the test may not write itself (descriptors.py)."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.reports: list[dict[str, Any]] = []
        for relay in (item.config.hook, item.ihook):
            setattr(relay, "pytest_runtest_logreport", self)
        self._log_file = io.StringIO()
        handler = _log_file_handler(item.config)
        if handler is not None and handler.stream is not None:
            # Not setStream(): it would flush into the file what pytest buffered before the fork.
            # Held, not dropped: the child never closes pytest's file (a ResourceWarning would
            # fail the test under -W error), it only leaves.
            self._pytests_stream, handler.stream = handler.stream, self._log_file

    def __call__(self, report: TestReport) -> None:
        self.reports.append(serialize(self.item, report))

    def log_file_text(self) -> str:
        return self._log_file.getvalue()


def _log_file_handler(config: pytest.Config) -> Any:
    """pytest's handler for --log-file (it writes to os.devnull when there is none)."""
    return getattr(config.pluginmanager.get_plugin("logging-plugin"), "log_file_handler", None)


def _write_log_file(config: pytest.Config, text: str) -> None:
    handler = _log_file_handler(config)
    if not text or handler is None or handler.stream is None:
        return
    handler.acquire()
    try:
        handler.stream.write(text)
        handler.flush()
    finally:
        handler.release()


def failed_subtests(item: pytest.Item, count: int | None = None) -> int:
    """How many of the test's subtests failed, a count pytest keeps to fail the test itself: read
    in the child, set in the pytest process."""
    try:
        from _pytest.subtests import failed_subtests_key
        counts = item.config.stash[failed_subtests_key]
    except (ImportError, KeyError):
        return 0
    key = getattr(item, "id", item.nodeid)
    if count:
        counts[key] = count
    return counts.get(key, 0)


def serialize(item: pytest.Item, report: TestReport) -> dict[str, Any]:
    return item.config.hook.pytest_report_to_serializable(config=item.config, report=report)


def deserialize(item: pytest.Item, data: dict[str, Any]) -> Any:
    return item.config.hook.pytest_report_from_serializable(config=item.config, data=_tuples(data))


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON has no tuples, so the fields pytest and its plugins unpack or check as tuples get them back."""
    for key in ("location", "longrepr"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    for key in ("sections", "user_properties"):
        if isinstance(data.get(key), list):
            data[key] = [tuple(pair) if isinstance(pair, list) else pair for pair in data[key]]
    return data


# -- warnings -------------------------------------------------------------------------------------------
def _warning_data(caught: warnings.WarningMessage) -> dict[str, Any]:
    category = caught.category
    return {"message": str(caught.message), "module": category.__module__,
            "category": category.__qualname__, "filename": str(caught.filename), "lineno": int(caught.lineno or 0)}


def _warn_again(caught: Sequence[dict[str, Any]]) -> None:
    """The call's warnings, raised again here, where pytest records them for the test (the
    warnings summary and -W error see them as in a plain run)."""
    for data in caught:
        category = _warning_class(data["module"], data["category"])
        try:
            warnings.warn_explicit(data["message"], category, _source_file(data["filename"]), data["lineno"])
        except Exception:  # noqa: BLE001 - a filter turned it into an error: the child reported it
            pass


#: The most of a warning's source file pytest may read to show its line (linecache reads it whole).
_MOST_SOURCE = 16 << 20


def _source_file(filename: str) -> str:
    """The warning's file, for pytest to show its line from, unless the test made it something
    that cannot be read safely here (a FIFO would block the pytest process, /dev/zero fill it):
    then a name that leads nowhere, which says why."""
    try:
        st = os.stat(filename)
    except (OSError, ValueError):
        return filename  # no such file: linecache finds nothing either
    if stat.S_ISREG(st.st_mode) and st.st_size <= _MOST_SOURCE:
        return filename
    return f"{filename} (not read: not a regular file of at most {_MOST_SOURCE >> 20} MiB)"


def _warning_class(module: str, qualname: str) -> type[Warning]:
    """The warning's class if this process has it; UserWarning for a class the test defined and
    this process never imported.  Looked up in the namespaces' own dicts: a name the test chose
    must not run a module's __getattr__ (a lazy import) or a property here."""
    found: Any = sys.modules.get(module)
    for part in qualname.split("."):
        try:
            found = vars(found).get(part)
        except TypeError:  # no __dict__
            found = None
    return found if isinstance(found, type) and issubclass(found, Warning) else UserWarning
