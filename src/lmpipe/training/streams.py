"""One resumable stream of training batches, for every stage (no Lightning here: evaluation code shares it).

A stream's batch `b` on rank `r` is a pure function of (seed, b, r), so a run killed at step N and resumed from
its checkpoint, which records how many batches were consumed, sees exactly the batches an uninterrupted run
would have seen. A stage's stream implements `batch(index)`; the epoch logic lives here once.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from torch.utils.data import IterableDataset


class StreamSpec(NamedTuple):
    """Which stream a process draws (seed and rank), the length of its epochs, and where it starts."""

    seed: int
    batches_per_epoch: int
    start_batch: int = 0
    """The first batch to draw: how many the checkpoint a run resumes from had consumed."""
    rank: int = 0


class BatchStream(IterableDataset):
    """Whole batches, `batch(index)` a pure function of (seed, index, rank) drawn with `rng(index)`; one pass is
    one epoch of `batches_per_epoch`, starting at `start_batch`."""

    def __init__(self, spec: StreamSpec):
        self.spec, self.next_batch = spec, spec.start_batch

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.spec.seed, index, self.spec.rank])

    def batch(self, index: int):
        raise NotImplementedError

    def __iter__(self):
        # Run to the end of the current epoch, starting wherever the last pass (or the checkpoint) left off.
        per_epoch = self.spec.batches_per_epoch
        epoch_end = (self.next_batch // per_epoch + 1) * per_epoch
        while self.next_batch < epoch_end:
            index = self.next_batch
            self.next_batch += 1
            yield self.batch(index)

    def __len__(self) -> int:
        # The whole epoch even when resuming mid-way: Lightning restores its count of the epoch's batches from
        # the checkpoint and ends the epoch when that count reaches len() (a shorter len() would end it early
        # or, below val_check_interval, fail the resume outright).
        return self.spec.batches_per_epoch
