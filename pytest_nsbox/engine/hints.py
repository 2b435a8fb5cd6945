"""Why this host refuses a sandbox, in words a user can act on.

The kernel says EPERM, EACCES or ENOSPC; the cause is a policy somewhere — a sysctl, Ubuntu's
AppArmor restriction, a container runtime's seccomp profile, its masked /proc, its AppArmor profile.
These functions read the evidence (files under /proc and /) and name the cause and its fix; they
take the files' contents as an argument so that tests can describe hosts this one is not.

Loaded by the spawner and init: only os and sys.
"""

from __future__ import annotations

import os
import sys

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing (see spawner.py)
if TYPE_CHECKING:
    from typing import Mapping

def read(path: str, files: Mapping[str, str] | None = None) -> str:
    """A file's text, from `files` if given (a fake host), else from the host; "" if unreadable."""
    if files is not None:
        return files.get(path, "")
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def exists(path: str, files: Mapping[str, str] | None = None) -> bool:
    return path in files if files is not None else os.path.exists(path)


#: Set in a test isolated as root (isolate/confine.py): sandboxes made in it cannot mount a /proc.
ISOLATED_ROOT_ENV = "NSBOX_ISOLATED_AS_ROOT"


def container(files: Mapping[str, str] | None = None) -> str | None:
    """The container runtime this process runs under, if the usual marks say so."""
    if exists("/.dockerenv", files):
        return "Docker"
    if exists("/run/.containerenv", files):
        return "Podman"
    cgroups = read("/proc/1/cgroup", files)
    for mark, name in (("kubepods", "Kubernetes"), ("libpod", "Podman"), ("docker", "Docker"),
                       ("containerd", "containerd")):
        if mark in cgroups:
            return name
    return None


def _evidence(runtime: str) -> str:
    return {"Docker": "/.dockerenv", "Podman": "/run/.containerenv"}.get(runtime, "/proc/1/cgroup")


def _seccomp_filtered(files: Mapping[str, str] | None) -> bool:
    return any(line.split() == ["Seccomp:", "2"] for line in read("/proc/self/status", files).splitlines())


def _apparmor_profile(files: Mapping[str, str] | None) -> str:
    label = read("/proc/self/attr/apparmor/current", files) or read("/proc/self/attr/current", files)
    return label.strip()


def _interpreter() -> str:
    return os.path.realpath(sys.executable)


def userns_refused(files: Mapping[str, str] | None = None) -> str:
    """Why an unprivileged user namespace was refused (EPERM, EACCES, ENOSPC)."""
    sysctl = [
        ("/proc/sys/kernel/unprivileged_userns_clone", "0",
         "user namespaces are disabled for normal users: run `sudo sysctl -w kernel.unprivileged_userns_clone=1`"),
        ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
         "AppArmor restricts unprivileged user namespaces (Ubuntu 23.10+): run `sudo sysctl -w "
         "kernel.apparmor_restrict_unprivileged_userns=0`, or give this Python interpreter an "
         f"AppArmor profile that allows them: `profile nsbox {_interpreter()} flags=(unconfined) {{ userns, }}` "
         "in /etc/apparmor.d/, loaded with `sudo apparmor_parser -r`"),
        ("/proc/sys/user/max_user_namespaces", "0",
         "user namespaces are disabled: run `sudo sysctl -w user.max_user_namespaces=15000`"),
    ]
    for path, bad, hint in sysctl:
        if read(path, files).strip() == bad:
            return hint
    runtime = container(files)
    if _seccomp_filtered(files):
        if runtime in ("Docker", "Podman"):
            return (f"this looks like a {runtime} container ({_evidence(runtime)}) whose seccomp "
                    f"profile refuses unshare(CLONE_NEWUSER): start it with `--security-opt "
                    "seccomp=unconfined` (or a profile that allows unshare, clone and mount)")
        return ("a seccomp filter on this process refuses unshare(CLONE_NEWUSER): whatever started it "
                f"({runtime or 'a container runtime, a service manager or a sandbox'}) must allow "
                "unshare, clone and mount")
    if runtime:
        return (f"the marks of a {runtime} container ({_evidence(runtime)}) are here, and container "
                "runtimes do not allow user namespaces by default")
    return "unprivileged user namespaces are not allowed on this host"


def proc_refused(files: Mapping[str, str] | None = None) -> str:
    """Why mounting a fresh /proc was refused (EPERM): some of the visible /proc is masked."""
    if os.environ.get(ISOLATED_ROOT_ENV):
        return ("this is a test isolated as root, whose /proc/sys is read-only (the host's root may "
                "write most sysctls, capabilities or not), and the kernel mounts no new /proc where "
                "parts of it are covered: make the sandbox in a fixture (it is then made by the "
                "pytest process), or run pytest as a normal user")
    runtime = container(files)
    fixes = {
        "Docker": "start the container with `--security-opt systempaths=unconfined` (or `--privileged`)",
        "Podman": "start the container with `--security-opt unmask=ALL` (or `--privileged`)",
        "Kubernetes": "set `procMount: Unmasked` in the pod's securityContext",
    }
    masked = _masked_proc_paths(files)
    what = f" ({', '.join(masked[:3])}{', ...' if len(masked) > 3 else ''} covered)" if masked else ""
    if runtime in fixes:
        return (f"the kernel mounts a new /proc only where the whole /proc is visible, and this "
                f"{runtime} container ({_evidence(runtime)}) masks parts of it{what}: {fixes[runtime]}")
    return ("the kernel mounts a new /proc only where the whole /proc is visible, and something has "
            f"covered parts of it{what}: run where /proc is not masked (in a container: unmask /proc)")


def mount_refused(files: Mapping[str, str] | None = None) -> str:
    """Why a mount inside our own namespaces was refused (EPERM, EACCES)."""
    profile = _apparmor_profile(files)
    if profile and not profile.startswith("unconfined"):
        name = profile.split(" ")[0]
        if name == "docker-default":
            return ("the AppArmor profile docker-default refuses mounts: start the container with "
                    "`--security-opt apparmor=unconfined`")
        return (f"the AppArmor profile {name} confines this process and may refuse mounts: run it "
                "unconfined, or allow mount in that profile")
    if _seccomp_filtered(files):
        return userns_refused(files).replace("unshare(CLONE_NEWUSER)", "mount")
    return ""


def _masked_proc_paths(files: Mapping[str, str] | None) -> list[str]:
    """Mount points below /proc in this mount namespace: what a container runtime masks."""
    found = []
    for line in read("/proc/self/mountinfo", files).splitlines():
        fields = line.split()
        if len(fields) > 4 and fields[4].startswith("/proc/"):
            found.append(fields[4])
    return found
