"""An isolated test that attacks the pytest process around it: through the descriptors it
inherits, the terminal, root's mounts, and the end of its own call.  Each test runs a hostile
suite with pytester under --nsbox-isolate and checks, from outside, that nothing got through."""

from __future__ import annotations

import errno
import fcntl
import os
import select
import subprocess
import sys
import termios
import textwrap
import time

import pytest

ROOT = os.geteuid() == 0
as_root = pytest.mark.skipif(not ROOT, reason="an attack of the host's root: a normal user's test holds no capability")


@pytest.fixture
def outside(tmp_path_factory):
    """A host directory on the root filesystem, outside /tmp (which isolated tests see
    copy-on-write) and outside every writable path: what the test must not write."""
    where = tmp_path_factory.mktemp("outside")
    for base in ("/var/tmp", os.path.expanduser("~")):
        if os.path.isdir(base) and os.access(base, os.W_OK):
            import tempfile
            path = tempfile.mkdtemp(prefix="nsbox-outside-", dir=base)
            yield path
            import shutil
            shutil.rmtree(path, ignore_errors=True)
            return
    yield str(where)


def test_the_spawner_of_pytest_cannot_be_asked_for_a_sandbox(pytester, outside):
    """The test takes pytest's own spawner (its socket is inherited) and asks it, unconfined, for
    a sandbox with a read-write bind of a host directory."""
    pytester.makepyfile(textwrap.dedent(f"""
        import os
        from pytest_nsbox import Mount, Sandbox
        from pytest_nsbox.engine.client import Spawner

        def test_made_by_pytest(sandbox):  # pytest's spawner now exists
            pass

        def test_hostile():
            spawner = Spawner._instance
            assert spawner is not None
            spawner.owner_pid = os.getpid()  # "I am the owner now"
            Spawner.alive = lambda self: True  # (its process is not our child: poll() cannot tell)
            try:
                with Sandbox(mounts=[Mount({outside!r}, "/loot", rw=True)]) as box:
                    box.run("echo pwned > /loot/pwned")
            except Exception as exc:
                print("refused:", exc)
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-s")
    result.assert_outcomes(passed=2)
    assert not os.path.exists(os.path.join(outside, "pwned"))


def test_the_log_file_and_other_host_files_held_open_cannot_be_written(pytester, outside):
    log = os.path.join(outside, "run.log")
    data = os.path.join(outside, "data.txt")
    with open(data, "w") as f:
        f.write("the fixture's data\n")
    pytester.makepyfile(textwrap.dedent(f"""
        import logging, os, pytest

        @pytest.fixture(scope="session")
        def data_file():
            with open({data!r}, "r+") as f:  # opened for writing by the session, outside the test
                yield f

        def test_reads_and_forges(data_file):
            assert data_file.read() == "the fixture's data\\n"  # still reads
            logging.getLogger("t").warning("a record of the test")
            forged = 0
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                try:
                    where = os.readlink(f"/proc/self/fd/{{fd}}")
                    if where in ({log!r}, {data!r}):
                        os.write(fd, b"FORGED\\n")
                        forged += 1
                except OSError:
                    pass
                for path in ({log!r}, {data!r}):  # re-opened through /proc for writing
                    try:
                        if os.readlink(f"/proc/self/fd/{{fd}}") == path:
                            with open(f"/proc/self/fd/{{fd}}", "a") as again:
                                again.write("FORGED AGAIN\\n")
                    except OSError:
                        pass
            print("forged", forged)
    """))
    # -W error: what the child does with pytest's log file must not even warn (toolz's suite does this)
    result = pytester.runpytest_subprocess("--nsbox-isolate", f"--log-file={log}", "--log-file-level=WARNING",
                                           "-W", "error")
    result.assert_outcomes(passed=1)
    assert "FORGED" not in _read(log)
    assert "a record of the test" in _read(log)  # the test's own records still get there
    assert _read(data) == "the fixture's data\n"


def test_pytest_xdist_s_channel_is_out_of_reach(pytester):
    pytest.importorskip("xdist")
    pytester.makepyfile(textwrap.dedent("""
        import os, stat

        def test_writes_every_pipe():
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                try:
                    if fd > 2 and stat.S_ISFIFO(os.fstat(fd).st_mode):
                        os.write(fd, b"\\x00" * 64 + b"garbage the controller must never read")
                except OSError:
                    pass

        def test_after():
            pass
    """))
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-n", "1", f"--junitxml={junit}")
    # The garbage may land in the test's own report pipe, which then fails that one test: never
    # in the controller, which sees exactly the two tests, once each.
    assert "INTERNALERROR" not in result.stdout.str() + result.stderr.str()
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) + outcomes.get("failed", 0) == 2, outcomes
    assert junit.read_text().count("<testcase ") == 2
    assert "test_after" in junit.read_text()


HOSTILE_TERMINAL = textwrap.dedent("""
    import fcntl, os, termios

    def test_pushes_input_into_the_users_shell():
        pushed = []
        for name in os.listdir("/proc/self/fd"):
            fd = int(name)
            try:
                if os.isatty(fd):
                    fcntl.ioctl(fd, termios.TIOCSTI, b"X")
                    pushed.append(fd)
            except OSError:
                pass
        try:
            fd = os.open("/dev/tty", os.O_RDWR)
            fcntl.ioctl(fd, termios.TIOCSTI, b"X")
            pushed.append("/dev/tty")
        except OSError:
            pass
        assert not pushed, f"pushed input through {pushed}"
""")


@pytest.mark.parametrize("capture", ["fd", "no"])
def test_the_terminal_cannot_be_given_input(pytester, capture):
    """pytest run on a terminal (its controlling one): the test's sandbox must hold none of it."""
    pytester.makepyfile(test_terminal=HOSTILE_TERMINAL)
    master, slave = os.openpty()

    def controlling_terminal():
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    process = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--nsbox-isolate",
                                f"--capture={capture}", "test_terminal.py"],
                               cwd=pytester.path, stdin=slave, stdout=slave, stderr=slave,
                               start_new_session=True, preexec_fn=controlling_terminal)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError as exc:
                assert exc.errno == errno.EIO  # the last slave closed
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    process.wait(10)
    os.close(master)
    text = output.decode(errors="replace")
    assert "1 passed" in text, text


@as_root
def test_root_cannot_make_the_host_writable_again(pytester, outside):
    """As root the test owns its user namespace: it tries to clear read-only on / (not
    recursively, as the review did), then on its own mount of the same tree."""
    assert os.stat(outside).st_dev == os.stat("/").st_dev or True  # where the root fs is elsewhere, / still counts
    pytester.makepyfile(textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)

        class Attr(ctypes.Structure):
            _fields_ = [("set", ctypes.c_uint64), ("clr", ctypes.c_uint64),
                        ("propagation", ctypes.c_uint64), ("userns", ctypes.c_uint64)]

        def test_clears_read_only():
            for path, flags in (("/", 0), ("/", 0x8000), ({outside!r}, 0), ({outside!r}, 0x8000)):
                attr = Attr(0, 0x1 | 0x4, 0, 0)  # clear RDONLY and NODEV
                libc.syscall(442, -100, path.encode(), flags, ctypes.byref(attr), ctypes.sizeof(attr))
            libc.mount(b"none", b"/", None, 0x20 | 0x1000 | 0x4000, None)  # MS_REMOUNT|MS_BIND|MS_REC, rw
            libc.umount2(b"/", 2)  # MNT_DETACH: to reach what is under
            try:
                with open({outside!r} + "/pwned", "w") as f:
                    f.write("root wrote the host")
            except OSError as exc:
                print("refused:", exc)
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)
    assert not os.path.exists(os.path.join(outside, "pwned"))


@as_root
def test_root_cannot_write_a_host_sysctl(pytester):
    """Through the test's /proc, and through a fresh /proc of a namespace of its own."""
    knob = "/proc/sys/net/ipv4/ip_local_port_range"  # the host's: network="host" by default
    before = _read(knob)
    pytester.makepyfile(textwrap.dedent(f"""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        KNOB = {knob!r}

        def write(path):
            try:
                with open(path, "w") as f:
                    f.write("40000 40001")
                return True
            except OSError:
                return False

        def test_writes_a_sysctl():
            wrote = [write(KNOB)]
            pid = os.fork()
            if pid == 0:
                ok = False
                if libc.unshare(0x10000000 | 0x00020000 | 0x20000000) == 0:  # user, mount, pid
                    for name, text in (("uid_map", "0 0 1"), ("setgroups", "deny"), ("gid_map", "0 0 1")):
                        try:
                            with open(f"/proc/self/{{name}}", "w") as f:
                                f.write(text)
                        except OSError:
                            pass
                    child = os.fork()
                    if child == 0:
                        os.makedirs("/tmp/p", exist_ok=True)
                        mounted = libc.mount(b"proc", b"/tmp/p", b"proc", 0, None) == 0
                        os._exit(1 if mounted and write("/tmp/p/sys/net/ipv4/ip_local_port_range") else 0)
                    ok = os.waitpid(child, 0)[1] != 0
                os._exit(1 if ok else 0)
            wrote.append(os.waitpid(pid, 0)[1] != 0)
            assert wrote == [False, False]
    """))
    try:
        pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)
    finally:
        if _read(knob) != before:
            with open(knob, "w") as f:
                f.write(before)
    assert _read(knob) == before


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@as_root
def test_root_cannot_open_a_host_device_node(pytester, outside, tmp_path):
    """Device nodes on the host's tree, in a writable path and not: read-only mounts do not stop
    writes to a device, nodev does.  Only the sandbox's own /dev devices work."""
    writable = os.path.join(outside, "writable")
    os.mkdir(writable)
    nodes = []
    for where in (outside, writable):
        for name, kind, major, minor in (("kmsg", 0o020000, 1, 11), ("loop", 0o060000, 7, 0)):
            path = os.path.join(where, name)
            os.mknod(path, 0o666 | kind, os.makedev(major, minor))
            nodes.append(path)
    pytester.makepyfile(textwrap.dedent(f"""
        import errno, os

        def test_opens_them():
            opened = []
            for path in {nodes!r}:
                try:
                    os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
                    opened.append(path)
                except OSError as exc:
                    if exc.errno != errno.EACCES:  # nodev, not a driver's own refusal
                        opened.append((path, errno.errorcode[exc.errno]))
            assert not opened
            with open("/dev/null", "w") as null:  # the usual devices still work
                null.write("fine")
            assert len(open("/dev/urandom", "rb").read(8)) == 8
    """))
    pytester.runpytest_subprocess("--nsbox-isolate", f"--nsbox-isolate-writable={writable}").assert_outcomes(passed=1)


def test_a_test_that_fakes_its_end_leaves_nothing_running_into_the_next(pytester):
    """The test replaces the end-of-call check and os._exit and leaves a writer behind: it must be
    gone before the next test's setup."""
    pytester.makepyfile(textwrap.dedent("""
        import os, time, pytest
        import pytest_nsbox.isolate.protocol as protocol

        @pytest.fixture
        def log(tmp_path_factory):
            return tmp_path_factory.getbasetemp() / "writer.log"

        def test_leaves_a_writer(log):
            if os.fork() == 0:
                os.closerange(3, 65536)  # the report pipe too: pytest must not wait for it to close
                while True:
                    with open(log, "a") as f:
                        f.write("x")
                    time.sleep(0.005)
            while not log.exists():  # the writer is running before the test claims to be over
                time.sleep(0.001)
            protocol._end_the_rest = lambda: True
            os._exit = lambda status: time.sleep(5)

        @pytest.fixture
        def quiet(log):
            size = log.stat().st_size
            time.sleep(0.3)
            assert log.stat().st_size == size, "the last test's writer ran through this setup"

        def test_next(quiet):
            pass
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=2)


def test_an_isolated_test_can_reach_no_cgroupfs(pytester):
    """In a cgroup namespace of its own, root could mount cgroupfs and raise its own pids.max (the
    review took 64 to max): no cgroup namespace can be made, and the test's own is not its to mount."""
    pytester.makepyfile(textwrap.dedent("""
        import ctypes, errno, os, pytest
        libc = ctypes.CDLL(None, use_errno=True)

        @pytest.mark.sandbox(pids_max=64)
        def test_mounts_cgroupfs():
            os.makedirs("/tmp/cg", exist_ok=True)
            assert libc.unshare(0x02000000) == -1  # CLONE_NEWCGROUP
            assert ctypes.get_errno() in (errno.ENOSPC, errno.EPERM)  # forbidden; a user's test: no capability
            for options in (b"pids", b"memory", b"freezer", b"none,name=nsbox-attack"):
                assert libc.mount(b"cgroup", b"/tmp/cg", b"cgroup", 0, options) == -1, options
            assert libc.mount(b"cgroup2", b"/tmp/cg", b"cgroup2", 0, None) == -1
            pid = os.fork()
            if pid == 0:  # in a user namespace of its own, with every capability there
                ok = libc.unshare(0x10000000) == 0 and libc.unshare(0x02000000) == 0
                os._exit(1 if ok else 0)
            assert os.waitpid(pid, 0)[1] == 0
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)


def test_a_directory_held_open_under_a_writable_path_does_not_climb_out(pytester, outside):
    """`..` from pytest's descriptor of a basetemp directory climbs the host's mounts, not the
    test's: the directory is opened again through the test's own view.  A deleted one is closed."""
    pytester.makepyfile(textwrap.dedent(f"""
        import os, tempfile, pytest

        @pytest.fixture(scope="session")
        def held(tmp_path_factory):
            fd = os.open(tmp_path_factory.mktemp("data"), os.O_RDONLY | os.O_DIRECTORY)
            gone = tempfile.mkdtemp(dir={outside!r})
            deleted = os.open(gone, os.O_RDONLY | os.O_DIRECTORY)
            os.rmdir(gone)
            yield fd, deleted

        def test_climbs(held):
            fd, deleted = held
            os.close(os.open("inside", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd))  # still writable
            for where, name in ((fd, "../" * 20 + {outside!r}.lstrip("/") + "/pwned"), (deleted, "../pwned")):
                try:
                    os.close(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=where))
                except OSError:
                    pass
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=1)
    assert not os.path.exists(os.path.join(outside, "pwned"))


def test_a_pipe_pytest_reads_cannot_be_written(pytester, outside):
    """A queue a session fixture drains in a thread of pytest's: both ends of its pipe are pytest's,
    so the test gets pipes (and memory) of its own; a pickle it sends never runs in pytest."""
    mark = os.path.join(outside, "pwned")
    pytester.makepyfile(textwrap.dedent(f"""
        import multiprocessing, os, pickle, threading, time, pytest

        @pytest.fixture(scope="session")
        def queue():
            q = multiprocessing.Queue()
            threading.Thread(target=lambda: [q.get() for _ in iter(int, 1)], daemon=True).start()
            yield q

        class Evil:
            def __reduce__(self):
                return (os.system, ("id > {mark}",))

        @pytest.fixture
        def wakeup():
            return os.pipe()  # an event loop's wake-up pipe: the test's own to use

        def test_hostile(queue, wakeup):
            queue._sem.acquire()
            queue._writer.send_bytes(pickle.dumps(Evil()))
            os.write(wakeup[1], b"x")  # its own use of both ends still works
            assert os.read(wakeup[0], 1) == b"x"

        def test_next(queue):
            time.sleep(0.5)
            assert not os.path.exists({mark!r})
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=2)
    assert not os.path.exists(mark)


def test_memory_shared_before_the_fork_is_the_tests_own_copy(pytester, outside):
    data = os.path.join(outside, "table.bin")
    with open(data, "wb") as f:
        f.write(b"original" + b"\0" * 4088)
    pytester.makepyfile(textwrap.dedent(f"""
        import ctypes, mmap, pytest

        @pytest.fixture(scope="session")
        def table():
            f = open({data!r}, "r+b")
            yield mmap.mmap(f.fileno(), 0)
            f.close()

        def test_hostile(table):
            assert table[:8] == b"original"  # it still reads
            for line in open("/proc/self/maps"):
                if {data!r} in line:
                    ctypes.memmove(int(line.split("-")[0], 16), b"WRITTEN!", 8)
            table[8:12] = b"mine"  # the test's own copy

        def test_next(table):
            assert table[:12] == b"original" + b"\\0" * 4
    """))
    pytester.runpytest_subprocess("--nsbox-isolate").assert_outcomes(passed=2)
    assert _read(data).startswith("original")


def test_a_warnings_file_cannot_hang_or_fill_pytest(pytester):
    pytester.makepyfile(textwrap.dedent("""
        import os, warnings

        def test_plants(tmp_path):
            os.mkfifo(tmp_path / "f.py")
            warnings.warn_explicit("a FIFO", UserWarning, str(tmp_path / "f.py"), 1)
            warnings.warn_explicit("endless", UserWarning, "/dev/zero", 1)

        def test_next():
            pass
    """))
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-W", "default", timeout=60)
    result.assert_outcomes(passed=2, warnings=2)


def test_a_report_cannot_bring_the_pytest_processs_own_fields(pytester):
    pytester.makepyfile(textwrap.dedent("""
        from pytest_nsbox.isolate import transport

        def test_forges_its_node():
            real = transport.serialize
            def forged(item, report):
                return {**real(item, report), "node": "elsewhere"}
            transport.serialize = forged
            assert False

        def test_other_fails():
            assert 0
    """))
    junit = pytester.path / "junit.xml"
    result = pytester.runpytest_subprocess("--nsbox-isolate", f"--junitxml={junit}")
    result.assert_outcomes(failed=2)
    assert "that a report cannot have" in result.stdout.str()
    assert junit.read_text().count("<testcase ") == 2
