"""Deduplication state that stays compact at any corpus size: 8-byte content hashes in numpy arrays.

- `content_hash`: a text's 64-bit BLAKE2b digest. Two different texts share one with probability ~2^-64 per
  pair (about 3e-5 for 30 million rows), so exact dedup by hash keeps the same rows as by text.
- `HashSet`: the hashes seen so far, as sorted uint64 arrays (8 bytes each, no Python objects), answering
  "which of these are new?" for a whole batch at once, keep-first.
- `MinHasher`: MinHash signatures of word shingles and their LSH band keys, for near-duplicate removal
  (Broder 1997; the banding of Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3). A document
  whose band key in any band equals a band key of an earlier kept document is a near duplicate. The chance
  that two documents of Jaccard similarity s collide in at least one of b bands of r rows is 1 - (1 - s^r)^b,
  an S-curve whose midpoint `threshold` ~ (1/b)^(1/r).
"""

from __future__ import annotations

import hashlib
import zlib

import numpy as np


def content_hash(text: str) -> int:
    """The 64-bit BLAKE2b digest of `text` (UTF-8) as an unsigned integer."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def content_hashes(texts) -> np.ndarray:
    """`content_hash` of each text, as a uint64 array."""
    return np.fromiter((content_hash(t) for t in texts), dtype=np.uint64, count=len(texts))


class HashSet:
    """A growing set of uint64 hashes kept as two sorted arrays (a large one and a recent, smaller one).

    `add` merges the recent array into the large one when it reaches a fraction of it, so adding n hashes
    costs O(n log n) overall and memory is 8 bytes per distinct hash (plus a merge's temporary copy).
    """

    def __init__(self) -> None:
        self._main = np.empty(0, dtype=np.uint64)
        self._recent = np.empty(0, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._main) + len(self._recent)

    def add(self, hashes: np.ndarray) -> np.ndarray:
        """Add `hashes` in order; return a bool mask, True where a hash was not seen before (its first copy)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        if not len(hashes):
            return np.zeros(0, dtype=bool)
        # First occurrence within the batch...
        _, first = np.unique(hashes, return_index=True)
        new = np.zeros(len(hashes), dtype=bool)
        new[first] = True
        # ...and not already in the set.
        new &= ~self.contains(hashes)
        added = np.sort(hashes[new])
        self._recent = np.union1d(self._recent, added) if len(self._recent) else added
        if len(self._recent) > max(1 << 16, len(self._main) // 4):
            self._main = np.union1d(self._main, self._recent)
            self._recent = np.empty(0, dtype=np.uint64)
        return new

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """A bool mask, True where a hash is in the set (nothing is added)."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        return self._contains(self._main, hashes) | self._contains(self._recent, hashes)

    @staticmethod
    def _contains(sorted_array: np.ndarray, hashes: np.ndarray) -> np.ndarray:
        if not len(sorted_array):
            return np.zeros(len(hashes), dtype=bool)
        at = np.searchsorted(sorted_array, hashes).clip(max=len(sorted_array) - 1)
        return sorted_array[at] == hashes


class MinHasher:
    """MinHash signatures of word `shingle`-grams with `num_perm` hash functions, cut in `bands` LSH bands."""

    def __init__(self, shingle: int, num_perm: int, bands: int, seed: int = 0) -> None:
        if num_perm % bands:
            raise ValueError(f"num_perm={num_perm} is not a multiple of bands={bands}")
        self.shingle, self.num_perm, self.bands = shingle, num_perm, bands
        rng = np.random.default_rng(seed)
        # Multiply-shift hashing (Dietzfelbinger et al.): h(x) = ((a*x + b) mod 2^64) >> 32 with a odd, three
        # numpy operations per value (a mod-prime family cost 10x more here for the same estimates).
        self._a = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64) * np.uint64(2) + np.uint64(1)
        self._b = rng.integers(0, 2**63, size=(num_perm, 1), dtype=np.uint64)

    @property
    def threshold(self) -> float:
        """Jaccard similarity at which a pair is caught with probability ~1/2: (1/bands)^(1/rows)."""
        return (1 / self.bands) ** (self.bands / self.num_perm)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """64-bit hashes of the distinct word shingles of `text` (one shingle of all words if fewer)."""
        words = text.split()
        if not words:
            return np.zeros(1, dtype=np.uint64)
        k = min(self.shingle, len(words))
        ids = np.fromiter((zlib.crc32(w.encode()) for w in words), dtype=np.uint64, count=len(words))
        # A shingle's hash: its k word crc32s combined polynomially (wrapping uint64 arithmetic).
        h = np.zeros(len(words) - k + 1, dtype=np.uint64)
        for j in range(k):
            h = h * np.uint64(1_000_003) + ids[j : len(words) - k + 1 + j]
        return np.unique(h)

    def signature(self, text: str) -> np.ndarray:
        """The MinHash signature of `text`: num_perm uint64 minima."""
        x = self.shingle_hashes(text)
        sig = np.empty(self.num_perm, dtype=np.uint64)
        # Chunks of shingles bound the (num_perm x chunk) temporary for very long documents.
        for start in range(0, len(x), 4096):
            chunk = x[start : start + 4096][None, :]
            low = ((self._a * chunk + self._b) >> np.uint64(32)).min(axis=1)
            sig = low if start == 0 else np.minimum(sig, low)
        return sig

    def band_keys(self, text: str) -> np.ndarray:
        """One uint64 key per band: a hash of the band's rows and its index (so bands never collide)."""
        rows = self.signature(text).reshape(self.bands, -1)
        digest = [
            int.from_bytes(
                hashlib.blake2b(band.tobytes() + bytes([i % 256]), digest_size=8).digest(), "little"
            )
            for i, band in enumerate(rows)
        ]
        return np.array(digest, dtype=np.uint64)
