import math
from collections import Counter, defaultdict
from fractions import Fraction

import numpy as np
import pytest

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.lm import perplexity
from lmpipe.evaluation.ngram import KneserNeyLM, select_order


def markov_tokens(n: int, vocab: int, seed: int, process: int = 0) -> np.ndarray:
    """A second-order Markov stream: each (a, b) context strongly prefers two of the tokens.

    `process` fixes the transition table, `seed` the sample drawn from it.
    """
    favourites = np.random.default_rng(process).integers(0, vocab, size=(vocab, vocab, 2))
    rng = np.random.default_rng(seed)
    out = list(rng.integers(0, vocab, size=2))
    for _ in range(n - 2):
        a, b = out[-2], out[-1]
        out.append(favourites[a, b, rng.integers(2)] if rng.random() < 0.9 else rng.integers(vocab))
    return np.array(out, dtype=np.uint16)


class ReferenceKN:
    """Slow, dictionary-based interpolated Kneser-Ney written straight from the formula, for cross-checks."""

    def __init__(self, train, order, vocab):
        seq = [int(t) for t in train]
        self.order, self.vocab = order, vocab
        raw = {
            k: Counter(tuple(seq[i : i + k]) for i in range(len(seq) - k + 1)) for k in range(1, order + 1)
        }
        self.counts = {order: raw[order]}
        for k in range(1, order):
            left = defaultdict(set)
            for gram in raw[k + 1]:
                left[gram[1:]].add(gram[0])
            self.counts[k] = {g: len(xs) for g, xs in left.items()}
        self.discount, self.total, self.types = {}, {}, {}
        for k, counts in self.counts.items():
            n1 = sum(c == 1 for c in counts.values())
            n2 = sum(c == 2 for c in counts.values())
            self.discount[k] = n1 / (n1 + 2 * n2) if n1 else 0.5  # no singletons: the documented fallback
            self.total[k], self.types[k] = Counter(), Counter()
            for g, c in counts.items():
                self.total[k][g[:-1]] += c
                self.types[k][g[:-1]] += 1

    def prob(self, context, w) -> float:
        context = tuple(int(t) for t in context)[-(self.order - 1) :] if self.order > 1 else ()
        p = 1.0 / self.vocab
        for k in range(1, len(context) + 2):
            h = context[len(context) - (k - 1) :]
            total = self.total[k][h]
            if total:
                d = self.discount[k]
                p = (max(self.counts[k].get((*h, w), 0) - d, 0) + d * self.types[k][h] * p) / total
        return p

    def logprobs(self, seq):
        return np.array(
            [math.log(self.prob(seq[max(0, i - self.order + 1) : i], int(seq[i]))) for i in range(len(seq))]
        )


def test_bigram_matches_hand_computed_formula():
    train = np.array([0, 1, 0, 1, 2, 1, 2, 0])  # vocab 4: token 3 never occurs
    lm = KneserNeyLM().fit(train, order=2, vocab_size=4)

    # Bigram counts: 01:2 10:1 12:2 21:1 20:1 -> n1=3, n2=2, D2 = 3/(3+2*2).
    bigram = {(0, 1): 2, (1, 0): 1, (1, 2): 2, (2, 1): 1, (2, 0): 1}
    d2 = Fraction(3, 7)
    # Continuation counts (distinct left neighbours): 0 <- {1,2}, 1 <- {0,2}, 2 <- {1}, 3 <- {} -> total 5,
    # 3 types, n1=1 (token 2), n2=2 -> D1 = 1/(1+2*2).
    cont = {0: 2, 1: 2, 2: 1, 3: 0}
    d1 = Fraction(1, 5)
    assert lm.discounts == pytest.approx((float(d1), float(d2)), abs=1e-15)

    def p1(w):  # (max(N1+(. w) - D1, 0) + D1 * types * 1/V) / total
        return (max(cont[w] - d1, 0) + d1 * 3 * Fraction(1, 4)) / 5

    assert [p1(w) for w in range(4)] == [
        Fraction(39, 100),
        Fraction(39, 100),
        Fraction(19, 100),
        Fraction(3, 100),
    ]

    def p2(w, h):  # (max(c(h w) - D2, 0) + D2 * N1+(h .) * P1(w)) / c(h .)
        total = sum(c for (a, _), c in bigram.items() if a == h)
        types = sum(1 for (a, _) in bigram if a == h)
        return (max(bigram.get((h, w), 0) - d2, 0) + d2 * types * p1(w)) / total

    for h in (0, 1, 2):
        np.testing.assert_allclose(lm.prob_table([h]), [float(p2(w, h)) for w in range(4)], rtol=1e-12)
    # Context 3 was never seen: back off fully to the unigram level.
    np.testing.assert_allclose(lm.prob_table([3]), [float(p1(w)) for w in range(4)], rtol=1e-12)
    np.testing.assert_allclose(lm.prob_table([]), [float(p1(w)) for w in range(4)], rtol=1e-12)

    seq = np.array([2, 0, 1, 3, 0])
    expected = [p1(2), p2(0, 2), p2(1, 0), p2(3, 1), p1(0)]  # last context (3) unseen -> unigram
    np.testing.assert_allclose(np.exp(lm.logprobs(seq)), [float(x) for x in expected], rtol=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4, 5])
def test_distribution_sums_to_one_for_seen_and_unseen_contexts(order):
    vocab = 40
    train = markov_tokens(3000, vocab - 3, seed=order)  # ids 37..39 never occur
    lm = KneserNeyLM().fit(train, order, vocab)
    rng = np.random.default_rng(0)
    contexts = [[], train[100:104], train[:1], [39, 38, 37, 39], [1, 39], rng.integers(0, vocab, 6)]
    contexts += [train[i : i + order - 1] for i in rng.integers(0, len(train) - order, 5)]
    for context in contexts:
        p = lm.prob_table(context)
        assert p.shape == (vocab,)
        assert (p > 0).all()
        assert abs(p.sum() - 1.0) < 1e-9, (order, list(context), p.sum())


def test_unseen_token_gets_nonzero_probability():
    train = markov_tokens(2000, 10, seed=1)
    lm = KneserNeyLM().fit(train, order=3, vocab_size=12)
    seq = np.array([int(train[0]), int(train[1]), 11, 10, int(train[2])])
    lp = lm.logprobs(seq)
    assert np.isfinite(lp).all()
    assert lm.prob_table(train[:2])[11] > 0


def test_higher_order_and_more_data_lower_perplexity():
    train = markov_tokens(30_000, 20, seed=2)
    val = markov_tokens(2500, 20, seed=20)  # a fresh sample of the same process
    ppl = {order: perplexity(*KneserNeyLM().fit(train, order, 20).nll(val)) for order in (1, 2, 3)}
    assert ppl[3] < 0.8 * ppl[2] < 0.8 * ppl[1]
    small = perplexity(*KneserNeyLM().fit(train[:1000], 3, 20).nll(val))
    assert ppl[3] < 0.9 * small


def test_logprobs_agree_with_prob_table_at_random_positions():
    train = markov_tokens(5000, 30, seed=3)
    seq = markov_tokens(400, 32, seed=4)  # some ids unseen in training
    lm = KneserNeyLM().fit(train, order=4, vocab_size=32)
    lp = lm.logprobs(seq)
    for i in [0, 1, 2, 3, *np.random.default_rng(0).integers(4, len(seq), 30)]:
        # prob_table is given the whole history; only the last order-1 tokens may matter.
        assert lp[i] == pytest.approx(math.log(lm.prob_table(seq[:i])[seq[i]]), rel=1e-12)


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_vectorised_scores_match_slow_reference(order):
    rng = np.random.default_rng(order)
    train = np.concatenate([markov_tokens(400, 10, seed=5), rng.integers(0, 12, 100)])
    seq = np.concatenate([markov_tokens(150, 10, seed=6), rng.integers(0, 14, 50)])  # ids 12, 13 unseen
    lm = KneserNeyLM().fit(train, order, vocab_size=14)
    ref = ReferenceKN(train, order, vocab=14)
    assert lm.discounts == pytest.approx([ref.discount[k] for k in range(1, order + 1)], rel=1e-12)
    expected = ref.logprobs(seq)
    np.testing.assert_allclose(lm.logprobs(seq), expected, rtol=1e-11)
    total, n = lm.nll(seq)
    assert n == len(seq) - 1
    assert total == pytest.approx(-expected[1:].sum(), rel=1e-11)


def test_fit_reads_uint16_memmap(tmp_path):
    tokens = markov_tokens(2000, 50, seed=7)
    path = tmp_path / "train.bin"
    tokens.tofile(path)
    mm = np.memmap(path, dtype=np.uint16, mode="r")
    val = markov_tokens(300, 50, seed=8)
    from_memmap = KneserNeyLM().fit(mm, 3, 50).nll(val)
    from_array = KneserNeyLM().fit(tokens.astype(np.int64), 3, 50).nll(val)
    assert from_memmap == from_array


def test_explicit_discount_is_used_for_every_order():
    lm = KneserNeyLM().fit(markov_tokens(1000, 8, seed=9), 3, 8, discount=0.75)
    assert lm.discounts == (0.75, 0.75, 0.75)
    assert abs(lm.prob_table([1, 2]).sum() - 1.0) < 1e-9


def test_select_order_returns_lowest_validation_perplexity():
    train = markov_tokens(20_000, 20, seed=2)
    val = markov_tokens(2000, 20, seed=21)
    best, ppl = select_order(train, val, orders=(1, 3, 2), vocab_size=20)
    assert sorted(ppl) == [1, 2, 3]
    assert best == 3 == min(ppl, key=ppl.get)
    assert ppl[2] == perplexity(*KneserNeyLM().fit(train, 2, 20).nll(val))


def test_order_too_large_for_key_width_is_rejected():
    tokens = np.arange(100, dtype=np.uint32)
    KneserNeyLM().fit(tokens, order=3, vocab_size=65_536)  # 3 * 16 bits fits
    with pytest.raises(LmpipeError, match=r"order=4: expected 1\.\.3 .*lower order"):
        KneserNeyLM().fit(tokens, order=4, vocab_size=65_536)


def test_bad_inputs_raise_one_line_errors():
    with pytest.raises(LmpipeError, match="token ids span"):
        KneserNeyLM().fit(np.array([0, 1, 5]), 2, vocab_size=5)
    with pytest.raises(LmpipeError, match="before scoring"):
        KneserNeyLM().logprobs(np.array([0, 1]))
    with pytest.raises(LmpipeError, match="discount=1.5"):
        KneserNeyLM().fit(np.array([0, 1, 2]), 2, vocab_size=5, discount=1.5)
    with pytest.raises(LmpipeError, match="at least 2"):
        KneserNeyLM().fit(np.array([0, 1, 2]), 2, vocab_size=5).nll(np.array([1]))
    with pytest.raises(LmpipeError, match="1-D integer"):
        KneserNeyLM().fit(np.zeros((2, 3), dtype=np.int64), 2, vocab_size=5)


def test_chunked_scoring_equals_one_pass(monkeypatch):
    train, test = markov_tokens(3000, 12, seed=1), markov_tokens(1000, 12, seed=2)
    model = KneserNeyLM().fit(train, 3, 12)
    whole_nats, whole_n = model.nll(test)
    monkeypatch.setattr("lmpipe.evaluation.ngram.SCORE_CHUNK", 97)  # chunks that do not divide the array
    nats, n = model.nll(test)
    assert n == whole_n == 999
    assert nats == pytest.approx(whole_nats, rel=1e-12)


def test_spread_sample_is_bounded_and_spread():
    from lmpipe.evaluation.ngram import spread_sample

    tokens = np.arange(10_000)
    assert spread_sample(tokens, 10_000) is tokens
    sample = spread_sample(tokens, 640, slices=64)
    assert len(sample) == 640
    assert sample[0] == 0 and sample[-1] == 9_999  # first and last runs at the ends
    runs = sample.reshape(64, 10)
    assert (np.diff(runs, axis=1) == 1).all()  # contiguous runs
    assert (np.diff(runs[:, 0]) > 100).all()  # spread over the whole array
    with pytest.raises(LmpipeError, match="max_tokens=0"):
        spread_sample(tokens, 0)
