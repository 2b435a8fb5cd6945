"""The recipe users want from an image: one server per session, reached through a published port,
ready when a predicate says so, its output in the report when a test fails — over a real service
image (Debian bookworm with redis-server, built by .ci/images/build-redis with debootstrap)."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest

from pytest_nsbox.engine import idmap

REDIS = Path(os.environ.get("NSBOX_IMAGES_DIR", "/var/tmp/nsbox-images")) / "redis"
pytestmark = pytest.mark.skipif(not (REDIS / "index.json").exists(),
                                reason=f"no redis image at {REDIS}: build it with .ci/images/build-redis "
                                       "(root, debootstrap; .ci/run does)")

RECIPE = f'''
import socket, subprocess
import pytest

@pytest.fixture(scope="session")
def redis(shared_sandbox_factory):
    box = shared_sandbox_factory(rootfs="oci:{REDIS}")
    server = box.spawn(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # the image's own Cmd
    box.wait_until(lambda: box.run(["redis-cli", "ping"]).stdout == "PONG\\n", timeout=30, process=server)
    return box

def talk(address, *words):
    with socket.create_connection(address, timeout=5) as sock:
        sock.sendall(("*%d\\r\\n" % len(words) + "".join("$%d\\r\\n%s\\r\\n" % (len(w), w) for w in words)).encode())
        return sock.recv(1024)
'''


def test_a_session_redis_from_an_image_serves_every_test_through_a_published_port(pytester):
    pytester.makeconftest(RECIPE)
    pytester.makepyfile(test_a=textwrap.dedent("""
        from conftest import talk

        def test_set(redis):
            assert talk(redis.port(), "SET", "k", "v") == b"+OK\\r\\n"  # port(): the image's ExposedPorts
    """), test_b=textwrap.dedent("""
        from conftest import talk

        def test_get(redis):
            assert talk(redis.port(6379), "GET", "k") == b"$1\\r\\nv\\r\\n"
    """))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-W", "ignore::pytest_nsbox.NsboxWarning")
    result.assert_outcomes(passed=2)


def test_a_failing_test_shows_the_servers_output(pytester):
    pytester.makeconftest(RECIPE)
    pytester.makepyfile(textwrap.dedent("""
        from conftest import talk

        def test_fails(redis):
            assert talk(redis.port(), "GET", "missing") == b"+something\\r\\n"
    """))
    result = pytester.runpytest_subprocess("-W", "ignore::pytest_nsbox.NsboxWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*- nsbox sandbox commands (call) -*", "*redis-server*", "*Ready to accept connections*"])


@pytest.mark.skipif(idmap.available() is None, reason=f"sandboxes map one uid here: {idmap.unavailable()}")
def test_the_server_runs_as_the_images_user_over_files_it_owns(pytester):
    pytester.makepyfile(textwrap.dedent(f"""
        def test_one(sandbox_factory):
            box = sandbox_factory(rootfs="oci:{REDIS}")
            assert box.run(["id", "-un"]).stdout == "redis\\n"
            assert box.run(["stat", "-c", "%U %a", "/var/lib/redis"]).stdout == "redis 750\\n"
            assert box.run(["touch", "/var/lib/redis/dump.rdb"]).returncode == 0
    """))
    result = pytester.runpytest_subprocess("-p", "no:randomly", "-W", "error::pytest_nsbox.NsboxWarning")
    result.assert_outcomes(passed=1)
