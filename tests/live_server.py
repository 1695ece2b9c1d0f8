"""`lmpipe serve` as a user runs it: a real subprocess on a free loopback port, for the tests that need a real
HTTP server (the OpenAI client, the chat page in a browser, the server's own start and shutdown).

Not a test module (like tiny_models.py): tests import it by name through `pythonpath = ["tests"]`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    """A running `lmpipe serve`: its base URL, its log file and, once it has exited, its exit status."""

    base: str
    log: Path
    returncode: int | None = None

    def log_text(self) -> str:
        return self.log.read_text()


@contextmanager
def lmpipe_serve(
    model: Path, log: Path, *options: str, env: dict[str, str] | None = None, startup_s: float = 60
) -> Iterator[LiveServer]:
    """Run `lmpipe serve --model <model> --port <free> --threads 1 <options>` (environment `env`, None = this
    one's), logging to `log`; yield once /health answers at all, and stop it with SIGTERM (uvicorn's graceful
    shutdown) on the way out. A server that exits or stays silent before /health answers fails with its log."""
    port = free_port()
    command = [sys.executable, "-m", "lmpipe.cli", "serve", "--model", str(model), "--port", str(port)]
    command += ["--threads", "1", *options]
    server = LiveServer(f"http://127.0.0.1:{port}", log)
    with log.open("w") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            _wait_for_health(proc, server, startup_s)
            yield server
        finally:
            proc.terminate()
            try:
                server.returncode = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise


def _wait_for_health(proc: subprocess.Popen, server: LiveServer, startup_s: float) -> None:
    deadline = time.monotonic() + startup_s
    while True:
        assert proc.poll() is None, f"lmpipe serve exited with {proc.returncode}:\n{server.log_text()}"
        try:  # any answer will do: with an API key, /health may be a 401
            httpx.get(f"{server.base}/health", timeout=1)
            return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"lmpipe serve did not answer within {startup_s:g} s"
        time.sleep(0.1)
