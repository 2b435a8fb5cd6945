"""What a failed sandboxed test's report says of its sandboxes: settings, caps, each command with
how it ended and the tail of its stderr, and the `nsbox shell` line that makes the sandbox again."""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..settings import DEFAULT_PIDS_MAX

if TYPE_CHECKING:
    from ..engine.sandbox import Sandbox


def describe(sandboxes: Sequence[tuple[Sandbox, float]], kept: dict[int, str] | None = None) -> str:
    """Each sandbox with the commands it ran since the given time (a shared sandbox: this test's)."""
    kept = kept or {}
    lines = []
    for number, (sb, since) in enumerate(sandboxes, 1):
        rootfs = sb.rootfs.describe() if sb.rootfs else sb.settings.rootfs
        lines.append(f"sandbox {number}: rootfs {rootfs}, network {sb.settings.network}")
        if sb.limits:
            lines.append(f"  caps: {sb.limits.describe()}")
        for record in sb.history:
            if record.started < since:
                continue
            if record.exit is not None:
                status = record.exit.describe()
            else:
                status = f"exit {record.returncode}" if record.returncode is not None else "still running"
            lines.append(f"  $ {shell_form(record.args)}  -> {status} ({record.duration * 1000:.0f} ms)")
            for line in record.stderr_tail.splitlines():
                lines.append(f"    stderr| {line}")
            for stream, dropped in record.dropped.items():
                lines.append(f"    ({dropped} bytes of {stream} beyond output_max were dropped)")
        tarball = kept.get(id(sb))
        if tarball is not None:
            lines.append(f"  its filesystem at the failure: {tarball}")
        lines.append(f"  again: {shell_line(sb, tarball if tarball and not tarball.startswith('not kept') else None)}")
    return "\n".join(lines)


def shell_form(args: Any) -> str:
    return args if isinstance(args, str) else shlex.join(args)


def shell_line(sb: Sandbox, rootfs: str | None = None) -> str:
    """The `nsbox shell` command that makes a sandbox like `sb` (over `rootfs`, if given: the tarball
    --nsbox-keep-on-failure kept), to step into what the test saw."""
    from ..rootfs.store import default_cache_dir
    s = sb.settings
    spec = rootfs or (sb.rootfs.spec if sb.rootfs else str(s.rootfs or "alpine"))
    if os.path.exists(spec):
        spec = os.path.abspath(spec)
    args = ["nsbox", "shell", "--rootfs", spec]
    if sb.rootfs is not None and not sb.rootfs.host and not rootfs:
        cache = str(sb.rootfs.tree.parent.parent)  # <cache>/trees/sha256-<digest>
        if os.path.realpath(cache) != os.path.realpath(str(s.cache_dir or default_cache_dir())) \
                or s.cache_dir:
            args += ["--cache-dir", cache]
    if not rootfs:  # a kept tarball holds the layers already
        for layer in sb.layers:
            args += ["--layer", os.path.abspath(layer.spec) if os.path.exists(layer.spec) else layer.spec]
    if s.network != "none":
        args += ["--network", s.network]
    if s.hostname != "nsbox":
        args += ["--hostname", s.hostname]
    if s.pids_max != DEFAULT_PIDS_MAX:
        args += ["--pids-max", str(s.pids_max) if s.pids_max else "none"]
    if s.memory_max:
        args += ["--memory-max", str(s.memory_max)]
    for mount in s.mounts:
        args += ["--bind", f"{mount.source}:{mount.target}" + (":rw" if mount.rw else "")]
    for name, value in s.env.items():
        args += ["--env", f"{name}={value}"]
    if s.cwd != "/":
        args += ["--cwd", s.cwd]
    if not s.seccomp:
        args.append("--no-seccomp")
    return shlex.join(args)


def keep(sb: Sandbox, directory: Path, name: str) -> str:
    """The sandbox's whole tree as a tarball in `directory` (a rootfs spec for `nsbox shell`), or why
    it could not be kept.  Isolated tests may write the basetemp: `save` follows no link they made
    there, at the directory or at the tarball's name."""
    try:
        try:
            os.mkdir(directory)  # never through a link at its name; the basetemp itself is pytest's
        except FileExistsError:
            pass  # (ours from an earlier failure, or a planted link: save refuses the latter)
        return str(sb.save(directory / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-120:] + ".tar")))
    except Exception as exc:  # noqa: BLE001 - a dead or full sandbox, a planted link: the report says so
        return f"not kept ({type(exc).__name__}: {exc})"
