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
(`lmpipe.training.sft_data`); this module holds the model, its loss and the run, on the training core
(`lmpipe.training.core`). Checkpoints go to `<paths.checkpoints>/sft/`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from lmpipe import config
from lmpipe.chat import load_chat_template
from lmpipe.errors import LmpipeError
from lmpipe.formats import LABELS_FILE, MODEL_FILE, PAD, TOKENIZER_FILE, split_file
from lmpipe.model import GPT, load_model
from lmpipe.text_samples import answer_samples, spread
from lmpipe.tokenizer import load_tokenizer, read_meta, tokenizer_hash
from lmpipe.training.checkpointing import digest, file_sha256
from lmpipe.training.configs import OptimizerConfig, SFTConfig
from lmpipe.training.core import FitPlan, TrainingModule, TrainResult, fit
from lmpipe.training.datamodules import RandomWindows, ResumableBatches, check_shards
from lmpipe.training.heads import ClassificationHeads, HeadClassifier, last_prompt_hidden, prompt_features
from lmpipe.training.lora import apply_lora, merge_lora
from lmpipe.training.sft_data import (
    RandomExampleBatches,
    Row,
    collate,
    encode_head_examples,
    encode_lm_examples,
    rows_sha256,
)
from lmpipe.training.streams import BatchStream, StreamSpec


class SFTDataModule(ResumableBatches, L.LightningDataModule):
    """Random training batches of encoded examples and fixed validation batches; resumable.

    The validation examples are put in one seeded random order, the same at every check: the examples come
    grouped by task, so the first `limit_val_batches` batches in file order would cover only the first task.
    """

    def __init__(
        self,
        train: list[Row],
        val: list[Row],
        batch_size: int,
        seed: int,
        pad_id: int,
        replay: ReplayWindows | None = None,
    ):
        super().__init__()
        if not train or not val:
            raise LmpipeError(
                f"fine-tuning needs training and validation examples: got {len(train)} train, {len(val)} val"
            )
        self.train_rows = train
        self.val_rows = [val[i] for i in np.random.default_rng(seed).permutation(len(val))]
        self.batch_size, self.seed, self.pad_id, self.replay = batch_size, seed, pad_id, replay

    def batches_per_epoch(self) -> int:
        return max(1, math.ceil(len(self.train_rows) / (self.batch_size * self.world_size)))

    def train_dataloader(self) -> DataLoader:
        spec = self.stream_spec(self.seed, self.batches_per_epoch())
        if self.replay is None:
            return self.loader(RandomExampleBatches(self.train_rows, self.batch_size, self.pad_id, spec))
        n_windows = self.replay.windows
        examples = RandomExampleBatches(self.train_rows, self.batch_size - n_windows, self.pad_id, spec)
        # Another seed for the windows' stream, so its draws are independent of the examples' draws.
        windows = RandomWindows(
            self.replay.tokens_dir,
            "train",
            self.replay.block_size,
            n_windows,
            spec._replace(seed=self.seed + 1),
        )
        return self.loader(ReplayBatches(examples, windows, spec))

    def val_dataloader(self) -> DataLoader:
        collate_rows = partial(collate, pad_id=self.pad_id)
        return self.loader(self.val_rows, batch_size=self.batch_size, shuffle=False, collate_fn=collate_rows)


@dataclass
class ReplayWindows:
    """sft.replay > 0: how many pretraining windows of which shards each training batch mixes in."""

    tokens_dir: Path
    block_size: int
    windows: int


class ReplayBatches(BatchStream):
    """A batch of examples ("sft") and a batch of pretraining windows ("lm", (x, y)) under one index."""

    def __init__(self, examples: RandomExampleBatches, windows: RandomWindows, spec: StreamSpec):
        super().__init__(spec)
        self.examples, self.windows = examples, windows

    def batch(self, index: int) -> dict:
        return {"sft": self.examples.batch(index), "lm": self.windows.batch(index)}


class LitSFT(TrainingModule):
    """The pretrained GPT prepared for one SFT method, and the method's loss over what trains."""

    fixed_shapes = False  # its batches are padded to their longest example

    def __init__(
        self,
        model: GPT,
        optimizer: OptimizerConfig,
        sft: SFTConfig,
        seed: int,
        head_sizes: dict[str, int] | None = None,
    ):
        super().__init__(optimizer, sft, sft.max_steps)
        self.cfg = sft
        self.model = model
        self.heads: ClassificationHeads | None = None
        if sft.method == "full":
            model.requires_grad_(True)
        elif sft.method == "lora":
            apply_lora(model, sft.lora_targets, sft.lora_rank, sft.lora_alpha, sft.lora_dropout, seed=seed)
        else:
            if not head_sizes:
                raise LmpipeError("sft.method=head needs the label set sizes of sft.head_tasks")
            model.requires_grad_(False)
            self.heads = ClassificationHeads(model.config.n_embd, head_sizes, seed=seed)
        # load_model hands over the GPT in eval mode, and Lightning starts fitting in whatever mode it finds
        # (then restores that mode after each validation): without this, dropout would stay off.
        self.train()

    def frozen_part(self) -> GPT | None:
        return self.model if self.heads is not None else None  # deterministic features: no dropout

    def parameter_counts(self) -> tuple[int, int]:
        """(trainable, total) parameters of the model, its adapters and heads (a tied matrix once)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def batch_loss(self, batch: dict) -> torch.Tensor:
        """The training objective of the method on one batch; with replay, the examples' and the windows' mean
        losses weighted by their share of the batch's rows (a window has ~100 labels, an example a few, so a
        mean over all labels would be the windows' alone)."""
        if "lm" in batch:
            n_windows = len(batch["lm"][0])
            share = n_windows / (n_windows + len(batch["sft"]["input_ids"]))
            return (1 - share) * self.batch_loss(batch["sft"]) + share * self.model(*batch["lm"]).loss
        if self.heads is None:
            return self.model(batch["input_ids"], batch["labels"]).loss
        return self.heads.loss(self._features(batch), batch["task"], batch["label"])[0]

    def _features(self, batch) -> torch.Tensor:
        with torch.no_grad():
            return last_prompt_hidden(self.model, batch["input_ids"], batch["last"])

    def training_loss(self, batch):
        loss = self.batch_loss(batch)
        return loss, {"train_loss": loss}

    def validation_losses(self, batch):
        n = len(batch["input_ids"])
        if self.heads is None:
            return {"val_loss": (self.batch_loss(batch), n)}
        loss, accuracy = self.heads.loss(self._features(batch), batch["task"], batch["label"])
        return {"val_loss": (loss, n), "val_accuracy": (accuracy, n)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        if self.heads is None:  # full, or lora: param_groups lists only what requires grad (the adapters)
            return self.model.param_groups(weight_decay)
        named = dict(self.heads.named_parameters())
        decay = {n: p for n, p in named.items() if p.dim() >= 2}
        rest = {n: p for n, p in named.items() if p.dim() < 2}
        return [
            {"params": list(decay.values()), "param_names": list(decay), "weight_decay": weight_decay},
            {"params": list(rest.values()), "param_names": list(rest), "weight_decay": 0.0},
        ]


@dataclass
class SFTResult(TrainResult):
    """`model` is the fine-tuned GPT (LoRA merged into plain Linear layers); for method=head the unchanged
    pretrained GPT."""

    heads: dict | None
    """method=head: the ClassificationHeads state dict (feature_mean, feature_std, <task>.weight/.bias)."""
    method: str
    """The sft.method that produced this result."""


def _encode(cfg: DictConfig, scfg: SFTConfig, tokenizer, template: str, max_length: int):
    """The train/val frames, their encoded rows and skip counts for the method, and the head tasks' label sets
    (None unless method=head)."""
    from lmpipe.data.instructions import read_examples, read_label_sets

    data_dir = Path(cfg.paths.instructions)
    frames = {split: read_examples(data_dir, split) for split in ("train", "val")}
    head_sets = None
    if scfg.method == "head":
        label_sets = read_label_sets(data_dir)
        missing = [task for task in scfg.head_tasks if task not in label_sets]
        if missing:
            raise LmpipeError(
                f"sft.head_tasks: task {missing[0]!r} has no label set in {data_dir / LABELS_FILE} "
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
                f"{data_dir / split_file(split)}: no usable examples for sft.method={scfg.method} "
                f"({skipped[split]} longer than {max_length} tokens"
                + (f"; head tasks {', '.join(scfg.head_tasks)}" if head_sets else "")
                + ")"
            )
    return frames, rows, skipped, head_sets


def _replay_windows(cfg: DictConfig, scfg: SFTConfig, pretrained_dir: Path, block_size: int):
    """(what the batches mix in, a digest of the shards) for sft.replay > 0, after checking that the shards
    hold the pretrained model's token ids."""
    tokens_dir = Path(cfg.paths.tokens)
    meta = read_meta(tokens_dir)
    if meta.get("tokenizer_sha256") != tokenizer_hash(pretrained_dir / TOKENIZER_FILE):
        raise LmpipeError(
            f"sft.replay={scfg.replay}: the token shards in {tokens_dir} were not made by the pretrained "
            f"model's tokenizer ({pretrained_dir / TOKENIZER_FILE}); re-run the tokenize stage"
        )
    check_shards(tokens_dir, block_size, "model.block_size")
    windows = ReplayWindows(tokens_dir, block_size, scfg.replay_split[1])
    return windows, digest({"tokenizer": meta.get("tokenizer_sha256"), "token_counts": meta.get("splits")})


def finetune(cfg: DictConfig, run=None) -> SFTResult | None:
    """Fine-tune the pretrained model (resuming if possible); on the main process return the result.

    Reads `<paths.models>/pretrain/` (model.pt, tokenizer and chat template) and `<paths.instructions>/`
    (the instructions stage's train/val examples and label sets). Returns None in DDP worker processes.
    """
    scfg: SFTConfig = config.build(cfg.sft)
    optim_cfg = scfg.optimizer(cfg.optimizer)
    pretrained_dir = Path(cfg.paths.models) / "pretrain"
    model_path = pretrained_dir / MODEL_FILE
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
    frames, rows, skipped, head_sets = _encode(cfg, scfg, tokenizer, template, max_length)
    replay, replay_data = None, None
    if scfg.replay_split[1]:
        replay, replay_data = _replay_windows(cfg, scfg, pretrained_dir, block_size)
    head_sizes = {task: len(labels) for task, labels in head_sets.items()} if head_sets else None

    def build_module() -> LitSFT:
        module = LitSFT(model, optim_cfg, scfg, cfg.seed, head_sizes)
        if module.heads is not None:  # (a resumed run restores the same statistics from its checkpoint)
            module.heads.set_feature_stats(prompt_features(module.model, rows["train"], pad_id))
        return module

    plan = FitPlan(
        name="sft",
        build_module=build_module,
        datamodule=SFTDataModule(rows["train"], rows["val"], scfg.batch_size, cfg.seed, pad_id, replay),
        trainer=scfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=scfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "sft": scfg,
            "pretrained": file_sha256(model_path),
            "data": rows_sha256(rows) + digest({"labels": head_sets}) + (replay_data or ""),
        },
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None

    module = fitted.module
    trainable, total = module.parameter_counts()
    model = module.model.float().eval()
    if scfg.method == "lora":
        merge_lora(model)
    model.requires_grad_(True)  # a plain GPT again, as load_model returns it
    metrics = {
        "method": scfg.method,
        **fitted.metrics(),
        "train_examples": len(rows["train"]),
        "val_examples": len(rows["val"]),
        "skipped_too_long": skipped,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "trainable_fraction": trainable / total,
    }
    heads = None
    if head_sets:
        classifier = HeadClassifier(model, module.heads.float(), tokenizer, template, head_sets)
        metrics["val_accuracy"] = _head_accuracy(classifier, frames["val"])
        samples = _head_samples(classifier, frames["val"], scfg.num_samples)
        heads = {k: v.detach().clone() for k, v in module.heads.state_dict().items()}
    else:
        samples = answer_samples(
            model, tokenizer, template, frames["val"], scfg.num_samples, scfg.sample_tokens, cfg.seed
        )
    return SFTResult(model, metrics, fitted.curves, samples, heads, scfg.method)


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
    chosen = spread(_head_frame(classifier, val), n)
    samples = []
    for task, prompt, label in zip(chosen["task"], chosen["prompt"], chosen["label"], strict=True):
        proba = classifier.predict_proba(task, [prompt])[0]
        best = int(proba.argmax())
        completion = f"{classifier.label_sets[task][best]} (p={proba[best]:.2f})"
        samples.append({"prompt": prompt, "completion": completion, "reference": label})
    return samples
