"""An isolated test's call sees the rootfs cache read-only; a rootfs the cache lacks is extracted
into the test's private /tmp instead (store.py `_spill`).  A hostile test can write its own spill
as it likes: that must change nothing for the next test, the cache, the host's /tmp, or the pytest
process."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path


def _spills() -> set[str]:
    return {name for name in os.listdir("/tmp") if name.startswith("nsbox-cache-")}


def test_a_tests_spilled_tree_reaches_no_other_test_nor_the_cache(pytester, alpine_tarball, cache_dir):
    # A tarball no cache has: the Alpine tree with a marker, made here.
    import io
    import tarfile
    marked = pytester.path / "marked.tar.gz"
    with tarfile.open(alpine_tarball) as source, tarfile.open(marked, "w:gz") as out:
        for member in source:
            out.addfile(member, source.extractfile(member) if member.isfile() else None)
        info = tarfile.TarInfo("etc/marker")
        info.size = 9
        out.addfile(info, io.BytesIO(b"original\n"))
    digest = hashlib.sha256(marked.read_bytes()).hexdigest()
    pytester.makepyfile(textwrap.dedent(f"""
        import os, pytest
        from pathlib import Path
        from pytest_nsbox import Sandbox
        from pytest_nsbox.rootfs import store

        TARBALL = {str(marked)!r}
        CACHE = {str(cache_dir)!r}

        def _resolve():
            return store.RootfsStore(CACHE, offline=True).resolve(TARBALL)

        def test_1_poisons_its_spill():
            tree = _resolve().tree
            assert not str(tree).startswith(CACHE), tree  # the cache is read-only here
            (tree / "etc" / "marker").write_text("poisoned\\n")
            if os.getuid() != 0:
                with Sandbox(rootfs=TARBALL, cache_dir=CACHE) as box:
                    assert box.run("cat /etc/marker").stdout == "poisoned\\n"
            (tree / "bin" / "sh").unlink()
            # a decoy where the next test's spill could be, and the env var pointed elsewhere
            os.makedirs(str(Path(tree).parent.parent.parent / "nsbox-cache-planted"), exist_ok=True)
            os.environ[store.SPILL_ENV] = str(Path(os.environ.get("PYTEST_BASETEMP", "/tmp")))

        def test_2_sees_the_original():
            tree = _resolve().tree
            assert not str(tree).startswith(CACHE), tree
            assert (tree / "etc" / "marker").read_text() == "original\\n"
            assert (tree / "bin" / "sh").exists() or (tree / "bin" / "sh").is_symlink()
            assert not any(p.startswith("nsbox-cache-planted") for p in os.listdir("/tmp"))
            if os.getuid() != 0:
                with Sandbox(rootfs=TARBALL, cache_dir=CACHE) as box:
                    assert box.run("cat /etc/marker").stdout == "original\\n"
    """))
    before = _spills()
    result = pytester.runpytest_subprocess("--nsbox-isolate", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert not (cache_dir / "trees" / f"sha256-{digest}").exists()  # the cache never got it
    assert _spills() <= before  # the host's /tmp kept none of the spills
    assert not Path("/tmp/nsbox-cache-planted").exists()
    # and the pytest process itself, resolving it afterwards, gets a clean tree of its own
    from pytest_nsbox.rootfs.store import RootfsStore
    tree = RootfsStore(pytester.path / "cache", offline=True).resolve(str(marked)).tree
    assert (tree / "etc" / "marker").read_text() == "original\n"
