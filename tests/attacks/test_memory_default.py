"""The memory promise as docs/security.md narrows it: uncapped unless `memory_max` is set, and
said so; with it set, a hog is stopped in a sandbox and in an isolated test alike."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

SECURITY = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def test_memory_is_uncapped_by_default_and_every_report_says_so(sandbox):
    assert sandbox.settings.memory_max is None
    assert sandbox.limits.memory_max is None
    assert "memory uncapped" in sandbox.limits.describe()
    text = " ".join(SECURITY.read_text().split())
    assert "`memory_max` defaults to none" in text
    assert "where `memory_max` is set" in text


@pytest.mark.sandbox(memory_max="64M")
def test_with_memory_max_a_hog_is_stopped_in_a_sandbox(sandbox):
    result = sandbox.run(["sh", "-c", "exec head -c 200000000 /dev/zero | tail"], timeout=60)
    assert result.returncode != 0, "a 200 MB tail under a 64 MB cap ran to its end"


def test_with_memory_max_a_hog_is_stopped_in_an_isolated_test(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(memory_max="64M")
        def test_hog():
            hog = bytearray(400 << 20)  # MemoryError (RLIMIT_AS) or the OOM killer (cgroup)
            hog[::4096] = b"x" * len(hog[::4096])

        def test_after():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate")
    result.assert_outcomes(failed=1, passed=1)
