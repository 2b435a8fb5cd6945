"""Images as root filesystems: OCI layouts, oci-archive and docker-archive files the tests build
from the Alpine minirootfs, laid as per-layer trees (whiteouts, opaque directories, hard links),
their config honoured; content-addressed layers shared between images."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from pytest_nsbox import ConfigError, RootfsError, Sandbox
from pytest_nsbox.errors import DigestMismatch

from .images import Entry, alpine_layer, app_layers, docker_archive, layer_tar, oci_layout


@pytest.fixture
def layout(tmp_path, alpine_tarball) -> Path:
    root = tmp_path / "layout"
    oci_layout(root, [alpine_layer(alpine_tarball), *app_layers()], tag="app",
               env=("PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "GREETING=from the config"),
               entrypoint=("hello",), cmd=("world",), workdir="/srv", ports=(6379, 8080))
    return root


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "cache"


def _trees(cache: Path) -> set[str]:
    return {p.name for p in (cache / "trees").glob("sha256-*") if p.is_dir()}


def test_an_oci_layout_is_laid_layer_by_layer_with_whiteouts_and_opaque_dirs(layout, cache):
    with Sandbox(rootfs=f"oci:{layout}:app", cache_dir=cache) as box:
        assert box.run("cat /srv/keep /srv/linked /srv/old/new").stdout == "kept\nkept\nnew\n"
        assert box.run("ls /srv/old").stdout == "new\n"  # the opaque directory hides the layer below
        assert box.run("test -e /srv/gone || echo whited out").stdout == "whited out\n"
        assert box.run("test -e /etc/motd || echo whited out").stdout == "whited out\n"  # Alpine's, hidden
        assert box.run("stat -c %h /srv/keep").stdout == "2\n"  # the hard link is kept
        assert box.run("cat /etc/alpine-release").stdout == "3.20.3\n"
        assert len(box.rootfs.lowers) == 2 and box.rootfs.describe().endswith("(an image, each blob checked against its digest)")
    assert len(_trees(cache)) == 3  # one tree per layer, none flattened


def test_the_image_config_is_honoured(layout, cache):
    with Sandbox(rootfs=f"oci:{layout}:app", cache_dir=cache, env={"EXTRA": "1"}) as box:
        assert box.run("pwd; echo $GREETING $EXTRA").stdout == "/srv\nfrom the config 1\n"
        assert box.run().stdout == "hello from the image world\n"  # Entrypoint + Cmd, as docker run IMAGE
        assert box.run(cwd="/").stdout == "hello from the image world\n"
        server = box.spawn(["nc", "-lk", "-p", "6379", "-e", "cat"])
        assert box.port() == box.port(6379)  # ExposedPorts' first is port()'s default
        box.wait_for_port(6379, process=server)
    with Sandbox(rootfs=f"oci:{layout}:app", cache_dir=cache, cwd="/tmp") as box:
        assert box.run("pwd").stdout == "/tmp\n"  # a cwd given wins over WorkingDir


def test_a_second_image_on_the_same_base_shares_its_layer_trees(layout, cache, alpine_tarball):
    with Sandbox(rootfs=f"oci:{layout}:app", cache_dir=cache):
        pass
    before = _trees(cache)
    extra = layer_tar([Entry("opt/second", b"second image\n")])
    oci_layout(layout, [alpine_layer(alpine_tarball), extra], tag="second")
    with Sandbox(rootfs=f"oci:{layout}:second", cache_dir=cache) as box:
        assert box.run("cat /opt/second; test -e /srv/keep || echo no app").stdout == "second image\nno app\n"
    after = _trees(cache)
    assert before < after and len(after - before) == 1  # only the new layer was extracted


def test_an_oci_archive_and_a_docker_archive_work_offline(layout, tmp_path, cache, alpine_tarball):
    archive = tmp_path / "image.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(layout, arcname=".")
    with Sandbox(rootfs=f"oci-archive:{archive}:app", cache_dir=cache) as box:
        assert box.run("cat /srv/old/new").stdout == "new\n"
    saved = tmp_path / "saved.tar"
    docker_archive(saved, [alpine_layer(alpine_tarball), *app_layers()], tag="myapp:1", cmd=("cat", "/srv/keep"))
    with Sandbox(rootfs=f"docker-archive:{saved}", cache_dir=cache) as box:
        assert box.run().stdout == "kept\n"
        assert box.run("ls /srv/old").stdout == "new\n"
    with Sandbox(rootfs=f"docker-archive:{saved}:myapp:1", cache_dir=cache) as box:
        assert box.run(["cat", "/srv/keep"]).stdout == "kept\n"


def test_a_tampered_blob_is_refused_and_nothing_of_it_is_cached(layout, cache):
    manifest_digest = json.loads((layout / "index.json").read_text())["manifests"][0]["digest"]
    manifest = json.loads((layout / "blobs" / "sha256" / manifest_digest.split(":")[1]).read_text())
    top = layout / "blobs" / "sha256" / manifest["layers"][-1]["digest"].split(":")[1]
    top.write_bytes(top.read_bytes()[:-8] + b"tampered")
    with pytest.raises(DigestMismatch, match="layer 3/3 .*damaged or tampered; nothing of it was cached"):
        Sandbox(rootfs=f"oci:{layout}:app", cache_dir=cache).start()
    leftovers = [p.name for p in (cache / "trees").iterdir() if manifest["layers"][-1]["digest"].split(":")[1] in p.name
                 and not p.name.endswith(".lock")]
    assert leftovers == []


def test_bad_image_specs_and_layouts_are_sentences(layout, tmp_path, cache, alpine_tarball):
    with pytest.raises(RootfsError, match=r"no image tagged 'nope' .*; it has app"):
        Sandbox(rootfs=f"oci:{layout}:nope", cache_dir=cache).start()
    with pytest.raises(ConfigError, match="there is no OCI image layout directory"):
        Sandbox(rootfs=f"oci:{tmp_path}/missing", cache_dir=cache).start()
    with pytest.raises(ConfigError, match="is not an image name"):
        Sandbox(rootfs="docker://Not/Valid", cache_dir=cache).start()
    with pytest.raises(ConfigError, match="is an image, a whole root filesystem"):
        Sandbox(rootfs=alpine_tarball, layers=[f"oci:{layout}:app"], cache_dir=cache).start()
    (layout / "index.json").write_text("[]")
    with pytest.raises(RootfsError, match="index.json is not a JSON object"):
        Sandbox(rootfs=f"oci:{layout}:app", cache_dir=cache).start()


def test_a_hostile_layer_is_refused_as_any_archive(tmp_path, cache, alpine_tarball):
    bad = layer_tar([Entry("../escape", b"x")])
    root = tmp_path / "bad"
    oci_layout(root, [alpine_layer(alpine_tarball), bad])
    with pytest.raises(RootfsError, match="'..' component"):
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()


def test_the_marker_and_the_cli_take_image_specs(pytester, layout):
    pytester.makepyfile(f"""
        import pytest

        @pytest.mark.sandbox(rootfs="oci:{layout}:app")
        def test_image(sandbox):
            assert sandbox.run().stdout == "hello from the image world\\n"
    """)
    pytester.runpytest_subprocess().assert_outcomes(passed=1)
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "pytest_nsbox", "run", "--rootfs", f"oci:{layout}:app"],
                            capture_output=True, text=True, timeout=60)
    assert result.stdout == "hello from the image world\n", result.stderr


def test_a_hard_link_to_a_lower_layers_file_is_named_not_blamed_on_the_cache(tmp_path, cache, alpine_tarball):
    root = tmp_path / "linked"
    oci_layout(root, [alpine_layer(alpine_tarball), layer_tar([Entry("etc/os-copy", kind="link", target="etc/os-release")])])
    with pytest.raises(RootfsError, match=r"'etc/os-copy' is a hard link to 'etc/os-release', which the archive "
                                          r"does not hold before it \(an image layer may link only"):
        Sandbox(rootfs=f"oci:{root}", cache_dir=cache).start()
