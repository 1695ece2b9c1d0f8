"""One resumable stream of training batches, for every stage (no Lightning here: evaluation code shares it).

A stream's batch `b` on rank `r` is a pure function of (seed, b, r), so a run killed at step N and resumed from
its checkpoint, which records how many batches were consumed, sees exactly the batches an uninterrupted run
would have seen. A stage's stream implements `batch(index)`; the epoch logic lives here once.
"""

from __future__ import annotations

from torch.utils.data import IterableDataset


class BatchStream(IterableDataset):
    """Whole batches, batch `index` a pure function of (seed, index, rank) given by `batch`; one pass is one epoch
    of `batches_per_epoch`, starting at `start_batch` (where a resumed run's checkpoint left off)."""

    def __init__(self, batches_per_epoch: int, start_batch: int = 0, rank: int = 0):
        self.batches_per_epoch, self.next_batch, self.rank = batches_per_epoch, start_batch, rank

    def batch(self, index: int):
        raise NotImplementedError

    def __iter__(self):
        # Run to the end of the current epoch, starting wherever the last pass (or the checkpoint) left off.
        epoch_end = (self.next_batch // self.batches_per_epoch + 1) * self.batches_per_epoch
        while self.next_batch < epoch_end:
            index = self.next_batch
            self.next_batch += 1
            yield self.batch(index)

    def __len__(self) -> int:
        # The whole epoch even when resuming mid-way: Lightning restores its count of the epoch's batches from
        # the checkpoint and ends the epoch when that count reaches len() (a shorter len() would end it early
        # or, below val_check_interval, fail the resume outright).
        return self.batches_per_epoch
