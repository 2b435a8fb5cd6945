"""A command cannot reach cgroupfs: no cgroup namespace of its own, no cgroup mount in the sandbox's.

When the owner is root, uid 0 inside is the host's root, and cgroup v1 files check little more than
their mode: a command that mounted a v1 hierarchy could raise its own sandbox's pids.max and memory
limit, or, for a controller the sandbox has no cgroup of (freezer, devices, cpu...), reach the
spawner's cgroup — the host's — and freeze host processes.  Mounting cgroupfs takes CAP_SYS_ADMIN
over the user namespace that owns the caller's cgroup namespace: a command has it only over one it
makes itself, so a command must never make one.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ..conftest import REPO
from ..helpers import host_python

ROOT = os.geteuid() == 0

#: Run by the host's interpreter inside a `rootfs="host"` sandbox: every way a command could get a
#: cgroupfs mount, each with the errno it met (0: it worked).  Prints JSON.
ATTACK = textwrap.dedent(r"""
    import ctypes, json, os
    libc = ctypes.CDLL(None, use_errno=True)
    CLONE_NEWUSER, CLONE_NEWCGROUP = 0x10000000, 0x02000000

    def call(result):
        return 0 if result == 0 else ctypes.get_errno()

    def mount(fstype, options, where):
        os.makedirs(where, exist_ok=True)
        return call(libc.mount(b"cgroup", where.encode(), fstype.encode(), 0,
                               options.encode() if options else None))

    def v1_hierarchies():
        with open("/proc/cgroups") as f:
            rows = [line.split() for line in f if not line.startswith("#")]
        return sorted({name for name, hierarchy, _n, enabled in rows if hierarchy != "0" and enabled == "1"})

    def every_mount(tag):
        found = {}
        for n, name in enumerate(v1_hierarchies()):
            found[f"{tag} cgroup {name}"] = mount("cgroup", name, f"/tmp/cg-{tag}-{n}")
        for options in ("none,name=systemd", "none,name=nsbox-attack"):
            found[f"{tag} cgroup {options}"] = mount("cgroup", options, f"/tmp/cg-{tag}-{options}")
        found[f"{tag} cgroup2"] = mount("cgroup2", "", f"/tmp/cg-{tag}-v2")
        for fstype, options in (("cgroup", "pids"), ("cgroup2", "")):  # the new mount API
            found[f"{tag} fsopen {fstype} {options}"] = fsopen_create(fstype, options)
        return found

    def fsopen_create(fstype, options):
        SYS_FSOPEN, SYS_FSCONFIG, FSCONFIG_SET_FLAG, FSCONFIG_CMD_CREATE = 430, 431, 0, 6
        fd = libc.syscall(SYS_FSOPEN, fstype.encode(), 1)  # FSOPEN_CLOEXEC
        if fd < 0:
            return ctypes.get_errno()
        try:
            for option in filter(None, options.split(",")):
                if libc.syscall(SYS_FSCONFIG, fd, FSCONFIG_SET_FLAG, option.encode(), None, 0) != 0:
                    return ctypes.get_errno()
            return call(libc.syscall(SYS_FSCONFIG, fd, FSCONFIG_CMD_CREATE, None, None, 0))
        finally:
            os.close(fd)

    out = every_mount("existing namespace")
    # In a user namespace of its own below the command's, which it owns entirely.
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(r)
        said = {"nested user namespace: unshare(CLONE_NEWCGROUP)": call(libc.unshare(CLONE_NEWUSER | CLONE_NEWCGROUP))}
        os.write(w, json.dumps(said).encode())
        os._exit(0)
    os.close(w)
    out.update(json.loads(os.read(r, 65536)))
    os.waitpid(child, 0)
    out["unshare(CLONE_NEWCGROUP)"] = call(libc.unshare(CLONE_NEWCGROUP))
    if out["unshare(CLONE_NEWCGROUP)"] == 0:
        out.update(every_mount("own namespace"))
        for path, value in (("pids/pids.max", "max"), ("memory/memory.limit_in_bytes", "4G")):
            for n, name in enumerate(v1_hierarchies()):
                if path.startswith(name + "/"):
                    try:
                        with open(f"/tmp/cg-own namespace-{n}/{path.split('/')[1]}", "w") as f:
                            f.write(value)
                        out[f"write {path}"] = 0
                    except OSError as exc:
                        out[f"write {path}"] = exc.errno
    print(json.dumps(out))
""")


def _attack(box) -> dict[str, int]:
    result = box.run([host_python(), "-I", "-S", "-c", ATTACK])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("seccomp", [True, False], ids=["filtered", "unfiltered"])
def test_a_command_can_neither_make_a_cgroup_namespace_nor_mount_cgroupfs(sandbox_factory, seccomp):
    box = sandbox_factory(rootfs="host", seccomp=seccomp, pids_max=64, memory_max="256M")
    found = _attack(box)
    made = {what: code for what, code in found.items() if what.startswith(("unshare", "nested"))}
    assert made == dict.fromkeys(made, errno.ENOSPC), found
    mounted = {what: code for what, code in found.items() if "cgroup" in what and what not in made}
    assert mounted and all(code in (errno.EPERM, errno.EACCES) for code in mounted.values()), found


@pytest.mark.skipif(not ROOT, reason="only root's sandboxes get a cgroup v1 of their own here")
def test_root_in_a_sandbox_cannot_raise_its_own_cgroup_limits(sandbox_factory):
    box = sandbox_factory(rootfs="host", pids_max=64, memory_max="256M")
    if box.limits.pids_mechanism != "cgroup1":
        pytest.skip(f"this host caps PIDs by {box.limits.pids_mechanism}, not a cgroup v1")
    _attack(box)
    pids = Path(box.limits.cgroup["pids"], "pids.max").read_text()
    assert pids == "64\n"
    if "memory" in box.limits.cgroup:
        memory = Path(box.limits.cgroup["memory"], "memory.limit_in_bytes").read_text()
        assert int(memory) == 256 << 20


# A sandbox where cgroup namespaces are forbidden already (inside a sandbox, or an isolated test):
# its init stays in the enclosing cgroup namespace, which its commands cannot mount either.
FORBIDDEN = textwrap.dedent(r"""
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(0x10000000) != 0:
        sys.exit(f"unshare: errno {ctypes.get_errno()}")
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as f:
            f.write(text)
    from pytest_nsbox.engine import layout
    layout.forbid_cgroup_namespaces()
    with open("/proc/sys/user/max_cgroup_namespaces") as f:
        assert f.read() == "0\n"
    from pytest_nsbox import Sandbox
    from pytest_nsbox.engine import checks
    found = checks.run_all()
    doctor = {"works": checks.works(found), "cgroup": [c.status for c in found if c.name == "cgroup namespace"]}
    with Sandbox(rootfs="host", pids_max=64) as box:
        attack = box.run([sys.argv[1], "-I", "-S", "-c", sys.argv[2]])
        print(json.dumps({"cgroup": os.readlink("/proc/self/ns/cgroup"), "inside": box.namespaces["cgroup"],
                          "attack": json.loads(attack.stdout), "doctor": doctor}))
""")


def test_a_sandbox_starts_where_cgroup_namespaces_are_forbidden(cache_dir):
    env = {**os.environ, "PYTHONPATH": str(REPO), "NSBOX_CACHE_DIR": str(cache_dir)}
    result = subprocess.run([sys.executable, "-c", FORBIDDEN, host_python(), ATTACK], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["inside"] == found["cgroup"]  # the enclosing one: none of its own
    assert found["doctor"] == {"works": True, "cgroup": ["info"]}  # `nsbox doctor` says so, and passes
    attack = found["attack"]
    assert attack["unshare(CLONE_NEWCGROUP)"] == errno.ENOSPC, attack
    assert all(code in (errno.EPERM, errno.EACCES, errno.ENOSPC) for code in attack.values()), attack


NESTED = textwrap.dedent(r"""
    import sys
    from pytest_nsbox import Sandbox
    with Sandbox(rootfs=sys.argv[1], cache_dir="/tmp/nsbox-cache") as box:
        print(box.run(["cat", "/proc/self/cgroup"], check=True).stdout.count("\n"))
""")


@pytest.mark.skipif(ROOT, reason="a root-owned sandbox binds /proc's kernel knobs read-only, so no "
                                 "full /proc for a nested one (see layout.protect_proc)")
def test_a_sandbox_inside_a_host_sandbox_starts(sandbox_factory, alpine_tarball):
    # The repo and its venv may live under /tmp, which the sandbox replaces: bind them where they are.
    places = {Path(REPO), Path(sys.prefix).resolve(), alpine_tarball.resolve().parent}
    box = sandbox_factory(rootfs="host", tmpfs_size="512M", pids_max=128,
                          mounts=[(place, str(place)) for place in places])
    result = box.run([sys.executable, "-c", NESTED, str(alpine_tarball.resolve())], timeout=60,
                     env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 0
