"""Assign train/val/test by holding out whole documents, stratified by group, reproducibly from a seed.

Whole documents, because neighbouring rows (verses of one chapter, paragraphs of one file) share so much
text that splitting inside a document would leak the test set into training. Stratified by group, so every
book or file of any size is represented in val and test. The order inside a group comes from a keyed hash of
(seed, doc_id), not from an RNG stream: a document's split does not depend on which other groups were
loaded or on row order, and Python's salted `hash()` would change it between processes.
"""

from __future__ import annotations

import hashlib

import numpy as np
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
    groups, _ = pd.factorize(documents["group"])
    keys = np.array([doc_key(seed, doc_id) for doc_id in documents["doc_id"]], dtype=np.uint64)
    codes = split_codes(groups, keys, val_fraction, test_fraction)
    split_of = dict(zip(documents["doc_id"], np.array(SPLITS)[codes], strict=True))
    split = df["doc_id"].map(split_of).astype("str")
    out = df.drop(columns="split", errors="ignore")
    out.insert(out.columns.get_loc("text") + 1, "split", split)
    return out


def split_codes(
    groups: np.ndarray, keys: np.ndarray, val_fraction: float, test_fraction: float
) -> np.ndarray:
    """Per document, its split as an index into `SPLITS`, from its group number and its `doc_key` alone.

    The compact form of `assign_splits` (the streaming prepare keeps 12 bytes per document, not its doc_id):
    within each group, documents ranked by key; see `assign_splits` for the rule.
    """
    codes = np.zeros(len(keys), dtype=np.int8)
    order = np.lexsort((keys, groups))  # by group, then by key
    starts = np.flatnonzero(np.diff(groups[order], prepend=-1))
    for start, end in zip(starts, [*starts[1:], len(order)], strict=True):
        ranked = order[start:end]
        if len(ranked) >= MIN_DOCS_TO_STRATIFY:
            n_val, n_test = _held_out_counts(len(ranked), val_fraction, test_fraction)
            codes[ranked[:n_val]] = 1
            codes[ranked[n_val : n_val + n_test]] = 2
        else:
            u = keys[ranked].astype(np.float64) / 2**64  # uniform in [0, 1)
            codes[ranked] = np.where(u < val_fraction, 1, np.where(u < val_fraction + test_fraction, 2, 0))
    return codes


def doc_key(seed: int, doc_id: str) -> int:
    """The keyed hash that ranks a document within its group (seeded; stable across processes)."""
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
