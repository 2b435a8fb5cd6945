"""--nsbox-keep-on-failure saves failed tests' sandboxes, shared ones included, within a budget
(--nsbox-keep-on-failure-max): a sandbox that fills its filesystem before its tests fail must not
make the kept tarballs pass it."""

from __future__ import annotations

import textwrap


def test_the_kept_tarballs_never_take_more_than_the_budget(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, pytest
        from pytest_nsbox import Sandbox

        @pytest.fixture(scope="module")
        def shared():
            with Sandbox(rootfs=os.environ["NSBOX_ROOTFS"]) as box:
                yield box

        @pytest.mark.parametrize("n", range(3))
        def test_fills_and_fails(shared, n):
            shared.run(f"dd if=/dev/zero of=/root/fill{n} bs=1M count=24 2>/dev/null")
            assert False
    """))
    result = pytester.runpytest_subprocess("--nsbox-keep-on-failure", "--nsbox-keep-on-failure-max=20M")
    result.assert_outcomes(failed=3)
    kept = list((pytester.path.glob("**/nsbox-kept/*.tar")))
    total = sum(p.stat().st_size for p in kept)
    assert total <= 20 * 1000 * 1000, f"{len(kept)} tarballs of {total / 1e6:.0f} MB kept under a 20M budget"
    result.stdout.fnmatch_lines(["*not kept: this test process already kept*"])
