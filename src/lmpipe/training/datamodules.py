"""Token windows for language-model training, from the flat token shards the `tokenize` stage writes.

Training draws random windows: micro-batch number `b` on rank `r` is a pure function of (seed, b, r), so a run
killed at step N and resumed from its checkpoint sees exactly the batches an uninterrupted run would have seen
(the data module saves how many micro-batches were consumed; Lightning restores it before asking for the
loader). Validation uses fixed, contiguous windows so val loss is comparable across steps and runs.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lmpipe.errors import LmpipeError
from lmpipe.tokenizer import read_meta, read_shard


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


class RandomWindows(IterableDataset):
    """Yields whole micro-batches (x, y) of random windows; one pass = one epoch of `batches_per_epoch`."""

    def __init__(
        self,
        tokens_dir: Path,
        split: str,
        block_size: int,
        batch_size: int,
        seed: int,
        batches_per_epoch: int,
        start_batch: int = 0,
    ):
        self.tokens_dir, self.split = Path(tokens_dir), split
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.batches_per_epoch = batches_per_epoch
        self.next_batch = start_batch
        self._tokens: np.ndarray | None = None

    def batch(self, index: int, rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:  # opened lazily: each DDP process maps the file itself
            self._tokens = read_shard(self.tokens_dir, self.split)
        rng = np.random.default_rng([self.seed, index, rank])
        starts = rng.integers(0, len(self._tokens) - self.block_size - 1, size=self.batch_size)
        rows = np.stack([self._tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]

    def __iter__(self):
        # Run to the end of the current epoch, starting wherever the last pass (or the checkpoint) left off.
        rank = _rank()
        epoch_end = (self.next_batch // self.batches_per_epoch + 1) * self.batches_per_epoch
        while self.next_batch < epoch_end:
            index = self.next_batch
            self.next_batch += 1
            yield self.batch(index, rank)

    def __len__(self) -> int:
        # The whole epoch even when resuming mid-way: Lightning restores its count of the epoch's batches from
        # the checkpoint and ends the epoch when that count reaches len() (a shorter len() would end it early
        # or, below val_check_interval, fail the resume outright).
        return self.batches_per_epoch


class ContiguousWindows(Dataset):
    """Non-overlapping (x, y) windows covering a split in order (for validation and evaluation)."""

    def __init__(self, tokens: np.ndarray, block_size: int):
        self.tokens, self.block_size = tokens, block_size
        self.count = max(0, (len(tokens) - 1) // block_size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        start = i * self.block_size
        row = torch.from_numpy(self.tokens[start : start + self.block_size + 1].astype(np.int64))
        return row[:-1], row[1:]


class ResumableBatches:
    """Mixin for the data modules whose training batches are one deterministic stream from `self.seed`: every
    checkpoint records how many batches were consumed, and a resumed run starts the stream there
    (`self._start_batch`), so it sees the batches an uninterrupted run would have seen."""

    _start_batch: int = 0

    def _own_generator(self) -> torch.Generator:
        # Every iterator a DataLoader starts draws a base seed from its generator, by default the global torch
        # RNG that dropout uses. A resumed run starts iterators at other moments than an uninterrupted one
        # (Lightning skips the validation it finds already done), so those draws would shift the dropout
        # masks that the checkpointed RNG state is meant to reproduce; a loader-owned generator keeps the
        # global RNG for the model alone.
        return torch.Generator().manual_seed(self.seed)

    # Saved inside every Lightning checkpoint: how far through the batch stream training got.
    def state_dict(self) -> dict:
        consumed = self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0
        return {"consumed_batches": consumed}

    def load_state_dict(self, state: dict) -> None:
        self._start_batch = int(state.get("consumed_batches", 0))


class TokenDataModule(ResumableBatches, L.LightningDataModule):
    """Random training windows and fixed validation windows from `<tokens_dir>/{train,val}.bin`."""

    def __init__(self, tokens_dir: str | Path, block_size: int, batch_size: int, seed: int):
        super().__init__()
        self.tokens_dir = Path(tokens_dir)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.meta = read_meta(self.tokens_dir)
        self._start_batch = 0
        for split in ("train", "val"):
            n = len(read_shard(self.tokens_dir, split))
            if n <= block_size + 1:
                raise LmpipeError(
                    f"{self.tokens_dir / split}.bin: {n} tokens, fewer than one window of "
                    f"model.block_size+1={block_size + 1}; use more data or a smaller block_size"
                )

    def batches_per_epoch(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        n_train = len(read_shard(self.tokens_dir, "train"))
        return max(1, math.ceil(n_train / (self.batch_size * self.block_size * world)))

    def train_dataloader(self) -> DataLoader:
        dataset = RandomWindows(
            self.tokens_dir,
            "train",
            self.block_size,
            self.batch_size,
            self.seed,
            self.batches_per_epoch(),
            start_batch=self._start_batch,
        )
        return DataLoader(dataset, batch_size=None, generator=self._own_generator())

    def val_dataloader(self) -> DataLoader:
        dataset = ContiguousWindows(read_shard(self.tokens_dir, "val"), self.block_size)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=False, generator=self._own_generator())
