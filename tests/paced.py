"""An engine whose forwards the test paces: the serve tests decide where, between two decode steps, requests
arrive, leave or are looked at.

Not a test module (like tiny_models.py): tests import it by name through `pythonpath = ["tests"]`.
"""

from __future__ import annotations

import threading
import time


class Paced:
    """The real engine, but each forward waits for a permit from the test (`allow`); records every forward's
    (rows, cached columns, new columns) as it is called."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.permits = threading.Semaphore(0)

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def allow(self, n: int) -> None:
        for _ in range(n):
            self.permits.release()

    def forward(self, ids, positions, mask, past=None):
        self.calls.append((ids.shape[0], 0 if past is None else past[0][0].shape[2], ids.shape[1]))
        assert self.permits.acquire(timeout=10), "no permit for a forward within 10 s"
        return self.engine.forward(ids, positions, mask, past)

    def wait_calls(self, n: int) -> None:
        """Until the n-th forward has been called (with n - 1 permits, it waits for the next one)."""
        deadline = time.monotonic() + 10
        while len(self.calls) < n:
            assert time.monotonic() < deadline, f"{len(self.calls)} forwards, expected {n}"
            time.sleep(0.002)
