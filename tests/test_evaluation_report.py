import math

import pytest

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.lm import perplexity
from lmpipe.evaluation.ngram import KneserNeyLM
from lmpipe.evaluation.report import EvaluateConfig, markdown_table, model_row, ngram_baseline
from lmpipe.tokenizer import read_meta, read_shard


class Uniform:
    """A causal LM that gives every token the same probability: perplexity = vocabulary size."""

    def __init__(self, vocab: int, block_size: int = 16):
        import torch

        self.torch, self.vocab = torch, vocab
        self.config = type("Config", (), {"block_size": block_size})()
        self.training = False

    def __call__(self, idx, **kwargs):
        return type("Out", (), {"logits": self.torch.zeros(*idx.shape, self.vocab)})()

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def num_parameters(self):
        return 1234


def test_model_row_of_a_uniform_model_is_the_vocabulary_size(tiny_tokens):
    vocab = read_meta(tiny_tokens)["vocab_size"]
    row = model_row(Uniform(vocab), tiny_tokens, batch_size=4)
    assert row["test_ppl"] == pytest.approx(vocab, rel=1e-5)
    assert row["test_nll_per_token"] == pytest.approx(math.log(vocab), rel=1e-5)
    assert row["parameters"] == 1234 and row["scored_tokens"] == len(read_shard(tiny_tokens, "test")) - 1
    n_bytes = read_meta(tiny_tokens)["splits"]["test"]["n_bytes"]
    assert row["test_bpb"] == pytest.approx(row["scored_tokens"] * math.log2(vocab) / n_bytes, rel=1e-5)


def test_ngram_baseline_scores_test_with_the_order_best_on_val(tiny_tokens):
    row = ngram_baseline(tiny_tokens, [1, 2], 10**9)
    assert set(row["val_ppl_by_order"]) == {"1", "2"}
    assert row["order"] == int(min(row["val_ppl_by_order"], key=lambda k: row["val_ppl_by_order"][k]))
    vocab = read_meta(tiny_tokens)["vocab_size"]
    train, test = read_shard(tiny_tokens, "train"), read_shard(tiny_tokens, "test")
    nats, n = KneserNeyLM().fit(train, row["order"], vocab).nll(test)
    assert row["test_ppl"] == pytest.approx(perplexity(nats, n)) and row["scored_tokens"] == n


def test_markdown_table_rounds_for_reading_and_leaves_gaps_blank():
    table = markdown_table({"a": {"x": 1 / 3, "n": 123_456}, "b": {"x": None}}, ["x", "n"])
    assert table.splitlines() == [
        "| variant | x | n |",
        "|---|---|---|",
        "| a | 0.3333 | 123,456 |",
        "| b |  |  |",
    ]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"variants": []}, r"evaluate.variants=\[\]: expected List should have at least 1 item"),
        ({"ngram_orders": [0, 3]}, r"evaluate.ngram_orders.0=0: expected a value greater than or equal to 1"),
        ({"batch_size": 0}, "evaluate.batch_size=0: expected a value greater than or equal to 1"),
        ({"stride": -1}, "evaluate.stride=-1: expected a value greater than or equal to 0"),
        ({"tasks": "yes"}, "evaluate.tasks='yes': expected a valid boolean"),
        ({"shuffle": True}, "evaluate.shuffle: unknown field"),
        ({"post_training": {"dpo": "models/dpo"}}, r"evaluate.post_training=.*: expected a step named sft"),
    ],
)
def test_evaluate_config_errors_name_the_field(kwargs, message):
    with pytest.raises(LmpipeError, match=f"^{message}"):
        EvaluateConfig(**kwargs)


def test_ngram_baseline_fits_a_bounded_sample_of_train(tiny_tokens):
    from lmpipe.evaluation.ngram import spread_sample

    full = ngram_baseline(tiny_tokens, [2], 10**9)
    assert "train_tokens_fitted" not in full  # the whole split: the row as before the bound
    row = ngram_baseline(tiny_tokens, [2], 640)
    assert row["train_tokens_fitted"] == 640
    vocab = read_meta(tiny_tokens)["vocab_size"]
    sample = spread_sample(read_shard(tiny_tokens, "train"), 640)
    nats, n = KneserNeyLM().fit(sample, 2, vocab).nll(read_shard(tiny_tokens, "test"))
    assert row["test_ppl"] == pytest.approx(perplexity(nats, n)) != full["test_ppl"]
