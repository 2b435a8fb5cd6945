"""Attacks on the spawner's namespace of ranges (spawner.py, `_move_into_ranges`): a normal user's
spawner joins, on its first image sandbox, a user namespace that newuidmap/newgidmap mapped with
the user's /etc/subuid and /etc/subgid ranges, and every sandbox it makes from then on has a user
namespace that is a child of that one.  A command in one sandbox must gain nothing over that
namespace or over a sibling sandbox, a one-uid sandbox must stay the user alone, and nothing of
the move may outlive the test process."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pytest_nsbox import Sandbox
from pytest_nsbox.engine import idmap
from pytest_nsbox.rootfs import mapped

from ..images import Entry, alpine_layer, layer_tar, oci_layout

IDS = idmap.available()
pytestmark = pytest.mark.skipif(IDS is None, reason=f"sandboxes map one uid here: {idmap.unavailable()}")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\npostgres:x:70:70:pg:/var/lib/pg:/bin/sh\n"
GROUP = b"root:x:0:root\npostgres:x:70:\n"
HERE = Path(__file__).parent


@pytest.fixture
def image(tmp_path, alpine_tarball) -> str:
    oci_layout(tmp_path / "img", [alpine_layer(alpine_tarball), layer_tar([
        Entry("etc/passwd", PASSWD), Entry("etc/group", GROUP),
        Entry("var/lib/pg", kind="dir", mode=0o700, uid=70),
        Entry("var/lib/pg/secret", b"pg's\n", mode=0o600, uid=70)])])
    return f"oci:{tmp_path / 'img'}:latest"


@pytest.fixture
def shared(tmp_path):
    """A directory two sandboxes share read-write, writable by every id of the range."""
    place = tmp_path / "shared"
    place.mkdir()
    os.chmod(place, 0o1777)
    yield place
    # A directory an image's user made there is that subuid's: only the ids' root can empty it.
    mapped.remove(place, IDS) if IDS is not None and IDS.helpers else shutil.rmtree(place, ignore_errors=True)


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    """nstool (ns_handoff.c), static, so that Alpine's musl runs it: one sandbox hands another
    its namespaces' descriptors, a pidfd of itself and its root; the other tries to use them."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the attack tool")
    place = tmp_path_factory.mktemp("tools")
    out = place / "nstool"
    built = subprocess.run([cc, "-static", "-O1", "-o", str(out), str(HERE / "ns_handoff.c")],
                           capture_output=True, text=True)
    if built.returncode != 0:
        pytest.skip(f"cannot build a static nstool: {built.stderr[-400:]}")
    os.chmod(place, 0o755)
    return place


def _results(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def _hand_over(giver: Sandbox, taker: Sandbox, giver_user: str | None = None,
               taker_user: str | None = None) -> dict[str, str]:
    """`giver` hands its namespaces to `taker` over a socket on their shared bind; what taker got."""
    serving = giver.spawn("/tools/nstool serve /shared/sock", stdout=subprocess.PIPE, user=giver_user)
    try:
        serving.wait_for_output("serving", timeout=10)
        result = taker.run("/tools/nstool attack /shared/sock", user=taker_user, timeout=20)
        assert result.returncode == 0, result.stderr
        return _results(result.stdout)
    finally:
        serving.kill()
        serving.wait()


ESCAPES = ["setns_user", "setns_mnt", "setns_pid", "setns_net", "setns_ipc", "setns_uts", "setns_cgroup",
           "get_parent_of_user", "get_userns_of_mnt", "setns_pidfd_user", "setns_pidfd_all", "pidfd_getfd",
           "process_madvise", "get_parent_of_own_user"]


# -- 1. siblings: one sandbox's namespaces are no way into another's ----------------------------------
@pytest.mark.parametrize("kinds", [("image", "image"), ("image", "plain"), ("plain", "image"),
                                   ("plain", "plain"), ("before", "image"), ("image", "before")])
def test_a_sandbox_given_a_siblings_namespaces_gains_nothing_over_them(image, cache, shared, tools, kinds,
                                                                        alpine_tarball):
    """Every sandbox made after the move has a user namespace that is a child of the spawner's; a
    command that is root of its own, handed a sibling's namespaces and a pidfd of its process
    (a socket on a shared bind), may join none of them, nor see above its own."""
    def make(kind: str) -> Sandbox:
        rootfs = {"rootfs": image, "cache_dir": cache} if kind == "image" else {"rootfs": alpine_tarball}
        return Sandbox(mounts=[(shared, "/shared", "rw"), (tools, "/tools", "ro")], **rootfs)

    def pick(kind: str, before: Sandbox):
        return contextlib.nullcontext(before) if kind == "before" else make(kind)
    with make("plain") as before:  # made before the move, from the host's user namespace
        with Sandbox(rootfs=image, cache_dir=cache) as first:
            first.run("true", check=True)  # the move: every sandbox below is made from the namespace of ranges
            with pick(kinds[0], before) as giver, pick(kinds[1], before) as taker:
                got = _hand_over(giver, taker)
    assert got["read_other_root_file"] == "OK"  # the descriptors did arrive
    for escape in ESCAPES:
        assert got[escape] in ("EPERM", "EACCES", "EINVAL"), f"{escape}: {got[escape]} ({kinds[1]} given {kinds[0]}'s)"


def test_no_command_sees_above_its_own_user_namespace(image, cache, tools, alpine_tarball):
    """The spawner's namespace of ranges holds every capability over every sandbox: no command
    may get a descriptor of it (NS_GET_PARENT walks no higher than the caller's own namespace)."""
    with Sandbox(rootfs=image, cache_dir=cache, mounts=[(tools, "/tools", "ro")]) as box, \
            Sandbox(rootfs=alpine_tarball, mounts=[(tools, "/tools", "ro")]) as plain:
        for sandbox in (box, plain):
            assert sandbox.run("/tools/nstool parents", user="root" if sandbox is box else None).stdout == \
                "parents=0 stop=EPERM\n"
        assert box.run("/tools/nstool parents", user="postgres").stdout == "parents=0 stop=EPERM\n"


# -- 2. a one-uid sandbox made after the move is the user alone -----------------------------------------
def test_a_one_uid_sandbox_after_the_move_cannot_touch_the_ranges_files(image, cache, shared, tools, alpine_tarball):
    """The spawner now names the user 0 and holds the ranges; a plain sandbox it makes must still
    map the user alone: the range's files (an image sandbox's on a shared bind, a cached layer
    tree bound in) stay out of its reach, and it can make no id of the range its own."""
    with Sandbox(rootfs=image, cache_dir=cache, mounts=[(shared, "/shared", "rw")]) as box:
        box.run("su -s /bin/sh postgres -c 'echo by70 > /shared/f70; chmod 600 /shared/f70; "
                "mkdir -m 700 /shared/d70; echo in > /shared/d70/in'", check=True)
        layer = box.rootfs.lowers[-1]
        with Sandbox(rootfs=alpine_tarball, mounts=[(shared, "/shared", "rw"), (layer, "/layer", "ro"),
                                                    (tools, "/tools", "ro")]) as plain:
            assert plain.run("cat /proc/self/uid_map /proc/1/uid_map | wc -l").stdout.strip() == "2"
            for attempt in ("cat /shared/f70", "cat /shared/d70/in", "ls /shared/d70", "chmod 666 /shared/f70",
                            "chown 0:0 /shared/f70", "touch /shared/d70/x", "cat /layer/var/lib/pg/secret",
                            "ls /layer/var/lib/pg", "chown 70 /tmp", "echo '0 0 2' > /proc/self/uid_map",
                            "unshare -U sh -c 'echo \"0 0 2\" > /proc/self/uid_map'",
                            "unshare -U sleep 5 & sleep 0.2; echo '0 0 2' > /proc/$!/uid_map",
                            "unshare -U sleep 5 & sleep 0.2; echo '1 1 1' > /proc/$!/uid_map",
                            "su -s /bin/sh nobody -c true"):
                result = plain.run(attempt + " 2>&1")
                assert result.returncode != 0, f"{attempt!r} worked in a one-uid sandbox: {result.stdout}"
            assert "by70" not in plain.run("cat /shared/* /shared/d70/* 2>&1").stdout
    assert (shared / "f70").stat().st_mode & 0o777 == 0o600
    assert (shared / "f70").stat().st_uid == IDS.host_uid(70)


# -- 3. the move itself -------------------------------------------------------------------------------
def test_probe_still_works_from_the_namespace_of_ranges(image, cache):
    from pytest_nsbox.engine import client
    with Sandbox(rootfs=image, cache_dir=cache) as box:
        box.run("true", check=True)
        probed = client.Spawner.get().probe()
    assert probed.ok, probed.error


VICTIM = """
import sys
from pytest_nsbox import Sandbox
plain = Sandbox(rootfs=sys.argv[3]).start()
plain.run("true")
print("ready", flush=True)
sys.stdin.readline()
box = Sandbox(rootfs=sys.argv[1], cache_dir=sys.argv[2]).start()
print("made", flush=True)
sys.stdin.readline()
"""


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _live_tree(pids: set[int]) -> set[int]:
    """Those of `pids` still running (not zombies: the host's PID 1 reaps orphans when it will)."""
    live = set()
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z":
            live.add(pid)
    return live


@pytest.mark.skipif(IDS is None or not IDS.helpers, reason="only a normal user's spawner moves")
@pytest.mark.parametrize("who", ["test process", "test process and spawner", "spawner"])
def test_nothing_of_the_move_outlives_a_kill_during_the_first_image_sandbox(image, cache, tmp_path, who,
                                                                             alpine_tarball):
    import signal
    import subprocess
    import sys
    import time
    subprocess.run([sys.executable, "-c", f"from pytest_nsbox import Sandbox\nSandbox(rootfs={image!r}, "
                    f"cache_dir={str(cache)!r}).start().close()"], check=True, timeout=120)  # the tree, cached
    caught = []
    for _attempt in range(3):
        victim = subprocess.Popen([sys.executable, "-c", VICTIM, image, str(cache), str(alpine_tarball)],
                                  stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert victim.stdout.readline() == "ready\n"
        spawner = next(c for c in _children(victim.pid) if _comm(c) == "nsbox-spawner")
        seen = set(_children(spawner))
        victim.stdin.write("go\n")
        victim.stdin.flush()
        deadline, holder = time.monotonic() + 5, None
        while holder is None and time.monotonic() < deadline:
            kids = _children(spawner)
            seen.update(kids)
            holder = next((c for c in kids if _comm(c) in ("nsbox-spawner", "newuidmap", "newgidmap")), None)
        if who.startswith("test process"):
            os.kill(victim.pid, signal.SIGKILL)
        if who.endswith("spawner"):
            os.kill(spawner, signal.SIGKILL)
        # A victim whose spawner alone was killed after its sandbox was made waits on stdin: EOF ends it.
        victim.stdin.close()
        victim.wait(timeout=60)
        victim.stdout.close()
        seen.update(_children(spawner))
        seen.add(spawner)
        caught.append(holder)
        gone = time.monotonic() + 10
        while _live_tree(seen) and time.monotonic() < gone:
            time.sleep(0.05)
        assert not _live_tree(seen), f"left running after a SIGKILL of the {who}: " \
            f"{[(p, _comm(p)) for p in _live_tree(seen)]}"
    print(f"killed during the move (its holder or a helper seen) {sum(h is not None for h in caught)} of 3")
