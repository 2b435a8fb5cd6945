"""Hostile images: layouts, archives and layers made to make the host, not the sandbox, read or
write outside the cache, hang, or run out of memory or disk while an image is read.

Each layer is extracted into a tree of its own; only the kernel's overlay ever merges them, so a
layer's symlink must never matter to the host when another layer is extracted.  Whatever the
layout or archive holds (links, FIFOs, blobs bigger than they say, documents nested or huge), the
host opens only regular files under the layout's root, copies no more than a blob says it is, and
answers with a RootfsError: never a hang, a crash, or a full disk.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pytest_nsbox import RootfsError, Sandbox

from ..images import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST, Entry, alpine_layer, config_json, \
    layer_tar, oci_layout

MiB = 1 << 20


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _blob(root: Path, data: bytes) -> dict:
    digest = hashlib.sha256(data).hexdigest()
    path = root / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def _layout(root: Path, layers: list[dict], config: bytes | None = None) -> Path:
    """An OCI layout whose manifest lists `layers` (descriptors) as they are given."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    config_entry = {"mediaType": OCI_CONFIG, **_blob(root, config or config_json([]))}
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config_entry,
                           "layers": layers}).encode()
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, **_blob(root, manifest)}]}))
    return root


def _gz_layer(root: Path, tar: bytes) -> dict:
    return {"mediaType": OCI_LAYER_GZIP, **_blob(root, gzip.compress(tar, mtime=0))}


_CHILD = """
import os, resource, sys
limit = int(sys.argv[3])
if limit:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
from pytest_nsbox import NsboxError
from pytest_nsbox.rootfs.store import RootfsStore
try:
    RootfsStore(sys.argv[2], offline=True).resolve(sys.argv[1])
    print("accepted")
except NsboxError as exc:
    print(f"refused {type(exc).__name__}: {exc}")
except BaseException as exc:
    print(f"crashed {type(exc).__name__}: {str(exc)[:300]}")
with open("/proc/self/status") as f:
    print(next(line for line in f if line.startswith("VmHWM")).split()[1])
"""


def _resolve_in_child(spec: str, cache: Path, timeout: float = 60, file_limit: int = 0) -> tuple[str, int]:
    """Resolve `spec` in a child: what it said, and its peak memory in bytes; a hang fails."""
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, spec, str(cache), str(file_limit)],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading {spec} hung for {timeout} s")
    lines = done.stdout.splitlines()
    assert len(lines) == 2, done.stdout + done.stderr
    return lines[0], int(lines[1]) * 1024


# -- whiteouts and opaque markers --------------------------------------------------------------
@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "a/.wh..", ".wh..wh."])
def test_a_whiteout_of_nothing_or_of_a_parent_is_refused(tmp_path, cache, alpine_tarball, name):
    root = tmp_path / "image"
    oci_layout(root, [alpine_layer(alpine_tarball), layer_tar([Entry(name, b"")])])
    try:
        box = Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    except RootfsError as exc:
        assert "whiteout" in str(exc)
        return
    with box:  # accepted (aufs bookkeeping, skipped): it must hide nothing of the layer below
        assert box.run("cat /etc/alpine-release").stdout == "3.20.3\n"
        assert box.run("ls / | wc -l").stdout.strip() == "18" or box.run("test -d /usr && echo ok").stdout == "ok\n"


def test_a_whiteout_cannot_climb_out_of_its_layer_by_its_path(tmp_path, cache, alpine_tarball):
    for name in ("../.wh.etc", "etc/../../.wh.x", "/.wh.etc"):
        root = tmp_path / hashlib.sha256(name.encode()).hexdigest()[:8]
        oci_layout(root, [alpine_layer(alpine_tarball), layer_tar([Entry(name, b"")])])
        with pytest.raises(RootfsError, match="'..' component|absolute path"):
            Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    assert not (cache / "etc").exists() and not (cache / "trees" / "etc").exists()


def test_a_whiteout_over_a_directory_of_its_own_layer_is_refused(tmp_path, cache, alpine_tarball):
    root = tmp_path / "image"
    layer = layer_tar([Entry("srv", kind="dir"), Entry("srv/data", kind="dir"), Entry("srv/data/x", b"x"),
                       Entry("srv/.wh.data", b"")])
    oci_layout(root, [alpine_layer(alpine_tarball), layer])
    with pytest.raises(RootfsError, match="would replace a directory"):
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()


def test_a_hard_link_to_a_whiteout_only_hides_a_name_of_its_own_layer(tmp_path, cache, alpine_tarball):
    """`.wh.motd` then `etc/issue` linked to `etc/motd` (now the whiteout): both names hidden."""
    root = tmp_path / "image"
    outside = tmp_path / "outside"
    outside.write_text("host file\n")
    layer = layer_tar([Entry("etc/.wh.motd", b""), Entry("etc/issue", kind="link", target="etc/motd"),
                       Entry("host", kind="link", target=str(outside).lstrip("/"))])
    oci_layout(root, [alpine_layer(alpine_tarball), layer])
    with pytest.raises(RootfsError):  # the link to a path that is not in the layer: refused, not followed
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    layer = layer_tar([Entry("etc/.wh.motd", b""), Entry("etc/issue", kind="link", target="etc/motd")])
    oci_layout(root, [alpine_layer(alpine_tarball), layer], tag="two")
    with Sandbox(rootfs=f"oci:{root}:two", cache_dir=cache) as box:
        assert box.run("test -e /etc/motd || test -e /etc/issue || echo both hidden").stdout == "both hidden\n"
        assert box.run("cat /etc/alpine-release").stdout == "3.20.3\n"
    assert outside.read_text() == "host file\n" and os.stat(outside).st_nlink == 1


def test_an_opaque_marker_or_whiteout_through_a_symlink_of_its_own_layer_is_refused(tmp_path, cache, alpine_tarball):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("kept\n")
    for number, marker in enumerate((".wh..wh..opq", ".wh.keep")):
        root = tmp_path / f"image{number}"
        layer = layer_tar([Entry("d", kind="symlink", target=str(victim)), Entry(f"d/{marker}", b"")])
        oci_layout(root, [alpine_layer(alpine_tarball), layer])
        with pytest.raises(RootfsError, match="symlink"):
            Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    assert (victim / "keep").read_text() == "kept\n" and os.listxattr(victim) == []


def test_a_lower_layers_symlink_does_not_lead_a_higher_layers_members_out_on_the_host(tmp_path, cache, alpine_tarball):
    """Layer 1 makes `d -> <host dir>` (absolute, relative climbing via `up`); layer 2 writes
    `d/planted`, `d/.wh.keep` and `d/.wh..wh..opq`: each layer is its own tree on the host, so
    layer 2 gets a directory `d` of its own, and the host directory is never touched."""
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep").write_text("kept\n")
    lower = layer_tar([Entry("d", kind="symlink", target=str(victim)),
                       Entry("rel", kind="symlink", target="../../../../../../.." + str(victim))])
    upper = layer_tar([Entry("d/planted", b"planted\n"), Entry("d/.wh.keep", b""), Entry("d/.wh..wh..opq", b""),
                       Entry("rel/planted", b"planted\n")])
    root = tmp_path / "image"
    oci_layout(root, [alpine_layer(alpine_tarball), lower, upper])
    try:
        box = Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    except RootfsError as exc:
        assert "leaves the tree" in str(exc)  # the relative one climbs out: refused as in any archive
        box = None
    if box is not None:
        with box:
            assert box.run("cat /d/planted").stdout == "planted\n"
    assert sorted(os.listdir(victim)) == ["keep"] and os.listxattr(victim) == []
    assert not any(p.name == "planted" for p in Path("/").glob("planted"))
    # and with only the absolute link below, which is kept (it resolves inside the sandbox):
    oci_layout(root, [alpine_layer(alpine_tarball), layer_tar([Entry("d", kind="symlink", target=str(victim))]),
                      layer_tar([Entry("d/planted", b"planted\n"), Entry("d/.wh.keep", b"")])], tag="abs")
    with Sandbox(rootfs=f"oci:{root}:abs", cache_dir=cache) as box:
        assert box.run("cat /d/planted; test -L /d || echo dir").stdout == "planted\ndir\n"
    assert sorted(os.listdir(victim)) == ["keep"] and (victim / "keep").read_text() == "kept\n"


# -- the layout: links, FIFOs, blobs bigger than they say ----------------------------------------
def test_a_blob_that_is_a_symlink_to_a_host_file_is_not_read(tmp_path, cache, alpine_tarball):
    secret = tmp_path / "secret"
    secret.write_bytes(gzip.compress(layer_tar([Entry("secret", b"the host's secret\n")]), mtime=0))
    root = tmp_path / "image"
    base = _gz_layer(root, alpine_layer(alpine_tarball))
    digest = hashlib.sha256(secret.read_bytes()).hexdigest()
    (root / "blobs" / "sha256" / digest).symlink_to(secret)
    _layout(root, [base, {"mediaType": OCI_LAYER_GZIP, "digest": f"sha256:{digest}", "size": secret.stat().st_size}])
    with pytest.raises(RootfsError, match="cannot read blobs/sha256/.*: Too many levels of symbolic links"):
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    # index.json as a link, and blobs/ itself as a link, are refused alike
    os.rename(root / "index.json", root / "index.real")
    (root / "index.json").symlink_to(root / "index.real")
    with pytest.raises(RootfsError, match="index.json"):
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()


@pytest.mark.parametrize("which", ["index.json", "manifest", "layer"])
def test_a_fifo_in_the_layout_does_not_hang_the_test_process(tmp_path, cache, alpine_tarball, which):
    root = tmp_path / "image"
    layer = _gz_layer(root, layer_tar([Entry("x", b"x")]))
    _layout(root, [layer])
    index = json.loads((root / "index.json").read_text())
    target = {"index.json": root / "index.json",
              "manifest": root / "blobs" / "sha256" / index["manifests"][0]["digest"].split(":")[1],
              "layer": root / "blobs" / "sha256" / layer["digest"].split(":")[1]}[which]
    target.unlink()
    os.mkfifo(target)
    said, _ = _resolve_in_child(f"oci:{root}", cache, timeout=15)
    assert said.startswith("refused RootfsError") and "not a regular file" in said, said


def test_a_blob_bigger_than_its_descriptor_says_is_not_copied_whole(tmp_path, cache):
    """A sparse 4 GiB file listed as a 1 KiB layer: the host copies at most what the descriptor
    says (and the limits allow) before it finds the digest wrong, not the whole disk's worth."""
    root = tmp_path / "image"
    _layout(root, [])
    fake = "ab" * 32
    with open(root / "blobs" / "sha256" / fake, "wb") as f:
        f.truncate(4 << 30)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, **_blob(root, config_json([]))},
                           "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": f"sha256:{fake}", "size": 1024}]})
    (root / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": OCI_MANIFEST, **_blob(root, manifest.encode())}]}))
    said, _ = _resolve_in_child(f"oci:{root}", cache, timeout=120, file_limit=64 * MiB)
    assert said.startswith("refused") and "File too large" not in said, said
    assert "digest" in said or "bigger" in said or "size" in said, said


def test_an_empty_or_missing_layer_list_and_foreign_digests_are_sentences(tmp_path, cache):
    root = _layout(tmp_path / "empty", [])
    with pytest.raises(RootfsError, match="lists no layers"):
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    for digest, match in ((f"sha512:{'a' * 128}", "only sha256 digests are verified"),
                          ("sha256:../../../../etc/passwd", "no valid digest"),
                          (f"sha256:{'A' * 64}", "no valid digest"),
                          (f"sha256:{'a' * 64}/../../x", "no valid digest")):
        root = _layout(tmp_path / hashlib.sha256(digest.encode()).hexdigest()[:8],
                       [{"mediaType": OCI_LAYER_GZIP, "digest": digest, "size": 10}])
        with pytest.raises(RootfsError, match=match):
            Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()


def test_huge_and_deeply_nested_documents_are_refused_with_a_sentence(tmp_path, cache):
    root = tmp_path / "image"
    root.mkdir()
    (root / "index.json").write_text("[" * 200_000 + "]" * 200_000)
    said, _ = _resolve_in_child(f"oci:{root}", cache)
    assert said.startswith("refused RootfsError") and "index.json" in said, said
    (root / "index.json").write_text('{"manifests": [' + ",".join(['{"a": 1}'] * 1_000_000) + "]}")
    said, peak = _resolve_in_child(f"oci:{root}", cache)
    assert said.startswith("refused RootfsError") and "bigger than" in said, said
    # a docker-archive's manifest.json, nested
    archive = tmp_path / "saved.tar"
    with tarfile.open(archive, "w") as tar:
        data = ("[" * 200_000 + "]" * 200_000).encode()
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    said, _ = _resolve_in_child(f"docker-archive:{archive}", cache)
    assert said.startswith("refused RootfsError") and "manifest.json" in said, said


def test_thousands_of_layers_are_a_sentence_not_a_crash(tmp_path, cache, alpine_tarball):
    root = tmp_path / "image"
    base = _gz_layer(root, alpine_layer(alpine_tarball))
    layers = [_gz_layer(root, layer_tar([Entry(f"l/{n}", b"x")])) for n in range(600)]
    _layout(root, [base, *layers])
    try:
        box = Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
    except RootfsError as exc:
        assert "layers" in str(exc)
        return
    with box:
        assert box.run("ls /l | wc -l").stdout == "600\n"


def test_a_docker_archive_names_only_its_own_regular_members(tmp_path, cache, alpine_tarball):
    """manifest.json naming `../` paths, absolute paths or symlink members reads nothing of the host."""
    secret = tmp_path / "secret.tar"
    secret.write_bytes(layer_tar([Entry("secret", b"host secret\n")]))
    for names in (["../secret.tar"], [str(secret)], ["link/layer.tar"], ["hard/layer.tar"]):
        archive = tmp_path / "saved.tar"
        with tarfile.open(archive, "w") as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            config = config_json([])
            add("c.json", config)
            info = tarfile.TarInfo("link/layer.tar")
            info.type, info.linkname = tarfile.SYMTYPE, str(secret)
            tar.addfile(info)
            info = tarfile.TarInfo("hard/layer.tar")
            info.type, info.linkname = tarfile.LNKTYPE, str(secret).lstrip("/")
            tar.addfile(info)
            add("manifest.json", json.dumps([{"Config": "c.json", "RepoTags": ["x:1"], "Layers": names}]).encode())
        with pytest.raises(RootfsError, match="has no"):
            Sandbox(rootfs=f"docker-archive:{archive}", cache_dir=cache).start()


# -- an archive's headers: bounded as any rootfs tarball's --------------------------------------
def test_an_oci_archive_with_a_huge_member_name_is_refused_in_bounded_memory(tmp_path, cache):
    from .test_archive_bombs import _finish, _long_name
    archive = tmp_path / "image.tar.gz"
    with gzip.open(archive, "wb", compresslevel=1) as out:
        _long_name(out, 512 * MiB)
        _finish(out)
    said, peak = _resolve_in_child(f"oci-archive:{archive}", cache, timeout=120)
    assert said.startswith("refused RootfsError"), said
    assert peak < 128 * MiB, f"{peak / MiB:.0f} MiB to refuse it"


def test_an_oci_archive_with_a_global_pax_header_over_many_members_stays_small(tmp_path, cache):
    """tarfile copies the global pax records into every member it yields: 20000 records times
    2000 members would be gigabytes of dictionaries kept for a 1 MB archive."""
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT,
                      pax_headers={f"k{n}": "v" for n in range(20_000)}) as tar:
        for n in range(2000):
            info = tarfile.TarInfo(f"f{n}")
            tar.addfile(info, io.BytesIO(b""))
    said, peak = _resolve_in_child(f"oci-archive:{archive}", cache, timeout=120)
    assert said.startswith("refused ArchiveLimitError") and "pax global headers" in said, said
    assert peak < 128 * MiB, f"{peak / MiB:.0f} MiB to refuse it"


# -- the config ----------------------------------------------------------------------------------
def test_a_hostile_config_reaches_nothing_outside_the_sandbox(tmp_path, cache, alpine_tarball):
    marker = tmp_path / "host-only"
    marker.write_text("host\n")
    for workdir in ("/proc/self/root/..", "../../..", "/proc/1/root", str(tmp_path)):
        root = tmp_path / f"image-{hashlib.sha256(workdir.encode()).hexdigest()[:6]}"
        oci_layout(root, [alpine_layer(alpine_tarball)], workdir=workdir,
                   env=("PATH=/bin:/usr/bin", "A=B=C", "=nameless", "NOEQUALS"),
                   ports=(0, 65536, 99999))
        with Sandbox(rootfs=f"oci:{root}", cache_dir=cache) as box:
            try:
                result = box.run("pwd -P; cat host-only; cat /etc/alpine-release; echo $A", check=False)
            except OSError as exc:  # init's /proc/1/root is not the command's to enter; a host path is not there
                assert "cannot be entered" in str(exc) or "does not exist" in str(exc)
            else:
                assert "host\n" not in result.stdout and "3.20.3\nB=C\n" in result.stdout, result
            assert box.run("cat /etc/alpine-release", cwd="/").stdout == "3.20.3\n"
            with pytest.raises(Exception, match="expos"):
                box.port()
    assert marker.read_text() == "host\n"


def test_a_config_with_a_nul_in_its_env_is_a_sentence_naming_the_image(tmp_path, cache, alpine_tarball):
    root = tmp_path / "image"
    oci_layout(root, [alpine_layer(alpine_tarball)], env=("PATH=/bin:/usr/bin", "BAD\u0000NAME=x", "V=a\u0000b"))
    try:
        with Sandbox(rootfs=f"oci:{root}", cache_dir=cache) as box:
            assert box.run("echo ok").stdout == "ok\n"  # dropped, as docker's runtime would refuse them
    except RootfsError as exc:
        assert str(root) in str(exc)
