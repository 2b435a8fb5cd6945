"""Archive bombs made of headers and inodes: what a tarball costs is counted before it is paid.

Every header byte (GNU long names and link names, pax headers, global or not, sparse maps) counts,
and every entry costs at least a 4 KiB block on disk, whatever its type.  The hostile archives are
written here header by header through gzip, so that the tests themselves stay small in memory; the
extraction runs in a child process whose peak memory (VmHWM) is then read.
"""

from __future__ import annotations

import gzip
import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pytest_nsbox
from pytest_nsbox import RootfsError
from pytest_nsbox.rootfs.archive import Limits, extract
from pytest_nsbox.rootfs.store import RootfsStore

BLOCK = 512
MiB = 1 << 20
#: Peak memory a child that imports the store and refuses an archive may reach: Python itself
#: is ~10 MB, gzip's buffers and tarfile's 1 MiB reads a few more.
MOST_RSS = 64 * MiB


def _header(name: bytes, size: int, kind: bytes, linkname: bytes = b"", at: dict[int, bytes] | None = None) -> bytes:
    """One 512-byte tar header in GNU's layout, written by hand: tarfile would not make these."""
    block = bytearray(BLOCK)
    for offset, value in {0: name[:100], 100: b"0000644\0", 108: b"0000000\0", 116: b"0000000\0",
                          124: b"%011o\0" % size, 136: b"00000000000\0", 156: kind, 157: linkname[:100],
                          257: b"ustar  \0", **(at or {})}.items():
        block[offset:offset + len(value)] = value
    block[148:156] = b" " * 8
    block[148:155] = b"%06o\0" % sum(block)
    return bytes(block)


def _pad(size: int) -> bytes:
    return bytes(-size % BLOCK)


def _repeat(out, pattern: bytes, size: int) -> None:
    """Write `size` bytes of `pattern` over and over, a MiB at a time."""
    chunk = pattern * (MiB // len(pattern))
    while size > 0:
        out.write(chunk[:size])
        size -= len(chunk)


def _finish(out) -> None:
    """A genuine member after the bomb, then the end-of-archive blocks."""
    out.write(_header(b"bin/sh", 0, b"0"))
    out.write(bytes(2 * BLOCK))


def _pax_record(key: str, value_size: int) -> tuple[bytes, int]:
    """The head of a pax record `<len> key=<value_size bytes>\\n`, and the record's length."""
    body = len(f" {key}=") + value_size + 1
    digits = len(str(body))
    while len(str(body + digits)) != digits:
        digits += 1
    return f"{body + digits} {key}=".encode(), body + digits


def _long_name(out, size: int, kind: bytes = b"L") -> None:
    out.write(_header(b"././@LongLink", size + 1, kind))
    _repeat(out, b"a", size)
    out.write(b"\0" + _pad(size + 1))


def _pax(out, size: int, kind: bytes) -> None:
    head, length = _pax_record("path" if kind == b"x" else "comment", size)
    out.write(_header(b"././@PaxHeader", length, kind))
    out.write(head)
    _repeat(out, b"a", size)
    out.write(b"\n" + _pad(length))


def _gnu_sparse_map(out, entries: int) -> None:
    """A GNU sparse 1.0 member (tar --sparse --format=posix): its map leads its data."""
    records = b"".join(f"{len(r) + len(str(len(r) + 3)) + 1} {r}".encode() for r in (
        "GNU.sparse.major=1\n", "GNU.sparse.minor=0\n", "GNU.sparse.name=hole\n", "GNU.sparse.realsize=1\n"))
    out.write(_header(b"././@PaxHeader", len(records), b"x") + records + _pad(len(records)))
    head = f"{entries}\n".encode()
    size = len(head) + 4 * entries
    out.write(_header(b"GNUSparseFile.0/hole", size, b"0"))
    out.write(head)
    _repeat(out, b"0\n", 4 * entries)
    out.write(_pad(size))


def _old_gnu_sparse(out, extension_blocks: int) -> None:
    """An old GNU sparse member ('S') whose map goes on for `extension_blocks` blocks of 21 entries."""
    entry = b"00000000001\0" * 2
    out.write(_header(b"hole", 0, b"S", at={386: entry * 4, 482: b"\1", 483: b"00000000001\0"}))
    extension = bytearray(entry * 21 + b"\1" + bytes(7))
    for number in range(extension_blocks):
        if number == extension_blocks - 1:
            extension[504] = 0
        out.write(extension)


BOMBS = {
    "gnu-long-name-1GiB": lambda out: _long_name(out, 1 << 30),
    "gnu-long-link-name": lambda out: _long_name(out, 128 * MiB, b"K"),
    "pax-path": lambda out: _pax(out, 128 * MiB, b"x"),
    "pax-global-header": lambda out: _pax(out, 128 * MiB, b"g"),
    "gnu-sparse-1.0-map": lambda out: _gnu_sparse_map(out, 8 << 20),
    "old-gnu-sparse-map": lambda out: _old_gnu_sparse(out, 128 * MiB // BLOCK),
}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    made = {}
    for name, write in BOMBS.items():
        path = folder / f"{name}.tar.gz"
        with gzip.open(path, "wb", compresslevel=1) as out:
            write(out)
            _finish(out)
        made[name] = path
    return made


_CHILD = """
import os, sys
from pytest_nsbox import RootfsError
from pytest_nsbox.rootfs.store import RootfsStore
try:
    RootfsStore(sys.argv[2], offline=True).resolve(sys.argv[1])
    print("accepted")
except RootfsError as exc:
    print(type(exc).__name__, str(exc)[:1000].replace("\\n", " "))  # a bomb's name could be 1 GiB long
with open("/proc/self/status") as status:
    print(next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:")))
"""


def _resolve_in_a_child(archive: Path, cache: Path, **env: str) -> tuple[str, int]:
    """Resolve `archive` in a fresh Python; what it said, and its peak resident memory in bytes."""
    package_parent = str(Path(pytest_nsbox.__file__).parent.parent)
    done = subprocess.run([sys.executable, "-c", _CHILD, str(archive), str(cache)], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": package_parent, **env})
    assert done.returncode == 0, done.stderr
    said, peak = done.stdout.strip().rsplit("\n", 1)
    return said, int(peak)


def _leftovers(cache: Path) -> list[str]:
    trees = cache / "trees"
    return sorted(p.name for p in trees.iterdir() if not p.name.endswith(".lock")) if trees.exists() else []


@pytest.mark.parametrize("bomb", BOMBS)
def test_a_huge_header_is_refused_before_it_is_read(bombs, tmp_path, bomb):
    # A GNU long name is read by tarfile in one read(size): a 1 GiB name took 2 GB of memory.
    cache = tmp_path / "cache"
    said, peak = _resolve_in_a_child(bombs[bomb], cache)
    assert said.startswith("ArchiveLimitError"), said
    assert "headers take more than 1 MiB" in said and str(bombs[bomb]) in said, said
    assert peak < MOST_RSS, f"{peak >> 20} MiB at the peak"
    assert _leftovers(cache) == []


def test_the_reviewers_long_name_compresses_to_a_few_mb(bombs):
    assert bombs["gnu-long-name-1GiB"].stat().st_size < 8 * MiB


def _tarball(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _entry(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", pax: dict[str, str] | None = None):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, 0o755 if kind == tarfile.DIRTYPE else 0o644
    if pax:
        info.pax_headers = pax
    return info, b"" if kind == tarfile.REGTYPE else None


ENTRIES = 6000  # at 4 KiB each, 24 MB: over a 16 MiB limit, whatever their headers weigh


def _flood(kind: str) -> list:
    if kind == "directories":
        return [_entry(f"d{n}", tarfile.DIRTYPE) for n in range(ENTRIES)]
    if kind == "empty-files":
        return [_entry(f"f{n}") for n in range(ENTRIES)]
    if kind == "symlinks":
        return [_entry(f"l{n}", tarfile.SYMTYPE, "/bin/busybox") for n in range(ENTRIES)]
    if kind == "hard-links":
        return [_entry("f")] + [_entry(f"h{n}", tarfile.LNKTYPE, "f") for n in range(ENTRIES)]
    assert kind == "implicit-parents"  # directories no member names, made for the members below them
    return [_entry("/".join([f"p{n}", *["d"] * 199, "f"])) for n in range(ENTRIES // 200)]


@pytest.mark.parametrize("kind", ["directories", "empty-files", "symlinks", "hard-links", "implicit-parents"])
def test_every_entry_costs_a_block_on_disk(tmp_path, monkeypatch, kind):
    # 4 MB of directory headers became 479 MB of directories under a 16 MB limit.
    archive = _tarball(tmp_path / f"{kind}.tar.gz", _flood(kind))
    monkeypatch.setenv("NSBOX_ROOTFS_MAX_BYTES", "16M")
    with pytest.raises(RootfsError, match=rf"^{archive} holds more than 16 MiB once extracted "
                                          r"\(member .* brings it to \d+ bytes.*NSBOX_ROOTFS_MAX_BYTES=1G"):
        RootfsStore(tmp_path / "cache", offline=True).resolve(archive)
    assert _leftovers(tmp_path / "cache") == []
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RootfsError, match="more than 16 MiB"):
        extract(archive, dest, limits=Limits(max_bytes=16 * MiB))
    assert list(dest.iterdir()) == []


def test_pax_headers_count_as_the_bytes_they_are(tmp_path):
    # 1500 empty files fit in 16 MiB (1500 x 4.5 KiB); the same with 8 KiB of pax comment each do not.
    plain = _tarball(tmp_path / "plain.tar.gz", [_entry(f"f{n}") for n in range(1500)])
    padded = _tarball(tmp_path / "padded.tar.gz",
                      [_entry(f"f{n}", pax={"comment": "x" * 8192}) for n in range(1500)])
    limits = Limits(max_bytes=16 * MiB)
    (tmp_path / "a").mkdir()
    assert 1500 * 4096 < extract(plain, tmp_path / "a", limits=limits) < 1500 * 6000
    (tmp_path / "b").mkdir()
    with pytest.raises(RootfsError, match=r"more than 16 MiB once extracted \(member 'f\d+'"):
        extract(padded, tmp_path / "b", limits=limits)
    assert list((tmp_path / "b").iterdir()) == []


def test_a_chain_of_extended_headers_is_refused_with_a_sentence(tmp_path):
    # tarfile reads each extended header by calling itself again: a long chain is a RecursionError.
    archive = tmp_path / "chain.tar.gz"
    with gzip.open(archive, "wb") as out:
        for _ in range(5000):
            _long_name(out, 10)
        _finish(out)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RootfsError, match=rf"^{archive}: .*extended headers"):
        extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_pax_global_headers_cannot_pile_up(tmp_path):
    # Each is small, but tarfile keeps them all, for every member after them.
    archive = tmp_path / "globals.tar.gz"
    with gzip.open(archive, "wb") as out:
        for number in range(100):
            body = f" k{number}=v\n"
            record = f"{len(body) + len(str(len(body) + 1))}{body}".encode()
            out.write(_header(b"././@PaxHeader", len(record), b"g") + record + _pad(len(record)))
            out.write(_header(f"f{number}".encode(), 0, b"0"))
        out.write(bytes(2 * BLOCK))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RootfsError, match=rf"^{archive}: its pax global headers take more than 1 MiB or 64 records"):
        extract(archive, dest)
    assert list(dest.iterdir()) == []


def test_the_decompressed_stream_is_bounded_too(tmp_path):
    # An old GNU sparse member says how big it is (1 byte) apart from what it stores (64 MiB).
    archive = tmp_path / "stored.tar.gz"
    with gzip.open(archive, "wb") as out:
        out.write(_header(b"hole", 64 * MiB, b"S", at={483: b"00000000001\0"}))
        _repeat(out, b"\0", 64 * MiB)
        _finish(out)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(RootfsError, match=rf"^{archive} holds more than 16 MiB once extracted \(its decompressed "
                                          r"stream passes \d+ bytes\); .*NSBOX_ROOTFS_MAX_BYTES=1G"):
        extract(archive, dest, limits=Limits(max_bytes=16 * MiB))
    assert list(dest.iterdir()) == []


def test_alpine_is_counted_at_about_what_it_takes_on_disk(tmp_path, alpine_tarball):
    dest = tmp_path / "tree"
    dest.mkdir()
    counted = extract(alpine_tarball, dest)
    used = int(subprocess.run(["du", "-s", "-B1", str(dest)], capture_output=True, text=True,
                              check=True).stdout.split()[0])
    assert used * 0.8 < counted < used * 2, (counted, used)
