"""pytest-nsbox: hermetic, unprivileged Linux sandboxes for tests.

    from pytest_nsbox import Sandbox
    with Sandbox(rootfs="alpine-minirootfs.tar.gz") as sb:
        print(sb.run(["cat", "/etc/os-release"]).stdout)

The names below are imported on first use, so that the spawner (which imports this package in a
bare `python -I -S`) stays small and quick to start.
"""

from __future__ import annotations


__version__ = "0.1.0"

__all__ = ["ConfigError", "Mount", "NsboxError", "NsboxWarning", "PublishedPort", "RootfsError", "Sandbox", "SandboxClosed",
           "SandboxProcess", "SandboxSettings", "SandboxSetupError", "SandboxUnavailable", "ServerNotReady",
           "UnsafeArchiveError"]

_HOMES = {
    "Sandbox": "engine.sandbox", "SandboxProcess": "engine.process", "PublishedPort": "engine.services",
    "Mount": "settings", "SandboxSettings": "settings",
    "NsboxError": "errors", "NsboxWarning": "errors", "ConfigError": "errors", "RootfsError": "errors", "UnsafeArchiveError": "errors",
    "SandboxClosed": "errors", "SandboxSetupError": "errors", "SandboxUnavailable": "errors",
    "ServerNotReady": "errors",
}

TYPE_CHECKING = False  # not typing's: the spawner imports this package and must stay small
if TYPE_CHECKING:
    from typing import Any

    from .engine.process import SandboxProcess
    from .engine.sandbox import Sandbox
    from .engine.services import PublishedPort
    from .errors import (ConfigError, NsboxError, NsboxWarning, RootfsError, SandboxClosed,
                         SandboxSetupError, SandboxUnavailable, ServerNotReady, UnsafeArchiveError)
    from .settings import Mount, SandboxSettings


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'pytest_nsbox' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
