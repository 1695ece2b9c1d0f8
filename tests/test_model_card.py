import json

import pytest

from lmpipe.model_card import model_card

CONFIG = {
    "model": {"n_embd": 32, "pos_encoding": "rotary"},
    "input_names": [],
    "output_names": [],
    "n_layer": 2,
    "n_head": 2,
    "head_dim": 16,
    "vocab_size": 300,
    "block_size": 64,
    "end_id": 5,
    "eot_id": 0,
    "pad_id": 1,
    "variant": "tiny",
    "opset": 20,
    "quantization": "none",
}


@pytest.fixture
def onnx_dir(tmp_path):
    """What the card reads of an export: config.json and the graph's size (the graph itself is not loaded)."""
    directory = tmp_path / "tiny"
    directory.mkdir()
    (directory / "model.onnx").write_bytes(b"\0" * 2_000_000)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    return directory


def test_model_card_says_what_the_model_is(onnx_dir):
    card = model_card(onnx_dir, {"tasks.book.f1_macro": 0.41234}, {"git commit": "abc123"})
    assert card.startswith("# tiny (lmpipe)")
    assert "| tasks.book.f1_macro | 0.4123 |" in card
    assert "| git commit | abc123 |" in card
    assert "## Data" in card and "## Limitations" in card
    assert "| context | 64 tokens |" in card and "| layers x heads x width | 2 x 2 x 32 |" in card
    assert "| model.onnx | 2.00 MB |" in card and "fp32 weights" in card
    assert "None: evaluate.json has no row 'onnx-tiny'" in model_card(onnx_dir, {}, {})


def test_the_data_section_is_the_runs_own_corpus(onnx_dir):
    data = {"_target_": "lmpipe.data.corpus.DataConfig", "source": "text", "dedup": "row"}
    metrics = {"tasks.book.f1_macro": 0.4, "tasks.continue.token_f1": 0.2, "lm.test_ppl": 50.0}
    card = model_card(onnx_dir, metrics, {}, data)
    assert "source='text', dedup='row'" in card and "_target_" not in card
    assert "tasks (book, continue)" in card
    assert "Bible" not in card and "testament" not in card
    assert "was not recorded" in model_card(onnx_dir, metrics, {})


def test_an_int8_export_says_so(onnx_dir):
    (onnx_dir / "config.json").write_text(json.dumps({**CONFIG, "quantization": "dynamic-int8"}))
    assert "Dynamic int8 quantization can change" in model_card(onnx_dir, {}, {})
