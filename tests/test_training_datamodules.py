from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lmpipe.errors import LmpipeError
from lmpipe.tokenizer import load_tokenizer, read_shard, write_shards
from lmpipe.training.datamodules import ContiguousWindows, RandomWindows, TokenDataModule
from lmpipe.training.streams import StreamSpec

BLOCK, BATCH = 16, 4


def windows(tokens_dir, seed=7, batches_per_epoch=5, rank=0) -> RandomWindows:
    return RandomWindows(tokens_dir, "train", BLOCK, BATCH, StreamSpec(seed, batches_per_epoch, rank=rank))


def test_random_batch_is_a_pure_function_of_seed_index_and_rank(tiny_tokens):
    x, y = windows(tiny_tokens).batch(3)
    again_x, again_y = windows(tiny_tokens).batch(3)  # a fresh dataset, as after a restart
    assert torch.equal(x, again_x) and torch.equal(y, again_y)
    assert x.shape == y.shape == (BATCH, BLOCK) and x.dtype == torch.int64
    for other in (
        windows(tiny_tokens).batch(4),
        windows(tiny_tokens, rank=1).batch(3),
        windows(tiny_tokens, seed=8).batch(3),
    ):
        assert not torch.equal(x, other[0])


def test_random_windows_are_slices_of_the_shard_with_targets_shifted_by_one(tiny_tokens):
    tokens = np.asarray(read_shard(tiny_tokens, "train")).astype(np.int64)
    every_window = np.lib.stride_tricks.sliding_window_view(tokens, BLOCK + 1)
    dataset = windows(tiny_tokens)
    for index in range(3):
        x, y = dataset.batch(index)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x[:, :1], y], dim=1).numpy():
            assert (every_window == row).all(axis=1).any(), "window not found in the shard"


def test_contiguous_windows_cover_the_split_in_order():
    tokens = np.arange(100, dtype=np.uint16)
    dataset = ContiguousWindows(tokens, BLOCK)
    assert len(dataset) == (100 - 1) // BLOCK == 6
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    assert torch.equal(torch.cat(xs), torch.arange(96))
    assert torch.equal(torch.cat(ys), torch.arange(1, 97))
    assert len(ContiguousWindows(np.arange(BLOCK, dtype=np.uint16), BLOCK)) == 0  # no room for a target


def test_val_loader_walks_the_val_shard_in_order(tiny_tokens):
    dm = TokenDataModule(tiny_tokens, BLOCK, BATCH, seed=1)
    val = np.asarray(read_shard(tiny_tokens, "val")).astype(np.int64)
    x = torch.cat([xb for xb, _ in dm.val_dataloader()]).flatten()
    assert len(x) == (len(val) - 1) // BLOCK * BLOCK
    assert torch.equal(x, torch.from_numpy(val[: len(x)]))


def test_state_dict_round_trip_resumes_the_window_stream(tiny_tokens):
    trainer = SimpleNamespace(global_step=7, accumulate_grad_batches=2, world_size=1, global_rank=0)
    dm = TokenDataModule(tiny_tokens, BLOCK, BATCH, seed=3)
    assert dm.state_dict() == {"consumed_batches": 0}  # not attached to a trainer yet
    dm.trainer = trainer
    uninterrupted = [x for x, _ in dm.train_dataloader()]
    state = dm.state_dict()
    assert state == {"consumed_batches": 14}

    restored = TokenDataModule(tiny_tokens, BLOCK, BATCH, seed=3)
    restored.trainer = trainer
    restored.load_state_dict(state)
    resumed = [x for x, _ in restored.train_dataloader()]
    assert len(resumed) == len(uninterrupted) - 14
    assert all(torch.equal(a, b) for a, b in zip(resumed, uninterrupted[14:], strict=True))


def test_loaders_leave_the_global_rng_to_the_model(tiny_tokens):
    # Dropout draws from the global torch RNG, whose state checkpoints carry; starting a loader must not.
    dm = TokenDataModule(tiny_tokens, BLOCK, BATCH, seed=3)
    before = torch.get_rng_state()
    iter(dm.train_dataloader())
    iter(dm.val_dataloader())
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_shard_shorter_than_one_window_names_the_file(tmp_path, tiny_tokens, split):
    tok = load_tokenizer(tiny_tokens / "tokenizer.json")
    long, short = "x" * 200, "tiny"
    write_shards(
        tmp_path / "tokens", {"train": [long], "val": [long], split: [short]}, tok, show_progress=False
    )
    with pytest.raises(LmpipeError, match=rf"{split}\.bin: 5 tokens.*block_size\+1={BLOCK + 1}"):
        TokenDataModule(tmp_path / "tokens", BLOCK, BATCH, seed=0)
