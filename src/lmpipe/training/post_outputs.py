"""What the policy stages after SFT (`dpo`, `rl`) write: a model directory in the format of `sft`'s (so export,
quantize, evaluate and register take it), their curves and their metrics."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from lmpipe import atomic
from lmpipe.training.core import TrainResult
from lmpipe.training.outputs import write_curves, write_model_dir


def write_policy_outputs(cfg: DictConfig, stage: str, policy: str, result: TrainResult) -> Path:
    """`<paths.models>/<stage>/` (tokenizer files from the policy's directory), `<paths.plots>/<stage>/` and
    `<paths.metrics>/<stage>.json`; returns the model directory."""
    models = Path(cfg.paths.models)
    extra = {"stage": stage, "metrics": result.metrics}
    model_dir = write_model_dir(models / stage, result.model, extra, models / policy, result.samples)
    write_curves(Path(cfg.paths.plots) / stage, result.curves)
    atomic.write_json(Path(cfg.paths.metrics) / f"{stage}.json", result.metrics)
    return model_dir
