"""Validation of the settings shared by Sandbox(), the factory and the marker."""

from __future__ import annotations

import pytest

from pytest_nsbox import ConfigError, Mount, SandboxSettings


def test_defaults():
    s = SandboxSettings()
    assert (s.network, s.hostname, s.cwd, s.mounts, s.env) == ("none", "nsbox", "/", (), {})


@pytest.mark.parametrize("key, value", [
    ("network", "internet"), ("hostname", "bad host"), ("hostname", ""), ("env", {"A=B": "x"}),
    ("env", {"A": 1}), ("cwd", "relative"), ("pids_max", 0), ("pids_max", True), ("pids_max", "64"),
    ("timeout", -1), ("timeout", float("inf")), ("mounts", "/tmp"),
])
def test_bad_values_name_key_and_allowed(key, value):
    with pytest.raises(ConfigError, match=f"bad value for '{key}'.*allowed"):
        SandboxSettings(**{key: value})


def test_unknown_keys_are_listed_with_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"test_x: unknown sandbox setting 'nope'; allowed: rootfs, "):
        SandboxSettings.from_kwargs({"nope": 1}, source="test_x")


def test_mount_forms(tmp_path):
    assert Mount.coerce((tmp_path, "/a")) == Mount(tmp_path, "/a", False)
    assert Mount.coerce((str(tmp_path), "/a/", "rw")) == Mount(tmp_path, "/a", True)
    with pytest.raises(ConfigError, match="does not exist"):
        Mount.coerce((tmp_path / "missing", "/a"))
    for target in ("relative", "/a/../b", "/", "/proc/x", "/dev"):
        with pytest.raises(ConfigError):
            Mount.coerce((tmp_path, target))
    with pytest.raises(ConfigError, match="'ro' or 'rw'"):
        Mount.coerce((tmp_path, "/a", "wr"))
