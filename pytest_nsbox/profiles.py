"""Named sandbox settings, kept in the project's pyproject.toml:

    [tool.nsbox.profiles.web]
    network = "host"
    pids_max = 128
    mounts = [["tests/fixtures", "/srv", "ro"]]
    layers = ["tests/rootfs-extra"]
    env = { APP_ENV = "test" }

used as `@pytest.mark.sandbox(profile="web", ...)`, `--nsbox-profile web` or `nsbox run --profile web`.
Keys are `Sandbox(...)` keywords; "none" stands for None (TOML has no null); relative paths (a
rootfs, a mount's source) are relative to the pyproject.toml. Keywords given with the profile win.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import ConfigError
from .settings import SandboxSettings, anchored

_NONE_ALLOWED = ("pids_max", "memory_max", "timeout", "tmpfs_size", "output_max", "rootfs")


def find_pyproject(start: Path) -> Path | None:
    """The nearest pyproject.toml at or above `start`."""
    for directory in (start, *start.parents):
        candidate = directory / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load(path: Path | None) -> dict[str, dict[str, Any] | ConfigError]:
    """Every profile of `path`, checked: a bad one is kept as the ConfigError (naming the file, the
    table and the key) that `pick` raises for it, so that one mistake fails only its own users."""
    if path is None:
        return {}
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read the profiles in {path}: {exc}") from None
    tables = data.get("tool", {}).get("nsbox", {}).get("profiles", {})
    if not isinstance(tables, dict):
        raise ConfigError(f"{path}: [tool.nsbox.profiles] must be a table of tables, one per profile")
    profiles = {}
    for name, table in tables.items():
        where = f"{path} [tool.nsbox.profiles.{name}]"
        if not isinstance(table, dict):
            profiles[name] = ConfigError(f"{where} must be a table of Sandbox(...) keywords")
            continue
        try:
            profiles[name] = _checked(table, where, path.parent)
        except ConfigError as exc:
            profiles[name] = exc
    return profiles


def _checked(table: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
    settings = {}
    for key, value in table.items():
        if key not in SandboxSettings.keys() or key == "cache_dir":
            allowed = ", ".join(k for k in SandboxSettings.keys() if k != "cache_dir")
            raise ConfigError(f"{where}: unknown key {key!r}; allowed: {allowed}")
        if value == "none" and key in _NONE_ALLOWED:
            value = None
        else:
            value = anchored({key: value}, base)[key]
        settings[key] = value
        try:
            SandboxSettings.from_kwargs({key: value}, source=where)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (key {key!r})") from None
    return settings


def pick(profiles: dict[str, dict[str, Any] | ConfigError], name: object, path: Path | None, asked_by: str,
         searched: Path | None = None) -> dict[str, Any]:
    """The settings of profile `name`, or a ConfigError listing those there are (`searched`: where
    the search for a pyproject.toml started, named when there is none)."""
    if not isinstance(name, str):
        raise ConfigError(f"{asked_by}: a profile is the name of a [tool.nsbox.profiles.NAME] table, a str, "
                          f"not {name!r}")
    if name not in profiles:
        table = f"[tool.nsbox.profiles.{name}]" if isinstance(name, str) else "[tool.nsbox.profiles.NAME]"
        if path is None:
            above = f" at or above {searched}" if searched else ""
            raise ConfigError(f"{asked_by}: no sandbox profile {name!r}: there is no pyproject.toml{above}; "
                              f"define the profile as {table} in your project's pyproject.toml")
        there = ", ".join(sorted(profiles)) or "none"
        raise ConfigError(f"{asked_by}: no sandbox profile {name!r} in {path} (profiles: {there}); "
                          f"define it as {table}")
    found = profiles[name]
    if isinstance(found, ConfigError):
        raise ConfigError(str(found))
    return dict(found)
