import numpy as np
import pytest
from tiny_models import make_model_dir, tiny_tokenizer

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.variants import Variant, load_variant, torch_variant_name, unique_names


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


def test_variants_sharing_a_name_are_named_by_their_directory(tmp_path):
    def variant(name, directory):
        return Variant(name, tmp_path / directory, "torch", None, None, None, 0)

    named = unique_names([variant("pretrained", "p"), variant("sft-full", "a"), variant("sft-full", "b")])
    assert list(named) == ["pretrained", f"sft-full ({tmp_path / 'a'})", f"sft-full ({tmp_path / 'b'})"]
    with pytest.raises(
        LmpipeError, match=r"evaluate.variants lists .*/a twice; expected each model directory once"
    ):
        unique_names([variant("x", "a"), variant("y", "a")])
