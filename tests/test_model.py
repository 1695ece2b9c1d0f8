"""Tests for lmpipe.model: masking, KV cache, padding, loss, parameter bookkeeping, checkpoints, ONNX export."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmpipe.errors import LmpipeError
from lmpipe.model import ATTENTION_KERNELS, GPT, GPTConfig, attend, load_model, save_checkpoint

POS = ["learned", "sinusoidal", "rotary"]


def tiny(seed: int = 0, **overrides) -> GPT:
    fields = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    torch.manual_seed(seed)
    return GPT(GPTConfig(**(fields | overrides))).eval()


def tokens(shape, seed: int = 1, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("explicit_mask", [False, True])
@pytest.mark.parametrize("pos", POS)
def test_future_tokens_never_change_earlier_logits(pos, explicit_mask):
    model = tiny(pos_encoding=pos)
    idx = tokens((2, 12))
    changed = idx.clone()
    changed[:, 7] = (changed[:, 7] + 1) % 64
    # An all-ones attention_mask takes the explicit boolean-mask path instead of SDPA's is_causal fast path.
    kw = {"attention_mask": torch.ones_like(idx)} if explicit_mask else {}
    a, b = model(idx, **kw).logits, model(changed, **kw).logits
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=0)
    assert (a[:, 7:] - b[:, 7:]).abs().amax(dim=-1).min() > 0  # every later position does see it


@pytest.mark.parametrize("pos", POS)
def test_kv_cache_matches_full_recomputation(pos):
    model = tiny(pos_encoding=pos)
    idx = tokens((2, 14))
    full = model(idx).logits
    out = model(idx[:, :6], use_cache=True)
    torch.testing.assert_close(out.logits, full[:, :6], rtol=0, atol=1e-5)
    past = out.past_kv
    # A multi-token chunk on top of a past is where a top-left-aligned causal mask would go wrong.
    out = model(idx[:, 6:9], past_kv=past, use_cache=True)
    torch.testing.assert_close(out.logits, full[:, 6:9], rtol=0, atol=1e-5)
    past = out.past_kv
    for t in range(9, 14):
        out = model(idx[:, t : t + 1], past_kv=past, use_cache=True)
        torch.testing.assert_close(out.logits[:, 0], full[:, t], rtol=0, atol=1e-5)
        past = out.past_kv
    assert len(past) == 2 and all(k.shape == v.shape == (2, 2, 14, 8) for k, v in past)


def test_outputs_have_documented_shapes():
    model = tiny()
    out = model(tokens((3, 5)))
    assert out.logits.shape == (3, 5, 64) and out.hidden.shape == (3, 5, 16)
    assert out.loss is None and out.past_kv is None
    torch.testing.assert_close(model.lm_head(out.hidden), out.logits)


@pytest.mark.parametrize("pos", POS)
def test_generate_with_cache_equals_without_cache(pos):
    model = tiny(pos_encoding=pos)
    prompt = tokens((2, 5))
    # 20 new tokens on a 5-token prompt run past block_size=16, so the sliding-window fallback is covered too.
    cached = model.generate(prompt, 20, temperature=0, use_cache=True)
    recomputed = model.generate(prompt, 20, temperature=0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, recomputed)


def test_seeded_sampling_is_reproducible_and_top_k_one_is_greedy():
    model = tiny()
    prompt = tokens((1, 4))

    def sample(seed, **kw):
        return model.generate(prompt, 12, generator=torch.Generator().manual_seed(seed), **kw)

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))
    assert torch.equal(sample(0, top_k=1), model.generate(prompt, 12, temperature=0))


def test_generate_stops_when_every_row_has_emitted_eos():
    model = tiny()
    prompt = tokens((2, 3))
    greedy = model.generate(prompt, 8, temperature=0)
    eos = int(greedy[0, 4])  # row 0 emits it by its second new token

    def steps_until_eos(row):
        hits = (greedy[row, 3:] == eos).nonzero()
        return int(hits[0]) + 1 if len(hits) else 8

    alone = model.generate(prompt[:1], 8, temperature=0, eos_id=eos)
    assert alone.shape[1] == 3 + steps_until_eos(0) <= 5  # stopped early
    out = model.generate(prompt, 8, temperature=0, eos_id=eos)
    assert out.shape[1] == 3 + max(steps_until_eos(0), steps_until_eos(1))
    for row in range(2):
        done = 3 + steps_until_eos(row)
        assert torch.equal(out[row, :done], greedy[row, :done]) and (out[row, done:] == eos).all()


@pytest.mark.parametrize("pos", POS)
def test_left_padded_batch_matches_unpadded_sequences(pos):
    model = tiny(pos_encoding=pos)
    short, long = tokens((1, 5), seed=2), tokens((1, 8), seed=3)
    pad = 3
    idx = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :pad] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(idx, positions=positions, attention_mask=mask, use_cache=True)
    assert torch.isfinite(out.logits).all()  # padding queries see only padding keys: no NaN rows
    torch.testing.assert_close(out.logits[0, pad:], model(short).logits[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.logits[1], model(long).logits[0], rtol=0, atol=1e-5)

    # One cached decode step for the padded batch still matches each sequence on its own.
    nxt = tokens((2, 1), seed=4)
    step = model(
        nxt,
        positions=positions[:, -1:] + 1,
        past_kv=out.past_kv,
        attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1),
    )
    alone = model(torch.cat([short, nxt[:1]], 1)).logits[0, -1]
    torch.testing.assert_close(step.logits[0, 0], alone, rtol=0, atol=1e-5)


def test_loss_ignores_minus_100_targets():
    model = tiny()
    idx, targets = tokens((2, 10)), tokens((2, 10), seed=5)
    ignored = targets.clone()
    ignored[:, ::3] = -100
    logits = model(idx).logits
    keep = ignored != -100
    expected = F.cross_entropy(logits[keep], ignored[keep])
    loss = model(idx, ignored).loss
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, model(idx, targets).loss)


def test_learned_positions_refuse_more_than_block_size():
    model = tiny(pos_encoding="learned")
    past = model(tokens((1, 12)), use_cache=True).past_kv
    with pytest.raises(LmpipeError, match="exceeds model.block_size=16"):
        model(tokens((1, 5)), past_kv=past)


def test_weight_tying_shares_storage_and_counts_once():
    tied, untied = tiny(tie_weights=True), tiny(tie_weights=False)
    assert tied.lm_head.weight.data_ptr() == tied.wte.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.wte.weight.data_ptr()
    assert untied.num_parameters() - tied.num_parameters() == 64 * 16


def test_parameter_count_and_flops_follow_the_formulas():
    V, T, L, C = 64, 16, 2, 16
    model = tiny()
    per_layer = 12 * C * C + 13 * C  # qkv + proj + 4x MLP weights and biases, two LayerNorms
    assert model.num_parameters() == V * C + T * C + L * per_layer + 2 * C
    non_embedding = V * C + L * per_layer + 2 * C  # the tied token table is the LM head, so it stays
    assert model.num_parameters(non_embedding=True) == non_embedding
    assert model.flops_per_token() == 6 * non_embedding + 12 * L * C * T
    assert tiny(pos_encoding="rotary").num_parameters() == V * C + L * per_layer + 2 * C


def test_param_groups_cover_every_parameter_once():
    model = tiny(tie_weights=True, pos_encoding="learned")
    decay, no_decay = model.param_groups(weight_decay=0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    names = dict(zip(decay["param_names"], decay["params"], strict=True)) | dict(
        zip(no_decay["param_names"], no_decay["params"], strict=True)
    )
    assert all(names[n] is p for n, p in model.named_parameters())
    assert "wte.weight" in decay["param_names"] and "lm_head.weight" not in names  # tied: listed once
    assert "wpe.weight" in no_decay["param_names"]
    assert {"ln_f.weight", "ln_f.bias", "blocks.0.ln_1.weight", "blocks.0.attn.c_attn.bias"} <= set(
        no_decay["param_names"]
    )
    assert all(p.dim() >= 2 for p in decay["params"])
    torch.optim.AdamW(model.param_groups(0.1), lr=1e-3)  # accepted as-is by torch.optim


def test_residual_projections_use_scaled_init():
    model = tiny(n_layer=8, n_embd=64, n_head=4)
    assert model.blocks[3].mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.1)
    assert model.blocks[3].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.1)


def test_eval_mode_is_deterministic_and_train_mode_uses_dropout():
    model = tiny(dropout=0.5)
    idx = tokens((2, 8))
    assert torch.equal(model(idx).logits, model(idx).logits)
    model.train()
    assert not torch.equal(model(idx).logits, model(idx).logits)


@pytest.mark.parametrize("kernel", ATTENTION_KERNELS)
@pytest.mark.parametrize("past", [0, 5])
def test_attention_kernels_compute_the_same_function(kernel, past):
    q, k, v = (torch.randn(2, 3, 6, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    k, v = torch.cat((torch.randn(2, 3, past, 8), k), 2), torch.cat((torch.randn(2, 3, past, 8), v), 2)
    key, query = torch.arange(6 + past), torch.arange(6) + past
    mask = (key[None, :] <= query[:, None]) if past else None
    scores = (q.double() @ k.double().transpose(-2, -1)) / math.sqrt(8)
    causal = key[None, :] <= query[:, None]
    reference = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v.double()
    torch.testing.assert_close(attend(q, k, v, mask, 0.0, kernel).double(), reference, rtol=0, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attend(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask, 0.0, kernel)
    assert low.dtype == torch.bfloat16  # the fp32 kernel hands back the dtype it was given
    torch.testing.assert_close(low.double(), reference, rtol=0, atol=2e-2)


def test_a_models_attention_kernel_changes_no_logit():
    model, idx = tiny(), tokens((2, 12))
    reference = model(idx).logits
    for kernel in ATTENTION_KERNELS:
        for block in model.blocks:
            block.attn.kernel = kernel
        torch.testing.assert_close(model(idx).logits, reference, rtol=0, atol=1e-5)


@pytest.mark.parametrize("pos", POS)
def test_bf16_autocast_training_step_runs(pos):
    model = tiny(pos_encoding=pos).train()
    idx = tokens((2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, idx).loss
    loss.backward()
    assert torch.isfinite(loss) and model.wte.weight.grad is not None


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"n_embd": 100, "n_head": 3}, "model.n_embd=100 is not divisible by model.n_head=3"),
        (
            {"n_embd": 6, "n_head": 2, "pos_encoding": "rotary"},
            "model.pos_encoding='rotary' needs an even head size, but model.n_embd=6 / model.n_head=2 = 3",
        ),
        (
            {"pos_encoding": "alibi"},
            "model.pos_encoding='alibi': expected 'learned', 'sinusoidal' or 'rotary'",
        ),
        ({"activation": "swish"}, "model.activation='swish': expected 'gelu' or 'relu'"),
        ({"n_layer": 0}, "model.n_layer=0: expected a value greater than or equal to 1"),
        ({"n_layer": 2.0}, "model.n_layer=2.0: expected a valid integer"),
        ({"n_lyer": 2}, "model.n_lyer: unknown field"),
        ({"dropout": 1.0}, "model.dropout=1.0: expected a value less than 1"),
    ],
)
def test_config_validation(fields, message):
    with pytest.raises(LmpipeError, match="^" + message.replace("(", r"\(")):
        GPTConfig(**fields)


def test_checkpoint_round_trip(tmp_path):
    model = tiny(pos_encoding="rotary", tie_weights=True)
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, {"step": 7, "tokenizer": "bpe.json"})
    loaded, extra = load_model(path)
    assert extra == {"step": 7, "tokenizer": "bpe.json"}
    assert loaded.config == model.config and not loaded.training
    assert loaded.lm_head.weight.data_ptr() == loaded.wte.weight.data_ptr()
    idx = tokens((2, 6))
    assert torch.equal(loaded(idx).logits, model(idx).logits)
    assert [p.name for p in tmp_path.joinpath("ckpt").iterdir()] == ["model.pt"]  # no temp files left


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(LmpipeError, match="missing model checkpoint"):
        load_model(tmp_path / "absent.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(LmpipeError, match="bad.pt: not a readable torch checkpoint"):
        load_model(bad)
    torch.save({"config": {"n_layers": 2}, "state_dict": {}, "extra": {}}, bad)
    with pytest.raises(LmpipeError, match="not a lmpipe model checkpoint .*n_layers") as err:
        load_model(bad)
    assert "\n" not in str(err.value)
    model = tiny()
    torch.save({"config": {"vocab_size": 64}, "state_dict": model.state_dict(), "extra": {}}, bad)
    with pytest.raises(LmpipeError, match="not a lmpipe model checkpoint .*Missing key") as err:
        load_model(bad)
    assert "\n" not in str(err.value)


class CachedStep(torch.nn.Module):
    """An export signature: (idx, positions, attention_mask, k_0, v_0, k_1, v_1) -> (logits, k_0', ..., v_1')."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, idx, positions, attention_mask, k_0, v_0, k_1, v_1):
        past = ((k_0, v_0), (k_1, v_1))
        out = self.model(
            idx, positions=positions, past_kv=past, attention_mask=attention_mask, use_cache=True
        )
        return (out.logits, *(t for kv in out.past_kv for t in kv))


@pytest.mark.slow  # ~8 s: the dynamo exporter dominates
def test_onnx_export_with_kv_cache_matches_torch(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    model = tiny(pos_encoding="rotary")
    idx = tokens((2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0  # row 0 is left-padded
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    empty = [torch.zeros(2, 2, 0, 8) for _ in range(4)]
    batch, seq, total = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("total")
    kv = {0: batch, 2: torch.export.Dim("past", min=0)}
    shapes = {
        "idx": {0: batch, 1: seq},
        "positions": {0: batch, 1: seq},
        "attention_mask": {0: batch, 1: total},
    }
    shapes |= {name: kv for name in ("k_0", "v_0", "k_1", "v_1")}
    path = tmp_path / "model.onnx"
    torch.onnx.export(
        CachedStep(model).eval(), (idx, positions, mask, *empty), path, dynamo=True, dynamic_shapes=shapes
    )

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]

    def run(*inputs):
        return session.run(
            None, dict(zip(names, [t.numpy() if torch.is_tensor(t) else t for t in inputs], strict=True))
        )

    # Prefill: every position matches, padding queries included (they attend to themselves, never to nothing).
    prefill = run(idx, positions, mask, *empty)
    expected = model(idx, positions=positions, attention_mask=mask)
    torch.testing.assert_close(torch.from_numpy(prefill[0]), expected.logits, rtol=0, atol=1e-4)

    nxt = tokens((2, 1), seed=6)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step = run(nxt, positions[:, -1:] + 1, step_mask, *prefill[1:])
    full = model(
        torch.cat([idx, nxt], 1),
        positions=torch.cat([positions, positions[:, -1:] + 1], 1),
        attention_mask=step_mask,
    )
    torch.testing.assert_close(torch.from_numpy(step[0]), full.logits[:, -1:], rtol=0, atol=1e-4)
    assert step[1].shape == (2, 2, 6, 8)
