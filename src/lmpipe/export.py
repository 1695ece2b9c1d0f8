"""Export a trained GPT to a self-contained ONNX directory with a KV cache, checked against PyTorch.

One graph serves both phases of generation: prefill (past length 0) and cached decode (one or more new tokens
after a past). Its inputs are `input_ids`, `position_ids` (B, T) int64, `attention_mask` (B, P + T) int64
(1 = real token, so left-padded batches work) and `past_key_<i>` / `past_value_<i>` (B, n_head, P, head_dim)
float32 per layer; its outputs are `logits` (B, T, V) and `present_key_<i>` / `present_value_<i>`
(B, n_head, P + T, head_dim). One past input per layer rather than one stacked tensor: ONNX Runtime ran it
1.1-1.3x faster (the stacked form copies the whole cache more per step).

The graph is written from the weights with ONNX Runtime's fused transformer operators by default
(`export.graph=fused`, `lmpipe.onnx_graph`: 52 nodes for the default model against the dynamo exporter's 228; a
decode step's kernels take about half the time in fp32 and a third in int8, bench/README.md); `export.graph=dynamo`
traces it with torch.onnx's dynamo exporter instead (standard ONNX operators only, for other runtimes). Both have
the same inputs and outputs.

The output directory holds `model.onnx` (weights inside the file), `config.json` (the model config, the io
names and the special-token ids, also stored in the graph's metadata under "lmpipe_config"), the tokenizer
files and `parity.json`. It is replaced atomically, and only after ONNX Runtime reproduced the PyTorch logits
within `parity_atol` on a seeded left-padded batch, prefill and cached decode: a failed export leaves the
previous directory as it was.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import warnings
from dataclasses import asdict, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field

from lmpipe.atomic import atomic_path, write_json
from lmpipe.config import schema
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, EOT, MODEL_FILE, ONNX_CONFIG_FILE, ONNX_FILE, PAD, TOKENIZER_FILE
from lmpipe.inference.engine import OrtEngine
from lmpipe.tokenizer import copy_tokenizer, load_tokenizer

if TYPE_CHECKING:  # torch loads only when a model is exported, so the config schema loads fast
    from lmpipe.model import GPT

PARITY_FILE = "parity.json"
"""The parity report written by `export_onnx`."""
METADATA_KEY = "lmpipe_config"
"""metadata_props key under which the graph carries a copy of config.json."""
MIN_OPSET = 18
"""The dynamo exporter emits opset 18 and later."""
_PARITY_PREFILL_TOKENS = 16
"""Longest prompt in the parity batch (shorter if block_size leaves no room for the decode steps)."""


@schema("export")
class ExportConfig:
    models: dict[str, str] = field(
        default_factory=lambda: {
            "teacher": "sft",
            "student": "student",
            "student-nodistill": "student-nodistill",
        }
    )
    """ONNX variant name -> model directory under paths.models, each exported to <paths.onnx>/<variant>."""
    graph: Literal["fused", "dynamo"] = "fused"
    """fused: written op by op with ONNX Runtime's fused transformer ops (`lmpipe.onnx_graph`; faster decode,
    ONNX Runtime only); dynamo: torch.onnx's dynamo exporter (standard ONNX ops only)."""
    opset: Annotated[int, Field(ge=MIN_OPSET)] = 20
    """ONNX opset version of the exported graph (18 or later)."""
    parity_atol: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 1e-3
    """Largest max-abs logit difference between ONNX Runtime and PyTorch that the export accepts."""
    parity_decode_steps: Annotated[int, Field(ge=0)] = 8
    """Cached decode steps compared after the prefill in the parity check."""
    parity_batch: Annotated[int, Field(ge=1)] = 2
    """Rows in the parity batch (the first is left-padded)."""


def io_names(n_layer: int) -> tuple[list[str], list[str]]:
    """Input and output names of the exported graph for a model with `n_layer` blocks."""
    inputs = ["input_ids", "position_ids", "attention_mask"]
    outputs = ["logits"]
    for i in range(n_layer):
        inputs += [f"past_key_{i}", f"past_value_{i}"]
        outputs += [f"present_key_{i}", f"present_value_{i}"]
    return inputs, outputs


def graph_module(model: GPT):
    """The GPT with the graph's flat signature: tensors in, (logits, present k/v per layer) out."""
    from torch import nn

    class OnnxGraphModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, input_ids, position_ids, attention_mask, past):
            past_kv = tuple((past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2))
            out = self.model(
                input_ids,
                positions=position_ids,
                past_kv=past_kv,
                attention_mask=attention_mask,
                use_cache=True,
            )
            return (out.logits, *(t for kv in out.past_kv for t in kv))

    return OnnxGraphModule()


def export_onnx(
    model_dir: str | Path,
    out_dir: str | Path,
    cfg: ExportConfig,
    seed: int,
    variant_name: str | None = None,
) -> dict[str, Any]:
    """Export `<model_dir>/model.pt` with its tokenizer to `out_dir` and return the parity report.

    `variant_name` (default: the model directory's name) is recorded in config.json. Raises LmpipeError,
    leaving `out_dir` untouched, when ONNX Runtime's logits differ from PyTorch's by more than
    `cfg.parity_atol`.
    """
    import torch

    from lmpipe.model import load_model

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    model, _ = load_model(model_dir / MODEL_FILE)
    model = model.float().eval()
    mcfg = model.config
    tok = load_tokenizer(model_dir / TOKENIZER_FILE)
    if tok.get_vocab_size() > mcfg.vocab_size:
        raise LmpipeError(
            f"{model_dir / TOKENIZER_FILE} has {tok.get_vocab_size()} tokens but model.vocab_size="
            f"{mcfg.vocab_size}: expected the tokenizer the model was trained with"
        )
    special = {}
    for key, token in (("end_id", END), ("eot_id", EOT), ("pad_id", PAD)):
        special[key] = tok.token_to_id(token)
        if special[key] is None:
            raise LmpipeError(
                f"{model_dir / TOKENIZER_FILE} has no {token} token: expected a lmpipe tokenizer"
            )
    _parity_prompt_len(cfg, mcfg.block_size)  # fail before the slow export, not after it
    inputs, outputs = io_names(mcfg.n_layer)
    config = {
        "model": asdict(mcfg),
        "input_names": inputs,
        "output_names": outputs,
        "n_layer": mcfg.n_layer,
        "n_head": mcfg.n_head,
        "head_dim": mcfg.head_dim,
        "vocab_size": mcfg.vocab_size,
        "block_size": mcfg.block_size,
        "parameters": model.num_parameters(),
        # A chat answer ends with END, which is what the tokenizer config calls its eos_token.
        "eos_id": special["end_id"],
        **special,
        "variant": variant_name or model_dir.name,
        "source_dir": str(model_dir),
        "quantization": "none",
        "opset": cfg.opset,
        "graph": cfg.graph,
    }
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        started = time.perf_counter()
        _export_graph(model, tmp / ONNX_FILE, cfg, config)
        export_seconds = time.perf_counter() - started
        write_json(tmp / ONNX_CONFIG_FILE, config)
        copy_tokenizer(model_dir, tmp)
        report = parity_check(model, tmp, cfg, seed)
        report.update(
            export_seconds=round(export_seconds, 2),
            onnx_bytes=(tmp / ONNX_FILE).stat().st_size,
            opset=cfg.opset,
            variant=config["variant"],
            torch_version=torch.__version__,
        )
        worst = max(("prefill", "decode"), key=lambda phase: report[f"{phase}_max_abs_diff"])
        if report[f"{worst}_max_abs_diff"] > cfg.parity_atol:
            raise LmpipeError(
                f"ONNX parity failed: {worst} max abs logit diff {_sci(report[f'{worst}_max_abs_diff'])} > "
                f"export.parity_atol {_sci(cfg.parity_atol)} ({out_dir})"
            )
        write_json(tmp / PARITY_FILE, report)
    return report


def _export_graph(model: GPT, path: Path, cfg: ExportConfig, config: dict) -> None:
    """Write the model's graph as `cfg.graph` says to one self-contained ONNX file, config.json in its metadata."""
    import onnx

    if cfg.graph == "fused":
        from lmpipe.onnx_graph import build_graph

        proto = build_graph(model, cfg.opset, config["input_names"], config["output_names"])
    else:
        proto = _dynamo_graph(model, cfg.opset, config)
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(config, sort_keys=True))
    onnx.save(proto, path)


def _dynamo_graph(model: GPT, opset: int, config: dict):
    """The model traced by torch.onnx's dynamo exporter (an onnx.ModelProto, weights inside)."""
    import torch
    from torch.export import Dim

    mcfg = model.config
    # Example sizes >= 2: torch.export specialises dimensions that are 0 or 1 in the example inputs.
    batch, new, past = 2, 3, 4
    example_past = [torch.zeros(batch, mcfg.n_head, past, mcfg.head_dim) for _ in range(2 * mcfg.n_layer)]
    args = (
        torch.zeros(batch, new, dtype=torch.long),
        torch.zeros(batch, new, dtype=torch.long),
        torch.ones(batch, past + new, dtype=torch.long),
        example_past,
    )
    b, t, p = Dim("batch"), Dim("sequence"), Dim("past", min=0)
    # torch.export cannot declare "past + sequence" from two dims; the graph derives it from the inputs.
    dynamic_shapes = {
        "input_ids": {0: b, 1: t},
        "position_ids": {0: b, 1: t},
        "attention_mask": {0: b, 1: Dim("total")},
        "past": [{0: b, 2: p}] * len(example_past),
    }
    inputs, outputs = config["input_names"], config["output_names"]
    with _quiet_exporter():
        program = torch.onnx.export(
            graph_module(model).eval(),
            args,
            None,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset,
            verbose=False,
        )
    # As a ModelProto with its weights inside: saved as it is, the program would write them to a side file.
    return without_source_locations(program.model_proto)


SOURCE_LOCATION_KEYS = ("pkg.torch.onnx.stack_trace",)
"""Node metadata the dynamo exporter fills with the absolute paths of the traced source files."""


def without_source_locations(proto):
    """`proto` with the exporter's stack traces removed from every node (functions included), in place.

    They hold the absolute path of the checkout, so the same model exported from two clones gave files of
    different bytes (and DVC hashes): 647 bytes apart for the smoke encoder in /work/smoke-base against
    /work/smoke-after."""
    graphs = [proto.graph, *proto.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            kept = [p for p in node.metadata_props if p.key not in SOURCE_LOCATION_KEYS]
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            for attribute in node.attribute:  # the bodies of If and Loop nodes
                graphs.extend([attribute.g] if attribute.HasField("g") else [])
                graphs.extend(attribute.graphs)
    return proto


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's warnings about optional ops (torchvision) and its own deprecations."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def parity_check(model: GPT, export_dir: Path, cfg: ExportConfig, seed: int) -> dict[str, Any]:
    """Max abs logit difference between ONNX Runtime (through `OrtEngine`) and PyTorch on a seeded batch.

    Row 0 is left-padded to half the prompt length, so masks and per-row positions are exercised. Prefill is
    compared on real tokens only (a padding query's logits are never used); then `parity_decode_steps`
    random tokens are fed one at a time, each runtime carrying its own cache.
    """
    import torch

    mcfg = model.config
    steps = cfg.parity_decode_steps
    prompt_len = _parity_prompt_len(cfg, mcfg.block_size)
    engine = OrtEngine(export_dir)
    gen = torch.Generator().manual_seed(seed)
    batch = cfg.parity_batch
    ids = torch.randint(0, mcfg.vocab_size, (batch, prompt_len), generator=gen)
    mask = torch.ones(batch, prompt_len, dtype=torch.long)
    mask[0, : prompt_len // 2] = 0
    ids[mask == 0] = engine.config["pad_id"]
    positions = (mask.cumsum(1) - 1).clamp(min=0)

    with torch.no_grad():
        out = model(ids, positions=positions, attention_mask=mask, use_cache=True)
    ort_logits, ort_past = engine.forward(ids.numpy(), positions.numpy(), mask.numpy(), None)
    real = mask.bool().numpy()
    prefill_diff = float(np.abs(ort_logits - out.logits.numpy())[real].max())

    decode_diff = 0.0
    past = out.past_kv
    next_pos = positions[:, -1:] + 1
    for _ in range(steps):
        token = torch.randint(0, mcfg.vocab_size, (batch, 1), generator=gen)
        mask = torch.cat((mask, torch.ones(batch, 1, dtype=torch.long)), dim=1)
        with torch.no_grad():
            out = model(token, positions=next_pos, past_kv=past, attention_mask=mask, use_cache=True)
        ort_logits, ort_past = engine.forward(token.numpy(), next_pos.numpy(), mask.numpy(), ort_past)
        decode_diff = max(decode_diff, float(np.abs(ort_logits - out.logits.numpy()).max()))
        past, next_pos = out.past_kv, next_pos + 1
    return {
        "prefill_max_abs_diff": prefill_diff,
        "decode_max_abs_diff": decode_diff,
        "parity_atol": cfg.parity_atol,
        "batch": batch,
        "prefill_tokens": prompt_len,
        "left_padding": prompt_len // 2,
        "decode_steps": steps,
        "seed": seed,
        "onnxruntime_version": _ort_version(),
    }


def _parity_prompt_len(cfg: ExportConfig, block_size: int) -> int:
    """Prompt length of the parity batch: the decode steps must fit after it within block_size."""
    prompt_len = min(_PARITY_PREFILL_TOKENS, block_size - cfg.parity_decode_steps)
    if prompt_len < 2:
        raise LmpipeError(
            f"export.parity_decode_steps={cfg.parity_decode_steps} leaves {prompt_len} prompt tokens within "
            f"model.block_size={block_size}: expected at most {block_size - 2}"
        )
    return prompt_len


def _ort_version() -> str:
    import onnxruntime

    return onnxruntime.__version__


def _sci(x: float) -> str:
    """Compact scientific notation for messages: 0.032 -> 3.2e-2, 0.001 -> 1e-3, 0 -> 0."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.removesuffix('.0')}e{int(exponent)}"
