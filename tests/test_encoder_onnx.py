"""Tests for lmpipe.encoder.onnx: the classifier graph matches PyTorch in ONNX Runtime, batch and length dynamic."""

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from lmpipe.encoder.classifier import EncoderClassifier
from lmpipe.encoder.config import EncoderConfig
from lmpipe.encoder.model import Encoder
from lmpipe.encoder.onnx import _batch, export_classifier
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE, PAD, TOKENIZER_FILE
from lmpipe.training.heads import ClassificationHeads


def tiny_classifier(tokens_dir) -> EncoderClassifier:
    """A random two-layer encoder classifier with two tasks over the tiny char tokenizer."""
    tokenizer = EncoderTokenizer.from_file(tokens_dir / TOKENIZER_FILE, PAD)
    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        block_size=96,
        n_layer=2,
        n_head=2,
        n_embd=32,
    )
    heads = ClassificationHeads(32, {"testament": 2, "book": 3}, seed=0)
    labels = {"testament": ["Old", "New"], "book": ["Genesis", "John", "Mark"]}
    return EncoderClassifier(Encoder(config), heads, tokenizer, labels, max_length=96)


@pytest.fixture(scope="module")
def exported(tiny_tokens, tmp_path_factory):
    """(the tiny classifier, its ONNX directory), exported once per test module."""
    classifier = tiny_classifier(tiny_tokens)
    out = tmp_path_factory.mktemp("onnx") / "onnx"
    export_classifier(classifier, out)
    return classifier, out


def test_export_matches_torch_on_other_shapes(exported):
    classifier, onnx_dir = exported
    config = json.loads((onnx_dir / ONNX_CONFIG_FILE).read_text())
    assert config["parity"]["max_abs_prob_diff"] < 1e-5
    assert (
        config["output_names"] == ["probs_testament", "probs_book"]
        and config["label_sets"]["book"][1] == "John"
    )
    session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    texts = [
        "a",
        "the longest of these texts by far, to pad the others",
        "mid length text",
    ]  # 3 rows, new length
    input_ids, mask = _batch(classifier, texts)
    testament, book = session.run(None, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(book, classifier.predict_proba("book", texts), atol=1e-5)
    np.testing.assert_allclose(testament.sum(axis=1), 1, atol=1e-5)
