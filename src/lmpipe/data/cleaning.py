"""Normalise row texts and drop exact duplicates, so the tokenizer and the splits see one canonical form.

Cleaning is deliberately conservative: it removes encoding-level noise (Unicode forms, invisible characters,
whitespace) and applies two opt-in surface choices (KJV brackets, lowercase); it never changes words.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import TYPE_CHECKING

import pandas as pd

from lmpipe.errors import LmpipeError

if TYPE_CHECKING:
    from lmpipe.data.corpus import DataConfig

UNICODE_FORMS = ("NFC", "NFKC", "NFD", "NFKD")
DEDUP_MODES = ("none", "row", "document")

_LINE_BREAKS = re.compile(r"\r\n?")
_SPACE_RUNS = re.compile(r" {2,}")
_SPACE_AT_LINE_EDGE = re.compile(r" ?\n ?")
_BLANK_LINE_RUNS = re.compile(r"\n{3,}")


def _char_class(codepoints: list[int]) -> re.Pattern[str]:
    """A regex matching runs of the given (sorted) code points, written as ranges.

    Ranges, not a list of characters: a class of a few hundred single characters made the regex ~8x slower.
    """
    ranges: list[list[int]] = []
    for cp in codepoints:
        if ranges and ranges[-1][1] == cp - 1:
            ranges[-1][1] = cp
        else:
            ranges.append([cp, cp])
    return re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in ranges) + "]+")


@functools.cache
def _invisible_characters() -> re.Pattern[str]:
    """Control (Cc) and format (Cf) characters except tab and newline.

    Zero-width spaces, BOMs, bidi marks and stray C0/C1 controls carry no text but would split tokens and
    defeat deduplication. Built once (~0.15 s) from the running Python's Unicode database.
    """
    category = unicodedata.category
    return _char_class(
        [
            cp
            for cp in range(sys.maxunicode + 1)
            if category(chr(cp)) in ("Cc", "Cf") and cp not in (0x09, 0x0A)
        ]
    )


@functools.cache
def _horizontal_space() -> re.Pattern[str]:
    """Whitespace other than newline: tab, no-break and typographic spaces, line/paragraph separators."""
    return _char_class([cp for cp in range(sys.maxunicode + 1) if chr(cp).isspace() and cp != 0x0A])


def clean_text(
    s: str, unicode_form: str = "NFC", strip_brackets: bool = False, lowercase: bool = False
) -> str:
    """One text in canonical form: normalised, no invisible characters, single spaces, at most one blank line."""
    if unicode_form not in UNICODE_FORMS:
        raise LmpipeError(f"data.unicode_form={unicode_form!r}: expected one of {', '.join(UNICODE_FORMS)}")
    if lowercase:
        # Before normalising, so the result is guaranteed to be in the requested form.
        s = s.lower()
    s = unicodedata.normalize(unicode_form, s)
    if strip_brackets:
        s = s.replace("[", "").replace("]", "")
    # isprintable() is False for every control, format, line-break and non-ASCII space character, so most
    # single-line texts (every KJV verse) skip the character-class passes, which dominate the cost.
    if not s.isprintable():
        # A lone "\r" is an old-Mac line break: make it "\n" before controls go, or words would merge.
        s = _LINE_BREAKS.sub("\n", s)
        s = _invisible_characters().sub("", s)
        s = _horizontal_space().sub(" ", s)
        s = _SPACE_AT_LINE_EDGE.sub("\n", s)
        s = _BLANK_LINE_RUNS.sub("\n\n", s)
    s = _SPACE_RUNS.sub(" ", s)
    return s.strip()


def clean_corpus(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """Clean every row's text, drop rows left empty and renumber `position` within each document.

    `cfg.strip_brackets` only applies to KJV rows: elsewhere square brackets are real text (code, citations).
    """
    texts = [
        clean_text(text, cfg.unicode_form, cfg.strip_brackets and source == "kjv", cfg.lowercase)
        for source, text in zip(df["source"], df["text"], strict=True)
    ]
    out = df.assign(text=pd.Series(texts, index=df.index, dtype="str"))
    out = out[out["text"] != ""]
    return _renumber_positions(out)


def deduplicate(df: pd.DataFrame, mode: str) -> tuple[pd.DataFrame, int]:
    """Drop exact duplicates, keeping the first occurrence in corpus order; returns (rows kept, n removed).

    mode "row": a row whose text already appeared anywhere earlier; n counts rows.
    mode "document": a document whose full sequence of row texts equals an earlier one's; n counts documents.
    mode "none": nothing. Compare cleaned text, so duplicates that differ only in noise are caught.
    """
    if mode == "none":
        return df, 0
    if mode == "row":
        duplicate = df["text"].duplicated(keep="first")
        return _renumber_positions(df[~duplicate]), int(duplicate.sum())
    if mode == "document":
        # Cleaned text holds no control characters, so "\x00" cannot occur inside a row and joins unambiguously.
        content = df.groupby("doc_id", sort=False)["text"].agg("\x00".join)
        duplicate_docs = content.index[content.duplicated(keep="first")]
        kept = df[~df["doc_id"].isin(duplicate_docs)]
        return kept.reset_index(drop=True), len(duplicate_docs)
    raise LmpipeError(f"data.dedup={mode!r}: expected one of {', '.join(DEDUP_MODES)}")


def _renumber_positions(df: pd.DataFrame) -> pd.DataFrame:
    # position must stay 0..n-1 within each document after rows are dropped; doc rows are contiguous.
    out = df.reset_index(drop=True)
    return out.assign(position=out.groupby("doc_id", sort=False).cumcount().astype("int64"))
