"""Supervised fine-tuning (SFT) of the pretrained GPT on instruction examples, three ways (`sft.method`).

- full: every weight trains; the loss is the cross-entropy on the response tokens only (the prompt's labels
  are -100, so the model learns to answer, not to reproduce questions).
- lora: the pretrained weights stay frozen, bit for bit; low-rank adapters on the attention and MLP
  projections train and are merged into plain Linear layers at the end (`lmpipe.training.lora`).
- head: transfer learning. The whole GPT stays frozen (and in eval mode: no dropout on fixed features); new
  linear classification heads, one per label task, read the final hidden state at the last prompt token
  (`<|assistant|>`, where the answer would begin), standardised with training-set statistics, and train
  with cross-entropy over the task's label set on the label tasks' examples (`lmpipe.training.heads`).

The examples become right-padded batches drawn at random, reproducibly across a resume
(`lmpipe.training.sft_data`); this module holds the Lightning side and the run. Checkpoints go to
`<paths.checkpoints>/sft/` with the fingerprint and resume machinery of pretraining
(`lmpipe.training.checkpointing`).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from lmpipe import config
from lmpipe.chat import load_chat_template, prompt_text
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, load_model
from lmpipe.text_samples import generate_samples
from lmpipe.tokenizer import END, PAD, TOKENIZER_FILE, load_tokenizer
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
from lmpipe.training.datamodules import ResumableBatches
from lmpipe.training.fit_diagnosis import diagnose_fit
from lmpipe.training.heads import ClassificationHeads, HeadClassifier, last_prompt_hidden, prompt_features
from lmpipe.training.lora import apply_lora, merge_lora
from lmpipe.training.optim import OptimizerConfig, build_optimizer, l1_penalty, warmup_cosine
from lmpipe.training.sft_data import (
    RandomExampleBatches,
    Row,
    collate,
    encode_head_examples,
    encode_lm_examples,
    rows_sha256,
)

METHODS = ("full", "lora", "head")
LORA_TARGETS = ("c_attn", "c_proj", "c_fc")
"""The GPT's attention (c_attn, attn.c_proj) and MLP (c_fc, mlp.c_proj) Linear layers."""


@dataclass
class SFTConfig:
    method: str = "full"
    """Fine-tuning method: full (all weights), lora (low-rank adapters) or head (frozen GPT + classifiers)."""
    max_steps: int = 300
    """Optimizer steps of fine-tuning (replaces trainer.max_steps)."""
    batch_size: int = 16
    """Examples per micro-batch on each device."""
    max_length: int = 0
    """Longest model input in tokens (0 = the model's block_size); longer examples are skipped and counted."""
    lr: float = 3e-4
    """Peak learning rate (replaces optimizer.lr; the optimizer's kind comes from the optimizer group)."""
    weight_decay: float = 0.0
    """L2 strength on >=2-D trainable weights (replaces optimizer.weight_decay)."""
    warmup_steps: int = 20
    """Optimizer steps of linear learning-rate warm-up before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of sft.lr at sft.max_steps."""
    lora_rank: int = 8
    """LoRA: rank r of the adapter matrices B (out x r) and A (r x in)."""
    lora_alpha: float = 16
    """LoRA: the adapter update is scaled by lora_alpha / lora_rank."""
    lora_dropout: float = 0.0
    """LoRA: dropout on the adapters' input during training."""
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    """LoRA: names of the Linear layers to adapt (c_attn, c_proj, c_fc: attention and MLP projections)."""
    head_tasks: list[str] = field(default_factory=lambda: ["testament", "book"])
    """head: label tasks that get a classification head (their examples are the training data)."""
    checkpoint_every_n_steps: int = 100
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    val_check_interval: int = 50
    """Compute the validation loss every N optimizer steps (replaces trainer.val_check_interval)."""
    limit_val_batches: int = 10
    """Validation batches per check (replaces trainer.limit_val_batches)."""
    num_samples: int = 3
    """Validation prompts answered at the end (generated text; predicted labels for method=head)."""
    sample_tokens: int = 32
    """New tokens per generated sample."""

    def __post_init__(self):
        if self.method not in METHODS:
            raise LmpipeError(f"sft.method={self.method!r}: expected one of {', '.join(METHODS)}")
        for name in (
            "max_steps",
            "batch_size",
            "lora_rank",
            "checkpoint_every_n_steps",
            "val_check_interval",
            "limit_val_batches",
            "sample_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LmpipeError(f"sft.{name}={value!r}: expected an integer >= 1")
        for name in ("max_length", "warmup_steps", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise LmpipeError(f"sft.{name}={value!r}: expected an integer >= 0")
        if not self.lr > 0:
            raise LmpipeError(f"sft.lr={self.lr}: expected a positive learning rate")
        if not self.weight_decay >= 0:
            raise LmpipeError(f"sft.weight_decay={self.weight_decay}: expected a value >= 0")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmpipeError(f"sft.min_lr_ratio={self.min_lr_ratio}: expected a value in [0, 1]")
        if not self.lora_alpha > 0:
            raise LmpipeError(f"sft.lora_alpha={self.lora_alpha}: expected a positive scale")
        if not 0 <= self.lora_dropout < 1:
            raise LmpipeError(f"sft.lora_dropout={self.lora_dropout}: expected a probability in [0, 1)")
        # The tied embedding/LM-head matrix is not offered: a merged lm_head would silently untie from wte.
        unknown = [t for t in self.lora_targets if t not in LORA_TARGETS]
        if not self.lora_targets or unknown:
            raise LmpipeError(
                f"sft.lora_targets={self.lora_targets}: expected a non-empty subset of {', '.join(LORA_TARGETS)}"
            )
        if self.method == "head" and (
            not self.head_tasks or len(set(self.head_tasks)) != len(self.head_tasks)
        ):
            raise LmpipeError(
                f"sft.head_tasks={self.head_tasks}: expected at least one label task, each once, for method=head"
            )


# --- Lightning data module and module ----------------------------------------------------------------------


class SFTDataModule(ResumableBatches, L.LightningDataModule):
    """Random training batches of encoded examples and fixed validation batches; resumable.

    The validation examples are put in one seeded random order, the same at every check: the examples come
    grouped by task, so the first `limit_val_batches` batches in file order would cover only the first task.
    """

    def __init__(self, train: list[Row], val: list[Row], batch_size: int, seed: int, pad_id: int):
        super().__init__()
        if not train or not val:
            raise LmpipeError(
                f"fine-tuning needs training and validation examples: got {len(train)} train, {len(val)} val"
            )
        self.train_rows = train
        self.val_rows = [val[i] for i in np.random.default_rng(seed).permutation(len(val))]
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id
        self._start_batch = 0

    def batches_per_epoch(self) -> int:
        world = self.trainer.world_size if self.trainer is not None else 1
        return max(1, math.ceil(len(self.train_rows) / (self.batch_size * world)))

    def train_dataloader(self) -> DataLoader:
        dataset = RandomExampleBatches(
            self.train_rows,
            self.batch_size,
            self.seed,
            self.pad_id,
            self.batches_per_epoch(),
            start_batch=self._start_batch,
            rank=self.trainer.global_rank if self.trainer is not None else 0,
        )
        return DataLoader(dataset, batch_size=None, generator=self._own_generator())

    def val_dataloader(self) -> DataLoader:
        return DataLoader(
            self.val_rows,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=partial(collate, pad_id=self.pad_id),
            generator=self._own_generator(),
        )


class LitSFT(RngStateInCheckpoints, L.LightningModule):
    """The pretrained GPT prepared for one SFT method, with its optimizer and schedule over what trains."""

    def __init__(
        self, model: GPT, optimizer: dict, sft: dict, seed: int, head_sizes: dict[str, int] | None = None
    ):
        super().__init__()
        self.cfg = SFTConfig(**sft)
        self.optim_cfg = OptimizerConfig(**optimizer)
        self.model = model
        self.heads: ClassificationHeads | None = None
        if self.cfg.method == "full":
            model.requires_grad_(True)
        elif self.cfg.method == "lora":
            c = self.cfg
            apply_lora(model, c.lora_targets, c.lora_rank, c.lora_alpha, c.lora_dropout, seed=seed)
        else:
            if not head_sizes:
                raise LmpipeError("sft.method=head needs the label set sizes of sft.head_tasks")
            model.requires_grad_(False)
            self.heads = ClassificationHeads(model.config.n_embd, head_sizes, seed=seed)
        # load_model hands over the GPT in eval mode, and Lightning starts fitting in whatever mode it finds
        # (then restores that mode after each validation): without this, dropout would stay off.
        self.train()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.heads is not None:
            self.model.eval()  # the frozen features stay deterministic: no dropout
        return self

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model, its adapters and heads (a tied matrix once)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def batch_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective of the method on one batch."""
        if self.heads is None:
            return self.model(batch["input_ids"], batch["labels"]).loss
        return self.heads.loss(self._features(batch), batch["task"], batch["label"])[0]

    def _features(self, batch) -> torch.Tensor:
        with torch.no_grad():
            return last_prompt_hidden(self.model, batch["input_ids"], batch["last"])

    def training_step(self, batch, batch_idx):
        loss = self.batch_loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        if self.optim_cfg.l1 > 0:
            penalty = self.optim_cfg.l1 * l1_penalty(self._decayed)
            self.log("l1_penalty", penalty)
            loss = loss + penalty
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        n = len(batch["input_ids"])
        if self.heads is None:
            self.log("val_loss", self.batch_loss(batch), prog_bar=True, sync_dist=True, batch_size=n)
            return
        loss, accuracy = self.heads.loss(self._features(batch), batch["task"], batch["label"])
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val_accuracy", accuracy, sync_dist=True, batch_size=n)

    def configure_optimizers(self):
        wd = self.optim_cfg.weight_decay
        if self.heads is None:  # full, or lora: param_groups lists only what requires grad (the adapters)
            groups = self.model.param_groups(wd)
        else:
            named = dict(self.heads.named_parameters())
            decay = {n: p for n, p in named.items() if p.dim() >= 2}
            rest = {n: p for n, p in named.items() if p.dim() < 2}
            groups = [
                {"params": list(decay.values()), "param_names": list(decay), "weight_decay": wd},
                {"params": list(rest.values()), "param_names": list(rest), "weight_decay": 0.0},
            ]
        # L1 acts on the weights that decay (listed first) even when weight_decay is 0, as in pretraining.
        self._decayed = groups[0]["params"]
        optimizer = build_optimizer(groups, self.optim_cfg)
        c = self.cfg
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, c.warmup_steps, c.max_steps, c.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# --- The run -----------------------------------------------------------------------------------------------

# sft fields that only shape what is reported after training, never the weights.
_REPORTING_ONLY = ("num_samples", "sample_tokens")


def fingerprint(
    seed: int,
    optimizer: OptimizerConfig,
    sft: SFTConfig,
    trainer: DictConfig,
    pretrained_sha256: str,
    data_sha256: str,
) -> str:
    """Hash of everything that changes what fine-tuning computes: the effective optimizer and trainer settings
    (after sft's replacements), the sft section, the pretrained weights and the encoded examples."""
    shaping = {
        "seed": seed,
        "optimizer": dataclasses.asdict(optimizer),
        "sft": {k: v for k, v in dataclasses.asdict(sft).items() if k not in _REPORTING_ONLY},
        "trainer": trainer_shaping(trainer),
        "pretrained": pretrained_sha256,
        "data": data_sha256,
    }
    return digest(shaping)


@dataclass
class SFTResult:
    model: GPT
    """The fine-tuned GPT (LoRA merged into plain Linear layers); for method=head the unchanged pretrained GPT."""
    heads: dict | None
    """method=head: the ClassificationHeads state dict (feature_mean, feature_std, <task>.weight/.bias)."""
    method: str
    """The sft.method that produced this result."""
    metrics: dict
    """Steps, losses, example counts, trainable vs total parameters, fit diagnosis (and head accuracy)."""
    curves: dict[str, list[tuple[int, float]]]
    """(step, loss) points of train_loss and val_loss."""
    samples: list[dict]
    """{"prompt", "completion", "reference"} for a few validation examples."""


def finetune(cfg: DictConfig, run=None) -> SFTResult | None:
    """Fine-tune the pretrained model (resuming if possible); on the main process return the result.

    Reads `<paths.models>/pretrain/` (model.pt, tokenizer and chat template) and `<paths.instructions>/`
    (the instructions stage's train/val examples and label sets). Returns None in DDP worker processes.
    """
    from lmpipe.data.instructions import read_examples, read_label_sets
    from lmpipe.tracking import is_main_process, lightning_logger

    scfg: SFTConfig = config.build(cfg.sft)
    optim_cfg: OptimizerConfig = config.build(cfg.optimizer, lr=scfg.lr, weight_decay=scfg.weight_decay)
    pretrained_dir = Path(cfg.paths.models) / "pretrain"
    model_path = pretrained_dir / "model.pt"
    model, _ = load_model(model_path)
    tokenizer = load_tokenizer(pretrained_dir / TOKENIZER_FILE)
    template = load_chat_template(pretrained_dir)
    block_size = model.config.block_size
    if scfg.max_length > block_size:
        raise LmpipeError(
            f"sft.max_length={scfg.max_length}: exceeds the pretrained model's block_size {block_size}"
        )
    max_length = scfg.max_length or block_size
    pad_id = tokenizer.token_to_id(PAD)
    if pad_id is None:
        raise LmpipeError(f"{pretrained_dir / TOKENIZER_FILE}: no {PAD} token; expected an lmpipe tokenizer")

    data_dir = Path(cfg.paths.instructions)
    frames = {split: read_examples(data_dir, split) for split in ("train", "val")}
    head_sets = None
    if scfg.method == "head":
        label_sets = read_label_sets(data_dir)
        missing = [task for task in scfg.head_tasks if task not in label_sets]
        if missing:
            raise LmpipeError(
                f"sft.head_tasks: task {missing[0]!r} has no label set in {data_dir / 'labels.json'} "
                f"(label tasks there: {', '.join(label_sets) or 'none'})"
            )
        head_sets = {task: list(label_sets[task]) for task in scfg.head_tasks}
        encoded = {
            split: encode_head_examples(frame, tokenizer, template, max_length, head_sets)
            for split, frame in frames.items()
        }
    else:
        encoded = {
            split: encode_lm_examples(frame, tokenizer, template, max_length)
            for split, frame in frames.items()
        }
    rows = {split: part[0] for split, part in encoded.items()}
    skipped = {split: part[1] for split, part in encoded.items()}
    for split, part in rows.items():
        if not part:
            raise LmpipeError(
                f"{data_dir / (split + '.jsonl')}: no usable examples for sft.method={scfg.method} "
                f"({skipped[split]} longer than {max_length} tokens"
                + (f"; head tasks {', '.join(scfg.head_tasks)}" if head_sets else "")
                + ")"
            )

    quiet_lightning()
    if scfg.method == "head":  # the frozen GPT stays in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = SFTDataModule(rows["train"], rows["val"], scfg.batch_size, cfg.seed, pad_id)
    trainer_cfg = OmegaConf.merge(
        cfg.trainer,
        {
            "max_steps": scfg.max_steps,
            "val_check_interval": scfg.val_check_interval,
            "limit_val_batches": scfg.limit_val_batches,
        },
    )
    fp = fingerprint(
        cfg.seed,
        optim_cfg,
        scfg,
        trainer_cfg,
        file_sha256(model_path),
        rows_sha256(rows) + digest({"labels": head_sets}),
    )
    ckpt_dir = Path(cfg.paths.checkpoints) / "sft"
    resume = resume_checkpoint(ckpt_dir, fp, may_reset=is_main_process())
    if resume and is_main_process():
        print(f"sft: resuming from {resume}", flush=True)
    head_sizes = {task: len(labels) for task, labels in head_sets.items()} if head_sets else None
    module = LitSFT(model, dataclasses.asdict(optim_cfg), dataclasses.asdict(scfg), cfg.seed, head_sizes)
    if module.heads is not None:  # (a resumed run restores the same statistics from its checkpoint)
        module.heads.set_feature_stats(prompt_features(module.model, rows["train"], pad_id))
    trainable, total = module.parameter_counts()

    every = int(cfg.trainer.log_every_n_steps)
    history = LossHistory(every)
    progress, show_bar = progress_callbacks(every)
    trainer = build_trainer(
        trainer_cfg,
        callbacks=[history, *progress],
        show_bar=show_bar,
        ckpt_dir=ckpt_dir,
        checkpoint_every_n_steps=scfg.checkpoint_every_n_steps,
        logger=lightning_logger(run, cfg),
    )
    train_seconds = fit_resumable(trainer, module, datamodule, resume, ckpt_dir)
    if not trainer.is_global_zero:
        return None

    model = module.model.float().eval()
    if scfg.method == "lora":
        merge_lora(model)
    model.requires_grad_(True)  # a plain GPT again, as load_model returns it
    metrics = {
        "method": scfg.method,
        "steps": trainer.global_step,
        "train_examples": len(rows["train"]),
        "val_examples": len(rows["val"]),
        "skipped_too_long": skipped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
        "train_loss": history.train[-1][1] if history.train else None,
        "val_loss": history.val[-1][1] if history.val else None,
        "train_seconds": train_seconds,
        "resumed": resume is not None,
        "fit": diagnose_fit(history.train, history.val),
    }
    heads = None
    if head_sets:
        classifier = HeadClassifier(model, module.heads.float(), tokenizer, template, head_sets)
        metrics["val_accuracy"] = _head_accuracy(classifier, frames["val"])
        samples = _head_samples(classifier, frames["val"], scfg.num_samples)
        heads = {k: v.detach().clone() for k, v in module.heads.state_dict().items()}
    else:
        samples = _generated_samples(model, tokenizer, template, frames["val"], scfg, cfg.seed)
    curves = {"train_loss": history.train, "val_loss": history.val}
    return SFTResult(model, heads, scfg.method, metrics, curves, samples)


def _spread(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to n rows evenly spread over `frame` (so the samples cover its tasks, which come in blocks)."""
    if n == 0 or frame.empty:
        return frame.iloc[:0]
    return frame.iloc[np.unique(np.linspace(0, len(frame) - 1, n).round().astype(int))]


def _generated_samples(
    model, tokenizer, template, val: pd.DataFrame, scfg: SFTConfig, seed: int
) -> list[dict]:
    chosen = _spread(val, scfg.num_samples)
    texts = [prompt_text(prompt, template) for prompt in chosen["prompt"]]
    generated = generate_samples(
        model, tokenizer, texts, scfg.sample_tokens, seed=seed, eot_id=tokenizer.token_to_id(END)
    )
    return [
        {"prompt": prompt, "completion": sample["completion"], "reference": reference}
        for prompt, reference, sample in zip(chosen["prompt"], chosen["response"], generated, strict=True)
    ]


def _head_frame(classifier: HeadClassifier, val: pd.DataFrame) -> pd.DataFrame:
    return val[val["task"].isin(list(classifier.heads.keys()))]


def _head_accuracy(classifier: HeadClassifier, val: pd.DataFrame) -> dict[str, float]:
    """Accuracy of each head on every validation example of its task."""
    frame = _head_frame(classifier, val)
    accuracy = {}
    for task, part in frame.groupby("task", sort=False):
        predicted = classifier.predict(task, part["prompt"].tolist())
        accuracy[task] = float(np.mean(np.asarray(predicted) == part["label"].to_numpy()))
    return accuracy


def _head_samples(classifier: HeadClassifier, val: pd.DataFrame, n: int) -> list[dict]:
    chosen = _spread(_head_frame(classifier, val), n)
    samples = []
    for task, prompt, label in zip(chosen["task"], chosen["prompt"], chosen["label"], strict=True):
        proba = classifier.predict_proba(task, [prompt])[0]
        best = int(proba.argmax())
        completion = f"{classifier.label_sets[task][best]} (p={proba[best]:.2f})"
        samples.append({"prompt": prompt, "completion": completion, "reference": label})
    return samples
