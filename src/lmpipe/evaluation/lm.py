"""Language-model metrics: perplexity, bits per byte, and the summed NLL of a causal model over a token array.

Every scorer here (and `KneserNeyLM.nll`) predicts the same tokens of a flat array: all but the first, which
has no context. Each returns (total_nats, n_predicted) with n_predicted == len(tokens) - 1, so totals from
different models over the same array are directly comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from lmpipe.errors import LmpipeError


def perplexity(total_nats: float, n: int) -> float:
    """exp(mean NLL): the effective number of equally likely choices per predicted token."""
    if n <= 0:
        raise LmpipeError(f"n={n}: expected a positive number of predicted tokens")
    return math.exp(total_nats / n)


def bits_per_byte(total_nats: float, n_bytes: int) -> float:
    """Total NLL converted to bits and spread over the UTF-8 bytes of the text: comparable across tokenizers."""
    if n_bytes <= 0:
        raise LmpipeError(f"n_bytes={n_bytes}: expected a positive number of bytes")
    return total_nats / (math.log(2) * n_bytes)


def _windows(n_tokens: int, block_size: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Yield (start, n_inputs, n_scored) for windows covering targets 1..n_tokens-1 exactly once.

    A window feeds tokens[start : start + n_inputs] and predicts tokens[start + 1 : start + n_inputs + 1];
    only its last n_scored predictions count. The first window scores all block_size predictions; each later
    one re-reads block_size - stride already scored tokens as context and scores up to `stride` new ones, so
    only the tail window is shorter than block_size.
    """
    end = 1  # tokens[1:end] are already scored
    while end < n_tokens:
        new_end = min(end + stride if end > 1 else 1 + block_size, n_tokens)
        start = max(0, end - 1 - (block_size - stride))
        yield start, new_end - 1 - start, new_end - end
        end = new_end


def model_nll(
    model,
    tokens: np.ndarray,
    block_size: int,
    batch_size: int = 16,
    device: str = "cpu",
    stride: int | None = None,
) -> tuple[float, int]:
    """Summed NLL in nats of tokens[1:] under a causal LM, and the number of tokens scored (len - 1).

    `model(idx)` with idx (B, T) int64 on `device` must return an object whose `.logits` is (B, T, V); the
    model must already be on `device`. With stride None the array is cut into non-overlapping windows of
    block_size + 1 tokens (each window's first token is the previous one's last target), so every prediction
    costs one position but the context grows from 0 to block_size - 1 within each window. A stride below
    block_size slides block_size-long windows by `stride` and scores only their last `stride` positions (the
    tail window is shorter but keeps the same context): each token after the first block then sees at least
    block_size - stride tokens of context (a lower, fairer NLL for a model trained on full blocks) at about
    block_size / stride times the compute. Either way each token is scored
    exactly once. Logits are reduced in at least float32 and summed in float64.
    """
    import torch
    import torch.nn.functional as F

    if block_size < 1:
        raise LmpipeError(f"block_size={block_size}: expected a positive context length")
    if batch_size < 1:
        raise LmpipeError(f"batch_size={batch_size}: expected a positive number of windows per batch")
    stride = block_size if stride is None else stride
    if not 1 <= stride <= block_size:
        raise LmpipeError(f"stride={stride}: expected 1..block_size ({block_size}), or None")
    if np.ndim(tokens) != 1 or len(tokens) < 2:
        raise LmpipeError(
            f"tokens: expected a 1-D array of at least 2 token ids, got shape {np.shape(tokens)}"
        )

    def score(batch: list[tuple[int, int, int]]) -> float:
        n_inputs = batch[0][1]
        ids = np.stack([np.asarray(tokens[s : s + n_inputs + 1], dtype=np.int64) for s, _, _ in batch])
        idx = torch.from_numpy(ids[:, :-1]).to(device)
        targets = torch.from_numpy(ids[:, 1:]).to(device)
        logits = model(idx).logits
        if logits.ndim != 3 or tuple(logits.shape[:2]) != tuple(idx.shape):
            raise LmpipeError(f"model: logits have shape {tuple(logits.shape)}, expected {(*idx.shape, 'V')}")
        if int(ids.max()) >= logits.shape[-1]:
            raise LmpipeError(
                f"tokens: id {int(ids.max())} is outside the model's vocab of {logits.shape[-1]}"
            )
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(idx.shape)
        n_scored = torch.tensor([k for _, _, k in batch], device=nll.device)
        scored = torch.arange(n_inputs, device=nll.device)[None, :] >= (n_inputs - n_scored)[:, None]
        return float(nll.double()[scored].sum())

    was_training = model.training
    model.eval()
    total, n_predicted = 0.0, 0
    try:
        with torch.no_grad():
            batch: list[tuple[int, int, int]] = []
            # Batch consecutive windows of equal length: all but the tail hold block_size inputs.
            for window in _windows(len(tokens), block_size, stride):
                if batch and (len(batch) == batch_size or batch[0][1] != window[1]):
                    total += score(batch)
                    batch = []
                batch.append(window)
                n_predicted += window[2]
            total += score(batch)
    finally:
        model.train(was_training)
    return total, n_predicted
