"""The steps every sandbox takes, each runnable on its own in a throw-away child.

One list, two users: the plugin's probe (spawner.probe) takes them all in one child, cheaply, to
say whether sandboxes can be made here; `nsbox doctor` (checks.py) takes each in a child of its
own, to name the one that fails.  So the header and the doctor cannot disagree.  Each action runs
in the namespaces of its `flags` with the caller's ids already mapped, and raises the OSError
(a KernelError, with its cause and fix) of what failed.  Only what the spawner already imports.
"""

from __future__ import annotations

import os
import socket

from . import kernel, layout, seccomp

TYPE_CHECKING = False  # not typing.TYPE_CHECKING: the spawner must not import typing
if TYPE_CHECKING:
    from collections.abc import Callable

SCRATCH = "/tmp"


class Step:
    def __init__(self, name: str, flags: int, action: Callable[[], object], network_only: bool = False):
        self.name = name
        self.flags = kernel.CLONE_NEWUSER | flags
        self.action = action
        self.network_only = network_only  # only for network="none"


def _private_mounts() -> None:
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE, operation="make mounts private")


def _scratch(*names: str) -> None:
    """A private tmpfs to work in (in the child's own mount namespace), with these directories."""
    _private_mounts()
    kernel.mount("tmpfs", SCRATCH, "tmpfs", 0, "mode=0700,size=1m", operation=f"mount a tmpfs on {SCRATCH}")
    for name in names:
        os.mkdir(f"{SCRATCH}/{name}")


def _fresh_proc() -> None:
    _scratch("proc")
    kernel.mount("proc", f"{SCRATCH}/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC,
                 operation="mount a fresh /proc")


def _overlay() -> None:
    _scratch("lower", "upper", "work", "root")
    kernel.mount("overlay", f"{SCRATCH}/root", "overlay", 0,
                 f"lowerdir={SCRATCH}/lower,upperdir={SCRATCH}/upper,workdir={SCRATCH}/work,userxattr",
                 operation="mount an overlay")


def _device_bind() -> None:
    _scratch()
    target = f"{SCRATCH}/null"
    os.close(os.open(target, os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o600))
    fd = kernel.clone_mount("/dev/null")
    try:
        kernel.attach_mount(fd, target, "/dev/null")
    finally:
        os.close(fd)
    fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, b"into the void")
    finally:
        os.close(fd)


def _pivot_root() -> None:
    _scratch("old")
    os.chdir(SCRATCH)
    kernel.pivot_root(".", "old")


def _nothing() -> None:
    """The namespace itself is the step."""


#: In the order a sandbox takes them; pivot_root last, since nothing can follow it in one child.
STEPS = (
    Step("user namespace and id maps", 0, _nothing),
    Step("mount namespace", kernel.CLONE_NEWNS, _private_mounts),
    Step("PID namespace and a fresh /proc", kernel.CLONE_NEWNS | kernel.CLONE_NEWPID, _fresh_proc),
    Step("IPC namespace", kernel.CLONE_NEWIPC, _nothing),
    Step("UTS namespace and a host name", kernel.CLONE_NEWUTS, lambda: socket.sethostname("nsbox-probe")),
    Step("cgroup namespace", kernel.CLONE_NEWCGROUP, _nothing),
    Step("network namespace and loopback", kernel.CLONE_NEWNET, layout.bring_up_loopback, network_only=True),
    Step("overlay in a user namespace", kernel.CLONE_NEWNS, _overlay),
    Step("/dev: device binds", kernel.CLONE_NEWNS, _device_bind),
    Step("seccomp filter and no_new_privs", 0, seccomp.install),
    Step("pivot_root", kernel.CLONE_NEWNS, _pivot_root),
)


def for_network(network: str) -> list[Step]:
    return [step for step in STEPS if network == "none" or not step.network_only]


def take_all(network: str) -> None:
    """Every step, in this process: a child already in the namespaces of all of them."""
    for step in for_network(network):
        step.action()
