"""Choosing the next token from logits: greedy, temperature, top-k and nucleus (top-p) sampling, in numpy.

`GenerationParams` is where the sampling defaults live: the CLI, the batch stage, the server and the MLflow
pyfunc read theirs from `DEFAULTS`.
"""

from __future__ import annotations

from dataclasses import field
from typing import Annotated

import numpy as np
from pydantic import BeforeValidator, Field

from lmpipe.config import schema


def _stop_sequences(value):
    """A list (or tuple) of non-empty strings, as a list."""
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise ValueError("a list of non-empty strings")
    return value


@schema("")  # not a config section: errors name the bare field (`top_p=2.0: ...`)
class GenerationParams:
    max_new_tokens: Annotated[int, Field(ge=1)] = 64
    """Most tokens generated per prompt (the closing <|end|> not counted)."""
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 0.0
    """Softmax temperature; 0 picks the most likely token (greedy)."""
    top_k: Annotated[int, Field(ge=0)] = 0
    """Sample only among the k most likely tokens; 0 = no limit."""
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    """Sample only among the most likely tokens whose probabilities add up to top_p (nucleus); 1 = no limit."""
    stop: Annotated[list[str], BeforeValidator(_stop_sequences)] = field(default_factory=list)
    """Stop sequences: generation ends when the text contains one, and the text is cut before it."""
    seed: Annotated[int, Field(ge=0)] | None = None
    """Seed of the sampling random generator (same seed, same prompts: same output); None = fresh entropy."""


DEFAULTS = GenerationParams()
"""The sampling defaults, declared once (above)."""


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
        probs = np.stack([_nucleus(row, params.top_p) for row in probs])
    # Inverse CDF: the first token whose cumulative (unnormalised) probability exceeds a uniform draw.
    cdf = np.cumsum(probs, axis=-1)
    draw = rng.random(len(probs))[:, None] * cdf[:, -1:]
    return np.minimum((cdf <= draw).sum(axis=-1), probs.shape[-1] - 1).astype(np.int64)


NUCLEUS_CANDIDATES = 256
"""How many of the most likely tokens `_nucleus` sorts first; only a flat distribution needs the full sort."""


def _nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """One row of probabilities with every token outside the top_p nucleus set to 0.

    A token stays if the tokens ranked before it (by probability, ties by lower id) have not yet reached
    top_p: the first always does. Sorting the whole vocabulary cost ~1 ms a row, the largest per-token cost of
    a sampled request in the server, so only the tokens at least as likely as the NUCLEUS_CANDIDATES-th are
    ranked: they are exactly the first places of the full ranking (ties at the boundary all included), and their
    running sums are the same floating-point additions in the same order, so the kept set is the full sort's.
    Only when they do not reach top_p is the whole row ranked.
    """
    if len(probs) > NUCLEUS_CANDIDATES:
        threshold = np.partition(probs, -NUCLEUS_CANDIDATES)[-NUCLEUS_CANDIDATES]
        candidates = np.flatnonzero(probs >= threshold)
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
    else:
        order = np.argsort(-probs, kind="stable")
    keep = _kept(probs[order], top_p)
    if keep[-1] and len(order) < len(probs):  # the nucleus may reach past the candidates
        order = np.argsort(-probs, kind="stable")
        keep = _kept(probs[order], top_p)
    out = np.zeros_like(probs)
    out[order[keep]] = probs[order[keep]]
    return out


def _kept(ranked: np.ndarray, top_p: float) -> np.ndarray:
    """Which of the ranked probabilities stay: those whose predecessors have not yet reached top_p."""
    return np.cumsum(ranked) - ranked < top_p
