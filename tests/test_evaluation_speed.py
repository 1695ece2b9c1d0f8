import numpy as np
import pytest

from lmpipe.evaluation.speed import measure, ort_step, torch_threads


class CountingStep:
    """A step function over a fixed-logit model that records the shapes it was called with."""

    def __init__(self, vocab: int):
        self.vocab, self.calls = vocab, []

    def __call__(self, ids, positions, past):
        assert ids.dtype == np.int64 and ids.shape == positions.shape
        if past is None:
            assert ids.min() >= 8  # prompts avoid the reserved special-token ids
        past_len = 0 if past is None else past
        self.calls.append((ids.shape, past_len))
        return np.zeros((*ids.shape, self.vocab), dtype=np.float32), past_len + ids.shape[1]


def test_measure_decodes_at_batch_1_and_8_and_times_the_prefill():
    step = CountingStep(vocab=50)
    result = measure(step, vocab=50, block_size=48, prompt_tokens=32, new_tokens=20, repeats=3)
    assert set(result) == {
        "decode_tok_s_b1",
        "decode_tok_s_b8",
        "prefill_ms_p50",
        "prefill_ms_p95",
        "prefill_tokens",
    }
    assert result["prefill_tokens"] == 28  # the prompt shrinks so that the new tokens fit in the block
    assert all(result[k] > 0 for k in result)
    assert result["prefill_ms_p50"] <= result["prefill_ms_p95"]
    # warm-up (prefill + 2 steps), batch 1 and 8 (prefill + 20 steps each), then 3 timed prefills
    assert len(step.calls) == 3 + 2 * 21 + 3
    decode = [c for c in step.calls if c[0][1] == 1]
    assert {shape[0] for shape, _ in decode} == {1, 8} and max(p for _, p in decode) == 28 + 19


def test_torch_threads_are_set_for_the_block_and_restored():
    import torch

    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):  # 0 leaves them as they are
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError
    assert torch.get_num_threads() == before


def test_ort_step_feeds_a_full_attention_mask_over_past_and_new_tokens():
    seen = []

    class Engine:
        def forward(self, ids, positions, mask, past):
            seen.append(mask.shape)
            return np.zeros((*ids.shape, 4), dtype=np.float32), [(np.zeros((1, 1, 5 + ids.shape[1], 2)),) * 2]

    step = ort_step(Engine())
    step(np.zeros((2, 3), dtype=np.int64), np.zeros((2, 3), dtype=np.int64), None)
    step(np.zeros((2, 1), dtype=np.int64), np.zeros((2, 1), dtype=np.int64), [(np.zeros((2, 1, 5, 2)),) * 2])
    assert seen == [(2, 3), (2, 6)]
