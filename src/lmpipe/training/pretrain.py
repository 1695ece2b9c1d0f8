"""Pretraining: the GPT trained on next-token prediction over random token windows, resumable from checkpoints.

Checkpoints go to `<paths.checkpoints>/pretrain/`, which DVC keeps across runs (`persist: true`), next to a
fingerprint of everything that shapes the run (model, optimizer, schedule, seed, data). A re-run with the same
fingerprint resumes from `last.ckpt` at the saved step; any change starts afresh, so a stale checkpoint can
never leak into a different experiment (`lmpipe.training.core.fit`).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from omegaconf import DictConfig

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.formats import EOT, TOKENIZER_FILE
from lmpipe.model import GPT, GPTConfig
from lmpipe.text_samples import generate_samples
from lmpipe.tokenizer import load_tokenizer, read_meta
from lmpipe.training.callbacks import TokenThroughput
from lmpipe.training.configs import OptimizerConfig, PretrainConfig, Schedule
from lmpipe.training.core import FitPlan, TrainingModule, TrainResult, fit
from lmpipe.training.datamodules import TokenDataModule


class LitGPT(TrainingModule):
    """A new GPT and its next-token loss."""

    def __init__(self, model: GPTConfig, optimizer: OptimizerConfig, schedule: Schedule, total_steps: int):
        super().__init__(optimizer, schedule, total_steps)
        self.model = GPT(model)

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.model.param_groups(weight_decay)

    def training_loss(self, batch):
        x, y = batch
        loss = self.model(x, y).loss
        return loss, {"train_loss": loss}

    def validation_losses(self, batch):
        x, y = batch
        return {"val_loss": (self.model(x, y).loss, len(x))}


class PretrainPlan(NamedTuple):
    """The pretraining run `fit` trains, and what its results are read with."""

    fit: FitPlan
    model: GPTConfig
    pretrain: PretrainConfig
    throughput: TokenThroughput


def pretrain_plan(cfg: DictConfig) -> PretrainPlan:
    """The pretraining run of `cfg`: model, data, trainer and callbacks (also what bench/ measures)."""
    from lightning.pytorch.callbacks import EarlyStopping

    pcfg: PretrainConfig = config.build(cfg.pretrain)
    tokens_dir = Path(cfg.paths.tokens)
    meta = read_meta(tokens_dir)
    model_cfg: GPTConfig = config.build(cfg.model, vocab_size=meta["vocab_size"])
    optim_cfg: OptimizerConfig = config.build(cfg.optimizer)
    max_steps = int(cfg.trainer.max_steps)
    if max_steps < 1:
        raise LmpipeError(f"trainer.max_steps={max_steps}: pretraining needs a positive step budget")

    every = int(cfg.trainer.log_every_n_steps)
    throughput = TokenThroughput(pcfg.batch_size * model_cfg.block_size, every)
    callbacks = [throughput]
    if pcfg.early_stopping_patience > 0:
        callbacks.append(EarlyStopping("val_loss", patience=pcfg.early_stopping_patience, mode="min"))
    plan = FitPlan(
        name="pretrain",
        build_module=lambda: LitGPT(model_cfg, optim_cfg, pcfg, max_steps),
        datamodule=TokenDataModule(tokens_dir, model_cfg.block_size, pcfg.batch_size, cfg.seed),
        trainer=cfg.trainer,
        checkpoint_every_n_steps=pcfg.checkpoint_every_n_steps,
        shaping={
            "model": model_cfg,
            "optimizer": optim_cfg,
            "pretrain": pcfg,
            "tokens": meta.get("tokenizer_sha256"),
            "counts": meta.get("splits"),
        },
        callbacks=callbacks,
    )
    return PretrainPlan(plan, model_cfg, pcfg, throughput)


def pretrain(cfg: DictConfig, run=None) -> TrainResult | None:
    """Train (resuming if possible); on the main process return the model, metrics, loss curves and samples.

    Returns None in DDP worker processes, which must not write outputs.
    """
    plan, model_cfg, pcfg, throughput = pretrain_plan(cfg)
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None

    trainer = fitted.trainer
    model = fitted.module.model.float().eval()
    tokenizer = load_tokenizer(Path(cfg.paths.tokens) / TOKENIZER_FILE)
    prompts = [pcfg.sample_prompts[i % len(pcfg.sample_prompts)] for i in range(pcfg.num_samples)]
    samples = generate_samples(
        model, tokenizer, prompts, pcfg.sample_tokens, seed=cfg.seed, eot_id=tokenizer.token_to_id(EOT)
    )
    metrics = {
        **fitted.metrics(),
        "tokens_seen": trainer.global_step
        * pcfg.batch_size
        * model_cfg.block_size
        * trainer.world_size
        * trainer.accumulate_grad_batches,
        "tokens_per_sec": throughput.mean,
        "world_size": trainer.world_size,
        "parameters": model.num_parameters(),
    }
    return TrainResult(model, metrics, fitted.curves, samples)
