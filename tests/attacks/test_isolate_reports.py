"""Isolate mode's report channel: everything an isolated test's sandbox sends back is hostile.

The test's own code runs in the child that writes the report, so it can write anything to the pipe
the pytest process reads: reports for other tests, reports of strange shapes, coverage "data" that
is SQL, more bytes than memory holds, JSON nested deeper than the parser's stack.  Each test here
runs a small suite with pytester whose tests do exactly that, and checks that only the test that
did it fails, with a sentence saying what was wrong, and that the run goes on.
"""

from __future__ import annotations

import re
import textwrap

import pytest

from ..test_isolate import COVERED

# What the hostile tests share: the report pipe (the child's own local, as a test's code can find
# it: the frames of the child's Python are its own), and an honest report to forge from.
HOSTILE = textwrap.dedent('''
    import json, os, stat, sys

    def report_pipe():
        frame = sys._getframe()
        while frame is not None:
            if frame.f_code.co_name == "_child" and isinstance(frame.f_locals.get("w"), int):
                return frame.f_locals["w"]
            frame = frame.f_back
        writers = [fd for fd in map(int, os.listdir("/proc/self/fd")) if fd > 2 and _writable_pipe(fd)]
        assert len(writers) == 1, f"cannot tell the report pipe among {writers}"
        return writers[0]

    def _writable_pipe(fd):
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                return False
            with open(f"/proc/self/fdinfo/{fd}") as f:
                flags = int(next(l for l in f if l.startswith("flags:")).split()[1], 8)
        except (OSError, StopIteration):
            return False
        return flags & os.O_ACCMODE == os.O_WRONLY

    def send(data, pipe=None):
        """Write `data` (bytes, or an object to send as JSON) as the whole report; end the child."""
        if not isinstance(data, bytes):
            data = json.dumps(data).encode()
        pipe = report_pipe() if pipe is None else pipe
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(pipe, view):]
        finally:
            os._exit(0)

    def honest(request, **changes):
        """The report pytest would send for this test's passing call, with `changes`."""
        node = request.node
        report = {"$report_type": "TestReport", "nodeid": node.nodeid, "location": list(node.location),
                  "keywords": {name: 1 for name in node.keywords}, "outcome": "passed", "longrepr": None,
                  "when": "call", "sections": [], "duration": 0.01, "start": 1.0, "stop": 1.01,
                  "user_properties": []}
        report.update(changes)
        return report

    def subtest(request, **changes):
        report = honest(request, **changes)
        del report["$report_type"]
        report.update({"_report_type": "SubTestReport", "_subtest.context": {"msg": None, "kwargs": {"i": "1"}}})
        report.update(changes)
        return report
''')


def _failure(result, test: str, sentence: str) -> None:
    """`test` failed, and its failure section says `sentence` (an fnmatch pattern)."""
    result.stdout.fnmatch_lines([f"*_ {test} _*", sentence], consecutive=False)


def _no_internal_error(result) -> None:
    text = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in text and "Traceback (most recent call last)" not in result.stderr.str(), text


def test_a_report_for_another_test_fails_the_test_that_sent_it(pytester):
    pytester.makepyfile(hostile=HOSTILE, test_forge=textwrap.dedent("""
        import hostile

        def test_sends_a_phantom(request):
            hostile.send({"report": hostile.honest(request, nodeid="test_y.py::test_phantom")})

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-rA")
    result.assert_outcomes(passed=1, failed=1)
    assert "test_phantom" not in "\n".join(line for line in result.stdout.lines if line.startswith("PASSED"))
    _failure(result, "test_sends_a_phantom",
             "nsbox: the test's sandbox sent back a report for another test ('test_y.py::test_phantom'*")
    _no_internal_error(result)


# Each forges one thing; the message says what was wrong.
FORGERIES = {
    "another_phase": ("when='setup'", " of the test's setup, not of its call"),
    "another_location": ("location=['elsewhere.py', 1, 'test_elsewhere']", " with another location (*"),
    "a_strange_outcome": ("outcome='banana'", " with the outcome 'banana' (passed, failed or skipped*"),
    "a_nodeid_that_is_a_list": ("nodeid=['test_forge.py::test_x']", "*field 'nodeid'*"),
    "a_duration_that_is_text": ("duration='long'", "*field 'duration'*"),
    "a_duration_that_is_not_finite": ("duration=float('inf')", "*field 'duration'*"),
    "keywords_that_are_a_list": ("keywords=['x']", "*field 'keywords'*"),
    "sections_that_are_not_pairs": ("sections=[[1, 2, 3]]", "*field 'sections'*"),
    "a_crash_without_a_path": ("outcome='failed', longrepr={'reprcrash': {'path': 1, 'lineno': 1, 'message': 'm'},"
                               " 'reprtraceback': {'reprentries': [], 'extraline': None, 'style': 'long'},"
                               " 'sections': [], 'chain': None}", "*field 'longrepr'*"),
    "an_entry_of_an_unknown_type": ("outcome='failed', longrepr={'reprcrash': None, 'reprtraceback': "
                                    "{'reprentries': [{'type': 'Evil', 'data': {}}], 'extraline': None, "
                                    "'style': 'long'}, 'sections': [], 'chain': None}", "*field 'longrepr'*"),
    "a_collect_report": ("**{'$report_type': 'CollectReport'}", " of type 'CollectReport', not a test's report"),
    "an_extra_that_shadows_a_method": ("toterminal='boom'", "*field 'toterminal'*"),
    "a_private_extra": ("_id='test_y.py::test_phantom'", "*field '_id'*"),
}


def test_a_report_of_a_strange_shape_fails_only_its_test(pytester):
    tests = "".join(f"""
        def test_{name}(request):
            hostile.send({{"report": hostile.honest(request, {change})}})
    """ for name, (change, _) in FORGERIES.items())
    pytester.makepyfile(hostile=HOSTILE, test_forge="import hostile\n" + textwrap.dedent(tests + """
        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-p", "no:randomly")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=len(FORGERIES))
    for name, (_, sentence) in FORGERIES.items():
        _failure(result, f"test_{name}", "nsbox: the test's sandbox sent back a report" + sentence)


def test_logged_reports_must_be_the_tests_own_subtests(pytester):
    pytester.makepyfile(hostile=HOSTILE, test_forge=textwrap.dedent("""
        import hostile

        def test_logs_another_tests_subtest(request):
            hostile.send({"report": hostile.honest(request),
                          "logged": [hostile.subtest(request, nodeid="test_y.py::test_phantom")]})

        def test_logs_a_setup_report(request):
            hostile.send({"report": hostile.honest(request), "logged": [hostile.subtest(request, when="setup")]})

        def test_logs_a_second_call_report(request):
            hostile.send({"report": hostile.honest(request), "logged": [hostile.honest(request)]})

        def test_logs_a_subtest_without_context(request):
            logged = hostile.subtest(request)
            logged["_subtest.context"] = {"msg": 3}
            hostile.send({"report": hostile.honest(request), "logged": [logged]})

        def test_counts_failed_subtests_in_words(request):
            hostile.send({"report": hostile.honest(request), "failed_subtests": "many"})

        def test_after(subtests):
            with subtests.test(i=1):
                pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-rA", "-v", "-p", "no:randomly")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=5)
    summary = result.stdout.str().split("short test summary")[-1]
    assert not [line for line in summary.splitlines() if line.split(" - ")[0].endswith("test_phantom")]
    _failure(result, "test_logs_another_tests_subtest",
             "nsbox: the test's sandbox sent back a subtest's report for another test ('test_y.py::test_phantom'*")
    _failure(result, "test_logs_a_setup_report", "*subtest's report of the test's setup, not of its call*")
    _failure(result, "test_logs_a_second_call_report", "*logged a report that is not a subtest's*")
    _failure(result, "test_logs_a_subtest_without_context", "*field '_subtest.context'*")
    _failure(result, "test_counts_failed_subtests_in_words", "*field 'failed_subtests'*")
    result.stdout.fnmatch_lines(["*5 failed, 1 passed, 1 subtests passed*"])


def test_coverage_data_is_data_not_sql_run_in_the_pytest_process(pytester):
    target = pytester.path / "made-by-the-test.db"
    pytester.makepyfile(hostile=HOSTILE, test_forge=textwrap.dedent(f"""
        import zlib, hostile

        def test_sends_sql_as_coverage(request):
            script = "ATTACH DATABASE {str(target)!r} AS x; CREATE TABLE x.t(a);"
            hostile.send({{"report": hostile.honest(request), "coverage": (b"z" + zlib.compress(script.encode())).hex()}})

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=1)
    assert not target.exists()
    _failure(result, "test_sends_sql_as_coverage", "nsbox: the test's sandbox sent back coverage data that does not read*")


def test_coverage_data_of_absurd_sizes_fails_the_test(pytester):
    pytester.makepyfile(hostile=HOSTILE, test_forge=textwrap.dedent("""
        import hostile

        def coverage(**changes):
            data = {"arcs": False, "contexts": {"": {"mod.py": [1, 2]}}, "tracers": {}}
            data.update(changes)
            return data

        def test_a_line_a_million_million_lines_down(request):
            # coverage.py keeps a file's lines as a bitmap: this one would be 125 GB.
            hostile.send({"report": hostile.honest(request), "coverage": coverage(contexts={"": {"mod.py": [10**12]}})})

        def test_a_line_that_is_text(request):
            hostile.send({"report": hostile.honest(request), "coverage": coverage(contexts={"": {"mod.py": ["1"]}})})

        def test_arcs_that_are_not_pairs(request):
            hostile.send({"report": hostile.honest(request),
                          "coverage": coverage(arcs=True, contexts={"": {"mod.py": [[1, 2, 3]]}})})

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-p", "no:randomly")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=3)
    for test in ("test_a_line_a_million_million_lines_down", "test_a_line_that_is_text", "test_arcs_that_are_not_pairs"):
        _failure(result, test, "nsbox: the test's sandbox sent back coverage data that does not read*")




@pytest.mark.parametrize("options", [("--cov-branch",), ("--cov-context=test",)], ids=["branches", "contexts"])
def test_coverage_sent_as_data_is_that_of_a_plain_run(pytester, options):
    coverage = pytest.importorskip("coverage")
    pytester.makepyfile(**COVERED)
    seen = []
    for isolate in ((), ("--nsbox-isolate",)):
        result = pytester.runpytest_subprocess("--cov=mod", "--cov-report=term-missing", *options, *isolate)
        result.assert_outcomes(passed=2)
        data = coverage.CoverageData(str(pytester.path / ".coverage"))
        data.read()
        (measured,) = [f for f in data.measured_files() if f.endswith("mod.py")]
        by_context = {}
        for context in sorted(data.measured_contexts()):
            data.set_query_context(context)
            by_context[context] = sorted(data.arcs(measured) or []) if data.has_arcs() else sorted(data.lines(measured))
        seen.append(([line for line in result.stdout.lines if line.startswith("mod.py")], by_context))
    assert seen[0] == seen[1] and seen[0][0], seen


def test_a_report_bigger_than_the_limit_fails_its_test_and_is_not_held(pytester):
    from pytest_nsbox.settings import DEFAULT_OUTPUT_MAX
    pytester.makeconftest(textwrap.dedent("""
        import resource

        def _peak():
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

        def pytest_sessionstart(session):
            session.config._peak_at_start = _peak()

        def pytest_sessionfinish(session):
            print(f"\\nPEAK GROWTH {_peak() - session.config._peak_at_start}")
    """))
    pytester.makepyfile(hostile=HOSTILE, test_flood=textwrap.dedent(f"""
        import os, hostile

        def test_floods_the_pipe():
            pipe, chunk = hostile.report_pipe(), b"x" * (1 << 20)
            try:
                for _ in range({3 * DEFAULT_OUTPUT_MAX >> 20}):
                    os.write(pipe, chunk)
            finally:
                os._exit(0)

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-s", "-p", "no:randomly")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=1)
    _failure(result, "test_floods_the_pipe",
             f"nsbox: the test's sandbox sent back a report bigger than {DEFAULT_OUTPUT_MAX >> 20} MiB, its output_max*")
    growth = int(re.search(r"PEAK GROWTH (-?\d+)", result.stdout.str()).group(1))
    assert growth < DEFAULT_OUTPUT_MAX * 1.5 < 3 * DEFAULT_OUTPUT_MAX, growth


def test_the_limit_is_the_tests_output_max_and_a_big_enough_one_passes(pytester):
    pytester.makepyfile(test_prints=textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(output_max="1M")
        def test_prints_too_much_for_its_limit():
            print("x" * (2 << 20))

        @pytest.mark.sandbox(output_max="8M")
        def test_prints_within_its_limit():
            print("x" * (2 << 20))
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-p", "no:randomly")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=1)
    _failure(result, "test_prints_too_much_for_its_limit",
             "nsbox: the test's sandbox sent back a report bigger than 1 MiB, its output_max*")


def test_json_nested_too_deep_fails_its_test_and_the_run_goes_on(pytester):
    pytester.makepyfile(hostile=HOSTILE, test_deep=textwrap.dedent("""
        import hostile

        def test_sends_deep_json():
            hostile.send(b"[" * 200_000 + b"]" * 200_000)

        def test_sends_a_deep_report(request):
            deep = []
            for _ in range(500):
                deep = [deep]
            hostile.send({"report": hostile.honest(request, user_properties=[["k", deep]])})

        def test_sends_something_that_is_not_json():
            hostile.send(b"\\xff not json")

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-p", "no:randomly")
    _no_internal_error(result)
    result.assert_outcomes(passed=1, failed=3)
    for test in ("test_sends_deep_json", "test_sends_a_deep_report"):
        _failure(result, test, "nsbox: the test's sandbox sent back a report that does not read (*nested*deeper than*")
    _failure(result, "test_sends_something_that_is_not_json",
             "nsbox: the test's sandbox sent back a report that does not read (*")


def test_a_test_cannot_write_to_the_xdist_channel(pytester):
    """Under xdist the pytest process talks to the controller through execnet's pipes; the test's
    sandbox is a fork of that process.  Garbage written to every pipe and socket the test finds
    (its own report pipe aside) must not reach the controller."""
    pytest.importorskip("xdist")
    pytester.makepyfile(hostile=HOSTILE, test_channel=textwrap.dedent("""
        import os, select, socket, stat, hostile

        def test_writes_garbage_to_every_channel():
            mine = hostile.report_pipe()
            for fd in map(int, os.listdir("/proc/self/fd")):
                if fd <= 2 or fd == mine:
                    continue
                try:
                    mode = os.fstat(fd).st_mode
                    if (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)) and select.select([], [fd], [], 0)[1]:
                        os.write(fd, b"\\x00garbage from a test\\xff" * 8)
                except OSError:
                    pass

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-n", "1", "-p", "no:randomly", timeout=120)
    _no_internal_error(result)
    assert "crashed" not in result.stdout.str() and "replacing crashed worker" not in result.stdout.str()
    result.assert_outcomes(passed=2)
