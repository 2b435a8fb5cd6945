"""Attacks on many ids (issue 19): hostile layers (owners, links, setuid files, a symlinked
/etc/passwd, odd passwd lines and Users), a command that is root of the range trying to reach
host root, the cache's trees as a normal user, and a fork bomb across many uids."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
import time
from contextlib import suppress

import pytest

from pytest_nsbox import ConfigError, RootfsError, Sandbox
from pytest_nsbox.engine import idmap
from pytest_nsbox.rootfs.store import RootfsStore

from ..helpers import wait_until
from ..images import Entry, alpine_layer, layer_tar, oci_layout

IDS = idmap.available()
pytestmark = pytest.mark.skipif(IDS is None, reason=f"sandboxes map one uid here: {idmap.unavailable()}")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\npostgres:x:70:70:pg:/var/lib/pg:/bin/sh\n"
GROUP = b"root:x:0:root\npostgres:x:70:\n"


def _image(tmp_path, alpine_tarball, *entries: Entry, name: str = "img", **config) -> str:
    oci_layout(tmp_path / name, [alpine_layer(alpine_tarball), layer_tar(list(entries))], **config)
    return f"oci:{tmp_path / name}:latest"


# -- 1. hostile layers ---------------------------------------------------------------------------
@pytest.mark.parametrize("link", [Entry("etc", kind="symlink", target="/etc"),
                                  Entry("etc", kind="symlink", target="../../../../../../etc")])
def test_a_symlinked_etc_is_not_followed_to_the_hosts_passwd(tmp_path, alpine_tarball, cache, link):
    # The host's /etc/passwd lists `root`; "daemon" is on every host, never in this image.
    image = _image(tmp_path, alpine_tarball, link, user="daemon")
    with pytest.raises((ConfigError, RootfsError), match="daemon|etc"):
        with Sandbox(rootfs=image, cache_dir=cache) as box:
            box.run("id -u")


def test_a_passwd_linked_to_the_hosts_shadow_is_not_read(tmp_path, alpine_tarball, cache):
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", kind="symlink", target="/etc/shadow"),
                   user="root:shadow")
    with pytest.raises((ConfigError, RootfsError)) as raised:
        with Sandbox(rootfs=image, cache_dir=cache) as box:
            box.run("id -u")
    assert "$" not in str(raised.value)  # no hash of the host's shadow in any message


def test_a_huge_passwd_is_read_no_further_than_its_cap(tmp_path, alpine_tarball, cache):
    huge = b"x" * (8 << 20) + b"\npostgres:x:70:70::/:/bin/sh\n"  # the entry lies past 4 MiB
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", huge), user="postgres")
    with pytest.raises(ConfigError, match="does not list"):
        with Sandbox(rootfs=image, cache_dir=cache) as box:
            box.run("id -u")


@pytest.mark.parametrize("user", ["../../x", "0:999999", "999999", "4294967295", "postgres:4294967295",
                                  "-1", "postgres:-1", "/etc/shadow"])
def test_a_user_outside_the_map_or_not_a_user_is_refused(tmp_path, alpine_tarball, cache, user):
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", PASSWD), Entry("etc/group", GROUP), user=user)
    with pytest.raises(ConfigError):
        with Sandbox(rootfs=image, cache_dir=cache) as box:
            box.run("id -u")


@pytest.mark.parametrize("uid_field", ["-1", "abc", "4294967295", "65536000", "+70"])
def test_a_passwd_uid_that_is_not_an_id_of_the_map_never_leaves_root_in_charge(tmp_path, alpine_tarball,
                                                                                 cache, uid_field):
    """setresuid(-1) changes nothing: a passwd entry of uid -1 must not run the User as root."""
    passwd = PASSWD.replace(b":70:70:", f":{uid_field}:70:".encode())
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", passwd), Entry("etc/group", GROUP), user="postgres")
    try:
        with Sandbox(rootfs=image, cache_dir=cache) as box:
            uid = box.run("id -u").stdout.strip()
    except ConfigError:
        return  # refused: fine
    assert uid != "0", f"the image's User postgres (uid field {uid_field!r}) ran as root"
    assert uid == "70"  # "+70" is 70, as glibc reads it


@pytest.mark.parametrize("owner", [65536, 4294967295, 4294967294])
def test_an_owner_beyond_the_map_is_refused_as_a_file_and_a_directory(tmp_path, alpine_tarball, cache, owner):
    assert IDS is not None
    if owner < IDS.size:
        pytest.skip(f"{owner} is inside this map ({IDS.describe()})")
    for kind in ("file", "dir"):
        image = _image(tmp_path, alpine_tarball, Entry(f"srv/far-{kind}", b"x" if kind == "file" else None,
                                                       kind=kind, uid=owner), name=f"far-{kind}")
        with pytest.raises(RootfsError, match="beyond the ids"):
            Sandbox(rootfs=image, cache_dir=cache).start()


def test_the_highest_owner_of_the_map_lands_inside_the_range(tmp_path, alpine_tarball, cache):
    assert IDS is not None
    top = IDS.size - 1
    image = _image(tmp_path, alpine_tarball, Entry("srv/top", b"x", uid=top), Entry("srv/setuid", b"#!/bin/sh\nid -u\n",
                   mode=0o4755), Entry("srv/hard", kind="link", target="srv/setuid"))
    with Sandbox(rootfs=image, cache_dir=cache) as box:
        assert box.run("stat -c %u:%g:%a /srv/top /srv/setuid").stdout == f"{top}:{top}:644\n0:0:755\n"
        tree = box.rootfs.lowers[-1]
        assert (tree / "srv/top").stat().st_uid == IDS.host_uid(top)
        assert (tree / "srv/setuid").stat().st_uid == IDS.host_uid(0) != 0 or os.geteuid() != 0
        assert not (tree / "srv/setuid").stat().st_mode & 0o6000


@pytest.mark.parametrize("target", ["/etc/shadow", "../../../../etc/shadow", "etc/../../etc/shadow"])
def test_a_hard_link_out_of_the_layer_is_refused(tmp_path, alpine_tarball, cache, target):
    image = _image(tmp_path, alpine_tarball, Entry("srv/h", kind="link", target=target))
    with pytest.raises(RootfsError):
        Sandbox(rootfs=image, cache_dir=cache).start()


# -- 2. from inside ------------------------------------------------------------------------------
@pytest.fixture
def box(tmp_path, alpine_tarball, cache):
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", PASSWD), Entry("etc/group", GROUP))
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)
    with Sandbox(rootfs=image, cache_dir=cache, mounts=[(out, "/out", "rw")]) as sandbox:
        yield sandbox, out
    shutil.rmtree(out, ignore_errors=True)  # the range's files: out is ours, so they may go


def test_root_inside_makes_files_of_the_range_on_a_rw_bind_never_host_roots(box):
    sandbox, out = box
    assert IDS is not None
    sandbox.run("touch /out/a && chown 0:0 /out/a && mkdir /out/d && chown 65534:65534 /out/d", check=True)
    assert (out / "a").stat().st_uid == IDS.host_uid(0)
    assert (out / "d").stat().st_uid == IDS.host_uid(65534)
    assert (out / "a").stat().st_uid != 0 or os.geteuid() != 0
    # A setuid copy of a shell on the bind: the host must not see it setuid to host root.
    sandbox.run("cp /bin/busybox /out/sh; chmod 4755 /out/sh", check=False)
    if (out / "sh").exists():
        st = (out / "sh").stat()
        assert st.st_uid != 0 or not st.st_mode & 0o4000


def test_a_command_cannot_rewrite_its_own_id_map_nor_widen_it(box):
    sandbox, _ = box
    for path in ("/proc/self/uid_map", "/proc/self/gid_map", "/proc/1/uid_map"):
        assert sandbox.run(f"echo '0 0 4294967295' > {path}").returncode != 0
    # A nested namespace gets only what this one maps: ids beyond it do not exist.
    shell = ("unshare -Ur sh -c 'cat /proc/self/uid_map' 2>&1; "
             "cat /proc/self/uid_map")
    result = sandbox.run(shell)
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[0].isdigit():
            assert int(fields[1]) + int(fields[2]) <= IDS.size  # as the namespace's parent sees it


def test_a_command_has_no_supplementary_group_of_the_host(box):
    sandbox, _ = box
    status = sandbox.run("cat /proc/self/status").stdout
    groups = next(line for line in status.splitlines() if line.startswith("Groups:"))
    assert groups.split()[1:] == []
    assert "65534" not in sandbox.run("id -G").stdout  # nobody: an unmapped host group


def test_proc_gives_no_way_out_to_host_files(box):
    sandbox, _ = box
    for probe in ("ls /proc/1/root/../../../../etc/shadow", "cat /proc/1/environ", "ls /proc/1/cwd/",
                  "echo x > /proc/sys/kernel/core_pattern", "echo x > /proc/sysrq-trigger"):
        result = sandbox.run(probe + " 2>&1")
        assert "root:" not in result.stdout
    assert sandbox.run("echo x > /proc/sys/kernel/core_pattern").returncode != 0


def test_replacing_etc_passwd_inside_does_not_change_whom_run_user_picks(box):
    sandbox, _ = box
    sandbox.run("sed -i 's/^postgres:x:70:70/postgres:x:0:0/' /etc/passwd", check=True)
    assert sandbox.run("grep ^postgres /etc/passwd").stdout.startswith("postgres:x:0:0")
    assert sandbox.run("id -u; id -g", user="postgres").stdout == "70\n70\n"


def test_another_sandbox_over_the_same_image_is_out_of_reach(box, tmp_path, alpine_tarball, cache):
    sandbox, _ = box
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", PASSWD), Entry("etc/group", GROUP))
    with Sandbox(rootfs=image, cache_dir=cache) as other:
        other.run("echo secret > /root/secret && chmod 600 /root/secret", check=True)
        pid = other.init_pid
        result = sandbox.run(f"ls /proc/{pid} 2>&1; cat /proc/*/root/root/secret 2>&1; "
                             "find / -xdev -name secret 2>/dev/null")
        assert "secret" not in result.stdout.replace("/root/secret", "")
        # The layer trees are shared read-only: a write in one is not seen by the other.
        sandbox.run("echo mine > /etc/motd", check=True)
        assert other.run("cat /etc/motd").stdout != "mine\n"


# -- 3. the cache --------------------------------------------------------------------------------
def test_the_cache_of_many_ids_is_private_and_pruned_whole(tmp_path, alpine_tarball):
    place = tmp_path / "cache"
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", PASSWD), Entry("etc/group", GROUP),
                   Entry("var/lib/pg", kind="dir", mode=0o700, uid=70),
                   Entry("var/lib/pg/ro", kind="dir", mode=0o500, uid=70),
                   Entry("var/lib/pg/ro/f", b"x", mode=0o000, uid=70))
    with Sandbox(rootfs=image, cache_dir=place) as sandbox:
        sandbox.run("true", check=True)
    trees = place / "trees"
    assert trees.stat().st_mode & 0o077 == 0
    assert trees.stat().st_uid == os.geteuid()
    RootfsStore(place).prune()
    left = [p.name for p in trees.iterdir() if not p.name.endswith(".lock")]
    assert left == []


def test_a_planted_entry_named_like_a_tree_makes_the_remover_delete_nothing_outside(tmp_path, alpine_tarball):
    place = tmp_path / "cache"
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", PASSWD))
    with Sandbox(rootfs=image, cache_dir=place):
        pass
    assert IDS is not None
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "sub" / "keep").write_text("keep")
    trees = place / "trees"
    tree = next(p for p in trees.iterdir() if p.name.endswith(IDS.key))
    # Leftovers as killed processes leave them; these are links and a tree with links inside.
    os.symlink(victim, trees / f"{tree.name}.trash-planted")
    os.symlink(victim, trees / f"{tree.name}.tmp-planted")
    (trees / f"{tree.name}.trash-inner").mkdir()
    os.symlink(victim / "sub", trees / f"{tree.name}.trash-inner" / "sub")
    from pytest_nsbox.rootfs import mapped
    os.symlink(victim, trees / "link-to-victim")
    try:
        mapped.remove(trees / "link-to-victim", IDS)
    except RootfsError:
        pass
    RootfsStore(place).prune()
    # The remover runs as the ids' root: it would delete what that root may; it must not follow a link.
    assert (victim / "sub" / "keep").read_text() == "keep"
    for leftover in ("link-to-victim",):
        if os.path.lexists(trees / leftover):
            os.unlink(trees / leftover)


# -- 4. pids_max over many uids ------------------------------------------------------------------
def _descendants(root: int) -> set[int]:
    """Every live process under `root` (by parent pids, which /proc shows anyone: a normal user
    cannot read its subuids' /proc/N/ns)."""
    parents: dict[int, int] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            parents[int(name)] = int(fields[1])
    found, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                found.add(child)
                frontier.append(child)
    return found


@pytest.mark.parametrize("bomb", [
    # Each user keeps its sleeps (a shell bomb collapses at its first refused fork) ...
    "i=0; while [ $i -lt 60 ]; do sleep 4 & i=$((i+1)); done; wait",
    # ... and a classic bomb, for the sampler to meet at its peak.
    "b() { b | b & }; b",
], ids=["sleeps", "bomb"])
def test_a_fork_bomb_setuid_to_many_uids_stays_under_pids_max(tmp_path, alpine_tarball, cache, bomb):
    users = 40
    passwd = PASSWD + b"".join(f"u{n}:x:{1000 + n}:{1000 + n}::/:/bin/sh\n".encode() for n in range(users))
    image = _image(tmp_path, alpine_tarball, Entry("etc/passwd", passwd), Entry("etc/group", GROUP))
    command = " ".join(f"su -s /bin/sh u{n} -c '{bomb}' &" for n in range(users)) + " exec sleep 30"
    pids_max = 32
    with Sandbox(rootfs=image, cache_dir=cache, pids_max=pids_max, timeout=60) as sandbox:
        peak, done = [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], len(_descendants(sandbox.init_pid)))
                time.sleep(0.005)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            # The shell itself may meet the cap before its 40 su's are out, and exit: either way.
            with suppress(subprocess.TimeoutExpired):
                sandbox.run(command, timeout=4)
        finally:
            done.set()
            sampler.join()
        print(f"peak {peak[0]} processes (init included) under pids_max={pids_max}, "
              f"mechanism {sandbox.limits.pids_mechanism}")
        assert peak[0] <= pids_max + 1  # init is not a command, but counts where the cgroup counts
        # Each command has a user namespace of its own: root of a later one may not kill these.
        assert wait_until(lambda: len(_descendants(sandbox.init_pid)) <= 1, timeout=20)

        def alive() -> bool:
            # Under load the cap may still count a process /proc no longer shows (a clone under
            # way, a task not yet released): the promise is that the sandbox recovers.
            try:
                return sandbox.run("echo alive").stdout == "alive\n"
            except BlockingIOError:
                return False
        assert wait_until(alive, timeout=20)
