import numpy as np
import pandas as pd
import pytest
import torch
from tiny_models import tiny_config, tiny_tokenizer

from lmpipe.chat import CHAT_TEMPLATE
from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX, PAD
from lmpipe.model import GPT
from lmpipe.training.sft_data import (
    RandomExampleBatches,
    collate,
    encode_head_examples,
    encode_lm_examples,
    rows_sha256,
)
from lmpipe.training.streams import StreamSpec

TOK = tiny_tokenizer()
PAD_ID = TOK.token_to_id(PAD)
EXAMPLES = pd.DataFrame(
    {
        "id": [f"book:{i}" for i in range(6)] + ["continue:long"],
        "task": ["book"] * 6 + ["continue"],
        "prompt": [f"Which book? In the beginning {'God ' * i}" for i in range(6)]
        + ["Go on: " + "the earth " * 40],
        "response": ["Genesis", "Exodus"] * 3 + ["and"],
        "label": ["Genesis", "Exodus"] * 3 + [None],
    }
)


def lm_rows(max_length: int = 64):
    return encode_lm_examples(EXAMPLES, TOK, CHAT_TEMPLATE, max_length)


def test_lm_rows_learn_the_response_only_and_skip_what_does_not_fit():
    rows, skipped = lm_rows()
    assert skipped == 1 and len(rows) == 6
    for row in rows:
        assert len(row["input_ids"]) == len(row["labels"]) <= 64
        labelled = row["labels"] != IGNORE_INDEX
        assert labelled.any() and not labelled[0]  # the prompt's labels are ignored
        assert np.flatnonzero(labelled).min() == np.flatnonzero(~labelled).max() + 1  # then the response


def test_head_rows_number_tasks_and_labels_in_the_label_sets_order():
    rows, skipped = encode_head_examples(EXAMPLES, TOK, CHAT_TEMPLATE, 64, {"book": ["Exodus", "Genesis"]})
    assert (
        skipped == 0 and [row["label"] for row in rows] == [1, 0] * 3 and {row["task"] for row in rows} == {0}
    )
    assert all(row["last"] == len(row["input_ids"]) - 1 for row in rows)
    with pytest.raises(
        LmpipeError, match=r"^instruction example 'book:0': label 'Genesis' is not in the book"
    ):
        encode_head_examples(EXAMPLES, TOK, CHAT_TEMPLATE, 64, {"book": ["Exodus"]})


def test_right_padding_does_not_change_the_logits_of_real_tokens():
    rows, _ = lm_rows()
    short, long = sorted(rows, key=lambda r: len(r["input_ids"]))[:: len(rows) - 1]
    n = len(short["input_ids"])
    torch.manual_seed(0)
    model = GPT(tiny_config(TOK.get_vocab_size())).eval()
    alone = model(torch.from_numpy(short["input_ids"])[None]).logits[0]
    for pad_id in (PAD_ID, 9):
        batch = collate([short, long], pad_id)
        assert batch["input_ids"].shape[1] > n and (batch["labels"][0, n:] == IGNORE_INDEX).all()
        assert (batch["input_ids"][0, n:] == pad_id).all()
        torch.testing.assert_close(model(batch["input_ids"]).logits[0, :n], alone, rtol=0, atol=1e-6)


def test_random_batches_are_a_pure_function_of_seed_index_and_rank():
    rows, _ = lm_rows()

    def batches(seed=0, rank=0, start=0):
        return RandomExampleBatches(
            rows, 4, PAD_ID, StreamSpec(seed, batches_per_epoch=3, start_batch=start, rank=rank)
        )

    first = batches().batch(2)
    assert all(torch.equal(first[k], batches().batch(2)[k]) for k in first)  # a fresh dataset, as on resume
    for other in (batches().batch(3), batches(rank=1).batch(2), batches(seed=1).batch(2)):
        assert any(not torch.equal(first[k], other[k]) for k in first)
    resumed = list(batches(start=2))
    assert len(resumed) == 1 and torch.equal(resumed[0]["labels"], first["labels"])


def test_the_rows_hash_follows_every_id():
    rows, _ = lm_rows()
    base = rows_sha256({"train": rows, "val": rows[:2]})
    assert base == rows_sha256({"val": rows[:2], "train": rows})
    changed = [dict(row) for row in rows]
    changed[0]["labels"] = changed[0]["labels"].copy()
    changed[0]["labels"][-1] += 1
    assert rows_sha256({"train": changed, "val": rows[:2]}) != base
    assert rows_sha256({"train": rows, "val": rows[:1]}) != base
