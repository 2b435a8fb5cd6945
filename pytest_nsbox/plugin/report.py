"""What a failed sandboxed test's report says of its sandboxes: settings, caps, each command with
how it ended and the tail of its stderr (a server's: of its piped stdout and stderr, bounded), and
the `nsbox shell` line that makes the sandbox again."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import time
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..settings import DEFAULT_PIDS_MAX

if TYPE_CHECKING:
    from ..engine.process import CommandRecord, SandboxProcess
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
        processes = {id(process._record): process for process in list(getattr(sb, "_processes", ()))}
        for record in sb.history:
            process = processes.get(id(record))
            if process is not None:
                process.poll()  # a server that exited since anyone asked is not "still running"
            earlier = record.started < since
            if earlier and (process is None or process.returncode is not None):
                continue  # (a shared sandbox's server that still runs is part of what this test saw)
            note = "  (started before this test)" if earlier else ""
            lines.append(f"  $ {printable(shell_form(record.args))}  -> {_status(record)}{note}")
            lines += _output(record, process)
            for stream, dropped in record.dropped.items():
                lines.append(f"    ({dropped} bytes of {stream} beyond output_max were dropped)")
        tarball = kept.get(id(sb))
        if tarball is not None:
            lines.append(f"  its filesystem at the failure: {printable(tarball)}")
        lines.append(f"  again: {shell_line(sb, tarball if tarball and not tarball.startswith('not kept') else None)}")
    return "\n".join(lines)


def printable(text: str) -> str:
    from ..engine.services import printable
    return printable(text)


def _status(record: CommandRecord) -> str:
    if record.exit is not None:
        return f"{record.exit.describe()} ({record.duration * 1000:.0f} ms)"
    if record.returncode is None:
        return f"still running after {time.time() - record.started:.1f} s"
    code = record.returncode
    how = f"killed by signal {-code}" if code < 0 else f"exit {code}"
    return f"{how} ({record.duration * 1000:.0f} ms)"


def _output(record: CommandRecord, process: SandboxProcess | None) -> list[str]:
    """The last lines a command printed to its pipes: a server's, read now if the test never read
    them (and kept where wait_for_output finds them), or the tail of a run()'s stderr."""
    from ..engine import services
    lines = []
    for stream in ("stdout", "stderr"):
        text = services.pending_output(process, stream) if process is not None else ""
        if not text and stream == "stderr":
            text = record.stderr_tail
        shown, earlier = services.tail_lines(text)
        if earlier:
            lines.append(f"    ({earlier} earlier lines of {stream} not shown)")
        lines += [f"    {stream}| {line}" for line in shown]
    return lines


def shell_form(args: Any) -> str:
    return args if isinstance(args, str) else shlex.join(args)


def shell_line(sb: Sandbox, rootfs: str | None = None) -> str:
    """The `nsbox shell` command that makes a sandbox like `sb` (over `rootfs`, if given: the tarball
    --nsbox-keep-on-failure kept), to step into what the test saw.  It works as printed, pasted in
    a fresh shell: the program is named by its path when `nsbox` on the PATH is not this one, and
    the cache by --cache-dir when it is not the one a fresh shell's `nsbox` would use."""
    s = sb.settings
    spec = rootfs or (sb.rootfs.spec if sb.rootfs else str(s.rootfs or "alpine"))
    if os.path.exists(spec):
        spec = os.path.abspath(spec)
    args = [*_nsbox_program(), "shell", "--rootfs", spec]
    cache = _cache_of(sb)
    if cache is not None:
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


def _nsbox_program() -> list[str]:
    """How to run this installation's `nsbox`: by name where the PATH finds this one (an activated
    virtualenv, a pipx or system install), else through the interpreter running now."""
    import shutil
    import sys
    found = shutil.which("nsbox")
    here = os.path.join(os.path.dirname(sys.executable), "nsbox")
    if found and os.path.exists(here) and os.path.samefile(found, here):
        return ["nsbox"]
    return [sys.executable, "-m", "pytest_nsbox"]


def _cache_of(sb: Sandbox) -> str | None:
    """The cache the sandbox's trees came from, unless it is the default a fresh shell would use
    (a cache given by NSBOX_CACHE_DIR here is not set there)."""
    s = sb.settings
    if s.cache_dir:
        cache = os.path.abspath(os.fspath(s.cache_dir))
    elif sb.rootfs is not None and not sb.rootfs.host:
        cache = str(sb.rootfs.tree.parent.parent)  # <cache>/trees/sha256-<digest>
    else:
        return None
    from ..rootfs.store import xdg_cache_dir
    return None if os.path.realpath(cache) == os.path.realpath(xdg_cache_dir()) else cache


class Keeper:
    """--nsbox-keep-on-failure's tarballs in `directory`, at most `budget` bytes of them in this
    process: a suite that fails everywhere must not fill the disk.  (Older runs' go with their
    basetemp, which pytest keeps for the last few runs.)"""

    def __init__(self, directory: Path, budget: int):
        self.directory = directory
        self.budget = budget
        self.used = 0
        self.count = 0
        self._kept: weakref.WeakKeyDictionary[Sandbox, tuple[int, str]] = weakref.WeakKeyDictionary()

    def keep(self, sb: Sandbox, name: str) -> str:
        """The sandbox's whole tree as a tarball (a rootfs spec for `nsbox shell`), or why it was not
        kept.  Isolated tests may write the basetemp: `save` follows no link they made there, at
        the directory or at the tarball's name."""
        earlier = self._kept.get(sb)
        if earlier is not None and earlier[0] == len(sb.history):
            return earlier[1]  # a shared sandbox that ran nothing since: the same tarball
        if self.used >= self.budget:
            return (f"not kept: this test process already kept {self.count} tarballs of {self.used / 1e6:.1f} "
                    f"MB, the most --nsbox-keep-on-failure-max allows")
        try:
            try:
                os.mkdir(self.directory)  # never through a link at its name; the basetemp is pytest's
            except FileExistsError:
                pass  # (ours from an earlier failure, or a planted link: save refuses the latter)
            path = sb.save(self.directory / (re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[-120:] + ".tar"))
        except Exception as exc:  # noqa: BLE001 - a dead or full sandbox, a planted link: the report says so
            return f"not kept ({type(exc).__name__}: {exc})"
        size = os.stat(path).st_size
        if self.used + size > self.budget:
            # (save() has no ceiling of its own: what passes the budget is not kept at all.)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return (f"not kept: this test process already kept {self.count} tarballs of {self.used / 1e6:.1f} MB, "
                    f"and this one ({size / 1e6:.1f} MB) would pass --nsbox-keep-on-failure-max "
                    f"({self.budget / 1e6:.1f} MB)")
        self.count += 1
        self.used += size
        self._kept[sb] = (len(sb.history), str(path))
        return str(path)
