import numpy as np
import pytest
from tiny_models import export_tiny_model

from lmpipe.chat import CHAT_TEMPLATE
from lmpipe.evaluation.ort_scorer import OrtScorer
from lmpipe.evaluation.scoring import TorchScorer
from lmpipe.export import ExportConfig
from lmpipe.inference.engine import OrtEngine

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "The book of Genesis comes before the book of Exodus.",
    "Which book is this verse from? Genesis. Exodus. Leviticus. Numbers.",
] * 3
PROMPTS = ["Which book is this verse from? In the beginning", "Old or New Testament?", "Genesis"]
LABELS = ["Genesis", "Exodus", "Leviticus", "Numbers", "Gen"]


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """(TorchScorer, OrtScorer) over the same tiny GPT (sinusoidal positions), exported once for the module."""
    root = tmp_path_factory.mktemp("ort_scorer")
    tok, model = export_tiny_model(
        root,
        root / "onnx",
        ExportConfig(parity_decode_steps=2),
        sentences=SENTENCES,
        pos_encoding="sinusoidal",
        seed=1,
    )
    return TorchScorer(model, tok, CHAT_TEMPLATE), OrtScorer(OrtEngine(root / "onnx", threads=1))


@pytest.mark.parametrize("max_batch", [16, 2])
def test_label_probs_match_the_torch_scorer(scorers, max_batch):
    torch_scorer, ort_scorer = scorers
    ort_scorer.max_batch = max_batch  # 2: the prompt's cache is expanded for several chunks
    expected = torch_scorer.label_probs(PROMPTS, LABELS)
    got = ort_scorer.label_probs(PROMPTS, LABELS)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert expected.max() - expected.min() > 0.05  # the labels really are told apart
    np.testing.assert_allclose(got.sum(axis=1), 1.0)


def test_choice_logliks_match_the_torch_scorer(scorers):
    torch_scorer, ort_scorer = scorers
    expected = torch_scorer.choice_logliks(PROMPTS[0], LABELS)
    np.testing.assert_allclose(ort_scorer.choice_logliks(PROMPTS[0], LABELS), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("max_batch", [16, 2])
def test_generate_matches_the_torch_scorer(scorers, max_batch):
    torch_scorer, ort_scorer = scorers
    # The ORT scorer decodes prompts of different lengths together (left-padded); the torch one, one by one.
    ort_scorer.max_batch = max_batch
    prompts = PROMPTS + PROMPTS[::-1]
    expected = torch_scorer.generate(prompts, max_new_tokens=12)
    assert ort_scorer.generate(prompts, max_new_tokens=12) == expected
    assert any(expected)


def test_forward_continues_the_past_at_the_right_positions(scorers):
    torch_scorer, ort_scorer = scorers
    ids = np.array([[7, 8, 9, 10, 11, 12]], dtype=np.int64)
    whole, _ = ort_scorer._forward(ids, None)
    _, past = ort_scorer._forward(ids[:, :4], None)
    tail, past = ort_scorer._forward(np.repeat(ids[:, 4:], 3, axis=0), ort_scorer._expand_past(past, 3))
    assert past[0][0].shape[:3] == (3, 2, 6)
    np.testing.assert_allclose(tail, np.repeat(whole[:, 4:], 3, axis=0), atol=1e-5)
    np.testing.assert_allclose(whole, torch_scorer._forward(ids, None)[0], atol=1e-4)
