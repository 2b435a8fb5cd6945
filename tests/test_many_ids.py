"""Many uids: an image's sandbox maps 65536 ids where the system grants them (root; a normal user
with /etc/subuid and /etc/subgid ranges, through newuidmap/newgidmap), so the image's files keep
their owners, its `User` is honoured and its programs can switch users; elsewhere one uid, and a
warning that says what is missing.  .ci/run runs this file as root, as a user with ranges and as
a user without."""

from __future__ import annotations

import os
import struct
import subprocess
import textwrap
import threading
import time

import pytest

from pytest_nsbox import ConfigError, RootfsError, Sandbox
from pytest_nsbox.engine import idmap
from pytest_nsbox.rootfs.store import RootfsStore

from .helpers import commands_of, sandbox_processes, wait_until
from .images import Entry, alpine_layer, layer_tar, oci_layout

IDS = idmap.available()
many = pytest.mark.skipif(IDS is None, reason=f"sandboxes map one uid here: {idmap.unavailable()}")
one = pytest.mark.skipif(IDS is not None, reason="sandboxes map many ids here")

PASSWD = b"root:x:0:0:root:/root:/bin/sh\npostgres:x:70:70:pg:/var/lib/pg:/bin/sh\nnobody:x:65534:65534::/:/sbin/nologin\n"
GROUP = b"root:x:0:root\npostgres:x:70:\nextra:x:1234:postgres\nnobody:x:65534:\n"


def _users_layer(*extra: Entry) -> bytes:
    return layer_tar([Entry("etc/passwd", PASSWD), Entry("etc/group", GROUP),
                      Entry("var/lib/pg", kind="dir", mode=0o700, uid=70),
                      Entry("var/lib/pg/PG_VERSION", b"16\n", mode=0o600, uid=70), *extra])


@pytest.fixture
def image(tmp_path, alpine_tarball) -> str:
    oci_layout(tmp_path / "pg", [alpine_layer(alpine_tarball), _users_layer()], user="postgres")
    oci_layout(tmp_path / "pg", [alpine_layer(alpine_tarball), _users_layer()], tag="as-root")
    return f"oci:{tmp_path / 'pg'}:latest"


@many
def test_an_images_files_keep_their_owners_and_its_user_is_honoured(image, tmp_path):
    with Sandbox(rootfs=image, cache_dir=tmp_path / "cache") as box:
        assert box.run("id").stdout == "uid=70(postgres) gid=70(postgres) groups=70(postgres),1234(extra)\n"
        assert box.run("stat -c '%u:%g %a' /var/lib/pg /var/lib/pg/PG_VERSION /etc/passwd").stdout == \
            "70:70 700\n70:70 600\n0:0 644\n"
        assert box.run("cat /var/lib/pg/PG_VERSION && touch /var/lib/pg/new && stat -c %u /var/lib/pg/new").stdout \
            == "16\n70\n"
        assert box.run("touch /etc/x").returncode != 0  # postgres is not root
        assert box.read_file("/var/lib/pg/PG_VERSION") == "16\n"  # file transfer runs as root


@many
def test_programs_switch_users_as_entrypoints_do(image, tmp_path):
    """What postgres's and redis's entrypoints do (gosu, su-exec, su): root drops to the image's user."""
    with Sandbox(rootfs=image.replace(":latest", ":as-root"), cache_dir=tmp_path / "cache") as box:
        assert box.run("id -u").stdout == "0\n"
        assert box.run("su -s /bin/sh postgres -c 'id -u; id -G; touch /var/lib/pg/by-su'").stdout == "70\n70 1234\n"
        assert box.run("chown 1234:1234 /var/lib/pg/by-su && stat -c %u:%g /var/lib/pg/by-su").stdout == "1234:1234\n"
        assert box.run("su -s /bin/sh nobody -c 'id -u'").stdout == "65534\n"


@many
def test_the_host_sees_the_ids_of_the_range_never_host_root(image, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o777)  # writable by the range's ids, whose root is not ours as root
    with Sandbox(rootfs=image.replace(":latest", ":as-root"), cache_dir=tmp_path / "cache", mounts=[(out, "/out", "rw")]) as box:
        box.run("touch /out/by-root && su -s /bin/sh postgres -c 'touch /out/by-postgres'", check=True)
        tree = box.rootfs.lowers[-1]
    assert IDS is not None
    assert (out / "by-root").stat().st_uid == IDS.host_uid(0)
    assert (out / "by-postgres").stat().st_uid == IDS.host_uid(70)
    assert (tree / "var/lib/pg").stat().st_uid == IDS.host_uid(70)
    if os.geteuid() == 0:
        assert IDS.host_uid(0) != 0  # root's sandbox root is an unprivileged uid


@many
def test_a_fork_bomb_across_users_stays_under_pids_max(image, tmp_path):
    """Each uid has a process count of its own (RLIMIT_NPROC): a bomb that forks as several must
    still meet one cap for the whole sandbox."""
    bomb = "b() { b | b & }; b"
    command = (f"su -s /bin/sh postgres -c '{bomb}' & su -s /bin/sh nobody -c '{bomb}' & "
               f"({bomb}) & exec sleep 30")
    with Sandbox(rootfs=image.replace(":latest", ":as-root"), cache_dir=tmp_path / "cache", pids_max=32,
                 timeout=60) as box:
        peak, done = [0], threading.Event()

        def sample() -> None:  # root may read every process's namespace; a normal user not its subuids'
            while not done.is_set():
                peak[0] = max(peak[0], len(sandbox_processes(box.namespaces["pid"], box.init_pid)))
                time.sleep(0.002)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            with pytest.raises(subprocess.TimeoutExpired):
                box.run(command, timeout=3)
        finally:
            done.set()
            sampler.join()
        assert box.last_exit.reason == "timeout"
        assert peak[0] <= 32
        if box.limits.pids_mechanism.startswith("cgroup"):
            assert box.last_exit.pids_cap_hit
        assert wait_until(lambda: not commands_of(box.namespaces["pid"], box.init_pid))
        assert box.run("echo alive").stdout == "alive\n"


@many
def test_trees_of_many_ids_have_their_own_key_and_are_pruned_whole(image, tmp_path):
    cache = tmp_path / "cache"
    with Sandbox(rootfs=image, cache_dir=cache) as box:
        assert all(tree.name.endswith(IDS.key) for tree in (box.rootfs.tree, *box.rootfs.lowers))
    assert len(RootfsStore(cache).prune()) == 2
    assert not [p for p in (cache / "trees").iterdir() if not p.name.endswith(".lock")]


@many
def test_an_owner_beyond_the_map_is_refused(tmp_path, alpine_tarball):
    far = layer_tar([Entry("srv/far", b"x", uid=70000)])
    oci_layout(tmp_path / "far", [alpine_layer(alpine_tarball), far])
    with pytest.raises(RootfsError, match=r"srv/far.* is owned by 70000:70000, beyond the ids 0\.\.6553[56]"):
        Sandbox(rootfs=f"oci:{tmp_path / 'far'}", cache_dir=tmp_path / "cache").start()
    assert not [p for p in (tmp_path / "cache" / "trees").iterdir() if ".tmp-" in p.name]


@many
def test_every_user_of_the_image_may_ping_and_bind_low_ports_in_its_network(image, tmp_path):
    """What an image's file capabilities are for (ping, a server on port 80 as its own user) works
    without them, as on a host: for every group the sandbox maps, not only for root's."""
    with Sandbox(rootfs=image, cache_dir=tmp_path / "cache", network="none") as box:
        assert box.run("id -u").stdout == "70\n"
        result = box.run("ping -c 1 -W 2 127.0.0.1")
        assert result.returncode == 0, result.stdout + result.stderr
        assert box.run("nc -l -p 80 -w 1 & sleep 0.2; nc -z 127.0.0.1 80").returncode == 0


#: security.capability, VFS_CAP_REVISION_2 with the effective flag: cap_net_raw+ep, as `setcap` writes it
NET_RAW = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


@many
def test_file_capabilities_of_a_layer_are_kept_for_the_ranges_root_only(tmp_path, alpine_tarball):
    """Images keep file capabilities where setuid bits used to be (Debian's ping, caddy): the layer's
    `security.capability` is written by the range's root, so the kernel stores it for that root
    (a v3 capability): it means nothing to host root, nor to any namespace but the range's."""
    layer = layer_tar([Entry("usr/bin/pinger", b"#!/bin/sh\n", mode=0o755, xattrs=(("security.capability", NET_RAW),)),
                       Entry("usr/bin/plain", b"#!/bin/sh\n", mode=0o755)])
    oci_layout(tmp_path / "img", [alpine_layer(alpine_tarball), layer])
    with Sandbox(rootfs=f"oci:{tmp_path / 'img'}", cache_dir=tmp_path / "cache") as box:
        top = box.rootfs.lowers[-1]
        assert box.run("ls -l /usr/bin/pinger").returncode == 0
    assert IDS is not None
    kept = os.getxattr(top / "usr/bin/pinger", "security.capability")
    magic, permitted = struct.unpack_from("<II", kept)
    assert permitted == 1 << 13
    assert magic >> 24 == 3, "a v3 capability: it names the root it is for"
    assert struct.unpack_from("<I", kept, 20)[0] == IDS.host_uid(0)  # that root: never host root
    with pytest.raises(OSError):
        os.getxattr(top / "usr/bin/plain", "security.capability")


@one
def test_without_ranges_a_sandbox_maps_one_uid_and_says_what_is_missing(image, tmp_path):
    with pytest.warns(UserWarning, match=r"runs as user 'postgres', but its sandbox maps one uid, because "
                                         r".*(/etc/subuid|uidmap|user namespace)"):
        with Sandbox(rootfs=image, cache_dir=tmp_path / "cache") as box:
            assert box.run("id -u").stdout == "0\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root's isolated test makes no sandbox in its call "
                                               "(test_isolate.py), only in fixtures, which the pytest process makes")
def test_an_isolated_test_maps_one_uid_and_says_why(pytester, image):
    pytester.makepyfile(textwrap.dedent(f"""
        def test_one(sandbox_factory):
            assert sandbox_factory(rootfs="{image}").run(["id", "-u"]).stdout == "0\\n"
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-p", "no:randomly")
    result.assert_outcomes(passed=1, warnings=1)
    result.stdout.fnmatch_lines(["*runs as user 'postgres', but its sandbox maps one uid, because this process "
                                 "already runs in a user namespace*"])


def test_subordinate_ranges_are_read_as_shadow_writes_them(tmp_path):
    subuid = tmp_path / "subuid"
    subuid.write_text("# a comment\nother:1:5\nbad:x:y\nme:100000:65536\nme:300000:10\n")
    assert idmap._subordinate(str(subuid), "me", 1000) == (100000, 65536)  # the first of the user's
    subuid.write_text("1000:200000:65536\n")
    assert idmap._subordinate(str(subuid), "me", 1000) == (200000, 65536)  # by uid, as shadow allows
    assert idmap._subordinate(str(subuid), "you", 1001) is None
    assert idmap._subordinate(str(tmp_path / "missing"), "me", 1000) is None


def test_the_nested_map_repeats_each_line_of_the_sandboxs():
    ids = idmap.IdMap(((0, 1000, 1), (1, 100000, 65536)), ((0, 1000, 1), (1, 100000, 65536)), helpers=True)
    assert ids.nested() == {"uid": [[0, 0, 1], [1, 1, 65536]], "gid": [[0, 0, 1], [1, 1, 65536]]}
    assert ids.size == 65537 and ids.host_uid(70) == 100069 and ids.host_uid(0) == 1000
    assert ids.host_uid(65537) is None
    assert ids.key != idmap.IdMap(((0, 1000, 1), (1, 200000, 65536)), ids.gid, True).key


def test_root_maps_an_unprivileged_range_by_default():
    assert idmap.DEFAULT_ROOT_BASE == 1879048192 - 65536
    assert idmap.DEFAULT_ROOT_BASE + 65536 <= 1879048192  # inside systemd's container range



@many
def test_a_sandbox_over_many_ids_saves_and_the_save_keeps_the_owners(image, tmp_path):
    with Sandbox(rootfs=image, cache_dir=tmp_path / "cache") as box:
        box.run("touch /var/lib/pg/saved", check=True)
        saved = box.save(tmp_path / "saved.tar")
    import tarfile
    with tarfile.open(saved) as tar:
        assert tar.getmember("./var/lib/pg/saved").uid == 70
        assert tar.getmember("./var/lib/pg/PG_VERSION").uid == 70


@many
def test_a_command_may_run_as_another_user_of_the_image(image, tmp_path):
    with Sandbox(rootfs=image, cache_dir=tmp_path / "cache") as box:
        assert box.run("id -u", user="root").stdout == "0\n"
        assert box.run("id -u; id -g", user="nobody").stdout == "65534\n65534\n"
        assert box.run("id -u; id -g", user="1234:70").stdout == "1234\n70\n"
        with pytest.raises(ConfigError, match="runs as user 'nope', which its /etc/passwd does not list"):
            box.run("true", user="nope")


@many
def test_a_sandbox_of_one_uid_made_after_an_images_still_maps_only_the_user(image, tmp_path, alpine_tarball):
    """A normal user's spawner moves, for its first image, into a user namespace of the user's
    ranges (spawner.py) and names the user 0 from then on: a one-uid sandbox it makes after that
    must still be the user alone, on the host as inside."""
    with Sandbox(rootfs=image, cache_dir=tmp_path / "cache") as box:
        box.run("true", check=True)
    out = tmp_path / "out"
    out.mkdir()
    with Sandbox(rootfs=alpine_tarball, mounts=[(out, "/out", "rw")]) as plain:
        assert plain.run("id -u; touch /out/f").stdout == "0\n"
        assert plain.run("chown 1 /out/f").returncode != 0  # uid 1 does not exist in it
        assert plain.run("su -s /bin/sh nobody -c true").returncode != 0
        assert len(plain.run("cat /proc/self/uid_map").stdout.splitlines()) == 1
    assert (out / "f").stat().st_uid == os.geteuid()


def test_user_needs_a_sandbox_of_many_ids(sandbox):
    assert sandbox.run("id -u", user="root").stdout == "0\n"
    with pytest.raises(ConfigError, match=r"user='postgres': this sandbox maps one uid, root, because"):
        sandbox.run("true", user="postgres")


def test_only_a_cache_entry_vouches_for_its_size(tmp_path):
    """save() sizes an unreadable tree by what the cache recorded; a user's directory whose
    neighbour happens to be NAME.json records nothing."""
    from pytest_nsbox.rootfs.store import recorded_size
    (tmp_path / "rootfs").mkdir()
    (tmp_path / "rootfs.json").write_text('{"size": 1}')
    assert recorded_size(tmp_path / "rootfs") is None
