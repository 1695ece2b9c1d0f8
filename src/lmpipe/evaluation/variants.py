"""A model variant on disk, whatever it is (a PyTorch model dir or an ONNX export), seen through the interfaces
evaluation needs: a language model for perplexity, a `Scorer` for tasks, a step function for speed, and the
classification heads when transfer learning made some.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmpipe.errors import LmpipeError
from lmpipe.formats import HEADS_FILE, MODEL_FILE, ONNX_FILE, TOKENIZER_FILE
from lmpipe.inference.onnx_dir import onnx_row


@dataclass
class Variant:
    name: str
    """Row name in the tables: pretrained, sft-<method>, student, onnx-<dir name>, ..."""
    directory: Path
    kind: str
    """torch or onnx."""
    lm: Any
    """Callable `lm(idx).logits` with `config.block_size` and `num_parameters()` (see evaluation.lm.model_nll)."""
    scorer: Any
    """An `evaluation.scoring.Scorer` over the model."""
    step: Any
    """A step function for `evaluation.speed.measure`."""
    vocab_size: int
    heads: Any = None
    """A `training.heads.HeadClassifier` when the directory holds classification heads."""

    @property
    def file_bytes(self) -> int:
        return (self.directory / (ONNX_FILE if self.kind == "onnx" else MODEL_FILE)).stat().st_size


def torch_variant_name(extra: dict) -> str:
    """Row name of a PyTorch model from what its stage saved beside the weights."""
    stage = extra.get("stage")
    if stage == "sft":
        return f"sft-{extra['method']}"
    if stage == "distill":
        return extra["variant"]
    return {"pretrain": "pretrained"}.get(stage, stage or "model")


def unique_names(variants: list[Variant]) -> dict[str, Variant]:
    """Name -> variant, in order; variants sharing a name (two SFT runs: `make compare-replay`) are each
    renamed `<name> (<directory>)`, and a directory listed twice is a one-line error."""
    seen: set[Path] = set()
    for v in variants:
        if v.directory.resolve() in seen:
            raise LmpipeError(
                f"evaluate.variants lists {v.directory} twice; expected each model directory once"
            )
        seen.add(v.directory.resolve())
    counts = Counter(v.name for v in variants)
    for v in variants:
        if counts[v.name] > 1:
            v.name = f"{v.name} ({v.directory})"
    return {v.name: v for v in variants}


def load_variant(directory: str | Path, threads: int = 0) -> Variant:
    """Open a model directory: an ONNX export (model.onnx) or a PyTorch model (model.pt)."""
    directory = Path(directory)
    if (directory / ONNX_FILE).is_file():
        from lmpipe.evaluation.ort_scorer import OrtLanguageModel, OrtScorer
        from lmpipe.evaluation.speed import ort_step
        from lmpipe.inference.engine import OrtEngine

        engine = OrtEngine(directory, threads)
        return Variant(
            onnx_row(directory.name),
            directory,
            "onnx",
            OrtLanguageModel(engine),
            OrtScorer(engine),
            ort_step(engine),
            engine.vocab_size,
        )
    if (directory / MODEL_FILE).is_file():
        from lmpipe.chat import load_chat_template
        from lmpipe.evaluation.scoring import TorchScorer
        from lmpipe.evaluation.speed import torch_step
        from lmpipe.model import load_model
        from lmpipe.tokenizer import load_tokenizer
        from lmpipe.training.heads import load_head_classifier

        model, extra = load_model(directory / MODEL_FILE)
        scorer = TorchScorer(model, load_tokenizer(directory / TOKENIZER_FILE), load_chat_template(directory))
        heads = load_head_classifier(directory) if (directory / HEADS_FILE).exists() else None
        return Variant(
            torch_variant_name(extra),
            directory,
            "torch",
            model,
            scorer,
            torch_step(model),
            model.config.vocab_size,
            heads,
        )
    raise LmpipeError(
        f"{directory}: no {ONNX_FILE} or {MODEL_FILE}; expected a model directory written by a stage"
    )
