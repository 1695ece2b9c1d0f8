"""Make a model smaller or faster: int8 quantization of an ONNX export, magnitude pruning of a GPT.

Quantization (ONNX Runtime): `quantize_onnx` turns an export directory (see `lmpipe.export`) into another one
whose graph stores the weight matrices as int8 (`write_quantized` and `fold_constant_transposes` are shared
with `lmpipe.encoder.quantize`, which does the same for the encoder classifier's ONNX directory). `dynamic`
quantizes activations on the fly at every MatMul (nothing to calibrate); `static` fixes their ranges from
prefill windows of real text (calibration never needs a past: a decode step's activations come from the same
layers, so prefill ranges cover them).

ONNX Runtime quantizes the MatMuls with a constant weight (the Linear layers and the LM head); the attention
MatMuls between activations, LayerNorm and the rest stay fp32 (there is no Gemm: Linear exports as MatMul +
Add). The LM head reads the tied embedding through a Transpose, which hides the weight from the quantizer, so
the Transpose is folded into a constant first; the embedding Gather is then rewired to read rows of the LM
head's int8 matrix times their scale, so the tied matrix is stored once, in int8. Measured on the default
4.2M-parameter shape (4,096 tokens x 256): the file is 0.25x the fp32 one; quantizing only the MatMuls as
exported leaves the head fp32 (0.45x), and ONNX Runtime's own Gather quantization stores a second (uint8)
copy or, without the fold, dequantizes the whole head matrix at every decode step (1.6x slower decode).
Test perplexity of a briefly trained model moved by under 0.1% with either method and per-tensor or
per-channel scales; static was no more accurate than dynamic and no faster on CPU, so dynamic is the default.

Pruning (PyTorch): `prune_model` zeroes the smallest weights of the attention and MLP Linear layers with
`torch.nn.utils.prune`, unstructured (smallest |w| anywhere in a matrix) or by rows (the output neurons with
the smallest L2 norm), and makes the zeros permanent. Dense kernels do not run faster on zeros; pruning is
here to measure what quality a given sparsity costs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import Field

from lmpipe.atomic import atomic_path, write_json
from lmpipe.config import schema
from lmpipe.errors import LmpipeError
from lmpipe.export import METADATA_KEY
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE
from lmpipe.inference.onnx_dir import read_onnx_config

if TYPE_CHECKING:
    import onnx

    from lmpipe.model import GPT

QUANTIZED_OPS = ("MatMul",)
"""Op types ONNX Runtime quantizes (MatMuls with a constant weight; see the module docstring for the embedding)."""


@schema("quantize")
class QuantizeConfig:
    variants: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = field(
        default_factory=lambda: ["teacher", "student"]
    )
    """ONNX export directories under paths.onnx to quantize; each is written to <name>-int8 beside it."""
    method: Literal["dynamic", "static"] = "dynamic"
    """dynamic (activations quantized on the fly) or static (activation ranges calibrated on the val split);
    the encoder classifier is always dynamic."""
    per_channel: bool = False
    """One weight scale per output channel instead of per matrix (the tied embedding is then stored twice)."""
    calibration_windows: Annotated[int, Field(ge=1)] = 64
    """static only: block_size-token windows of the val split run through the model to calibrate."""
    classifier_per_channel: bool = True
    """The encoder classifier with one weight scale per output channel: the same file size, and more of its
    labels kept (measured on MiniLM with random heads: 79 % of 66-way labels against 57 % per matrix)."""
    agreement_texts: Annotated[int, Field(ge=1)] = 512
    """Held-out verses (the instructions test split) on which the int8 classifier's labels are checked
    against fp32's."""

    def __post_init__(self):
        if len(set(self.variants)) != len(self.variants):
            raise LmpipeError(f"quantize.variants={self.variants!r}: expected each name once")


@schema("prune")
class PruneConfig:
    sparsity: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """Fraction of each pruned weight matrix set to zero (0 disables pruning)."""
    method: Literal["unstructured", "rows"] = "unstructured"
    """unstructured (smallest |w| anywhere) or rows (whole output rows with the smallest L2 norm)."""
    source: Annotated[str, Field(min_length=1)] = "sft"
    """Model directory under paths.models to prune."""
    skip_embeddings: bool = True
    """Leave the (tied) token embedding / LM head matrix unpruned; only attention and MLP layers are pruned."""


# --- quantization ---------------------------------------------------------------------------------------------


def quantize_onnx(
    src_dir: str | Path,
    dst_dir: str | Path,
    cfg: QuantizeConfig,
    calibration_tokens: np.ndarray | None = None,
) -> dict[str, Any]:
    """Quantize the export in `src_dir` to int8 into `dst_dir` (replaced atomically); return the file sizes.

    `calibration_tokens` (a 1-D token array, e.g. the val shard) is required by the static method and ignored
    by the dynamic one. dst_dir gets the quantized model.onnx (self-contained), the source's tokenizer files
    and parity.json (the fp32 export's), and its config.json with "quantization" set to "<method>-int8",
    "variant" to "<source variant>-int8" and "quantized_from" to src_dir. Returns {src_bytes, dst_bytes, ratio}.
    """
    import onnx

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    src_model, config = src_dir / ONNX_FILE, read_onnx_config(src_dir)
    if config.get("quantization", "none") != "none":
        raise LmpipeError(
            f"{src_dir / ONNX_CONFIG_FILE} says quantization={config['quantization']!r}: expected an fp32 export"
        )
    if cfg.method == "static":
        windows = _calibration_windows(calibration_tokens, config["block_size"], cfg.calibration_windows)
        if int(windows.max()) >= config["vocab_size"]:
            raise LmpipeError(
                f"calibration tokens: id {int(windows.max())} is outside the vocab of {src_dir} "
                f"({config['vocab_size']}): expected tokens from the model's tokenizer"
            )
    model = onnx.load(src_model)
    fold_constant_transposes(model)
    config = {
        **config,
        "quantization": f"{cfg.method}-int8",
        "variant": f"{config['variant']}-int8",
        "quantized_from": str(src_dir),
        "per_channel": cfg.per_channel,
    }

    def finish(quantized: onnx.ModelProto) -> None:
        _share_tied_embedding(quantized)
        _set_metadata(quantized, config)

    reader = _prefill_reader(windows, config) if cfg.method == "static" else None
    return write_quantized(src_dir, dst_dir, model, config, QUANTIZED_OPS, cfg.per_channel, reader, finish)


def write_quantized(
    src_dir: Path,
    dst_dir: Path,
    model: onnx.ModelProto,
    config: dict,
    op_types: tuple[str, ...],
    per_channel: bool,
    reader=None,
    finish: Callable[[onnx.ModelProto], None] | None = None,
    check: Callable[[Path], dict] | None = None,
) -> dict[str, Any]:
    """Quantize `op_types` of `model` (the source graph, possibly rewritten) to int8 weights, one scale per
    matrix or per output channel, into a new `dst_dir`, replaced atomically: the int8 model.onnx
    (self-contained, the exporter's node records dropped, `finish` applied), the source's other files and
    `config` as config.json. Static when a calibration `reader` is given, else dynamic. `check(tmp)` runs on
    the finished directory before it replaces dst_dir (a failure leaves dst_dir as it was); what it returns is
    added to config.json. Returns {src_bytes, dst_bytes, ratio}."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic, quantize_static

    with atomic_path(dst_dir) as tmp, tempfile.TemporaryDirectory(prefix="lmpipe-quantize-") as scratch:
        tmp.mkdir()
        out = tmp / ONNX_FILE
        # The quantizer also writes helper models; keep them out of the output directory.
        folded = Path(scratch) / "folded.onnx"
        onnx.save(model, folded)
        common = dict(
            op_types_to_quantize=list(op_types),
            per_channel=per_channel,
            weight_type=QuantType.QInt8,
            use_external_data_format=False,
        )
        with _quiet_quantizer():
            if reader is None:
                quantize_dynamic(folded, out, extra_options={"MatMulConstBOnly": True}, **common)
            else:
                quantize_static(
                    folded,
                    out,
                    reader,
                    activation_type=QuantType.QUInt8,
                    # Activations only at MatMuls with constant weights: the attention MatMuls (scores and the
                    # weighted sum of values) read the cache, whose range grows with the context.
                    extra_options={"MatMulConstBOnly": True},
                    **common,
                )
        quantized = onnx.load(out)
        if finish is not None:
            finish(quantized)
        _drop_node_metadata(quantized)
        onnx.save(quantized, out)
        for path in src_dir.iterdir():
            if path.is_file() and path.name not in (ONNX_FILE, ONNX_CONFIG_FILE):
                shutil.copy(path, tmp / path.name)
        write_json(tmp / ONNX_CONFIG_FILE, config)
        if check is not None:
            write_json(tmp / ONNX_CONFIG_FILE, {**config, **check(tmp)})
        dst_bytes = out.stat().st_size
    src_bytes = (src_dir / ONNX_FILE).stat().st_size
    return {"src_bytes": src_bytes, "dst_bytes": dst_bytes, "ratio": dst_bytes / src_bytes}


def _calibration_windows(tokens: np.ndarray | None, block_size: int, n_windows: int) -> np.ndarray:
    """(n, block_size) int64 windows spread evenly over `tokens` (fewer if the tokens are short)."""
    if tokens is None:
        raise LmpipeError(
            "quantize.method='static' needs calibration tokens (the val split): none were given"
        )
    if np.ndim(tokens) != 1 or len(tokens) < 2:
        raise LmpipeError(
            f"calibration tokens: expected a 1-D array of at least 2 token ids, got shape {np.shape(tokens)}"
        )
    length = min(block_size, len(tokens))
    n = min(n_windows, len(tokens) // length)
    starts = np.linspace(0, len(tokens) - length, n).round().astype(np.int64)
    return np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts])


def _prefill_reader(windows: np.ndarray, config: dict):
    """A CalibrationDataReader feeding each window as a prefill (batch 1, empty past)."""
    from onnxruntime.quantization import CalibrationDataReader

    names = config["input_names"]
    empty = np.zeros((1, config["n_head"], 0, config["head_dim"]), dtype=np.float32)
    length = windows.shape[1]
    positions = np.arange(length, dtype=np.int64)[None]
    mask = np.ones((1, length), dtype=np.int64)

    class PrefillWindows(CalibrationDataReader):
        def __init__(self):
            self._rows = iter(windows)

        def get_next(self) -> dict | None:
            row = next(self._rows, None)
            if row is None:
                return None
            feeds = dict(zip(names[:3], (row[None], positions, mask), strict=True))
            return feeds | {name: empty for name in names[3:]}

    return PrefillWindows()


def fold_constant_transposes(model: onnx.ModelProto) -> None:
    """Replace each Transpose of an initializer by the transposed initializer, so the MatMul behind it has a
    constant weight the quantizer recognises."""
    from onnx import numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in inits]:
        weight = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
        graph.initializer.append(numpy_helper.from_array(np.transpose(weight, perm).copy(), node.output[0]))
        graph.node.remove(node)
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _share_tied_embedding(model: onnx.ModelProto) -> None:
    """Read the token embedding from the LM head's int8 weight, so the tied matrix is stored once, in int8.

    After `fold_constant_transposes` and quantization the graph holds the fp32 table W (V, C) for the
    embedding Gather and the int8 copy Q (C, V) of W.T for the LM head, with its scale (one, or one per
    vocabulary entry with per_channel) named as ONNX Runtime names it (`<w>_quantized`, `<w>_scale`,
    `<w>_zero_point`). The Gather then reads rows of Transpose(Q) (folded by ONNX Runtime when it loads the
    graph) and multiplies them by their scale. Only done when Q dequantizes to W within half a step and its
    zero point is 0 (symmetric int8, the default); otherwise the fp32 table stays.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    inits = {init.name: init for init in graph.initializer}
    for node in [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits]:
        table = inits[node.input[0]]
        if table.data_type != TensorProto.FLOAT or len(table.dims) != 2:
            continue
        weight = numpy_helper.to_array(table)
        for name, init in inits.items():
            stem = name.removesuffix("_quantized")
            if init.data_type != TensorProto.INT8 or tuple(init.dims) != weight.shape[::-1]:
                continue
            if stem == name or f"{stem}_scale" not in inits or f"{stem}_zero_point" not in inits:
                continue
            rows = numpy_helper.to_array(init).T  # (V, C)
            scale = numpy_helper.to_array(inits[f"{stem}_scale"]).astype(np.float32)
            zero = numpy_helper.to_array(inits[f"{stem}_zero_point"])
            row_scale = scale.reshape(-1, 1) if scale.ndim else scale  # per_channel: one per vocabulary entry
            if np.any(zero != 0) or np.abs(rows * row_scale - weight).max() > 0.501 * scale.max():
                continue
            out, ids = node.output[0], node.input[1]
            new = [
                helper.make_node("Transpose", [name], [f"{stem}_rows"], perm=[1, 0]),
                helper.make_node("Gather", [f"{stem}_rows", ids], [f"{out}_int8"], axis=0),
                helper.make_node("Cast", [f"{out}_int8"], [f"{out}_unscaled"], to=TensorProto.FLOAT),
            ]
            if scale.ndim:
                axis = numpy_helper.from_array(np.array([-1], dtype=np.int64), f"{out}_scale_axis")
                graph.initializer.append(axis)
                new += [
                    helper.make_node("Gather", [f"{stem}_scale", ids], [f"{out}_scale"], axis=0),
                    helper.make_node("Unsqueeze", [f"{out}_scale", axis.name], [f"{out}_row_scale"]),
                    helper.make_node("Mul", [f"{out}_unscaled", f"{out}_row_scale"], [out]),
                ]
            else:
                new.append(helper.make_node("Mul", [f"{out}_unscaled", f"{stem}_scale"], [out]))
            at = list(graph.node).index(node)
            graph.node.remove(node)
            for offset, added in enumerate(new):
                graph.node.insert(at + offset, added)
            break
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def _drop_node_metadata(model: onnx.ModelProto) -> None:
    """Drop the exporter's per-node debugging records (source stack traces, module paths): ~150 KB whatever the
    model's size, up to a quarter of a small model's int8 file, and most of them describe nodes the quantizer
    replaced. The fp32 export keeps them."""
    for node in model.graph.node:
        del node.metadata_props[:]
        node.doc_string = ""


def _set_metadata(model: onnx.ModelProto, config: dict) -> None:
    """Keep the graph's copy of config.json (written by lmpipe.export) in step with the new config.json."""
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps(config, sort_keys=True)
            return
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(config, sort_keys=True))


@contextlib.contextmanager
def _quiet_quantizer():
    """Silence the quantizer's advice to run its pre-processing script (logged to the root logger every call)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --- pruning --------------------------------------------------------------------------------------------------


def prune_model(model: GPT, cfg: PruneConfig) -> dict[str, Any]:
    """Zero `cfg.sparsity` of the weights of every attention and MLP Linear layer of `model`, in place.

    unstructured: torch's l1_unstructured (the smallest |w| of each matrix); rows: ln_structured with n=2 on
    dim 0 (whole output rows with the smallest L2 norm; biases are kept). The masks are made permanent
    (`prune.remove`), so the model saves and exports like any other. With skip_embeddings=False the tied
    embedding / LM head matrix is pruned too (rows method: whole vocabulary entries). Sparsity 0 prunes
    nothing. Returns the achieved sparsity (fraction of zeros) per pruned weight and overall.
    """
    from torch import nn
    from torch.nn.utils import prune

    targets = {
        f"blocks.{i}.{name}": module
        for i, block in enumerate(model.blocks)
        for name, module in block.named_modules()
        if isinstance(module, nn.Linear)
    }
    if not cfg.skip_embeddings:
        # lm_head.weight is wte.weight when tied: prune.remove writes the pruned values into that one Parameter.
        targets["lm_head"] = model.lm_head
    if cfg.sparsity > 0:
        for module in targets.values():
            if cfg.method == "unstructured":
                prune.l1_unstructured(module, "weight", amount=float(cfg.sparsity))
            else:
                prune.ln_structured(module, "weight", amount=float(cfg.sparsity), n=2, dim=0)
            prune.remove(module, "weight")
    layers, zeros, total = {}, 0, 0
    for name, module in targets.items():
        weight = module.weight.detach()
        n_zero = int((weight == 0).sum())
        layers[f"{name}.weight"] = n_zero / weight.numel()
        zeros, total = zeros + n_zero, total + weight.numel()
    return {"layers": layers, "overall": zeros / total, "zeroed": zeros, "pruned_parameters": total}
