"""Fine-tuning the encoder on label tasks (stage `encoder_finetune`), on the training core.

One encoder, one linear head per task on its pooled output (the heads of `lmpipe.training.heads`,
standardised with statistics of the initial encoder's features), all tasks in every batch. `encoder.method`:
- full: every weight trains (the encoder at `encoder.lr`, the new heads at `encoder.head_lr`);
- head: the encoder stays frozen, in eval mode (transfer learning: new layers on a fixed copy);
- lora: low-rank adapters on the encoder's projections (`lmpipe.training.lora`), merged at the end.
`encoder.init`: pretrained (all-MiniLM-L6-v2 with its WordPiece tokenizer) or scratch (the encoder_mlm stage's
encoder, pretrained from random weights on the corpus, with its tokenizer).

Test metrics are the evaluate stage's own (`lmpipe.evaluation.tasks.classification_metrics`) on the test split,
so they compare with the GPT variants and the TF-IDF baseline on the same held-out examples.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig

from lmpipe import config
from lmpipe.encoder.classifier import EncoderClassifier, pooled_features
from lmpipe.encoder.config import EncoderFinetuneConfig
from lmpipe.encoder.data import (
    LabelData,
    LengthBucketedBatches,
    encode_rows,
    instruction_label_data,
    jsonl_label_data,
)
from lmpipe.encoder.model import Encoder, load_encoder
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError
from lmpipe.formats import ENCODER_FILE, TOKENIZER_FILE
from lmpipe.training.checkpointing import digest, file_sha256
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.core import FitPlan, Fitted, TrainingModule, fit
from lmpipe.training.heads import ClassificationHeads
from lmpipe.training.lora import apply_lora, merge_lora
from lmpipe.training.sft import SFTDataModule
from lmpipe.training.sft_data import rows_sha256


class EncoderDataModule(SFTDataModule):
    """The SFT data module with length-bucketed training batches."""

    def train_dataloader(self):
        spec = self.stream_spec(self.seed, self.batches_per_epoch())
        return self.loader(LengthBucketedBatches(self.train_rows, self.batch_size, self.pad_id, spec))


class LitEncoderClassifier(TrainingModule):
    fixed_shapes = False  # batches are padded to their longest verse

    def __init__(
        self, encoder: Encoder, optimizer: OptimizerConfig, ecfg: EncoderFinetuneConfig, seed: int, head_sizes
    ):
        super().__init__(optimizer, ecfg, ecfg.max_steps)
        self.cfg, self.encoder = ecfg, encoder
        if ecfg.method == "lora":
            apply_lora(encoder, ecfg.lora_targets, ecfg.lora_rank, ecfg.lora_alpha, seed=seed)
        else:
            encoder.requires_grad_(ecfg.method == "full")
        self.heads = ClassificationHeads(encoder.config.n_embd, head_sizes, seed=seed)
        self.train()

    def frozen_part(self):
        return self.encoder if self.cfg.method == "head" else None

    def _features(self, batch) -> torch.Tensor:
        ids = batch["input_ids"]
        with torch.set_grad_enabled(self.cfg.method != "head" and torch.is_grad_enabled()):
            return self.encoder.embed(ids, ids != self.encoder.config.pad_id)

    def training_loss(self, batch):
        loss, accuracy = self.heads.loss(self._features(batch), batch["task"], batch["label"])
        return loss, {"train_loss": loss, "train_accuracy": accuracy}

    def validation_losses(self, batch):
        n = len(batch["label"])
        loss, accuracy = self.heads.loss(self._features(batch), batch["task"], batch["label"])
        return {"val_loss": (loss, n), "val_accuracy": (accuracy, n)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        encoder = self.encoder.param_groups(weight_decay)  # only what requires grad (lora: the adapters)
        named = dict(self.heads.named_parameters())
        heads = []
        for decayed in (True, False):
            part = {f"heads.{n}": p for n, p in named.items() if (p.dim() >= 2) == decayed}
            heads.append(
                {
                    "params": list(part.values()),
                    "param_names": list(part),
                    "weight_decay": weight_decay if decayed else 0.0,
                }
            )
        for group in heads:
            group["lr"] = self.cfg.head_lr
        decayed = [encoder[0], heads[0]]  # the decayed groups first: the core's L1 acts on groups[0] only
        return [g for g in (*decayed, encoder[1], heads[1]) if g["params"]]

    def parameter_counts(self) -> dict[str, int]:
        params = list(self.parameters())
        return {
            "trainable_parameters": sum(p.numel() for p in params if p.requires_grad),
            "total_parameters": sum(p.numel() for p in params),
        }


@dataclass
class EncoderResult:
    classifier: EncoderClassifier
    metrics: dict
    curves: dict
    samples: list[dict]


def initial_encoder(cfg: DictConfig, ecfg: EncoderFinetuneConfig) -> tuple[Encoder, EncoderTokenizer, str]:
    """(encoder, tokenizer, hash of the starting weights) for encoder.init."""
    if ecfg.init == "pretrained":
        from lmpipe.encoder.pretrained import WEIGHTS_FILE, bundled_dir, load_pretrained

        encoder, tokenizer = load_pretrained(pooling=ecfg.pooling)
        if ecfg.max_length > encoder.config.block_size:
            raise LmpipeError(
                f"encoder.max_length={ecfg.max_length}: exceeds the pretrained encoder's {encoder.config.block_size}"
            )
        return encoder, tokenizer, file_sha256(bundled_dir() / WEIGHTS_FILE)
    # scratch: the encoder_mlm stage's encoder, pretrained from random weights on this corpus
    mlm_dir = Path(cfg.paths.encoder_mlm)
    encoder, extra = load_encoder(mlm_dir / ENCODER_FILE)
    if ecfg.max_length > encoder.config.block_size:
        raise LmpipeError(
            f"encoder.max_length={ecfg.max_length}: exceeds the block_size {encoder.config.block_size} of "
            f"{mlm_dir / ENCODER_FILE} (mlm.window)"
        )
    encoder.config.pooling = ecfg.pooling
    tokenizer = EncoderTokenizer.from_file(mlm_dir / TOKENIZER_FILE, extra["pad_token"])
    return encoder, tokenizer, file_sha256(mlm_dir / ENCODER_FILE)


def label_data(cfg: DictConfig, ecfg: EncoderFinetuneConfig) -> LabelData:
    if ecfg.jsonl:
        return jsonl_label_data(list(ecfg.jsonl), ecfg.tasks, ecfg, cfg.seed)
    return instruction_label_data(cfg.paths.instructions, ecfg.tasks)


def encoded_splits(
    data: LabelData, tokenizer: EncoderTokenizer, ecfg: EncoderFinetuneConfig
) -> dict[str, list]:
    """split -> its examples encoded by `tokenizer` (rows of `encode_rows`)."""
    return {
        split: encode_rows(frame, data.label_sets, tokenizer, ecfg, f"{data.source} {split}")
        for split, frame in data.frames.items()
    }


def score_test_split(classifier: EncoderClassifier, test: pd.DataFrame) -> tuple[dict, list[dict], float]:
    """(per-task test metrics, two samples per task, ms per example) of a classifier on the test split, scored
    as the evaluate stage scores (`lmpipe.evaluation.tasks.classification_metrics`)."""
    from lmpipe.evaluation.tasks import classification_metrics

    tasks, samples = {}, []
    start = time.perf_counter()
    for task, labels in classifier.label_sets.items():
        part = test[test["task"] == task]
        probs = classifier.predict_proba(task, list(part["text"]))
        tasks[task] = classification_metrics(list(part["label"]), probs, labels)
        best = probs.argmax(axis=1)
        for i in range(min(2, len(part))):
            samples.append(
                {
                    "prompt": f"[{task}] {part['text'].iloc[i]}",
                    "completion": f"{labels[best[i]]} (p={probs[i, best[i]]:.2f})",
                    "reference": part["label"].iloc[i],
                }
            )
    return tasks, samples, 1000 * (time.perf_counter() - start) / max(1, len(test))


def scored_result(
    fitted: Fitted,
    classifier: EncoderClassifier,
    test: pd.DataFrame,
    rows: dict,
    batch_size: int,
    fields: dict,
) -> EncoderResult:
    """The result of a finished fit: the classifier scored on the test split, its metrics `fields` and those
    every encoder run reports (the fit's, examples, layers, parameters with and without embeddings, tokens)."""
    tasks, samples, ms_per_example = score_test_split(classifier, test)
    encoder, steps = classifier.encoder, fitted.trainer.global_step
    metrics = {
        **fields,
        **fitted.metrics(),
        "examples": {split: len(part) for split, part in rows.items()},
        "n_layer": encoder.config.n_layer,
        "encoder_parameters": encoder.num_parameters(),
        "encoder_parameters_non_embedding": encoder.num_parameters(non_embedding=True),
        # steps x batch size x the mean training example's length
        "tokens_seen_estimate": int(
            steps * batch_size * np.mean([len(r["input_ids"]) for r in rows["train"]])
        ),
        "torch_ms_per_example": ms_per_example,
        "tasks": tasks,
    }
    return EncoderResult(classifier, metrics, fitted.curves, samples)


def standardise_heads(
    heads: ClassificationHeads, encoder: Encoder, train_rows: list, n: int, pad_id: int
) -> None:
    """Standardise the heads' input with the encoder's pooled features of `n` training rows spread evenly over
    the training set (`encoder.stats_rows`)."""
    picks = np.linspace(0, len(train_rows) - 1, min(n, len(train_rows))).astype(int)
    heads.set_feature_stats(pooled_features(encoder, [train_rows[i] for i in picks], pad_id))


def runs(cfg: DictConfig) -> list[str]:
    """The encoder.init of each fine-tuning run of the stage: the configured one, then scratch as well when
    encoder.also_scratch asks for the comparison."""
    ecfg: EncoderFinetuneConfig = config.build(cfg.encoder)
    return [ecfg.init, "scratch"] if ecfg.also_scratch and ecfg.init == "pretrained" else [ecfg.init]


def finetune_encoder(cfg: DictConfig, run=None, init: str | None = None) -> EncoderResult | None:
    """Fine-tune from `init` (default encoder.init), resuming if possible, and score on test; None in DDP
    worker processes. A run other than the configured one keeps its checkpoints apart (`-<init>`)."""
    ecfg: EncoderFinetuneConfig = config.build(cfg.encoder, **({"init": init} if init else {}))
    name = "encoder_finetune" if ecfg.init == cfg.encoder.init else f"encoder_finetune-{ecfg.init}"
    optim_cfg = ecfg.optimizer(cfg.optimizer)
    data = label_data(cfg, ecfg)
    encoder, tokenizer, init_hash = initial_encoder(cfg, ecfg)
    rows = encoded_splits(data, tokenizer, ecfg)
    head_sizes = {task: len(labels) for task, labels in data.label_sets.items()}

    def build_module() -> LitEncoderClassifier:
        module = LitEncoderClassifier(encoder, optim_cfg, ecfg, cfg.seed, head_sizes)
        standardise_heads(module.heads, module.encoder, rows["train"], ecfg.stats_rows, tokenizer.pad_id)
        return module

    plan = FitPlan(
        name=name,
        build_module=build_module,
        datamodule=EncoderDataModule(rows["train"], rows["val"], ecfg.batch_size, cfg.seed, tokenizer.pad_id),
        trainer=ecfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=ecfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "encoder": ecfg,
            "init": init_hash,
            "data": rows_sha256({k: v for k, v in rows.items() if k != "test"})
            + digest({"labels": data.label_sets}),
        },
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None
    module = fitted.module
    counts = module.parameter_counts()
    model = module.encoder.float().eval()
    if ecfg.method == "lora":
        merge_lora(model)
    classifier = EncoderClassifier(
        model, module.heads.float(), tokenizer, data.label_sets, ecfg.max_length, ecfg.too_long
    )
    fields = {
        "init": ecfg.init,
        "method": ecfg.method,
        **counts,
        "trainable_fraction": counts["trainable_parameters"] / counts["total_parameters"],
    }
    return scored_result(fitted, classifier, data.frames["test"], rows, ecfg.batch_size, fields)
