"""Tests for lmpipe.encoder.mlm: BERT's masking recipe, the encoder tokenizer's appended mask token, and a tiny
masked-LM pretraining run on the training core (metrics, resume)."""

import numpy as np
import pytest

from lmpipe.encoder.config import MLMConfig
from lmpipe.encoder.mlm import (
    FIRST_ORDINARY_ID,
    FixedMaskedWindows,
    encoder_tokenizer,
    mask_tokens,
    pretrain_encoder,
)
from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX, MASK, TOKENIZER_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = [
    "mlm.model={n_layer: 1, n_head: 2, n_embd: 32, dropout: 0.0}",
    "mlm.window=32",
    "mlm.batch_size=8",
    "mlm.test_windows=8",
    "mlm.max_steps=6",
    "mlm.warmup_steps=1",
    "mlm.val_check_interval=3",
    "mlm.limit_val_batches=1",
    "mlm.checkpoint_every_n_steps=3",
]


def test_masking_follows_the_recipe_and_spares_special_tokens():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 500, size=(200, 100))
    mask_id = 500
    inputs, labels = mask_tokens(ids, np.random.default_rng(1), MLMConfig(), mask_id)
    chosen = labels != IGNORE_INDEX
    ordinary = ids >= FIRST_ORDINARY_ID
    assert not (chosen & ~ordinary).any() and (inputs[~ordinary] == ids[~ordinary]).all()
    assert np.array_equal(labels[chosen], ids[chosen]) and (inputs[~chosen] == ids[~chosen]).all()
    assert abs(chosen.sum() / ordinary.sum() - 0.15) < 0.01
    masked = (inputs == mask_id) & chosen
    kept = (inputs == ids) & chosen
    assert abs(masked.sum() / chosen.sum() - 0.8) < 0.02
    assert abs(kept.sum() / chosen.sum() - 0.1) < 0.02  # kept on purpose (a random draw may also land on it)
    randomised = chosen & ~masked & ~kept
    assert inputs[randomised].min() >= FIRST_ORDINARY_ID and inputs[randomised].max() < mask_id


def test_ratios_are_configurable_and_checked():
    cfg = MLMConfig(mask_prob=0.5, mask_token_prob=1.0, random_token_prob=0.0)
    ids = np.arange(FIRST_ORDINARY_ID, 1000)
    inputs, labels = mask_tokens(ids, np.random.default_rng(0), cfg, 1000)
    assert (inputs[labels != IGNORE_INDEX] == 1000).all()
    with pytest.raises(LmpipeError, match=r"mlm.mask_token_prob \+ mlm.random_token_prob = 1.2"):
        MLMConfig(mask_token_prob=0.9, random_token_prob=0.3)


def test_fixed_masks_repeat_and_mask_token_is_appended(tiny_tokens):
    tokenizer, mask_id = encoder_tokenizer(tiny_tokens)
    from tokenizers import Tokenizer

    corpus = Tokenizer.from_file(str(tiny_tokens / TOKENIZER_FILE))
    assert mask_id == corpus.get_vocab_size() and corpus.token_to_id(MASK) is None
    windows = FixedMaskedWindows(np.arange(10, 400) % 50 + 6, MLMConfig(window=32), mask_id, seed=3)
    assert len(windows) == 390 // 32
    a, b = windows[2], windows[2]
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and (a[1] != IGNORE_INDEX).any()


def test_tiny_pretraining_reports_test_metrics_and_resumes(tiny_config):
    cfg = tiny_config(*TINY)
    result = pretrain_encoder(cfg)
    m = result.metrics
    assert m["steps"] == 6 and m["resumed"] is False and m["tokens_seen"] == 6 * 8 * 32
    assert 0 <= m["test"]["masked_accuracy"] <= 1 and m["test"]["mlm_loss"] > 0
    assert m["vocab_size"] == m["mask_id"] + 1 == result.encoder.config.vocab_size
    assert m["parameters_non_embedding"] < m["parameters"]
    again = pretrain_encoder(cfg)
    assert again.metrics["resumed"] is True and again.metrics["test"] == m["test"]
