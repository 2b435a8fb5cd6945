"""The plugin's side of rootfs downloads: the progress a user sees, and the run they belong to.

Progress is shown once per download, by the process that downloads. In a plain run that is pytest's
terminal reporter: one line redrawn in place on a terminal, one line when done in a log. An xdist
worker's terminal reporter writes nowhere (execnet points the worker's stdout at /dev/null), but the
worker keeps the controller's stderr as its fd 2, so the worker that holds the download's lock
writes whole lines there, named by the worker — the others wait on that lock and download nothing.

A failed download is tried once per run (rootfs/store.py remembers it under a run id): a plain run
or an xdist controller makes a random one, and the controller hands it to its workers (hooks.py's
`pytest_configure_node`) — not xdist's `testrunuid`, which `--testrunuid` can fix across runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

import pytest

_RUN = pytest.StashKey[str]()
#: The key of the run id in an xdist worker's `workerinput`.
WORKER_KEY = "nsbox_run_id"


def run_id(config: pytest.Config) -> str:
    workerinput = getattr(config, "workerinput", None)
    if workerinput and workerinput.get(WORKER_KEY):
        return str(workerinput[WORKER_KEY])
    if _RUN not in config.stash:
        config.stash[_RUN] = os.urandom(16).hex()
    return config.stash[_RUN]


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


class Progress:
    """Called by the store as a download goes: (file name, bytes so far, size or None)."""

    def __init__(self, config: pytest.Config):
        self._config = config
        workerinput = getattr(config, "workerinput", None)
        self._worker: str | None = str(workerinput.get("workerid", "worker")) if workerinput else None
        self._last = 0.0
        self._started = 0.0

    def __call__(self, name: str, done: int, total: int | None) -> None:
        finished = total is not None and done >= total
        capture = self._config.pluginmanager.get_plugin("capturemanager")
        # The download starts inside a test (its fixture): write past the test's capture.
        with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
            if self._worker is not None:
                self._worker_line(name, done, total, finished)
            else:
                self._terminal(name, done, total, finished)

    def _terminal(self, name: str, done: int, total: int | None, finished: bool) -> None:
        reporter = self._config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        if not reporter.isatty:
            if finished:
                reporter.write_line(f"nsbox: downloaded {name} ({_mb(done)})")
            return
        now = time.monotonic()
        if not finished and done and now - self._last < 0.2:
            return
        self._last = now
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else _mb(done)
        reporter.write(f"\rnsbox: downloading {name} {size}", flush=True)
        if finished:
            reporter.write("\n", flush=True)

    def _worker_line(self, name: str, done: int, total: int | None, finished: bool) -> None:
        # Whole lines only: the controller draws its own line on the same terminal, and where its
        # cursor is cannot be known from here, so each line starts on a fresh one.
        stream = sys.stderr
        try:
            tty = stream.isatty()
            if not self._started:
                self._started = time.monotonic()
                if tty:  # a log gets the one line below; a person watching also sees it begin
                    stream.write(f"\nnsbox: [{self._worker}] downloading {name}"
                                 + (f" ({_mb(total)})" if total else "") + "\n")
            if finished:
                took = time.monotonic() - self._started
                stream.write(f"\nnsbox: [{self._worker}] downloaded {name} ({_mb(done)})"
                             + (f" in {took:.1f} s" if tty else "") + "\n")
                self._started = 0.0
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken stderr: progress is not worth failing a test for
