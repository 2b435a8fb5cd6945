"""What crosses from an isolated test's call back to the pytest process, and how.

The child sends one JSON object when the call is over (never pickle: the test's code can write to
that pipe, and unpickling runs code): the call's report through pytest's own report
serialization, the reports logged during the call (one per subtest), pytest's count of failed
subtests, the warnings caught, and the lines coverage.py measured. The parent replays each where
pytest would have seen it without isolation.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
from _pytest.reports import TestReport


def collect(item: pytest.Item, report: TestReport, logged: LoggedHere,
            caught: Sequence[warnings.WarningMessage]) -> dict[str, Any]:
    """In the child, after the call: all the pytest process needs to know of it."""
    return {"report": serialize(item, report), "logged": logged.reports,
            "failed_subtests": failed_subtests(item),
            "warnings": [_warning_data(w) for w in caught],
            "coverage": _coverage_data() if "coverage" in sys.modules else None}


def deliver(item: pytest.Item, sent: dict[str, Any]) -> TestReport:
    """In the pytest process: what `collect` sent, replayed here; the call's report.  Raises on
    anything that does not read (the caller fails the test with it)."""
    _merge_coverage(item.config, sent.get("coverage"))
    _warn_again(sent.get("warnings") or ())
    for logged in sent.get("logged") or ():
        item.ihook.pytest_runtest_logreport(report=deserialize(item, logged))
    failed_subtests(item, int(sent.get("failed_subtests") or 0))
    return deserialize(item, sent["report"])


class LoggedHere:
    """In the child: reports logged during the call (subtests log one per subTest) are kept for
    the pytest process to log, where the terminal and junitxml count them, instead of here."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.reports: list[dict[str, Any]] = []
        for relay in (item.config.hook, item.ihook):
            setattr(relay, "pytest_runtest_logreport", self)

    def __call__(self, report: TestReport) -> None:
        self.reports.append(serialize(self.item, report))


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
    """JSON, not pickle, carries the report: the sandbox writes it, and unpickling is running code.
    JSON has no tuples, so the fields pytest and its plugins unpack or check as tuples get them back."""
    for key in ("location", "longrepr"):
        if isinstance(data.get(key), list):
            data[key] = tuple(data[key])
    for key in ("sections", "user_properties"):
        if isinstance(data.get(key), list):
            data[key] = [tuple(pair) if isinstance(pair, list) else pair for pair in data[key]]
    return data


def _warning_data(caught: warnings.WarningMessage) -> dict[str, Any]:
    category = caught.category
    return {"message": str(caught.message), "module": category.__module__,
            "category": category.__qualname__, "filename": caught.filename, "lineno": caught.lineno}


def _warn_again(caught: Sequence[dict[str, Any]]) -> None:
    """The call's warnings, raised again here, where pytest records them for the test (the
    warnings summary and -W error see them as in a plain run)."""
    for data in caught:
        category: Any = sys.modules.get(str(data.get("module")))
        for part in str(data.get("category")).split("."):
            category = getattr(category, part, None)
        if not (isinstance(category, type) and issubclass(category, Warning)):
            category = UserWarning  # a class the test defined and this process never imported
        try:
            warnings.warn_explicit(str(data.get("message")), category, str(data.get("filename")),
                                   int(data.get("lineno") or 0))
        except Exception:  # noqa: BLE001 - a filter turned it into an error: the child reported it
            pass


# -- coverage: the child's lines, merged into the parent's data ---------------------------------------
_COVERAGE = pytest.StashKey[Any]()


def _coverage_data() -> str | None:
    """The lines the child measured, for the parent: the child may not write next to the project
    (it is read-only in the sandbox), and ends with os._exit, which saves nothing."""
    try:
        import coverage
    except ImportError:
        return None
    cov = coverage.Coverage.current()
    collector = getattr(cov, "_collector", None)
    if cov is None or collector is None:
        return None
    cov.stop()
    data = coverage.CoverageData(no_disk=True)
    collector.use_data(data, None)
    collector.flush_data()
    return data.dumps().hex()


def _merge_coverage(config: pytest.Config, payload: str | None) -> None:
    if not payload:
        return
    import coverage
    data = coverage.CoverageData(no_disk=True)
    data.loads(bytes.fromhex(payload))
    merged = config.stash.get(_COVERAGE, None)
    if merged is None:
        config.stash[_COVERAGE] = data
    else:
        merged.update(data)


def flush_coverage(config: pytest.Config) -> None:
    """At the end of the run, before pytest-cov saves: the isolated tests' lines join the rest."""
    merged = config.stash.get(_COVERAGE, None)
    if merged is None:
        return
    import coverage
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.get_data().update(merged)
