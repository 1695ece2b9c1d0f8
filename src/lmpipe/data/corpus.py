"""The prepared corpus: its config, the load -> clean -> dedup -> split recipe, its stats and its parquet file.

A corpus is a DataFrame with `CORPUS_COLUMNS`, one row per text unit, sorted in source document order and
then by position. Later stages (validation, tokenizer, datamodules) read exactly these columns.
"""

from __future__ import annotations

import os
from dataclasses import field
from typing import Annotated, Literal

import pandas as pd
from pydantic import Field

from lmpipe.atomic import atomic_path
from lmpipe.config import schema
from lmpipe.data.cleaning import DedupMode, UnicodeForm, clean_corpus, deduplicate
from lmpipe.data.sources import SOURCE_DTYPES, load_kjv, load_pydoc, load_text
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
            cfg.paths, cfg.text_field, cfg.txt_paragraphs_per_doc, cfg.max_docs, cfg.collapse_whitespace
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
    path = require_file(path, produced_by="prepare")
    try:
        df = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several types for a truncated or foreign file
        raise LmpipeError(
            f"{path}: not a readable parquet corpus ({type(e).__name__}); re-run prepare"
        ) from None
    missing = [c for c in CORPUS_COLUMNS if c not in df.columns]
    if missing:
        raise LmpipeError(
            f"{path}: corpus lacks columns {missing}; re-run the 'prepare' stage (dvc repro prepare)"
        )
    return df[list(CORPUS_COLUMNS)].astype(CORPUS_DTYPES)


def documents_by_split(df: pd.DataFrame) -> dict[str, list[str]]:
    """Each split's documents in corpus order, a document's rows joined by newlines (what the LM reads).

    A verse is a line; a paragraph ends with its own line break, so the newline between two is the empty line
    that separated them in the file (`lmpipe.data.sources.split_paragraphs`).
    """
    docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for (split, _), rows in df.groupby(["split", "doc_id"], sort=False):
        docs[split].append("\n".join(rows["text"]))
    return docs
