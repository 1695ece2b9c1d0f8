"""The encoder's shape and the `encoder` stage section, apart from torch so configs can be checked fast."""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, ClassVar, Literal

from pydantic import Field

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.training.configs import LORA_TARGETS, FinetuneSchedule

Positive = Annotated[int, Field(ge=1)]
POOLINGS = ("mean", "first")


@config.schema("encoder_model")
class EncoderConfig:
    vocab_size: Positive = 30522
    """Number of token ids (the encoder tokenizer's vocabulary size)."""
    block_size: Positive = 512
    """Longest input in tokens (rows of the learned absolute position table)."""
    type_vocab_size: Positive = 2
    """Token-type (segment) ids: sentence A and B in BERT."""
    n_layer: Positive = 6
    """Number of transformer blocks."""
    n_head: Positive = 12
    """Number of attention heads per block."""
    n_embd: Positive = 384
    """Width of the hidden states (must be divisible by n_head)."""
    mlp_ratio: Positive = 4
    """MLP hidden width as a multiple of n_embd (BERT's intermediate_size / hidden_size)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout on embeddings, attention weights and residual branches (training only)."""
    layer_norm_eps: Annotated[float, Field(gt=0)] = 1e-12
    """Epsilon of every LayerNorm (BERT uses 1e-12)."""
    pad_id: Annotated[int, Field(ge=0)] = 0
    """Token id of padding (never attended to, never pooled)."""
    pooling: Literal[POOLINGS] = "mean"
    """Sentence vector for classification: mean of the real tokens' states, or the first token's ([CLS])."""

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise LmpipeError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.pad_id >= self.vocab_size:
            raise LmpipeError(f"pad_id={self.pad_id}: expected below vocab_size={self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@config.schema("encoder")
class EncoderFinetuneConfig(FinetuneSchedule):
    init: Literal["pretrained", "scratch"] = "pretrained"
    """Start from all-MiniLM-L6-v2 (pretrained) or from the encoder_mlm stage's encoder, pretrained here from
    scratch on the corpus (scratch)."""
    method: Literal["full", "head", "lora"] = "full"
    """full (every weight trains), head (frozen encoder, new heads: transfer learning) or lora (adapters)."""
    tasks: Annotated[list[str], Field(min_length=1)] = field(default_factory=lambda: ["testament", "book"])
    """Label tasks, each with its own classification head on the pooled output (trained together)."""
    jsonl: list[str] = field(default_factory=list)
    """Your own label data: JSONL files of {"text", "label", "task"} records (replace the instruction tasks)."""
    val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """For jsonl: share of records held out for validation (by a seeded hash of the record)."""
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1
    """For jsonl: share of records held out for testing (by a seeded hash of the record)."""
    pooling: Literal[POOLINGS] = "mean"
    """Sentence vector the heads read: mean over real tokens (what sentence-transformers uses) or first token."""
    max_length: Positive = 64
    """Longest encoder input in tokens, [CLS] and [SEP] included (KJV verses: 99 % fit in 64)."""
    too_long: Literal["truncate", "refuse"] = "truncate"
    """A longer text: truncate (keeps its start; a warning counts them) or refuse (stop with an error)."""
    batch_size: Positive = 32
    """Examples per micro-batch on each device."""
    head_lr: Annotated[float, Field(gt=0)] = 2e-3
    """Peak learning rate of the new classification heads (`lr` is the encoder's)."""
    stats_rows: Positive = 1024
    """Training rows whose initial pooled vectors standardise the heads' input (mean and std per channel)."""
    lora_rank: Positive = 8
    """LoRA: rank of the adapters on the encoder's attention and MLP projections."""
    lora_alpha: Annotated[float, Field(gt=0)] = 16
    """LoRA: the adapter update is scaled by lora_alpha / lora_rank."""
    lora_targets: Annotated[list[Literal[LORA_TARGETS]], Field(min_length=1)] = field(
        default_factory=lambda: list(LORA_TARGETS)
    )
    """LoRA: the encoder's Linear layers to adapt (c_attn, c_proj, c_fc: attention and MLP projections)."""
    also_scratch: bool = True
    """With init=pretrained, also fine-tune the encoder_mlm stage's encoder the same way (init=scratch); without
    it <paths.encoder>-scratch holds only skipped.json (dvc.yaml declares it), so drop it from evaluate.encoders."""
    export_onnx: bool = True
    """Also write the classifier (the configured init's) as ONNX, checked against PyTorch, to <model dir>/onnx."""

    def __post_init__(self):
        if len(set(self.tasks)) != len(self.tasks):
            raise LmpipeError(f"encoder.tasks={self.tasks}: expected each task at most once")
        if self.val_fraction + self.test_fraction >= 1:
            raise LmpipeError(
                f"encoder.val_fraction + encoder.test_fraction = {self.val_fraction + self.test_fraction}: "
                "expected below 1 so records remain for training"
            )


DEFAULT_MLM_MODEL = {"n_layer": 4, "n_head": 4, "n_embd": 256, "dropout": 0.1}
"""The from-scratch encoder's shape: the default GPT's (4 x 256), so the two compare at one size."""


@config.schema("mlm")
class MLMConfig(FinetuneSchedule):
    model: dict = field(default_factory=lambda: dict(DEFAULT_MLM_MODEL))
    """EncoderConfig fields of the new encoder (vocab_size, pad_id and block_size come from tokenizer and window)."""
    window: Positive = 64
    """Tokens per training window of the corpus (the encoder's block_size)."""
    batch_size: Positive = 32
    """Windows per micro-batch on each device."""
    mask_prob: Annotated[float, Field(gt=0, lt=1)] = 0.15
    """Share of the (non-special) tokens selected for prediction."""
    mask_token_prob: Annotated[float, Field(ge=0, le=1)] = 0.8
    """Of the selected tokens, the share replaced by the mask token."""
    random_token_prob: Annotated[float, Field(ge=0, le=1)] = 0.1
    """Of the selected tokens, the share replaced by a random token (the rest stay as they are)."""
    test_windows: Positive = 400
    """At most this many test windows (contiguous, with fixed masks) for the reported test metrics."""

    def __post_init__(self):
        if self.mask_token_prob + self.random_token_prob > 1:
            raise LmpipeError(
                f"mlm.mask_token_prob + mlm.random_token_prob = {self.mask_token_prob + self.random_token_prob}: "
                "expected at most 1 (the rest of the selected tokens stay unchanged)"
            )
        allowed = {f.name for f in dataclasses.fields(EncoderConfig)} - {"vocab_size", "pad_id", "block_size"}
        unknown = sorted(set(self.model) - allowed)
        if unknown:
            raise LmpipeError(
                f"mlm.model.{unknown[0]}: unknown field; expected any of {', '.join(sorted(allowed))}"
            )
        self.encoder_config(vocab_size=8, pad_id=1)  # validates the shape before any data is read

    def encoder_config(self, vocab_size: int, pad_id: int) -> EncoderConfig:
        """The new encoder's config for a tokenizer of `vocab_size` ids (the mask token included)."""
        try:
            return EncoderConfig(vocab_size=vocab_size, pad_id=pad_id, block_size=self.window, **self.model)
        except LmpipeError as exc:
            raise LmpipeError(f"mlm.model: {exc}") from None


@config.schema("encoder_distill")
class EncoderDistillConfig(FinetuneSchedule):
    """The encoder_distill stage: the encoder_finetune stage's classifier (the teacher, on the `encoder` section's
    tasks and data) distilled into a student with half its layers, initialised from its blocks 0, 2, 4, ..."""

    temperature: Annotated[float, Field(gt=0)] = 2.0
    """Softmax temperature T of both models' label distributions in the soft-target term (scaled by T^2)."""
    alpha: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Weight of the soft-target KL term; 1 - alpha weighs the hard labels' cross-entropy."""
    batch_size: Positive = 32
    """Examples per micro-batch on each device."""
    ablation: bool = True
    """Also train the same student (same initialisation, data, budget and seed) with alpha=0: no teacher."""
    export_onnx: bool = True
    """Also write the distilled student as ONNX, checked against PyTorch, to <student dir>/onnx."""

    reporting_only: ClassVar[tuple[str, ...]] = ("ablation", "export_onnx")
    """Fields left out of a student's fingerprint: they choose what else the stage does, not how it trains."""

    def shaping(self) -> dict:
        """The fields that shape a student's training (for the fingerprint)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.reporting_only}
