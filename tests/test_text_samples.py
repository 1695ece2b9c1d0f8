import pandas as pd
import torch
from tiny_models import tiny_config, tiny_tokenizer

from lmpipe.chat import CHAT_TEMPLATE
from lmpipe.formats import END
from lmpipe.model import GPT
from lmpipe.text_samples import answer_samples, format_samples, generate_samples, spread


def tiny_gpt():
    tok = tiny_tokenizer()
    torch.manual_seed(0)
    return GPT(tiny_config(tok.get_vocab_size())), tok


def test_samples_are_seeded_and_leave_the_model_in_eval_mode():
    model, tok = tiny_gpt()
    model.train()
    first = generate_samples(model, tok, ["In the", "And"], 6, seed=3)
    assert not model.training
    assert first == generate_samples(model, tok, ["In the", "And"], 6, seed=3)
    assert [s["prompt"] for s in first] == ["In the", "And"] and all(s["completion"] for s in first)
    assert first != generate_samples(model, tok, ["In the", "And"], 6, seed=4)


class Scripted:
    """Stands in for a GPT whose continuation is fixed: `new` token ids after the prompt."""

    def __init__(self, new: list[int]):
        self.new = new

    def eval(self):
        return self

    def generate(self, idx, max_new_tokens, **sampling):
        return torch.cat([idx, torch.tensor([self.new[:max_new_tokens]])], dim=1)


def test_a_sample_stops_at_the_end_token():
    tok = tiny_tokenizer()
    eot, word = tok.token_to_id(END), tok.encode(" God").ids
    samples = generate_samples(Scripted([*word, eot, *word]), tok, ["In the"], 8, seed=0, eot_id=eot)
    assert samples[0]["completion"] == tok.decode(word)


def test_spread_picks_rows_evenly_over_the_frame():
    frame = pd.DataFrame({"i": range(10)})
    assert spread(frame, 3)["i"].tolist() == [0, 4, 9]
    assert spread(frame, 0).empty and spread(frame.iloc[:0], 3).empty
    assert spread(frame, 50)["i"].tolist() == list(range(10))


def test_answer_samples_pair_each_answer_with_its_reference():
    model, tok = tiny_gpt()
    examples = pd.DataFrame(
        {"prompt": [f"Question {i}" for i in range(6)], "response": [f"A{i}" for i in range(6)]}
    )
    samples = answer_samples(model, tok, CHAT_TEMPLATE, examples, 2, 4, seed=0)
    assert [(s["prompt"], s["reference"]) for s in samples] == [("Question 0", "A0"), ("Question 5", "A5")]
    assert answer_samples(model, tok, CHAT_TEMPLATE, examples, 0, 4, seed=0) == []


def test_format_samples_shows_each_prompt_and_its_continuation():
    text = format_samples([{"prompt": "In", "completion": " the"}, {"prompt": "And", "completion": " God"}])
    assert text == "### 'In'\nIn the\n\n### 'And'\nAnd God\n"
