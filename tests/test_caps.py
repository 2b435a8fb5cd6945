"""Resource caps: real fork bombs and memory hogs, watched from outside the sandbox."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
import sys
import textwrap
import threading
import time

import pytest

from pytest_nsbox.engine import caps, client
from pytest_nsbox.engine.caps import CapPlan, SandboxCgroup, detect
from pytest_nsbox.settings import parse_size

from .helpers import alive, commands_of, sandbox_processes, wait_until

# The shell forks the bomb once, before there is anything to fill the cap, then execs: no fork of its
# own is left to fail (busy, the bomb's first pipeline could fill the cap between the shell's two
# forks of `bomb | bomb`, and a non-interactive ash exits when a fork fails).
FORK_BOMB = "(bomb() { bomb | bomb & }; bomb) & exec sleep 30"
ROOT = caps.is_global_root()


class Sampler:
    """Counts a sandbox's processes from the host every few milliseconds."""

    def __init__(self, box):
        self.box, self.peak, self._stop = box, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, len(sandbox_processes(self.box.namespaces["pid"], self.box.init_pid)))
            time.sleep(0.002)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def test_mechanism_matches_who_we_are(sandbox):
    # Host root cannot use RLIMIT_NPROC (the kernel exempts uid 0): it needs a cgroup.
    expected = {"cgroup2", "cgroup1"} if ROOT else {"cgroup2", "cgroup1", "rlimit"}
    assert sandbox.limits.pids_mechanism in expected
    assert sandbox.limits.pids_max == 512  # on by default


@pytest.mark.sandbox(pids_max=64)
def test_fork_bomb_is_held_at_the_cap_and_killed_at_the_timeout(sandbox):
    with Sampler(sandbox) as sampler:
        started = time.monotonic()
        with pytest.raises(subprocess.TimeoutExpired):
            sandbox.run(FORK_BOMB, timeout=3)
        elapsed = time.monotonic() - started
    print(f"peak {sampler.peak} processes (cap 64) by {sandbox.limits.pids_mechanism}; returned after {elapsed:.2f} s")
    assert sampler.peak <= 64
    # It did reach the cap: the cgroup counted refused forks, or the sampler (a thread that a busy
    # machine may starve while the bomb burns out) saw it.
    assert sandbox.last_exit.pids_cap_hit or sampler.peak > 10, sampler.peak
    assert elapsed < 4.0
    assert sandbox.last_exit.reason == "timeout"
    if sandbox.limits.pids_mechanism.startswith("cgroup"):
        assert sandbox.last_exit.pids_cap_hit and sandbox.stats()["pids_max_hits"] > 0
    # Nothing of the bomb survives, and the sandbox carries on.
    assert wait_until(lambda: not commands_of(sandbox.namespaces["pid"], sandbox.init_pid))
    assert sandbox.run(["echo", "alive"]).stdout == "alive\n"


def test_the_next_sandbox_after_a_bomb_is_fine(sandbox):
    assert sandbox.run("for i in 1 2 3 4 5 6 7 8; do sleep 0.1 & done; wait; echo done").stdout == "done\n"


@pytest.mark.sandbox(pids_max=64)
def test_command_failing_at_the_cap_is_reported_as_such(sandbox):
    result = sandbox.run("for i in $(seq 100); do sleep 2 & done; wait", timeout=10)
    assert result.returncode != 0  # sh: can't fork
    if sandbox.limits.pids_mechanism.startswith("cgroup"):
        assert sandbox.last_exit.reason == "pids" and sandbox.last_exit.pids_cap_hit
        assert "pids_max" in sandbox.last_exit.describe()


@pytest.mark.sandbox(memory_max="64M")
def test_memory_hog_is_stopped_and_reported(sandbox):
    result = sandbox.run("tail /dev/zero", timeout=30)  # buffers an endless line
    if sandbox.limits.memory_mechanism.startswith("cgroup"):
        assert result.returncode == -9
        assert sandbox.last_exit.reason == "oom" and sandbox.last_exit.oom_killed
        assert sandbox.last_exit.peak_memory <= 64 << 20
    else:
        assert sandbox.limits.memory_mechanism == "rlimit"
        assert result.returncode != 0
        assert sandbox.last_exit.reason == "memory"
    assert sandbox.run(["echo", "fine"]).stdout == "fine\n"


def test_timed_out_run_returns_within_a_second(sandbox):
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run("sleep 60 & sleep 60 & wait", timeout=1)
    assert time.monotonic() - started < 2.0


@pytest.mark.sandbox(timeout=1)
def test_sandbox_lifetime_is_reported_as_such(sandbox):
    with pytest.raises(subprocess.TimeoutExpired):
        sandbox.run("sleep 60")
    assert sandbox.last_exit.reason == "sandbox-timeout"


def test_failure_report_names_the_limit_hit(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        @pytest.mark.sandbox(memory_max="32M", pids_max=50)
        def test_hog(sandbox):
            assert sandbox.run("tail /dev/zero").returncode == 0
    """))
    result = pytester.runpytest_subprocess()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["  caps: pids_max 50 by *; memory_max 32 MB by *",
                                 "  $ tail /dev/zero  -> *memory_max*"])


def test_header_names_the_mechanism(pytester):
    pytester.makepyfile("def test_x(sandbox):\n    pass\n")
    pytester.runpytest_subprocess("--nsbox-pids-max=100").stdout.fnmatch_lines(
        ["nsbox: caps: PIDs capped by * default pids_max 100"])


def test_run_wide_defaults_and_marker_override(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import pytest

        def test_defaults(sandbox):
            assert (sandbox.limits.pids_max, sandbox.limits.memory_max) == (77, 100 << 20)
            assert sandbox.settings.timeout == 30

        @pytest.mark.sandbox(pids_max=None)
        def test_uncapped(sandbox):
            assert sandbox.limits.pids_max is None
    """))
    pytester.makeini("[pytest]\nnsbox_pids_max = 77\nnsbox_timeout = 30\n")
    pytester.runpytest_subprocess("--nsbox-memory-max=100M").assert_outcomes(passed=2)
    bad = pytester.runpytest_subprocess("--nsbox-memory-max=lots")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["ERROR: --nsbox-memory-max: 'lots' is not a size*"])


HIDE_CGROUPS = textwrap.dedent("""
    import os, sys
    from pytest_nsbox.engine import kernel
    uid, gid = os.getuid(), os.getgid()
    flags = kernel.CLONE_NEWNS | (kernel.CLONE_NEWUSER if uid else 0)
    kernel.unshare(flags)
    if uid:
        kernel.write_id_maps(uid, gid, inner_uid=uid, inner_gid=gid)
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
    kernel.mount("tmpfs", "/sys/fs/cgroup", "tmpfs", 0, None)
    import pytest
    sys.exit(pytest.main(sys.argv[1:]))
""")


def test_without_cgroups_root_is_uncapped_and_require_caps_fails(pytester):
    """A host with no cgroups (e.g. a container): root has no mechanism, a normal user has RLIMIT_NPROC."""
    pytester.makepyfile("def test_x(sandbox):\n    assert sandbox.run(['true']).returncode == 0\n")
    plain = pytester.run(sys.executable, "-c", HIDE_CGROUPS, "-p", "no:cacheprovider", timeout=60)
    strict = pytester.run(sys.executable, "-c", HIDE_CGROUPS, "-p", "no:cacheprovider",
                          "--nsbox-require-caps", timeout=60)
    if ROOT:
        plain.stdout.fnmatch_lines(["nsbox: caps: PIDs NOT capped*RLIMIT_NPROC does not bind root*"])
        assert plain.ret == 0
        strict.stdout.fnmatch_lines(["*--nsbox-require-caps: PIDs NOT capped*"])
        assert strict.ret == 1
    else:
        plain.stdout.fnmatch_lines(["nsbox: caps: PIDs capped by RLIMIT_NPROC*"])
        assert plain.ret == 0 and strict.ret == 0


def _cgroup_plan() -> CapPlan:
    plan = client.probe().caps
    if plan is None or plan.mechanism not in ("cgroup1", "cgroup2"):
        pytest.skip("no cgroup for this user on this host (here: root only; anyone in the systemd VM)")
    return plan


def test_cgroup_is_removed_on_close(sandbox_factory):
    _cgroup_plan()
    box = sandbox_factory()
    dirs = list(box.limits.cgroup.values())
    assert all(os.path.isdir(d) for d in dirs)
    box.close()
    assert not any(os.path.exists(d) for d in dirs)


OWNER = textwrap.dedent("""
    import os, sys, time
    from pytest_nsbox import Sandbox
    from pytest_nsbox.engine.client import Spawner
    box = Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start()
    box.spawn(["sleep", "300"])
    print(Spawner.get().process.pid, *box.limits.cgroup.values(), flush=True)
    time.sleep(300)
""")


def test_cgroups_of_a_killed_session_are_swept_by_the_next(alpine_tarball, cache_dir):
    if not _cgroup_plan().owns_parents:
        pytest.skip("a systemd scope is removed by systemd (test_scope.py checks that)")
    owner = subprocess.Popen([sys.executable, "-c", OWNER, str(alpine_tarball), str(cache_dir)],
                             stdout=subprocess.PIPE, text=True)
    spawner, *dirs = owner.stdout.readline().split()
    # Kill the spawner first, so nothing of the first session can clean up after it.
    os.kill(int(spawner), 9)
    owner.kill()
    owner.wait()
    owner.stdout.close()
    assert wait_until(lambda: not alive(int(spawner)))
    assert all(os.path.isdir(d) for d in dirs)
    plan = detect()
    removed = caps.sweep_stale(plan)
    assert set(dirs) <= set(removed)
    assert not any(os.path.exists(d) for d in dirs)


# -- choosing a mechanism, on fake cgroup trees (in addition to the real tests above) --------------
def _mountinfo(*mounts):
    return "\n".join(f"{i} 1 0:{i} / {point} rw - {fstype} {fstype} rw,{opts}"
                     for i, (point, fstype, opts) in enumerate(mounts, 30))


def test_detect_prefers_cgroup2_as_root(tmp_path):
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    (root / "cgroup.subtree_control").write_text("")
    plan = detect(euid=0, mountinfo=_mountinfo((str(root), "cgroup2", "")), environ={})
    assert plan.mechanism == "cgroup2"
    assert plan.parents == {"pids": str(root / "nsbox"), "memory": str(root / "nsbox")}


def test_detect_delegated_cgroup2_for_a_normal_user(tmp_path):
    scope = tmp_path / "user.slice" / "nsbox.scope"
    scope.mkdir(parents=True)
    (scope / "cgroup.controllers").write_text("pids\n")
    (scope / "cgroup.subtree_control").write_text("")
    plan = detect(euid=1000, mountinfo=_mountinfo((str(tmp_path), "cgroup2", "")),
                  environ={"NSBOX_CGROUP_PARENT": str(scope)})
    assert plan.mechanism == "cgroup2" and plan.parents == {"pids": str(scope)}


def test_detect_cgroup1_where_writable(tmp_path):
    pids, memory = tmp_path / "pids", tmp_path / "memory"
    pids.mkdir()
    memory.mkdir()
    plan = detect(euid=0, mountinfo=_mountinfo((str(pids), "cgroup", "pids"), (str(memory), "cgroup", "memory"),
                                               (str(tmp_path / "nowhere"), "cgroup2", "")), environ={})
    assert plan.mechanism == "cgroup1"
    assert plan.parents == {"pids": str(pids / "nsbox"), "memory": str(memory / "nsbox")}


def test_detect_cgroup2_without_pids_falls_through(tmp_path):
    root = tmp_path / "unified"
    root.mkdir()
    (root / "cgroup.controllers").write_text("hugetlb\n")
    plan = detect(euid=1000, mountinfo=_mountinfo((str(root), "cgroup2", "")), environ={})
    assert plan.mechanism == "rlimit"
    assert not (root / "nsbox").exists()


def test_detect_root_without_cgroups_is_uncapped():
    plan = detect(euid=0, mountinfo="", environ={})
    assert plan.mechanism == "none" and "RLIMIT_NPROC does not bind root" in plan.note
    assert "PIDs NOT capped" in plan.describe()


def test_root_inside_an_isolated_test_is_capped_by_the_tests_cgroup():
    plan = detect(euid=0, mountinfo="", environ={caps.ENCLOSING_ENV: "40"})
    assert plan.mechanism == "enclosing"
    assert plan.describe().startswith("PIDs capped by the cgroup of the isolated test this runs in")
    assert "at 40 processes, shared with the test" in plan.describe()
    # A normal user's RLIMIT_NPROC is the sandbox's own cap: it wins.
    assert detect(euid=1000, mountinfo="", environ={caps.ENCLOSING_ENV: "40"}).mechanism == "rlimit"


def test_global_root_is_told_apart_from_root_in_a_user_namespace():
    assert caps.is_global_root(owner_of_sysctls=0, euid=0)
    assert not caps.is_global_root(owner_of_sysctls=65534, euid=0)  # root of a nested namespace
    assert not caps.is_global_root(owner_of_sysctls=0, euid=1000)
    # For real: uid 0 in a user namespace of ours is the host's root only if we are.
    from pytest_nsbox.engine import kernel
    r, w = os.pipe()
    uid, gid = os.getuid(), os.getgid()
    pid = os.fork()
    if pid == 0:
        try:
            kernel.unshare(kernel.CLONE_NEWUSER)
            kernel.write_id_maps(uid, gid)
            os.write(w, b"%d%d" % (os.geteuid(), caps.is_global_root()))
        finally:
            os._exit(0)
    os.close(w)
    answer = os.read(r, 8)
    os.close(r)
    os.waitpid(pid, 0)
    assert answer == (b"01" if os.geteuid() == 0 else b"00")


def test_cgroup_files_on_a_fake_v1_tree(tmp_path):
    plan = CapPlan("cgroup1", {"pids": str(tmp_path / "pids"), "memory": str(tmp_path / "memory")})
    for parent in plan.parents.values():
        os.makedirs(parent)
    group = SandboxCgroup.create(plan, 4242, pids_max=64, memory_max=64 << 20)
    assert (tmp_path / "pids" / os.path.basename(group.dirs["pids"]) / "pids.max").read_text() == "64"
    assert os.path.basename(group.dirs["pids"]).startswith("nsbox-4242-")


@pytest.mark.parametrize("text, size", [("64M", 64 << 20), ("1G", 1 << 30), ("512k", 512 << 10),
                                        (1048576, 1048576), ("100MiB", 100 << 20), (None, None)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-1", 0, "1.5G", True])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_cgroup_files_on_a_fake_v2_tree(tmp_path):
    """The v2 path cannot run for real on this host (its v2 hierarchy has no pids controller)."""
    parent = tmp_path / "nsbox"
    parent.mkdir()
    plan = CapPlan("cgroup2", {"pids": str(parent), "memory": str(parent)})
    group = SandboxCgroup.create(plan, 4242, pids_max=64, memory_max=64 << 20)
    (path,) = set(group.dirs.values())  # one directory for both controllers
    assert (tmp_path / "nsbox" / os.path.basename(path) / "pids.max").read_text() == "64"
    assert Path(path, "memory.max").read_text() == str(64 << 20)
    assert Path(path, "memory.swap.max").read_text() == "0"
    for name, text in {"pids.current": "3\n", "pids.peak": "64\n", "pids.events": "max 17\n",
                       "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
                       "memory.peak": str(64 << 20)}.items():
        Path(path, name).write_text(text)
    assert group.stats() == {"pids_current": 3, "pids_max_hits": 17, "pids_peak": 64,
                             "oom_kills": 1, "memory_peak": 64 << 20}
    no_memory = SandboxCgroup.create(plan, 4242, pids_max=64, memory_max=None)
    assert set(no_memory.dirs) == {"pids"}  # no memory cgroup unless memory is capped


def test_stale_cgroups_of_dead_spawners_are_recognised(tmp_path, sandbox):
    from pytest_nsbox.engine.client import Spawner
    live = Spawner.get().process.pid  # a running spawner (the sandbox fixture started it)
    parent = tmp_path / "nsbox"
    names = {"dead": "nsbox-999999999-abcdef", "reused": f"nsbox-{os.getpid()}-0123ab",
             "live": f"nsbox-{live}-0123ab", "foreign": "not-ours", "malformed": "nsbox-12-xyz",
             "dead test": "nsbox-test-999999999-abcdef", "live test": f"nsbox-test-{os.getpid()}-0123ab"}
    for name in names.values():
        (parent / name).mkdir(parents=True)
    removed = caps.sweep_stale(CapPlan("cgroup1", {"pids": str(parent)}))
    # A PID that is gone, or now belongs to a process that is not a spawner, owns nothing; an
    # isolated test's cgroup belongs to its pytest process while that lives.
    assert sorted(removed) == sorted(str(parent / names[k]) for k in ("dead", "reused", "dead test"))
    assert sorted(p.name for p in parent.iterdir()) == \
        sorted(names[k] for k in ("live", "foreign", "malformed", "live test"))


# -- the writable layer and every tmpfs: one sized budget ------------------------------------------
def _shmem() -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Shmem:"))


def _df_total_kb(box, path: str) -> int:
    return int(box.run(["df", "-k", path]).stdout.splitlines()[-1].split()[1])


def test_every_writable_place_shares_one_budget_of_memory_max(sandbox_factory):
    box = sandbox_factory(memory_max="64M")
    before = _shmem()
    box.run("for place in /tmp /dev/shm /root /run; do dd if=/dev/zero of=$place/fill bs=1M count=40; done")
    # Host shared memory grew by the budget at most (what the sandbox's files hold, on the host):
    # half of memory_max, so that the files fill up before the processes run out of memory.
    assert _shmem() - before < 40 << 20
    assert _df_total_kb(box, "/tmp") == 32 << 10
    assert box.run(["true"]).returncode == 0


def test_commands_not_init_are_the_out_of_memory_killers_choice(sandbox_factory):
    box = sandbox_factory(memory_max="64M", tmpfs_size="64M")
    assert box.read_file("/proc/self/oom_score_adj") == "500\n"
    # Files as big as memory_max: the cgroup runs out, and its OOM killer must pick a command.
    hog = box.run("dd if=/dev/zero of=/dev/shm/fill bs=1M count=80")
    assert hog.returncode != 0
    # Init, untouched, still runs the sandbox: commands start (and may be OOM-killed, while the
    # files fill the cgroup), none raises SandboxClosed.
    assert alive(box.init_pid)
    assert box.run(["true"]).returncode in (0, -9)


def test_tmpfs_size_is_a_setting_and_one_budget(sandbox_factory):
    box = sandbox_factory(tmpfs_size="8M")
    assert _df_total_kb(box, "/dev/shm") == 8 << 10
    full = box.run("dd if=/dev/zero of=/tmp/fill bs=1M count=16")
    assert full.returncode != 0 and "No space left on device" in full.stderr
    # What /tmp took, the root's writable layer no longer has.
    assert box.run("dd if=/dev/zero of=/root/more bs=1M count=1").returncode != 0
    box.run("rm /tmp/fill", check=True)
    assert box.run("dd if=/dev/zero of=/root/more bs=1M count=1").returncode == 0


def test_sysv_shared_memory_is_capped_like_the_tmpfs(sandbox_factory):
    box = sandbox_factory(tmpfs_size="8M")
    assert box.read_file("/proc/sys/kernel/shmmax") == f"{8 << 20}\n"
    assert box.read_file("/proc/sys/kernel/shmall") == f"{(8 << 20) // 4096}\n"


def test_the_default_budget_cannot_exhaust_the_host(sandbox):
    with open("/proc/meminfo") as f:
        ram_kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
    assert _df_total_kb(sandbox, "/tmp") == min(1 << 20, ram_kb // 8 >> 10 << 10)  # whole MiB
    assert "tmpfs" in sandbox.limits.describe()
