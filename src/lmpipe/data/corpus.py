"""The prepared corpus: its config, the load -> clean -> dedup -> split recipe, its stats and its parquet file.

A corpus is a DataFrame with `CORPUS_COLUMNS`, one row per text unit, sorted in source document order and
then by position. Later stages (validation, tokenizer, datamodules) read exactly these columns.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import field
from typing import Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from lmpipe.atomic import atomic_path
from lmpipe.config import schema
from lmpipe.data.cleaning import DedupMode, UnicodeForm, clean_corpus, deduplicate
from lmpipe.data.sources import MAX_RECORD_BYTES, SOURCE_DTYPES, load_kjv, load_pydoc, load_text
from lmpipe.data.splits import SPLITS, assign_splits
from lmpipe.errors import LmpipeError, require_file

CORPUS_COLUMNS = ("source", "doc_id", "group", "position", "text", "split", "book", "chapter", "verse")
"""Columns of a prepared corpus, in order."""

CORPUS_DTYPES = {**SOURCE_DTYPES, "split": "str"}

CORPUS_FILE = "corpus.parquet"
"""The corpus inside a prepared directory (the prepare stage's output)."""
CORPUS_STATS_FILE = "stats.json"
"""Beside the corpus: `corpus_stats` of it."""

Fraction = Annotated[float, Field(ge=0, lt=1)]


@schema("data")
class DataConfig:
    source: Literal["kjv", "pydoc", "text"] = "kjv"
    """Corpus to prepare: kjv (King James Bible), pydoc (Python reference topics) or text (data.paths)."""
    paths: list[str] = field(default_factory=list)
    """For source=text: .txt/.jsonl files or glob patterns, relative to the working directory."""
    text_field: str = "text"
    """For .jsonl files: the record field holding the text."""
    txt_paragraphs_per_doc: Annotated[int, Field(ge=1)] = 20
    """For .txt files: consecutive paragraphs per document (the unit kept whole by the split)."""
    books: list[str] = field(default_factory=list)
    """For source=kjv: only these book titles, e.g. [Genesis, "1 Samuel"]; empty keeps all 66."""
    max_docs: Annotated[int, Field(ge=0)] = 0
    """Keep only the first N documents in source order, for quick runs; 0 keeps all."""
    unicode_form: UnicodeForm = "NFC"
    """Unicode normalisation applied to every text: NFC, NFKC, NFD or NFKD."""
    collapse_whitespace: bool = False
    """Turn every run of whitespace, line breaks included, into one space; false keeps text as written."""
    strip_brackets: bool = True
    """For source=kjv: drop the square brackets marking translator-supplied words, keeping the words."""
    lowercase: bool = False
    """Lowercase every text."""
    dedup: DedupMode = "document"
    """Drop exact duplicates after cleaning, keeping the first: none, row or document."""
    val_fraction: Fraction = 0.05
    """Fraction of each group's documents held out for validation."""
    test_fraction: Fraction = 0.05
    """Fraction of each group's documents held out for testing."""
    max_record_bytes: Annotated[int, Field(ge=1)] = MAX_RECORD_BYTES
    """Longest .jsonl line or .txt paragraph read, in bytes; a longer one is an error naming file and line."""
    batch_docs: Annotated[int, Field(ge=1)] = 1000
    """Documents cleaned and deduplicated per batch (the unit sent to a worker); memory follows it."""
    near_dedup: bool = False
    """Also drop documents that nearly repeat an earlier one (MinHash LSH over word shingles)."""
    near_dedup_shingle: Annotated[int, Field(ge=1)] = 5
    """Near-dedup: words per shingle (a document is the set of its consecutive word n-grams)."""
    near_dedup_perms: Annotated[int, Field(ge=1)] = 128
    """Near-dedup: MinHash permutations per document (a multiple of near_dedup_bands)."""
    near_dedup_bands: Annotated[int, Field(ge=1)] = 16
    """Near-dedup: LSH bands; Jaccard threshold ~ (1/bands)^(bands/perms), 0.71 for 16 of 128."""
    engine: Literal["local", "dask"] = "local"
    """Where the data stages run their batches: local (this machine) or dask (make setup-dask; a cluster)."""
    workers: Annotated[int, Field(ge=0)] = 0
    """Processes for engine=local, or for the LocalCluster engine=dask starts without an address; 0: one per core."""
    engine_address: str = ""
    """For engine=dask: a running Dask scheduler, e.g. tcp://host:8786; empty starts a local cluster per stage."""

    def __post_init__(self) -> None:
        if self.val_fraction + self.test_fraction >= 1:
            raise LmpipeError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction}: "
                "expected below 1 so documents remain for training"
            )
        if self.near_dedup_perms % self.near_dedup_bands:
            raise LmpipeError(
                f"data.near_dedup_perms={self.near_dedup_perms}: expected a multiple of "
                f"data.near_dedup_bands={self.near_dedup_bands}"
            )
        if self.source == "text" and not self.paths:
            raise LmpipeError(
                "data.paths=[]: source 'text' needs at least one .txt/.jsonl file or glob pattern"
            )
        if self.engine == "dask":
            from lmpipe.data.engine import require_dask

            require_dask()
        elif self.engine_address:
            raise LmpipeError(
                f"data.engine_address={self.engine_address!r} is set but data.engine='local': expected dask"
            )


def load_source(cfg: DataConfig) -> pd.DataFrame:
    """Load the source named by `cfg.source` as rows with `SOURCE_COLUMNS` (no `split` yet)."""
    if cfg.source == "kjv":
        df = load_kjv(cfg.books, cfg.max_docs)
    elif cfg.source == "pydoc":
        df = load_pydoc(cfg.max_docs, cfg.collapse_whitespace)
    else:
        df = load_text(
            cfg.paths,
            cfg.text_field,
            cfg.txt_paragraphs_per_doc,
            cfg.max_docs,
            cfg.collapse_whitespace,
            cfg.max_record_bytes,
        )
    if df.empty:
        raise LmpipeError(f"data.source={cfg.source!r}: the corpus is empty (no text rows were loaded)")
    return df


def prepare_corpus(cfg: DataConfig, seed: int) -> pd.DataFrame:
    """Load, clean, deduplicate and split the configured source; the result has `CORPUS_COLUMNS`.

    What was dropped on the way is recorded in `df.attrs["prepare"]` for `corpus_stats`.
    """
    loaded = load_source(cfg)
    cleaned = clean_corpus(
        loaded, cfg.unicode_form, cfg.strip_brackets, cfg.lowercase, cfg.collapse_whitespace
    )
    if cleaned.empty:
        raise LmpipeError(
            f"data.source={cfg.source!r}: every row is empty after cleaning, nothing to prepare"
        )
    deduped, n_duplicates = deduplicate(cleaned, cfg.dedup)
    corpus = assign_splits(deduped, cfg.val_fraction, cfg.test_fraction, seed)
    corpus = corpus[list(CORPUS_COLUMNS)].astype(CORPUS_DTYPES).reset_index(drop=True)
    corpus.attrs["prepare"] = {
        "rows_loaded": len(loaded),
        "empty_rows_removed": len(loaded) - len(cleaned),
        "dedup": cfg.dedup,
        "duplicates_removed": n_duplicates,
        "rows_removed_by_dedup": len(cleaned) - len(deduped),
    }
    return corpus


def corpus_stats(df: pd.DataFrame) -> dict:
    """JSON-serialisable counts: rows, documents, groups and characters overall and per split, plus removals."""

    def counts(part: pd.DataFrame) -> dict:
        return {
            "rows": len(part),
            "documents": int(part["doc_id"].nunique()),
            "groups": int(part["group"].nunique()),
            "chars": int(part["text"].str.len().sum()),
        }

    stats = {
        "sources": sorted(df["source"].unique().tolist()),
        **counts(df),
        "splits": {name: counts(df[df["split"] == name]) for name in SPLITS},
    }
    if "prepare" in df.attrs:
        stats["removed"] = dict(df.attrs["prepare"])
    return stats


def write_corpus(df: pd.DataFrame, path: str | os.PathLike) -> None:
    """Write the corpus as parquet, atomically (a failed write leaves the previous file untouched)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def read_corpus(path: str | os.PathLike) -> pd.DataFrame:
    """Read a corpus written by `write_corpus`, checking it has the expected columns."""
    parts = list(iter_corpus(path))
    return pd.concat(parts, ignore_index=True) if len(parts) > 1 else parts[0]


def iter_corpus(
    path: str | os.PathLike, columns: Sequence[str] | None = CORPUS_COLUMNS, batch_rows: int = 8192
) -> Iterator[pd.DataFrame]:
    """The corpus a record batch at a time (at most `batch_rows` rows), so a reader never holds it all.

    `columns` picks columns (all of the file's when None; with the corpus dtypes when they are corpus columns).
    A truncated or foreign file, or one lacking columns, is a one-line error naming it.
    """
    file = _parquet_file(path)
    names = file.schema_arrow.names
    missing = [c for c in (columns or ()) if c not in names]
    if missing:
        raise LmpipeError(
            f"{path}: corpus lacks columns {missing}; re-run the 'prepare' stage (dvc repro prepare)"
        )
    wanted = list(columns) if columns is not None else names
    dtypes = {c: t for c, t in CORPUS_DTYPES.items() if c in wanted}
    empty = True
    # A row group at a time: pyarrow's iter_batches kept every batch it had read allocated (2 GB for 3 GB).
    for group in range(file.metadata.num_row_groups):
        try:
            table = file.read_row_group(group, columns=wanted)
        except Exception as e:
            raise LmpipeError(
                f"{path}: corrupt or truncated parquet corpus in row group {group} ({type(e).__name__}); "
                "re-run prepare"
            ) from None
        for batch in table.to_batches(max_chunksize=batch_rows):
            empty = False
            yield batch.to_pandas()[wanted].astype(dtypes)
        del table
    if empty:
        yield file.schema_arrow.empty_table().to_pandas()[wanted].astype(dtypes)


def sample_corpus(
    path: str | os.PathLike, max_chars: int, seed: int, columns: Sequence[str] = CORPUS_COLUMNS
) -> pd.DataFrame:
    """The corpus if its text holds at most `max_chars` characters (0: no limit), else a sample of its rows.

    A row is kept when a seeded hash of (doc_id, position) falls below max_chars / total chars, so the sample
    holds about `max_chars` characters whatever the corpus size, and the same rows on every run. Reads the
    file twice, a record batch at a time (the first pass counts characters).
    """
    if max_chars:
        total = sum(int(p["text"].str.len().sum()) for p in iter_corpus(path, columns=["text"]))
    if not max_chars or total <= max_chars:
        return read_corpus(path)[list(columns)]
    threshold = np.uint64(max_chars / total * 2**64)
    key = f"{seed:016d}"[-16:]  # hash_pandas_object's 16-character key
    parts = []
    for part in iter_corpus(path, columns=sorted({*columns, "doc_id", "position"}, key=CORPUS_COLUMNS.index)):
        hashes = pd.util.hash_pandas_object(part[["doc_id", "position"]], index=False, hash_key=key)
        parts.append(part[hashes.to_numpy() < threshold][list(columns)])
    return pd.concat(parts, ignore_index=True)


def _parquet_file(path: str | os.PathLike):
    import pyarrow.parquet as pq

    path = require_file(path, produced_by="prepare")
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise LmpipeError(
            f"{path}: not a readable parquet corpus ({type(e).__name__}); re-run prepare"
        ) from None


def documents_by_split(df: pd.DataFrame) -> dict[str, list[str]]:
    """Each split's documents in corpus order, a document's rows joined by newlines (what the LM reads).

    A verse is a line; a paragraph ends with its own line break, so the newline between two is the empty line
    that separated them in the file (`lmpipe.data.sources.split_paragraphs`).
    """
    docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for (split, _), rows in df.groupby(["split", "doc_id"], sort=False):
        docs[split].append("\n".join(rows["text"]))
    return docs
