"""A `Scorer` over an ONNX export, so evaluation can score the exported model exactly as it scores PyTorch's."""

from __future__ import annotations

import numpy as np

from lmpipe.evaluation.scoring import Scorer
from lmpipe.inference.engine import OrtEngine, Past


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

    def _masked_forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Past | None
    ) -> tuple[np.ndarray, Past]:
        return self.engine.forward(ids, np.ascontiguousarray(positions), mask, past)

    def _select_past(self, past: Past, rows: np.ndarray) -> Past:
        return [(k[rows], v[rows]) for k, v in past]


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
