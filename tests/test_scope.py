"""A normal user's delegated systemd scope: when it is used, how the spawner settles in it, and
what happens when systemd-run fails.

The scope itself needs a host with systemd and the pids controller on cgroup v2.  This machine has
neither, so `.ci/run` also runs the cap tests inside such a VM (.ci/vm/); the tests here that need
one skip elsewhere, the rest use fake cgroup trees and real wrapper processes.
"""

from __future__ import annotations

import fnmatch
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pytest_nsbox.engine import client, systemd
from pytest_nsbox.engine.caps import detect, enter_scope
from pytest_nsbox.engine.client import Spawner

from .helpers import alive, wait_until

UNIT = "nsbox-4242-0a1b2c3d.scope"


def _mountinfo(v2_root: Path) -> str:
    return f"30 1 0:30 / {v2_root} rw - cgroup2 cgroup2 rw\n"


@pytest.fixture
def systemd_host(tmp_path):
    """A fake unified hierarchy with pids, and a user session whose systemd instance is up."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu io memory pids\n")
    runtime = tmp_path / "run-user-1000"
    (runtime / "systemd").mkdir(parents=True)
    (runtime / "systemd" / "private").touch()
    return {"mountinfo": _mountinfo(root), "environ": {"XDG_RUNTIME_DIR": str(runtime)}}


def _which(name):
    return f"/usr/bin/{name}"


# -- when a scope is used --------------------------------------------------------------------------
def test_a_normal_user_on_a_systemd_host_gets_a_scope(systemd_host):
    decision = systemd.decide(uid=1000, which=_which, **systemd_host)
    assert decision.scope is not None
    assert re.fullmatch(rf"nsbox-{os.getpid()}-[0-9a-f]{{8}}\.scope", decision.scope.unit)
    argv = decision.scope.argv
    assert argv[:3] == ("/usr/bin/systemd-run", "--user", "--scope") and argv[-1] == "--"
    assert "Delegate=yes" in argv and decision.scope.unit in argv


@pytest.mark.parametrize("case, change", [
    ("root has its own nsbox cgroup", {"uid": 0}),
    ("the user named a delegated cgroup", {"environ": {"NSBOX_CGROUP_PARENT": "/sys/fs/cgroup/x"}}),
    ("the user switched scopes off", {"environ": {"NSBOX_SYSTEMD_SCOPE": "off"}}),
])
def test_no_scope_when_another_cgroup_is_meant(systemd_host, case, change):
    args = {"uid": 1000, "which": _which, **systemd_host}
    args["environ"] = {**args["environ"], **change.get("environ", {})}
    args["uid"] = change.get("uid", 1000)
    assert systemd.decide(**args) == systemd.Decision(None)


def test_no_scope_and_no_complaint_on_a_hybrid_host(tmp_path, systemd_host):
    """Hybrid hosts (like this one) keep pids in v1: a v2 scope could cap nothing."""
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("hugetlb\n")
    decision = systemd.decide(uid=1000, which=_which, environ=systemd_host["environ"],
                              mountinfo=_mountinfo(root))
    assert decision == systemd.Decision(None)


@pytest.mark.parametrize("environ, which, reason", [
    ({}, _which, "no systemd user session (XDG_RUNTIME_DIR is not set)"),
    ({"XDG_RUNTIME_DIR": "/nonexistent"}, _which, "no systemd user instance*"),
    (None, lambda name: None, "systemd-run is not on PATH"),
])
def test_a_missing_piece_is_named(systemd_host, environ, which, reason):
    decision = systemd.decide(uid=1000, which=which, mountinfo=systemd_host["mountinfo"],
                              environ=systemd_host["environ"] if environ is None else environ)
    assert decision.scope is None
    assert fnmatch.fnmatch(decision.reason, reason)


def test_another_users_session_is_not_tried(systemd_host, tmp_path):
    """`su` without a login keeps XDG_RUNTIME_DIR: systemd-run would knock on the wrong door."""
    private = Path(systemd_host["environ"]["XDG_RUNTIME_DIR"], "systemd", "private")
    if os.getuid() == 0:
        os.chown(private, 12345, 12345)
    else:
        private.unlink()
        private.symlink_to("/etc/passwd")  # root's
    decision = systemd.decide(uid=1000, which=_which, **systemd_host)
    assert decision.scope is None and "belongs to another user (su without -l?)" in decision.reason


# -- the spawner in its scope ----------------------------------------------------------------------
def _scope_tree(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    scope = root / "user.slice" / "user@1000.service" / "app.slice" / UNIT
    scope.mkdir(parents=True)
    (scope / "cgroup.controllers").write_text("memory pids\n")
    (scope / "cgroup.subtree_control").write_text("")
    return root, scope


def test_the_spawner_steps_into_a_leaf_of_its_scope(tmp_path):
    root, scope = _scope_tree(tmp_path)
    proc_cgroup = f"0::/user.slice/user@1000.service/app.slice/{UNIT}\n"
    assert enter_scope(str(root), UNIT, proc_cgroup) == str(scope)
    assert (scope / "spawner" / "cgroup.procs").read_text() == str(os.getpid())


def test_the_scope_becomes_the_parent_of_every_sandbox_cgroup(tmp_path):
    root, scope = _scope_tree(tmp_path)
    # A fake tree does not echo writes to cgroup.subtree_control like the kernel: pretend it took.
    (scope / "cgroup.subtree_control").write_text("memory pids\n")
    plan = detect(euid=1000, mountinfo=_mountinfo(root), environ={"NSBOX_SCOPE_UNIT": UNIT},
                  proc_cgroup=f"0::/user.slice/user@1000.service/app.slice/{UNIT}\n")
    assert plan.mechanism == "cgroup2"
    assert plan.parents == {"pids": str(scope), "memory": str(scope)}
    assert plan.note == f"systemd scope {UNIT}"
    assert plan.describe() == f"PIDs capped by cgroup2 (systemd scope {UNIT}); memory capped by cgroup"
    assert not plan.owns_parents  # systemd removes the scope, not us


def test_a_spawner_outside_its_scope_falls_back_and_says_why(tmp_path):
    root, _scope = _scope_tree(tmp_path)
    plan = detect(euid=1000, mountinfo=_mountinfo(root), environ={"NSBOX_SCOPE_UNIT": UNIT},
                  proc_cgroup="0::/user.slice/session-1.scope\n")
    assert plan.mechanism == "rlimit"
    assert f"cannot use the systemd scope {UNIT}: this process is in /user.slice/session-1.scope" in plan.note


# -- real wrapper processes standing where systemd-run would -------------------------------------
@pytest.fixture
def wrapped_spawner(monkeypatch):
    """A fresh Spawner started through the given wrapper argv instead of systemd-run."""
    started = []

    def start(*argv, unit=UNIT, timeout=None):
        monkeypatch.setattr(systemd, "decide", lambda: systemd.Decision(systemd.Scope(unit, argv)))
        if timeout is not None:
            monkeypatch.setattr(client, "_HANDSHAKE_TIMEOUT", timeout)
        spawner = Spawner()
        started.append(spawner)
        return spawner

    yield start
    for spawner in started:
        spawner.close()


def test_a_failing_systemd_run_falls_back_with_its_message(wrapped_spawner):
    fake = "echo 'Failed to connect to bus: No medium found' >&2; exit 1"
    spawner = wrapped_spawner("sh", "-c", fake, "--")
    probe = spawner.probe()
    assert probe.ok
    assert "systemd-run --user --scope failed: Failed to connect to bus: No medium found" in probe.caps.note


def test_a_hanging_systemd_run_is_given_up(wrapped_spawner):
    started = time.monotonic()
    spawner = wrapped_spawner("sh", "-c", "exec sleep 60", "--", timeout=0.5)
    assert time.monotonic() - started < 5
    assert "systemd-run --user --scope failed: no answer within 0.5 s" in spawner.probe().caps.note


def test_a_wrapper_that_makes_no_scope_is_noticed(wrapped_spawner):
    spawner = wrapped_spawner("env", "--")
    note = spawner.probe().caps.note
    assert f"cannot use the systemd scope {UNIT}: this process is in" in note


# -- on a real systemd host (the CI's VM) ----------------------------------------------------------
def _scope_plan():
    plan = client.probe().caps
    if plan is None or not plan.note.startswith("systemd scope "):
        pytest.skip("this host gives no delegated systemd scope (the CI's systemd VM does)")
    return plan


def test_sandboxes_get_child_cgroups_of_the_scope(sandbox):
    plan = _scope_plan()
    (path,) = set(sandbox.limits.cgroup.values())
    assert os.path.dirname(path) == plan.parents["pids"]
    assert Path(path, "pids.max").read_text().strip() == str(sandbox.limits.pids_max)
    # The spawner sits in a leaf beside them; its inits are cloned straight into their own.
    assert str(Spawner.get().process.pid) in Path(plan.parents["pids"], "spawner", "cgroup.procs").read_text().split()


def test_each_xdist_worker_has_its_own_scope(pytester):
    _scope_plan()
    pytester.makepyfile(textwrap.dedent(f"""
        import os, pathlib, pytest
        from pytest_nsbox.engine import client

        @pytest.mark.parametrize("n", range(4))
        def test_capped(sandbox, n):
            assert sandbox.limits.pids_mechanism == "cgroup2"
            assert sandbox.run(["true"]).returncode == 0
            worker = os.environ["PYTEST_XDIST_WORKER"]
            pathlib.Path({str(pytester.path)!r}, worker + ".scope").write_text(client.probe().caps.note)
    """))
    pytester.runpytest_subprocess("-n", "2").assert_outcomes(passed=4)
    notes = {p.read_text() for p in pytester.path.glob("gw*.scope")}
    assert len(notes) == 2 and all(n.startswith("systemd scope nsbox-") for n in notes), notes


OWNER = textwrap.dedent("""
    import sys, time
    from pytest_nsbox import Sandbox
    from pytest_nsbox.engine import client
    box = Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start()
    box.spawn(["sleep", "300"])
    print(client.Spawner.get().process.pid, client.probe().caps.parents["pids"], flush=True)
    time.sleep(300)
""")


def test_a_killed_session_leaves_no_scope(alpine_tarball, cache_dir):
    _scope_plan()
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(alpine_tarball), str(cache_dir)],
                             stdout=subprocess.PIPE, text=True)
    spawner, scope = owner.stdout.readline().split()
    assert os.path.isdir(scope)
    os.kill(int(spawner), 9)  # nothing of the session can clean up after itself
    owner.kill()
    owner.wait()
    owner.stdout.close()
    assert wait_until(lambda: not alive(int(spawner)))
    # The sandbox dies with its spawner (PDEATHSIG); the empty scope is systemd's to remove.
    assert wait_until(lambda: not os.path.exists(scope), timeout=10), f"{scope} outlived its session"


@pytest.mark.skipif("NSBOX_EXPECT_CAPS" not in os.environ,
                    reason="CI sets NSBOX_EXPECT_CAPS to the mechanism each of its hosts must give")
def test_the_host_gives_the_mechanism_ci_expects():
    """Guards CI against a silent fallback, e.g. from a systemd scope to RLIMIT_NPROC."""
    mechanism, _, note = os.environ["NSBOX_EXPECT_CAPS"].partition(":")
    plan = client.probe().caps
    assert plan.mechanism == mechanism, plan.describe()
    assert note in plan.note, plan.describe()
