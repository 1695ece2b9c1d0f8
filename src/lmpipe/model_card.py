"""The model card of an ONNX export: what it is, the data it learned from, its metrics and its limitations.

Everything in it is read from what the run recorded (the export's config.json, the `data` config section the
corpus was prepared with, the variant's evaluate.json metrics), so a model trained on another corpus gets a
card about that corpus.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from lmpipe.formats import ONNX_FILE
from lmpipe.inference.onnx_dir import onnx_row, read_onnx_config

TASK_METRIC_PREFIX = "tasks."
"""Metrics `tasks.<task>.<name>` name the held-out instruction tasks the variant was evaluated on."""


def model_card(
    model_dir: str | os.PathLike,
    metrics: dict[str, float],
    provenance: dict[str, str],
    data: dict[str, Any] | None = None,
) -> str:
    """A markdown model card for the export in `model_dir`; `data` is the run's `data` config section."""
    model_dir = Path(model_dir)
    cfg = read_onnx_config(model_dir)
    shape = cfg.get("model", {})
    quantization = cfg.get("quantization", "none")
    facts = {
        "variant": model_dir.name,
        "format": f"ONNX (opset {cfg.get('opset', '?')}), KV cache, ONNX Runtime on CPU",
        "quantization": quantization,
        "layers x heads x width": f"{cfg['n_layer']} x {cfg['n_head']} x {shape.get('n_embd', '?')}",
        "context": f"{cfg['block_size']} tokens",
        "vocabulary": f"{cfg['vocab_size']} tokens",
        "position encoding": shape.get("pos_encoding", "?"),
        ONNX_FILE: f"{(model_dir / ONNX_FILE).stat().st_size / 1e6:.2f} MB",
        **provenance,
    }
    lines = [
        f"# {model_dir.name} (lmpipe)",
        "",
        "A small GPT-style language model, pretrained on the pipeline's text corpus and fine-tuned to follow",
        "chat-formatted instructions (students are distilled from the fine-tuned teacher), exported to ONNX.",
        "Serve it with `mlflow models serve` or lmpipe's ONNX Runtime engine; prompts go through the chat",
        "template stored beside the tokenizer.",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in facts.items()),
        "",
        "## Data",
        "",
        *_data_lines(data, metrics),
        "",
        "## Metrics (held-out test split, `evaluate` stage)",
        "",
    ]
    if metrics:
        lines += [
            "| metric | value |",
            "|---|---|",
            *(f"| {k} | {v:.4g} |" for k, v in sorted(metrics.items())),
        ]
    else:
        lines.append(f"None: evaluate.json has no row {onnx_row(model_dir.name)!r}.")
    lines += [
        "",
        "## Limitations",
        "",
        "- Tiny and trained on one corpus: it imitates that text and knows nothing beyond it (no facts).",
        "- Tuned only for the tasks above; other instructions get fluent-looking but unreliable answers.",
        f"- Prompt plus generated tokens must fit in {cfg['block_size']} tokens.",
        "- Dynamic int8 quantization can change some greedy tokens compared with the fp32 export."
        if quantization not in ("none", "", None)
        else "- fp32 weights; the int8 variants are smaller and faster but may differ slightly.",
        "- No safety filtering: outputs are raw model text.",
    ]
    return "\n".join(lines) + "\n"


def _data_lines(data: dict[str, Any] | None, metrics: dict[str, float]) -> list[str]:
    """The corpus as its `data` section configured it, and the tasks the metrics name."""
    if data:
        settings = ", ".join(f"{k}={v!r}" for k, v in data.items() if not str(k).startswith("_"))
        corpus = f"Pretraining text from the `prepare` stage with params.yaml `data`: {settings};"
    else:
        corpus = (
            "Pretraining text from the `prepare` stage (params.yaml `data` was not recorded with this model);"
        )
    tasks = sorted(
        {k.split(".")[1] for k in metrics if k.startswith(TASK_METRIC_PREFIX) and k.count(".") >= 2}
    )
    named = f" ({', '.join(tasks)})" if tasks else ""
    return [
        corpus,
        f"split by whole documents; fine-tuning on the `instructions` stage's tasks{named} built from the",
        "training documents only. The metrics below are on the held-out test documents. dvc.lock at the",
        "commit above pins every input.",
    ]
