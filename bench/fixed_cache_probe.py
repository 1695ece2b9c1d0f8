"""Probe (not in `make bench`): what a fixed-size, preallocated KV cache would gain over the fused export's.

The fused export (`lmpipe.onnx_graph`) appends each step's keys and values with `MultiHeadAttention`, which
copies the whole past into a new present tensor per layer and step. This probe rewrites an export's graph so
that each `MultiHeadAttention` becomes ONNX Runtime's `GroupQueryAttention` (as many key/value heads as query
heads) over a cache of block_size positions: past and present are bound to one buffer per layer (I/O binding),
which the operator appends to in place. Everything else (rotary nodes, the MatMuls, int8 or not) stays as
exported; the key padding mask is left out (batch 1, no padding), causality is the operator's own. Batch 1, greedy, the same prompt and loop for both; the modes alternate over
`--repeats` rounds and the median tokens/s is reported, with whether both generated the same tokens.

    python bench/fixed_cache_probe.py --onnx-dir models/onnx/teacher --threads 1 [--out results.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from lmpipe import atomic
from lmpipe.formats import ONNX_FILE
from lmpipe.inference.engine import OrtEngine
from lmpipe.onnx_graph import MS_DOMAIN

ROOT = Path(__file__).resolve().parent.parent


def fixed_cache_graph(onnx_path: Path, config: dict):
    """The export's graph with GroupQueryAttention over block_size-long past/present buffers."""
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(onnx_path)
    graph = model.graph
    heads, length = config["n_head"], config["block_size"]
    for i, node in enumerate(graph.node):
        if node.op_type != "MultiHeadAttention":
            continue
        # GroupQueryAttention has no key padding mask: the probe runs batch 1 without padding, so it is left out.
        q, k, v, _, _, bias, past_key, past_value = node.input
        graph.node.remove(node)
        gqa = helper.make_node(
            "GroupQueryAttention",
            [q, k, v, past_key, past_value, "seqlens_k", "total_sequence_length", "", "", "", bias],
            list(node.output[:3]),
            name=node.name,
            domain=MS_DOMAIN,
            num_heads=heads,
            kv_num_heads=heads,
        )
        graph.node.insert(i, gqa)
    graph.input.extend(
        [
            helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
            helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        ]
    )
    for value in [*graph.input, *graph.output]:
        if value.name.startswith(("past_", "present_")):
            value.type.tensor_type.shape.dim[2].dim_value = length
    return model


def fixed_cache_runner(model, config: dict, threads: int):
    """generate(prompt (1, T), n) -> (tokens, tokens/s over the decode steps), caches updated in place."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    shape = (1, config["n_head"], config["block_size"], config["head_dim"])

    def generate(prompt: np.ndarray, n: int):
        binding = session.io_binding()
        for name in config["input_names"][3:]:
            buffer = ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32))
            binding.bind_ortvalue_input(name, buffer)
            binding.bind_ortvalue_output(name.replace("past_", "present_"), buffer)

        def step(ids, start):
            total = start + ids.shape[1]
            binding.bind_cpu_input("input_ids", ids)
            binding.bind_cpu_input("position_ids", np.arange(start, total)[None])
            binding.bind_cpu_input("attention_mask", np.ones((1, total), np.int64))
            binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
            binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
            binding.bind_output("logits")  # its shape changes from prefill to decode
            session.run_with_iobinding(binding)
            logits = next(v for v in binding.get_outputs() if v.shape()[-1] == config["vocab_size"])
            return int(logits.numpy()[0, -1].argmax())

        tokens = [step(prompt, 0)]
        started = time.perf_counter()
        for i in range(n - 1):
            tokens.append(step(np.array([[tokens[-1]]]), prompt.shape[1] + i))
        return tokens, (n - 1) / (time.perf_counter() - started)

    return generate


def concat_cache_runner(engine: OrtEngine):
    """The export as it is, through `OrtEngine.forward` (the present is a new, longer array every step)."""

    def generate(prompt: np.ndarray, n: int):
        length = prompt.shape[1]
        logits, past = engine.forward(prompt, np.arange(length)[None], np.ones_like(prompt))
        tokens = [int(logits[0, -1].argmax())]
        started = time.perf_counter()
        for i in range(n - 1):
            pos = length + i
            logits, past = engine.forward(
                np.array([[tokens[-1]]]), np.array([[pos]]), np.ones((1, pos + 1), np.int64), past
            )
            tokens.append(int(logits[0, -1].argmax()))
        return tokens, (n - 1) / (time.perf_counter() - started)

    return generate


def probe(onnx_dir: Path, threads: int, prompt_tokens: int, new_tokens: int, repeats: int) -> dict:
    engine = OrtEngine(onnx_dir, threads=threads)
    config = engine.config
    if prompt_tokens + new_tokens > config["block_size"]:
        raise SystemExit(f"--prompt-tokens + --new-tokens exceeds block_size {config['block_size']}")
    runners = {
        "concat_cache": concat_cache_runner(engine),
        "fixed_cache": fixed_cache_runner(fixed_cache_graph(onnx_dir / ONNX_FILE, config), config, threads),
    }
    prompt = np.random.default_rng(0).integers(8, config["vocab_size"], (1, prompt_tokens))
    outputs = {mode: run(prompt, 3)[0] for mode, run in runners.items()}  # warm-up
    rates: dict[str, list[float]] = {mode: [] for mode in runners}
    for _ in range(repeats):
        for mode, run in runners.items():
            outputs[mode], rate = run(prompt, new_tokens)
            rates[mode].append(rate)
    median = {mode: float(np.median(r)) for mode, r in rates.items()}
    return {
        "onnx_dir": str(onnx_dir),
        "quantization": config["quantization"],
        "threads": threads,
        "tokens_per_sec": median,
        "runs": rates,
        "fixed_vs_concat": median["fixed_cache"] / median["concat_cache"],
        "same_tokens": outputs["fixed_cache"] == outputs["concat_cache"],
    }


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--onnx-dir", type=Path, nargs="+", default=[ROOT / "models" / "onnx" / "teacher"])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "fixed_cache_probe.json")
    args = p.parse_args(argv)
    results = []
    for threads in args.threads:
        for onnx_dir in args.onnx_dir:
            r = probe(onnx_dir, threads, args.prompt_tokens, args.new_tokens, args.repeats)
            results.append(r)
            rate = r["tokens_per_sec"]
            print(
                f"{onnx_dir} ({r['quantization']}), {threads} thread(s): concat {rate['concat_cache']:.0f}, "
                f"fixed {rate['fixed_cache']:.0f} tok/s = {r['fixed_vs_concat']:.2f}x; "
                f"same tokens: {r['same_tokens']}",
                flush=True,
            )
    atomic.write_json(args.out, {"results": results})
    return results


if __name__ == "__main__":
    sys.exit(main() and 0)
