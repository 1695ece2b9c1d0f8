"""A DVC HTTP remote on loopback that refuses uploads, as a read-only bucket does (not a test module: tests
import it by name). DVC reads an HTTP remote with GET/HEAD and writes to it with POST."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder's files; answers a POST with 200 only for the paths in `accept`, else 403."""

    accept: frozenset[str] = frozenset()

    def _drain(self) -> None:
        # Read the upload whatever the answer, so the client sees the status instead of a reset connection.
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0], 16):
                self.rfile.read(size + 2)
            self.rfile.readline()
        else:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_POST(self):
        self._drain()
        if self.path in self.accept:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        else:
            self.send_error(403, "read-only")

    do_PUT = do_POST

    def log_message(self, *args):
        pass


@contextmanager
def refusing_remote(folder: Path, accept: set[str] = frozenset()) -> Iterator[str]:
    """An HTTP server over `folder` that refuses every upload but those to the URL paths `accept` (which it
    answers without storing: put their files in `folder` beforehand); yields its base URL."""
    handler = type("Handler", (_Handler,), {"accept": frozenset(accept)})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), lambda *a, **kw: handler(*a, directory=str(folder), **kw)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
