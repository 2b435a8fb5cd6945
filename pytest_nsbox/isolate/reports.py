"""The shapes of what an isolated test's sandbox may send back: the fields pytest's own reports
have, each checked before anything is replayed in the pytest process.

A shape is a predicate on a parsed JSON value.  transport.py bounds the payload's depth first, so
these may recurse.  Whatever fails a check raises `BadReport`, with a sentence saying what was
wrong; it fails that one test.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from _pytest.reports import TestReport

from ..errors import NsboxError

_OUTCOMES = ("passed", "failed", "skipped")
_STYLES = ("long", "short", "line", "no", "native", "value", "auto")


class BadReport(NsboxError):
    """What an isolated test's sandbox sent back is not what pytest-nsbox's child writes: the
    sentence says what was wrong; it fails that one test."""


Shape = Callable[[Any], bool]


def is_str(v: Any) -> bool:
    return isinstance(v, str)


def is_bool(v: Any) -> bool:
    return isinstance(v, bool)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_count(v: Any) -> bool:
    return is_int(v) and v >= 0


def is_number(v: Any) -> bool:
    return is_int(v) or (isinstance(v, float) and math.isfinite(v))


def is_dict(v: Any) -> bool:
    return isinstance(v, dict)


def anything(v: Any) -> bool:
    return True


def optional(shape: Shape) -> Shape:
    return lambda v: v is None or shape(v)


def one_of(*values: str) -> Shape:
    return lambda v: isinstance(v, str) and v in values


def list_of(shape: Shape) -> Shape:
    return lambda v: isinstance(v, list) and all(shape(x) for x in v)


def dict_of(key: Shape, value: Shape) -> Shape:
    return lambda v: isinstance(v, dict) and all(key(k) and value(x) for k, x in v.items())


def tuple_of(*shapes: Shape) -> Shape:
    return lambda v: isinstance(v, list) and len(v) == len(shapes) and all(s(x) for s, x in zip(shapes, v))


def either(*shapes: Shape) -> Shape:
    return lambda v: any(shape(v) for shape in shapes)


def record(required: Mapping[str, Shape], optional: Mapping[str, Shape] | None = None) -> Shape:
    """A JSON object with these keys (and maybe those), each of its shape: dataclasses pytest
    rebuilds with **data, where an unknown key is a TypeError or worse."""
    optional = optional or {}

    def check(v: Any) -> bool:
        return (isinstance(v, dict) and required.keys() <= v.keys() <= required.keys() | optional.keys()
                and all({**required, **optional}[k](x) for k, x in v.items()))
    return check


_STRINGS = list_of(is_str)
_FILE_LOCATION = record({"path": is_str, "lineno": is_int, "message": is_str})
_ENTRY = either(
    record({"type": one_of("ReprEntry"), "data": record({
        "lines": _STRINGS, "style": one_of(*_STYLES),
        "reprfuncargs": optional(record({"args": list_of(tuple_of(is_str, is_str))})),
        "reprlocals": optional(record({"lines": _STRINGS})),
        "reprfileloc": optional(_FILE_LOCATION)})}),
    record({"type": one_of("ReprEntryNative"), "data": record({"lines": _STRINGS}, {"style": is_str})}))
_TRACEBACK = record({"reprentries": list_of(_ENTRY), "extraline": optional(is_str), "style": one_of(*_STYLES)})
_EXCEPTION = record({
    "reprcrash": optional(_FILE_LOCATION), "reprtraceback": _TRACEBACK,
    "sections": list_of(either(tuple_of(is_str, is_str), tuple_of(is_str, is_str, is_str))),
    "chain": optional(list_of(tuple_of(_TRACEBACK, optional(_FILE_LOCATION), optional(is_str))))})
#: The fields of a serialized TestReport, and what they hold.
_FIELDS: dict[str, tuple[Shape, str]] = {
    "nodeid": (is_str, "a str"),
    "location": (tuple_of(is_str, optional(is_int), is_str), "a (path, line, name) triple"),
    "keywords": (dict_of(is_str, is_int), "a mapping of names to 1"),
    "outcome": (is_str, "a str"),
    "longrepr": (either(lambda v: v is None, is_str, tuple_of(is_str, optional(is_int), is_str), _EXCEPTION),
                 "None, a str, a skip's (path, line, reason) or a traceback pytest makes"),
    "when": (is_str, "a str"),
    "sections": (list_of(tuple_of(is_str, is_str)), "a list of (heading, content) pairs of str"),
    "duration": (is_number, "a finite number"),
    "start": (is_number, "a finite number"),
    "stop": (is_number, "a finite number"),
    "user_properties": (list_of(tuple_of(is_str, anything)), "a list of (name, value) pairs"),
}
_OPTIONAL_FIELDS: dict[str, tuple[Shape, str]] = {"wasxfail": (is_str, "a str")}
_SUBTEST_CONTEXT = (record({"msg": optional(is_str), "kwargs": dict_of(is_str, is_str)}),
                    "a subtest's (msg, kwargs)")
_EXTRA = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,99}\Z")  # a plugin's attribute, as pytest-html's `extras`
#: Attributes the pytest process (pytest-xdist's controller, junitxml, the terminal) sets or reads
#: on reports itself: a test's report that brought its own would stand for another node's.
_PARENTS_OWN = frozenset({"node", "worker_id", "item_index", "testrun_uid", "gateway", "config", "session"})
WARNING = record({"message": is_str, "module": is_str, "category": is_str, "filename": is_str,
                    "lineno": is_int})


def check_field(what: str, data: dict[str, Any], name: str, shape: Shape, expected: str = "") -> None:
    if name in data and not shape(data[name]):
        raise BadReport(f"{what} whose field {name!r} is not {expected or 'what pytest-nsbox sends'}")


def check_report(item: pytest.Item, data: dict[str, Any], subtest: bool) -> None:
    """`data` is the serialized report of this item's call (or of one of its subtests), of the
    shape pytest makes, and nothing that could stand for another test or shadow a report's method."""
    kind = "a subtest's report" if subtest else "a report"
    what = f"the test's sandbox sent back {kind}"
    if subtest:
        if data.get("_report_type") != "SubTestReport" or "$report_type" in data:
            raise BadReport("the test's sandbox logged a report that is not a subtest's "
                            "(only subtests log reports during a call)")
        check_field(what, data, "_subtest.context", _SUBTEST_CONTEXT[0], _SUBTEST_CONTEXT[1])
        if "_subtest.context" not in data:
            raise BadReport(f"{what} whose field '_subtest.context' is missing")
    elif data.get("$report_type") != "TestReport" or "_report_type" in data:
        raise BadReport(f"{what} of type {data.get('$report_type')!r}, not a test's report")
    known = {**_FIELDS, **_OPTIONAL_FIELDS}
    missing = [name for name in _FIELDS if name not in data]
    if missing:
        raise BadReport(f"{what} without the field {missing[0]!r}")
    for name, (shape, expected) in known.items():
        check_field(what, data, name, shape, expected)
    if data["nodeid"] != item.nodeid:
        raise BadReport(f"{what} for another test ({data['nodeid']!r}, not {item.nodeid!r})")
    if data["when"] != "call":
        raise BadReport(f"{what} of the test's {data['when']}, not of its call")
    if tuple(data["location"]) != tuple(item.location):
        raise BadReport(f"{what} with another location ({tuple(data['location'])!r}, not {tuple(item.location)!r})")
    if data["outcome"] not in _OUTCOMES:
        raise BadReport(f"{what} with the outcome {data['outcome']!r} (passed, failed or skipped are the outcomes)")
    cls = _subtest_class() if subtest else TestReport
    for name in data.keys() - known.keys() - {"$report_type", "_report_type", "_subtest.context"}:
        if not (_EXTRA.match(name) and not hasattr(cls, name) and name not in _PARENTS_OWN):
            raise BadReport(f"{what} with a field {name!r} that a report cannot have "
                            "(a private name, or one that would stand for a report's own attribute)")


def _subtest_class() -> type:
    try:
        from _pytest.subtests import SubtestReport  # pytest >= 9
    except ImportError:
        try:
            from pytest_subtests import SubTestReport as SubtestReport  # type: ignore[no-redef]
        except ImportError:
            return TestReport
    return SubtestReport
