import numpy as np
import pytest

from lmpipe.data.dedup import HashSet, MinHasher, content_hash, content_hashes


def test_hash_set_keeps_first_occurrences_like_a_python_set():
    rng = np.random.default_rng(0)
    hs, seen = HashSet(), set()
    for size in (1, 10, 1000, 70_000, 5000, 100_000):  # large batches force merges of the two arrays
        batch = rng.integers(0, 300_000, size=size).astype(np.uint64)
        expected = []
        for h in batch.tolist():
            expected.append(h not in seen)
            seen.add(h)
        assert hs.add(batch).tolist() == expected
    assert len(hs) == len(seen)
    assert hs.contains(np.array(sorted(seen)[:5], dtype=np.uint64)).all()
    assert not hs.contains(np.array([300_001], dtype=np.uint64)).any()
    assert hs.add(np.zeros(0, dtype=np.uint64)).tolist() == []


def test_content_hash_is_stable_and_distinguishes_texts():
    assert content_hash("In the beginning") == content_hash("In the beginning")
    assert content_hash("a\x00b") != content_hash("a\x00c")
    assert content_hashes(["x", "y", "x"]).dtype == np.uint64
    assert len(set(content_hashes([f"row {i}" for i in range(10_000)]).tolist())) == 10_000


@pytest.mark.parametrize("changed", [2, 20, 100])
def test_minhash_estimates_jaccard_similarity(changed):
    words = [f"w{i}" for i in range(400)]
    other = list(words)
    for i in range(0, changed * 4, 4):
        other[i] = f"x{i}"
    hasher = MinHasher(shingle=3, num_perm=256, bands=32, seed=0)
    a, b = hasher.shingle_hashes(" ".join(words)), hasher.shingle_hashes(" ".join(other))
    jaccard = len(np.intersect1d(a, b)) / len(np.union1d(a, b))
    sa, sb = hasher.signature(" ".join(words)), hasher.signature(" ".join(other))
    assert abs((sa == sb).mean() - jaccard) < 0.1
    # Near copies share a band key; unrelated texts do not.
    near = bool(np.intersect1d(hasher.band_keys(" ".join(words)), hasher.band_keys(" ".join(other))).size)
    assert near == (jaccard > 0.8) or 0.5 < jaccard < 0.8
    unrelated = hasher.band_keys(" ".join(f"z{i}" for i in range(400)))
    assert not np.intersect1d(hasher.band_keys(" ".join(words)), unrelated).size


def test_minhash_threshold_and_short_texts():
    assert MinHasher(5, 128, 16).threshold == pytest.approx((1 / 16) ** (1 / 8))
    hasher = MinHasher(5, 16, 4)
    assert len(hasher.shingle_hashes("two words")) == 1  # fewer words than a shingle: one shingle
    assert (hasher.band_keys("two words") == hasher.band_keys("two  words")).all()
    with pytest.raises(ValueError, match="multiple of bands"):
        MinHasher(5, 10, 4)
