"""`nsbox doctor`: whether this machine can make sandboxes for this user, and the fix of what is missing."""

from __future__ import annotations

import argparse
import json

from ..engine import checks
from .rootfs import cache_options, store_for

_MARKS = {checks.OK: "ok", checks.MISSING: "MISSING", checks.INFO: "--"}


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "doctor", parents=[cache_options()], help="check that this machine can make sandboxes",
        description="Perform, for real and for the current user, each step a sandbox needs (namespaces, "
                    "id maps, overlay, /proc, /dev, pivot_root, the syscall filter, the caps, the rootfs "
                    "cache) and say what is missing and how to fix it. Exit status 0 when sandboxes work.")
    parser.add_argument("--json", action="store_true", help="one JSON object: {\"ok\": bool, \"checks\": [...]}")


def run(args: argparse.Namespace) -> int:
    cache_dir = str(store_for(args).cache_dir)
    found = checks.run_all(cache_dir)
    if checks.works(found):
        found.append(checks.end_to_end(cache_dir))
    ok = checks.works(found)
    if args.json:
        print(json.dumps({"ok": ok, "checks": [check.to_json() for check in found]}, indent=1))
        return 0 if ok else 1
    width = max(len(check.name) for check in found)
    for check in found:
        line = f"{_MARKS[check.status]:>7}  {check.name.ljust(width)}  {check.detail}".rstrip()
        print(line)
        if check.fix:
            print(f"{'':>7}  {'':{width}}  fix: {check.fix}")
    print("\nsandboxes work here" if ok else "\nsandboxes cannot be made here: fix what is MISSING above")
    return 0 if ok else 1
