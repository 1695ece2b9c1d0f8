"""Pretraining: the GPT as a LightningModule, trained on random token windows, resumable from checkpoints.

Checkpoints go to `<paths.checkpoints>/pretrain/`, which DVC keeps across runs (`persist: true`), next to a
fingerprint of everything that shapes the run (model, optimizer, schedule, seed, data). A re-run with the same
fingerprint resumes from `last.ckpt` at the saved step; any change starts afresh, so a stale checkpoint can
never leak into a different experiment.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig
from lmpipe.text_samples import generate_samples
from lmpipe.tokenizer import EOT, load_tokenizer, read_meta
from lmpipe.training.callbacks import LossHistory, TokenThroughput, progress_callbacks
from lmpipe.training.checkpointing import (
    RngStateInCheckpoints,
    build_trainer,
    digest,
    fit_resumable,
    quiet_lightning,
    resume_checkpoint,
    trainer_shaping,
)
from lmpipe.training.datamodules import TokenDataModule
from lmpipe.training.fit_diagnosis import diagnose_fit
from lmpipe.training.optim import OptimizerConfig, build_optimizer, l1_penalty, warmup_cosine

SECTIONS = ("seed", "paths", "model", "optimizer", "trainer", "logger", "pretrain")


@dataclass
class PretrainConfig:
    batch_size: int = 32
    """Sequences per micro-batch on each device (tokens per step = batch_size * block_size * devices * accumulation)."""
    warmup_steps: int = 100
    """Optimizer steps of linear learning-rate warm-up before the cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of optimizer.lr at trainer.max_steps."""
    checkpoint_every_n_steps: int = 100
    """Write a resumable checkpoint every N optimizer steps (and at the end)."""
    early_stopping_patience: int = 0
    """Stop after this many validations without a better val_loss (0 turns early stopping off)."""
    num_samples: int = 3
    """Generated samples logged at the end of training (cycling through sample_prompts)."""
    sample_tokens: int = 64
    """New tokens per generated sample."""
    sample_prompts: list[str] = field(default_factory=lambda: ["And God said"])
    """Prompts for the generated samples."""

    def __post_init__(self):
        for name in ("batch_size", "checkpoint_every_n_steps"):
            if getattr(self, name) < 1:
                raise LmpipeError(f"pretrain.{name}={getattr(self, name)}: expected an integer >= 1")
        if not 0 <= self.min_lr_ratio <= 1:
            raise LmpipeError(f"pretrain.min_lr_ratio={self.min_lr_ratio}: expected a value in [0, 1]")
        if self.num_samples and not self.sample_prompts:
            raise LmpipeError("pretrain.sample_prompts is empty but pretrain.num_samples > 0")


class LitGPT(RngStateInCheckpoints, L.LightningModule):
    """The GPT plus its optimizer and schedule; the RNG state rides in checkpoints so resume is exact."""

    def __init__(
        self, model: dict, optimizer: dict, warmup_steps: int, min_lr_ratio: float, total_steps: int
    ):
        super().__init__()
        self.save_hyperparameters()
        self.model = GPT(GPTConfig(**model))
        self.optim_cfg = OptimizerConfig(**optimizer)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = self.model(x, y).loss
        self.log("train_loss", loss, prog_bar=True)
        if self.optim_cfg.l1 > 0:
            penalty = self.optim_cfg.l1 * l1_penalty(self._decayed)
            self.log("l1_penalty", penalty)
            loss = loss + penalty
        self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", self.model(x, y).loss, prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        groups = self.model.param_groups(self.optim_cfg.weight_decay)
        # L1 acts on the weights that decay (param_groups lists them first) even when weight_decay is 0.
        self._decayed = groups[0]["params"]
        optimizer = build_optimizer(groups, self.optim_cfg)
        hp = self.hparams
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, hp.warmup_steps, hp.total_steps, hp.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


# pretrain fields that only shape what is reported after training, never the weights.
_REPORTING_ONLY = ("num_samples", "sample_tokens", "sample_prompts")


def fingerprint(cfg: DictConfig, meta: dict) -> str:
    """Hash of everything that changes what training computes (not where it logs or how often it prints)."""
    shaping = {
        "seed": cfg.seed,
        "model": config.to_container(cfg.model),
        "optimizer": config.to_container(cfg.optimizer),
        "pretrain": {k: v for k, v in config.to_container(cfg.pretrain).items() if k not in _REPORTING_ONLY},
        "trainer": trainer_shaping(cfg.trainer),
        "tokens": meta.get("tokenizer_sha256"),
        "counts": meta.get("splits"),
    }
    return digest(shaping)


@dataclass
class PretrainResult:
    model: GPT
    metrics: dict
    train_curve: list[tuple[int, float]]
    val_curve: list[tuple[int, float]]
    samples: list[dict]


def pretrain(cfg: DictConfig, run=None) -> PretrainResult | None:
    """Train (resuming if possible); on the main process return the model, metrics, loss curves and samples.

    Returns None in DDP worker processes, which must not write outputs.
    """
    from lightning.pytorch.callbacks import EarlyStopping

    from lmpipe.tracking import is_main_process, lightning_logger

    pcfg: PretrainConfig = config.build(cfg.pretrain)
    tokens_dir = Path(cfg.paths.tokens)
    meta = read_meta(tokens_dir)
    model_cfg: GPTConfig = config.build(cfg.model, vocab_size=meta["vocab_size"])
    optim_cfg: OptimizerConfig = config.build(cfg.optimizer)
    max_steps = int(cfg.trainer.max_steps)
    if max_steps < 1:
        raise LmpipeError(f"trainer.max_steps={max_steps}: pretraining needs a positive step budget")

    quiet_lightning()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = TokenDataModule(tokens_dir, model_cfg.block_size, pcfg.batch_size, cfg.seed)
    ckpt_dir = Path(cfg.paths.checkpoints) / "pretrain"
    resume = resume_checkpoint(ckpt_dir, fingerprint(cfg, meta), may_reset=is_main_process())
    if resume and is_main_process():
        print(f"pretrain: resuming from {resume}", flush=True)
    module = LitGPT(
        dataclasses.asdict(model_cfg),
        dataclasses.asdict(optim_cfg),
        pcfg.warmup_steps,
        pcfg.min_lr_ratio,
        max_steps,
    )

    every = int(cfg.trainer.log_every_n_steps)
    history = LossHistory(every)
    throughput = TokenThroughput(pcfg.batch_size * model_cfg.block_size, every)
    progress, show_bar = progress_callbacks(every)
    callbacks = [history, throughput, *progress]
    if pcfg.early_stopping_patience > 0:
        callbacks.append(EarlyStopping("val_loss", patience=pcfg.early_stopping_patience, mode="min"))
    trainer = build_trainer(
        cfg.trainer,
        callbacks=callbacks,
        show_bar=show_bar,
        ckpt_dir=ckpt_dir,
        checkpoint_every_n_steps=pcfg.checkpoint_every_n_steps,
        logger=lightning_logger(run, cfg),
    )
    train_seconds = fit_resumable(trainer, module, datamodule, resume, ckpt_dir)
    if not trainer.is_global_zero:
        return None

    model = module.model.float().eval()
    tokenizer = load_tokenizer(tokens_dir / "tokenizer.json")
    prompts = [pcfg.sample_prompts[i % len(pcfg.sample_prompts)] for i in range(pcfg.num_samples)]
    samples = generate_samples(
        model, tokenizer, prompts, pcfg.sample_tokens, seed=cfg.seed, eot_id=tokenizer.token_to_id(EOT)
    )
    metrics = {
        "steps": trainer.global_step,
        "tokens_seen": trainer.global_step
        * pcfg.batch_size
        * model_cfg.block_size
        * trainer.world_size
        * trainer.accumulate_grad_batches,
        "tokens_per_sec": throughput.mean,
        "world_size": trainer.world_size,
        "parameters": model.num_parameters(),
        "train_seconds": train_seconds,
        "resumed": resume is not None,
        "fit": diagnose_fit(history.train, history.val),
    }
    return PretrainResult(model, metrics, history.train, history.val, samples)
