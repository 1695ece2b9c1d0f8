"""Benchmark: CPU matmul peak, then the pretraining stage's step speed with the `perf` switches off, on and one at
a time, against a plain PyTorch loop doing the same step.

For each model (`--models`; `default` is conf/ as composed, `small` 4 layers x 128 wide, block 64, batch 12 on
a character tokenizer) the pretraining stage itself runs (`pretrain_plan` + `core.fit`: LitGPT, `build_trainer`,
the stage's callbacks, data module and MLflow logger, into a temporary folder) for `--warmup-steps` untimed
and `--steps` timed steps, once per variant:
- `baseline`: every switch in SWITCHES off (the code path before them), `all_on`: every one on, `only_<switch>`;
- `raw_loop`: a plain PyTorch loop doing the `all_on` step (same model, optimizer kernel, compiled loss,
  autocast, clipping, schedule and batch stream; no hooks, logging or checkpoints).
`--repeats` N runs every variant N times, round robin (odd repeats in reverse order), and keeps each one's fastest run.
`speedup_vs_baseline` = all_on / baseline tokens/s; `lightning_vs_raw` = all_on / raw_loop (and
`lightning_vs_raw_median_step`, the same from each one's median step time).

MFU = tokens/s * GPT.flops_per_token() / matmul peak, against the peak of the dtype the configured precision
computes in (bf16 for bf16-*, fp32 for 32-true); both ratios are reported. `--quality` also trains the small
model `--quality-steps` (2,000) steps through the stage with baseline and all_on, and reports both final val
losses. Results go to JSON (`--out`).

    python bench/train_throughput.py [--models default small] [--steps 10] [--quality] [--overrides ...]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from lmpipe import atomic, config
from lmpipe.errors import LmpipeError, positive_int, run_main
from lmpipe.model import GPT
from lmpipe.training.configs import PerfConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "bench" / "results" / "train_throughput.json"
SECTIONS = ("seed", "paths", "tokenizer", "model", "optimizer", "trainer", "perf", "logger", "pretrain")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# trainer.precision -> (how the raw loop reproduces it, the matmul dtype it runs at). Lightning's aliases included.
PRECISIONS = {
    "32-true": ("none", "fp32"),
    "32": ("none", "fp32"),
    "bf16-mixed": ("autocast", "bf16"),
    "bf16": ("autocast", "bf16"),
}
SWITCHES = {
    "optimizer_kernel": ("loop", "fused"),
    "sparse_logging": (False, True),
    "attention": ("auto", "math"),
    "compile": (False, True),
}
"""perf field -> (off: the code path before it, on)."""
MODELS = {
    "default": [],
    "small": ["model.n_layer=4", "model.n_embd=128", "model.block_size=64", "pretrain.batch_size=12"],
}
"""Benchmarked models: Hydra overrides of conf/ (before --overrides)."""
CHAR_MODELS = ("small",)
"""Models trained on a character tokenizer of the corpus (the others on paths.tokens, or random ids)."""


def perf_settings(on: Sequence[str], switches: Sequence[str]) -> dict[str, object]:
    """{perf.<switch>: value}: each of `switches` on if it is in `on`, else off."""
    return {f"perf.{name}": SWITCHES[name][name in on] for name in switches}


def variants(switches: Sequence[str]) -> dict[str, dict[str, object]]:
    """{variant: perf settings}: baseline, all_on and only_<switch> for each switch."""
    out = {"baseline": perf_settings((), switches), "all_on": perf_settings(switches, switches)}
    return out | {f"only_{name}": perf_settings((name,), switches) for name in switches}


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


# --- token shards ---------------------------------------------------------------------------------------------


def corpus_texts(cfg) -> dict[str, list[str]]:
    """The prepared corpus's documents by split (`paths.prepared`), else the Python docs topics (stdlib)."""
    from lmpipe.data.corpus import CORPUS_FILE, documents_by_split, read_corpus

    corpus = ROOT / cfg.paths.prepared / CORPUS_FILE
    if corpus.is_file():
        docs = documents_by_split(read_corpus(corpus))
        return {split: docs[split] for split in ("train", "val")}
    from pydoc_data.topics import topics

    texts = [topics[key] for key in sorted(topics)]
    return {"train": texts[20:], "val": texts[:20]}


def char_shards(cfg, out_dir: Path) -> Path:
    """The corpus on a character tokenizer (a vocabulary of ~100), as the tokenize stage writes it."""
    from lmpipe.tokenizer import TokenizerConfig, train_tokenizer, write_shards

    texts = corpus_texts(cfg)
    tok = train_tokenizer(texts["train"], TokenizerConfig(kind="char", vocab_size=512))
    write_shards(out_dir, texts, tok, show_progress=False)
    return out_dir


def random_shards(vocab_size: int, out_dir: Path, seed: int) -> Path:
    """Shards of uniformly random ids (speed does not depend on the ids), with the meta.json the stage reads."""
    from lmpipe.formats import META_FILE, shard_file
    from lmpipe.tokenizer import token_dtype

    out_dir.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    splits = {"train": 1 << 20, "val": 1 << 16}
    for split, n in splits.items():
        ids = rng.integers(0, vocab_size, n).astype(token_dtype(vocab_size))
        (out_dir / shard_file(split)).write_bytes(ids.tobytes())
    meta = {
        "vocab_size": vocab_size,
        "dtype": token_dtype(vocab_size).name,
        "tokenizer_sha256": "random",
        "splits": {split: {"n_tokens": n} for split, n in splits.items()},
    }
    (out_dir / META_FILE).write_text(json.dumps(meta))
    return out_dir


def model_tokens(name: str, cfg, scratch: Path) -> tuple[Path, str]:
    """(token shard folder, where it came from) for a benchmarked model."""
    if name in CHAR_MODELS:
        return char_shards(cfg, scratch / "char-tokens"), "char tokenizer of the corpus"
    tokens = ROOT / cfg.paths.tokens  # an absolute paths.tokens stays as it is
    if (tokens / "meta.json").is_file():
        return tokens, str(tokens)
    vocab = int(cfg.tokenizer.vocab_size)
    return random_shards(
        vocab, scratch / "random-tokens", int(cfg.seed)
    ), f"random ids < tokenizer.vocab_size={vocab}"


# --- the stage and the plain loop -------------------------------------------------------------------------------


def stage_run(cfg, clock=None):
    """Run the pretraining stage's fit on `cfg` (with `clock` among its callbacks); returns `core.Fitted`."""
    from lmpipe.training.core import fit
    from lmpipe.training.pretrain import pretrain_plan

    plan = pretrain_plan(cfg)
    if clock is not None:
        plan.fit.callbacks.append(clock)
    return fit(plan.fit, cfg)


def stage_loop(cfg) -> tuple[list[float], float]:
    """(perf_counter() at the end of every step, seconds from the start of training to the end of step 1)."""
    import lightning as L

    class StepClock(L.Callback):
        def __init__(self):
            self.start, self.stamps = 0.0, []

        def on_train_start(self, trainer, pl_module):
            self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stamps.append(time.perf_counter())

    clock = StepClock()
    stage_run(cfg, clock)
    if len(clock.stamps) != cfg.trainer.max_steps:
        raise RuntimeError(f"the stage ran {len(clock.stamps)} steps: expected {cfg.trainer.max_steps}")
    return clock.stamps, clock.stamps[0] - clock.start


def raw_loop(cfg) -> tuple[list[float], float]:
    """The stage's step as a plain PyTorch loop: the same module's GPT, optimizer (kernel), schedule, autocast,
    clipping, compiled loss and batches; returns what `stage_loop` does."""
    import lightning as L

    from lmpipe.training.core import use_attention
    from lmpipe.training.optim import build_optimizer, warmup_cosine
    from lmpipe.training.pretrain import pretrain_plan

    plan = pretrain_plan(cfg)
    perf: PerfConfig = config.build(cfg.perf)
    optim_cfg, schedule = config.build(cfg.optimizer), plan.pretrain
    L.seed_everything(cfg.seed, verbose=False)
    model = plan.fit.build_module().model.train()
    optimizer = build_optimizer(model.param_groups(optim_cfg.weight_decay), optim_cfg, perf.optimizer_kernel)
    total = int(cfg.trainer.max_steps)
    lr = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, schedule.warmup_steps, total, schedule.min_lr_ratio)
    )
    params = [p for group in optimizer.param_groups for p in group["params"]]
    clip = cfg.trainer.get("gradient_clip_val")
    autocast = PRECISIONS[str(cfg.trainer.precision)][0] == "autocast"

    attention = use_attention(model, perf.attention)

    def loss_of(x, y):
        # inside the compiled function, as in the stage (see TrainingModule.on_fit_start)
        with attention():
            return model(x, y).loss

    loss_fn = torch.compile(loss_of) if perf.compile else loss_of
    threads = torch.get_num_threads()
    torch.set_num_threads(perf.threads or threads)
    batches = iter(plan.fit.datamodule.train_dataloader())
    start, stamps = time.perf_counter(), []
    try:
        for _ in range(total):
            x, y = next(batches)
            # cache_enabled=False as Lightning's bf16 plugin does
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
                loss = loss_fn(x, y)
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr.step()
            stamps.append(time.perf_counter())
    finally:
        torch.set_num_threads(threads)
    return stamps, stamps[0] - start


def throughput(
    stamps: Sequence[float], first_step: float, warmup: int, tokens_per_step: int, fpt: int
) -> dict:
    """Tokens/s and achieved GFLOP/s from the wall-clock stamps taken at the end of each step.

    Timing starts at the end of the last warm-up step, so it covers whole steps including whatever the loop does
    between them (fetching the batch, hooks, logging). `first_step_seconds` holds what step 1 adds (compiling).
    """
    step_seconds = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:], strict=False)]
    seconds = stamps[-1] - stamps[warmup - 1]
    tokens = len(step_seconds) * tokens_per_step
    tokens_per_sec = tokens / seconds
    return {
        "steps": len(step_seconds),
        "tokens": tokens,
        "seconds": seconds,
        "median_step_seconds": statistics.median(step_seconds),
        "first_step_seconds": first_step,
        "tokens_per_sec": tokens_per_sec,
        "achieved_gflops": tokens_per_sec * fpt / 1e9,
    }


# --- putting it together --------------------------------------------------------------------------------------


def compose(overrides: Sequence[str]):
    cfg = config.compose(overrides, conf_dir=ROOT / "conf")
    config.check(cfg, SECTIONS, where="overrides")
    precision = str(cfg.trainer.precision)
    if precision not in PRECISIONS:
        raise LmpipeError(f"trainer.precision={precision!r}: expected one of {', '.join(PRECISIONS)}")
    return cfg


def with_settings(cfg, settings: dict[str, object]):
    """A copy of `cfg` with {dotted key: value} set."""
    from omegaconf import OmegaConf

    out = copy.deepcopy(cfg)
    for key, value in settings.items():
        OmegaConf.update(out, key, value, merge=False)
    return out


def bench_model(name: str, args, peaks: dict[str, float], scratch: Path, store: str) -> dict:
    """Every variant of one model through the stage, and the raw loop; its results."""
    cfg = compose([*MODELS[name], *args.overrides])
    tokens, tokens_source = model_tokens(name, cfg, scratch / name)
    from lmpipe.tokenizer import read_meta

    vocab = int(read_meta(tokens)["vocab_size"])
    model_cfg = config.build(cfg.model, vocab_size=vocab)
    probe = GPT(model_cfg)
    fpt = probe.flops_per_token()
    tokens_per_step = int(cfg.pretrain.batch_size) * model_cfg.block_size
    precision = str(cfg.trainer.precision)
    peak_dtype = PRECISIONS[precision][1]
    steps = args.warmup_steps + args.steps
    base = {
        "paths.tokens": str(tokens),
        "logger.tracking_uri": store,
        "trainer.max_steps": steps,
        "trainer.limit_val_batches": 0,  # validation is not a training step
        "pretrain.checkpoint_every_n_steps": 10 * steps,
    }
    all_on = variants(args.switches)["all_on"]
    runs: dict[str, dict] = {}
    # Round robin, best of --repeats: a slow spell of the shared machine then hits every variant alike, and the
    # fastest repeat is the one least disturbed.
    order = [*variants(args.switches).items(), ("raw_loop", None)]
    for repeat in range(args.repeats):
        # Odd repeats run the variants in reverse: with one fixed order the raw loop always ran last, and one
        # in that position ran up to ~10 % faster than the same step run first (measured alternately: the
        # stage and the raw loop then differ by under 3 % either way).
        for variant, perf in order if repeat % 2 == 0 else order[::-1]:
            where = {"paths.checkpoints": str(scratch / name / f"{variant}-{repeat}")}
            run_cfg = with_settings(cfg, base | where | (all_on if perf is None else perf))
            stamps, first = (raw_loop if perf is None else stage_loop)(run_cfg)
            run = throughput(stamps, first, args.warmup_steps, tokens_per_step, fpt)
            for dtype, peak in peaks.items():
                run[f"mfu_vs_{dtype}"] = run["achieved_gflops"] / peak
            run["mfu"] = run[f"mfu_vs_{peak_dtype}"]
            run["repeats_tokens_per_sec"] = [
                *runs.get(variant, {}).get("repeats_tokens_per_sec", []),
                run["tokens_per_sec"],
            ]
            if variant not in runs or run["tokens_per_sec"] > runs[variant]["tokens_per_sec"]:
                runs[variant] = run
            else:
                runs[variant]["repeats_tokens_per_sec"] = run["repeats_tokens_per_sec"]
            print(
                f"  {name} {variant:>24}: {run['tokens_per_sec']:9.0f} tokens/s", file=sys.stderr, flush=True
            )
    rate = {variant: run["tokens_per_sec"] for variant, run in runs.items()}
    return {
        "model": {
            "parameters": probe.num_parameters(),
            "non_embedding_parameters": probe.num_parameters(non_embedding=True),
            "flops_per_token": fpt,
            "vocab_size": vocab,
            "tokens": tokens_source,
        },
        "config": {
            "overrides": [*MODELS[name], *args.overrides],
            "model": dataclasses.asdict(model_cfg),
            "optimizer": config.to_container(cfg.optimizer),
            "batch_size": int(cfg.pretrain.batch_size),
            "tokens_per_step": tokens_per_step,
            "precision": precision,
            "gradient_clip_val": cfg.trainer.get("gradient_clip_val"),
        },
        "mfu_peak_dtype": peak_dtype,
        "runs": runs,
        "speedup_vs_baseline": rate["all_on"] / rate["baseline"],
        "speedup_by_switch": {s: rate[f"only_{s}"] / rate["baseline"] for s in args.switches},
        "lightning_vs_raw": rate["all_on"] / rate["raw_loop"],
        # The same from the median step, which a few disturbed steps cannot move.
        "lightning_vs_raw_median_step": runs["raw_loop"]["median_step_seconds"]
        / runs["all_on"]["median_step_seconds"],
    }


def quality(args, scratch: Path, store: str) -> dict:
    """Final val loss of the small model after --quality-steps steps through the stage, per variant."""
    cfg = compose([*MODELS["small"], *args.overrides])
    tokens, _ = model_tokens("small", cfg, scratch / "quality")
    every = variants(args.switches)
    chosen = {v: every[v] for v in ("baseline", "all_on")}
    out = {"steps": args.quality_steps, "val_loss": {}, "train_seconds": {}}
    for variant, perf in chosen.items():
        settings = {
            "paths.tokens": str(tokens),
            "paths.checkpoints": str(scratch / "quality" / variant),
            "logger.tracking_uri": store,
            "trainer.max_steps": args.quality_steps,
            "trainer.val_check_interval": args.quality_steps,
            "trainer.limit_val_batches": 50,
            "pretrain.checkpoint_every_n_steps": args.quality_steps,
        }
        fitted = stage_run(with_settings(cfg, settings | perf))
        out["val_loss"][variant] = fitted.metrics()["val_loss"]
        out["train_seconds"][variant] = fitted.train_seconds
        print(
            f"  quality {variant:>24}: val loss {out['val_loss'][variant]:.4f}", file=sys.stderr, flush=True
        )
    base = out["val_loss"]["baseline"]
    out["val_loss_change_pct"] = {v: 100 * (loss - base) / base for v, loss in out["val_loss"].items()}
    return out


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


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="JSON results file (default: %(default)s)"
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=list(MODELS),
        default=list(MODELS),
        help="models (default: %(default)s)",
    )
    parser.add_argument(
        "--switches",
        nargs="+",
        choices=list(SWITCHES),
        default=list(SWITCHES),
        help="perf switches to compare (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=positive_int, default=10, help="timed training steps per run (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup-steps",
        type=positive_int,
        default=3,
        help="untimed steps before timing; step 1 compiles (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=positive_int,
        default=1,
        help="runs of every variant, round robin, odd ones in reverse order; each reports its fastest (default: %(default)s)",
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
        "--quality", action="store_true", help="also compare the small model's val loss after --quality-steps"
    )
    parser.add_argument(
        "--quality-steps", type=positive_int, default=2000, help="steps of --quality (default: %(default)s)"
    )
    parser.add_argument(
        "--overrides",
        nargs="*",
        default=[],
        help="Hydra overrides for conf/ (every model), e.g. trainer.precision=32-true",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict:
    """Run the benchmark, write the JSON results to --out, print a summary and return the results."""
    args = parse_args(argv)
    for name in args.models:
        compose([*MODELS[name], *args.overrides])  # a bad override fails before anything runs
    load_start = os.getloadavg()
    by_size = matmul_peaks(args.matmul_sizes, args.matmul_repeats)
    peaks = {name: max(rates.values()) for name, rates in by_size.items()}
    with tempfile.TemporaryDirectory(prefix="lmpipe-bench-") as tmp:
        scratch = Path(tmp)
        store = f"sqlite:///{scratch / 'mlruns.db'}"  # the stage's logger, kept out of the project's store
        with contextlib.redirect_stdout(sys.stderr):  # the stage's own lines stay out of the summary
            models = {name: bench_model(name, args, peaks, scratch, store) for name in args.models}
            checked = quality(args, scratch, store) if args.quality else None
    load_end = os.getloadavg()
    results = {
        "machine": machine_info() | {"load_avg_1m_start": load_start[0], "load_avg_1m_end": load_end[0]},
        "matmul_peak_gflops": peaks,
        "matmul_gflops_by_size": by_size,
        "settings": {
            "steps": args.steps,
            "repeats": args.repeats,
            "warmup_steps": args.warmup_steps,
            "matmul_sizes": args.matmul_sizes,
            "matmul_repeats": args.matmul_repeats,
            "switches": {name: list(SWITCHES[name]) for name in args.switches},
        },
        "models": models,
    }
    if checked is not None:
        results["quality"] = checked
    atomic.write_json(args.out, results)
    print(summary(results, args.out))
    return results


def summary(r: dict, out: Path) -> str:
    m, peaks = r["machine"], r["matmul_peak_gflops"]
    lines = [
        f"machine: {m['cpu_count']} CPUs ({m['cpu_model']}), {m['torch_threads']} torch threads, "
        f"torch {m['torch_version']}, load avg {m['load_avg_1m_start']:.2f} -> {m['load_avg_1m_end']:.2f}",
        f"matmul peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s",
    ]
    for name, result in r["models"].items():
        mod, c, dtype = result["model"], result["config"], result["mfu_peak_dtype"]
        lines.append(
            f"{name}: {mod['parameters'] / 1e6:.2f}M params, {mod['flops_per_token'] / 1e6:.1f} MFLOP/token, "
            f"{c['batch_size']} x {c['model']['block_size']} tokens/step, {c['precision']}"
        )
        for variant, run in result["runs"].items():
            lines.append(
                f"  {variant:>24}: {run['tokens_per_sec']:9.0f} tokens/s  MFU {run['mfu']:.1%} of {dtype} peak  "
                f"(first step {run['first_step_seconds']:.1f}s)"
            )
        lines.append(
            f"  speedup_vs_baseline {result['speedup_vs_baseline']:.3f}  lightning_vs_raw "
            f"{result['lightning_vs_raw']:.3f}"
        )
    if "quality" in r:
        q = r["quality"]
        for variant, loss in q["val_loss"].items():
            lines.append(
                f"quality ({q['steps']} steps, small): {variant:>24} val loss {loss:.4f} "
                f"({q['val_loss_change_pct'][variant]:+.2f}%)"
            )
    lines.append(f"-> {out}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main("train_throughput", main)
