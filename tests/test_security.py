"""Each security promise of the sandbox, tried the way an attacker inside would try it."""

from __future__ import annotations

import os



def test_cached_tree_is_never_modified(sandbox, sandbox_factory):
    tree = sandbox.rootfs.tree
    before = (tree / "etc/passwd").read_bytes()
    assert sandbox.run("echo evil >> /etc/passwd; rm -f /bin/busybox.keep; rm -rf /usr/share; "
                       "touch /new-file").returncode == 0
    assert sandbox.run(["grep", "-c", "evil", "/etc/passwd"]).stdout == "1\n"
    assert (tree / "etc/passwd").read_bytes() == before
    assert (tree / "usr/share").is_dir()
    assert not (tree / "new-file").exists()
    fresh = sandbox_factory()
    assert fresh.run(["grep", "-c", "evil", "/etc/passwd"]).stdout == "0\n"
    assert fresh.run(["test", "-e", "/new-file"]).returncode == 1


def test_read_only_bind_cannot_be_written_remounted_or_unmounted(sandbox_factory, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "f").write_text("original")
    box = sandbox_factory(mounts=[(data, "/data")])
    assert box.read_file("/data/f") == "original"
    assert box.run("echo x > /data/f").returncode != 0
    assert box.run("mount -o remount,rw /data").returncode != 0
    assert box.run("mount -o remount,bind,rw /data").returncode != 0
    assert box.run("umount /data").returncode != 0
    assert box.run("umount -l /data").returncode != 0
    assert box.run("echo x > /data/f").returncode != 0
    assert (data / "f").read_text() == "original"


def test_rw_bind_is_writable_and_shared_with_host(sandbox_factory, tmp_path):
    box = sandbox_factory(mounts=[(tmp_path, "/work", "rw"), (tmp_path, "/ro")])
    box.run("echo from-sandbox > /work/out", check=True)
    assert (tmp_path / "out").read_text() == "from-sandbox\n"
    assert box.run("echo x > /ro/other").returncode != 0


def test_single_file_bind(sandbox_factory, tmp_path):
    host_file = tmp_path / "config.ini"
    host_file.write_text("[x]\n")
    box = sandbox_factory(mounts=[(host_file, "/etc/app/config.ini")])
    assert box.read_file("/etc/app/config.ini") == "[x]\n"


def test_bind_target_through_absolute_symlink_stays_inside(sandbox_factory, tmp_path):
    # /var/run -> /run in Alpine: the bind must land in the sandbox's /run, not the host's.
    (tmp_path / "f").write_text("x")
    box = sandbox_factory(mounts=[(tmp_path, "/var/run/thing")])
    assert box.read_file("/run/thing/f") == "x"
    assert not os.path.exists("/run/thing")


def test_host_interpreter_is_unreachable_through_proc_1_exe(sandbox):
    import sys
    assert sandbox.run("cat /proc/1/exe > /dev/null").returncode != 0
    assert sandbox.run("echo x >> /proc/1/exe").returncode != 0
    assert sandbox.run("readlink /proc/1/exe").returncode != 0
    assert sandbox.run(["ls", "/proc/1/root/"]).returncode != 0
    assert os.path.getsize(sys.executable) > 0


def test_only_stdio_descriptors_are_inherited(sandbox):
    leaked = os.open("/etc/hostname", os.O_RDONLY)
    os.set_inheritable(leaked, True)
    try:
        sleeper = sandbox.spawn(["sleep", "30"])
    finally:
        os.close(leaked)
    fds = sandbox.run(["ls", f"/proc/{sleeper.pid}/fd"]).stdout.split()
    assert sorted(fds, key=int) == ["0", "1", "2"]
    assert sandbox.run(["readlink", "/proc/self/cwd"]).stdout == "/\n"


def test_commands_run_in_a_new_session_without_terminal(sandbox):
    fields = sandbox.run(["sh", "-c", "cat /proc/$$/stat"]).stdout.rsplit(")", 1)[1].split()
    pid = int(sandbox.run(["sh", "-c", "echo $$"]).stdout)  # a later pid, same shape
    session, tty_nr = int(fields[3]), int(fields[4])
    assert tty_nr == 0
    assert session != 1 and pid > 1
    assert sandbox.run("exec 3</dev/tty").returncode != 0  # no controlling terminal to attack


def test_no_capabilities_over_the_outer_namespaces(sandbox):
    # Commands are root in a nested user namespace: they cannot rename the host-facing UTS
    # namespace or reconfigure the network namespace the sandbox was given.
    assert sandbox.run("hostname evil").returncode != 0
    assert sandbox.run("ip link add dummy0 type dummy").returncode != 0


def test_unavailable_namespaces_fail_loudly(pytester):
    """With user namespaces forbidden, nothing runs unsandboxed: the test fails with the cause."""
    pytester.makepyfile("def test_x(sandbox):\n    sandbox.run(['true'])\n")
    result = _run_without_user_namespaces(pytester)
    result.stdout.fnmatch_lines(["*nsbox: this machine cannot make sandboxes*max_user_namespaces*"])
    assert result.ret == 1
    skipped = _run_without_user_namespaces(pytester, "--nsbox-unavailable=skip")
    skipped.stdout.fnmatch_lines(["*1 skipped*"])


def _run_without_user_namespaces(pytester, *args):
    """Run pytest in a user namespace whose max_user_namespaces is 0 (as bwrap --disable-userns)."""
    import sys
    script = (
        "import os, sys\n"
        "from pytest_nsbox import kernel\n"
        "uid, gid = os.getuid(), os.getgid()\n"
        "kernel.unshare(kernel.CLONE_NEWUSER)\n"
        "kernel.write_id_maps(uid, gid)\n"
        "open('/proc/sys/user/max_user_namespaces', 'w').write('0')\n"
        "import pytest\n"
        "sys.exit(pytest.main(sys.argv[1:]))\n")
    return pytester.run(sys.executable, "-c", script, "-p", "no:cacheprovider", *args, timeout=60)
