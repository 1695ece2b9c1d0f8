"""The config schemas of the training stages: the optimizer, the schedule every stage shares, and one section per
stage (`pretrain`, `sft`, `distill`).

Nothing here imports torch or Lightning, so `python pipelines/<stage>.py --help` and config checks stay fast.
A stage's section inherits the schedule (warm-up, final learning-rate ratio, checkpoint cadence) and the sample
fields; a fine-tuning stage (one that starts from its own step budget rather than `trainer.*`) inherits
`FinetuneSchedule`, whose learning rate, weight decay, steps and validation cadence replace the `optimizer`
and `trainer` ones. The keys users type stay flat: `sft.lr`, `distill.alpha`, `pretrain.warmup_steps`. The `perf` section says how
fast the training core runs a step (`PerfConfig`); every stage reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal, get_args

from omegaconf import DictConfig, OmegaConf
from pydantic import Field

from lmpipe import config
from lmpipe.errors import LmpipeError

if TYPE_CHECKING:
    from lmpipe.model import GPTConfig

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]

OptimizerName = Literal["sgd", "momentum", "adagrad", "adam", "adamw"]
OPTIMIZERS = get_args(OptimizerName)


@config.schema("optimizer")
class OptimizerConfig:
    name: OptimizerName = "adamw"
    """Which optimizer: sgd, momentum (SGD with Nesterov momentum), adagrad, adam or adamw."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Peak learning rate, reached after the warm-up and decayed by a cosine to min_lr_ratio * lr."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.1
    """L2 strength on >=2-D weights (decoupled for adamw, added to the gradient otherwise)."""
    betas: Annotated[list[Annotated[float, Field(ge=0, lt=1)]], Field(min_length=2, max_length=2)] = field(
        default_factory=lambda: [0.9, 0.95]
    )
    """Adam/AdamW moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """Numerical floor added to denominators (Adam, AdamW, AdaGrad)."""
    momentum: float = 0.0
    """Momentum factor for name=momentum (0.9 is typical); ignored by the others."""
    l1: Annotated[float, Field(ge=0)] = 0.0
    """L1 penalty strength: adds l1 * sum(|w|) over the decayed weights to the training loss (sparsity)."""

    def __post_init__(self):
        if self.name == "momentum" and not 0 < self.momentum < 1:
            raise LmpipeError(
                f"optimizer.momentum={self.momentum}: expected a value in (0, 1) for name=momentum"
            )


OptimizerKernel = Literal["loop", "foreach", "fused"]


@config.schema("perf")
class PerfConfig:
    """How the training core runs a step (every stage): switches that make steps faster (bench/README.md).

    The defaults here are the plain code path; conf/config.yaml turns on what `make bench` measured to pay.
    """

    optimizer_kernel: OptimizerKernel = "loop"
    """Optimizer update: loop (torch's CPU default, ops per tensor), foreach (ops over tensor lists) or fused."""
    sparse_logging: bool = True
    """Log train metrics only on the steps that write logs (trainer.log_every_n_steps): same curves, less work."""
    attention: Literal["auto", "math", "fp32", "explicit"] = "auto"
    """Attention in training steps: auto (SDPA's flash kernel), math (SDPA's; compiled fp32 keeps flash), fp32 (flash on fp32 copies), explicit."""
    compile: bool = False
    """torch.compile the training loss (its forward and backward); rounds differently, compiles at step 1."""
    threads: NonNegative = 0
    """torch intra-op threads while training (0 keeps torch's default: one per core)."""

    numerics_neutral: ClassVar[tuple[str, ...]] = ("sparse_logging",)
    """Fields left out of the run's fingerprint: they never change what training computes."""

    def shaping(self) -> dict:
        """The fields that can change the computed numbers (for the fingerprint)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.numerics_neutral}


@dataclass
class Schedule:
    """The learning-rate schedule and checkpoint cadence of a training stage (its section's first fields)."""

    warmup_steps: NonNegative = 50
    """Optimizer steps of linear learning-rate warm-up before the cosine decay."""
    min_lr_ratio: Fraction = 0.1
    """Final learning rate as a fraction of the peak learning rate at the last step."""
    checkpoint_every_n_steps: Positive = 100
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""


@dataclass
class FinetuneSchedule(Schedule):
    """A stage with its own step budget and learning rate, replacing those of `trainer` and `optimizer` (whose
    kind, betas and L1 still apply)."""

    max_steps: Positive = 300
    """Optimizer steps of this stage (replaces trainer.max_steps)."""
    lr: Annotated[float, Field(gt=0)] = 1e-3
    """Peak learning rate (replaces optimizer.lr; the optimizer's kind comes from the optimizer group)."""
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    """L2 strength on >=2-D trainable weights (replaces optimizer.weight_decay)."""
    val_check_interval: Positive = 100
    """Compute the validation loss every N optimizer steps (replaces trainer.val_check_interval)."""
    limit_val_batches: Positive = 10
    """Validation batches per check (replaces trainer.limit_val_batches)."""

    def optimizer(self, section: DictConfig) -> OptimizerConfig:
        """The `optimizer` section with this stage's learning rate and weight decay."""
        return config.build(section, lr=self.lr, weight_decay=self.weight_decay)

    def trainer(self, section: DictConfig) -> DictConfig:
        """The `trainer` section with this stage's step budget and validation cadence."""
        replaced = ("max_steps", "val_check_interval", "limit_val_batches")
        return OmegaConf.merge(section, {name: getattr(self, name) for name in replaced})


@dataclass
class Samples:
    """Text generated at the end of training: it shapes what is reported, never the weights."""

    num_samples: NonNegative = 3
    """Samples generated at the end of training (validation prompts for the fine-tuning stages)."""
    sample_tokens: Positive = 32
    """New tokens per generated sample."""

    reporting_only: ClassVar[tuple[str, ...]] = ("num_samples", "sample_tokens")
    """Fields left out of the run's fingerprint: changing them does not restart training."""

    def shaping(self) -> dict:
        """The fields that shape training (for the fingerprint)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.reporting_only}


@config.schema("pretrain")
class PretrainConfig(Schedule, Samples):
    batch_size: Positive = 32
    """Sequences per micro-batch on each device (tokens per step = batch_size * block_size * devices * accumulation)."""
    early_stopping_patience: NonNegative = 0
    """Stop after this many validations without a better val_loss (0 turns early stopping off)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["And God said"])
    """Prompts for the generated samples (cycled through)."""

    reporting_only: ClassVar[tuple[str, ...]] = (*Samples.reporting_only, "sample_prompts")

    def __post_init__(self):
        if self.num_samples and not self.sample_prompts:
            raise LmpipeError("pretrain.sample_prompts is empty but pretrain.num_samples > 0")


LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
"""The GPT's attention (c_attn, attn.c_proj) and MLP (c_fc, mlp.c_proj) Linear layers."""


@config.schema("sft")
class SFTConfig(FinetuneSchedule, Samples):
    method: Literal["full", "lora", "head"] = "full"
    """Fine-tuning method: full (all weights), lora (low-rank adapters) or head (frozen GPT + classifiers)."""
    batch_size: Positive = 16
    """Examples per micro-batch on each device."""
    max_length: NonNegative = 0
    """Longest model input in tokens (0 = the model's block_size); longer examples are skipped and counted."""
    lora_rank: Positive = 8
    """LoRA: rank r of the adapter matrices B (out x r) and A (r x in)."""
    lora_alpha: Annotated[float, Field(gt=0)] = 16
    """LoRA: the adapter update is scaled by lora_alpha / lora_rank."""
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """LoRA: dropout on the adapters' input during training."""
    # The tied embedding/LM-head matrix is not offered: a merged lm_head would silently untie from wte.
    lora_targets: Annotated[list[Literal[LORA_TARGETS]], Field(min_length=1)] = field(
        default_factory=lambda: list(LORA_TARGETS)
    )
    """LoRA: names of the Linear layers to adapt (c_attn, c_proj, c_fc: attention and MLP projections)."""
    head_tasks: list[str] = field(default_factory=lambda: ["testament", "book"])
    """head: label tasks that get a classification head (their examples are the training data)."""
    replay: Annotated[float, Field(ge=0, lt=1)] = 0.0
    """full/lora: share of each batch's rows that are pretraining windows (paths.tokens train), against forgetting;
    method=head ignores it (its GPT is frozen, so it forgets nothing)."""

    def __post_init__(self):
        n_examples, n_windows = self.replay_split
        if self.replay > 0 and self.method != "head" and not (n_examples and n_windows):
            raise LmpipeError(
                f"sft.replay={self.replay}: with sft.batch_size={self.batch_size} a batch would hold {n_windows} "
                f"windows and {n_examples} examples; expected at least one of each"
            )
        if self.method == "head" and (
            not self.head_tasks or len(set(self.head_tasks)) != len(self.head_tasks)
        ):
            raise LmpipeError(
                f"sft.head_tasks={self.head_tasks}: expected at least one label task, each once, for method=head"
            )

    @property
    def replay_split(self) -> tuple[int, int]:
        """(instruction examples, pretraining windows) per micro-batch; the windows' count rounds half up, and
        is 0 for method=head."""
        n_windows = 0 if self.method == "head" else math.floor(self.replay * self.batch_size + 0.5)
        return self.batch_size - n_windows, n_windows


NO_TEACHER = "none"
"""`distill.teacher` value that trains the student on hard labels alone (the ablation)."""
DEFAULT_STUDENT = {
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 160,
    "block_size": 128,
    "pos_encoding": "rotary",
    "dropout": 0.0,
}


@config.schema("distill")
class DistillConfig(FinetuneSchedule, Samples):
    student: dict = field(default_factory=lambda: dict(DEFAULT_STUDENT))
    """The student's GPT config fields except vocab_size (unset fields take the GPT defaults)."""
    teacher: str = "sft"
    """Teacher model directory under paths.models, or none to train the student without one (ablation)."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Softmax temperature T of both models' distributions in the soft-target term (scaled by T^2)."""
    alpha: Fraction = 1.0
    """Weight of the soft-target KL term; 1 - alpha weighs the hard cross-entropy (0 without teacher). On the
    default run, book macro-F1 of the student was 0.044 at alpha 0.5 / T 2, 0.079 at 0.9 / 1, 0.086 at 1 / 1."""
    batch_size: Positive = 32
    """Sequences per micro-batch on each device: pretraining windows plus instruction examples."""
    sft_fraction: Fraction = 0.5
    """Share of each batch's sequences that are instruction examples (the rest are pretraining windows)."""
    ablation: bool = True
    """The distill stage also trains the same student with teacher="none" (same data, budget and seed)."""

    def __post_init__(self):
        if not self.teacher or Path(self.teacher).name != self.teacher:
            raise LmpipeError(
                f"distill.teacher={self.teacher!r}: expected a model directory name under paths.models "
                f"(e.g. sft) or {NO_TEACHER}"
            )
        n_lm, n_sft = self.batch_split
        if 0 < self.sft_fraction < 1 and not (n_lm and n_sft):
            raise LmpipeError(
                f"distill.sft_fraction={self.sft_fraction}: with distill.batch_size={self.batch_size} a "
                f"batch would hold {n_sft} examples and {n_lm} windows; expected at least one of each "
                "(or a fraction of 0 or 1)"
            )
        self.student_config(vocab_size=1)  # validates the student's fields now, before any data is read
        if self.teacher == NO_TEACHER:
            self.alpha = 0.0  # nothing to distil from: the ablation trains on the hard labels alone

    @property
    def batch_split(self) -> tuple[int, int]:
        """(pretraining windows, instruction examples) per micro-batch; the examples' count rounds half up."""
        n_sft = math.floor(self.sft_fraction * self.batch_size + 0.5)
        return self.batch_size - n_sft, n_sft

    @property
    def has_teacher(self) -> bool:
        return self.teacher != NO_TEACHER

    def student_config(self, vocab_size: int, teacher: GPTConfig | None = None) -> GPTConfig:
        """The student's GPTConfig for a vocabulary, checked against the teacher's context if there is one."""
        from lmpipe.model import GPTConfig

        allowed = [f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size"]
        unknown = sorted(set(self.student) - set(allowed))
        if unknown:
            raise LmpipeError(
                f"distill.student.{unknown[0]}: unknown field; expected any of {', '.join(allowed)}"
            )
        try:
            student = GPTConfig(vocab_size=vocab_size, **self.student)
        except LmpipeError as exc:  # GPTConfig names its fields model.*; here they live in distill.student
            raise LmpipeError(str(exc).replace("model.", "distill.student.")) from None
        if teacher is not None and student.block_size > teacher.block_size:
            raise LmpipeError(
                f"distill.student.block_size={student.block_size}: exceeds the teacher's block_size "
                f"{teacher.block_size}; the teacher must see the student's whole window"
            )
        return student
