"""A `Scorer` over an ONNX export, so evaluation can score the exported model exactly as it scores PyTorch's."""

from __future__ import annotations

import numpy as np

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.scoring import Scorer
from lmpipe.inference.engine import OrtEngine, Past
from lmpipe.inference.sampling import GenerationParams


class OrtScorer(Scorer):
    """`Scorer`'s two primitives on an `OrtEngine`; the past is the engine's list of numpy (key, value)."""

    def __init__(self, engine: OrtEngine):
        super().__init__(engine.tokenizer, engine.template, engine.block_size)
        self.engine = engine

    def _forward(self, ids: np.ndarray, past: Past | None) -> tuple[np.ndarray, Past]:
        batch, new = ids.shape
        past_len = 0 if past is None else past[0][0].shape[2]
        positions = np.broadcast_to(np.arange(past_len, past_len + new), (batch, new))
        # All ones: Scorer's batches are right-padded continuations of a shared prompt, and causal attention
        # keeps padding after a row's real tokens from reaching them.
        mask = np.ones((batch, past_len + new), dtype=np.int64)
        return self.engine.forward(ids, positions, mask, past)

    def _expand_past(self, past: Past, n: int) -> Past:
        # ONNX Runtime needs contiguous inputs, so a broadcast view would be copied anyway.
        return [(np.repeat(k, n, axis=0), np.repeat(v, n, axis=0)) for k, v in past]

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """`Scorer.generate`'s greedy answers, `max_batch` prompts at a time through the engine's batched
        decoding (left-padded and masked): one step per token for the batch instead of for every prompt.
        Prompts of similar length go together, so little of each batch is padding."""
        if max_new_tokens < 1:
            raise LmpipeError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        # The engine also needs room for the token generated last, one more than Scorer.generate asks.
        ids = [self._prompt_ids(prompt, max_new_tokens) for prompt in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        greedy = GenerationParams(max_new_tokens=max_new_tokens)  # temperature 0, stops at END and EOT
        answers: list[str] = [""] * len(ids)
        for start in range(0, len(order), self.max_batch):
            rows = order[start : start + self.max_batch]
            for i, tokens in zip(rows, self.engine.generate_ids([ids[i] for i in rows], greedy), strict=True):
                answers[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return answers


class OrtLanguageModel:
    """An ONNX export seen through the small interface `lmpipe.evaluation.lm.model_nll` and the report use:
    `model(idx).logits` (torch tensors in and out), `eval()`/`train()`, `config.block_size`, `num_parameters()`."""

    training = False

    def __init__(self, engine: OrtEngine):
        from types import SimpleNamespace

        self.engine = engine
        self.config = SimpleNamespace(block_size=engine.block_size)

    def __call__(self, idx):
        import torch

        ids = idx.cpu().numpy().astype(np.int64)
        batch, length = ids.shape
        positions = np.broadcast_to(np.arange(length), (batch, length))
        logits, _ = self.engine.forward(ids, positions, np.ones((batch, length), dtype=np.int64))
        return _Output(torch.from_numpy(logits))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def num_parameters(self) -> int:
        return int(self.engine.config.get("parameters", 0))


class _Output:
    def __init__(self, logits):
        self.logits = logits
