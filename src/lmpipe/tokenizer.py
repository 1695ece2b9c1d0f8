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
import itertools
import json
import os
import sys
from collections.abc import Callable, Iterable, Iterator
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
ENCODE_BATCH_CHARS = 1 << 20
"""Characters of text per encoding batch: large enough for the Rust side (or a worker process) to amortise a
call, small enough to keep memory flat and the progress bar moving."""


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
    train_sample_chars: Annotated[int, Field(ge=0)] = 0
    """Train on about this many characters of the train split, documents spread evenly over it; 0 = all of it."""

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


_worker_tokenizers: dict[str, tuple[Tokenizer, Any]] = {}
"""Per process: the tokenizer of the JSON string `encode_documents_batch` was last given, parsed once, with its
exact tiktoken twin (`lmpipe.fast_bpe.fast_encoder`, None if it has none)."""


def encode_documents_batch(
    tok_json: str, batch: list[tuple[str, str]], rust_threads: bool = True, fast_bpe: bool = True
) -> dict[str, tuple[np.ndarray, int, int]]:
    """Encode (split, text) documents with the tokenizer `tok_json`; per split: (ids with EOT after each
    document, documents, UTF-8 bytes of their text). Top-level and picklable, for `lmpipe.data.engine`.

    `rust_threads` False keeps Hugging Face's encoder on one thread, for a process that is one of several
    workers (their own Rust thread pools would only compete for the same cores). `fast_bpe` encodes with the
    tokenizer's exact tiktoken twin when it has one (`lmpipe.fast_bpe`: the same ids); False keeps Hugging Face's.
    """
    if not rust_threads:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if tok_json not in _worker_tokenizers:
        from lmpipe.fast_bpe import fast_encoder

        _worker_tokenizers.clear()
        tok = Tokenizer.from_str(tok_json)
        _worker_tokenizers[tok_json] = (tok, fast_encoder(tok))
    tok, fast = _worker_tokenizers[tok_json]
    eot = _special_id(tok, EOT)
    dtype = token_dtype(tok.get_vocab_size())
    texts: dict[str, list[str]] = {}
    for split, text in batch:
        texts.setdefault(split, []).append(text)
    out = {}
    for split, docs in texts.items():
        if fast is not None and fast_bpe:  # the same ids, several times faster
            lists = fast.encode_batch(
                docs, num_threads=os.cpu_count() if rust_threads else 1, allowed_special="all"
            )
        else:
            lists = [enc.ids for enc in tok.encode_batch(docs)]
        ends = np.cumsum([len(ids) for ids in lists])
        flat = np.fromiter(itertools.chain.from_iterable(lists), dtype=dtype, count=int(ends[-1]))
        ids = np.insert(flat, ends, eot)  # EOT after each document
        out[split] = (ids, len(docs), sum(len(doc.encode("utf-8")) for doc in docs))
    return out


def encode_documents(tok: Tokenizer, docs: Iterable[str]) -> np.ndarray:
    """Encode `docs` into one flat id array, with the EOT id after every document (in this process)."""
    tok_json = tok.to_str()
    arrays = [encode_documents_batch(tok_json, batch)[""][0] for batch in _batched(("", doc) for doc in docs)]
    if not arrays:
        return np.zeros(0, dtype=token_dtype(tok.get_vocab_size()))
    return np.concatenate(arrays)


def _batched(docs: Iterable[tuple[str, str]]) -> Iterator[list[tuple[str, str]]]:
    max_chars = ENCODE_BATCH_CHARS  # read at each call, so a test can make batches small
    batch: list[tuple[str, str]] = []
    size = 0
    for item in docs:
        batch.append(item)
        size += len(item[1])
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


Mapper = Callable[[Callable, Iterable], Iterable]
"""`map`-like: apply a picklable function to each item and yield the results in input order
(`lmpipe.data.engine.map_ordered` with its engine arguments bound; the builtin `map` runs in process)."""


def write_shards(
    out_dir: str | os.PathLike,
    splits: dict[str, Iterable[str]],
    tok: Tokenizer,
    show_progress: bool = True,
) -> dict[str, Any]:
    """`write_token_shards` of each split's documents, encoded in this process."""
    docs = ((split, doc) for split, split_docs in splits.items() for doc in split_docs)
    return write_token_shards(out_dir, list(splits), docs, tok, show_progress=show_progress)


def write_token_shards(
    out_dir: str | os.PathLike,
    split_names: Iterable[str],
    docs: Iterable[tuple[str, str]],
    tok: Tokenizer,
    mapper: Mapper = map,
    rust_threads: bool = True,
    show_progress: bool = True,
    fast_bpe: bool = True,
) -> dict[str, Any]:
    """Encode (split, text) documents to ``<split>.bin`` per split, in batches of about `ENCODE_BATCH_CHARS`
    characters mapped by `mapper` and appended as they come back; save the tokenizer as ``tokenizer.json`` (with
    its chat template in ``tokenizer_config.json``) beside them and describe it all in ``meta.json``; return the
    meta dict. Every split named has a file, even if no document of it came.

    The whole directory is replaced atomically: if anything fails, the previous shards stay as they were, and
    shards never sit beside a tokenizer other than the one that encoded them.
    Per split, ``n_tokens`` counts the EOT separators too, while ``n_bytes`` is the UTF-8 size of the
    documents' own text (separators add 0 bytes): that is the denominator of bits-per-byte.
    """
    from functools import partial

    from tqdm.auto import tqdm

    split_names = list(split_names)
    for split in split_names:
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
        "splits": {split: {"n_tokens": 0, "n_docs": 0, "n_bytes": 0} for split in split_names},
    }
    encode = partial(encode_documents_batch, tok.to_str(), rust_threads=rust_threads, fast_bpe=fast_bpe)
    bar = tqdm(desc="encode", unit="B", unit_scale=True, disable=not (show_progress and _stderr_is_tty()))
    with atomic_path(out_dir) as tmp, bar:
        tmp.mkdir()
        tok.save(str(tmp / TOKENIZER_FILE))
        # The chat template travels with the tokenizer, so every later stage formats prompts identically.
        write_json(tmp / TOKENIZER_CONFIG_FILE, tokenizer_config())
        files = {split: open(tmp / shard_file(split), "wb") for split in split_names}  # noqa: SIM115
        try:
            # Batch by batch, in document order, so a large split never sits in memory.
            for encoded in mapper(encode, _batched(docs)):
                for split, (ids, n_docs, n_bytes) in encoded.items():
                    if split not in files:
                        raise LmpipeError(
                            f"document of split {split!r}: expected one of {', '.join(split_names)}"
                        )
                    files[split].write(ids.tobytes())
                    counts = meta["splits"][split]
                    counts["n_tokens"] += len(ids)
                    counts["n_docs"] += n_docs
                    counts["n_bytes"] += n_bytes
                    bar.update(n_bytes)
        finally:
            for f in files.values():
                f.close()
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
