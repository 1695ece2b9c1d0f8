"""The GPT of `lmpipe.model` written directly as an ONNX graph of ONNX Runtime's fused transformer operators.

A decode step at batch 1 is largely per-operator work outside the matrix products: in the dynamo exporter's graph
of the default model (~230 nodes: rotary halves, transposes, reshapes, concats, the mask) MatMuls took under
half of the kernel time of a step (bench/README.md).
ONNX Runtime's transformer optimizer fuses only LayerNorm and GELU in it (its attention patterns are those of
Hugging Face models, not this one; the TorchScript exporter's graph fuses no better), so this module writes the
graph itself from the weights, with the `com.microsoft` operators ONNX Runtime's CPU provider implements:
`RotaryEmbedding`, `MultiHeadAttention` (which appends the new keys and values to the past ones),
`SkipLayerNormalization` (residual add, bias and LayerNorm in one) and `BiasGelu`. A block of the default
model is twelve nodes (the QKV MatMul and its bias, a Split, two rotaries, the attention, the output MatMul, a
SkipLayerNorm, the MLP's two MatMuls and BiasGelu, the next SkipLayerNorm): 52 nodes for the default model
against 228 (after ONNX Runtime's own fusions).

Inputs and outputs are those of `lmpipe.export.io_names`, with the same meaning, so `OrtEngine`, quantization
and parity checks see no difference. Real tokens' logits and cached keys and values match PyTorch; a padding
position's (left padding) do not, from the second layer on: the model lets a padding query see its own key,
while here it sees only padding keys, all hidden, and gets their mean. Nothing real ever attends to a padding
key (its score gets -10000 added, whose exp is 0 in float32), so only the masked cache entries differ. Rotary
angles come from a (block_size, head_dim / 2) table computed as the model computes them: a position at or past
block_size is an error here, where PyTorch would extrapolate (generation never gets there: prompt plus new tokens
must fit in block_size).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import onnx

    from lmpipe.model import GPT

MS_DOMAIN = "com.microsoft"
"""Domain of ONNX Runtime's contrib operators."""
LN_EPS = 1e-5
"""nn.LayerNorm's default epsilon, which the model uses."""


class _Graph:
    """Nodes and initializers being collected, with unique names."""

    def __init__(self):
        self.nodes, self.inits = [], []
        self.float_outputs: list[str] = []
        """Outputs of contrib ops: ONNX's shape inference cannot type them, and the quantizer needs the types."""

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(
        self, op: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs
    ) -> list[str]:
        from onnx import helper

        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op, inputs, outputs, name=outputs[0], domain=domain, **attrs))
        if domain == MS_DOMAIN:
            self.float_outputs += [name for name in outputs if name]
        return outputs


def build_graph(model: GPT, opset: int, input_names: list[str], output_names: list[str]) -> onnx.ModelProto:
    """The ONNX model of `model` (fp32, eval) with the export's io names; weights inside the model."""
    import torch
    from onnx import TensorProto, helper

    cfg = model.config
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    g = _Graph()
    ids, positions, attention_mask = input_names[:3]
    H, hd = cfg.n_head, cfg.head_dim

    # Embeddings. The token table is shared with a tied LM head, read through a Transpose so that quantization
    # finds the pattern `lmpipe.compress` folds and stores once.
    wte = g.init("wte", state["wte.weight"])
    (x,) = g.node("Gather", [wte, ids], "tok_emb", axis=0)
    rotary = None
    if cfg.pos_encoding in ("learned", "sinusoidal"):
        table = state["wpe.weight"] if cfg.pos_encoding == "learned" else model.pos_table.numpy()
        (pos_emb,) = g.node("Gather", [g.init("pos_table", table), positions], "pos_emb", axis=0)
        (x,) = g.node("Add", [x, pos_emb], "emb")
    else:
        # The model's own arithmetic (float32 positions times inv_freq), so the table matches it bit for bit.
        angles = torch.arange(cfg.block_size, dtype=torch.float32)[:, None] * model.inv_freq[None, :]
        rotary = (g.init("rotary_cos", angles.cos().numpy()), g.init("rotary_sin", angles.sin().numpy()))

    # Padding keys: hidden through MultiHeadAttention's key mask (-10000 added to their scores), causality by its
    # `unidirectional`; building the model's exact (B, 1, T, P + T) boolean mask instead took 15 small nodes,
    # ~11 % of an int8 decode step's kernel time (bench/README.md).
    (key_mask,) = g.node("Cast", [attention_mask], "key_padding_mask", to=TensorProto.INT32)
    # SkipLayerNormalization adds the previous sublayer's output and bias to the residual stream, normalises the
    # sum, and returns the sum too: the first LayerNorm of the graph is the only plain one.
    (h,) = g.node("LayerNormalization", [x, *_ln(g, state, "blocks.0.ln_1")], "ln_0", axis=-1, epsilon=LN_EPS)
    past = iter(input_names[3:])
    present = iter(output_names[1:])
    for i in range(cfg.n_layer):
        p = f"blocks.{i}."
        qkv = _linear(g, state, p + "attn.c_attn", h, f"qkv_{i}")
        q, k, v = g.node("Split", [qkv], [f"q_{i}", f"k_{i}", f"v_{i}"], axis=-1, num_outputs=3)
        if rotary is not None:
            (q,) = g.node("RotaryEmbedding", [q, positions, *rotary], f"q_rot_{i}", MS_DOMAIN, num_heads=H)
            (k,) = g.node("RotaryEmbedding", [k, positions, *rotary], f"k_rot_{i}", MS_DOMAIN, num_heads=H)
        attn_inputs = [q, k, v, "", key_mask, "", next(past), next(past)]
        (y, *_) = g.node(
            "MultiHeadAttention",
            attn_inputs,
            [f"attn_{i}", next(present), next(present)],
            MS_DOMAIN,
            num_heads=H,
            unidirectional=1,  # query i sees keys up to past + i: causal from the end of the past
        )
        a = _matmul(g, state, p + "attn.c_proj", y, f"attn_proj_{i}")
        h, x = _skip_ln(g, state, a, x, p + "attn.c_proj", p + "ln_2", f"ln2_{i}")
        if cfg.activation == "gelu" and cfg.bias:
            f = _matmul(g, state, p + "mlp.c_fc", h, f"fc_{i}")
            fc_bias = g.init(p + "mlp.c_fc.bias", state[p + "mlp.c_fc.bias"])
            (f,) = g.node("BiasGelu", [f, fc_bias], f"gelu_{i}", MS_DOMAIN)
        else:
            f = _linear(g, state, p + "mlp.c_fc", h, f"fc_{i}")
            # ONNX's own Gelu needs opset 20; ONNX Runtime's has no such floor.
            op, domain = ("Gelu", MS_DOMAIN) if cfg.activation == "gelu" else ("Relu", "")
            (f,) = g.node(op, [f], f"act_{i}", domain)
        m = _matmul(g, state, p + "mlp.c_proj", f, f"mlp_proj_{i}")
        norm = f"blocks.{i + 1}.ln_1" if i + 1 < cfg.n_layer else "ln_f"
        h, x = _skip_ln(g, state, m, x, p + "mlp.c_proj", norm, f"ln1_{i + 1}")

    if cfg.tie_weights:
        (head,) = g.node("Transpose", [wte], "lm_head_t", perm=[1, 0])
    else:
        head = g.init("lm_head_t", state["lm_head.weight"].T)
    g.node("MatMul", [h, head], output_names[0])

    batch, seq, total = "batch", "sequence", "total"
    past_dims, present_dims = [batch, H, "past", hd], [batch, H, total, hd]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, [batch, seq]) for name in (ids, positions)
    ] + [helper.make_tensor_value_info(attention_mask, TensorProto.INT64, [batch, total])]
    inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, past_dims) for n in input_names[3:]]
    outputs = [
        helper.make_tensor_value_info(output_names[0], TensorProto.FLOAT, [batch, seq, cfg.vocab_size])
    ]
    outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, present_dims) for n in output_names[1:]]
    graph_outputs = {o.name for o in outputs}
    value_info = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, None)
        for name in g.float_outputs
        if name not in graph_outputs
    ]
    graph = helper.make_graph(g.nodes, "lmpipe_gpt", inputs, outputs, g.inits, value_info=value_info)
    return helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(MS_DOMAIN, 1)],
        producer_name="lmpipe",
    )


def _ln(g: _Graph, state: dict, name: str) -> list[str]:
    """[gamma] or [gamma, beta] initializers of LayerNorm `name` (no beta when the model has no biases)."""
    out = [g.init(f"{name}.weight", state[f"{name}.weight"])]
    if f"{name}.bias" in state:
        out.append(g.init(f"{name}.bias", state[f"{name}.bias"]))
    return out


def _matmul(g: _Graph, state: dict, name: str, x: str, out: str) -> str:
    """x @ W.T of Linear `name`, without its bias (a fused op downstream adds it)."""
    return g.node("MatMul", [x, g.init(f"{name}.weight_t", state[f"{name}.weight"].T)], out)[0]


def _linear(g: _Graph, state: dict, name: str, x: str, out: str) -> str:
    """x @ W.T + b of Linear `name` (b only when the model has biases)."""
    y = _matmul(g, state, name, x, out if f"{name}.bias" not in state else f"{out}_nb")
    if f"{name}.bias" in state:
        (y,) = g.node("Add", [y, g.init(f"{name}.bias", state[f"{name}.bias"])], out)
    return y


def _skip_ln(
    g: _Graph, state: dict, y: str, residual: str, linear: str, norm: str, out: str
) -> tuple[str, str]:
    """(LayerNorm `norm` of residual + y + linear's bias, that sum): the residual add and the next norm in one."""
    inputs = [y, residual, *_ln(g, state, norm)]
    if f"{linear}.bias" in state:
        if len(inputs) == 3:
            inputs.append("")  # no beta, but a bias: inputs are positional
        inputs.append(g.init(f"{linear}.bias", state[f"{linear}.bias"]))
    normed, *_, total = g.node(
        "SkipLayerNormalization", inputs, [out, "", "", f"{out}_sum"], MS_DOMAIN, epsilon=LN_EPS
    )
    return normed, total
