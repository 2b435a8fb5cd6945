"""What a failed sandboxed test's report says of its sandboxes: settings, caps, and each command
with how it ended and the tail of its stderr."""

from __future__ import annotations

import shlex
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..engine.sandbox import Sandbox


def describe(sandboxes: Sequence[Sandbox]) -> str:
    lines = []
    for number, sb in enumerate(sandboxes, 1):
        rootfs = sb.rootfs.describe() if sb.rootfs else sb.settings.rootfs
        lines.append(f"sandbox {number}: rootfs {rootfs}, network {sb.settings.network}")
        if sb.limits:
            lines.append(f"  caps: {sb.limits.describe()}")
        for record in sb.history:
            if record.exit is not None:
                status = record.exit.describe()
            else:
                status = f"exit {record.returncode}" if record.returncode is not None else "still running"
            lines.append(f"  $ {shell_form(record.args)}  -> {status} ({record.duration * 1000:.0f} ms)")
            for line in record.stderr_tail.splitlines():
                lines.append(f"    stderr| {line}")
            for stream, dropped in record.dropped.items():
                lines.append(f"    ({dropped} bytes of {stream} beyond output_max were dropped)")
    return "\n".join(lines)


def shell_form(args: Any) -> str:
    return args if isinstance(args, str) else shlex.join(args)
