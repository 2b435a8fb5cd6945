"""Whether this machine can make sandboxes: every step a sandbox needs, performed for real, one by one.

`nsbox doctor` prints these; each `Check` is a step that worked, or did not with the cause and the
exact fix (from hints.py, through the errors kernel.py raises). The steps are those of steps.py,
which the plugin's probe takes all at once; here each runs in a throw-away child cloned into the
namespaces it needs, so that the one that fails is named; nothing is left behind.
"""

from __future__ import annotations

import errno
import os
import platform
import re
import shutil
import signal
import stat
import sys
import traceback
from dataclasses import asdict, dataclass

from . import caps, hints, kernel, steps, systemd

OK, MISSING, INFO = "ok", "missing", "info"


@dataclass(frozen=True)
class Check:
    """One step: its name, whether it worked (ok/missing) or is only worth knowing (info), what was
    found, and the fix when it did not work."""

    name: str
    status: str
    detail: str = ""
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def run_all(cache_dir: str | None = None) -> list[Check]:
    """Every check, in the order a sandbox needs them."""
    checks = [_platform(), _container(), _nesting()]
    first, *rest = steps.STEPS
    userns = _step(first)
    checks.append(userns)
    if userns.status == OK:
        checks += [_step(step) for step in rest]
    checks += [_pid_caps(), _systemd_scope(), _cache(cache_dir)]
    return checks


def works(checks: list[Check]) -> bool:
    return all(check.status != MISSING for check in checks)


# -- steps run in a child -----------------------------------------------------------------------------
def _step(step: steps.Step) -> Check:
    """Clone a child into the step's namespaces, map our ids there, take it: ok, or why not."""
    name, flags, action = step.name, step.flags, step.action
    uid, gid = os.getuid(), os.getgid()
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        pid, pidfd = kernel.fork_into(flags, what=f"create a {name}")
    except OSError as exc:
        os.close(r)
        os.close(w)
        if flags & kernel.CLONE_NEWCGROUP and exc.errno == errno.ENOSPC:
            # The user namespace step worked: it is the cgroup namespace count that is 0, as every
            # sandbox and isolated test makes it.  A sandbox made here does without one.
            return Check(name, INFO, "forbidden here (inside a sandbox or an isolated test): sandboxes "
                         "made here share the enclosing cgroup namespace, which they cannot mount")
        return _missing(name, str(exc))
    if pid == 0:  # the child: never returns
        os.close(r)
        message = ""
        try:
            kernel.write_id_maps(uid, gid)
            action()
        except OSError as exc:
            message = str(exc)
        except BaseException:  # noqa: BLE001 - a bug of ours is a failed check, with its traceback
            message = traceback.format_exc()
        try:
            os.write(w, message.encode()[:65536])
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        error = f.read().decode(errors="replace")
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:
        pass
    os.close(pidfd)
    os.waitpid(pid, 0)
    return _missing(name, error) if error else Check(name, OK)


def _missing(name: str, error: str) -> Check:
    """A failed step: KernelError's text is 'what failed: ERRNO (meaning). The cause and its fix.'"""
    error = re.sub(r"^\[Errno \d+\] ", "", error)  # str(OSError) says it; our message says it better
    found = re.match(r"(.*?: E[A-Z0-9]+ \([^)]*\))\.\s+(.*)", error, re.DOTALL)
    if found:
        return Check(name, MISSING, found.group(1), found.group(2).strip())
    return Check(name, MISSING, error.strip())


# -- facts of this process and host -------------------------------------------------------------------
def _platform() -> Check:
    release = platform.release()
    detail = f"Linux {release}, {platform.machine()}, Python {platform.python_version()} ({sys.executable})"
    if sys.platform != "linux":
        return Check("platform", MISSING, f"this is {sys.platform}", "sandboxes need Linux namespaces")
    numbers = tuple(int(part) for part in release.split("-")[0].split(".")[:2] if part.isdigit())
    if numbers < (5, 12):
        return Check("platform", MISSING, detail, "a kernel of 5.12 or newer (mount_setattr, clone3 "
                     "into a cgroup, overlay in user namespaces)")
    return Check("platform", OK, detail)


def _container() -> Check:
    runtime = hints.container()
    return Check("container", INFO, f"in {runtime}" if runtime else "none detected")


def _nesting() -> Check:
    uid_map = hints.read("/proc/self/uid_map").split()
    if uid_map[:3] == ["0", "0", "4294967295"]:
        return Check("user namespace of this process", INFO, "the host's")
    return Check("user namespace of this process", INFO,
                 "a nested one (uid map " + " ".join(uid_map[:3]) + "): sandboxes nest inside it")


def _pid_caps() -> Check:
    plan = caps.detect()
    if plan.mechanism == "none":
        return Check("PID and memory caps", MISSING, plan.describe(),
                     "run as a normal user (RLIMIT_NPROC caps it), or give a delegated cgroup v2 "
                     "directory in NSBOX_CGROUP_PARENT, or make the pids cgroup writable")
    if plan.owns_parents:
        caps.remove_parents(plan)  # the `nsbox` parent made to check it, if nothing uses it
    return Check("PID and memory caps", OK, plan.describe())


def _systemd_scope() -> Check:
    decision = systemd.decide()
    if decision.scope is not None:
        return Check("systemd user scope", INFO, "used for cgroup caps: a delegated "
                     "`systemd-run --user --scope` per test process")
    return Check("systemd user scope", INFO, decision.reason or "not used here (root, cgroup v1, "
                 "or no systemd user instance)")


def _cache(cache_dir: str | None) -> Check:
    from ..rootfs.store import RootfsStore, default_cache_dir
    path = str(cache_dir or os.environ.get("NSBOX_CACHE_DIR") or default_cache_dir())
    name = "rootfs cache"
    try:
        info = os.stat(path)
    except FileNotFoundError:
        parent = next((p for p in _parents(path) if os.path.exists(p)), "/")
        if not os.access(parent, os.W_OK | os.X_OK):
            return Check(name, MISSING, f"{path} does not exist and {parent} is not writable",
                         "give a cache you may write: --cache-dir or NSBOX_CACHE_DIR")
        return Check(name, OK, f"{path}: not made yet (the first sandbox makes it), "
                     f"{_free(parent)} free")
    except OSError as exc:
        return Check(name, MISSING, f"{path}: {exc.strerror}", "give a cache you may read: --cache-dir "
                     "or NSBOX_CACHE_DIR")
    if info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check(name, MISSING, f"{path} belongs to uid {info.st_uid} with mode "
                     f"{stat.filemode(info.st_mode)}", "a cache of your own, writable only by you: "
                     "--cache-dir or NSBOX_CACHE_DIR")
    try:
        entries = RootfsStore(path, offline=True).entries()
    except Exception as exc:  # noqa: BLE001 - a cache the store refuses says why
        return Check(name, MISSING, f"{path}: {exc}", "")
    size = sum(entry.size for entry in entries)
    return Check(name, OK, f"{path}: {len(entries)} tree(s), {size / 1e6:.1f} MB, {_free(path)} free")


def _parents(path: str) -> list[str]:
    parents = []
    while path not in ("/", ""):
        path = os.path.dirname(path)
        parents.append(path)
    return parents


def _free(path: str) -> str:
    return f"{shutil.disk_usage(path).free / 1e9:.1f} GB"


# -- the end-to-end check ---------------------------------------------------------------------------
def end_to_end(cache_dir: str | None = None) -> Check:
    """A real sandbox over the pinned Alpine, if it is cached (doctor downloads nothing)."""
    from .sandbox import Sandbox
    from ..rootfs.store import RootfsStore, default_cache_dir
    name = "a sandbox, end to end"
    store = RootfsStore(cache_dir or os.environ.get("NSBOX_CACHE_DIR") or default_cache_dir(), offline=True)
    rootfs = store.cached("alpine")
    if rootfs is None:
        return Check(name, INFO, "not tried: the pinned Alpine is not cached "
                     "(`nsbox rootfs pull alpine` fetches it)")
    try:
        with Sandbox(rootfs=rootfs, pids_max=64) as box:
            result = box.run(["cat", "/etc/alpine-release"], timeout=30)
            limits = box.limits.describe()
    except Exception as exc:  # noqa: BLE001 - whatever stops it is the finding
        return Check(name, MISSING, f"{type(exc).__name__}: {exc}", "")
    if result.returncode != 0:
        return Check(name, MISSING, f"`cat /etc/alpine-release` exited {result.returncode}: {result.stderr.strip()}")
    return Check(name, OK, f"Alpine {result.stdout.strip()}; {limits}")

