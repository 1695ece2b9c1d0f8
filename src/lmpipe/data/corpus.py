"""The prepared corpus: its config, the load -> clean -> dedup -> split recipe, its stats and its parquet file.

A corpus is a DataFrame with `CORPUS_COLUMNS`, one row per text unit, sorted in source document order and
then by position. Later stages (validation, tokenizer, datamodules) read exactly these columns.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import pandas as pd

from lmpipe.atomic import atomic_path
from lmpipe.data.cleaning import DEDUP_MODES, UNICODE_FORMS, clean_corpus, deduplicate
from lmpipe.data.sources import SOURCE_DTYPES, load_source
from lmpipe.data.splits import SPLITS, assign_splits
from lmpipe.errors import LmpipeError, require_file

SOURCES = ("kjv", "pydoc", "text")

CORPUS_COLUMNS = ("source", "doc_id", "group", "position", "text", "split", "book", "chapter", "verse")
"""Columns of a prepared corpus, in order."""

CORPUS_DTYPES = {**SOURCE_DTYPES, "split": "str"}


@dataclass
class DataConfig:
    source: str = "kjv"
    """Corpus to prepare: kjv (King James Bible), pydoc (Python reference topics) or text (data.paths)."""
    paths: list[str] = field(default_factory=list)
    """For source=text: .txt/.jsonl files or glob patterns, relative to the working directory."""
    text_field: str = "text"
    """For .jsonl files: the record field holding the text."""
    txt_paragraphs_per_doc: int = 20
    """For .txt files: consecutive paragraphs per document (the unit kept whole by the split)."""
    books: list[str] = field(default_factory=list)
    """For source=kjv: only these book titles, e.g. [Genesis, "1 Samuel"]; empty keeps all 66."""
    max_docs: int = 0
    """Keep only the first N documents in source order, for quick runs; 0 keeps all."""
    unicode_form: str = "NFC"
    """Unicode normalisation applied to every text: NFC, NFKC, NFD or NFKD."""
    strip_brackets: bool = True
    """For source=kjv: drop the square brackets marking translator-supplied words, keeping the words."""
    lowercase: bool = False
    """Lowercase every text."""
    dedup: str = "document"
    """Drop exact duplicates after cleaning, keeping the first: none, row or document."""
    val_fraction: float = 0.05
    """Fraction of each group's documents held out for validation."""
    test_fraction: float = 0.05
    """Fraction of each group's documents held out for testing."""

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("source", self.source, SOURCES),
            ("unicode_form", self.unicode_form, UNICODE_FORMS),
            ("dedup", self.dedup, DEDUP_MODES),
        ):
            if value not in allowed:
                raise LmpipeError(f"data.{name}={value!r}: expected one of {', '.join(allowed)}")
        for name in ("val_fraction", "test_fraction"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise LmpipeError(f"data.{name}={value}: expected a fraction in [0, 1)")
        if self.val_fraction + self.test_fraction >= 1:
            raise LmpipeError(
                f"data.val_fraction + data.test_fraction = {self.val_fraction + self.test_fraction}: "
                "expected below 1 so documents remain for training"
            )
        if self.txt_paragraphs_per_doc < 1:
            raise LmpipeError(
                f"data.txt_paragraphs_per_doc={self.txt_paragraphs_per_doc}: expected at least 1"
            )
        if self.max_docs < 0:
            raise LmpipeError(f"data.max_docs={self.max_docs}: expected 0 (all) or a positive count")
        if self.source == "text" and not self.paths:
            raise LmpipeError(
                "data.paths=[]: source 'text' needs at least one .txt/.jsonl file or glob pattern"
            )


def prepare_corpus(cfg: DataConfig, seed: int) -> pd.DataFrame:
    """Load, clean, deduplicate and split the configured source; the result has `CORPUS_COLUMNS`.

    What was dropped on the way is recorded in `df.attrs["prepare"]` for `corpus_stats`.
    """
    loaded = load_source(cfg)
    cleaned = clean_corpus(loaded, cfg)
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
    """Each split's documents in corpus order, a document's rows joined by newlines (what the LM reads)."""
    docs: dict[str, list[str]] = {split: [] for split in SPLITS}
    for (split, _), rows in df.groupby(["split", "doc_id"], sort=False):
        docs[split].append("\n".join(rows["text"]))
    return docs
