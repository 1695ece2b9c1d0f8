import numpy as np
import pytest

from lmpipe.errors import LmpipeError
from lmpipe.inference.sampling import DEFAULTS, NUCLEUS_CANDIDATES, GenerationParams, _nucleus, sample_next

PROBS = np.array([0.5, 0.3, 0.15, 0.05])


def draws(logits: np.ndarray, params: GenerationParams, n: int = 4000, seed: int = 0) -> np.ndarray:
    """n samples for each row of logits, as an (n, B) array."""
    rng = np.random.default_rng(seed)
    return np.stack([sample_next(logits, params, rng) for _ in range(n)])


def test_greedy_is_the_argmax_of_each_row():
    logits = np.array([[0.1, 2.0, -1.0, 1.9], [3.0, 0.0, 0.0, 0.0]], dtype=np.float32)
    got = sample_next(logits, GenerationParams(), np.random.default_rng(0))
    assert got.tolist() == [1, 0]
    assert got.dtype == np.int64


def test_temperature_one_samples_the_softmax_distribution():
    counts = np.bincount(draws(np.log(PROBS)[None], GenerationParams(temperature=1.0))[:, 0], minlength=4)
    np.testing.assert_allclose(counts / counts.sum(), PROBS, atol=0.03)


def test_low_temperature_concentrates_on_the_argmax():
    sample = draws(np.log(PROBS)[None], GenerationParams(temperature=0.05), n=500)
    assert set(sample[:, 0].tolist()) == {0}


@pytest.mark.parametrize(("top_k", "support"), [(1, {0}), (2, {0, 1}), (3, {0, 1, 2})])
def test_top_k_restricts_the_support_to_the_k_most_likely(top_k, support):
    logits = np.log(PROBS)[[2, 0, 3, 1]][None]  # shuffled: the k most likely are not the first k
    sample = draws(logits, GenerationParams(temperature=1.0, top_k=top_k))[:, 0]
    assert {[2, 0, 3, 1][i] for i in set(sample.tolist())} == support


@pytest.mark.parametrize(
    ("top_p", "support"), [(0.01, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_smallest_set_reaching_top_p(top_p, support):
    sample = draws(np.log(PROBS)[None], GenerationParams(temperature=1.0, top_p=top_p), n=3000)[:, 0]
    assert set(sample.tolist()) == support


def _nucleus_by_full_sort(probs, top_p):
    """The nucleus as a plain reading of its definition: rank the whole row (ties by lower id), keep each token
    whose predecessors' sum is below top_p."""
    order = np.argsort(-probs, kind="stable")
    ranked = probs[order]
    keep = np.cumsum(ranked) - ranked < top_p
    out = np.zeros_like(probs)
    out[order[keep]] = probs[order[keep]]
    return out


@pytest.mark.parametrize("temperature", [0.3, 1.0, 5.0, 100.0])
@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.99])
def test_the_partial_ranking_keeps_exactly_the_full_sorts_nucleus(temperature, top_p):
    # Peaked rows stay within the candidates, flat ones (high temperature) need the full ranking; ties at the
    # candidates' boundary come from rounding the logits.
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = np.round(rng.normal(size=4096) * 3, 1) / temperature
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        np.testing.assert_array_equal(_nucleus(probs, top_p), _nucleus_by_full_sort(probs, top_p))
    short = np.array([0.2, 0.2, 0.3, 0.3])
    assert len(short) < NUCLEUS_CANDIDATES
    np.testing.assert_array_equal(_nucleus(short, 0.5), _nucleus_by_full_sort(short, 0.5))


def test_top_p_renormalises_within_the_nucleus():
    sample = draws(np.log(PROBS)[None], GenerationParams(temperature=1.0, top_p=0.75))[:, 0]
    assert abs((sample == 0).mean() - 0.5 / 0.8) < 0.03


def test_rows_are_sampled_independently_with_their_own_support():
    logits = np.log(np.array([[0.6, 0.4, 1e-9, 1e-9], [1e-9, 1e-9, 0.5, 0.5]]))
    sample = draws(logits, GenerationParams(temperature=1.0), n=500)
    assert set(sample[:, 0].tolist()) == {0, 1}
    assert set(sample[:, 1].tolist()) == {2, 3}


def test_same_seed_same_samples_and_another_seed_differs():
    logits = np.random.default_rng(1).normal(size=(3, 50))
    params = GenerationParams(temperature=1.0, top_k=20, top_p=0.9)
    a, b = draws(logits, params, n=30, seed=7), draws(logits, params, n=30, seed=7)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, draws(logits, params, n=30, seed=8))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("temperature", -0.1),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("stop", "###"),
        ("stop", [""]),
        ("seed", "abc"),
    ],
)
def test_invalid_params_raise_one_line_naming_the_field(field, value):
    with pytest.raises(LmpipeError, match=rf"^{field}=") as err:
        GenerationParams(**{field: value})
    assert "\n" not in str(err.value)


def test_the_defaults_are_greedy_64_tokens_with_fresh_entropy():
    assert DEFAULTS == GenerationParams(
        max_new_tokens=64, temperature=0.0, top_k=0, top_p=1.0, stop=[], seed=None
    )


def test_stop_accepts_a_tuple_as_a_list():
    assert GenerationParams(stop=("a", "b")).stop == ["a", "b"]
