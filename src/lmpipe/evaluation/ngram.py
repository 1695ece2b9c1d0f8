"""Interpolated Kneser-Ney n-gram language model over token ids: the baseline a trained GPT has to beat.

For order n, a token w after the context h (its n-1 predecessors) gets

    P_k(w | h) = (max(c_k(h w) - D_k, 0) + D_k * N1+(h .) * P_{k-1}(w | h')) / sum_x c_k(h x)

where h' drops the oldest token of h, N1+(h .) is the number of distinct tokens seen after h, and D_k is the
order's absolute discount. The highest order counts n-gram occurrences; every lower order counts how many
distinct tokens precede the k-gram (its continuation count), which is what makes it Kneser-Ney: a lower order
is only consulted as the backoff, so it should model how readily a token follows *new* contexts. Below order 1
sits the uniform distribution 1/vocab_size, so every token id, seen or not, has non-zero probability. A
context never seen at order k backs off fully: P_k(w | h) = P_{k-1}(w | h').

Token streams are flat arrays of documents separated by an end-of-text id. That id is treated as an ordinary
token and n-grams run across it, so "end of document" is context for the next document's first tokens, the
same flat stream the GPT is trained and scored on. Tokens near the start of an array have fewer than n-1
predecessors and use the highest order their context allows.

Everything is vectorised with numpy: a k-gram is packed into one int64 key (ceil(log2(vocab_size)) bits per
token), counted with `np.unique` and looked up with `np.searchsorted`, one pass per order over all positions.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from lmpipe.errors import LmpipeError

KEY_BITS = 63
"""Bits available in a packed n-gram key: an int64 without its sign bit."""

SCORE_CHUNK = 1 << 22
"""Tokens scored per pass by `KneserNeyLM.nll`: longer arrays are scored chunk by chunk (each with the context
its first tokens need), so scoring memory stays bounded whatever the split's length."""

_FALLBACK_DISCOUNT = 0.5
"""Discount used when an order has no singletons (tiny data), where n1/(n1 + 2*n2) would be 0 and leave no
probability mass for unseen tokens."""


@dataclass(frozen=True)
class _OrderTable:
    """Counts of one order k, sorted by packed key so lookups are binary searches."""

    gram_keys: np.ndarray
    """Sorted distinct k-gram keys."""
    gram_counts: np.ndarray
    """Count of each k-gram (occurrences at the highest order, continuation counts below), float64."""
    ctx_keys: np.ndarray
    """Sorted distinct (k-1)-token context keys (a single key 0, the empty context, at order 1)."""
    ctx_totals: np.ndarray
    """Sum of gram_counts over each context's k-grams: the denominator of P_k(. | h)."""
    ctx_types: np.ndarray
    """Number of distinct tokens seen after each context: N1+(h .)."""
    discount: float
    """Absolute discount D_k subtracted from every k-gram count."""


def bits_per_token(vocab_size: int) -> int:
    """Bits needed to pack one token id below `vocab_size` into an n-gram key."""
    return max(1, (vocab_size - 1).bit_length())


def max_order(vocab_size: int) -> int:
    """Highest n-gram order whose packed key fits in 63 bits for this vocabulary."""
    return KEY_BITS // bits_per_token(vocab_size)


def _gram_keys(tokens: np.ndarray, k: int, bits: int) -> np.ndarray:
    """Packed keys of every k-gram in `tokens` (int64), one per start position 0..len-k, oldest token highest."""
    n = len(tokens) - k + 1
    keys = tokens[:n].copy()
    for j in range(1, k):
        keys <<= bits
        keys |= tokens[j : j + n]
    return keys


def _estimate_discount(counts: np.ndarray) -> float:
    """D = n1 / (n1 + 2 n2) from the number of k-grams counted once (n1) and twice (n2)."""
    n1 = int(np.count_nonzero(counts == 1))
    n2 = int(np.count_nonzero(counts == 2))
    if n1 == 0:
        return _FALLBACK_DISCOUNT
    return n1 / (n1 + 2 * n2)


def _build_table(gram_keys: np.ndarray, counts: np.ndarray, bits: int, discount: float | None) -> _OrderTable:
    """Group sorted k-gram counts by context (the key without its last token)."""
    counts = counts.astype(np.float64)
    ctx = gram_keys >> bits  # sorted, because the context is the key's high bits
    starts = np.flatnonzero(np.concatenate(([True], ctx[1:] != ctx[:-1])))
    return _OrderTable(
        gram_keys=gram_keys,
        gram_counts=counts,
        ctx_keys=ctx[starts],
        ctx_totals=np.add.reduceat(counts, starts),
        ctx_types=np.diff(np.append(starts, len(ctx))).astype(np.float64),
        discount=_estimate_discount(counts) if discount is None else discount,
    )


def _lookup(sorted_keys: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each query in `sorted_keys` (clipped to a valid index) and whether it is really there."""
    idx = np.minimum(np.searchsorted(sorted_keys, queries), len(sorted_keys) - 1)
    return idx, sorted_keys[idx] == queries


def _interpolate(
    table: _OrderTable, ctx_keys: np.ndarray, gram_keys: np.ndarray, lower: np.ndarray
) -> np.ndarray:
    """P_k for each (context, k-gram) pair, given P_{k-1} of the same token under the shortened context."""
    ci, ctx_seen = _lookup(table.ctx_keys, ctx_keys)
    gi, gram_seen = _lookup(table.gram_keys, gram_keys)
    count = np.where(gram_seen, table.gram_counts[gi], 0.0)
    d = table.discount
    p = (np.maximum(count - d, 0.0) + d * table.ctx_types[ci] * lower) / table.ctx_totals[ci]
    return np.where(ctx_seen, p, lower)


def _as_tokens(tokens, name: str, vocab_size: int, min_len: int) -> np.ndarray:
    """Validate a 1-D array of token ids below `vocab_size` and return it as int64."""
    arr = np.asarray(tokens)
    if arr.ndim != 1 or (arr.size and arr.dtype.kind not in "iu"):
        raise LmpipeError(
            f"{name}: expected a 1-D integer array of token ids, got shape {arr.shape} {arr.dtype}"
        )
    if len(arr) < min_len:
        raise LmpipeError(f"{name}: has {len(arr)} tokens, expected at least {min_len}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise LmpipeError(
            f"{name}: token ids span [{arr.min()}, {arr.max()}], expected ids in [0, {vocab_size - 1}]"
        )
    return arr


class KneserNeyLM:
    """Interpolated Kneser-Ney n-gram model; `fit` it on a token array, then score arrays with `nll`."""

    def __init__(self) -> None:
        self.order: int = 0
        self.vocab_size: int = 0
        self._bits: int = 0
        self._tables: list[_OrderTable] = []

    @property
    def discounts(self) -> tuple[float, ...]:
        """Discount D_k of each order, index 0 being order 1."""
        return tuple(t.discount for t in self._tables)

    def fit(
        self, tokens: np.ndarray, order: int, vocab_size: int, discount: float | None = None
    ) -> KneserNeyLM:
        """Count all 1..order-grams of `tokens`; `discount` None estimates D = n1/(n1 + 2 n2) per order."""
        if vocab_size < 1:
            raise LmpipeError(f"vocab_size={vocab_size}: expected a positive number of token ids")
        if not 1 <= order <= max_order(vocab_size):
            raise LmpipeError(
                f"order={order}: expected 1..{max_order(vocab_size)} for vocab_size={vocab_size} "
                f"({bits_per_token(vocab_size)} bits per token, n-gram keys hold {KEY_BITS} bits); "
                "use a lower order"
            )
        if discount is not None and not 0.0 < discount <= 1.0:
            raise LmpipeError(f"discount={discount}: expected a value in (0, 1], or None to estimate it")
        tokens = _as_tokens(tokens, "tokens", vocab_size, min_len=order)
        bits = bits_per_token(vocab_size)

        tables: list[_OrderTable] = []
        keys, counts = np.unique(_gram_keys(tokens, order, bits), return_counts=True)
        tables.append(_build_table(keys, counts, bits, discount))
        for k in range(order - 1, 0, -1):
            # Continuation count of a k-gram g: distinct tokens x with "x g" anywhere in the data, i.e. the
            # number of distinct (k+1)-grams whose last k tokens are g.
            longer = np.unique(_gram_keys(tokens, k + 1, bits))
            keys, counts = np.unique(longer & ((1 << (k * bits)) - 1), return_counts=True)
            tables.append(_build_table(keys, counts, bits, discount))
        tables.reverse()

        self.order, self.vocab_size, self._bits, self._tables = order, vocab_size, bits, tables
        return self

    def _check_fitted(self) -> None:
        if not self._tables:
            raise LmpipeError("KneserNeyLM: call fit(tokens, order, vocab_size) before scoring")

    def logprobs(self, tokens: np.ndarray) -> np.ndarray:
        """Natural-log probability of every token given up to order-1 predecessors in the same array.

        Entry 0 has no context (the order-1 distribution); entry i < order-1 uses its i predecessors.
        """
        self._check_fitted()
        tokens = _as_tokens(tokens, "tokens", self.vocab_size, min_len=0)
        p = np.full(len(tokens), 1.0 / self.vocab_size)
        for k, table in enumerate(self._tables, start=1):
            if len(tokens) < k:
                break
            grams = _gram_keys(tokens, k, self._bits)  # gram j ends at position j + k - 1
            p[k - 1 :] = _interpolate(table, grams >> self._bits, grams, p[k - 1 :])
        return np.log(p)

    def nll(self, tokens: np.ndarray) -> tuple[float, int]:
        """Total negative log-likelihood in nats of tokens[1:] and how many tokens that is (len - 1).

        The first token is not scored, exactly as in `lmpipe.evaluation.lm.model_nll`, so the two models are
        compared on the same set of predicted tokens.
        """
        if len(tokens) < 2:
            raise LmpipeError(f"tokens: has {len(tokens)} tokens, expected at least 2 to score")
        if len(tokens) <= SCORE_CHUNK:
            lp = self.logprobs(tokens)
            return float(-lp[1:].sum()), len(lp) - 1
        self._check_fitted()
        total = 0.0
        for start in range(0, len(tokens), SCORE_CHUNK):
            context = max(0, start - (self.order - 1))
            lp = self.logprobs(tokens[context : start + SCORE_CHUNK])[start - context :]
            total -= float(lp[1:].sum() if start == 0 else lp.sum())
        return total, len(tokens) - 1

    def prob_table(self, context: Iterable[int]) -> np.ndarray:
        """Full distribution over the vocabulary after `context` (only its last order-1 tokens matter)."""
        self._check_fitted()
        ctx = _as_tokens(np.asarray(list(context), dtype=np.int64), "context", self.vocab_size, min_len=0)
        ctx = ctx[max(0, len(ctx) - (self.order - 1)) :]
        vocab = np.arange(self.vocab_size, dtype=np.int64)
        p = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for k in range(1, len(ctx) + 2):
            h = ctx[len(ctx) - (k - 1) :]
            h_key = 0
            for token in h:
                h_key = (h_key << self._bits) | int(token)
            grams = (h_key << self._bits) | vocab
            p = _interpolate(self._tables[k - 1], np.full(self.vocab_size, h_key), grams, p)
        return p


def spread_sample(tokens: np.ndarray, max_tokens: int, slices: int = 64) -> np.ndarray:
    """`tokens` itself if it holds at most `max_tokens`, else `slices` contiguous runs of max_tokens // slices
    tokens, evenly spaced over it and concatenated (of a memmap, only those pages are read)."""
    if max_tokens < 1:
        raise LmpipeError(f"max_tokens={max_tokens}: expected at least 1")
    if len(tokens) <= max_tokens:
        return tokens
    slices = min(slices, max_tokens)
    run = max_tokens // slices
    starts = np.linspace(0, len(tokens) - run, slices).astype(np.int64)
    return np.concatenate([np.asarray(tokens[s : s + run]) for s in starts])


def select_order(
    train: np.ndarray,
    val: np.ndarray,
    orders: Iterable[int] = (3, 4, 5),
    *,
    vocab_size: int,
    discount: float | None = None,
) -> tuple[int, dict[int, float]]:
    """Fit one model per order on `train` and return the order with the lowest `val` perplexity (ties go to
    the lower order) together with every order's validation perplexity."""
    from lmpipe.evaluation.lm import perplexity

    orders = list(orders)
    if not orders:
        raise LmpipeError("orders: expected at least one n-gram order to try")
    ppl: dict[int, float] = {}
    for order in orders:
        model = KneserNeyLM().fit(train, order, vocab_size, discount)
        ppl[order] = perplexity(*model.nll(val))
    best = min(ppl, key=lambda o: (ppl[o], o))
    return best, ppl
