"""A delegated systemd scope for the spawner, so that a normal user's sandboxes get cgroup caps.

On a systemd host with the unified cgroup hierarchy a normal user may create cgroups only inside a
unit that their own systemd instance has delegated to them.  So, when that is possible, the test
process starts its spawner through::

    systemd-run --user --scope --collect -p Delegate=yes --unit nsbox-<pid>-<random>.scope -- python ...

One scope per test process, never one unit per sandbox: every unit costs a D-Bus round trip and
hundreds of them overload systemd (runc #4853).  Inside the scope the spawner moves itself into a
leaf (the kernel allows processes only in leaves once controllers are enabled below a cgroup) and
makes one plain child cgroup per sandbox (`caps.enter_scope`).  When the spawner and its sandboxes
are gone the scope is empty; systemd then stops it and removes the whole subtree, so even a
SIGKILLed session leaves nothing behind.

Set NSBOX_SYSTEMD_SCOPE=off to never use a scope.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass

from .caps import SCOPE_NOTE_ENV, SCOPE_UNIT_ENV, cgroup_mounts, is_global_root
from .kernel import read_text

SWITCH = "NSBOX_SYSTEMD_SCOPE"  # off | no | 0: never start the spawner in a scope
UNIT_ENV = SCOPE_UNIT_ENV       # tells the spawner which scope it was started in
NOTE_ENV = SCOPE_NOTE_ENV       # tells the spawner why a scope was wanted but could not be had


@dataclass(frozen=True)
class Scope:
    """How to start the spawner inside a new transient scope."""

    unit: str
    argv: tuple[str, ...]  # the systemd-run prefix; the spawner's own argv follows


@dataclass(frozen=True)
class Decision:
    scope: Scope | None
    reason: str = ""  # why not, when a scope would have been the right mechanism


def decide(environ: Mapping[str, str] | None = None, uid: int | None = None,
           mountinfo: str | None = None, which=shutil.which) -> Decision:
    """Whether to start the spawner in a delegated scope.  Arguments exist for tests on fake hosts.

    A scope is for normal users on a host whose cgroup v2 hierarchy holds the pids controller and
    whose user has a systemd instance.  Root uses its own `nsbox` cgroup, a user who named a
    delegated cgroup (NSBOX_CGROUP_PARENT) uses that, and on hybrid hosts the controllers live in
    v1, where a v2 scope could cap nothing.
    """
    environ = os.environ if environ is None else environ
    uid = (0 if is_global_root() else max(1, os.getuid())) if uid is None else uid
    if environ.get(SWITCH, "").lower() in ("off", "no", "0", "false"):
        return Decision(None)
    if uid == 0 or environ.get("NSBOX_CGROUP_PARENT"):
        return Decision(None)
    mountinfo = read_text("/proc/self/mountinfo") if mountinfo is None else mountinfo
    v2_root, _ = cgroup_mounts(mountinfo)
    if v2_root is None or "pids" not in read_text(os.path.join(v2_root, "cgroup.controllers")).split():
        return Decision(None)
    runtime_dir = environ.get("XDG_RUNTIME_DIR", "")
    if not runtime_dir:
        return Decision(None, "no systemd user session (XDG_RUNTIME_DIR is not set)")
    try:
        # systemd-run --user talks to the user's manager over this socket.
        owner = os.stat(os.path.join(runtime_dir, "systemd", "private")).st_uid
    except OSError:
        return Decision(None, "no systemd user instance ($XDG_RUNTIME_DIR/systemd/private is missing)")
    if owner != os.getuid():
        # `su` without a login keeps the previous user's variables.
        return Decision(None, f"XDG_RUNTIME_DIR {runtime_dir} belongs to another user (su without -l?)")
    systemd_run = which("systemd-run")
    if systemd_run is None:
        return Decision(None, "systemd-run is not on PATH")
    unit = f"nsbox-{os.getpid()}-{os.urandom(4).hex()}.scope"
    return Decision(Scope(unit, (
        systemd_run, "--user", "--scope", "--quiet", "--collect", "--unit", unit,
        "--description", f"pytest-nsbox sandboxes of PID {os.getpid()}",
        "--property", "Delegate=yes", "--")))
