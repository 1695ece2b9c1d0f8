"""Tests for lmpipe.encoder.onnx: the classifier graph matches PyTorch in ONNX Runtime, batch and length dynamic."""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from lmpipe.encoder.onnx import _batch
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE


@pytest.fixture(scope="module")
def exported(onnx_classifier):
    """(the tiny classifier, its ONNX directory): conftest's session-wide export."""
    return onnx_classifier


def test_export_holds_no_path_of_the_checkout(exported):
    # The exporter's stack traces named the source files' absolute paths: two clones gave different bytes.
    _, onnx_dir = exported
    data = (onnx_dir / ONNX_FILE).read_bytes()
    assert b"stack_trace" not in data and str(Path(__file__).resolve().parents[1]).encode() not in data


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
