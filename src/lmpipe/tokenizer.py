"""Train, save and load a Hugging Face tokenizer, and encode corpus splits into flat token shards.

Two kinds of tokenizer, both real `tokenizers.Tokenizer` objects so every later stage treats them alike:

- ``bpe``: byte-level BPE (GPT-2 style). Every byte is in the initial alphabet, so any text encodes
  and decodes back exactly; no unknown token is needed.
- ``char``: one token per character (Unicode code point) seen in training, in sorted order; characters not
  seen in training become `UNK`. Handy as a transparent baseline and for tiny corpora.

Special tokens take ids 0..N-1 in the fixed order of `SPECIAL_TOKENS` (the char tokenizer adds `UNK` right
after them), so `EOT` is always id 0 whatever the corpus.

A shard directory holds one ``<split>.bin`` per split (the token ids back to back, documents separated by
`EOT`, raw numpy in `token_dtype`, native byte order, readable with `np.memmap`) and one ``meta.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from lmpipe.atomic import atomic_path, write_json
from lmpipe.chat import tokenizer_config
from lmpipe.config import schema
from lmpipe.errors import LmpipeError

# ASSISTANT and END are re-exported for modules that imported them from here before lmpipe.formats existed.
from lmpipe.formats import (  # noqa: F401
    ASSISTANT,
    END,
    EOT,
    META_FILE,
    PAD,
    SPECIAL_TOKENS,
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    UNK,
    shard_file,
)

_BYTE_ALPHABET_SIZE = 256
# Documents per encode_batch call: large enough for the Rust side to parallelise, small enough to keep
# memory flat and the progress bar moving.
_ENCODE_CHUNK_DOCS = 1024


@schema("tokenizer")
class TokenizerConfig:
    kind: Literal["bpe", "char"] = "bpe"
    """Tokenizer type: bpe (byte-level BPE) or char (one token per character seen in training)."""
    vocab_size: int = 4096
    """Maximum vocabulary size including special tokens (BPE may stop short on a small corpus)."""
    min_frequency: Annotated[int, Field(ge=1)] = 2
    """BPE only: a pair must occur at least this often to be merged."""
    lowercase: bool = False
    """Lowercase all text before tokenizing (decode then returns lowercase text)."""

    def __post_init__(self) -> None:
        # BPE keeps the whole byte alphabet whatever vocab_size says, so a smaller maximum could not hold.
        least = len(SPECIAL_TOKENS) + (_BYTE_ALPHABET_SIZE if self.kind == "bpe" else 2)
        if not least <= self.vocab_size <= 2**32:
            raise LmpipeError(
                f"tokenizer.vocab_size={self.vocab_size}: expected {least} <= vocab_size <= 2**32 "
                f"for kind={self.kind}"
            )


def _stderr_is_tty() -> bool:
    # Progress bars only for a person at a terminal; CI logs and DVC output stay one line per event.
    return sys.stderr.isatty()


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train a tokenizer of kind `cfg.kind` on `texts`; the same texts always give the same tokenizer."""
    if cfg.kind == "bpe":
        return _train_bpe(texts, cfg)
    return _train_char(texts, cfg)


def _train_bpe(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    if cfg.lowercase:
        tok.normalizer = normalizers.Lowercase()
    # No prefix space: a document's first word encodes as it appears, and decode returns the exact text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes up front, so text with bytes never seen in training still encodes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=_stderr_is_tty(),
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts) if hasattr(texts, "__len__") else None)
    return tok


def _train_char(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    from tqdm.auto import tqdm

    normalizer = normalizers.Lowercase() if cfg.lowercase else None
    seen: set[str] = set()
    for text in tqdm(texts, desc="char vocab", unit="doc", disable=not _stderr_is_tty()):
        # Collect characters after the same normalisation encode will apply, so none of them end up UNK.
        seen.update(normalizer.normalize_str(text) if normalizer else text)
    reserved = (*SPECIAL_TOKENS, UNK)
    chars = sorted(seen - set(reserved))
    if len(reserved) + len(chars) > cfg.vocab_size:
        raise LmpipeError(
            f"tokenizer.vocab_size={cfg.vocab_size}: the char tokenizer needs {len(reserved)} reserved + "
            f"{len(chars)} distinct characters = {len(reserved) + len(chars)}; raise vocab_size"
        )
    vocab = {token: i for i, token in enumerate((*reserved, *chars))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    if normalizer:
        tok.normalizer = normalizer
    # One pre-token per code point, whitespace included ([\s\S]: `.` would skip newlines).
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # WordLevel decodes by joining with spaces by default; Fuse concatenates, so text round-trips exactly.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(list(reserved))
    return tok


def tokenizer_kind(tok: Tokenizer) -> str:
    """Which `TokenizerConfig.kind` built `tok` (read from its model type)."""
    model = type(tok.model).__name__
    if model == "BPE":
        return "bpe"
    if model == "WordLevel":
        return "char"
    raise LmpipeError(f"tokenizer model {model!r}: expected a tokenizer trained by lmpipe (BPE or WordLevel)")


def save_tokenizer(tok: Tokenizer, path: str | os.PathLike) -> None:
    """Write `tok` as tokenizer JSON to `path`, atomically."""
    with atomic_path(path) as tmp:
        tok.save(str(tmp))


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer JSON written by `save_tokenizer`."""
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"missing tokenizer {path}: run the tokenize stage first (dvc repro tokenize)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:
        raise LmpipeError(f"tokenizer {path} is not a valid tokenizer JSON: {err}") from err


def copy_tokenizer(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> None:
    """Copy the tokenizer and its chat-template config, so a model directory is self-contained."""
    import shutil

    for name in (TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        src = Path(src_dir) / name
        if not src.is_file():
            raise LmpipeError(f"missing {src}: run the tokenize stage first (dvc repro tokenize)")
        shutil.copy(src, Path(dst_dir) / name)


def tokenizer_hash(path_or_tok: str | os.PathLike | Tokenizer) -> str:
    """sha256 of the tokenizer's canonical JSON (sorted keys, no whitespace): same tokenizer, same hash.

    A saved file and the in-memory tokenizer it came from hash alike, whatever the file's formatting.
    """
    if isinstance(path_or_tok, Tokenizer):
        text = path_or_tok.to_str()
    else:
        path = Path(path_or_tok)
        if not path.is_file():
            raise LmpipeError(f"missing tokenizer {path}: run the tokenize stage first (dvc repro tokenize)")
        text = path.read_text(encoding="utf-8")
    try:
        canonical = json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except json.JSONDecodeError as err:
        raise LmpipeError(f"tokenizer {path_or_tok} is not valid JSON: {err}") from err
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id: uint16 up to 65,536 tokens, else uint32."""
    if vocab_size < 1 or vocab_size > 2**32:
        raise LmpipeError(f"vocab_size={vocab_size}: expected 1 <= vocab_size <= 2**32")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _special_id(tok: Tokenizer, token: str) -> int:
    token_id = tok.token_to_id(token)
    if token_id is None:
        raise LmpipeError(f"tokenizer has no {token} token: expected a tokenizer trained by lmpipe")
    return token_id


def _encoded_chunks(
    tok: Tokenizer, docs: Iterable[str], show_progress: bool, desc: str
) -> Iterator[tuple[np.ndarray, int, int]]:
    """Yield (ids with EOT after each document, number of documents, UTF-8 bytes of their text) per chunk."""
    from tqdm.auto import tqdm

    eot = _special_id(tok, EOT)
    dtype = token_dtype(tok.get_vocab_size())
    bar = tqdm(
        total=len(docs) if hasattr(docs, "__len__") else None,
        desc=desc,
        unit="doc",
        disable=not (show_progress and _stderr_is_tty()),
    )
    with bar:
        chunk: list[str] = []
        for doc in docs:
            chunk.append(doc)
            if len(chunk) == _ENCODE_CHUNK_DOCS:
                yield _encode_chunk(tok, chunk, eot, dtype)
                bar.update(len(chunk))
                chunk = []
        if chunk:
            yield _encode_chunk(tok, chunk, eot, dtype)
            bar.update(len(chunk))


def _encode_chunk(tok: Tokenizer, chunk: list[str], eot: int, dtype: np.dtype) -> tuple[np.ndarray, int, int]:
    ids: list[int] = []
    for encoding in tok.encode_batch(chunk):
        ids.extend(encoding.ids)
        ids.append(eot)
    n_bytes = sum(len(doc.encode("utf-8")) for doc in chunk)
    return np.asarray(ids, dtype=dtype), len(chunk), n_bytes


def encode_documents(tok: Tokenizer, docs: Iterable[str], show_progress: bool) -> np.ndarray:
    """Encode `docs` into one flat id array, with the EOT id after every document."""
    arrays = [ids for ids, _, _ in _encoded_chunks(tok, docs, show_progress, desc="encode")]
    if not arrays:
        return np.zeros(0, dtype=token_dtype(tok.get_vocab_size()))
    return np.concatenate(arrays)


def write_shards(
    out_dir: str | os.PathLike,
    splits: dict[str, Iterable[str]],
    tok: Tokenizer,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Encode each split to ``<split>.bin``, save the tokenizer as ``tokenizer.json`` (with its chat template in
    ``tokenizer_config.json``) beside them and describe it all in ``meta.json``; return the meta dict.

    The whole directory is replaced atomically: if anything fails, the previous shards stay as they were, and
    shards never sit beside a tokenizer other than the one that encoded them.
    Per split, ``n_tokens`` counts the EOT separators too, while ``n_bytes`` is the UTF-8 size of the
    documents' own text (separators add 0 bytes): that is the denominator of bits-per-byte.
    """
    for split in splits:
        if not split or Path(split).name != split or split.startswith("."):
            raise LmpipeError(f"split name {split!r}: expected a plain file name such as train or val")
    vocab_size = tok.get_vocab_size()
    meta: dict[str, Any] = {
        "kind": tokenizer_kind(tok),
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "eot_id": _special_id(tok, EOT),
        "pad_id": _special_id(tok, PAD),
        "tokenizer_sha256": tokenizer_hash(tok),
        "splits": {},
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        tok.save(str(tmp / TOKENIZER_FILE))
        # The chat template travels with the tokenizer, so every later stage formats prompts identically.
        write_json(tmp / TOKENIZER_CONFIG_FILE, tokenizer_config())
        for split, docs in splits.items():
            counts = {"n_tokens": 0, "n_docs": 0, "n_bytes": 0}
            # Stream chunk by chunk so a large split never sits in memory as one array.
            with open(tmp / shard_file(split), "wb") as f:
                for ids, n_docs, n_bytes in _encoded_chunks(tok, docs, show_progress, desc=split):
                    f.write(ids.tobytes())
                    counts["n_tokens"] += len(ids)
                    counts["n_docs"] += n_docs
                    counts["n_bytes"] += n_bytes
            meta["splits"][split] = counts
        write_json(tmp / META_FILE, meta)
    return meta


def read_meta(shard_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``meta.json`` of a shard directory written by `write_shards`."""
    path = Path(shard_dir) / META_FILE
    if not path.is_file():
        raise LmpipeError(f"missing shard metadata {path}: run the tokenize stage first (dvc repro tokenize)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise LmpipeError(f"shard metadata {path} is not valid JSON: {err}") from err


def read_shard(shard_dir: str | os.PathLike, split: str) -> np.memmap:
    """Memory-map ``<split>.bin`` read-only, with the dtype recorded in ``meta.json``."""
    meta = read_meta(shard_dir)
    path = Path(shard_dir) / shard_file(split)
    if split not in meta["splits"] or not path.is_file():
        known = ", ".join(meta["splits"]) or "none"
        raise LmpipeError(f"missing shard {path}: expected one of the splits in meta.json ({known})")
    dtype = np.dtype(meta["dtype"])
    n_tokens = meta["splits"][split]["n_tokens"]
    size = path.stat().st_size
    if size != n_tokens * dtype.itemsize:
        raise LmpipeError(
            f"shard {path} has {size} bytes: expected {n_tokens} {dtype.name} tokens per meta.json; "
            "rerun the tokenize stage"
        )
    if n_tokens == 0:
        # numpy cannot map an empty file; an empty split is a data problem to report, not to train on.
        raise LmpipeError(f"shard {path} is empty: expected at least one document in split {split!r}")
    return np.memmap(path, dtype=dtype, mode="r")
