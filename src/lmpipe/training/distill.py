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
The run is the training core's (`lmpipe.training.core`); checkpoints go to
`<paths.checkpoints>/distill-<teacher>/` and hold the student only (the teacher is re-read from its model
directory).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lmpipe import config
from lmpipe.chat import load_chat_template
from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX, MODEL_FILE, PAD, TOKENIZER_FILE
from lmpipe.model import GPT, GPTConfig, load_model
from lmpipe.text_samples import answer_samples
from lmpipe.tokenizer import load_tokenizer, read_meta, read_shard, tokenizer_hash
from lmpipe.training.checkpointing import TeacherOutOfCheckpoints, file_sha256
from lmpipe.training.configs import DistillConfig, OptimizerConfig
from lmpipe.training.core import FitPlan, TrainingModule, TrainResult, fit
from lmpipe.training.datamodules import ContiguousWindows, RandomWindows, ResumableBatches, check_shards
from lmpipe.training.sft_data import RandomExampleBatches, Row, collate, encode_lm_examples, rows_sha256
from lmpipe.training.streams import BatchStream, StreamSpec

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


class MixedBatches(BatchStream):
    """Training batches {"lm": windows, "sft": examples}, each part {"input_ids", "labels"}; a part with no
    rows is left out. Each part's stream draws batch `index` for this rank."""

    def __init__(
        self, windows: RandomWindows | None, examples: RandomExampleBatches | None, spec: StreamSpec
    ):
        super().__init__(spec)
        self.windows, self.examples = windows, examples

    def batch(self, index: int) -> dict[str, dict[str, torch.Tensor]]:
        parts = {}
        if self.windows is not None:
            x, y = self.windows.batch(index)
            parts["lm"] = {"input_ids": x, "labels": y}
        if self.examples is not None:  # seeded with its own seed (see DistillDataModule)
            parts["sft"] = self.examples.batch(index)
        return parts


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
        check_shards(self.tokens_dir, block_size, "distill.student.block_size")
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
        world = self.world_size
        n_tokens = len(read_shard(self.tokens_dir, "train"))
        epochs = [math.ceil(n_tokens / (self.n_lm * self.block_size * world))] if self.n_lm else []
        epochs += [math.ceil(len(self.train_rows) / (self.n_sft * world))] if self.n_sft else []
        return max(1, *epochs)

    def train_dataloader(self) -> DataLoader:
        spec = self.stream_spec(self.seed, self.batches_per_epoch())
        windows = examples = None
        if self.n_lm:
            windows = RandomWindows(self.tokens_dir, "train", self.block_size, self.n_lm, spec)
        if self.n_sft:
            sft_spec = spec._replace(seed=self.sft_seed)
            examples = RandomExampleBatches(self.train_rows, self.n_sft, self.pad_id, sft_spec)
        return self.loader(MixedBatches(windows, examples, spec))

    def val_dataloader(self) -> DataLoader:
        return self.loader(self._validation(), shuffle=False)

    def _validation(self) -> MixedValidation:
        windows = ContiguousWindows(read_shard(self.tokens_dir, "val"), self.block_size)
        return MixedValidation(windows, self.val_rows, self.n_lm, self.n_sft, self.pad_id)


# --- The model ----------------------------------------------------------------------------------------------


class LitDistill(TeacherOutOfCheckpoints, TrainingModule):
    """The trainable student, the frozen teacher (or none) and the distillation objective."""

    fixed_shapes = False  # the SFT half of a batch is padded to its longest example

    def __init__(self, student: GPT, teacher: GPT | None, optimizer: OptimizerConfig, distill: DistillConfig):
        super().__init__(optimizer, distill, distill.max_steps)
        self.cfg = distill
        self.student = student.requires_grad_(True)
        self.teacher = None if teacher is None else teacher.requires_grad_(False)
        n_lm, n_sft = distill.batch_split
        self.part_weights = {"lm": n_lm / distill.batch_size, "sft": n_sft / distill.batch_size}
        self.train()

    def frozen_part(self) -> GPT | None:
        return self.teacher  # no dropout in the targets

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.student.param_groups(weight_decay)

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

    def _weighted(self, losses: dict[str, DistillLoss], term: str) -> torch.Tensor:
        return sum(self.part_weights[p] * getattr(loss, term) for p, loss in losses.items())

    def batch_loss(self, batch: dict[str, dict[str, torch.Tensor]]) -> DistillLoss:
        """The parts' losses weighted by their share of the batch's rows."""
        losses = self.part_losses(batch)
        ce = self._weighted(losses, "ce")
        if self.teacher is None:
            return DistillLoss(ce, ce, None)
        return DistillLoss(self._weighted(losses, "total"), ce, self._weighted(losses, "kl"))

    def training_loss(self, batch):
        loss = self.batch_loss(batch)
        logged = {"train_loss": loss.ce, "train_objective": loss.total}
        if loss.kl is not None:
            logged["train_kl"] = loss.kl
        return loss.total, logged

    def validation_losses(self, batch):
        losses = self.part_losses(batch)
        logged = {}
        for part, loss in losses.items():
            n = len(batch[part]["input_ids"])
            logged[f"val_{part}_loss"] = (loss.ce, n)
            if loss.kl is not None:
                logged[f"val_{part}_kl"] = (loss.kl, n)
        rows = sum(len(part["input_ids"]) for part in batch.values())
        logged["val_loss"] = (self._weighted(losses, "ce"), rows)
        if self.teacher is not None:
            logged["val_kl"] = (self._weighted(losses, "kl"), rows)
        return logged


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


def _load_teacher(teacher_dir: Path, tokens_dir: Path, meta: dict) -> GPT:
    """The frozen teacher, after checking that it reads the token shards' ids and chat template."""
    teacher, _ = load_model(teacher_dir / MODEL_FILE)
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
            f"{teacher_dir / MODEL_FILE}: vocab_size {teacher.config.vocab_size} differs from the "
            f"tokenizer's {meta['vocab_size']} in {tokens_dir}"
        )
    return teacher.eval().requires_grad_(False)


def distill(cfg: DictConfig, run=None) -> TrainResult | None:
    """Distil the teacher into a new student (resuming if possible); on the main process return the result.

    Reads `<paths.tokens>/` (shards, tokenizer, chat template), `<paths.instructions>/` (train/val examples)
    and, unless distill.teacher is none, `<paths.models>/<distill.teacher>/model.pt`. Returns None in DDP
    worker processes.
    """
    from lmpipe.data.instructions import read_examples

    dcfg: DistillConfig = config.build(cfg.distill)
    optim_cfg = dcfg.optimizer(cfg.optimizer)
    tokens_dir = Path(cfg.paths.tokens)
    meta = read_meta(tokens_dir)
    teacher, teacher_sha256 = None, None
    if dcfg.has_teacher:
        teacher_dir = Path(cfg.paths.models) / dcfg.teacher
        teacher = _load_teacher(teacher_dir, tokens_dir, meta)
        teacher_sha256 = file_sha256(teacher_dir / MODEL_FILE)
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

    val_curves = ValidationCurves()
    plan = FitPlan(
        name=f"distill-{dcfg.teacher}",
        build_module=lambda: LitDistill(build_student(student_cfg, cfg.seed), teacher, optim_cfg, dcfg),
        datamodule=DistillDataModule(
            tokens_dir, student_cfg.block_size, rows["train"], rows["val"], dcfg.batch_split, cfg.seed, pad_id
        ),
        trainer=dcfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=dcfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "distill": dcfg,
            "teacher": teacher_sha256,
            "data": {
                "tokenizer": meta.get("tokenizer_sha256"),
                "token_counts": meta.get("splits"),
                "examples": rows_sha256(rows),
            },
        },
        callbacks=[val_curves],
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None

    model = fitted.module.student.float().eval()
    student_params = model.num_parameters()
    teacher_params = None if teacher is None else teacher.num_parameters()
    kept = {key: curve for key, curve in val_curves.curves.items() if curve}
    n_lm, n_sft = dcfg.batch_split
    metrics = {
        "teacher": dcfg.teacher,
        **fitted.metrics(),
        **{key: curve[-1][1] for key, curve in kept.items()},
        "batch_windows": n_lm,
        "batch_examples": n_sft,
        "train_examples": len(rows["train"]),
        "val_examples": len(rows["val"]),
        "skipped_too_long": skipped,
        "student_parameters": student_params,
        "teacher_parameters": teacher_params,
        "parameter_ratio": None if teacher_params is None else student_params / teacher_params,
    }
    samples = answer_samples(
        model, tokenizer, template, frames["val"], dcfg.num_samples, dcfg.sample_tokens, cfg.seed
    )
    model.requires_grad_(True)  # a plain GPT, as load_model returns it
    return TrainResult(model, metrics, {**fitted.curves, **kept}, samples)
