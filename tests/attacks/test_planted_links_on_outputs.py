"""What the owner writes where a sandbox or an isolated test can reach — `Sandbox.save()` into a rw
bind, `--nsbox-keep-on-failure` into the basetemp — never goes through a link they planted there."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import textwrap

import pytest

from pytest_nsbox.errors import RootfsError


@pytest.fixture
def precious(tmp_path):
    """A file of the owner's, outside anything a sandbox may write."""
    path = tmp_path / "precious"
    path.write_text("the owner's own\n")
    return path


def test_save_replaces_a_link_the_sandbox_planted_at_its_name_and_never_writes_through_it(
        sandbox_factory, tmp_path, precious):
    shared = tmp_path / "shared"
    shared.mkdir()
    box = sandbox_factory(mounts=[(shared, "/mnt/shared", "rw")])
    box.run(["ln", "-s", str(precious), "/mnt/shared/out.tar"], check=True)
    saved = box.save(shared / "out.tar")
    assert precious.read_text() == "the owner's own\n"
    assert not saved.is_symlink() and tarfile.is_tarfile(saved)
    assert sorted(os.listdir(shared)) == ["out.tar"]  # no temporary file left behind


def test_save_refuses_a_directory_the_sandbox_turned_into_a_link(sandbox_factory, tmp_path, precious):
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    victim = precious.parent / "victim"
    victim.mkdir()
    box = sandbox_factory(mounts=[(shared, "/mnt/shared", "rw")])
    box.run(["sh", "-c", f"rmdir /mnt/shared/sub && ln -s {victim} /mnt/shared/sub"], check=True)
    with pytest.raises(RootfsError, match=r"cannot save .*sub/out\.tar.*sub is a symlink in a directory "
                                          r"this user owns or may write"):
        box.save(shared / "sub" / "out.tar")
    assert os.listdir(victim) == []


def test_save_refuses_a_link_in_a_directory_the_sandbox_then_made_read_only(sandbox_factory, tmp_path,
                                                                            precious):
    """The sandbox acts as the owner: it may chmod what it can write, so "not writable" proves nothing
    about who made a link there; a directory this user owns never vouches for one."""
    if os.geteuid() == 0:
        pytest.skip("root follows no link on the way to a tarball, read-only directory or not: "
                    "test_save_refuses_a_directory_the_sandbox_turned_into_a_link covers it")
    shared = tmp_path / "shared"
    (shared / "sub").mkdir(parents=True)
    victim = precious.parent / "victim"
    victim.mkdir()
    box = sandbox_factory(mounts=[(shared, "/mnt/shared", "rw")])
    box.run(["sh", "-c", f"rmdir /mnt/shared/sub && ln -s {victim} /mnt/shared/sub && chmod 555 /mnt/shared"],
            check=True)
    try:
        with pytest.raises(RootfsError, match=r"cannot save .*sub/out\.tar.*sub is a symlink in a directory "
                                              r"this user owns or may write"):
            box.save(shared / "sub" / "out.tar")
    finally:
        shared.chmod(0o755)
    assert os.listdir(victim) == []


def test_root_follows_no_link_even_in_a_directory_another_user_owns_and_cannot_be_written(
        sandbox_factory, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("only root can make a directory owned by another uid here (the non-root case is "
                    "test_save_follows_a_link_root_made_in_a_directory_of_roots)")
    (tmp_path / "real").mkdir()
    honest = tmp_path / "honest"
    honest.mkdir()
    (honest / "out").symlink_to(tmp_path / "real")
    os.chown(honest, 65534, 65534)
    honest.chmod(0o555)
    with pytest.raises(RootfsError, match=r"honest/out is a symlink .*not followed"):
        sandbox_factory().save(honest / "out" / "x.tar")
    assert os.listdir(tmp_path / "real") == []


def test_save_follows_a_link_root_made_in_a_directory_of_roots(sandbox_factory):
    """A link nobody acting as this user can have made (in a directory root owns and this user cannot
    write, as /var/lock -> /run/lock) is followed, as sudoedit does."""
    if os.geteuid() == 0:
        pytest.skip("root may write every directory: it follows no link on the way to a tarball")
    var = os.stat("/var")
    if (not os.path.islink("/var/lock") or var.st_uid != 0 or os.access("/var", os.W_OK)
            or not os.access("/var/lock/", os.W_OK | os.X_OK)):
        pytest.skip("this host has no /var/lock link (root's, to a directory this user may write)")
    real = tempfile.mkdtemp(prefix="nsbox-test-", dir="/var/lock")
    try:
        saved = sandbox_factory().save(f"/var/lock/{os.path.basename(real)}/x.tar")
        assert str(saved) == f"/var/lock/{os.path.basename(real)}/x.tar"
        assert tarfile.is_tarfile(os.path.join(os.path.realpath(real), "x.tar"))
    finally:
        shutil.rmtree(real)


def test_save_refuses_a_tarball_the_sandbox_swapped_for_a_link_while_it_was_written(
        sandbox_factory, tmp_path, precious):
    shared = tmp_path / "shared"
    shared.mkdir()
    box = sandbox_factory(mounts=[(shared, "/mnt/shared", "rw")])
    box.run("rm /bin/tar", check=True)
    box.write_file("/bin/tar", "#!/bin/sh\n"
                   "sleep 0.3\n"
                   "for f in /mnt/shared/.nsbox-save-*.part; do mv \"$f\" /mnt/shared/stolen; "
                   f"ln -s {precious} \"$f\"; done\n"
                   "echo fake-tarball\n", 0o755)
    with pytest.raises(RootfsError, match=r"cannot save .*out\.tar: the sandbox replaced the tarball while "
                                          r"it was written"):
        box.save(shared / "out.tar")
    assert precious.read_text() == "the owner's own\n"
    assert not os.path.lexists(shared / "out.tar")
    assert sorted(os.listdir(shared)) == ["stolen"]  # the sandbox's own doing; no link of its left


def test_a_failed_save_leaves_the_name_as_it_was(sandbox_factory, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "out.tar").write_text("an older tarball")
    box = sandbox_factory(mounts=[(shared, "/mnt/shared", "rw")])
    box.run("rm /bin/tar; printf '#!/bin/sh\\necho partial; exit 3\\n' > /bin/tar; chmod +x /bin/tar", check=True)
    with pytest.raises(RootfsError, match="tar exited 3"):
        box.save(shared / "out.tar")
    assert (shared / "out.tar").read_text() == "an older tarball"
    assert sorted(os.listdir(shared)) == ["out.tar"]  # nor a temporary file


KEEP_SUITE = textwrap.dedent("""
    import os
    import pytest

    @pytest.mark.sandbox(isolate=True)
    def test_a_plants(tmp_path_factory):
        kept = tmp_path_factory.getbasetemp() / "nsbox-kept"
        if os.environ["PLANT"] == "file":
            kept.mkdir()
            os.symlink(os.environ["PRECIOUS"], kept / "test_keep.py_test_b_fails-1.tar")
        else:
            os.symlink(os.environ["VICTIM"], kept)

    def test_b_fails(sandbox):
        sandbox.run("echo evidence > /root/evidence")
        assert False
""")


@pytest.mark.parametrize("plant", ["file", "directory"])
def test_keep_on_failure_never_writes_through_a_link_an_isolated_test_planted(pytester, monkeypatch, plant,
                                                                              precious):
    victim = precious.parent / "victim"
    victim.mkdir()
    monkeypatch.setenv("PLANT", plant)
    monkeypatch.setenv("PRECIOUS", str(precious))
    monkeypatch.setenv("VICTIM", str(victim))
    pytester.makepyfile(test_keep=KEEP_SUITE)
    basetemp = pytester.path / "bt"
    result = pytester.runpytest_subprocess("--nsbox-keep-on-failure", "--basetemp", str(basetemp),
                                           "-p", "no:randomly")
    result.assert_outcomes(passed=1, failed=1)
    assert precious.read_text() == "the owner's own\n"
    assert os.listdir(victim) == []
    kept = next(line.split(": ", 1)[1] for line in result.stdout.lines
                if line.startswith("  its filesystem at the failure: "))
    if plant == "file":  # the link is replaced by the tarball, not followed
        assert kept == str(basetemp / "nsbox-kept" / "test_keep.py_test_b_fails-1.tar")
        assert tarfile.is_tarfile(kept) and not os.path.islink(kept)
    else:
        assert kept.startswith("not kept") and "nsbox-kept is a symlink" in kept, kept
