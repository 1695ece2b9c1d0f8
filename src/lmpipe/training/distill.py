"""Knowledge distillation: a smaller student GPT, randomly initialised, learns from a frozen teacher's logits.

Each training micro-batch mixes two parts, both with the student's block_size as context:
- `lm`: `batch_size - n_sft` random windows of the pretraining token shards (`<paths.tokens>`); every
  position has a label (the next token);
- `sft`: `n_sft = sft_fraction * batch_size` (rounded half up) random instruction examples
  (`<paths.instructions>`), rendered with the chat template and right-padded; only the response and its
  `<|end|>` have labels (-100 elsewhere), as in supervised fine-tuning.

The loss of one part, with student logits s_i, teacher logits t_i and label y_i at each position i of the set
M of positions whose label is not -100, temperature T and weight alpha:

    CE = mean_{i in M} -log softmax(s_i)[y_i]
    KL = mean_{i in M} sum_v p_i(v) * (log p_i(v) - log q_i(v))
         with p_i = softmax(t_i / T), q_i = softmax(s_i / T)
    L  = alpha * T^2 * KL + (1 - alpha) * CE

KL(teacher_T || student_T) is the soft-target term of Hinton et al. (2015); its gradient shrinks as 1/T^2, so
the factor T^2 keeps the balance of the two terms independent of T. The batch objective weights each part by
its share of the batch's rows:

    L_batch = (n_lm / batch_size) * L_lm + (n_sft / batch_size) * L_sft

so `sft_fraction` sets the mix of the objective as well as of the data (a mean over all labelled tokens would
let the windows, every token labelled, drown the few response tokens of each example). The logits enter the
loss in float32 whatever the trainer's precision.

The teacher (`<paths.models>/<distill.teacher>/model.pt`) stays frozen and in eval mode; its logits are
computed under `torch.no_grad` inside the training step, so no activations of it are kept. It must share
the token shards' tokenizer and chat template, so both models read the same ids. With `teacher: none` nothing
is loaded and alpha is 0: the same student on the same data and budget, trained on the hard labels alone,
is the ablation that shows what the teacher adds. The student's initial weights depend on the seed only, so
both runs start from the same point.

`train_loss` and `val_loss` are the hard cross-entropy, weighted as above, so the curves of a distilled
student and of the ablation share one scale and the fit diagnosis compares like with like; the optimised
objective is logged as `train_objective`, and the KL to the teacher as `train_kl`/`val_kl`.
Checkpoints go to `<paths.checkpoints>/distill-<teacher>/` with the fingerprint and resume machinery of
pretraining; they hold the student only (the teacher is re-read from its model directory).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, Dataset, IterableDataset

from lmpipe import config
from lmpipe.chat import load_chat_template, prompt_text
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig, load_model
from lmpipe.text_samples import generate_samples
from lmpipe.tokenizer import END, PAD, TOKENIZER_FILE, load_tokenizer, read_meta, read_shard, tokenizer_hash
from lmpipe.training.callbacks import LossHistory, progress_callbacks
from lmpipe.training.checkpointing import (
    RngStateInCheckpoints,
    build_trainer,
    digest,
    file_sha256,
    fit_resumable,
    quiet_lightning,
    resume_checkpoint,
    trainer_shaping,
)
from lmpipe.training.datamodules import ContiguousWindows, RandomWindows, ResumableBatches
from lmpipe.training.fit_diagnosis import diagnose_fit
from lmpipe.training.optim import OptimizerConfig, build_optimizer, l1_penalty, warmup_cosine
from lmpipe.training.sft_data import (
    IGNORE_INDEX,
    RandomExampleBatches,
    Row,
    collate,
    encode_lm_examples,
    rows_sha256,
)

NO_TEACHER = "none"
"""`distill.teacher` value that trains the student on hard labels alone (the ablation)."""
STUDENT_FIELDS = tuple(f.name for f in dataclasses.fields(GPTConfig) if f.name != "vocab_size")
"""GPTConfig fields a student may set (the vocabulary is the tokenizer's)."""
DEFAULT_STUDENT = {
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 160,
    "block_size": 128,
    "pos_encoding": "rotary",
    "dropout": 0.0,
}


@dataclass
class DistillConfig:
    student: dict = field(default_factory=lambda: dict(DEFAULT_STUDENT))
    """The student's GPT config fields except vocab_size (unset fields take the GPT defaults)."""
    teacher: str = "sft"
    """Teacher model directory under paths.models, or none to train the student without one (ablation)."""
    temperature: float = 1.0
    """Softmax temperature T of both models' distributions in the soft-target term (scaled by T^2)."""
    alpha: float = 1.0
    """Weight of the soft-target KL term; 1 - alpha weighs the hard cross-entropy (0 without teacher). On the
    default run, book macro-F1 of the student was 0.044 at alpha 0.5 / T 2, 0.079 at 0.9 / 1, 0.086 at 1 / 1."""
    max_steps: int = 600
    """Optimizer steps of distillation (replaces trainer.max_steps)."""
    batch_size: int = 32
    """Sequences per micro-batch on each device: pretraining windows plus instruction examples."""
    lr: float = 3e-3
    """Peak learning rate (replaces optimizer.lr; the optimizer's kind comes from the optimizer group)."""
    weight_decay: float = 0.1
    """L2 strength on >=2-D weights (replaces optimizer.weight_decay)."""
    warmup_steps: int = 50
    """Optimizer steps of linear learning-rate warm-up before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of distill.lr at distill.max_steps."""
    sft_fraction: float = 0.5
    """Share of each batch's sequences that are instruction examples (the rest are pretraining windows)."""
    checkpoint_every_n_steps: int = 100
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    val_check_interval: int = 100
    """Compute the validation losses every N optimizer steps (replaces trainer.val_check_interval)."""
    limit_val_batches: int = 20
    """Validation batches per check (replaces trainer.limit_val_batches)."""
    num_samples: int = 3
    """Validation prompts answered by the student at the end."""
    sample_tokens: int = 32
    """New tokens per generated sample."""
    ablation: bool = True
    """The distill stage also trains the same student with teacher="none" (same data, budget and seed)."""

    def __post_init__(self):
        for name in (
            "max_steps",
            "batch_size",
            "checkpoint_every_n_steps",
            "val_check_interval",
            "limit_val_batches",
            "sample_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmpipeError(f"distill.{name}={value!r}: expected an integer >= 1")
        for name in ("warmup_steps", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LmpipeError(f"distill.{name}={value!r}: expected an integer >= 0")
        if not isinstance(self.teacher, str) or not self.teacher or Path(self.teacher).name != self.teacher:
            raise LmpipeError(
                f"distill.teacher={self.teacher!r}: expected a model directory name under paths.models "
                f"(e.g. sft) or {NO_TEACHER}"
            )
        if not self.temperature > 0:
            raise LmpipeError(f"distill.temperature={self.temperature}: expected a positive temperature")
        if not 0 <= self.alpha <= 1:
            raise LmpipeError(f"distill.alpha={self.alpha}: expected a weight in [0, 1]")
        if not self.lr > 0:
            raise LmpipeError(f"distill.lr={self.lr}: expected a positive learning rate")
        if not self.weight_decay >= 0:
            raise LmpipeError(f"distill.weight_decay={self.weight_decay}: expected a value >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmpipeError(f"distill.min_lr_ratio={self.min_lr_ratio}: expected a value in [0, 1]")
        if not 0 <= self.sft_fraction <= 1:
            raise LmpipeError(f"distill.sft_fraction={self.sft_fraction}: expected a fraction in [0, 1]")
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
        if not isinstance(self.student, dict):
            raise LmpipeError(f"distill.student={self.student!r}: expected a mapping of GPT config fields")
        unknown = sorted(set(self.student) - set(STUDENT_FIELDS))
        if unknown:
            raise LmpipeError(
                f"distill.student.{unknown[0]}: unknown field; expected any of {', '.join(STUDENT_FIELDS)}"
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


# --- The loss -----------------------------------------------------------------------------------------------


class DistillLoss(NamedTuple):
    total: torch.Tensor
    """alpha * T^2 * KL + (1 - alpha) * CE: what the student minimises."""
    ce: torch.Tensor
    """Hard-label cross-entropy over the labelled positions."""
    kl: torch.Tensor | None
    """KL(teacher_T || student_T) over the labelled positions (before the T^2 factor); None without one."""


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    temperature: float = 2.0,
    alpha: float = 0.5,
) -> DistillLoss:
    """The loss of the module docstring on (B, T, V) logits and (B, T) labels; positions labelled -100 count
    in neither term. Without teacher logits the total is the cross-entropy alone."""
    labelled = labels != IGNORE_INDEX
    student = student_logits[labelled].float()  # (N, V): the labelled positions only
    ce = F.cross_entropy(student, labels[labelled])
    if teacher_logits is None:
        return DistillLoss(ce, ce, None)
    log_q = F.log_softmax(student / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits[labelled].float() / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()
    return DistillLoss(alpha * temperature**2 * kl + (1 - alpha) * ce, ce, kl)


def build_student(student_cfg: GPTConfig, seed: int) -> GPT:
    """A randomly initialised student whose weights depend on `seed` alone (not on the global RNG's history,
    which loading a teacher advances), so a distilled run and its ablation start from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT(student_cfg)


# --- Data ---------------------------------------------------------------------------------------------------


class MixedBatches(IterableDataset):
    """Training batches {"lm": windows, "sft": examples}, each part {"input_ids", "labels"}; a part with no
    rows is left out. Batch `b` on rank `r` is a pure function of (seed, b, r), so a resumed run that starts
    at the batch its checkpoint reached sees what an uninterrupted one would; one pass = one epoch."""

    def __init__(
        self,
        windows: RandomWindows | None,
        examples: RandomExampleBatches | None,
        batches_per_epoch: int,
        start_batch: int = 0,
        rank: int = 0,
    ):
        self.windows, self.examples, self.rank = windows, examples, rank
        self.batches_per_epoch, self.next_batch = batches_per_epoch, start_batch

    def batch(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        parts = {}
        if self.windows is not None:
            x, y = self.windows.batch(index, self.rank)
            parts["lm"] = {"input_ids": x, "labels": y}
        if self.examples is not None:  # seeded with its own rank (see DistillDataModule.train_dataloader)
            parts["sft"] = self.examples.batch(index)
        return parts

    def __iter__(self):
        # Run to the end of the current epoch, starting wherever the last pass (or the checkpoint) left off.
        epoch_end = (self.next_batch // self.batches_per_epoch + 1) * self.batches_per_epoch
        while self.next_batch < epoch_end:
            index = self.next_batch
            self.next_batch += 1
            yield self.batch(index)

    def __len__(self) -> int:
        # The whole epoch even when resuming mid-way (see RandomWindows.__len__).
        return self.batches_per_epoch


class MixedValidation(Dataset):
    """Fixed validation batches of the training mix: contiguous windows of the val shard and examples in one
    seeded order (they come grouped by task); as many full batches as the scarcer part allows."""

    def __init__(self, windows: ContiguousWindows, rows: list[Row], n_lm: int, n_sft: int, pad_id: int):
        self.windows, self.rows, self.n_lm, self.n_sft, self.pad_id = windows, rows, n_lm, n_sft, pad_id
        counts = [len(windows) // n_lm] if n_lm else []
        counts += [len(rows) // n_sft] if n_sft else []
        self.count = min(counts)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> dict[str, dict[str, torch.Tensor]]:
        parts = {}
        if self.n_lm:
            pairs = [self.windows[j] for j in range(i * self.n_lm, (i + 1) * self.n_lm)]
            parts["lm"] = {
                "input_ids": torch.stack([x for x, _ in pairs]),
                "labels": torch.stack([y for _, y in pairs]),
            }
        if self.n_sft:
            parts["sft"] = collate(self.rows[i * self.n_sft : (i + 1) * self.n_sft], self.pad_id)
        return parts


class DistillDataModule(ResumableBatches, L.LightningDataModule):
    """Mixed training batches (resumable) and fixed mixed validation batches."""

    def __init__(
        self,
        tokens_dir: str | Path,
        block_size: int,
        train_rows: list[Row],
        val_rows: list[Row],
        batch_split: tuple[int, int],
        seed: int,
        pad_id: int,
    ):
        super().__init__()
        self.tokens_dir, self.block_size = Path(tokens_dir), block_size
        self.n_lm, self.n_sft = batch_split
        self.train_rows = train_rows
        self.val_rows = [val_rows[i] for i in np.random.default_rng(seed).permutation(len(val_rows))]
        self.seed, self.pad_id = seed, pad_id
        # The examples draw from their own stream: with the windows' seed both would pick from the same
        # random numbers, coupling which windows and which examples share a batch.
        self.sft_seed = int(np.random.SeedSequence([seed, 1]).generate_state(1)[0])
        self._start_batch = 0
        for split in ("train", "val"):
            n = len(read_shard(self.tokens_dir, split))
            if n <= block_size + 1:
                raise LmpipeError(
                    f"{self.tokens_dir / split}.bin: {n} tokens, fewer than one window of "
                    f"distill.student.block_size+1={block_size + 1}; use more data or a smaller block_size"
                )
        if not train_rows or not val_rows:
            raise LmpipeError(
                f"distillation needs training and validation examples: got {len(train_rows)} train, "
                f"{len(val_rows)} val"
            )
        val = self._validation()
        if len(val) == 0:
            raise LmpipeError(
                f"distillation validation: {len(val.windows)} val windows and {len(val.rows)} val examples "
                f"fill no batch of {self.n_lm} windows + {self.n_sft} examples; lower distill.batch_size"
            )

    def batches_per_epoch(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        n_tokens = len(read_shard(self.tokens_dir, "train"))
        epochs = [math.ceil(n_tokens / (self.n_lm * self.block_size * world))] if self.n_lm else []
        epochs += [math.ceil(len(self.train_rows) / (self.n_sft * world))] if self.n_sft else []
        return max(1, *epochs)

    def train_dataloader(self) -> DataLoader:
        rank = self.trainer.global_rank if self.trainer is not None else 0
        per_epoch = self.batches_per_epoch()
        windows = examples = None
        if self.n_lm:
            windows = RandomWindows(
                self.tokens_dir, "train", self.block_size, self.n_lm, self.seed, per_epoch
            )
        if self.n_sft:
            examples = RandomExampleBatches(
                self.train_rows, self.n_sft, self.sft_seed, self.pad_id, per_epoch, rank=rank
            )
        dataset = MixedBatches(windows, examples, per_epoch, start_batch=self._start_batch, rank=rank)
        return DataLoader(dataset, batch_size=None, generator=self._own_generator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._validation(), batch_size=None, shuffle=False, generator=self._own_generator())

    def _validation(self) -> MixedValidation:
        windows = ContiguousWindows(read_shard(self.tokens_dir, "val"), self.block_size)
        return MixedValidation(windows, self.val_rows, self.n_lm, self.n_sft, self.pad_id)


# --- Lightning module and callbacks ------------------------------------------------------------------------


class LitDistill(RngStateInCheckpoints, L.LightningModule):
    """The trainable student, the frozen teacher (or none), the distillation objective and the optimizer."""

    def __init__(self, student: GPT, teacher: GPT | None, optimizer: dict, distill: dict):
        super().__init__()
        self.cfg = DistillConfig(**distill)
        self.optim_cfg = OptimizerConfig(**optimizer)
        self.student = student.requires_grad_(True)
        self.teacher = None if teacher is None else teacher.requires_grad_(False)
        n_lm, n_sft = self.cfg.batch_split
        self.part_weights = {"lm": n_lm / self.cfg.batch_size, "sft": n_sft / self.cfg.batch_size}
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # no dropout in the targets
        return self

    def part_losses(self, batch: dict[str, dict[str, torch.Tensor]]) -> dict[str, DistillLoss]:
        """The loss of each part of a batch (module docstring)."""
        losses = {}
        for part, rows in batch.items():
            logits = self.student(rows["input_ids"]).logits
            teacher_logits = None
            if self.teacher is not None:
                with torch.no_grad():
                    teacher_logits = self.teacher(rows["input_ids"]).logits
            losses[part] = distillation_loss(
                logits, rows["labels"], teacher_logits, self.cfg.temperature, self.cfg.alpha
            )
        return losses

    def batch_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> DistillLoss:
        """The parts' losses weighted by their share of the batch's rows."""
        losses = self.part_losses(batch)

        def weighted(term: str) -> torch.Tensor:
            return sum(self.part_weights[p] * getattr(loss, term) for p, loss in losses.items())

        ce = weighted("ce")
        if self.teacher is None:
            return DistillLoss(ce, ce, None)
        return DistillLoss(weighted("total"), ce, weighted("kl"))

    def training_step(self, batch, batch_idx):
        loss = self.batch_loss(batch)
        self.log("train_loss", loss.ce, prog_bar=True)
        self.log("train_objective", loss.total)
        if loss.kl is not None:
            self.log("train_kl", loss.kl)
        objective = loss.total
        if self.optim_cfg.l1 > 0:
            penalty = self.optim_cfg.l1 * l1_penalty(self._decayed)
            self.log("l1_penalty", penalty)
            objective = objective + penalty
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return objective

    def validation_step(self, batch, batch_idx):
        losses = self.part_losses(batch)
        rows = sum(len(part["input_ids"]) for part in batch.values())
        for part, loss in losses.items():
            n = len(batch[part]["input_ids"])
            self.log(f"val_{part}_loss", loss.ce, sync_dist=True, batch_size=n)
            if loss.kl is not None:
                self.log(f"val_{part}_kl", loss.kl, sync_dist=True, batch_size=n)
        ce = sum(self.part_weights[p] * loss.ce for p, loss in losses.items())
        self.log("val_loss", ce, prog_bar=True, sync_dist=True, batch_size=rows)
        if self.teacher is not None:
            kl = sum(self.part_weights[p] * loss.kl for p, loss in losses.items())
            self.log("val_kl", kl, sync_dist=True, batch_size=rows)

    def configure_optimizers(self):
        groups = self.student.param_groups(self.optim_cfg.weight_decay)
        # L1 acts on the weights that decay (listed first) even when weight_decay is 0, as in pretraining.
        self._decayed = groups[0]["params"]
        optimizer = build_optimizer(groups, self.optim_cfg)
        c = self.cfg
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # The teacher stays out of checkpoints (its weights are pinned by the fingerprint and read from its model
    # directory); on resume its current weights stand in, so the strict state-dict load still matches.
    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        if self.teacher is not None:
            own = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **own}


VAL_CURVES = ("val_lm_loss", "val_sft_loss", "val_kl", "val_lm_kl", "val_sft_kl")
"""Validation metrics kept as curves beside val_loss (those a run logs)."""


class ValidationCurves(L.Callback):
    """(step, value) of each metric in `keys` at every validation; rides in checkpoints like LossHistory."""

    def __init__(self, keys: tuple[str, ...] = VAL_CURVES):
        self.curves: dict[str, list[tuple[int, float]]] = {key: [] for key in keys}

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        for key, curve in self.curves.items():
            value = trainer.callback_metrics.get(key)
            if value is not None:
                curve.append((trainer.global_step, float(value)))

    def state_dict(self) -> dict:
        return {"curves": self.curves}

    def load_state_dict(self, state: dict) -> None:
        self.curves = {key: [tuple(p) for p in curve] for key, curve in state["curves"].items()}


# --- The run -----------------------------------------------------------------------------------------------

# distill fields that only shape what is reported after training, never the weights.
_REPORTING_ONLY = ("num_samples", "sample_tokens")


def fingerprint(
    seed: int,
    optimizer: OptimizerConfig,
    distill: DistillConfig,
    trainer: DictConfig,
    teacher_sha256: str | None,
    data: dict,
) -> str:
    """Hash of everything that changes what distillation computes: the effective optimizer and trainer
    settings (after distill's replacements), the distill section, the teacher's weights and the data."""
    shaping = {
        "seed": seed,
        "optimizer": dataclasses.asdict(optimizer),
        "distill": {k: v for k, v in dataclasses.asdict(distill).items() if k not in _REPORTING_ONLY},
        "trainer": trainer_shaping(trainer),
        "teacher": teacher_sha256,
        "data": data,
    }
    return digest(shaping)


@dataclass
class DistillResult:
    model: GPT
    """The trained student (float32, eval mode)."""
    metrics: dict
    """Steps, losses, example counts, student/teacher parameters and their ratio, fit diagnosis, seconds."""
    curves: dict[str, list[tuple[int, float]]]
    """(step, value) points of train_loss, val_loss and the other validation metrics the run logged."""
    samples: list[dict]
    """{"prompt", "completion", "reference"} for a few validation examples."""


def _load_teacher(teacher_dir: Path, tokens_dir: Path, meta: dict) -> GPT:
    """The frozen teacher, after checking that it reads the token shards' ids and chat template."""
    teacher, _ = load_model(teacher_dir / "model.pt")
    if tokenizer_hash(teacher_dir / TOKENIZER_FILE) != meta.get("tokenizer_sha256"):
        raise LmpipeError(
            f"{teacher_dir / TOKENIZER_FILE}: not the tokenizer of {tokens_dir}; "
            "the teacher must read the same token ids as the student"
        )
    if load_chat_template(teacher_dir) != load_chat_template(tokens_dir):
        raise LmpipeError(
            f"{teacher_dir}: its chat template differs from the one in {tokens_dir}; expected the same"
        )
    if teacher.config.vocab_size != meta["vocab_size"]:
        raise LmpipeError(
            f"{teacher_dir / 'model.pt'}: vocab_size {teacher.config.vocab_size} differs from the "
            f"tokenizer's {meta['vocab_size']} in {tokens_dir}"
        )
    return teacher.eval().requires_grad_(False)


def distill(cfg: DictConfig, run=None) -> DistillResult | None:
    """Distil the teacher into a new student (resuming if possible); on the main process return the result.

    Reads `<paths.tokens>/` (shards, tokenizer, chat template), `<paths.instructions>/` (train/val examples)
    and, unless distill.teacher is none, `<paths.models>/<distill.teacher>/model.pt`. Returns None in DDP
    worker processes.
    """
    from lmpipe.data.instructions import read_examples
    from lmpipe.tracking import is_main_process, lightning_logger

    dcfg: DistillConfig = config.build(cfg.distill)
    optim_cfg: OptimizerConfig = config.build(cfg.optimizer, lr=dcfg.lr, weight_decay=dcfg.weight_decay)
    tokens_dir = Path(cfg.paths.tokens)
    meta = read_meta(tokens_dir)
    teacher, teacher_sha256 = None, None
    if dcfg.has_teacher:
        teacher_dir = Path(cfg.paths.models) / dcfg.teacher
        teacher = _load_teacher(teacher_dir, tokens_dir, meta)
        teacher_sha256 = file_sha256(teacher_dir / "model.pt")
    student_cfg = dcfg.student_config(meta["vocab_size"], None if teacher is None else teacher.config)
    tokenizer = load_tokenizer(tokens_dir / TOKENIZER_FILE)
    template = load_chat_template(tokens_dir)
    pad_id = tokenizer.token_to_id(PAD)
    if pad_id is None:
        raise LmpipeError(f"{tokens_dir / TOKENIZER_FILE}: no {PAD} token; expected an lmpipe tokenizer")

    data_dir = Path(cfg.paths.instructions)
    frames = {split: read_examples(data_dir, split) for split in ("train", "val")}
    encoded = {
        split: encode_lm_examples(frame, tokenizer, template, student_cfg.block_size)
        for split, frame in frames.items()
    }
    rows = {split: part[0] for split, part in encoded.items()}
    skipped = {split: part[1] for split, part in encoded.items()}

    quiet_lightning()
    if teacher is not None:  # the frozen teacher stays in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = DistillDataModule(
        tokens_dir, student_cfg.block_size, rows["train"], rows["val"], dcfg.batch_split, cfg.seed, pad_id
    )
    trainer_cfg = OmegaConf.merge(
        cfg.trainer,
        {
            "max_steps": dcfg.max_steps,
            "val_check_interval": dcfg.val_check_interval,
            "limit_val_batches": dcfg.limit_val_batches,
        },
    )
    data = {
        "tokenizer": meta.get("tokenizer_sha256"),
        "token_counts": meta.get("splits"),
        "examples": rows_sha256(rows),
    }
    fp = fingerprint(cfg.seed, optim_cfg, dcfg, trainer_cfg, teacher_sha256, data)
    ckpt_dir = Path(cfg.paths.checkpoints) / f"distill-{dcfg.teacher}"
    resume = resume_checkpoint(ckpt_dir, fp, may_reset=is_main_process())
    if resume and is_main_process():
        print(f"distill: resuming from {resume}", flush=True)
    student = build_student(student_cfg, cfg.seed)
    module = LitDistill(student, teacher, dataclasses.asdict(optim_cfg), dataclasses.asdict(dcfg))

    every = int(cfg.trainer.log_every_n_steps)
    history, val_curves = LossHistory(every), ValidationCurves()
    progress, show_bar = progress_callbacks(every)
    trainer = build_trainer(
        trainer_cfg,
        callbacks=[history, val_curves, *progress],
        show_bar=show_bar,
        ckpt_dir=ckpt_dir,
        checkpoint_every_n_steps=dcfg.checkpoint_every_n_steps,
        logger=lightning_logger(run, cfg),
    )
    train_seconds = fit_resumable(trainer, module, datamodule, resume, ckpt_dir)
    if not trainer.is_global_zero:
        return None

    model = module.student.float().eval()
    student_params = model.num_parameters()
    teacher_params = None if teacher is None else teacher.num_parameters()
    curves = {"train_loss": history.train, "val_loss": history.val}
    curves.update({key: curve for key, curve in val_curves.curves.items() if curve})
    n_lm, n_sft = dcfg.batch_split
    metrics = {
        "teacher": dcfg.teacher,
        "steps": trainer.global_step,
        "batch_windows": n_lm,
        "batch_examples": n_sft,
        "train_examples": len(rows["train"]),
        "val_examples": len(rows["val"]),
        "skipped_too_long": skipped,
        "student_parameters": student_params,
        "teacher_parameters": teacher_params,
        "parameter_ratio": None if teacher_params is None else student_params / teacher_params,
        "train_loss": history.train[-1][1] if history.train else None,
        "val_loss": history.val[-1][1] if history.val else None,
        **{key: curve[-1][1] for key, curve in val_curves.curves.items() if curve},
        "train_seconds": train_seconds,
        "resumed": resume is not None,
        "fit": diagnose_fit(history.train, history.val),
    }
    samples = _samples(model, tokenizer, template, frames["val"], dcfg, cfg.seed)
    model.requires_grad_(True)  # a plain GPT, as load_model returns it
    return DistillResult(model, metrics, curves, samples)


def _samples(
    model: GPT, tokenizer, template: str, val: pd.DataFrame, dcfg: DistillConfig, seed: int
) -> list[dict]:
    """The student's answers to up to `num_samples` validation prompts spread over the file (its tasks come in
    blocks), with the reference answers."""
    if dcfg.num_samples == 0 or val.empty:
        return []
    chosen = val.iloc[np.unique(np.linspace(0, len(val) - 1, dcfg.num_samples).round().astype(int))]
    texts = [prompt_text(prompt, template) for prompt in chosen["prompt"]]
    generated = generate_samples(
        model, tokenizer, texts, dcfg.sample_tokens, seed=seed, eot_id=tokenizer.token_to_id(END)
    )
    return [
        {"prompt": prompt, "completion": sample["completion"], "reference": reference}
        for prompt, reference, sample in zip(chosen["prompt"], chosen["response"], generated, strict=True)
    ]
