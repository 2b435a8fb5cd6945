"""Extending the rootfs: trees laid over Alpine without copying it, and a sandbox saved as a rootfs."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import textwrap

import pytest

from pytest_nsbox import ConfigError, RootfsError, Sandbox


@pytest.fixture
def extra(tmp_path):
    """A layer: a file that shadows Alpine's, a new program, nothing else (no /bin/sh)."""
    layer = tmp_path / "rootfs-extra"
    (layer / "etc").mkdir(parents=True)
    (layer / "etc" / "motd").write_text("from the layer\n")
    tool = layer / "usr" / "local" / "bin" / "greet"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\necho hello from the layer\n")
    tool.chmod(0o755)
    return layer


def test_layers_lie_over_the_rootfs_in_order_and_stay_unchanged(sandbox_factory, extra, tmp_path):
    top = tmp_path / "top"
    (top / "etc").mkdir(parents=True)
    (top / "etc" / "motd").write_text("from the top layer\n")
    box = sandbox_factory(layers=[extra, top])
    assert box.run("cat /etc/motd; greet; cat /etc/alpine-release").stdout == \
        "from the top layer\nhello from the layer\n3.20.3\n"
    box.run("echo changed > /etc/motd; rm /usr/local/bin/greet", check=True)
    assert (top / "etc" / "motd").read_text() == "from the top layer\n"  # writes go to the sandbox's own layer
    assert (extra / "usr" / "local" / "bin" / "greet").exists()
    assert [layer.spec for layer in box.layers] == [str(extra), str(top)]


def test_a_rootfs_list_is_the_rootfs_and_its_layers_in_a_marker_too(pytester, extra, alpine_tarball):
    pytester.makepyfile(textwrap.dedent(f"""
        import pytest

        @pytest.mark.sandbox(rootfs=[{str(alpine_tarball)!r}, {str(extra)!r}])
        def test_layered(sandbox):
            assert sandbox.run("greet").stdout == "hello from the layer\\n"
    """))
    pytester.runpytest_subprocess().assert_outcomes(passed=1)


def test_a_tarball_is_a_layer_too_and_needs_no_shell(sandbox_factory, extra, tmp_path, cache_dir):
    tarball = tmp_path / "extra.tar.gz"  # made by Python's tarfile: PAX, with float mtimes
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(extra, arcname=".")
    assert sandbox_factory(layers=[tarball]).run("greet").stdout == "hello from the layer\n"
    with pytest.raises(RootfsError, match="has no executable /bin/sh"):
        Sandbox(rootfs=tarball, cache_dir=cache_dir).start()  # as a rootfs, it must be a whole one


def test_the_host_rootfs_takes_no_layers(extra):
    with pytest.raises(ConfigError, match="takes no layers"):
        Sandbox(rootfs="host", layers=[extra]).start()
    with pytest.raises(ConfigError, match="'host' is a whole root filesystem, not a layer"):
        Sandbox(layers=["host"]).start()


def test_a_saved_sandbox_is_a_rootfs_with_everything_that_was_done_in_it(sandbox_factory, extra, tmp_path):
    box = sandbox_factory(layers=[extra])
    box.run("mkdir -p /opt/app && echo built > /opt/app/artifact", check=True)
    saved = box.save(tmp_path / "built.tar")
    assert box.history[-1].args == "mkdir -p /opt/app && echo built > /opt/app/artifact"  # save's tar is not
    again = sandbox_factory(rootfs=saved)
    assert again.run("cat /opt/app/artifact; greet").stdout == "built\nhello from the layer\n"
    assert not again.run("ls /proc/1/status >/dev/null").returncode  # a fresh /proc, not a saved one


def test_saving_without_tar_says_so(sandbox_factory, tmp_path):
    box = sandbox_factory()
    box.run("rm /bin/tar", check=True)
    with pytest.raises(RootfsError, match="cannot save the sandbox's filesystem to .*: it has no `tar`"):
        box.save(tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_a_replaced_tar_cannot_fill_the_hosts_disk(sandbox_factory, tmp_path):
    """save() runs the sandbox's own tar, which its commands may replace: what it writes is capped
    by what the sandbox's filesystem can hold."""
    box = sandbox_factory(tmpfs_size="8M")
    box.run("rm /bin/tar; printf '#!/bin/sh\\nexec cat /dev/zero\\n' > /bin/tar; chmod +x /bin/tar", check=True)
    with pytest.raises(RootfsError, match=r"tar wrote more than .* MiB.*more than this sandbox's filesystem holds"):
        box.save(tmp_path / "x.tar")
    assert not (tmp_path / "x.tar").exists()


def test_a_saved_tree_leaves_out_host_binds(sandbox_factory, tmp_path):
    (tmp_path / "secret").write_text("the host's")
    box = sandbox_factory(mounts=[(tmp_path, "/mnt/host")])
    box.run("echo mine > /root/file", check=True)
    saved = box.save(tmp_path.parent / f"{tmp_path.name}-saved.tar")
    with tarfile.open(saved) as archive:
        names = archive.getnames()
    assert "./root/file" in names and not any(name.startswith("./mnt/host/") for name in names), names


def test_the_host_rootfs_cannot_be_saved(sandbox_factory, tmp_path):
    with pytest.raises(ConfigError, match="the 'host' rootfs cannot be saved"):
        sandbox_factory(rootfs="host").save(tmp_path / "host.tar")


def test_nsbox_run_and_the_reproduce_line_take_layers(pytester, extra):
    run = subprocess.run([sys.executable, "-m", "pytest_nsbox", "run", "--layer", str(extra), "--", "greet"],
                         capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert run.stdout == "hello from the layer\n", run.stderr
    pytester.makepyfile(textwrap.dedent(f"""
        def test_fails(sandbox_factory):
            assert sandbox_factory(layers=[{str(extra)!r}]).run("false").returncode == 0
    """))
    result = pytester.runpytest_subprocess()
    assert any(line.startswith("  again: ") and " shell " in line and f"--layer {extra}" in line for line in result.stdout.lines)


def _chown_tree(top, uid):
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            os.lchown(name, uid, uid)


@pytest.mark.skipif(os.getuid() != 0, reason="only root can make a tree another uid owns")
@pytest.mark.parametrize("network", ["host", "none"])
def test_a_layer_another_uid_owns_works_as_the_users_own(sandbox_factory, extra, tmp_path, network):
    # A root container over a checkout owned by 1001, as on hosted CI: inside, such a tree is
    # nobody's, and nothing could be made in it (not /etc/resolv.conf's mount point, not a file).
    _chown_tree(extra, 1001)
    box = sandbox_factory(layers=[extra], network=network,
                          mounts=[(str(tmp_path), "/etc/from-host")])
    assert box.run("cat /etc/motd; greet").stdout == "from the layer\nhello from the layer\n"
    box.run("echo new > /etc/made-here", check=True)
    (extra / "etc" / "motd").write_text("changed on the host\n")
    again = sandbox_factory(layers=[extra])
    assert again.run(["cat", "/etc/motd"]).stdout == "changed on the host\n"  # a copy, but never a stale one


@pytest.mark.skipif(os.getuid() != 0, reason="only root can make a tree another uid owns")
def test_a_rootfs_directory_another_uid_owns_works_too(sandbox_factory, tmp_path, alpine_tarball):
    tree = tmp_path / "tree"
    tree.mkdir()
    with tarfile.open(alpine_tarball) as tar:
        tar.extractall(tree, **({"filter": "tar"} if hasattr(tarfile, "tar_filter") else {}))
    _chown_tree(tree, 1001)
    box = sandbox_factory(rootfs=tree, network="host")
    assert box.run("echo ok > /root/x; cat /root/x /etc/alpine-release").stdout == "ok\n3.20.3\n"
