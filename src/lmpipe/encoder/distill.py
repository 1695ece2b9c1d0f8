"""Distillation of a fine-tuned encoder classifier into one with half its layers (DistilBERT's recipe).

The student is the teacher's shape with every other block (0, 2, 4, ...), initialised from those blocks, the
embeddings and the heads; it trains on the teacher's label distributions at temperature T (KL, scaled by T^2)
weighted by alpha against the hard labels' cross-entropy (1 - alpha), on the same label-task batches as
fine-tuning; alpha=0 is the no-teacher ablation. `half_depth_student` and `LitEncoderDistill` are the parts; a
stage that runs them is not wired yet (see the encoder section of the README).
"""

from __future__ import annotations

import copy
from dataclasses import asdict

import torch
import torch.nn.functional as F

from lmpipe.encoder.classifier import EncoderClassifier
from lmpipe.encoder.config import EncoderConfig
from lmpipe.encoder.model import Encoder
from lmpipe.errors import LmpipeError
from lmpipe.training.configs import FinetuneSchedule, OptimizerConfig
from lmpipe.training.core import TrainingModule


def half_depth_student(teacher: Encoder) -> Encoder:
    """A student with teacher.n_layer // 2 blocks, copied from the teacher's blocks 0, 2, 4, ... (and every
    other weight: embeddings, LayerNorms, the masked-LM head)."""
    n_layer = teacher.config.n_layer // 2
    if n_layer < 1:
        raise LmpipeError(f"the teacher has {teacher.config.n_layer} layer(s): expected at least 2 to halve")
    student = Encoder(EncoderConfig(**{**asdict(teacher.config), "n_layer": n_layer}))
    state = {k: v for k, v in teacher.state_dict().items() if not k.startswith("blocks.")}
    for new, old in enumerate(range(0, 2 * n_layer, 2)):
        prefix = f"blocks.{old}."
        state |= {
            f"blocks.{new}.{k[len(prefix) :]}": v
            for k, v in teacher.state_dict().items()
            if k.startswith(prefix)
        }
    student.load_state_dict(state)
    return student


class LitEncoderDistill(TrainingModule):
    """The student and its heads (a copy of the teacher's) against the frozen teacher classifier."""

    fixed_shapes = False  # batches are padded to their longest verse

    def __init__(
        self,
        teacher: EncoderClassifier,
        optimizer: OptimizerConfig,
        schedule: FinetuneSchedule,
        temperature: float = 1.0,
        alpha: float = 1.0,
    ):
        super().__init__(optimizer, schedule, schedule.max_steps)
        self.teacher = teacher.encoder.requires_grad_(False)
        self.teacher_heads = teacher.heads.requires_grad_(False)
        self.student = half_depth_student(teacher.encoder).train()
        self.heads = copy.deepcopy(teacher.heads).requires_grad_(True)
        self.temperature, self.alpha = temperature, alpha

    def frozen_part(self):
        return (
            self.teacher_heads if self.alpha == 0 else torch.nn.ModuleList([self.teacher, self.teacher_heads])
        )

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ids = batch["input_ids"]
        mask = ids != self.student.config.pad_id
        student = self.student.embed(ids, mask)
        with torch.no_grad():
            teacher = self.teacher.embed(ids, mask) if self.alpha > 0 else None
        T, soft, hard = self.temperature, student.new_zeros(()), student.new_zeros(())
        for i, name in enumerate(self.heads.keys()):
            rows = batch["task"] == i
            logits = self.heads.logits(name, student[rows]).float()
            hard = hard + F.cross_entropy(logits, batch["label"][rows], reduction="sum")
            if teacher is not None:
                target = F.log_softmax(self.teacher_heads.logits(name, teacher[rows]).float() / T, dim=-1)
                student_log = F.log_softmax(logits / T, dim=-1)
                soft = soft + F.kl_div(student_log, target, log_target=True, reduction="sum") * T * T
        n = len(batch["label"])
        return soft / n, hard / n

    def training_loss(self, batch):
        soft, hard = self._losses(batch)
        loss = self.alpha * soft + (1 - self.alpha) * hard
        return loss, {"train_loss": loss, "train_soft": soft, "train_hard": hard}

    def validation_losses(self, batch):
        soft, hard = self._losses(batch)
        n = len(batch["label"])
        return {"val_loss": (hard, n), "val_soft": (soft, n)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = self.student.param_groups(weight_decay)
        named = {f"heads.{k}": p for k, p in self.heads.named_parameters()}
        groups[0]["params"] += [p for p in named.values() if p.dim() >= 2]
        groups[0]["param_names"] += [k for k, p in named.items() if p.dim() >= 2]
        groups[1]["params"] += [p for p in named.values() if p.dim() < 2]
        groups[1]["param_names"] += [k for k, p in named.items() if p.dim() < 2]
        return groups

    def classifier(self, teacher: EncoderClassifier) -> EncoderClassifier:
        """The trained student as a classifier with the teacher's tokenizer and label sets."""
        return EncoderClassifier(
            self.student.float().eval(),
            self.heads.float(),
            teacher.tokenizer,
            teacher.label_sets,
            teacher.max_length,
        )
