"""The exceptions pytest-nsbox raises.

Every error says what failed and what the user can do about it; none of them should need a traceback
to be understood.
"""

from __future__ import annotations


class NsboxError(Exception):
    """Base class of every error raised by pytest-nsbox."""


class ConfigError(NsboxError, ValueError):
    """A setting is unknown or has a value that is not allowed."""


class SandboxUnavailable(NsboxError):
    """The kernel or the environment cannot make sandboxes here (user namespaces, overlayfs...)."""


class SandboxSetupError(NsboxError):
    """A sandbox could not be set up: a mount, a namespace or a file inside it failed."""


class SandboxClosed(NsboxError):
    """The sandbox was used after it was closed, or it died (its lifetime timeout, or killed)."""


class ServerNotReady(NsboxError, TimeoutError):
    """A server in a sandbox was not ready in time (it did not listen, print or answer as waited
    for), or it exited first."""


class RootfsError(NsboxError):
    """The root filesystem could not be found, verified or extracted."""


class UnsafeArchiveError(RootfsError):
    """A rootfs archive holds a member that could write outside its tree."""


class NetworkError(RootfsError):
    """A download failed for want of a network (refused, unreachable, timed out)."""


class DigestMismatch(RootfsError):
    """A downloaded file is not the one its digest promised: tampered, or a bad mirror."""


class UnsafeCacheError(RootfsError):
    """A rootfs cache directory or entry is not the user's own, or others may write it."""


class ArchiveLimitError(UnsafeArchiveError):
    """A rootfs archive would extract to more bytes, members or depth than the limits allow."""


class RemoteNotFound(RootfsError):
    """The server has no such file (HTTP 404 or 410)."""


def hide_our_frames(excinfo: object) -> bool:
    """pytest's `__tracebackhide__` for the modules of the public API: an error of ours is a
    sentence with its cause and fix, shown at the test's own line; the validator's source under it
    only buries it. Anything else (a bug of ours) keeps its frames."""
    return isinstance(getattr(excinfo, "value", None), NsboxError)


class NsboxWarning(UserWarning):
    """Something works, but not as asked: a cap lower than asked for, say."""
