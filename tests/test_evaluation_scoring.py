import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_config, tiny_tokenizer

from lmpipe.chat import CHAT_TEMPLATE, prompt_text
from lmpipe.errors import LmpipeError
from lmpipe.evaluation.scoring import Scorer, TorchScorer, parse_answer
from lmpipe.model import GPT
from lmpipe.tokenizer import ASSISTANT, END, EOT

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "The book of Genesis comes before the book of Exodus.",
    "Which book is this verse from? Genesis. Exodus. Leviticus. Numbers.",
    "Now these are the names of the children of Israel, which came into Egypt.",
] * 3


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(SENTENCES)


class PlantedScorer(Scorer):
    """After the last <|assistant|>, favours the next token of `answer` (its tokens, then END) by `margin`
    while the answer so far matches; every other logit is 0.

    The past is the token history, so an answer is only favoured if `Scorer` carries the prompt's cache into
    later calls (and expands it to the batch).
    """

    def __init__(self, tok, answer: str, margin: float = 10.0, block_size: int = 64):
        super().__init__(tok, CHAT_TEMPLATE, block_size)
        self.vocab = tok.get_vocab_size()
        self.answer = tok.encode(answer).ids + [self.end_id]
        self.assistant_id = tok.token_to_id(ASSISTANT)
        self.margin = margin
        self.calls: list[tuple[int, int]] = []

    def _forward(self, ids, past):
        self.calls.append(ids.shape)
        history = np.zeros((ids.shape[0], 0), dtype=np.int64) if past is None else past
        assert history.shape[0] == ids.shape[0]
        full = np.concatenate([history, ids], axis=1)
        logits = np.zeros((*ids.shape, self.vocab), dtype=np.float32)
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                seen = full[b, : history.shape[1] + t + 1].tolist()
                if self.assistant_id not in seen:
                    continue
                after = seen[len(seen) - seen[::-1].index(self.assistant_id) :]
                if len(after) < len(self.answer) and after == self.answer[: len(after)]:
                    logits[b, t, self.answer[len(after)]] = self.margin
        return logits, full

    def _expand_past(self, past, n):
        assert past.shape[0] == 1
        return np.repeat(past, n, axis=0)

    def _masked_forward(self, ids, positions, mask, past):
        # The planted answer depends only on the tokens after the last <|assistant|>: left padding cannot
        # change it, so positions and mask need no part here.
        return self._forward(ids, past)

    def _select_past(self, past, rows):
        return past[rows]


def favoured(scorer: PlantedScorer) -> float:
    """Log-probability of the favoured token."""
    return scorer.margin - math.log(math.exp(scorer.margin) + scorer.vocab - 1)


def unfavoured(scorer: PlantedScorer) -> float:
    """Log-probability of another token where one is favoured."""
    return -math.log(math.exp(scorer.margin) + scorer.vocab - 1)


def test_choice_logliks_match_the_planted_model_exactly(tok):
    scorer = PlantedScorer(tok, "Genesis")
    scorer.max_batch = 1  # one continuation per batch: each chunk must get its own expanded cache
    n_genesis = len(tok.encode("Genesis").ids) + 1
    n_exodus = len(tok.encode("Exodus").ids) + 1
    assert tok.encode("Exodus").ids[0] != tok.encode("Genesis").ids[0]
    got = scorer.choice_logliks("Which book?", ["Exodus", "Genesis"])
    # Exodus: its first token is not the favoured one, then nothing is favoured (uniform over V).
    want_exodus = unfavoured(scorer) - (n_exodus - 1) * math.log(scorer.vocab)
    np.testing.assert_allclose(got, [want_exodus, n_genesis * favoured(scorer)], rtol=1e-6)
    assert got.argmax() == 1


def test_label_probs_pick_the_planted_label_not_its_prefix(tok):
    scorer = PlantedScorer(tok, "Genesis")
    labels = ["Gen", "Exodus", "Genesis"]
    probs = scorer.label_probs(["Which book is this from?", "And another?"], labels)
    assert probs.shape == (2, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs.argmax(axis=1) == 2).all()
    logliks = scorer.choice_logliks("Which book is this from?", labels)
    np.testing.assert_allclose(probs[0], np.exp(logliks) / np.exp(logliks).sum(), rtol=1e-6)
    # "Gen" must be closed by END, which the planted model does not favour there.
    assert probs[0, 0] < 1e-3


def test_continuation_logprobs_batches_the_prompt_once_per_chunk(tok):
    scorer = PlantedScorer(tok, "Genesis")
    scorer.max_batch = 2
    prompt = tok.encode(prompt_text("Which book?")).ids
    continuations = [[10, 11, 12], [7], [8, 9], [13, 14]]
    scorer.continuation_logprobs(prompt, continuations)
    # The prompt once, then chunks of the shortest first, fed without their last token and right-padded to
    # the chunk's longest: [7], [8, 9] need 1 column, [13, 14], [10, 11, 12] need 2.
    assert scorer.calls == [(1, len(prompt)), (2, 1), (2, 2)]


def test_generate_stops_at_end_and_uses_the_cache(tok):
    scorer = PlantedScorer(tok, "Genesis")
    n = len(tok.encode("Genesis").ids)
    assert scorer.generate(["Which book?"], max_new_tokens=20) == ["Genesis"]
    # A prefill, then one token per step; the END that stops generation is never fed.
    prompt_len = len(tok.encode(prompt_text("Which book?")).ids)
    assert scorer.calls == [(1, prompt_len)] + [(1, 1)] * n
    first = tok.decode(tok.encode("Genesis").ids[:1])
    assert scorer.generate(["Which book?"], max_new_tokens=1) == [first]


def test_prompts_too_long_for_the_block_raise(tok):
    scorer = PlantedScorer(tok, "Genesis", block_size=16)
    long_prompt = "In the beginning God created the heaven and the earth. " * 3
    with pytest.raises(LmpipeError, match=r"prompt of \d+ tokens .* exceeds block_size=16"):
        scorer.label_probs([long_prompt], ["Genesis"])
    with pytest.raises(LmpipeError, match="block_size=16"):
        scorer.generate([long_prompt], max_new_tokens=4)


def test_parse_answer():
    assert parse_answer("  Genesis <|end|>Exodus") == "Genesis"
    assert parse_answer("\nGenesis\nand more") == "Genesis"
    assert parse_answer("<|end|>Genesis") == ""
    assert parse_answer("") == ""


def tiny_gpt(vocab_size: int, pos_encoding: str = "learned") -> GPT:
    torch.manual_seed(0)
    model = GPT(tiny_config(vocab_size, pos_encoding))
    with torch.no_grad():  # larger logits than at init, so an off-by-one position shows in the scores
        model.wte.weight.mul_(20)
    return model.eval()


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_torch_continuation_logprobs_equal_brute_force(tok, pos_encoding, one_torch_thread):
    vocab = tok.get_vocab_size()
    model = tiny_gpt(vocab, pos_encoding)
    scorer = TorchScorer(model, tok)
    scorer.max_batch = 2
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, vocab, 9).tolist()
    continuations = [rng.integers(0, vocab, n).tolist() for n in (1, 4, 2, 6, 3)]
    got = scorer.continuation_logprobs(prompt, continuations)
    for continuation, score in zip(continuations, got, strict=True):
        full = torch.tensor([prompt + continuation])
        with torch.no_grad():
            logp = torch.log_softmax(model(full).logits[0].double(), dim=-1)
        want = sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(continuation))
        assert score == pytest.approx(want, abs=1e-4)
    # Far from a uniform model, so the comparison above could tell positions apart.
    uniform = -np.array([len(c) for c in continuations]) * math.log(vocab)
    assert np.abs(got - uniform).max() > 1.0


def test_torch_label_probs_rows_sum_to_one(tok, one_torch_thread):
    scorer = TorchScorer(tiny_gpt(tok.get_vocab_size()), tok)
    labels = ["Genesis", "Exodus", "Gen", "Numbers"]
    probs = scorer.label_probs(["Which book?", "In the beginning God created"], labels)
    assert probs.shape == (2, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    logliks = scorer.choice_logliks("Which book?", labels)
    np.testing.assert_allclose(
        probs[0], np.exp(logliks - logliks.max()) / np.exp(logliks - logliks.max()).sum()
    )


def test_torch_generate_matches_greedy_model_generate(tok, one_torch_thread):
    model = tiny_gpt(tok.get_vocab_size())
    scorer = TorchScorer(model, tok)
    stops = {tok.token_to_id(END), tok.token_to_id(EOT)}
    prompts = ["Which book?", "In the beginning", "And the earth was without form, and void"]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([tok.encode(prompt_text(prompt)).ids])
        out = model.generate(ids, max_new_tokens=12, temperature=0)[0, ids.shape[1] :].tolist()
        cut = next((i for i, t in enumerate(out) if t in stops), len(out))
        expected.append(tok.decode(out[:cut], skip_special_tokens=True))
        assert scorer.generate([prompt], max_new_tokens=12) == expected[-1:]
    # Together: prompts of three lengths in one left-padded batch, and in batches of two.
    assert scorer.generate(prompts, max_new_tokens=12) == expected
    scorer.max_batch = 2
    assert scorer.generate(prompts[::-1], max_new_tokens=12) == expected[::-1]


def test_torch_scorer_rejects_a_smaller_model_vocab(tok):
    with pytest.raises(LmpipeError, match="model.vocab_size=100"):
        TorchScorer(tiny_gpt(100), tok)
