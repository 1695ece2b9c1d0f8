"""Benchmark: decode speed, prefill latency, perplexity and file size of PyTorch vs ONNX Runtime fp32 vs int8.

One run, one model, four ways to generate with it:
- `torch_nocache`: PyTorch recomputing the whole window every step (no KV cache),
- `torch_cache`: PyTorch with its KV cache,
- `ort_fp32`: the ONNX export on ONNX Runtime (`OrtEngine`), with the cache,
- `ort_int8`: its dynamic int8 quantization (`lmpipe.compress`), with the cache.

All four run the same greedy loop (prefill the prompt, then `--new-tokens` steps of one token per row, no early
stop) on the same prompts, at each `--batch-sizes`, interleaved over `--repeats` rounds so that load changes hit
every mode alike; decode tokens/s counts the generated tokens over the decode steps (prefill excluded) and the
median round is reported. Prefill latency (p50/p95 over `--prefill-runs`) is timed separately at batch 1 on a
`--prefill-tokens` prompt. Where the time of a batch-1 decode step goes, per operator type, comes from ONNX
Runtime's profiler over one more greedy loop of each export (`profile`). Test perplexity of fp32 (PyTorch and ONNX Runtime) and int8 is computed on the first
`--ppl-windows` block_size windows of the test split. Both runtimes use `--threads` intra-op threads.

The model is `--model-dir` (default models/sft) with its exports models/onnx/teacher and teacher-int8 when they
exist; a missing export is made afresh in a temporary directory (the quantization settings come from conf/).
`--random` benchmarks randomly initialised weights of the shape composed from conf/ (plus `--overrides`)
instead, so the benchmark runs without a trained model (perplexities are then those of random weights).

    python bench/inference.py [--random] [--threads 2] [--out bench/results/inference.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from lmpipe import atomic, config
from lmpipe.chat import tokenizer_config
from lmpipe.compress import QuantizeConfig, quantize_onnx
from lmpipe.errors import LmpipeError, positive_int, run_main
from lmpipe.evaluation.lm import model_nll, perplexity
from lmpipe.export import ExportConfig, export_onnx
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE
from lmpipe.inference.engine import OrtEngine
from lmpipe.model import GPT, load_model, save_checkpoint
from lmpipe.tokenizer import (
    TOKENIZER_CONFIG_FILE,
    TOKENIZER_FILE,
    TokenizerConfig,
    load_tokenizer,
    read_meta,
    read_shard,
    save_tokenizer,
    train_tokenizer,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "inference.json"
DEFAULT_MODEL = ROOT / "models" / "sft"
DEFAULT_ONNX = ROOT / "models" / "onnx" / "teacher"
DEFAULT_INT8 = ROOT / "models" / "onnx" / "teacher-int8"
MODES = ("torch_nocache", "torch_cache", "ort_fp32", "ort_int8")
TARGETS = {
    # name: (bound, "min": at least the bound, "max": at most, "max_abs": absolute value at most)
    "ort_fp32_vs_torch_cache": (3.0, "min"),
    "ort_fp32_vs_torch_nocache": (10.0, "min"),
    "int8_vs_fp32_speed": (1.5, "min"),
    "int8_ppl_change_pct": (3.0, "max_abs"),
    "int8_vs_fp32_size": (0.3, "max"),
}
"""Targets, judged at batch size 1 (the latency case): the ratio and its bound."""
PARITY_ATOL = 1e-3
"""Largest max-abs logit difference between PyTorch and the fp32 export: above it the export is stale."""
_TOKENIZER_TEXTS = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
]
"""Fallback corpus for --random without a trained tokenizer: only its special-token ids matter."""


# --- the four generators --------------------------------------------------------------------------------------

# A runner is (prefill, step): prefill(ids (B, T)) -> (last logits (B, V), state); step(tokens (B,), state) ->
# (last logits, state). The greedy loop around them is shared, so every mode pays the same Python overhead.
Runner = tuple[Callable, Callable]


def torch_runner(model: GPT, use_cache: bool) -> Runner:
    @torch.no_grad()
    def prefill(ids):
        ids = torch.from_numpy(ids)
        out = model(ids, use_cache=use_cache)
        return out.logits[:, -1].numpy(), (out.past_kv if use_cache else ids)

    @torch.no_grad()
    def step(tokens, state):
        tokens = torch.from_numpy(tokens)[:, None]
        if use_cache:
            out = model(tokens, past_kv=state, use_cache=True)
            return out.logits[:, -1].numpy(), out.past_kv
        ids = torch.cat((state, tokens), dim=1)  # no cache: the whole window again
        return model(ids).logits[:, -1].numpy(), ids

    return prefill, step


def ort_runner(engine: OrtEngine) -> Runner:
    def prefill(ids):
        batch, length = ids.shape
        positions = np.broadcast_to(np.arange(length), ids.shape)
        logits, past = engine.forward(ids, positions, np.ones_like(ids), None)
        return logits[:, -1], (past, length)

    def step(tokens, state):
        past, length = state
        positions = np.full((len(tokens), 1), length, dtype=np.int64)
        mask = np.ones((len(tokens), length + 1), dtype=np.int64)
        logits, past = engine.forward(tokens[:, None], positions, mask, past)
        return logits[:, -1], (past, length + 1)

    return prefill, step


def greedy_decode(runner: Runner, prompt: np.ndarray, new_tokens: int) -> tuple[np.ndarray, float]:
    """Greedy tokens (B, new_tokens) after `prompt`, and the seconds the decode steps took (prefill excluded).

    The first token comes from the prefill's logits; each of the other new_tokens - 1 steps feeds one token.
    Tokens/s is counted over those steps, so it measures decode alone.
    """
    prefill, step = runner
    logits, state = prefill(prompt)
    tokens = np.empty((prompt.shape[0], new_tokens), dtype=np.int64)
    tokens[:, 0] = logits.argmax(axis=-1)
    started = time.perf_counter()
    for i in range(1, new_tokens):
        logits, state = step(tokens[:, i - 1], state)
        tokens[:, i] = logits.argmax(axis=-1)
    return tokens, time.perf_counter() - started


def decode_speeds(
    runners: dict[str, Runner], prompts: np.ndarray, batch_sizes: Sequence[int], new_tokens: int, repeats: int
) -> tuple[dict, dict]:
    """{batch: {mode: tokens/s stats}} and {batch: {mode: greedy tokens of the last round}}."""
    speeds, outputs = {}, {}
    for batch in batch_sizes:
        prompt = prompts[:batch]
        for runner in runners.values():  # warm-up: first runs allocate and pick kernels
            greedy_decode(runner, prompt, 3)
        rates: dict[str, list[float]] = {mode: [] for mode in runners}
        for _ in range(repeats):
            for mode, runner in runners.items():  # interleaved: a load change hits every mode alike
                tokens, seconds = greedy_decode(runner, prompt, new_tokens)
                rates[mode].append(batch * (new_tokens - 1) / seconds)
                outputs.setdefault(str(batch), {})[mode] = tokens
        speeds[str(batch)] = {
            mode: {
                "tokens_per_sec": float(np.median(r)),
                "best_tokens_per_sec": max(r),
                "runs": r,
            }
            for mode, r in rates.items()
        }
    return speeds, outputs


def prefill_latency(runner: Runner, prompt: np.ndarray, runs: int) -> dict:
    prefill, _ = runner
    for _ in range(2):
        prefill(prompt)
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        prefill(prompt)
        times.append((time.perf_counter() - started) * 1000)
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "tokens": prompt.shape[1],
        "runs": runs,
    }


# --- where a decode step's time goes ---------------------------------------------------------------------------


def op_profile(onnx_dir: Path, threads: int, prompt: np.ndarray, new_tokens: int, scratch: Path) -> dict:
    """ONNX Runtime's profiler over the greedy loop at batch 1 (the engine's session options, profiling on).

    Per node, the median kernel time over the decode steps (robust to the scheduler preempting a step on a
    shared machine); per op type the sum of its nodes' medians (µs per step) and its share of all kernels.
    `run_us` is the median whole `session.run` of a step: what it has beyond `kernel_us` is the executor's own
    work (scheduling nodes, allocating outputs, thread-pool hand-offs).
    """
    import onnxruntime as ort

    cfg = json.loads((onnx_dir / ONNX_CONFIG_FILE).read_text())
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    options.enable_profiling = True
    options.profile_file_prefix = str(scratch / f"profile-{onnx_dir.name}")
    session = ort.InferenceSession(str(onnx_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"])
    names, outputs = cfg["input_names"], cfg["output_names"]
    ids = prompt[:1]
    empty = np.zeros((1, cfg["n_head"], 0, cfg["head_dim"]), dtype=np.float32)
    past = [empty] * (2 * cfg["n_layer"])
    positions = np.arange(ids.shape[1])[None]
    for _ in range(new_tokens):
        mask = np.ones((1, positions[0, -1] + 1), np.int64)
        feeds = dict(zip(names, [ids, positions, mask, *past], strict=True))
        out = session.run(outputs, feeds)
        ids, past = out[0][:, -1].argmax(-1)[:, None], out[1:]
        positions = positions[:, -1:] + 1
    events = json.loads(Path(session.end_profiling()).read_text())
    runs = [e["dur"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run"][1:]
    by_node: dict[str, list] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_node.setdefault(e["name"], [e["args"]["op_name"]]).append(e["dur"])
    ops: dict[str, dict] = {}
    for op, *durations in by_node.values():
        entry = ops.setdefault(op, {"us_per_step": 0.0, "nodes": 0})
        # The first call is the prefill: the decode steps are the rest.
        entry["us_per_step"] += float(np.median(durations[1:]))
        entry["nodes"] += 1
    kernel = sum(e["us_per_step"] for e in ops.values())
    for entry in ops.values():
        entry["share"] = entry["us_per_step"] / kernel
    return {
        "run_us": float(np.median(runs)),
        "kernel_us": kernel,
        "nodes": sum(e["nodes"] for e in ops.values()),
        "steps": len(runs),
        "ops": dict(sorted(ops.items(), key=lambda kv: -kv[1]["us_per_step"])),
    }


# --- perplexity -----------------------------------------------------------------------------------------------


class OrtLogits:
    """An `OrtEngine` behind the interface `model_nll` uses: `model(idx).logits`, torch in and out."""

    training = False

    def __init__(self, engine: OrtEngine):
        self.engine = engine

    def __call__(self, idx: torch.Tensor):
        ids = idx.numpy()
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        logits, _ = self.engine.forward(ids, positions, np.ones_like(ids), None)
        return _Logits(torch.from_numpy(logits))

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self


@dataclasses.dataclass
class _Logits:
    logits: torch.Tensor


def perplexities(models: dict, tokens: np.ndarray, block_size: int) -> dict:
    out = {}
    for name, model in models.items():
        nats, n = model_nll(model, tokens, block_size, batch_size=8)
        out[name] = perplexity(nats, n)
    out["scored_tokens"] = len(tokens) - 1
    return out


# --- what to benchmark ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Subject:
    """The model in its three forms, and where each came from."""

    model: GPT
    onnx_fp32: Path
    onnx_int8: Path
    source: dict


def prepare(args, cfg, scratch: Path) -> Subject:
    """Load (or, with --random, create) the model and find or make its fp32 and int8 exports."""
    seed = int(cfg.seed)
    if args.random:
        model_dir = random_model_dir(cfg, scratch / "model", seed)
        onnx_dir = int8_dir = None
    else:
        model_dir = args.model_dir
        if not (model_dir / "model.pt").is_file():
            raise LmpipeError(
                f"missing {model_dir / 'model.pt'}: run `make train` first, pass --model-dir, or use --random"
            )
        onnx_dir = _existing_export(args.onnx_dir, DEFAULT_ONNX)
        # The pipeline's int8 export belongs with its fp32 one: a --onnx-dir of your own gets a fresh int8 copy.
        int8_dir = _existing_export(args.int8_dir, DEFAULT_INT8 if args.onnx_dir is None else None)
    model, _ = load_model(model_dir / "model.pt")
    source = {"model_dir": str(model_dir), "random": args.random}
    if onnx_dir is None:
        onnx_dir = scratch / "onnx" / "fp32"
        export_onnx(model_dir, onnx_dir, ExportConfig(), seed, variant_name="bench")
        if args.int8_dir is None:
            int8_dir = None  # the default int8 export was made from the (missing) default fp32 one
    if int8_dir is None:
        qcfg = config.build(cfg.quantize) if "quantize" in cfg else QuantizeConfig()
        calibration = _split(cfg, "val") if qcfg.method == "static" else None
        int8_dir = scratch / "onnx" / "int8"
        quantize_onnx(onnx_dir, int8_dir, qcfg, calibration)
    fp32_config, int8_config = (json.loads((d / ONNX_CONFIG_FILE).read_text()) for d in (onnx_dir, int8_dir))
    if int8_config.get("model") != fp32_config.get("model"):
        raise LmpipeError(
            f"{int8_dir} was quantized from a model of another shape than {onnx_dir}: re-run the quantize "
            "stage, or pass --int8-dir"
        )
    source |= {
        "onnx_fp32": str(onnx_dir),
        "onnx_int8": str(int8_dir),
        "fresh_fp32_export": onnx_dir.is_relative_to(scratch),
        "fresh_int8_export": int8_dir.is_relative_to(scratch),
        "int8_quantization": int8_config["quantization"],
    }
    return Subject(model.float().eval(), onnx_dir, int8_dir, source)


def _existing_export(given: Path | None, default: Path | None) -> Path | None:
    """The export directory to use: the one given (which must exist), else the default if present, else None."""
    if given is not None:
        if not (given / ONNX_FILE).is_file():
            raise LmpipeError(f"missing {given / ONNX_FILE}: expected an ONNX export directory")
        return given
    return default if default is not None and (default / ONNX_FILE).is_file() else None


def random_model_dir(cfg, path: Path, seed: int) -> Path:
    """A model directory with randomly initialised weights of the composed model shape, and a tokenizer."""
    tokens_dir = ROOT / cfg.paths.tokens
    vocab = int(read_meta(tokens_dir)["vocab_size"]) if (tokens_dir / "meta.json").is_file() else None
    vocab = vocab or int(cfg.tokenizer.vocab_size)
    path.mkdir(parents=True)
    tok = load_tokenizer(tokens_dir / TOKENIZER_FILE) if (tokens_dir / TOKENIZER_FILE).is_file() else None
    if tok is None or tok.get_vocab_size() > vocab:
        tok = train_tokenizer(_TOKENIZER_TEXTS, TokenizerConfig(kind="bpe", vocab_size=vocab))
    save_tokenizer(tok, path / TOKENIZER_FILE)
    atomic.write_json(path / TOKENIZER_CONFIG_FILE, tokenizer_config())
    torch.manual_seed(seed)
    model = GPT(config.build(cfg.model, vocab_size=vocab))
    save_checkpoint(path / "model.pt", model, {"stage": "bench-random"})
    return path


def _split(cfg, split: str) -> np.ndarray | None:
    tokens_dir = ROOT / cfg.paths.tokens
    if not (tokens_dir / "meta.json").is_file() or split not in read_meta(tokens_dir)["splits"]:
        return None
    return np.asarray(read_shard(tokens_dir, split), dtype=np.int64)


def token_source(cfg, vocab: int, n: int, seed: int) -> tuple[np.ndarray, str]:
    """The first n test-split tokens, or seeded random ids when there is no test split (or it does not fit)."""
    test = _split(cfg, "test")
    if test is not None and len(test) >= n and int(test[:n].max()) < vocab:
        return test[:n], "test"
    # Ids above the reserved special tokens, as ordinary text would be.
    return np.random.default_rng(seed).integers(8, vocab, n), "random"


# --- putting it together --------------------------------------------------------------------------------------


def ratios(speeds: dict) -> dict:
    out = {}
    for batch, s in speeds.items():
        rate = {mode: s[mode]["tokens_per_sec"] for mode in MODES}
        out[batch] = {
            "ort_fp32_vs_torch_cache": rate["ort_fp32"] / rate["torch_cache"],
            "ort_fp32_vs_torch_nocache": rate["ort_fp32"] / rate["torch_nocache"],
            "int8_vs_fp32_speed": rate["ort_int8"] / rate["ort_fp32"],
        }
    return out


def judge(values: dict) -> dict:
    out = {}
    for name, (bound, kind) in TARGETS.items():
        value = values[name]
        holds = value >= bound if kind == "min" else (abs(value) if kind == "max_abs" else value) <= bound
        target = {"min": ">=", "max": "<=", "max_abs": "|x| <="}[kind]
        out[name] = {"value": value, "target": f"{target} {bound:g}", "holds": holds}
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((a == b).mean())


def machine_info(threads: int) -> dict:
    import onnxruntime

    cpu_model = ""
    if Path("/proc/cpuinfo").is_file():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor(),
        "threads": threads,
        "torch_version": torch.__version__,
        "onnxruntime_version": onnxruntime.__version__,
        "python_version": platform.python_version(),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)")
    p.add_argument(
        "--model-dir", type=Path, default=DEFAULT_MODEL, help="model directory (default: %(default)s)"
    )
    p.add_argument("--onnx-dir", type=Path, help=f"its fp32 export (default: {DEFAULT_ONNX} if present)")
    p.add_argument(
        "--int8-dir",
        type=Path,
        help=f"its int8 export (default: {DEFAULT_INT8} if present and no --onnx-dir)",
    )
    p.add_argument("--random", action="store_true", help="random weights of the conf/ model shape instead")
    p.add_argument(
        "--overrides", nargs="*", default=[], help="Hydra overrides for conf/, e.g. model=gpt-tiny"
    )
    p.add_argument(
        "--threads", type=positive_int, default=os.cpu_count(), help="intra-op threads (default: %(default)s)"
    )
    p.add_argument(
        "--batch-sizes", type=positive_int, nargs="+", default=[1, 8], help="(default: %(default)s)"
    )
    p.add_argument(
        "--prompt-tokens", type=positive_int, default=16, help="prompt length (default: %(default)s)"
    )
    p.add_argument(
        "--new-tokens", type=positive_int, default=100, help="tokens generated (default: %(default)s)"
    )
    p.add_argument(
        "--repeats", type=positive_int, default=3, help="timed rounds per mode (default: %(default)s)"
    )
    p.add_argument(
        "--prefill-tokens", type=positive_int, default=64, help="prefill prompt length (default: %(default)s)"
    )
    p.add_argument(
        "--prefill-runs", type=positive_int, default=30, help="timed prefills (default: %(default)s)"
    )
    p.add_argument(
        "--ppl-windows",
        type=positive_int,
        default=32,
        help="test windows for perplexity (default: %(default)s)",
    )
    args = p.parse_args(argv)
    if args.new_tokens < 2:
        p.error("--new-tokens: expected at least 2 (the first token comes from the prefill)")
    return args


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write the JSON results to --out, print a table and return the results."""
    args = parse_args(argv)
    cfg = config.compose(args.overrides, conf_dir=ROOT / "conf")
    seed = int(cfg.seed)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as scratch:
            results = run(args, cfg, seed, Path(scratch))
    finally:
        torch.set_num_threads(threads_before)
    atomic.write_json(args.out, results)
    print(table(results, args.out))
    return results


def run(args, cfg, seed: int, scratch: Path) -> dict:
    subject = prepare(args, cfg, scratch)
    model, mcfg = subject.model, subject.model.config
    longest = args.prompt_tokens + args.new_tokens
    for name, length in (
        ("--prompt-tokens + --new-tokens", longest),
        ("--prefill-tokens", args.prefill_tokens),
    ):
        if length > mcfg.block_size:
            raise LmpipeError(f"{name} = {length} exceeds the model's block_size {mcfg.block_size}")
    engines = {
        "ort_fp32": OrtEngine(subject.onnx_fp32, threads=args.threads),
        "ort_int8": OrtEngine(subject.onnx_int8, threads=args.threads),
    }
    runners = {
        "torch_nocache": torch_runner(model, use_cache=False),
        "torch_cache": torch_runner(model, use_cache=True),
        **{mode: ort_runner(engine) for mode, engine in engines.items()},
    }
    batch_max = max(args.batch_sizes)
    n_ppl = args.ppl_windows * mcfg.block_size + 1
    tokens, tokens_from = token_source(cfg, mcfg.vocab_size, max(n_ppl, batch_max * longest), seed)
    prompts = tokens[: batch_max * args.prompt_tokens].reshape(batch_max, args.prompt_tokens)

    # A stale export (of other weights) would make every comparison meaningless: check it matches first.
    parity_ids = tokens[: args.prefill_tokens][None]
    with torch.no_grad():
        reference = model(torch.from_numpy(parity_ids)).logits.numpy()
    fp32_logits, _ = engines["ort_fp32"].forward(
        parity_ids, np.arange(args.prefill_tokens)[None], np.ones_like(parity_ids)
    )
    parity = float(np.abs(fp32_logits - reference).max())
    if parity > PARITY_ATOL:
        raise LmpipeError(
            f"{subject.onnx_fp32} does not match {subject.source['model_dir']} (max abs logit diff {parity:.2g}): "
            "re-run the export stage, or pass --onnx-dir"
        )

    load_start = os.getloadavg()[0]
    speeds, outputs = decode_speeds(runners, prompts, args.batch_sizes, args.new_tokens, args.repeats)
    prefill_prompt = tokens[: args.prefill_tokens][None]
    prefill = {
        mode: prefill_latency(runners[mode], prefill_prompt, args.prefill_runs)
        for mode in ("torch_cache", "ort_fp32", "ort_int8")
    }
    profile = {
        mode: op_profile(path, args.threads, prompts, args.new_tokens, scratch)
        for mode, path in (("ort_fp32", subject.onnx_fp32), ("ort_int8", subject.onnx_int8))
    }
    ppl = perplexities(
        {"torch_fp32": model, **{mode: OrtLogits(engine) for mode, engine in engines.items()}},
        tokens[:n_ppl],
        mcfg.block_size,
    )
    ppl["int8_change_pct"] = (ppl["ort_int8"] / ppl["ort_fp32"] - 1) * 100
    ppl["tokens"] = tokens_from
    load_end = os.getloadavg()[0]

    sizes = {
        "model_pt_bytes": (Path(subject.source["model_dir"]) / "model.pt").stat().st_size,
        "onnx_fp32_bytes": (subject.onnx_fp32 / ONNX_FILE).stat().st_size,
        "onnx_int8_bytes": (subject.onnx_int8 / ONNX_FILE).stat().st_size,
    }
    sizes["int8_vs_fp32"] = sizes["onnx_int8_bytes"] / sizes["onnx_fp32_bytes"]
    speed_ratios = ratios(speeds)
    first = str(args.batch_sizes[0])
    return {
        "machine": machine_info(args.threads)
        | {"load_avg_1m_start": load_start, "load_avg_1m_end": load_end},
        "model": {
            **subject.source,
            "parameters": model.num_parameters(),
            "config": dataclasses.asdict(mcfg),
            "fp32_parity_max_abs_diff": parity,
        },
        "settings": {
            k: getattr(args, k)
            for k in (
                "batch_sizes",
                "prompt_tokens",
                "new_tokens",
                "repeats",
                "prefill_tokens",
                "prefill_runs",
                "ppl_windows",
            )
        }
        | {"overrides": list(args.overrides), "seed": seed, "prompt_tokens_from": tokens_from},
        "decode": speeds,
        "greedy_agreement": {
            batch: {
                "torch_cache_vs_nocache": agreement(out["torch_cache"], out["torch_nocache"]),
                "ort_fp32_vs_torch_cache": agreement(out["ort_fp32"], out["torch_cache"]),
                "ort_int8_vs_ort_fp32": agreement(out["ort_int8"], out["ort_fp32"]),
            }
            for batch, out in outputs.items()
        },
        "prefill": prefill,
        "profile": profile,
        "perplexity": ppl,
        "sizes": sizes,
        "ratios": speed_ratios,
        "targets_batch": int(first),
        "targets": judge(
            speed_ratios[first]
            | {"int8_ppl_change_pct": ppl["int8_change_pct"], "int8_vs_fp32_size": sizes["int8_vs_fp32"]}
        ),
    }


def table(r: dict, out: Path) -> str:
    m, model, batches = r["machine"], r["model"], list(r["decode"])
    lines = [
        f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['threads']} threads, torch {m['torch_version']}, "
        f"onnxruntime {m['onnxruntime_version']}, load avg {m['load_avg_1m_start']:.2f} -> {m['load_avg_1m_end']:.2f}",
        f"model: {'random weights' if model['random'] else model['model_dir']}, {model['parameters'] / 1e6:.2f}M params, "
        f"int8 = {model['int8_quantization']}; {r['settings']['prompt_tokens']}-token prompt + "
        f"{r['settings']['new_tokens']} greedy tokens, median of {r['settings']['repeats']}",
        "",
        f"{'mode':<15}"
        + "".join(f"{f'tok/s b={b}':>13}" for b in batches)
        + f"{'prefill p50/p95 ms':>22}{'test ppl':>11}",
    ]
    ppl_of = {"torch_cache": "torch_fp32", "ort_fp32": "ort_fp32", "ort_int8": "ort_int8"}
    for mode in MODES:
        row = f"{mode:<15}" + "".join(f"{r['decode'][b][mode]['tokens_per_sec']:13.0f}" for b in batches)
        pre = r["prefill"].get(mode)
        row += f"{pre['p50_ms']:>13.2f} / {pre['p95_ms']:<6.2f}" if pre else " " * 22
        row += f"{r['perplexity'][ppl_of[mode]]:11.2f}" if mode in ppl_of else ""
        lines.append(row)
    s = r["sizes"]
    lines += [
        f"sizes: fp32 {s['onnx_fp32_bytes'] / 1e6:.2f} MB, int8 {s['onnx_int8_bytes'] / 1e6:.2f} MB "
        f"(prefill {r['prefill']['ort_fp32']['tokens']} tokens; ppl on {r['perplexity']['scored_tokens']} "
        f"{r['perplexity']['tokens']} tokens)",
        "",
        f"{'ratio':<28}" + "".join(f"{f'b={b}':>9}" for b in batches),
    ]
    for name in ("ort_fp32_vs_torch_cache", "ort_fp32_vs_torch_nocache", "int8_vs_fp32_speed"):
        lines.append(f"{name:<28}" + "".join(f"{r['ratios'][b][name]:9.2f}" for b in batches))
    lines.append("decode step, batch 1 (ONNX Runtime's profiler, median per node): us per step, top ops")
    for mode, prof in r["profile"].items():
        top = ", ".join(f"{op} {e['us_per_step']:.0f}" for op, e in list(prof["ops"].items())[:5])
        lines.append(
            f"  {mode:<9} run {prof['run_us']:.0f}, kernels {prof['kernel_us']:.0f} in {prof['nodes']} nodes: {top}"
        )
    lines.append(f"targets (batch {r['targets_batch']}):")
    for name, t in r["targets"].items():
        lines.append(f"  {name:<28}{t['value']:9.3f}  {t['target']:<7} {'holds' if t['holds'] else 'MISSED'}")
    lines.append(f"-> {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main("inference", main)
