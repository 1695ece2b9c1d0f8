import numpy as np
import pytest
from tiny_models import make_model_dir, tiny_tokenizer

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.variants import load_variant, torch_variant_name


@pytest.mark.parametrize(
    ("extra", "name"),
    [
        ({"stage": "pretrain"}, "pretrained"),
        ({"stage": "sft", "method": "lora"}, "sft-lora"),
        ({"stage": "distill", "variant": "student-nodistill"}, "student-nodistill"),
        ({"stage": "test"}, "test"),
        ({}, "model"),
    ],
)
def test_a_torch_model_is_named_by_the_stage_that_saved_it(extra, name):
    assert torch_variant_name(extra) == name


def test_a_torch_model_directory_opens_with_every_interface(tmp_path):
    model = make_model_dir(tmp_path / "m", tiny_tokenizer())
    variant = load_variant(tmp_path / "m")
    assert (variant.name, variant.kind, variant.heads) == ("test", "torch", None)
    assert variant.vocab_size == model.config.vocab_size and variant.scorer.block_size == 64
    assert variant.file_bytes == (tmp_path / "m" / "model.pt").stat().st_size
    ids = np.zeros((1, 3), dtype=np.int64)
    logits, past = variant.step(ids, ids, None)
    assert logits.shape == (1, 3, model.config.vocab_size) and len(past) == model.config.n_layer


def test_a_directory_without_a_model_is_one_line(tmp_path):
    with pytest.raises(LmpipeError, match=r"no model.onnx or model.pt; expected a model directory"):
        load_variant(tmp_path)
