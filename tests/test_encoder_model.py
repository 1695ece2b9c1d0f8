"""Tests for lmpipe.encoder.model: bidirectional attention, padding, pooling, the tied MLM head, checkpoints."""

import pytest
import torch

from lmpipe.encoder.config import EncoderConfig
from lmpipe.encoder.model import Encoder, load_encoder
from lmpipe.errors import LmpipeError
from lmpipe.model import save_checkpoint


def tiny(pooling: str = "mean", seed: int = 0) -> Encoder:
    torch.manual_seed(seed)
    config = EncoderConfig(
        vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0, pooling=pooling
    )
    return Encoder(config).eval()


def ids(shape, seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 50, shape, generator=torch.Generator().manual_seed(seed))


def test_every_position_sees_later_tokens():
    model = tiny()
    x = ids((1, 8))
    changed = x.clone()
    changed[0, 7] = changed[0, 7] % 49 + 1
    assert (model(x)[0, 0] - model(changed)[0, 0]).abs().max() > 1e-4


@pytest.mark.parametrize("pooling", ["mean", "first"])
def test_padding_changes_nothing_real(pooling):
    model = tiny(pooling)
    x = ids((1, 6))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    alone = model.embed(x, torch.ones_like(x))
    torch.testing.assert_close(model.embed(padded, mask), alone, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(padded, mask)[:, :6], model(x), atol=1e-6, rtol=0)


def test_mean_pooling_is_the_mean_of_real_states():
    model = tiny()
    x, mask = ids((2, 5)), torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    hidden = model(x, mask)
    torch.testing.assert_close(model.pool(hidden, mask)[0], hidden[0, :3].mean(0))


def test_mlm_head_is_tied_and_loss_counts_only_selected_positions():
    model = tiny()
    with torch.no_grad():
        model.wte.weight[5] += 1.0
    hidden = model(ids((1, 4)))
    manual = model.mlm_ln(torch.nn.functional.gelu(model.mlm_dense(hidden))) @ model.wte.weight.T
    torch.testing.assert_close(model.mlm_logits(hidden), manual + model.mlm_bias)
    x = ids((2, 6))
    labels = torch.full_like(x, -100)
    labels[0, 2] = 7
    loss, accuracy = model.mlm_loss(x, torch.ones_like(x), labels)
    logits = model.mlm_logits(model(x, torch.ones_like(x)))[0, 2]
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits[None], torch.tensor([7])))
    assert accuracy.item() in (0.0, 1.0)


def test_too_long_input_is_one_line_error():
    with pytest.raises(LmpipeError, match="exceeds the encoder's block_size 16"):
        tiny()(ids((1, 17)))


def test_checkpoint_round_trip_and_bad_file(tmp_path):
    model = tiny("first")
    save_checkpoint(tmp_path / "e.pt", model, {"stage": "test"})
    loaded, extra = load_encoder(tmp_path / "e.pt")
    assert extra == {"stage": "test"} and loaded.config == model.config
    x = ids((2, 5))
    torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    (tmp_path / "bad.pt").write_bytes(b"nope")
    with pytest.raises(LmpipeError, match="not a readable torch checkpoint"):
        load_encoder(tmp_path / "bad.pt")
    with pytest.raises(LmpipeError, match="^missing encoder checkpoint"):
        load_encoder(tmp_path / "absent.pt")


def test_parameter_groups_cover_each_weight_once():
    model = tiny()
    groups = model.param_groups(0.1)
    names = groups[0]["param_names"] + groups[1]["param_names"]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert "wte.weight" in groups[0]["param_names"] and "wpe.weight" in groups[1]["param_names"]
    assert model.num_parameters(non_embedding=True) < model.num_parameters()
