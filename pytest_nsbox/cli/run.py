"""`nsbox run` and `nsbox shell`: a command, or an interactive shell, in a fresh sandbox.

    nsbox run [--rootfs SPEC] [--network none|host] [--pids-max N] [--memory-max SIZE] [--timeout S]
              [--bind SRC:DST[:rw]] [--env K=V] [--cwd DIR] [--hostname NAME] -- CMD [ARGS...]
    nsbox shell [same options] [-- SHELL [ARGS...]]

`run` connects the command to this terminal's stdin, stdout and stderr and exits with its status
(128+N when signal N ended it, as a shell says; 124 when the sandbox's lifetime did; 125 when nsbox
failed, a bad --cwd included; 126/127 when the program cannot be run / does not exist). `shell`
needs a terminal on stdin, and gives the shell a terminal of its own (a pty, with job control, ^C
and window resizes). A failed test's report ends with the `nsbox shell` line that makes its
sandbox again.
"""

from __future__ import annotations

import argparse
import errno
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

from ..settings import DEFAULT_PIDS_MAX
from .rootfs import cache_options, store_for

#: What `run` and `shell` exit with when nsbox itself failed (as `env` and `docker run` do).
SETUP_FAILED = 125


def add_parsers(commands: argparse._SubParsersAction) -> None:
    common = argparse.ArgumentParser(add_help=False, parents=[cache_options()])
    common.add_argument("--rootfs", default=None, metavar="SPEC",
                        help="the root filesystem (default: $NSBOX_ROOTFS, else alpine; see `nsbox rootfs pull --help`)")
    common.add_argument("--layer", action="append", default=[], metavar="SPEC",
                        help="a tree (directory or tarball) laid over the rootfs, read-only; repeatable, lowest first")
    common.add_argument("--profile", default=None, metavar="NAME",
                        help="start from [tool.nsbox.profiles.NAME] of the nearest pyproject.toml; "
                             "the options below win")
    common.add_argument("--network", choices=("none", "host"), default=None,
                        help="none: a private loopback (default); host: the host's network")
    common.add_argument("--hostname", default=None, help="default nsbox")
    common.add_argument("--pids-max", default=None, metavar="N|none",
                        help=f"the most processes at once (default {DEFAULT_PIDS_MAX})")
    common.add_argument("--memory-max", default=None, metavar="SIZE", help="memory cap, e.g. 256M")
    common.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="the sandbox's lifetime: everything in it is killed then")
    common.add_argument("--bind", action="append", default=[], metavar="SRC:DST[:rw]",
                        help="bind a host path in (read-only unless :rw); repeatable")
    common.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="set a variable for the command; repeatable")
    common.add_argument("--cwd", default=None, metavar="DIR", help="the command's directory in the sandbox")
    common.add_argument("--no-seccomp", action="store_true", help="run without the syscall filter")
    run = commands.add_parser("run", parents=[common], help="run a command in a fresh sandbox",
                              description="Run a command in a fresh sandbox, connected to this terminal; "
                                          "nsbox exits with its status.")
    run.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    shell = commands.add_parser("shell", parents=[common], help="an interactive shell in a fresh sandbox",
                                description="An interactive shell in a fresh sandbox, on a terminal of its own.")
    shell.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- SHELL [ARGS...]")


def sandbox_keywords(args: argparse.Namespace) -> dict[str, Any]:
    """The `Sandbox(...)` keywords the options say; bad values raise ConfigError from Sandbox."""
    from ..errors import ConfigError
    env = {}
    for item in args.env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--env takes NAME=VALUE, not {item!r}")
        env[name] = value
    mounts = []
    for item in args.bind:
        parts = item.split(":")
        if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("rw", "ro")) or not all(parts[:2]):
            raise ConfigError(f"--bind takes SRC:DST or SRC:DST:rw, not {item!r}")
        mounts.append((os.path.abspath(parts[0]), parts[1], *(["rw"] if parts[2:] == ["rw"] else [])))
    keywords: dict[str, Any] = {}
    if args.profile:
        from .. import profiles
        path = profiles.find_pyproject(Path.cwd())
        keywords = profiles.pick(profiles.load(path), args.profile, path, "--profile", searched=Path.cwd())
    given = {"network": args.network, "hostname": args.hostname, "memory_max": args.memory_max,
             "timeout": args.timeout, "cwd": args.cwd,
             "pids_max": None if args.pids_max is None else
             ("none" if args.pids_max == "none" else _int(args.pids_max, "--pids-max"))}
    keywords.update({key: value for key, value in given.items() if value is not None})
    if keywords.get("pids_max") == "none":
        keywords["pids_max"] = None
    if mounts:
        keywords["mounts"] = [*keywords.get("mounts", ()), *mounts]
    if env:
        keywords["env"] = {**keywords.get("env", {}), **env}
    if args.no_seccomp:
        keywords["seccomp"] = False
    store = store_for(args)
    spec = args.rootfs or keywords.get("rootfs") or os.environ.get("NSBOX_ROOTFS") or "alpine"
    if isinstance(spec, (list, tuple)):  # a profile's [rootfs, layers...]
        keywords["layers"] = [*spec[1:], *keywords.get("layers", ())]
        spec = spec[0]
    keywords["rootfs"] = store.resolve(spec)
    layers = [*keywords.get("layers", ()), *args.layer]
    keywords["layers"] = [store.resolve(layer, layer=True) for layer in layers]
    return keywords


def _int(text: str, option: str) -> int:
    from ..errors import ConfigError
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{option} takes a number of processes (1 or more) or none, not {text!r}")
    return int(text)


def _command(argv: list[str]) -> list[str]:
    return argv[1:] if argv[:1] == ["--"] else argv


def run(args: argparse.Namespace) -> int:
    from ..engine.sandbox import Sandbox
    from ..errors import ConfigError
    argv = _command(args.argv)
    with Sandbox(**sandbox_keywords(args)) as box:
        if not argv and not (box.rootfs and box.rootfs.image and box.rootfs.image.command):
            raise ConfigError("nsbox run needs a command: nsbox run [OPTIONS] -- CMD [ARGS...] (only an "
                              "image that has an Entrypoint or Cmd runs without one)")
        started = time.monotonic()
        try:
            process = box.spawn(argv or None, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr, shell=False)
        except OSError as exc:
            return _not_started(box, exc)
        with _forwarding_signals(process):
            code = process.wait()
        return _exit_status(box, code, started)


def shell(args: argparse.Namespace) -> int:
    from ..engine.sandbox import Sandbox
    from ..errors import ConfigError
    if sys.stdin is None or not os.isatty(sys.stdin.fileno()):
        # A shell relayed from a pipe echoes its prompts and terminal codes into the output and may
        # wait for input that never comes: say what to use instead.
        raise ConfigError("nsbox shell needs a terminal on its stdin, and this one is not; to run commands "
                          "without a terminal use `nsbox run [OPTIONS] -- sh -c 'COMMANDS'` (or pipe a script "
                          "into `nsbox run -- sh`)")
    argv = _command(args.argv) or ["/bin/sh", "-l"]
    env = {"TERM": os.environ.get("TERM", "xterm")}
    with Sandbox(**sandbox_keywords(args)) as box:
        started = time.monotonic()
        master, slave = box.openpty()
        try:
            _copy_window_size(sys.stdin.fileno(), slave)
            try:
                process = box.spawn(argv, stdin=slave, stdout=slave, stderr=slave, env=env, shell=False, tty=True)
            except OSError as exc:
                return _not_started(box, exc)
            os.close(slave)
            slave = -1
            _relay(master, process)
            code = process.wait()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        return _exit_status(box, code, started)


#: What `run` and `shell` exit with when the sandbox's lifetime (--timeout) ended the command, as
#: timeout(1) does.
TIMED_OUT = 124
#: The command could not be started: not found (127) / found but not executable (126), as shells say.
NOT_FOUND, NOT_EXECUTABLE = 127, 126


def _not_started(box: Any, exc: OSError) -> int:
    """The exit status, and one line, for a command that could not be started."""
    from ..errors import ConfigError
    cwd = box.settings.cwd
    # The engine marks a failure of the working directory, not the program (engine/sandbox.py).
    if getattr(exc, "nsbox_step", None) == "chdir":
        why = errno.errorcode.get(exc.errno or 0, "?")
        raise ConfigError(f"--cwd {cwd}: cannot change into it in the sandbox: {why} ({os.strerror(exc.errno or 0)}); "
                          "give a directory that exists in the rootfs, or bind one there with --bind") from None
    if exc.filename is None:  # not the program's fault: the sandbox failed to start it
        print(f"nsbox: cannot start the command in the sandbox: {exc}", file=sys.stderr)
        return SETUP_FAILED
    program = exc.filename
    if isinstance(exc, FileNotFoundError):
        where = "" if "/" in str(program) else " on the sandbox's PATH"
        print(f"nsbox: {program}: not found{where}; give its full path, or a --rootfs or --layer that has it",
              file=sys.stderr)
        return NOT_FOUND
    print(f"nsbox: {program}: cannot be executed in the sandbox: {errno.errorcode.get(exc.errno or 0, '?')} "
          f"({os.strerror(exc.errno or 0)})", file=sys.stderr)
    return NOT_EXECUTABLE


def _exit_status(box: Any, code: int, started: float) -> int:
    """The command's status, as a shell says it (128+N for signal N); 124, with a line saying so,
    when the sandbox's lifetime ended it."""
    timeout = box.settings.timeout
    # Init kills everything with SIGKILL once the lifetime is over; `started` is taken after the
    # sandbox started, so a kill seen a full lifetime later was the lifetime's (the 0.05 s allows
    # for init's clock starting a moment before ours).
    if timeout and code == -signal.SIGKILL and time.monotonic() - started >= timeout - 0.05:
        print(f"nsbox: the sandbox's lifetime of {timeout:g} s ran out (--timeout): everything in it was "
              "killed", file=sys.stderr)
        return TIMED_OUT
    return 128 - code if code < 0 else code


class _forwarding_signals:
    """SIGINT, SIGTERM and SIGHUP sent to nsbox go to the command, which decides."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self, process: Any) -> None:
        self.process = process
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> None:
        for sig in self.SIGNALS:
            self.previous[sig] = signal.signal(sig, lambda number, _frame: self.process.send_signal(number))

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _copy_window_size(source: int, target: int) -> None:
    import fcntl
    import termios
    try:
        size = fcntl.ioctl(source, termios.TIOCGWINSZ, b"\0" * 8)
    except OSError:
        return  # not a terminal: the pty keeps its default size
    fcntl.ioctl(target, termios.TIOCSWINSZ, size)


def _relay(master: int, process: Any) -> None:
    """Between this terminal (raw, if it is one) and the shell's pty, until the shell has ended and
    said all it had to say (a background job that keeps the pty open does not hold us)."""
    import termios
    import tty
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    previous = signal.signal(signal.SIGWINCH, lambda *_: _copy_window_size(stdin, master))
    watched = [master, stdin]
    try:
        while True:
            try:
                ready, _, _ = select.select(watched, [], [], 0.2)
            except InterruptedError:
                continue
            if not ready and process.poll() is not None:
                return
            if master in ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # EIO: every process holding the pty's other side is gone
                    data = b""
                if not data:
                    return
                _write_all(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if data:
                    _write_all(master, data)
                else:  # our stdin ended: end the shell's input too
                    watched.remove(stdin)
                    _write_all(master, b"\x04")
    finally:
        signal.signal(signal.SIGWINCH, previous)
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
