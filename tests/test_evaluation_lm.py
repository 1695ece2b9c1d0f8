import math
from typing import NamedTuple

import numpy as np
import pytest
import torch
from torch import nn

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.lm import bits_per_byte, model_nll, perplexity
from lmpipe.evaluation.ngram import KneserNeyLM


class Output(NamedTuple):
    """Same duck type as lmpipe.model's GPTOutput: only .logits is read."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    past_kv: object = None
    hidden: torch.Tensor | None = None


class UniformLM(nn.Module):
    """All-zero logits: every token has probability 1/V whatever the context."""

    def __init__(self, vocab: int, dtype=torch.float64):
        super().__init__()
        self.vocab, self.dtype = vocab, dtype
        self.calls: list[tuple[int, int]] = []
        self.seen_modes: list[tuple[bool, bool]] = []

    def forward(self, idx):
        self.calls.append(tuple(idx.shape))
        self.seen_modes.append((self.training, torch.is_grad_enabled()))
        return Output(torch.zeros(*idx.shape, self.vocab, dtype=self.dtype))


class BigramLM(nn.Module):
    """Logits depend only on the current input token, so a token's NLL is the same in any window."""

    def __init__(self, vocab: int, seed: int):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)))

    def forward(self, idx):
        return Output(self.table[idx])


class CopyLM(nn.Module):
    """Confidently predicts the token `lag` positions back once it has that much context, else uniform."""

    def __init__(self, vocab: int, lag: int, confidence: float):
        super().__init__()
        self.vocab, self.lag, self.confidence = vocab, lag, confidence

    def forward(self, idx):
        logits = torch.zeros(*idx.shape, self.vocab, dtype=torch.float64)
        # Position t predicts token t+1, which in a period-`lag` stream equals the input at t+1-lag.
        src = idx[:, : idx.shape[1] - self.lag + 1]
        logits[:, self.lag - 1 :].scatter_(-1, src.unsqueeze(-1), self.confidence)
        return Output(logits)


def test_perplexity_and_bits_per_byte_formulas():
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0, rel=1e-12)
    assert perplexity(0.0, 3) == 1.0
    assert bits_per_byte(12 * math.log(2), 4) == pytest.approx(3.0, rel=1e-12)
    assert bits_per_byte(5.0, 2) == pytest.approx(5.0 / (2 * math.log(2)), rel=1e-12)
    with pytest.raises(LmpipeError, match="n=0"):
        perplexity(1.0, 0)
    with pytest.raises(LmpipeError, match="n_bytes=0"):
        bits_per_byte(1.0, 0)


@pytest.mark.parametrize("n_tokens", [2, 5, 9, 33, 50])
@pytest.mark.parametrize("stride", [None, 3])
def test_uniform_model_costs_log_vocab_per_predicted_token(n_tokens, stride):
    vocab = 11
    tokens = np.random.default_rng(n_tokens).integers(0, vocab, n_tokens).astype(np.uint16)
    total, n = model_nll(UniformLM(vocab), tokens, block_size=8, batch_size=3, stride=stride)
    assert n == n_tokens - 1
    assert total == pytest.approx((n_tokens - 1) * math.log(vocab), rel=1e-13)


def test_float32_logits_are_accurate_to_float32_precision():
    tokens = np.random.default_rng(0).integers(0, 50, 1000)
    total, n = model_nll(UniformLM(50, dtype=torch.float32), tokens, block_size=16)
    assert total == pytest.approx(999 * math.log(50), rel=1e-6)


def test_windows_cover_array_in_blocks_with_a_short_tail():
    model = UniformLM(5)
    model_nll(model, np.zeros(2 * 8 + 1 + 3, dtype=np.int64), block_size=8, batch_size=16)
    # 20 tokens: two full windows of 8 inputs (9 tokens, sharing an edge token), then a tail of 3 inputs.
    assert model.calls == [(2, 8), (1, 3)]


@pytest.mark.parametrize("n_tokens", [7, 40, 57])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_stride_scores_each_token_exactly_once(n_tokens, batch_size):
    vocab = 13
    tokens = np.random.default_rng(n_tokens).integers(0, vocab, n_tokens)
    model = BigramLM(vocab, seed=1)
    logp = torch.log_softmax(model.table.detach().double(), dim=-1).numpy()
    expected = -sum(logp[tokens[i - 1], tokens[i]] for i in range(1, n_tokens))
    for stride in (None, 1, 3, 8):
        total, n = model_nll(model, tokens, block_size=8, batch_size=batch_size, stride=stride)
        assert n == n_tokens - 1
        assert total == pytest.approx(expected, rel=1e-6), stride


def test_stride_gives_every_scored_token_more_context():
    vocab, lag, block, n_tokens = 7, 3, 8, 1 + 8 * 10
    tokens = np.tile(np.arange(lag), n_tokens)[:n_tokens]
    model = CopyLM(vocab, lag, confidence=20.0)
    unsure, sure = math.log(vocab), math.log1p((vocab - 1) * math.exp(-20.0))
    default_total, _ = model_nll(model, tokens, block_size=block)
    # Non-overlapping windows: the first lag-1 positions of each of the 10 windows lack context.
    assert default_total == pytest.approx(10 * ((lag - 1) * unsure + (block - lag + 1) * sure), rel=1e-12)
    strided_total, n = model_nll(model, tokens, block_size=block, stride=2)
    # Sliding windows: only the very first window's opening positions lack context.
    assert strided_total == pytest.approx((lag - 1) * unsure + (n - lag + 1) * sure, rel=1e-12)


def test_model_is_scored_in_eval_mode_without_grad_and_restored():
    model = UniformLM(5)
    model.train()
    model_nll(model, np.arange(20) % 5, block_size=4)
    assert set(model.seen_modes) == {(False, False)}
    assert model.training


def test_model_nll_and_kneser_ney_predict_the_same_tokens():
    tokens = np.random.default_rng(0).integers(0, 20, 257).astype(np.uint16)
    kn = KneserNeyLM().fit(np.random.default_rng(1).integers(0, 20, 2000), order=3, vocab_size=20)
    kn_total, kn_n = kn.nll(tokens)
    gpt_total, gpt_n = model_nll(UniformLM(20), tokens, block_size=16, stride=4)
    assert kn_n == gpt_n == len(tokens) - 1
    assert kn_total == pytest.approx(-kn.logprobs(tokens)[1:].sum())


def test_bad_arguments_raise_one_line_errors():
    tokens = np.arange(10) % 5
    with pytest.raises(LmpipeError, match="stride=9"):
        model_nll(UniformLM(5), tokens, block_size=8, stride=9)
    with pytest.raises(LmpipeError, match="at least 2"):
        model_nll(UniformLM(5), tokens[:1], block_size=8)
    with pytest.raises(LmpipeError, match="outside the model.s vocab of 5"):
        model_nll(UniformLM(5), np.arange(10), block_size=4)
