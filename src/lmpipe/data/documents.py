"""Stream a prepared corpus's documents without loading it: record batches in, (split, document) pairs out.

A document's rows are contiguous in corpus order (`lmpipe.data.corpus`), so joining consecutive rows of one
doc_id by newlines gives exactly the documents of `documents_by_split`, in the same order, while memory holds
one record batch and one document at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import numpy as np

from lmpipe.data.corpus import iter_corpus

COLUMNS = ("split", "doc_id", "text")
"""What document readers take from the corpus."""
BATCH_ROWS = 8192
"""Rows per record batch read from the corpus (a row is a verse, a paragraph or a whole JSONL record)."""


def iter_documents(path: str | os.PathLike) -> Iterator[tuple[str, str]]:
    """Yield (split, text) per document of the corpus parquet at `path`, in corpus order."""
    key, rows = None, []
    for batch in iter_corpus(path, columns=COLUMNS, batch_rows=BATCH_ROWS):
        for split, doc_id, text in zip(*(batch[c].tolist() for c in COLUMNS), strict=True):
            if (split, doc_id) != key:
                if rows:
                    yield key[0], "\n".join(rows)
                key, rows = (split, doc_id), []
            rows.append(text)
    if rows:
        yield key[0], "\n".join(rows)


def split_documents(path: str | os.PathLike, split: str) -> Iterator[str]:
    """The documents of one split, streamed in corpus order."""
    return (text for s, text in iter_documents(path) if s == split)


def split_chars(path: str | os.PathLike, split: str) -> int:
    """Characters of one split's documents (rows joined by newlines), counted batch by batch without joining."""
    total, last = 0, (None, None)
    for batch in iter_corpus(path, columns=COLUMNS, batch_rows=BATCH_ROWS):
        if batch.empty:
            continue
        sp, ids = batch["split"].to_numpy(), batch["doc_id"].to_numpy()
        starts = (sp != np.roll(sp, 1)) | (ids != np.roll(ids, 1))
        starts[0] = (sp[0], ids[0]) != last
        mine = sp == split
        # Rows of a document are joined by one newline each: rows - documents newlines.
        total += int(batch["text"][mine].str.len().sum()) + int(mine.sum()) - int((starts & mine).sum())
        last = (sp[-1], ids[-1])
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
