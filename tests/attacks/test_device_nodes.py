"""No device node the sandbox gets from the host opens, but its own /dev's.

When the owner is root, uid 0 inside passes the permission checks of a root-owned device node:
a block device planted on the host (in a directory bound in, or anywhere under `rootfs="host"`)
would give a command the disk behind it.  Every mount from the host is nodev (and nosuid), and
locked so: a command, root in a user namespace of its own, cannot clear it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
import textwrap
from pathlib import Path

import pytest

from ..helpers import host_python

ROOT = os.geteuid() == 0

CANARY = b"nsbox-canary\n"
#: /dev/kmsg: root may write the host's kernel log through it with no capability at all.
KMSG = (1, 11)

#: Opens each path write-only (a device opens for writing even on a read-only mount) and writes
#: over a block device's start if it can.  Prints {path: errno or 0}.
PROBE = textwrap.dedent(r"""
    import json, os, stat, sys
    out = {}
    for path in sys.argv[1:]:
        try:
            fd = os.open(path, os.O_WRONLY)
        except OSError as exc:
            out[path] = exc.errno
            continue
        if stat.S_ISBLK(os.fstat(fd).st_mode):
            os.write(fd, b"written by a sandbox")
        os.close(fd)
        out[path] = 0
    print(json.dumps(out))
""")


@pytest.fixture
def planted():
    """A host directory outside /tmp (which `rootfs="host"` replaces) holding a char device not in
    the sandbox's list and, where loop devices work, a block device of a loop device."""
    if not ROOT:
        pytest.skip("only root can plant a device node (mknod): a root-only promise")
    where = Path(tempfile.mkdtemp(prefix="nsbox-devices-", dir="/var/tmp"))
    loop = None
    try:
        os.mknod(where / "kmsg", stat.S_IFCHR | 0o600, os.makedev(*KMSG))
        backing = where / "backing.img"
        backing.write_bytes(CANARY + bytes(64 * 1024 - len(CANARY)))
        if shutil.which("losetup"):
            attached = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
            if attached.returncode == 0:
                loop = attached.stdout.strip()
                os.mknod(where / "disk", stat.S_IFBLK | 0o600, os.stat(loop).st_rdev)
        for node in _nodes(where):  # the host can use them: a refusal inside is the sandbox's doing
            os.close(os.open(node, os.O_WRONLY))
        yield where
        assert backing.read_bytes().startswith(CANARY), "a sandbox wrote through the block device"
    finally:
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        shutil.rmtree(where)


def _nodes(where: Path) -> list[Path]:
    return sorted(p for p in where.iterdir() if stat.S_ISCHR(p.lstat().st_mode) or stat.S_ISBLK(p.lstat().st_mode))


def _probe(box, paths: list[str]) -> dict[str, int]:
    result = box.run([host_python(), "-I", "-S", "-c", PROBE, *paths])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.parametrize("place", ["host tree", "read-only bind", "rw bind"])
def test_a_device_node_from_the_host_does_not_open(sandbox_factory, planted, place):
    names = [node.name for node in _nodes(planted)]
    if place == "host tree":
        box, inside = sandbox_factory(rootfs="host"), str(planted)
    else:
        inside = "/tmp/planted"
        mode = ("rw",) if place == "rw bind" else ()
        box = sandbox_factory(rootfs="host", mounts=[(planted, inside, *mode)])
    found = _probe(box, [f"{inside}/{name}" for name in names])
    assert found == {f"{inside}/{name}": errno.EACCES for name in names}


def test_a_device_node_in_a_layer_does_not_open(sandbox_factory, planted, tmp_path):
    layer = tmp_path / "layer"
    layer.mkdir()
    for node in _nodes(planted):
        st = node.lstat()
        os.mknod(layer / node.name, st.st_mode, st.st_rdev)
    box = sandbox_factory(layers=[layer])
    for node in _nodes(layer):
        result = box.run(f"exec 3>/{node.name}")
        assert result.returncode != 0 and "Permission denied" in result.stderr, (node, result)


def test_a_single_device_bind_does_not_open(sandbox_factory, planted):
    # A bind of the node itself, not of a directory holding it.
    node = _nodes(planted)[0]
    box = sandbox_factory(rootfs="host", mounts=[(node, "/tmp/node")])
    assert _probe(box, ["/tmp/node"]) == {"/tmp/node": errno.EACCES}


def test_the_sandboxs_own_devices_still_work(sandbox_factory):
    box = sandbox_factory(rootfs="host")
    found = _probe(box, [f"/dev/{name}" for name in ("null", "zero", "full", "random", "urandom")])
    assert set(found.values()) == {0}, found
    assert box.run(["sh", "-c", "echo x > /dev/null && head -c 4 /dev/zero | wc -c"]).stdout.strip() == "4"


#: A command's ways to get a mount without nodev over the planted directory.  Prints {way: errno or 0}.
UNLOCK = textwrap.dedent(r"""
    import ctypes, json, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND = 1, 2, 4, 32, 4096
    OPEN_TREE_CLONE, AT_RECURSIVE, AT_EMPTY_PATH, AT_FDCWD = 1, 0x8000, 0x1000, -100
    MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_RDONLY = 2, 4, 1
    SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442

    class MountAttr(ctypes.Structure):
        _fields_ = [(n, ctypes.c_uint64) for n in ("attr_set", "attr_clr", "propagation", "userns_fd")]

    def err(result):
        return 0 if result >= 0 else ctypes.get_errno()

    def setattr_(fd, path, clear, flags=0):
        attr = MountAttr(0, clear, 0, 0)
        return err(libc.syscall(SYS_MOUNT_SETATTR, fd, path, flags, ctypes.byref(attr), ctypes.sizeof(attr)))

    # The mount the node is on (its root), the node's directory, the node's name.
    top, target, node = sys.argv[1].encode(), sys.argv[2].encode(), sys.argv[3]
    out = {}
    out["remount without nodev"] = err(libc.mount(None, top, None, MS_REMOUNT | MS_BIND, None))
    out["remount ro without nodev"] = err(libc.mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None))
    out["mount_setattr clear nodev"] = setattr_(AT_FDCWD, top, MOUNT_ATTR_NODEV)
    out["mount_setattr clear nodev, recursive"] = setattr_(AT_FDCWD, top, MOUNT_ATTR_NODEV, AT_RECURSIVE)
    out["mount_setattr clear nosuid"] = setattr_(AT_FDCWD, top, MOUNT_ATTR_NOSUID)
    os.makedirs("/tmp/again", exist_ok=True)
    bound = err(libc.mount(target, b"/tmp/again", None, MS_BIND, None))
    out["bind, then remount it without nodev"] = \
        bound or err(libc.mount(None, b"/tmp/again", None, MS_REMOUNT | MS_BIND, None))
    fd = libc.syscall(SYS_OPEN_TREE, AT_FDCWD, target, OPEN_TREE_CLONE | AT_RECURSIVE | os.O_CLOEXEC)
    if fd < 0:
        out["open_tree clone"] = ctypes.get_errno()
    else:
        out["open_tree clone, clear nodev"] = setattr_(fd, b"", MOUNT_ATTR_NODEV, AT_EMPTY_PATH | AT_RECURSIVE)
        os.makedirs("/tmp/moved", exist_ok=True)
        attached = err(libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, b"/tmp/moved", 4))  # F_EMPTY_PATH
        out["open_tree clone, attach, remount"] = \
            attached or err(libc.mount(None, b"/tmp/moved", None, MS_REMOUNT | MS_BIND, None))
    # Whatever worked above: the node must still refuse to open, through every path.
    for path in (f"{sys.argv[2]}/{node}", f"/tmp/again/{node}", f"/tmp/moved/{node}"):
        try:
            os.close(os.open(path, os.O_WRONLY))
            out[f"open {path}"] = 0
        except OSError as exc:
            out[f"open {path}"] = exc.errno
    print(json.dumps(out))
""")


@pytest.mark.parametrize("place", ["host tree", "read-only bind", "rw bind"])
@pytest.mark.parametrize("seccomp", [True, False], ids=["filtered", "unfiltered"])
def test_a_command_cannot_clear_nodev(sandbox_factory, planted, place, seccomp):
    if place == "host tree":
        box, inside = sandbox_factory(rootfs="host", seccomp=seccomp), str(planted)
        top = _mount_point(planted)
    else:
        inside = top = "/tmp/planted"
        mode = ("rw",) if place == "rw bind" else ()
        box = sandbox_factory(rootfs="host", seccomp=seccomp, mounts=[(planted, inside, *mode)])
    node = _nodes(planted)[0].name
    result = box.run([host_python(), "-I", "-S", "-c", UNLOCK, top, inside, node])
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    opened = {way: code for way, code in found.items() if way.startswith("open /")}
    assert set(opened.values()) <= {errno.EACCES, errno.ENOENT} and errno.EACCES in opened.values(), found
    cleared = {way: code for way, code in found.items() if way not in opened}
    assert cleared and set(cleared.values()) == {errno.EPERM}, found


def _mount_point(path: Path) -> str:
    """The root of the host mount `path` is on (the same place in a `rootfs="host"` sandbox)."""
    path = path.resolve()
    while not os.path.ismount(path):
        path = path.parent
    return str(path)
