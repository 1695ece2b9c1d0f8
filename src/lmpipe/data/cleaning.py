"""Normalise row texts and drop exact duplicates, so the tokenizer and the splits see one canonical form.

Cleaning is deliberately conservative: it removes encoding-level noise (the Unicode form, CRLF and lone CR line
breaks, invisible control and format characters) and keeps the text otherwise as written: line breaks,
indentation, tabs and runs of spaces. Three surface choices are opt-in (collapsing whitespace, KJV brackets,
lowercase); it never changes words.
"""

from __future__ import annotations

import functools
import re
import sys
import unicodedata
from typing import Literal, get_args

import pandas as pd

from lmpipe.errors import LmpipeError

UnicodeForm = Literal["NFC", "NFKC", "NFD", "NFKD"]
DedupMode = Literal["none", "row", "document"]
UNICODE_FORMS = get_args(UnicodeForm)
DEDUP_MODES = get_args(DedupMode)

_LINE_BREAKS = re.compile(r"\r\n?")


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


def clean_text(
    s: str,
    unicode_form: str = "NFC",
    strip_brackets: bool = False,
    lowercase: bool = False,
    collapse_whitespace: bool = False,
) -> str:
    """One text in canonical form: normalised, "\\n" line breaks, no invisible characters.

    Whitespace stays as written unless `collapse_whitespace`, which turns every run of whitespace, line
    breaks included, into one space and strips both ends.
    """
    if unicode_form not in UNICODE_FORMS:
        raise LmpipeError(f"data.unicode_form={unicode_form!r}: expected one of {', '.join(UNICODE_FORMS)}")
    if lowercase:
        # Before normalising, so the result is guaranteed to be in the requested form.
        s = s.lower()
    s = unicodedata.normalize(unicode_form, s)
    if strip_brackets:
        s = s.replace("[", "").replace("]", "")
    # isprintable() is False for every control, format, line-break and non-ASCII space character, so most
    # single-line texts (every KJV verse) skip the character-class pass, which dominates the cost.
    if not s.isprintable():
        # A lone "\r" is an old-Mac line break: make it "\n" before controls go, or words would merge.
        s = _LINE_BREAKS.sub("\n", s)
        s = _invisible_characters().sub("", s)
    if collapse_whitespace:
        s = " ".join(s.split())
    return s


def clean_corpus(
    df: pd.DataFrame,
    unicode_form: str = "NFC",
    strip_brackets: bool = False,
    lowercase: bool = False,
    collapse_whitespace: bool = False,
) -> pd.DataFrame:
    """Clean every row's text (`clean_text`), drop rows left empty or blank and renumber `position` per document.

    `strip_brackets` only applies to KJV rows: elsewhere square brackets are real text (code, citations).
    """
    texts = [
        clean_text(text, unicode_form, strip_brackets and source == "kjv", lowercase, collapse_whitespace)
        for source, text in zip(df["source"], df["text"], strict=True)
    ]
    out = df.assign(text=pd.Series(texts, index=df.index, dtype="str"))
    out = out[out["text"].str.strip() != ""]
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
