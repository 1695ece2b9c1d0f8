"""Tests for lmpipe.encoder.pretrained: all-MiniLM-L6-v2 loaded by the weight map computes what transformers'
BertModel computes from the same files, and bad files fail in one line."""

import json
import shutil

import pytest
import torch

from lmpipe.encoder.pretrained import (
    BERT_CONFIG_FILE,
    WEIGHTS_FILE,
    WORDPIECE_FILE,
    bundled_dir,
    load_pretrained,
)
from lmpipe.errors import LmpipeError

TEXTS = ["Jesus wept.", "In the beginning God created the heaven and the earth, and the earth was void."]


@pytest.fixture(scope="module")
def minilm():
    return load_pretrained()


def test_matches_transformers_bert_model(minilm):
    transformers = pytest.importorskip("transformers")  # in requirements.lock: runs wherever make setup ran
    model, tokenizer = minilm
    reference = transformers.BertModel.from_pretrained(str(bundled_dir()), attn_implementation="eager").eval()
    rows = tokenizer.encode(TEXTS, 64, "truncate")
    length = max(len(r) for r in rows)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)], mask[i, : len(row)] = torch.from_numpy(row), 1
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=mask).last_hidden_state
        hidden = model(input_ids, mask)
    real = mask.bool()
    torch.testing.assert_close(hidden[real], expected[real], atol=1e-4, rtol=0)
    # and the sentence-transformers embedding: the mean over real tokens
    weights = mask[..., None].float()
    torch.testing.assert_close(
        model.embed(input_ids, mask), (expected * weights).sum(1) / weights.sum(1), atol=1e-4, rtol=0
    )


def test_shape_and_tokenizer(minilm):
    model, tokenizer = minilm
    c = model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.vocab_size, c.layer_norm_eps) == (6, 384, 12, 30522, 1e-12)
    assert model.num_parameters() - model.num_parameters(non_embedding=True) == (30522 + 512 + 2) * 384
    assert tokenizer.encode(["Jesus wept."], 64, "truncate")[0].tolist() == [101, 4441, 24966, 1012, 102]


def test_long_text_truncates_with_warning_or_is_refused(minilm):
    _, tokenizer = minilm
    text = "and " * 100
    with pytest.warns(UserWarning, match="1 of 1 texts"):
        row = tokenizer.encode([text], 16, "truncate")[0]
    assert len(row) == 16 and row[-1] == 102  # [SEP] kept
    with pytest.raises(LmpipeError, match="longer than encoder.max_length=16"):
        tokenizer.encode([text], 16, "refuse")


@pytest.fixture
def copy_dir(tmp_path):
    target = tmp_path / "bert"
    target.mkdir()
    for name in (BERT_CONFIG_FILE, WORDPIECE_FILE):
        shutil.copy(bundled_dir() / name, target / name)
    (target / WEIGHTS_FILE).symlink_to(bundled_dir() / WEIGHTS_FILE)
    return target


def test_missing_weights(copy_dir):
    (copy_dir / WEIGHTS_FILE).unlink()
    with pytest.raises(LmpipeError, match=r"missing weights file .*model.safetensors"):
        load_pretrained(copy_dir)


def test_truncated_weights(copy_dir):
    data = (bundled_dir() / WEIGHTS_FILE).read_bytes()
    (copy_dir / WEIGHTS_FILE).unlink()
    (copy_dir / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(LmpipeError, match="not a complete safetensors file"):
        load_pretrained(copy_dir)


def test_other_architecture(copy_dir):
    config = json.loads((copy_dir / BERT_CONFIG_FILE).read_text())
    (copy_dir / BERT_CONFIG_FILE).write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(LmpipeError, match="model_type='gpt2'; expected 'bert'"):
        load_pretrained(copy_dir)
    (copy_dir / BERT_CONFIG_FILE).write_text(
        json.dumps(config | {"hidden_size": 256, "num_attention_heads": 8})
    )
    with pytest.raises(LmpipeError, match="which does not fit"):
        load_pretrained(copy_dir)


def test_tokenizer_that_does_not_match(copy_dir, tmp_path):
    from tiny_models import tiny_tokenizer

    tiny_tokenizer().save(str(copy_dir / WORDPIECE_FILE))
    with pytest.raises(LmpipeError, match=r"tokenizer.json: no \[PAD\] token"):
        load_pretrained(copy_dir)
    tokenizer = json.loads((bundled_dir() / WORDPIECE_FILE).read_text())
    vocab = tokenizer["model"]["vocab"]
    del vocab[max(vocab, key=vocab.get)]  # the last WordPiece: a vocabulary one token short
    (copy_dir / WORDPIECE_FILE).write_text(json.dumps(tokenizer))
    with pytest.raises(LmpipeError, match="30521 tokens but the weights have vocab_size 30522"):
        load_pretrained(copy_dir)
