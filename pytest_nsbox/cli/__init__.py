"""The `nsbox` command (also `python -m pytest_nsbox`).

    nsbox doctor [--json]              can this machine make sandboxes? each step, and the fix of each
    nsbox run [OPTIONS] -- CMD [ARGS]  a command in a fresh sandbox; its exit status is nsbox's
    nsbox shell [OPTIONS]              an interactive shell in a fresh sandbox, on a terminal
    nsbox rootfs pull|path|list|prune  the cache of root filesystems

Every failure is one line on stderr naming its cause and fix. `doctor` and `rootfs` exit 2 for a
usage error and 1 for a failure; `run` and `shell` exit 125 for both (as `docker run` does), so that
what the command itself returns — 2 included — is passed through unmistaken.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from typing import NoReturn

from ..errors import NsboxError
from . import doctor, rootfs, run

#: What `doctor` and `rootfs` exit with on a usage error, as argparse and most commands do.
USAGE_ERROR = 2
#: The commands whose own exit status is the command's they run: nsbox's errors are 125 there.
_PASS_THROUGH = ("run", "shell")


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command and its --help, with the command's status."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.split()[1:2]
        status = run.SETUP_FAILED if command and command[0] in _PASS_THROUGH else USAGE_ERROR
        self.exit(status, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = _Parser(prog="nsbox", description="pytest-nsbox sandboxes and their root filesystems")
    parser.add_argument("--version", action="version", version=f"nsbox (pytest-nsbox) {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor.add_parser(commands)
    run.add_parsers(commands)
    rootfs.add_parser(commands)
    for command in commands.choices.values():
        command.set_defaults(command_parser=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # reported by the command's own parser, which knows its exit status
        args.command_parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return {"doctor": doctor.run, "run": run.run, "shell": run.shell, "rootfs": rootfs.run}[args.command](args)
    except NsboxError as exc:
        print(f"nsbox: {in_nsbox_words(str(exc), args.command)}", file=sys.stderr)
        return run.SETUP_FAILED if args.command in _PASS_THROUGH else 1


# The rootfs store's sentences are shared with the plugin, and name its options: here, the command's.
_PYTEST_FLAGS = {"--nsbox-cache-dir": "--cache-dir", "--nsbox-offline": "--offline",
                 "--nsbox-alpine-mirror": "--mirror"}
_ROOTFS_FLAG = {"run": "--rootfs PATH", "shell": "--rootfs PATH", "rootfs": "a PATH as the SPEC",
                "doctor": "`nsbox run --rootfs PATH`"}


def in_nsbox_words(message: str, command: str) -> str:
    """`message` with the pytest options it advises replaced by the `nsbox COMMAND` ones."""
    message = re.sub(r"--nsbox-rootfs(=PATH)?", _ROOTFS_FLAG.get(command, "--rootfs PATH"), message)
    return re.sub(r"--nsbox-[a-z-]+", lambda m: _PYTEST_FLAGS.get(m.group(0), m.group(0)), message)
