import torch
from torch.utils.data import DataLoader

from lmpipe.training.streams import BatchStream, StreamSpec


class Indices(BatchStream):
    """Batch `index` on rank `r` is the tensor [index, r]."""

    def batch(self, index: int) -> torch.Tensor:
        return torch.tensor([index, self.spec.rank])


def indices(stream) -> list[int]:
    return [int(b[0]) for b in stream]


def test_an_epoch_stops_at_its_boundary_and_the_next_continues():
    stream = Indices(StreamSpec(seed=0, batches_per_epoch=3))
    assert len(stream) == 3
    assert indices(stream) == [0, 1, 2] and indices(stream) == [3, 4, 5]


def test_a_resumed_stream_finishes_its_epoch_then_runs_whole_ones():
    # Resumed at batch 4 (mid-epoch 2): finish that epoch (4, 5), then a whole one (6, 7, 8).
    resumed = Indices(StreamSpec(seed=0, batches_per_epoch=3, start_batch=4, rank=1))
    assert len(resumed) == 3  # Lightning counts the epoch's batches itself, from the restored position
    rest = list(DataLoader(resumed, batch_size=None))
    assert [b.tolist() for b in rest] == [[4, 1], [5, 1]]
    assert indices(resumed) == [6, 7, 8]


def test_a_batch_draws_from_seed_index_and_rank():
    def draw(seed=0, index=0, rank=0):
        return Indices(StreamSpec(seed, 1, rank=rank)).rng(index).integers(1 << 30)

    assert draw() == draw()
    assert len({draw(), draw(seed=1), draw(index=1), draw(rank=1)}) == 4
