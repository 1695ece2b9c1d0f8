"""Tests for lmpipe.encoder.config: the sections' bounds and cross-field checks are one-line errors."""

import pytest

from lmpipe.encoder.config import EncoderConfig, EncoderFinetuneConfig, MLMConfig
from lmpipe.errors import LmpipeError


def test_encoder_section_bounds():
    with pytest.raises(LmpipeError, match="encoder.method='adapter'"):
        EncoderFinetuneConfig(method="adapter")
    with pytest.raises(
        LmpipeError, match="encoder.tasks=\\['book', 'book'\\]: expected each task at most once"
    ):
        EncoderFinetuneConfig(tasks=["book", "book"])
    with pytest.raises(LmpipeError, match="expected below 1 so records remain for training"):
        EncoderFinetuneConfig(val_fraction=0.5, test_fraction=0.5)


def test_mlm_section_checks_its_model():
    with pytest.raises(LmpipeError, match="mlm.model.width: unknown field"):
        MLMConfig(model={"width": 3})
    with pytest.raises(LmpipeError, match="mlm.model: n_embd=10 is not divisible by n_head=4"):
        MLMConfig(model={"n_embd": 10, "n_head": 4})
    assert MLMConfig(window=48).encoder_config(vocab_size=100, pad_id=1).block_size == 48


def test_encoder_config_bounds():
    with pytest.raises(
        LmpipeError, match="encoder_model.n_layer=0: expected a value greater than or equal to 1"
    ):
        EncoderConfig(n_layer=0)
    with pytest.raises(LmpipeError, match="pad_id=9: expected below vocab_size=9"):
        EncoderConfig(vocab_size=9, pad_id=9)
