"""Assign train/val/test by holding out whole documents, stratified by group, reproducibly from a seed.

Whole documents, because neighbouring rows (verses of one chapter, paragraphs of one file) share so much
text that splitting inside a document would leak the test set into training. Stratified by group, so every
book or file of any size is represented in val and test. The order inside a group comes from a keyed hash of
(seed, doc_id), not from an RNG stream: a document's split does not depend on which other groups were
loaded or on row order, and Python's salted `hash()` would change it between processes.
"""

from __future__ import annotations

import hashlib

import pandas as pd

from lmpipe.errors import LmpipeError

SPLITS = ("train", "val", "test")

# Groups smaller than this cannot give one document to each split and keep one for training.
MIN_DOCS_TO_STRATIFY = 3


def assign_splits(df: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int) -> pd.DataFrame:
    """`df` with a `split` column (train|val|test) placed after `text`; rows of one document share a split.

    In a group of n >= 3 documents, max(1, round(fraction * n)) documents go to val and to test (none for a
    fraction of 0); smaller groups send each document to a split by comparing its hash with the fractions.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise LmpipeError(
            f"data.val_fraction={val_fraction}, data.test_fraction={test_fraction}: "
            "expected each in [0, 1) with a sum below 1"
        )
    documents = df.drop_duplicates("doc_id")[["doc_id", "group"]]
    split_of: dict[str, str] = {}
    for _, docs in documents.groupby("group", sort=False):
        keyed = sorted((_doc_hash(seed, doc_id), doc_id) for doc_id in docs["doc_id"])
        if len(keyed) >= MIN_DOCS_TO_STRATIFY:
            n_val, n_test = _held_out_counts(len(keyed), val_fraction, test_fraction)
            for rank, (_, doc_id) in enumerate(keyed):
                split_of[doc_id] = "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        else:
            for h, doc_id in keyed:
                u = h / 2**64  # uniform in [0, 1)
                split_of[doc_id] = (
                    "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
                )
    split = df["doc_id"].map(split_of).astype("str")
    out = df.drop(columns="split", errors="ignore")
    out.insert(out.columns.get_loc("text") + 1, "split", split)
    return out


def _doc_hash(seed: int, doc_id: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def _held_out_counts(n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_val = max(1, round(val_fraction * n)) if val_fraction > 0 else 0
    n_test = max(1, round(test_fraction * n)) if test_fraction > 0 else 0
    # Rounding up two large fractions can claim every document; training keeps at least one.
    while n_val + n_test > n - 1:
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    return n_val, n_test
