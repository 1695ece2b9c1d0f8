"""The same byte-level BPE ids as Hugging Face's encoder, several times faster: tiktoken over lmpipe's vocabulary.

`tokenizers` encodes a byte-level BPE at about 2-3 MB/s per core; tiktoken runs the same regex pre-split and
merges by rank at about 10-15 MB/s (bench/data_scale.py). The two algorithms differ, so `fast_encoder` hands
over a tokenizer only when it passes the checks under which they give the same ids (the reason is given with
each; tests/test_fast_bpe.py also compares the two on every corpus lmpipe ships and on adversarial text):

- Hugging Face merges an adjacent pair when (left, right) is a merge rule, lowest rule first; tiktoken merges
  an adjacent pair when left+right is a vocabulary token, lowest token id first. They pick the same pair at
  every step when token ids grow in merge order (as BPE training assigns them) and merging each token's own
  symbols tiktoken's way, with only the tokens before it, ends at its own rule: two parts that join into a
  token then always join along its rule, and at its turn. (The same check `transformers` relies on when it
  turns tiktoken ranks into merges, here run the other way.)
- tiktoken emits a pre-split piece that is itself a vocabulary token whole, without merging; Hugging Face
  merges its bytes. Both agree when every token's own bytes merge back into that token.
- Nothing else may touch the text: no normalizer (lowercase), the GPT-2 split regex, no prefix space, no
  dropout or subword affixes. Special tokens written in a text are split out whole by both.

Anything else (the char tokenizer, `tokenizer.lowercase`, a tokenizer edited by hand) returns None, and the
caller keeps Hugging Face's encoder.
"""

from __future__ import annotations

import functools
import itertools
import json
from typing import Any

# tokenizers' ByteLevel pre-tokenizer splits with exactly this pattern (GPT-2's) before it maps bytes to symbols.
GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


@functools.cache
def _symbol_to_byte() -> dict[str, int]:
    """ByteLevel's printable symbol for each byte (GPT-2's bytes_to_unicode), inverted."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols = dict(zip(printable, printable, strict=True))
    for byte in range(256):
        if byte not in symbols:
            symbols[byte] = 256 + len(symbols) - len(printable)
    return {chr(symbol): byte for byte, symbol in symbols.items()}


def _is_plain_byte_level_bpe(spec: dict[str, Any]) -> bool:
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    return (
        model.get("type") == "BPE"
        and model.get("dropout") is None
        and not model.get("continuing_subword_prefix")
        and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
        and not model.get("ignore_merges")
        and spec.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True)
        and not pre.get("add_prefix_space")
        and all(
            t.get("special") and not (t.get("lstrip") or t.get("rstrip") or t.get("single_word"))
            for t in spec.get("added_tokens", [])
        )
    )


def _rank_merge(token: str, vocab: dict[str, int], below: int) -> list[str]:
    """tiktoken's algorithm on one token's symbols, with only tokens of id < `below`: merge the adjacent pair
    whose concatenation has the lowest id, leftmost first, until none is left."""
    parts = list(token)
    while len(parts) > 1:
        ids = [vocab.get(a + b, below) for a, b in itertools.pairwise(parts)]
        best = min(ids)
        if best >= below:
            break
        i = ids.index(best)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
    return parts


def _merges_are_rank_order(vocab: dict[str, int], merges: list) -> bool:
    """Ids grow in merge order, and merging each token's symbols by rank (with only earlier tokens) ends at
    its own rule: then merging by rank never joins two parts along anything but a rule, at the rule's turn."""
    last_id = -1
    for merge in merges:
        left, right = merge.split(" ") if isinstance(merge, str) else merge
        token_id = vocab.get(left + right, -1)
        if token_id <= last_id or _rank_merge(left + right, vocab, token_id) != [left, right]:
            return False
        last_id = token_id
    return True


def _tokens_merge_to_themselves(tokenizer, vocab: dict[str, int]) -> bool:
    return all(
        [t.id for t in tokenizer.model.tokenize(token)] == [token_id] for token, token_id in vocab.items()
    )


def fast_encoder(tokenizer):
    """A tiktoken `Encoding` that gives `tokenizer`'s ids (its `encode(text, allowed_special="all")`), or None
    when the tokenizer fails a check under which the two agree (see the module docstring)."""
    spec = json.loads(tokenizer.to_str())
    if not _is_plain_byte_level_bpe(spec):
        return None
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    vocab = {token: i for token, i in spec["model"]["vocab"].items() if token not in specials}
    if not set(_symbol_to_byte()) <= vocab.keys():  # tiktoken needs every byte as a token of its own
        return None
    if not _merges_are_rank_order(vocab, spec["model"]["merges"]):
        return None
    if not _tokens_merge_to_themselves(tokenizer, vocab):
        return None
    import tiktoken

    to_byte = _symbol_to_byte()
    ranks = {bytes(to_byte[symbol] for symbol in token): i for token, i in vocab.items()}
    return tiktoken.Encoding("lmpipe", pat_str=GPT2_SPLIT, mergeable_ranks=ranks, special_tokens=specials)
