"""A loopback HTTP server over a copy of ../shared/alpine-mirror, that counts and can break requests."""

from __future__ import annotations

import http.server
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

_STALL_LIMIT = 120.0  # a stalled answer ends by then even if the test forgets to stop the server


@dataclass
class Mirror:
    root: Path
    url: str = ""
    requests: list[str] = field(default_factory=list)
    fail: dict[str, int] = field(default_factory=dict)     # path suffix -> HTTP status
    truncate: set[str] = field(default_factory=set)        # path suffixes sent cut short
    stall: dict[str, int] = field(default_factory=dict)    # path suffix -> bytes sent before going silent
    silent: set[str] = field(default_factory=set)          # path suffixes answered with nothing at all
    stopped: threading.Event = field(default_factory=threading.Event)

    def downloads(self, name: str) -> int:
        return sum(1 for path in self.requests if path.endswith(name))


def serve(source: Path, dest: Path):
    """Copy `source` to `dest` and serve it on 127.0.0.1:<ephemeral>; returns (Mirror, stop)."""
    shutil.copytree(source, dest)
    for path in [dest, *dest.rglob("*")]:  # shared/ is read-only; tests alter their copy
        path.chmod(path.stat().st_mode | 0o200)
    mirror = Mirror(dest)

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(dest), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            mirror.requests.append(self.path)
            for suffix, status in mirror.fail.items():
                if self.path.endswith(suffix):
                    self.send_error(status)
                    return
            if any(self.path.endswith(s) for s in mirror.silent):
                mirror.stopped.wait(_STALL_LIMIT)  # connected, and not a byte back
                self.close_connection = True
                return
            sent = next((n for suffix, n in mirror.stall.items() if self.path.endswith(suffix)), None)
            if sent is not None or any(self.path.endswith(s) for s in mirror.truncate):
                data = (dest / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2 if sent is None else sent])
                self.wfile.flush()
                if sent is not None:
                    mirror.stopped.wait(_STALL_LIMIT)  # headers and a part, then nothing
                self.close_connection = True
                return
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    mirror.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()

    def stop():
        mirror.stopped.set()
        server.shutdown()
        server.server_close()
        thread.join()

    return mirror, stop
