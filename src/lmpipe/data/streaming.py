"""Prepare a corpus larger than memory: the `prepare_corpus` recipe on batches of documents, written as it goes.

Two passes, with the same rows, order and split as `lmpipe.data.corpus.prepare_corpus`:

1. Documents stream from the source in batches of `data.batch_docs`; each batch is cleaned (and hashed) by
   `clean_batch`, mapped through `lmpipe.data.engine.map_ordered` so it runs on `data.workers` processes or
   on Dask. Exact dedup keeps only 8-byte hashes (`lmpipe.data.dedup.HashSet`), near-dedup only LSH band keys;
   the kept rows go to an unsplit parquet file beside the output, and each kept document leaves 12 bytes: its
   group number and its split key.
2. `split_codes` assigns every document's split from those arrays; the unsplit file is read back a row group
   at a time and written as the corpus, with a pyarrow ParquetWriter, counting the stats on the way.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from lmpipe.data.cleaning import clean_text
from lmpipe.data.corpus import CORPUS_COLUMNS, CORPUS_DTYPES, DataConfig, iter_corpus
from lmpipe.data.dedup import HashSet, MinHasher, content_hashes
from lmpipe.data.sources import (
    SOURCE_DTYPES,
    Document,
    document_columns,
    kjv_documents,
    pydoc_documents,
    text_documents,
)
from lmpipe.data.splits import SPLITS, doc_key, split_codes
from lmpipe.errors import LmpipeError

_DOC = "_doc"
"""Column of the unsplit file: the kept document's ordinal, to look up its split."""


@dataclass(frozen=True)
class CleanSpec:
    """What `clean_batch` needs from the config (small and picklable, sent with every batch)."""

    source: str
    seed: int
    unicode_form: str
    strip_brackets: bool
    lowercase: bool
    collapse_whitespace: bool
    dedup: str
    near_dedup: tuple[int, int, int] | None  # (shingle, num_perm, bands) when on


def source_documents(cfg: DataConfig) -> Iterator[Document]:
    """The configured source's documents, streamed (the first `max_docs` when set)."""
    if cfg.source == "kjv":
        docs = kjv_documents(cfg.books)
    elif cfg.source == "pydoc":
        docs = pydoc_documents(cfg.collapse_whitespace)
    else:
        docs = text_documents(
            cfg.paths,
            cfg.text_field,
            cfg.txt_paragraphs_per_doc,
            cfg.collapse_whitespace,
            cfg.max_record_bytes,
            check_ids=False,
        )
    return itertools.islice(docs, cfg.max_docs) if cfg.max_docs else docs


def clean_batch(task: tuple[CleanSpec, list[Document]]) -> dict:
    """Clean one batch of documents and hash what dedup and the split need; runs in a worker.

    Returns the cleaned documents (rows left empty dropped; documents left without rows dropped) with, per
    document, its id hash, split key and content hash (document dedup) or row hashes (row dedup), and its LSH
    band keys when near-dedup is on.
    """
    spec, docs = task
    kjv_brackets = spec.strip_brackets and spec.source == "kjv"
    kept: list[Document] = []
    rows_loaded = 0
    for doc in docs:
        rows_loaded += len(doc.texts)
        texts, verses = [], []
        for i, text in enumerate(doc.texts):
            text = clean_text(text, spec.unicode_form, kjv_brackets, spec.lowercase, spec.collapse_whitespace)
            if text.strip():
                texts.append(text)
                verses.append(doc.verses[i] if doc.verses is not None else None)
        if texts:
            kept.append(doc._replace(texts=texts, verses=verses))
    out = {
        "docs": kept,
        "rows_loaded": rows_loaded,
        "rows_cleaned": sum(len(d.texts) for d in kept),
        "id_hashes": content_hashes([d.doc_id for d in kept]),
        "keys": np.array([doc_key(spec.seed, d.doc_id) for d in kept], dtype=np.uint64),
    }
    if spec.dedup == "document":
        # Cleaned text holds no control characters, so "\x00" joins rows unambiguously.
        out["doc_hashes"] = content_hashes(["\x00".join(d.texts) for d in kept])
    elif spec.dedup == "row":
        out["row_hashes"] = [content_hashes(d.texts) for d in kept]
    if spec.near_dedup:
        hasher = MinHasher(*spec.near_dedup, seed=spec.seed)
        out["bands"] = np.array([hasher.band_keys("\n".join(d.texts)) for d in kept], dtype=np.uint64)
    return out


class _Pass1:
    """The compact state of pass 1: dedup hash sets, per-document group number and split key, counters."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.ids, self.contents, self.bands = HashSet(), HashSet(), HashSet()
        self.group_numbers: dict[str, int] = {}
        self.groups: list[np.ndarray] = []
        self.keys: list[np.ndarray] = []
        self.counts = dict.fromkeys(("rows_loaded", "rows_cleaned", "rows_kept", "dup_docs", "dup_rows"), 0)
        self.counts |= {"near_docs": 0, "near_rows": 0}
        self.n_docs = 0

    def keep(self, batch: dict) -> list[Document]:
        """The batch's documents that survive dedup (rows dropped by row dedup), noting what they need."""
        docs = batch["docs"]
        self.counts["rows_loaded"] += batch["rows_loaded"]
        self.counts["rows_cleaned"] += batch["rows_cleaned"]
        new_ids = self.ids.add(batch["id_hashes"])
        if not new_ids.all():
            doc = docs[int(np.flatnonzero(~new_ids)[0])]
            raise LmpipeError(
                f"{doc.group}: duplicate document id {doc.doc_id!r}; expected every document id to be unique"
            )
        keep = np.ones(len(docs), dtype=bool)
        if self.cfg.dedup == "document":
            keep = self.contents.add(batch["doc_hashes"])
            self.counts["dup_docs"] += int((~keep).sum())
        elif self.cfg.dedup == "row" and docs:
            hashes = batch["row_hashes"]
            new = np.split(
                self.contents.add(np.concatenate(hashes)), np.cumsum([len(h) for h in hashes])[:-1]
            )
            self.counts["dup_rows"] += int(sum((~n).sum() for n in new))
            docs = [
                d._replace(texts=_pick(d.texts, n), verses=_pick(d.verses, n))
                for d, n in zip(docs, new, strict=True)
            ]
            keep = np.array([bool(d.texts) for d in docs], dtype=bool)
        if self.cfg.near_dedup:
            keep &= self._not_near_duplicate(batch["bands"], keep, docs)
        kept = [d for d, k in zip(docs, keep, strict=True) if k]
        self.counts["rows_kept"] += sum(len(d.texts) for d in kept)
        groups = [self.group_numbers.setdefault(d.group, len(self.group_numbers)) for d in kept]
        self.groups.append(np.array(groups, dtype=np.int32))
        self.keys.append(batch["keys"][keep])
        return kept

    def _not_near_duplicate(
        self, bands: np.ndarray, candidates: np.ndarray, docs: list[Document]
    ) -> np.ndarray:
        """Keep-first within and across batches: a document sharing any band key with a kept one is dropped."""
        keep = np.zeros(len(candidates), dtype=bool)
        if not len(bands):
            return keep
        seen_before = self.bands.contains(bands.ravel()).reshape(bands.shape).any(axis=1)
        in_batch: set[int] = set()
        for i in np.flatnonzero(candidates):
            row = bands[i].tolist()
            if seen_before[i] or in_batch.intersection(row):
                self.counts["near_docs"] += 1
                self.counts["near_rows"] += len(docs[i].texts)
                continue
            keep[i] = True
            in_batch.update(row)
        self.bands.add(bands[keep].ravel())
        return keep


def _batched(items: Iterator[Document], n: int) -> Iterator[list[Document]]:
    """Lists of `n` consecutive items (the last one shorter), as itertools.batched (Python 3.12) gives."""
    while batch := list(itertools.islice(items, n)):
        yield batch


def _pick(values: list | None, mask: np.ndarray) -> list | None:
    return None if values is None else [v for v, m in zip(values, mask, strict=True) if m]


def _frame(source: str, docs: list[Document], first_ordinal: int) -> pd.DataFrame:
    """Rows of `docs` with `SOURCE_COLUMNS` (positions 0..n-1 per document) plus their document ordinal."""
    columns = document_columns(source, docs)
    columns[_DOC] = [ordinal for ordinal, doc in enumerate(docs, first_ordinal) for _ in doc.texts]
    return pd.DataFrame(columns).astype({**SOURCE_DTYPES, _DOC: "int64"})


class _Writer:
    """Appends DataFrames to one parquet file as row groups, with the first frame's schema."""

    def __init__(self, path: Path) -> None:
        self.path, self._writer, self._schema = path, None, None

    def write(self, df: pd.DataFrame) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pandas(df, schema=self._schema, preserve_index=False)
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def prepare_to_file(cfg: DataConfig, seed: int, path: str | os.PathLike) -> dict:
    """Prepare the configured corpus into the parquet file `path`, streaming; return its `corpus_stats`.

    The caller writes `path` inside a temporary directory (`lmpipe.atomic.atomic_path`), so a failure
    leaves the previous corpus intact. Peak memory follows `data.batch_docs`, not the corpus size.
    """
    from lmpipe.data.engine import map_ordered, resolve_workers

    path = Path(path)
    unsplit = path.with_name(path.name + ".unsplit")
    near = (cfg.near_dedup_shingle, cfg.near_dedup_perms, cfg.near_dedup_bands) if cfg.near_dedup else None
    spec = CleanSpec(
        cfg.source,
        seed,
        cfg.unicode_form,
        cfg.strip_brackets,
        cfg.lowercase,
        cfg.collapse_whitespace,
        cfg.dedup,
        near,
    )
    tasks = ((spec, list(batch)) for batch in _batched(source_documents(cfg), cfg.batch_docs))
    state = _Pass1(cfg)
    writer = _Writer(unsplit)
    try:
        workers = resolve_workers(cfg.workers)
        for batch in map_ordered(
            clean_batch, tasks, engine=cfg.engine, workers=workers, address=cfg.engine_address
        ):
            kept = state.keep(batch)
            if kept:
                writer.write(_frame(cfg.source, kept, state.n_docs))
                state.n_docs += len(kept)
    finally:
        writer.close()
    counts = state.counts
    if not counts["rows_loaded"]:
        raise LmpipeError(f"data.source={cfg.source!r}: the corpus is empty (no text rows were loaded)")
    if not counts["rows_cleaned"]:
        raise LmpipeError(
            f"data.source={cfg.source!r}: every row is empty after cleaning, nothing to prepare"
        )

    groups = np.concatenate(state.groups) if state.groups else np.zeros(0, np.int32)
    keys = np.concatenate(state.keys) if state.keys else np.zeros(0, np.uint64)
    codes = split_codes(groups, keys, cfg.val_fraction, cfg.test_fraction)
    del groups, keys
    stats = _StatsCounter()
    writer = _Writer(path)
    try:
        for part in iter_corpus(unsplit, columns=None):
            split = pd.Series(np.array(SPLITS)[codes[part[_DOC].to_numpy()]], index=part.index)
            part = part.drop(columns=_DOC)
            part.insert(part.columns.get_loc("text") + 1, "split", split)
            part = part[list(CORPUS_COLUMNS)].astype(CORPUS_DTYPES)
            stats.add(part)
            writer.write(part)
    finally:
        writer.close()
        unsplit.unlink(missing_ok=True)
    removed = {
        "rows_loaded": counts["rows_loaded"],
        "empty_rows_removed": counts["rows_loaded"] - counts["rows_cleaned"],
        "dedup": cfg.dedup,
        "duplicates_removed": counts["dup_docs"] if cfg.dedup == "document" else counts["dup_rows"],
        "rows_removed_by_dedup": counts["rows_cleaned"] - counts["rows_kept"] - counts["near_rows"],
    }
    if cfg.near_dedup:
        removed |= {
            "near_duplicates_removed": counts["near_docs"],
            "rows_removed_by_near_dedup": counts["near_rows"],
        }
    return stats.result(removed)


class _StatsCounter:
    """`corpus_stats` counted a batch at a time: documents are contiguous, so a new doc_id is a new document."""

    def __init__(self) -> None:
        self.sources: set[str] = set()
        self.counts = {name: {"rows": 0, "documents": 0, "chars": 0} for name in SPLITS}
        self.groups: dict[str, set[str]] = {name: set() for name in SPLITS}
        self.last_doc: str | None = None

    def add(self, part: pd.DataFrame) -> None:
        self.sources.update(part["source"].unique().tolist())
        doc_ids = part["doc_id"]
        starts = doc_ids.ne(doc_ids.shift(fill_value=self.last_doc))
        for name, rows in part.groupby("split", sort=False):
            counts = self.counts[name]
            counts["rows"] += len(rows)
            counts["documents"] += int(starts[rows.index].sum())
            counts["chars"] += int(rows["text"].str.len().sum())
            self.groups[name].update(rows["group"].unique().tolist())
        self.last_doc = doc_ids.iloc[-1]

    def result(self, removed: dict) -> dict:
        splits = {name: {**self.counts[name], "groups": len(self.groups[name])} for name in SPLITS}
        total = {key: sum(s[key] for s in splits.values()) for key in ("rows", "documents", "chars")}
        groups = len(set().union(*self.groups.values()))
        return {
            "sources": sorted(self.sources),
            "rows": total["rows"],
            "documents": total["documents"],
            "groups": groups,
            "chars": total["chars"],
            "splits": {
                name: {k: splits[name][k] for k in ("rows", "documents", "groups", "chars")}
                for name in SPLITS
            },
            "removed": removed,
        }
