"""Distillation of a fine-tuned encoder classifier into one with half its layers (stage `encoder_distill`,
DistilBERT's recipe), on the training core.

The teacher is the encoder_finetune stage's classifier (`<paths.encoder>/`). The student is the teacher's
shape with every other block (0, 2, 4, ...), initialised from those blocks, the embeddings and the heads. It
trains on the teacher's label distributions at temperature T (KL(teacher_T || student_T), scaled by T^2)
weighted by `alpha` against the hard labels' cross-entropy (1 - alpha), on the same label-task batches,
tasks and splits as fine-tuning (the `encoder` section); `alpha=0` is the no-teacher ablation: the same
student, initialisation, data, budget and seed, on the hard labels alone. The teacher stays frozen, in eval
mode and out of the checkpoints; its distributions are computed under `torch.no_grad` in the training step,
and not at all by the ablation. `train_loss`/`val_loss` are the hard cross-entropy, so the curves of the two
students share one scale; the optimised objective is logged as `train_objective`.

The test metrics are fine-tuning's (`score_test_split`) on the same test examples, for the teacher too.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from lmpipe import config
from lmpipe.encoder.classifier import EncoderClassifier, load_encoder_classifier
from lmpipe.encoder.config import EncoderConfig, EncoderDistillConfig, EncoderFinetuneConfig
from lmpipe.encoder.data import LabelData
from lmpipe.encoder.finetune import (
    EncoderDataModule,
    EncoderResult,
    encoded_splits,
    label_data,
    score_test_split,
    scored_result,
    standardise_heads,
)
from lmpipe.encoder.model import Encoder
from lmpipe.errors import LmpipeError
from lmpipe.formats import ENCODER_FILE, HEADS_FILE
from lmpipe.training.checkpointing import TeacherOutOfCheckpoints, digest, file_sha256
from lmpipe.training.configs import FinetuneSchedule, OptimizerConfig
from lmpipe.training.core import FitPlan, TrainingModule, fit
from lmpipe.training.sft_data import rows_sha256


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


class LitEncoderDistill(TeacherOutOfCheckpoints, TrainingModule):
    """The student and its heads (a copy of the teacher's) against the frozen teacher classifier (none when
    alpha is 0)."""

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
        self.student = half_depth_student(teacher.encoder).train()
        self.heads = copy.deepcopy(teacher.heads).requires_grad_(True)
        frozen = torch.nn.ModuleDict({"encoder": teacher.encoder, "heads": teacher.heads})
        self.teacher = frozen.requires_grad_(False) if alpha > 0 else None
        self.temperature, self.alpha = temperature, alpha
        self.train()

    def frozen_part(self):
        return self.teacher  # no dropout in the targets

    def _losses(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(soft KL term times T^2, hard cross-entropy), each a mean over the batch's rows."""
        ids = batch["input_ids"]
        mask = ids != self.student.config.pad_id
        student = self.student.embed(ids, mask)
        teacher = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher = self.teacher["encoder"].embed(ids, mask)
        T = self.temperature
        soft, hard = (student.new_zeros((), dtype=torch.float32) for _ in range(2))
        for i, name in enumerate(self.heads.keys()):
            rows = batch["task"] == i
            logits = self.heads.logits(name, student[rows]).float()
            hard = hard + F.cross_entropy(logits, batch["label"][rows], reduction="sum")
            if teacher is not None:
                target = F.log_softmax(self.teacher["heads"].logits(name, teacher[rows]).float() / T, dim=-1)
                student_log = F.log_softmax(logits / T, dim=-1)
                soft = soft + F.kl_div(student_log, target, log_target=True, reduction="sum") * T * T
        n = len(batch["label"])
        return soft / n, hard / n

    def training_loss(self, batch):
        soft, hard = self._losses(batch)
        loss = self.alpha * soft + (1 - self.alpha) * hard
        logged = {"train_loss": hard, "train_objective": loss}
        if self.teacher is not None:
            logged["train_soft"] = soft
        return loss, logged

    def validation_losses(self, batch):
        soft, hard = self._losses(batch)
        n = len(batch["label"])
        return {"val_loss": (hard, n)} | ({"val_soft": (soft, n)} if self.teacher is not None else {})

    def param_groups(self, weight_decay: float) -> list[dict]:
        groups = self.student.param_groups(weight_decay)
        for group in groups:
            group["param_names"] = [f"student.{name}" for name in group["param_names"]]
        named = {f"heads.{k}": p for k, p in self.heads.named_parameters()}
        for group, decayed in zip(groups, (True, False), strict=True):
            part = {k: p for k, p in named.items() if (p.dim() >= 2) == decayed}
            group["params"] += list(part.values())
            group["param_names"] += list(part)
        return groups

    def classifier(self, teacher: EncoderClassifier) -> EncoderClassifier:
        """The trained student as a classifier with the teacher's tokenizer, label sets and input limits."""
        return EncoderClassifier(
            self.student.float().eval(),
            self.heads.float().eval(),
            teacher.tokenizer,
            teacher.label_sets,
            teacher.max_length,
            teacher.too_long,
        )


VARIANTS = {"student": False, "student-nodistill": True}
"""The stage's students: name -> whether it is the ablation (alpha=0)."""


@dataclass
class DistillInputs:
    """What both students share: the teacher, the label data and its encoded rows, the teacher's hash."""

    teacher: EncoderClassifier
    teacher_extra: dict
    data: LabelData
    rows: dict[str, list]
    teacher_sha256: str
    stats_rows: int
    """Training rows whose pooled features standardise the student's heads (`encoder.stats_rows`)."""


def distill_inputs(cfg: DictConfig) -> DistillInputs:
    """The teacher of `<paths.encoder>/` and the `encoder` section's label data, encoded as the teacher reads it."""
    teacher_dir = Path(cfg.paths.encoder)
    teacher, extra = load_encoder_classifier(teacher_dir, with_extra=True)
    ecfg: EncoderFinetuneConfig = config.build(cfg.encoder)
    data = label_data(cfg, ecfg)
    if data.label_sets != teacher.label_sets:
        raise LmpipeError(
            f"{teacher_dir / HEADS_FILE}: the teacher's label tasks {list(teacher.label_sets)} (or their labels) "
            f"differ from the encoder section's data {list(data.label_sets)}; expected the encoder_finetune "
            "stage's classifier of this config"
        )
    reads = dataclasses.replace(ecfg, max_length=teacher.max_length, too_long=teacher.too_long)
    rows = encoded_splits(data, teacher.tokenizer, reads)
    hashes = digest({name: file_sha256(teacher_dir / name) for name in (ENCODER_FILE, HEADS_FILE)})
    return DistillInputs(teacher, extra, data, rows, hashes, ecfg.stats_rows)


def teacher_metrics(inputs: DistillInputs) -> dict:
    """The teacher on the test split, with its size and training budget."""
    encoder, trained = inputs.teacher.encoder, inputs.teacher_extra.get("metrics", {})
    tasks, _, ms_per_example = score_test_split(inputs.teacher, inputs.data.frames["test"])
    return {
        **{key: trained.get(key) for key in ("init", "method", "steps", "train_seconds")},
        "n_layer": encoder.config.n_layer,
        "encoder_parameters": encoder.num_parameters(),
        "encoder_parameters_non_embedding": encoder.num_parameters(non_embedding=True),
        "torch_ms_per_example": ms_per_example,
        "tasks": tasks,
    }


def distill_encoder(cfg: DictConfig, inputs: DistillInputs, ablation: bool, run=None) -> EncoderResult | None:
    """Train one student (the ablation: alpha=0), resuming if possible, and score it on test; None in DDP
    worker processes."""
    dcfg: EncoderDistillConfig = config.build(cfg.encoder_distill, **({"alpha": 0.0} if ablation else {}))
    optim_cfg = dcfg.optimizer(cfg.optimizer)
    teacher, rows = inputs.teacher, inputs.rows

    def build_module() -> LitEncoderDistill:
        module = LitEncoderDistill(teacher, optim_cfg, dcfg, dcfg.temperature, dcfg.alpha)
        # The copied heads read standardised features: the student's own statistics, not the teacher's.
        stats_rows, pad_id = inputs.stats_rows, teacher.tokenizer.pad_id
        standardise_heads(module.heads, module.student, rows["train"], stats_rows, pad_id)
        return module

    plan = FitPlan(
        name="encoder_distill-nodistill" if ablation else "encoder_distill",
        build_module=build_module,
        datamodule=EncoderDataModule(
            rows["train"], rows["val"], dcfg.batch_size, cfg.seed, teacher.tokenizer.pad_id
        ),
        trainer=dcfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=dcfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "encoder_distill": dcfg.shaping(),
            "teacher": inputs.teacher_sha256,
            "data": rows_sha256({k: v for k, v in rows.items() if k != "test"}),
        },
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None
    fields = {
        "init": inputs.teacher_extra.get("metrics", {}).get("init", "unknown"),
        "method": "nodistill" if ablation else "distill",
        "alpha": dcfg.alpha,
        "temperature": dcfg.temperature,
    }
    classifier = fitted.module.classifier(teacher)
    return scored_result(fitted, classifier, inputs.data.frames["test"], rows, dcfg.batch_size, fields)


def f1_macro_retention(metrics: dict[str, dict]) -> dict[str, dict[str, float]]:
    """student -> task -> its test macro-F1 over the teacher's (`metrics` holds "teacher" and the students)."""
    teacher = metrics["teacher"]["tasks"]
    return {
        name: {
            task: m["tasks"][task]["f1_macro"] / teacher[task]["f1_macro"]
            for task in m["tasks"]
            if teacher[task]["f1_macro"]
        }
        for name, m in metrics.items()
        if name != "teacher"
    }
