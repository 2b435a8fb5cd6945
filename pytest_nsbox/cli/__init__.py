"""The `nsbox` command (also `python -m pytest_nsbox`).

    nsbox doctor [--json]              can this machine make sandboxes? each step, and the fix of each
    nsbox run [OPTIONS] -- CMD [ARGS]  a command in a fresh sandbox; its exit status is nsbox's
    nsbox shell [OPTIONS]              an interactive shell in a fresh sandbox, on a terminal
    nsbox rootfs pull|path|list|prune  the cache of root filesystems

Every failure is one line on stderr naming its cause and fix, and exit status 1 (for `run` and
`shell`, 125: what the command itself returns is passed through).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..errors import NsboxError
from . import doctor, rootfs, run


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = argparse.ArgumentParser(prog="nsbox", description="pytest-nsbox sandboxes and their root filesystems")
    parser.add_argument("--version", action="version", version=f"nsbox (pytest-nsbox) {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    doctor.add_parser(commands)
    run.add_parsers(commands)
    rootfs.add_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"doctor": doctor.run, "run": run.run, "shell": run.shell, "rootfs": rootfs.run}[args.command](args)
    except NsboxError as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return run.SETUP_FAILED if args.command in ("run", "shell") else 1
