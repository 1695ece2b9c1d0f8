import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from tiny_models import make_model_dir, tiny_tokenizer

from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig, export_onnx, io_names
from lmpipe.inference.engine import OrtEngine
from lmpipe.tokenizer import END, EOT, PAD

POS_ENCODINGS = ("learned", "sinusoidal", "rotary")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    """{pos_encoding: (model, model_dir, export_dir, report)}, each exported once for the whole module."""
    root = tmp_path_factory.mktemp("export")
    tok = tiny_tokenizer()
    out = {}
    for i, pe in enumerate(POS_ENCODINGS):
        model = make_model_dir(root / pe, tok, pe, seed=i)
        report = export_onnx(root / pe, root / "onnx" / pe, ExportConfig(), seed=0, variant_name=f"tiny-{pe}")
        out[pe] = (model, root / pe, root / "onnx" / pe, report)
    return out


@pytest.mark.parametrize("pe", POS_ENCODINGS)
def test_export_writes_a_self_contained_directory_with_its_parity_report(exports, pe):
    model, model_dir, export_dir, report = exports[pe]
    assert sorted(p.name for p in export_dir.iterdir()) == [
        "config.json",
        "model.onnx",
        "parity.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert json.loads((export_dir / "parity.json").read_text()) == report
    assert report["prefill_max_abs_diff"] < 1e-4 and report["decode_max_abs_diff"] < 1e-4
    assert report["decode_steps"] == 8 and report["batch"] == 2 and report["left_padding"] > 0
    assert report["onnx_bytes"] == (export_dir / "model.onnx").stat().st_size
    config = json.loads((export_dir / "config.json").read_text())
    tok = OrtEngine(export_dir).tokenizer
    assert config["model"]["pos_encoding"] == pe
    assert config["variant"] == f"tiny-{pe}" and config["source_dir"] == str(model_dir)
    assert (config["n_layer"], config["n_head"], config["head_dim"], config["block_size"]) == (2, 2, 16, 64)
    assert config["eos_id"] == config["end_id"] == tok.token_to_id(END)
    assert (config["pad_id"], config["eot_id"]) == (tok.token_to_id(PAD), tok.token_to_id(EOT))
    assert config["quantization"] == "none"
    graph = onnx.load(export_dir / "model.onnx")
    assert json.loads({p.key: p.value for p in graph.metadata_props}["lmpipe_config"]) == config


def test_graph_has_named_inputs_with_dynamic_batch_sequence_and_past(exports):
    _, _, export_dir, _ = exports["rotary"]
    graph = onnx.load(export_dir / "model.onnx").graph
    inputs, outputs = io_names(2)
    assert [i.name for i in graph.input] == inputs
    assert [o.name for o in graph.output] == outputs
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["input_ids"] == dims["position_ids"] == ["batch", "sequence"]
    assert dims["attention_mask"][0] == "batch" and isinstance(dims["attention_mask"][1], str)
    assert dims["past_key_1"] == ["batch", 2, "past", 16]
    # Weights inside the file: nothing written beside it.
    assert not any(init.external_data for init in graph.initializer)


@pytest.mark.parametrize("pe", POS_ENCODINGS)
def test_onnx_matches_torch_on_a_left_padded_batch_prefill_then_cached_decode(exports, pe):
    model, _, export_dir, _ = exports[pe]
    engine = OrtEngine(export_dir)
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, model.config.vocab_size, (3, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :7] = 0
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(ids, positions=positions, attention_mask=mask, use_cache=True)
    logits, past = engine.forward(ids.numpy(), positions.numpy(), mask.numpy(), None)
    real = mask.bool().numpy()
    np.testing.assert_allclose(logits[real], ref.logits.numpy()[real], atol=1e-4)
    # Real positions' cached keys and values match; a padding position's differ past the first layer (the fused
    # graph's padding query sees no key of its own) and nothing real attends to them.
    for ort_kv, ref_kv in zip(past, ref.past_kv, strict=True):
        for ort_t, ref_t in zip(ort_kv, ref_kv, strict=True):
            np.testing.assert_allclose(
                ort_t.transpose(0, 2, 1, 3)[real], ref_t.numpy().transpose(0, 2, 1, 3)[real], atol=1e-5
            )
    torch_past, next_pos = ref.past_kv, positions[:, -1:] + 1
    for new in (1, 2, 1):  # single tokens and a two-token chunk after a past
        step = torch.randint(0, model.config.vocab_size, (3, new), generator=gen)
        pos = next_pos + torch.arange(new)
        mask = torch.cat((mask, torch.ones(3, new, dtype=torch.long)), dim=1)
        with torch.no_grad():
            ref = model(step, positions=pos, past_kv=torch_past, attention_mask=mask, use_cache=True)
        logits, past = engine.forward(step.numpy(), pos.numpy(), mask.numpy(), past)
        np.testing.assert_allclose(logits, ref.logits.numpy(), atol=1e-4)
        assert past[0][0].shape[2] == mask.shape[1]
        torch_past, next_pos = ref.past_kv, next_pos + new


@pytest.mark.parametrize(
    ("pe", "shape"),
    [
        ("rotary", {"activation": "relu", "bias": False}),
        ("learned", {"tie_weights": False}),
        ("sinusoidal", {"bias": False, "activation": "gelu"}),
    ],
)
def test_fused_graph_matches_torch_for_other_model_shapes(tmp_path, pe, shape):
    model = make_model_dir(tmp_path / "model", tiny_tokenizer(), pe, seed=5, **shape)
    report = export_onnx(tmp_path / "model", tmp_path / "onnx", ExportConfig(), seed=1)
    assert report["prefill_max_abs_diff"] < 1e-4 and report["decode_max_abs_diff"] < 1e-4
    ops = {node.op_type for node in onnx.load(tmp_path / "onnx" / "model.onnx").graph.node}
    bias_gelu = shape.get("activation", "gelu") == "gelu" and shape.get("bias", True)
    assert "MultiHeadAttention" in ops and ("BiasGelu" in ops) == bias_gelu
    assert ("Relu" in ops) == (shape.get("activation") == "relu")
    assert ("RotaryEmbedding" in ops) == (pe == "rotary")
    assert model.config.tie_weights == ("Transpose" in ops)  # the tied head reads the embedding table


def test_dynamo_graph_matches_torch_and_fused_graph_has_under_half_its_nodes(exports, tmp_path):
    _, model_dir, fused_dir, _ = exports["rotary"]
    report = export_onnx(model_dir, tmp_path / "dynamo", ExportConfig(graph="dynamo"), seed=0)
    assert report["prefill_max_abs_diff"] < 1e-4 and report["decode_max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "dynamo" / "config.json").read_text())
    assert config["graph"] == "dynamo"
    assert json.loads((fused_dir / "config.json").read_text())["graph"] == "fused"
    dynamo, fused = (onnx.load(d / "model.onnx").graph for d in (tmp_path / "dynamo", fused_dir))
    assert [i.name for i in fused.input] == [i.name for i in dynamo.input]
    assert [o.name for o in fused.output] == [o.name for o in dynamo.output]
    assert len(fused.node) * 2 < len(dynamo.node)  # 2 layers: the mask's dozen nodes weigh more than at 4
    assert b"stack_trace" not in (tmp_path / "dynamo" / "model.onnx").read_bytes()  # no checkout paths


def test_parity_failure_raises_and_leaves_the_previous_export_intact(exports, monkeypatch):
    import lmpipe.export

    _, _, learned_onnx, _ = exports["learned"]
    _, rotary_dir, rotary_onnx, _ = exports["rotary"]
    target = rotary_onnx.parent / "previous"
    shutil.copytree(rotary_onnx, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    def wrong_graph(model, path, opset, config):  # a broken wrapper: the graph of another model
        shutil.copy(learned_onnx / "model.onnx", path)

    monkeypatch.setattr(lmpipe.export, "_export_graph", wrong_graph)
    with pytest.raises(
        LmpipeError,
        match=r"^ONNX parity failed: (prefill|decode) max abs logit diff \S+ > "
        r"export.parity_atol 1e-3 \(.*previous\)$",
    ):
        export_onnx(rotary_dir, target, ExportConfig(), seed=0)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(p.name for p in target.parent.iterdir() if p.name.startswith(".")) == []


def test_decode_steps_that_leave_no_room_fail_before_exporting(exports, monkeypatch):
    import lmpipe.export

    _, model_dir, _, _ = exports["learned"]
    monkeypatch.setattr(lmpipe.export, "_export_graph", lambda *a: pytest.fail("exported anyway"))
    with pytest.raises(LmpipeError, match=r"export.parity_decode_steps=63 .*block_size=64"):
        export_onnx(model_dir, model_dir.parent / "never", ExportConfig(parity_decode_steps=63), seed=0)
    assert not (model_dir.parent / "never").exists()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("graph", "torchscript"),
        ("opset", 17),
        ("parity_atol", -1.0),
        ("parity_decode_steps", -1),
        ("parity_batch", 0),
        ("parity_batch", 1.5),
    ],
)
def test_invalid_export_config_names_the_field(field, value):
    with pytest.raises(LmpipeError, match=rf"^export.{field}="):
        ExportConfig(**{field: value})
