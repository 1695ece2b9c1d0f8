"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling, in numpy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lmpipe.errors import LmpipeError


@dataclass
class GenerationParams:
    max_new_tokens: int = 64
    """Most tokens generated per prompt (the closing <|end|> not counted)."""
    temperature: float = 0.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: int = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: float = 1.0
    """Sample only among the most likely tokens whose probabilities add up to top_p (nucleus); 1 = no limit."""
    stop: list[str] = field(default_factory=list)
    """Stop sequences: generation ends when the text contains one, and the text is cut before it."""
    seed: int | None = None
    """Seed of the sampling random generator (same seed, same prompts: same output); None = fresh entropy."""

    def __post_init__(self):
        if _not_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise LmpipeError(f"max_new_tokens={self.max_new_tokens!r}: expected an integer >= 1")
        if not _is_number(self.temperature) or not 0 <= self.temperature < math.inf:
            raise LmpipeError(f"temperature={self.temperature!r}: expected a finite number >= 0 (0 = greedy)")
        if _not_int(self.top_k) or self.top_k < 0:
            raise LmpipeError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 = off)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise LmpipeError(f"top_p={self.top_p!r}: expected a number in (0, 1]")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise LmpipeError(f"stop={self.stop!r}: expected a list of non-empty strings")
        self.stop = list(self.stop)
        if self.seed is not None and (_not_int(self.seed) or self.seed < 0):
            raise LmpipeError(f"seed={self.seed!r}: expected an integer >= 0 or None")


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int | np.integer)


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float | np.integer | np.floating)


def sample_next(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> np.ndarray:
    """The next token id (B,) int64 for each row of logits (B, V).

    temperature 0 is greedy (top_k and top_p are then irrelevant). Otherwise the logits are divided by the
    temperature, cut to the top_k largest (ties with the k-th kept), turned into probabilities, cut to the
    nucleus (the most likely tokens until their cumulative probability reaches top_p; always at least one),
    and one token per row is drawn with `rng`.
    """
    if params.temperature == 0:
        return logits.argmax(axis=-1).astype(np.int64)
    # float64: at low temperature, exp of float32 logits overflows or underflows to all zeros.
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth = np.partition(scaled, -params.top_k, axis=-1)[:, -params.top_k, None]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    if params.top_p < 1:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        # A token stays if the more likely tokens before it have not yet reached top_p: the first always does.
        keep_sorted = np.cumsum(sorted_probs, axis=-1) - sorted_probs < params.top_p
        keep = np.empty_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
    # Inverse CDF: the first token whose cumulative (unnormalised) probability exceeds a uniform draw.
    cdf = np.cumsum(probs, axis=-1)
    draw = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draw).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)
