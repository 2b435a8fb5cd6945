"""Downloads over HTTP(S), hashed as they arrive, into a temp file the caller renames.

Every read waits `timeout` seconds at most — the connection, the answer's headers and each read of
the body — so a server that sends headers and then nothing fails in that time instead of never.

A failed download says what happened, naming the URL, and whether the server was reached at all:
`NetworkError.unreachable` is true for no network (no DNS, no route, no answer to connect), where
filling the cache elsewhere is the fix; otherwise the server answered and then failed (an HTTP
error, a stall, a cut connection), and the fix is another mirror or URL. The caller, which knows
what the URL was for, adds the fix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path

from ..errors import DigestMismatch, NetworkError, RemoteNotFound, RootfsError

Progress = Callable[[str, int, "int | None"], None]
_CHUNK = 1 << 16
TIMEOUT = 30.0
_UNREACHABLE = (errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ENETDOWN, errno.EHOSTDOWN)


def size(n: int | None) -> str:
    if n is None:
        return "an unknown size"
    return f"{n} bytes" if n < 100_000 else f"{n / 1e6:.1f} MB"


def _network_error(message: str, unreachable: bool = False, refused: bool = False) -> NetworkError:
    error = NetworkError(message)
    error.unreachable = unreachable  # type: ignore[attr-defined]
    error.refused = refused  # type: ignore[attr-defined]
    return error


def unreachable(exc: BaseException) -> bool:
    """Whether a download failed for want of a network (rather than the server failing)."""
    return bool(getattr(exc, "unreachable", False))


def refused(exc: BaseException) -> bool:
    """Whether nothing listened at the URL's host and port: a wrong URL more often than a failing server."""
    return bool(getattr(exc, "refused", False))


def _open(url: str, timeout: float):
    from .. import __version__
    request = urllib.request.Request(url, headers={"User-Agent": f"pytest-nsbox/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only, by spec
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the connection, for a body nobody reads
        error = RemoteNotFound if exc.code in (404, 410) else RootfsError
        raise error(f"GET {url}: the server answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        # urllib wraps what failed before the request was sent: the name, the route, the connect.
        raise _connect_error(url, exc.reason, timeout) from None
    except (TimeoutError, socket.timeout):
        # Connected and asked, but no status line came.
        raise _network_error(f"GET {url}: the server accepted the connection, then sent nothing for "
                             f"{timeout:g} s") from None
    except (OSError, HTTPException) as exc:
        raise _network_error(f"GET {url}: the server closed the connection before answering "
                             f"({_reason(exc)})") from None


def _connect_error(url: str, reason: object, timeout: float) -> NetworkError:
    host = urllib.parse.urlsplit(url).hostname or url
    if isinstance(reason, socket.gaierror):
        return _network_error(f"GET {url}: cannot look up {host} ({reason.strerror}: no network, or no DNS)",
                              unreachable=True)
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return _network_error(f"GET {url}: {host} did not answer the connection within {timeout:g} s "
                              "(no network, or a firewall?)", unreachable=True)
    if isinstance(reason, OSError) and reason.errno in _UNREACHABLE:
        return _network_error(f"GET {url}: {host} cannot be reached ({reason.strerror}: no network?)",
                              unreachable=True)
    if isinstance(reason, ConnectionRefusedError):
        return _network_error(f"GET {url}: {host} refused the connection (nothing serves that port)",
                              refused=True)
    if isinstance(reason, ssl.SSLError):
        return _network_error(f"GET {url}: the TLS handshake with {host} failed ({_reason(reason)})")
    return _network_error(f"GET {url}: {_reason(reason)}", unreachable=True)


def _reason(exc: object) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _body_error(url: str, exc: BaseException, done: int, total: int | None, timeout: float) -> NetworkError:
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return _network_error(f"GET {url}: the server stalled: nothing came for {timeout:g} s after "
                              f"{size(done)} of {size(total)}")
    return _network_error(f"GET {url}: the server closed the connection after {size(done)} of "
                          f"{size(total)} ({_reason(exc)})")


def fetch_text(url: str, timeout: float = TIMEOUT) -> str:
    with _open(url, timeout) as response:
        chunks: list[bytes] = []
        done = 0
        while True:
            try:
                chunk = response.read1(_CHUNK)
            except (OSError, HTTPException) as exc:
                raise _body_error(url, exc, done, response.length, timeout) from None
            if not chunk:
                break
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks).decode("utf-8", errors="replace")


def fetch_file(url: str, dest: Path, expected_sha256: str | None, progress: Progress | None = None,
               timeout: float = TIMEOUT) -> str:
    """Download `url` to `dest`, check its SHA-256, return it.  On any failure `dest` is removed.

    `dest` is opened without following a symlink. `progress` is called as data arrives, and once
    more at the end with total == done when the server did not say the size.
    """
    digest = hashlib.sha256()
    name = url.rsplit("/", 1)[-1]
    try:
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC
        with _open(url, timeout) as response, open(os.open(dest, flags, 0o600), "wb") as out:
            total = response.length
            done = 0
            if progress:
                progress(name, 0, total)
            while True:
                try:
                    # read1: one recv at most, so `timeout` bounds the wait for each piece of data
                    # (read(n) would wait for n bytes from a server that drips them).
                    chunk = response.read1(_CHUNK)
                except (OSError, HTTPException) as exc:
                    raise _body_error(url, exc, done, total, timeout) from None
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
            if total is not None and done != total:
                raise _network_error(f"GET {url}: the server closed the connection after {size(done)} of "
                                     f"{size(total)}")
            if progress and total is None:
                progress(name, done, done)
        actual = digest.hexdigest()
        if expected_sha256 and actual != expected_sha256:
            error = DigestMismatch(f"{name} from {url} is not the expected file: SHA-256 {actual}, "
                                   f"expected {expected_sha256}; it was not cached")
            error.actual = actual  # type: ignore[attr-defined]
            raise error
        return actual
    except BaseException:
        try:
            os.unlink(dest)
        except FileNotFoundError:
            pass
        raise
