"""Batch inference: a file of prompts through a registered (or local) ONNX model into a JSONL of completions.

Prompts come from a text file (one per line), a JSONL file (`{"prompt": ...}` per line), or by default the
held-out instruction examples (`<paths.instructions>/test.jsonl`), so a fresh champion can be eyeballed on
data it never saw. The model is a local export directory or a registry URI such as `models:/lmpipe@champion`.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, Field

from lmpipe.atomic import atomic_path
from lmpipe.config import schema
from lmpipe.errors import LmpipeError
from lmpipe.formats import split_file
from lmpipe.inference.sampling import DEFAULTS

HELD_OUT_FILE = split_file("test")
"""The held-out instruction examples under paths.instructions, the default prompts."""


def _model_ref(value: str) -> str:
    if not value:
        raise ValueError("a directory or a models:/ URI")
    return value


@schema("infer")
class InferConfig:
    prompts: str = ""
    """Prompts file: .jsonl with a "prompt" per line, else text, one prompt a line; "" = held-out examples."""
    limit: Annotated[int, Field(ge=1)] = 20
    """How many held-out examples to run when `prompts` is empty (a prompts file always runs whole)."""
    model: Annotated[str, AfterValidator(_model_ref)] = "models:/lmpipe@champion"
    """Model: an ONNX export directory, models:/<name>@<alias> or models:/<name>/<version>."""
    max_tokens: Annotated[int, Field(ge=1)] = DEFAULTS.max_new_tokens
    """Most tokens generated per prompt."""
    temperature: Annotated[float, Field(ge=0, allow_inf_nan=False)] = DEFAULTS.temperature
    """Sampling temperature; 0 = greedy."""
    top_k: Annotated[int, Field(ge=0)] = DEFAULTS.top_k
    """Sample among the k most likely tokens only; 0 = no limit."""
    top_p: Annotated[float, Field(gt=0, le=1)] = DEFAULTS.top_p
    """Nucleus sampling threshold; 1 = no limit."""
    seed: Annotated[int, Field(ge=0)] = 0
    """Seed of the sampling random generator (ignored when greedy); fixed, unlike the engine's, so a stage
    re-run reproduces its outputs."""
    chat: bool = True
    """Format each prompt with the model's chat template (False: the raw text continues)."""
    batch_size: Annotated[int, Field(ge=1)] = 8
    """Prompts generated together in one batch."""
    threads: Annotated[int, Field(ge=0)] = 0
    """ONNX Runtime intra-op threads; 0 = its default (one per core)."""
    output: str = ""
    """Output JSONL; "" = paths.generations."""


def read_prompts(path: str | os.PathLike, limit: int | None = None) -> list[tuple[str, str]]:
    """(where, prompt) pairs from a prompts file: `.jsonl` objects with a "prompt", else one prompt per line.

    Blank lines are skipped; `limit` keeps the first ones. A missing or empty file, invalid JSON or a record
    without a non-empty "prompt" string is a one-line LmpipeError naming file:line.
    """
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"prompts file {path}: no such file (relative to {Path.cwd()})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise LmpipeError(f"prompts file {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    is_jsonl = path.suffix == ".jsonl"
    prompts: list[tuple[str, str]] = []
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside a prompt or a JSON string.
    for number, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        where = f"{path}:{number}"
        prompts.append((where, _jsonl_prompt(line, where) if is_jsonl else line))
        if limit is not None and len(prompts) == limit:
            break
    if not prompts:
        raise LmpipeError(f"prompts file {path}: no prompts (expected one per line)")
    return prompts


def _jsonl_prompt(line: str, where: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise LmpipeError(f"{where}: invalid JSON: {exc.msg} at column {exc.colno}") from None
    prompt = record.get("prompt") if isinstance(record, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        raise LmpipeError(f'{where}: expected a JSON object with a non-empty "prompt" string')
    return prompt


def run_batch(
    cfg: InferConfig,
    output: str | os.PathLike,
    instructions: str | os.PathLike,
    tracking_uri: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Generate a completion for every prompt of `cfg` and write them to `output` (JSONL, atomically).

    Each line: source (file:line), prompt, text, finish_reason, prompt_tokens, completion_tokens and
    latency_ms (the wall time of the batch that generated it). Returns the run's stats: prompts, tokens,
    seconds, tokens_per_s, finish reasons, and the model directory used.
    """
    from lmpipe.inference.engine import OrtEngine
    from lmpipe.inference.resolver import resolve_model
    from lmpipe.inference.sampling import GenerationParams

    params = GenerationParams(
        max_new_tokens=cfg.max_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    model_dir = resolve_model(cfg.model, cache_dir=cache_dir, tracking_uri=tracking_uri)
    engine = OrtEngine(model_dir, threads=cfg.threads)

    def fits(prompt: str) -> bool:
        return len(engine.encode_prompt(prompt, cfg.chat)) + cfg.max_tokens <= engine.block_size

    if cfg.prompts:
        prompts = read_prompts(cfg.prompts)
    else:
        # The built-in held-out prompts: the first `limit` that leave room for the answer (some verses are long).
        prompts = [p for p in read_prompts(Path(instructions) / HELD_OUT_FILE) if fits(p[1])][: cfg.limit]
    # A prompt the user asked for is never dropped: fail before generating anything, naming where it came from.
    for where, prompt in prompts:
        n = len(engine.encode_prompt(prompt, cfg.chat))
        if n + cfg.max_tokens > engine.block_size:
            raise LmpipeError(
                f"{where}: prompt of {n} tokens + infer.max_tokens={cfg.max_tokens} exceeds the model's "
                f"block_size={engine.block_size}: shorten it or lower infer.max_tokens"
            )
    records, seconds = [], 0.0
    for start in range(0, len(prompts), cfg.batch_size):
        batch = prompts[start : start + cfg.batch_size]
        began = time.perf_counter()
        completions = engine.generate([p for _, p in batch], params, chat=cfg.chat)
        elapsed = time.perf_counter() - began
        seconds += elapsed
        for (where, prompt), c in zip(batch, completions, strict=True):
            records.append(
                {
                    "source": where,
                    "prompt": prompt,
                    "text": c.text,
                    "finish_reason": c.finish_reason,
                    "prompt_tokens": c.prompt_tokens,
                    "completion_tokens": c.completion_tokens,
                    "latency_ms": round(elapsed * 1000, 3),
                }
            )
    with atomic_path(output) as tmp:
        with tmp.open("w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
    tokens = sum(r["completion_tokens"] for r in records)
    return {
        "prompts": len(records),
        "completion_tokens": tokens,
        "prompt_tokens": sum(r["prompt_tokens"] for r in records),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else math.nan,
        "finish_reasons": dict(Counter(r["finish_reason"] for r in records)),
        "model": cfg.model,
        "model_dir": str(model_dir),
    }
