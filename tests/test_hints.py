"""What the user is told when a host refuses sandboxes, for hosts this machine is not.

The evidence (files under /proc and /) is described per host; what it means is hints.py's job.
That these hints are reached when the kernel really refuses is tested in test_security.py (user
namespaces turned off) and test_errors.py.
"""

from __future__ import annotations

import os
import sys

import pytest

from pytest_nsbox.engine import hints

FILTERED = "Name:\tpython3\nSeccomp:\t2\nSeccomp_filters:\t1\n"
UNFILTERED = "Name:\tpython3\nSeccomp:\t0\n"
MASKED = ("1 0 0:1 / /proc rw - proc proc rw\n2 1 0:2 /null /proc/kcore rw - tmpfs tmpfs rw\n"
          "3 1 0:3 / /proc/acpi ro - tmpfs tmpfs ro\n")


@pytest.mark.parametrize("host, expected", [
    ({"/proc/sys/user/max_user_namespaces": "0\n"}, "sudo sysctl -w user.max_user_namespaces="),
    ({"/proc/sys/kernel/unprivileged_userns_clone": "0\n"}, "kernel.unprivileged_userns_clone=1"),
    ({"/.dockerenv": "", "/proc/self/status": FILTERED},
     "Docker container (/.dockerenv) whose seccomp profile refuses unshare(CLONE_NEWUSER): start it "
     "with `--security-opt seccomp=unconfined`"),
    ({"/run/.containerenv": "", "/proc/self/status": FILTERED}, "Podman container (/run/.containerenv) whose seccomp profile"),
    # Docker's seccomp without /.dockerenv: not "the host", but a filter on this process.
    ({"/proc/self/status": FILTERED}, "a seccomp filter on this process refuses unshare(CLONE_NEWUSER)"),
    ({"/proc/1/cgroup": "0::/kubepods/burstable/pod1/abc\n", "/proc/self/status": UNFILTERED},
     "the marks of a Kubernetes container (/proc/1/cgroup) are here"),
    ({}, "unprivileged user namespaces are not allowed on this host"),
], ids=["max-userns-0", "debian-sysctl", "docker-seccomp", "podman-seccomp", "seccomp-no-dockerenv",
        "kubernetes", "plain"])
def test_user_namespaces_refused(host, expected):
    assert expected in hints.userns_refused(host)


def test_ubuntu_apparmor_names_sudo_and_the_interpreter_a_profile_must_name():
    hint = hints.userns_refused({"/proc/sys/kernel/apparmor_restrict_unprivileged_userns": "1\n"})
    assert "`sudo sysctl -w kernel.apparmor_restrict_unprivileged_userns=0`" in hint
    assert os.path.realpath(sys.executable) in hint and "userns," in hint and "apparmor_parser" in hint


@pytest.mark.parametrize("host, expected", [
    ({"/.dockerenv": "", "/proc/self/mountinfo": MASKED},
     "Docker container (/.dockerenv) masks parts of it (/proc/kcore, /proc/acpi covered): start the "
     "container with `--security-opt systempaths=unconfined`"),
    ({"/run/.containerenv": "", "/proc/self/mountinfo": MASKED}, "`--security-opt unmask=ALL`"),
    ({"/proc/1/cgroup": "0::/kubepods/x\n", "/proc/self/mountinfo": MASKED}, "procMount: Unmasked"),
    ({"/proc/self/mountinfo": MASKED}, "something has covered parts of it (/proc/kcore, /proc/acpi covered)"),
], ids=["docker", "podman", "kubernetes", "unknown"])
def test_a_masked_proc(host, expected):
    assert expected in hints.proc_refused(host)


def test_apparmor_docker_default_denying_mount():
    hint = hints.mount_refused({"/proc/self/attr/current": "docker-default (enforce)\n"})
    assert hint == ("the AppArmor profile docker-default refuses mounts: start the container with "
                    "`--security-opt apparmor=unconfined`")
    assert hints.mount_refused({"/proc/self/attr/current": "unconfined\n"}) == ""


def test_this_host_is_described_without_error():
    # Whatever this machine is, reading its own evidence works and says something.
    assert hints.userns_refused() and hints.proc_refused()
