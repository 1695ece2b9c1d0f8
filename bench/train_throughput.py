"""Benchmark: CPU matmul peak, then pretraining throughput and MFU of the configured GPT, raw and via Lightning.

One run measures
1. the best fp32 and bf16 square-matmul rate torch reaches on this machine (GFLOP/s, all intra-op threads),
2. training tokens/s of the model composed from `conf/` (plus `--overrides`), on random tokens, two ways:
   a plain PyTorch loop (forward, backward, gradient clipping, optimizer step) and the same model and optimizer
   through `LitGPT` and a Lightning Trainer. Their ratio is the framework's overhead.

MFU = tokens/s * GPT.flops_per_token() / matmul peak, against the peak of the dtype the configured precision
computes in (bf16 for bf16-*, fp32 for 32-true); both ratios are reported. Results go to JSON (`--out`).

    python bench/train_throughput.py [--steps 10] [--overrides model=gpt-tiny pretrain.batch_size=8]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lmpipe import atomic, config
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig
from lmpipe.tokenizer import read_meta
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.optim import build_optimizer

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "train_throughput.json"
SECTIONS = ("seed", "paths", "tokenizer", "model", "optimizer", "trainer", "pretrain")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# trainer.precision -> (how the raw loop reproduces it, the matmul dtype it runs at). Lightning's aliases included.
PRECISIONS = {
    "32-true": ("none", "fp32"),
    "32": ("none", "fp32"),
    "bf16-mixed": ("autocast", "bf16"),
    "bf16": ("autocast", "bf16"),
    "bf16-true": ("cast", "bf16"),
}


@dataclasses.dataclass
class Workload:
    """Everything both training loops share, so their throughputs compare like for like."""

    model_cfg: GPTConfig
    optim_cfg: OptimizerConfig
    batch_size: int
    precision: str
    gradient_clip_val: float | None
    seed: int

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.model_cfg.block_size

    def batches(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (n, batch_size, block_size): n random batches."""
        gen = torch.Generator().manual_seed(self.seed)
        shape = (n, self.batch_size, self.model_cfg.block_size + 1)
        tokens = torch.randint(0, self.model_cfg.vocab_size, shape, generator=gen)
        return tokens[..., :-1].contiguous(), tokens[..., 1:].contiguous()


# --- matmul peak ----------------------------------------------------------------------------------------------


def matmul_gflops(dtype: torch.dtype, size: int, repeats: int, seed: int = 0) -> float:
    """Best-of-`repeats` GFLOP/s of one (size x size) @ (size x size) matmul, after one warm-up call."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(size, size, generator=gen).to(dtype)
    b = torch.randn(size, size, generator=gen).to(dtype)
    out = torch.empty(size, size, dtype=dtype)
    torch.matmul(a, b, out=out)  # first call pays for kernel selection and page faults
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def matmul_peaks(sizes: Sequence[int], repeats: int) -> dict[str, dict[str, float]]:
    """{dtype name: {str(size): GFLOP/s}} for fp32 and bf16."""
    return {name: {str(n): matmul_gflops(dtype, n, repeats) for n in sizes} for name, dtype in DTYPES.items()}


# --- training throughput --------------------------------------------------------------------------------------


def throughput(workload: Workload, stamps: Sequence[float], warmup: int, flops_per_token: int) -> dict:
    """Tokens/s and achieved GFLOP/s from the wall-clock stamps taken at the end of each step.

    Timing starts at the end of the last warm-up step, so it covers whole steps including whatever the loop does
    between them (fetching the batch, hooks, logging).
    """
    step_seconds = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]
    seconds = stamps[-1] - stamps[warmup - 1]
    tokens = len(step_seconds) * workload.tokens_per_step
    tokens_per_sec = tokens / seconds
    return {
        "steps": len(step_seconds),
        "tokens": tokens,
        "seconds": seconds,
        "median_step_seconds": statistics.median(step_seconds),
        "tokens_per_sec": tokens_per_sec,
        "achieved_gflops": tokens_per_sec * flops_per_token / 1e9,
    }


def raw_loop(workload: Workload, steps: int, warmup: int) -> list[float]:
    """Train the GPT with a plain loop; returns perf_counter() at the end of every step."""
    mode, _ = PRECISIONS[workload.precision]
    torch.manual_seed(workload.seed)  # weight init and dropout
    model = GPT(workload.model_cfg).train()
    if mode == "cast":
        model = model.to(torch.bfloat16)
    optimizer = build_optimizer(model.param_groups(workload.optim_cfg.weight_decay), workload.optim_cfg)
    stamps = []
    for x, y in zip(*workload.batches(warmup + steps), strict=True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "autocast"):
            loss = model(x, y).loss
        loss.backward()
        if workload.gradient_clip_val:
            torch.nn.utils.clip_grad_norm_(model.parameters(), workload.gradient_clip_val)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


def lightning_loop(workload: Workload, steps: int, warmup: int, pretrain_cfg) -> list[float]:
    """Train the same workload through LitGPT and a Lightning Trainer; returns the end time of every step."""
    import logging
    import warnings

    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from lmpipe.training.checkpointing import quiet_lightning
    from lmpipe.training.pretrain import LitGPT

    class StepClock(L.Callback):
        def __init__(self):
            self.stamps: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stamps.append(time.perf_counter())

    quiet_lightning()
    # The in-memory loader needs no worker processes, validation is deliberately off, and the banner lines
    # say nothing about throughput.
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*but have no `val_dataloader`.*")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    # batch_size=None: each dataset item already is a whole (x, y) batch.
    loader = DataLoader(TensorDataset(*workload.batches(warmup + steps)), batch_size=None, shuffle=False)
    L.seed_everything(workload.seed, verbose=False)
    module = LitGPT(workload.model_cfg, workload.optim_cfg, pretrain_cfg, warmup + steps)
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as root:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=workload.precision,
            gradient_clip_val=workload.gradient_clip_val,
            max_steps=warmup + steps,
            max_epochs=1,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[clock],
            default_root_dir=root,
        )
        trainer.fit(module, train_dataloaders=loader)
    if len(clock.stamps) != warmup + steps:
        raise RuntimeError(f"lightning ran {len(clock.stamps)} steps: expected {warmup + steps}")
    return clock.stamps


# --- putting it together --------------------------------------------------------------------------------------


def vocab_size(cfg) -> tuple[int, str]:
    """The trained tokenizer's vocabulary size from <paths.tokens>/meta.json, else tokenizer.vocab_size."""
    tokens_dir = ROOT / cfg.paths.tokens  # an absolute paths.tokens stays as it is
    if (tokens_dir / "meta.json").is_file():
        return int(read_meta(tokens_dir)["vocab_size"]), str(tokens_dir / "meta.json")
    return int(cfg.tokenizer.vocab_size), "tokenizer.vocab_size"


def machine_info() -> dict:
    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model or platform.processor(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "platform": platform.platform(),
    }


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)"
    )
    parser.add_argument(
        "--steps", type=positive_int, default=10, help="timed training steps per loop (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup-steps",
        type=positive_int,
        default=2,
        help="untimed steps before timing (default: %(default)s)",
    )
    parser.add_argument(
        "--matmul-sizes",
        type=positive_int,
        nargs="+",
        default=[1024, 2048],
        help="square matmul sizes (default: %(default)s)",
    )
    parser.add_argument(
        "--matmul-repeats", type=positive_int, default=5, help="timed matmuls per size (default: %(default)s)"
    )
    parser.add_argument(
        "--overrides", nargs="*", default=[], help="Hydra overrides for conf/, e.g. model=gpt-tiny"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write the JSON results to --out, print a summary and return the results."""
    args = parse_args(argv)
    cfg = config.compose(args.overrides, conf_dir=ROOT / "conf")
    config.check(cfg, SECTIONS, where="overrides")
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise LmpipeError(f"trainer.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    peak_dtype = PRECISIONS[precision][1]
    vocab, vocab_source = vocab_size(cfg)
    pretrain_cfg = config.build(cfg.pretrain)
    workload = Workload(
        model_cfg=config.build(cfg.model, vocab_size=vocab),
        optim_cfg=config.build(cfg.optimizer),
        batch_size=pretrain_cfg.batch_size,
        precision=precision,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        seed=int(cfg.seed),
    )
    probe = GPT(workload.model_cfg)
    flops_per_token = probe.flops_per_token()
    model_info = {
        "parameters": probe.num_parameters(),
        "non_embedding_parameters": probe.num_parameters(non_embedding=True),
        "flops_per_token": flops_per_token,
        "vocab_size": vocab,
        "vocab_size_source": vocab_source,
    }

    load_start = os.getloadavg()
    by_size = matmul_peaks(args.matmul_sizes, args.matmul_repeats)
    peaks = {name: max(rates.values()) for name, rates in by_size.items()}
    loops = {
        "raw_loop": raw_loop(workload, args.steps, args.warmup_steps),
        "lightning": lightning_loop(workload, args.steps, args.warmup_steps, pretrain_cfg),
    }
    load_end = os.getloadavg()

    results = {
        "machine": machine_info() | {"load_avg_1m_start": load_start[0], "load_avg_1m_end": load_end[0]},
        "matmul_peak_gflops": peaks,
        "matmul_gflops_by_size": by_size,
        "model": model_info,
        "precision": precision,
        "mfu_peak_dtype": peak_dtype,
        "settings": {
            "steps": args.steps,
            "warmup_steps": args.warmup_steps,
            "matmul_sizes": args.matmul_sizes,
            "matmul_repeats": args.matmul_repeats,
            "tokens_per_step": workload.tokens_per_step,
        },
        "config": {
            "overrides": list(args.overrides),
            "seed": workload.seed,
            "model": dataclasses.asdict(workload.model_cfg),
            "optimizer": dataclasses.asdict(workload.optim_cfg),
            "batch_size": workload.batch_size,
            "precision": precision,
            "gradient_clip_val": workload.gradient_clip_val,
        },
    }
    for name, stamps in loops.items():
        run = throughput(workload, stamps, args.warmup_steps, flops_per_token)
        for dtype, peak in peaks.items():
            run[f"mfu_vs_{dtype}"] = run["achieved_gflops"] / peak
        run["mfu"] = run[f"mfu_vs_{peak_dtype}"]
        results[name] = run
    results["lightning_vs_raw"] = (
        results["lightning"]["tokens_per_sec"] / results["raw_loop"]["tokens_per_sec"]
    )
    atomic.write_json(args.out, results)
    print(summary(results, args.out))
    return results


def summary(r: dict, out: Path) -> str:
    m, mod, peaks = r["machine"], r["model"], r["matmul_peak_gflops"]
    dtype = r["mfu_peak_dtype"]
    lines = [
        f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['torch_threads']} torch threads, "
        f"torch {m['torch_version']}, load avg {m['load_avg_1m_start']:.2f} -> {m['load_avg_1m_end']:.2f}",
        f"matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s",
        f"model: {mod['parameters'] / 1e6:.2f}M params, {mod['flops_per_token'] / 1e6:.1f} MFLOP/token (fwd+bwd), "
        f"{r['config']['batch_size']} x {r['config']['model']['block_size']} tokens/step, {r['precision']}",
    ]
    for name in ("raw_loop", "lightning"):
        run = r[name]
        lines.append(
            f"{name:>9}: {run['tokens_per_sec']:9.0f} tokens/s  {run['achieved_gflops']:7.1f} GFLOP/s  "
            f"MFU {run['mfu']:.1%} of {dtype} peak ({run['mfu_vs_fp32']:.1%} fp32, {run['mfu_vs_bf16']:.1%} bf16)"
        )
    lines.append(f"lightning / raw loop: {r['lightning_vs_raw']:.3f}  -> {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except LmpipeError as exc:
        print(f"train_throughput: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
