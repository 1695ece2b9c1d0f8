"""Token windows for language-model training, from the flat token shards the `tokenize` stage writes.

Training draws random windows: micro-batch number `b` on rank `r` is a pure function of (seed, b, r), so a run
killed at step N and resumed from its checkpoint sees exactly the batches an uninterrupted run would have seen
(the data module saves how many micro-batches were consumed; Lightning restores it before asking for the
loader). Validation uses fixed, contiguous windows so val loss is comparable across steps and runs.

`ResumableBatches` is that mechanism for any stage's data module; its batches come from a
`lmpipe.training.streams.BatchStream`.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lmpipe.errors import LmpipeError
from lmpipe.formats import shard_file
from lmpipe.tokenizer import read_meta, read_shard
from lmpipe.training.streams import BatchStream, StreamSpec


class RandomWindows(BatchStream):
    """Micro-batches (x, y) of random windows of a token shard."""

    def __init__(self, tokens_dir: Path, split: str, block_size: int, batch_size: int, spec: StreamSpec):
        super().__init__(spec)
        self.tokens_dir, self.split = Path(tokens_dir), split
        self.block_size, self.batch_size = block_size, batch_size
        self._tokens: np.ndarray | None = None

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tokens is None:  # opened lazily: each DDP process maps the file itself
            self._tokens = read_shard(self.tokens_dir, self.split)
        starts = self.rng(index).integers(0, len(self._tokens) - self.block_size - 1, size=self.batch_size)
        rows = np.stack([self._tokens[s : s + self.block_size + 1] for s in starts]).astype(np.int64)
        data = torch.from_numpy(rows)
        return data[:, :-1], data[:, 1:]


def check_shards(tokens_dir: Path, block_size: int, field: str) -> None:
    """Fail in one line unless the train and val shards each hold more than one window of `block_size` + 1
    tokens (`field` names the setting that chose block_size)."""
    for split in ("train", "val"):
        n = len(read_shard(tokens_dir, split))
        if n <= block_size + 1:
            raise LmpipeError(
                f"{tokens_dir / shard_file(split)}: {n} tokens, fewer than one window of "
                f"{field}+1={block_size + 1}; use more data or a smaller block_size"
            )


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

    @property
    def world_size(self) -> int:
        return self.trainer.world_size if self.trainer is not None else 1

    @property
    def rank(self) -> int:
        return self.trainer.global_rank if self.trainer is not None else 0

    def stream_spec(self, seed: int, batches_per_epoch: int) -> StreamSpec:
        """This process's training stream of `seed`, starting where the restored checkpoint left off."""
        return StreamSpec(seed, batches_per_epoch, self._start_batch, self.rank)

    def loader(self, dataset, **kwargs) -> DataLoader:
        """A loader of `dataset` (whole batches unless `kwargs` say otherwise) with its own generator."""
        return DataLoader(dataset, **({"batch_size": None} | kwargs), generator=self._own_generator())

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
        check_shards(self.tokens_dir, block_size, "model.block_size")

    def batches_per_epoch(self) -> int:
        n_train = len(read_shard(self.tokens_dir, "train"))
        return max(1, math.ceil(n_train / (self.batch_size * self.block_size * self.world_size)))

    def train_dataloader(self) -> DataLoader:
        spec = self.stream_spec(self.seed, self.batches_per_epoch())
        return self.loader(RandomWindows(self.tokens_dir, "train", self.block_size, self.batch_size, spec))

    def val_dataloader(self) -> DataLoader:
        dataset = ContiguousWindows(read_shard(self.tokens_dir, "val"), self.block_size)
        return self.loader(dataset, batch_size=self.batch_size, shuffle=False)
