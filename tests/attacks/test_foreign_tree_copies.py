"""A rootfs directory another uid owns is copied into the cache (store.py `_own_copy`): that uid
controls the tree while it is copied, so the copy must follow none of its links, open none of its
FIFOs or devices, and cost no more disk than the archive limits allow.

Root only: a test cannot give a tree to another uid otherwise.  The copy runs in a child
process (a hang, or a file bigger than RLIMIT_FSIZE, is then the child's alone); the other user's
moves are made by this process while the child copies.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root can make a tree another uid owns")

OTHER = 12345
MiB = 1 << 20

_CHILD = """
import resource, sys
limit = int(sys.argv[3])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pytest_nsbox import NsboxError
from pytest_nsbox.rootfs.store import RootfsStore
try:
    print("accepted", RootfsStore(sys.argv[2], offline=True).resolve(sys.argv[1]).tree, flush=True)
except NsboxError as exc:
    print(f"refused {type(exc).__name__}: {exc}", flush=True)
"""


def _child(tree: Path, cache: Path, file_limit: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(tree), str(cache), str(file_limit)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _said(child: subprocess.Popen, timeout: float = 60) -> str:
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"copying the tree hung for {timeout} s")
    assert out.strip(), err
    return out.strip()


@pytest.fixture
def foreign(tmp_path, alpine_tarball) -> Path:
    """An Alpine tree that uid 12345 owns."""
    tree = tmp_path / "tree"
    tree.mkdir()
    subprocess.run(["tar", "xzf", str(alpine_tarball), "-C", str(tree)], check=True)
    return tree


def _give(tree: Path) -> None:
    subprocess.run(["chown", "-R", "-h", f"{OTHER}:{OTHER}", str(tree)], check=True)


def test_a_sparse_file_in_a_foreign_tree_does_not_fill_the_cache(foreign, tmp_path):
    """An 8 GiB hole costs its owner nothing; the copy may write no more than the limits allow
    (NSBOX_ROOTFS_MAX_BYTES, 4 GiB by default; here, a 256 MiB RLIMIT_FSIZE says whether it tried)."""
    with open(foreign / "hole", "wb") as f:
        f.truncate(8 << 30)
    _give(foreign)
    said = _said(_child(foreign, tmp_path / "cache", file_limit=256 * MiB), timeout=300)
    assert said.startswith("refused ArchiveLimitError"), said


@pytest.mark.parametrize("kind", ["fifo", "device", "socket"])
def test_fifos_devices_and_sockets_in_a_foreign_tree_are_refused_without_a_hang(foreign, tmp_path, kind):
    node = foreign / "etc" / "node"
    if kind == "fifo":
        os.mkfifo(node)
    elif kind == "device":
        os.mknod(node, 0o666 | 0o020000, os.makedev(1, 3))
    else:
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(node))
        s.close()
    _give(foreign)
    said = _said(_child(foreign, tmp_path / "cache"), timeout=60)
    if said.startswith("accepted"):
        copy = Path(said.split(" ", 1)[1])
        assert not (copy / "etc" / "node").exists() or (copy / "etc" / "node").is_file()
    else:
        assert "device node or FIFO" in said, said


def test_links_in_a_foreign_tree_stay_links_and_reach_no_host_file(foreign, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("the host's secret\n")
    secret.chmod(0o600)
    (foreign / "abs").symlink_to(secret)
    (foreign / "rel").symlink_to("../secret")
    _give(foreign)
    said = _said(_child(foreign, tmp_path / "cache"))
    assert said.startswith("refused UnsafeArchiveError") and "leaves the tree" in said, said
    (foreign / "rel").unlink()
    said = _said(_child(foreign, tmp_path / "cache"))
    copy = Path(said.split(" ", 1)[1])
    assert os.readlink(copy / "abs") == str(secret)  # a link, resolved inside the sandbox only


def test_a_directory_swapped_for_a_link_during_the_copy_is_not_followed(foreign, tmp_path):
    """The other user lists `d/big` (a large hole, slow to copy) and `d/id_rsa`; while the copy
    reads `d/big`, they move `d` away and put `d -> /root/.ssh`-like directory in its place.
    A copy that walks by path then reads the victim's key into the tree its sandbox runs."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- the victim's\n")
    (private / "id_rsa").chmod(0o600)
    d = foreign / "d"
    d.mkdir()
    with open(d / "big", "wb") as f:
        f.truncate(1 << 30)
    (d / "id_rsa").write_text("decoy\n")
    _give(foreign)
    child = _child(foreign, tmp_path / "cache")
    big = str(d / "big")
    deadline = time.monotonic() + 60
    swapped = False
    while time.monotonic() < deadline and child.poll() is None:
        try:
            held = {os.readlink(f"/proc/{child.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{child.pid}/fd")}
        except OSError:
            held = set()
        if big in held:
            os.rename(d, foreign / "d.moved")
            os.symlink(private, d)
            swapped = True
            break
        time.sleep(0.0005)
    said = _said(child, timeout=120)
    assert swapped, "the copy never opened d/big"
    if said.startswith("accepted"):
        copy = Path(said.split(" ", 1)[1])
        copied = copy / "d" / "id_rsa"
        assert not copied.exists() or "victim" not in copied.read_text(), \
            "the copy followed the swapped link and read the victim's private file"
