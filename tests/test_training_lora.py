import pytest
import torch
from tiny_models import tiny_config

from lmpipe.errors import LmpipeError
from lmpipe.model import GPT
from lmpipe.training.lora import LoRALinear, apply_lora, merge_lora

TARGETS = ["c_attn", "c_fc"]


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(tiny_config(50)).eval()


def ids() -> torch.Tensor:
    return torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))


def test_adapters_start_as_the_identity_and_only_they_train():
    model = gpt()
    before = model(ids()).logits
    wrapped = apply_lora(model, TARGETS, rank=4, alpha=8)
    assert wrapped == [f"blocks.{i}.{part}" for i in range(2) for part in ("attn.c_attn", "mlp.c_fc")]
    torch.testing.assert_close(model(ids()).logits, before, rtol=0, atol=0)  # B starts at zero
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{ab}" for name in wrapped for ab in ("lora_A", "lora_B")}


def test_the_same_seed_draws_the_same_adapters():
    a, b, c = gpt(), gpt(), gpt()
    apply_lora(a, TARGETS, 4, 8, seed=3)
    apply_lora(b, TARGETS, 4, 8, seed=3)
    apply_lora(c, TARGETS, 4, 8, seed=4)
    assert torch.equal(a.blocks[0].attn.c_attn.lora_A, b.blocks[0].attn.c_attn.lora_A)
    assert not torch.equal(a.blocks[0].attn.c_attn.lora_A, c.blocks[0].attn.c_attn.lora_A)


def test_merging_gives_plain_linear_layers_computing_the_same_function():
    model = gpt()
    apply_lora(model, TARGETS, rank=4, alpha=8)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(generator=torch.Generator().manual_seed(2))
    adapted = model(ids()).logits
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(gpt().state_dict())
    torch.testing.assert_close(model(ids()).logits, adapted, rtol=1e-5, atol=1e-5)


def test_a_target_that_names_no_linear_layer_is_a_one_line_error():
    with pytest.raises(LmpipeError, match=r"^sft\.lora_targets: 'c_nope' names no nn\.Linear layer .*c_attn"):
        apply_lora(gpt(), ["c_attn", "c_nope"], 4, 8)
