"""Stream a prepared corpus's documents without loading it: record batches in, (split, document) pairs out.

A document's rows are contiguous in corpus order (`lmpipe.data.corpus`), so joining consecutive rows of one
doc_id by newlines gives exactly the documents of `documents_by_split`, in the same order, while memory holds
one record batch and one document at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lmpipe.errors import LmpipeError, require_file

BATCH_ROWS = 8192
"""Rows per record batch read from the corpus parquet (a row is a verse, a paragraph or a whole JSONL record:
8,192 of 4 KB records are 32 MB)."""


def _parquet_error(path: Path, err: Exception) -> LmpipeError:
    return LmpipeError(f"{path}: not a readable parquet corpus ({type(err).__name__}: {err}); re-run prepare")


def iter_documents(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Yield (split, text) per document of the corpus parquet at `path`, in corpus order."""
    import pyarrow.parquet as pq

    path = require_file(path, produced_by="prepare")
    columns = ["split", "doc_id", "text"]
    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in columns if c not in pf.schema_arrow.names]
        if missing:
            raise LmpipeError(f"{path}: corpus lacks columns {missing}; re-run the 'prepare' stage")
        batches = pf.iter_batches(batch_size=BATCH_ROWS, columns=columns)
        key, rows = None, []
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            splits, doc_ids, texts = (batch.column(c).to_pylist() for c in columns)
            for split, doc_id, text in zip(splits, doc_ids, texts, strict=True):
                if (split, doc_id) != key:
                    if rows:
                        yield key[0], "\n".join(rows)
                    key, rows = (split, doc_id), []
                rows.append(text)
        if rows:
            yield key[0], "\n".join(rows)
    except LmpipeError:
        raise
    except Exception as err:  # pyarrow raises several types for a truncated or foreign file
        raise _parquet_error(path, err) from None


def split_documents(path: str | os.PathLike, split: str) -> Iterator[str]:
    """The documents of one split, streamed in corpus order."""
    return (text for s, text in iter_documents(path) if s == split)


def split_chars(path: str | os.PathLike, split: str) -> int:
    """Characters of one split's documents (rows joined by newlines), counted by pyarrow, no Python strings."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = require_file(path, produced_by="prepare")
    total, last = 0, (None, None)
    try:
        pf = pq.ParquetFile(path)
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=["split", "doc_id", "text"]):
            if not batch.num_rows:
                continue
            sp, ids = batch.column("split"), batch.column("doc_id")
            prev_sp = pa.concat_arrays([pa.array([last[0]], sp.type), sp.slice(0, len(sp) - 1)])
            prev_ids = pa.concat_arrays([pa.array([last[1]], ids.type), ids.slice(0, len(ids) - 1)])
            starts = pc.fill_null(pc.or_(pc.not_equal(sp, prev_sp), pc.not_equal(ids, prev_ids)), True)
            mine = pc.equal(sp, split)
            chars = pc.sum(pc.utf8_length(pc.filter(batch.column("text"), mine))).as_py() or 0
            rows = pc.sum(pc.cast(mine, pa.int64())).as_py() or 0
            docs = pc.sum(pc.cast(pc.and_(starts, mine), pa.int64())).as_py() or 0
            # Rows of a document are joined by one newline each: rows - documents newlines.
            total += chars + rows - docs
            last = (sp[-1].as_py(), ids[-1].as_py())
    except Exception as err:  # pyarrow raises several types for a truncated or foreign file
        raise _parquet_error(path, err) from None
    return total


def sample_documents(docs: Iterable[str], total_chars: int, sample_chars: int) -> Iterator[str]:
    """About `sample_chars` characters of `docs` (whose total is `total_chars`), spread evenly over them.

    Systematic sampling by characters: each document adds its length times the sampled fraction to a credit,
    and is kept while the credit is positive (keeping costs its length). Deterministic, one pass, nothing held.
    `sample_chars` 0 or >= `total_chars` keeps every document.
    """
    if sample_chars <= 0 or sample_chars >= total_chars:
        yield from docs
        return
    fraction = sample_chars / total_chars
    credit = 0.0
    for doc in docs:
        credit += fraction * len(doc)
        if credit > 0:
            credit -= len(doc)
            yield doc
