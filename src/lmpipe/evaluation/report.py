"""The `evaluate` stage's language-model report: test perplexity and bits per byte of each model variant,
beside an interpolated Kneser-Ney n-gram baseline scored on exactly the same tokens.

Results are a dict of rows (one per variant) so later stages can add rows (fine-tuned, distilled, ONNX,
quantised models) and `markdown_table` renders them side by side.
"""

from __future__ import annotations

from dataclasses import field
from pathlib import Path
from typing import Annotated

from pydantic import Field

from lmpipe.config import schema
from lmpipe.errors import LmpipeError
from lmpipe.evaluation.alignment import SFT_STEP
from lmpipe.evaluation.lm import bits_per_byte, model_nll, perplexity
from lmpipe.evaluation.ngram import KneserNeyLM, select_order, spread_sample
from lmpipe.tokenizer import read_meta, read_shard


@schema("evaluate")
class EvaluateConfig:
    variants: Annotated[list[str], Field(min_length=1)] = field(
        default_factory=lambda: ["models/pretrain", "models/sft"]
    )
    """Model directories to evaluate side by side (rows of the tables), in order."""
    ngram_orders: Annotated[list[Annotated[int, Field(ge=1)]], Field(min_length=1)] = field(
        default_factory=lambda: [3, 4, 5]
    )
    """n-gram orders tried for the Kneser-Ney baseline; the best on val is scored on test."""
    ngram_train_tokens: Annotated[int, Field(ge=1)] = 8_000_000
    """Train tokens the Kneser-Ney baseline is fitted on, in 64 evenly spaced runs, so its memory stays bounded; the
    default exceeds the KJV train split (~0.9M tokens), which is then fitted whole, exactly as before."""
    batch_size: Annotated[int, Field(ge=1)] = 16
    """Windows per forward pass when scoring the GPT."""
    stride: Annotated[int, Field(ge=0)] = 0
    """Sliding-window stride for GPT scoring (more context per token, more compute); 0 = non-overlapping."""
    num_samples: Annotated[int, Field(ge=0)] = 3
    """Generated samples written to the report."""
    sample_tokens: Annotated[int, Field(ge=1)] = 64
    """New tokens per generated sample."""
    sample_prompts: Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)] = field(
        default_factory=lambda: ["And God said"]
    )
    """Prompts for the generated samples (plain text continuation, from the first variant)."""
    tasks: bool = True
    """Run the instruction-task benchmark (classification, exact match, multiple choice) on every variant."""
    max_new_tokens: Annotated[int, Field(ge=1)] = 32
    """Greedy tokens generated per free-text task answer (label answers get just enough for the longest label)."""
    tfidf: bool = True
    """Add the TF-IDF + logistic regression baseline on the label tasks."""
    encoders: list[str] = field(default_factory=list)
    """Encoder classifier directories (stage encoder_finetune) scored on the same held-out label-task examples."""
    speed: bool = True
    """Measure decode tokens/s (batch 1 and 8) and prefill latency (p50/p95) of every variant."""
    threads: Annotated[int, Field(ge=0)] = 1
    """Intra-op threads of every variant (ONNX Runtime sessions, and PyTorch while its speed is measured); 0 =
    each runtime's default. One is fastest for these small models on 2 cores (int8 most of all)."""
    post_training: dict[Annotated[str, Field(min_length=1)], str] = field(
        default_factory=lambda: {
            "pretrained": "models/pretrain",
            "sft": "models/onnx/teacher",
            "dpo": "models/onnx/dpo",
            "rl": "models/onnx/rl",
        }
    )
    """Step -> its model directory among `variants`, in training order: the alignment-tax table (perplexity and
    task accuracy after each step, ratios to the step `sft`); shown when `sft` and another step are evaluated."""
    workers: Annotated[int, Field(ge=0)] = 0
    """Processes that score variants (perplexity, tasks) and fit the n-gram baseline side by side, each with
    `threads` threads; 0 = one per core, 1 = all in this process. Speed is then measured one variant at a time."""

    def __post_init__(self):
        if self.post_training and SFT_STEP not in self.post_training:
            raise LmpipeError(
                f"evaluate.post_training={self.post_training}: expected a step named {SFT_STEP} (the ratios are "
                "to it)"
            )


def _row(total_nats: float, n_tokens: int, n_bytes: int, **extra) -> dict:
    return {
        "test_ppl": perplexity(total_nats, n_tokens),
        "test_bpb": bits_per_byte(total_nats, n_bytes),
        "test_nll_per_token": total_nats / n_tokens,
        "scored_tokens": n_tokens,
        **extra,
    }


def ngram_baseline(tokens_dir: Path, orders: list[int], max_train_tokens: int) -> dict:
    """Fit Kneser-Ney on (at most `max_train_tokens` of) train for each order, keep the best on val, score test.
    Returns a report row."""
    meta = read_meta(tokens_dir)
    train, val, test = (read_shard(tokens_dir, s) for s in ("train", "val", "test"))
    train = spread_sample(train, max_train_tokens)
    best, val_ppl = select_order(train, val, orders, vocab_size=meta["vocab_size"])
    nats, n = KneserNeyLM().fit(train, best, meta["vocab_size"]).nll(test)
    return _row(
        nats,
        n,
        meta["splits"]["test"]["n_bytes"],
        order=best,
        val_ppl_by_order={str(k): v for k, v in val_ppl.items()},
        **({"train_tokens_fitted": len(train)} if len(train) < meta["splits"]["train"]["n_tokens"] else {}),
    )


def model_row(model, tokens_dir: Path, batch_size: int, stride: int = 0) -> dict:
    """Test perplexity and bits per byte of a causal LM (anything `model_nll` accepts)."""
    meta = read_meta(tokens_dir)
    block = model.config.block_size
    nats, n = model_nll(model, read_shard(tokens_dir, "test"), block, batch_size, stride=stride or None)
    return _row(nats, n, meta["splits"]["test"]["n_bytes"], parameters=model.num_parameters())


def markdown_table(rows: dict[str, dict], columns: list[str]) -> str:
    """Rows side by side; numbers rounded for reading (the JSON keeps full precision)."""

    def fmt(value) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        if isinstance(value, int) and abs(value) >= 10_000:
            return f"{value:,}"
        return "" if value is None else str(value)

    lines = ["| variant | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    return "\n".join(lines) + "\n"
