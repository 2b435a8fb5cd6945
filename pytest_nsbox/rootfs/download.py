"""Downloads over HTTP(S), hashed as they arrive, into a temp file the caller renames."""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPException
from pathlib import Path

from ..errors import DigestMismatch, NetworkError, RemoteNotFound, RootfsError

Progress = Callable[[str, int, "int | None"], None]
_CHUNK = 1 << 16
TIMEOUT = 30.0


def _open(url: str, timeout: float):
    from .. import __version__
    request = urllib.request.Request(url, headers={"User-Agent": f"pytest-nsbox/{__version__}"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) only, by spec
    except urllib.error.HTTPError as exc:
        error = RemoteNotFound if exc.code in (404, 410) else RootfsError
        raise error(f"download {url}: the server answered HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        reason = getattr(exc, "reason", exc)
        raise NetworkError(f"download {url}: {reason}") from None


def fetch_text(url: str, timeout: float = TIMEOUT) -> str:
    with _open(url, timeout) as response:
        try:
            return response.read().decode("utf-8", errors="replace")
        except (OSError, HTTPException) as exc:
            raise NetworkError(f"download {url}: {exc}") from None


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
                    chunk = response.read(_CHUNK)
                except (OSError, HTTPException) as exc:
                    raise NetworkError(f"download {url}: interrupted after {done} bytes ({exc})") from None
                if not chunk:
                    break
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(name, done, total)
            if total is not None and done != total:
                raise NetworkError(f"download {url}: truncated at {done} of {total} bytes")
            if progress and total is None:
                progress(name, done, done)
        actual = digest.hexdigest()
        if expected_sha256 and actual != expected_sha256:
            raise DigestMismatch(f"{name} from {url} is not the expected file: SHA-256 {actual}, "
                                 f"expected {expected_sha256}; it was not cached (a tampered or "
                                 "broken mirror? see --nsbox-alpine-mirror)")
        return actual
    except BaseException:
        try:
            os.unlink(dest)
        except FileNotFoundError:
            pass
        raise
