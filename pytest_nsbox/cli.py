"""The `nsbox` command (also `python -m pytest_nsbox`).

    nsbox rootfs pull SPEC        fetch and extract a rootfs into the cache (refreshes alpine:X.Y)
    nsbox rootfs path SPEC        print the cached tree of SPEC (fetching it if needed)
    nsbox rootfs list             spec, version, arch, digest, size and last use of each cached tree
    nsbox rootfs prune [--keep N] remove all but the N most recently used trees
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from .errors import NsboxError
from .rootfs import RootfsStore


def _progress(name: str, done: int, total: int | None) -> None:
    size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
    sys.stderr.write(f"\rdownloading {name} {size}")
    if total is not None and done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nsbox", description="pytest-nsbox sandboxes and their root filesystems")
    commands = parser.add_subparsers(dest="command", required=True)
    rootfs = commands.add_parser("rootfs", help="manage the rootfs cache")
    rootfs.add_argument("--cache-dir", help="the cache (default: $NSBOX_CACHE_DIR or $XDG_CACHE_HOME/pytest-nsbox)")
    rootfs.add_argument("--mirror", help="Alpine mirror (default: $NSBOX_ALPINE_MIRROR or dl-cdn.alpinelinux.org)")
    rootfs.add_argument("--offline", action="store_true", default=None, help="never download")
    actions = rootfs.add_subparsers(dest="action", required=True)
    actions.add_parser("pull", help="fetch and extract SPEC into the cache").add_argument("spec")
    actions.add_parser("path", help="print the cached tree of SPEC").add_argument("spec")
    actions.add_parser("list", help="list cached trees")
    prune = actions.add_parser("prune", help="remove cached trees")
    prune.add_argument("--keep", type=int, default=0, metavar="N", help="keep the N most recently used")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    store = RootfsStore(args.cache_dir, args.mirror, args.offline, progress=_progress)
    try:
        if args.action == "pull":
            rootfs = store.resolve(args.spec, refresh=True)
            print(f"{rootfs.describe()}\n{rootfs.tree}")
        elif args.action == "path":
            print(store.resolve(args.spec).tree)
        elif args.action == "list":
            _list(store)
        elif args.action == "prune":
            for entry in store.prune(args.keep):
                print(f"removed {entry.tree}")
    except NsboxError as exc:
        print(f"nsbox: {exc}", file=sys.stderr)
        return 1
    return 0


def _list(store: RootfsStore) -> None:
    entries = store.entries()
    if not entries:
        print(f"no rootfs cached in {store.cache_dir}")
        return
    rows = [("SPEC", "VERSION", "ARCH", "DIGEST", "SIZE", "LAST USED")]
    for e in entries:
        rows.append((e.meta.get("spec", "?"), e.meta.get("version") or "-", e.meta.get("arch") or "-",
                     f"sha256:{e.digest[:12]}", f"{e.size / 1e6:.1f} MB",
                     time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


if __name__ == "__main__":
    sys.exit(main())
