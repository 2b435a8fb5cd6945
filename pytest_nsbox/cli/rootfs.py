"""`nsbox rootfs`: the cache of root filesystems.

    nsbox rootfs pull SPEC             fetch and extract a rootfs into the cache (refreshes alpine:X.Y)
    nsbox rootfs pull --refresh SPEC   ... asking the registry again what an image tag names
    nsbox rootfs path SPEC             print the cached tree of SPEC (fetching it if needed)
    nsbox rootfs list                  spec, version, arch, digest, size and last use of each cached tree
    nsbox rootfs prune --all|--keep N  remove every tree, or all but the N most recently used

`--cache-dir`, `--mirror` and `--offline` go before or after the action. The cache is, first found:
--cache-dir, NSBOX_CACHE_DIR, the project's `nsbox_cache_dir` (in the pytest configuration file
pytest would use from here, relative to that file), $XDG_CACHE_HOME/pytest-nsbox.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..rootfs.archive import ARCHIVE_SUFFIXES
from ..rootfs.store import RootfsStore, default_cache_dir

SPEC_HELP = """\
SPEC is one of:
  alpine                       the Alpine release this version of pytest-nsbox pins
  alpine:X.Y                   the newest release of branch X.Y (pull refreshes it)
  alpine:X.Y.Z                 that release
  alpine:X.Y.Z@sha256:HEX      that release, checked against your digest
  https://URL#sha256=HEX       any tarball, checked against its digest
  PATH                         a local directory, or a tarball ({suffixes})
  host                         the host's own filesystem (nothing to fetch)
  docker://[REGISTRY/]NAME[:TAG][@sha256:HEX]
                               an image in a registry (Docker Hub by default); a tag is
                               resolved once and pinned in the cache (pull --refresh asks again)
  oci:DIR[:REF]                an OCI image layout (REF: a tag in its index.json)
  oci-archive:FILE[:REF]       the same, as a tarball
  docker-archive:FILE[:REF]    what `docker save` writes
"""


class _Progress:
    """Download progress: redrawn in place on a terminal, one line at the end in a log."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, name: str, done: int, total: int | None) -> None:
        finished = total is not None and done >= total
        if self.tty:
            size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
            self.stream.write(f"\rdownloading {name} {size}" + ("\n" if finished else ""))
        elif finished:
            self.stream.write(f"downloaded {name} ({done / 1e6:.1f} MB)\n")
        self.stream.flush()


def _keep(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"--keep takes a number of trees, 0 or more, not {text!r}")
    return value


def cache_options() -> argparse.ArgumentParser:
    """The cache options, accepted before and after the action: SUPPRESS keeps the action's parser
    from resetting what was given before it."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--cache-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="the cache (default: $NSBOX_CACHE_DIR, else the project's nsbox_cache_dir, "
                             "else $XDG_CACHE_HOME/pytest-nsbox)")
    common.add_argument("--mirror", default=argparse.SUPPRESS, metavar="URL",
                        help="Alpine mirror (default: $NSBOX_ALPINE_MIRROR, else the project's "
                             "nsbox_alpine_mirror, else https://dl-cdn.alpinelinux.org/alpine)")
    common.add_argument("--offline", action="store_true", default=argparse.SUPPRESS,
                        help="never download: use the cache only")
    return common


def add_parser(commands: argparse._SubParsersAction) -> None:
    common = cache_options()
    rootfs = commands.add_parser("rootfs", parents=[common], help="manage the rootfs cache",
                                 description="Manage the cache of root filesystems.")
    actions = rootfs.add_subparsers(dest="action", required=True)
    spec_help = SPEC_HELP.format(suffixes=", ".join(ARCHIVE_SUFFIXES))
    for name, what in (("pull", "fetch and extract SPEC into the cache (refreshes alpine:X.Y)"),
                       ("path", "print the cached tree of SPEC, fetching it if needed")):
        action = actions.add_parser(name, parents=[common], help=what, description=what, epilog=spec_help,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
        action.add_argument("spec", metavar="SPEC", help="what to fetch: see below")
        if name == "pull":
            action.add_argument("--refresh", action="store_true",
                                help="ask the registry again what an image tag names (a tag is pinned "
                                     "in the cache when first pulled)")
    actions.add_parser("list", parents=[common], help="list cached trees")
    prune = actions.add_parser("prune", parents=[common], help="remove cached trees",
                               description="Remove cached trees: all of them, or all but the most recently used.")
    which = prune.add_mutually_exclusive_group(required=True)
    which.add_argument("--all", action="store_true", help="remove every cached tree")
    which.add_argument("--keep", type=_keep, metavar="N", help="keep the N most recently used trees")


def run(args: argparse.Namespace) -> int:
    store = store_for(args)
    if args.action == "pull":
        _pull(store, args.spec, args.refresh)
    elif args.action == "path":
        print(store.resolve(args.spec).tree)
    elif args.action == "list":
        _list(store)
    elif args.action == "prune":
        for entry in store.prune(0 if args.all else args.keep):
            print(f"removed {entry.tree}")
    return 0


def _pull(store: RootfsStore, text: str, refresh: bool) -> None:
    from ..rootfs.specs import ImageSpec, parse
    spec = parse(text)
    image = isinstance(spec, ImageSpec)
    # An Alpine branch is asked again on every pull (as before); an image tag only when asked to.
    rootfs = store.resolve(spec, refresh=refresh or not image)
    print(rootfs.describe())
    if not image:
        print(rootfs.tree)
        return
    for tree in (rootfs.tree, *rootfs.lowers):
        print(f"  layer {tree}")
    if spec.transport == "docker" and spec.digest is None and not refresh:  # type: ignore[union-attr]
        print(f"(the tag is pinned in the cache: `nsbox rootfs pull --refresh {text}` asks the registry again)")


def store_for(args: argparse.Namespace) -> RootfsStore:
    ini = project_settings(Path.cwd())
    cache_dir = getattr(args, "cache_dir", None) or os.environ.get("NSBOX_CACHE_DIR") \
        or ini.get("nsbox_cache_dir") or default_cache_dir()
    mirror = getattr(args, "mirror", None) or os.environ.get("NSBOX_ALPINE_MIRROR") or ini.get("nsbox_alpine_mirror")
    offline = getattr(args, "offline", False) or os.environ.get("NSBOX_OFFLINE", "").lower() in _TRUE \
        or ini.get("nsbox_offline", "").lower() in _TRUE
    return RootfsStore(cache_dir, mirror, offline, progress=_Progress())


_TRUE = ("1", "true", "yes", "on")
_INI_FILES = ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini", "setup.cfg")


def project_settings(start: Path) -> dict[str, str]:
    """The nsbox_* settings of the pytest configuration file pytest would pick from `start`.

    As pytest does: the nearest directory with a file that has a pytest section wins, files tried
    in pytest's order; `nsbox_cache_dir` is made relative to that file's directory.
    """
    for directory in (start, *start.parents):
        for name in _INI_FILES:
            path = directory / name
            if path.is_file():
                section = _pytest_section(path)
                if section is not None:
                    settings = {k: str(v) for k, v in section.items() if k.startswith("nsbox_")}
                    if settings.get("nsbox_cache_dir"):
                        settings["nsbox_cache_dir"] = os.path.normpath(
                            directory / os.path.expanduser(settings["nsbox_cache_dir"]))
                    return settings
    return {}


def _pytest_section(path: Path) -> dict | None:
    """The pytest settings of one file, or None if it has no pytest section."""
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(path.read_text())
            if path.name != "pyproject.toml":
                table = data.get("pytest", {})  # pytest.toml counts even without it
                return table if isinstance(table, dict) else None
            tool = data.get("tool", {}).get("pytest")
            if not isinstance(tool, dict):
                return None
            native = {k: v for k, v in tool.items() if k != "ini_options"}  # [tool.pytest], pytest >= 9
            options = native or tool.get("ini_options")
            return options if isinstance(options, dict) else None
        import configparser
        parser = configparser.ConfigParser(interpolation=None)
        parser.read_string(path.read_text(), source=str(path))
        section = "tool:pytest" if path.name == "setup.cfg" else "pytest"
        if parser.has_section(section):
            return dict(parser.items(section))
        return {} if path.name in ("pytest.ini", ".pytest.ini") else None  # pytest.ini counts even empty
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}, the project's pytest configuration: {exc}; fix it, or "
                          "give the cache with --cache-dir") from None


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

