"""Pretraining: the GPT as a LightningModule, trained on random token windows, resumable from checkpoints.

Checkpoints go to `<paths.checkpoints>/pretrain/`, which DVC keeps across runs (`persist: true`), next to a
fingerprint of everything that shapes the run (model, optimizer, schedule, seed, data). A re-run with the same
fingerprint resumes from `last.ckpt` at the saved step; any change starts afresh, so a stale checkpoint can
never leak into a different experiment.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from lmpipe import atomic, config
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig
from lmpipe.text_samples import generate_samples
from lmpipe.tokenizer import EOT, load_tokenizer, read_meta
from lmpipe.training.callbacks import LossHistory, TokenThroughput, progress_callbacks
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


class LitGPT(L.LightningModule):
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

    def on_save_checkpoint(self, checkpoint):
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint):
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


def quiet_lightning() -> None:
    """Silence warnings that say nothing actionable about this setup (they would bury the progress lines)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.")
    # The window stream resumes through TokenDataModule's checkpointed state, which this check does not see.
    warnings.filterwarnings(
        "ignore", message=".*resuming from a checkpoint that ended before the epoch ended"
    )
    # The folder always holds fingerprint.json (and last.ckpt when resuming) before training starts.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty")


# pretrain fields that only shape what is reported after training, never the weights.
_REPORTING_ONLY = ("num_samples", "sample_tokens", "sample_prompts")


def fingerprint(cfg: DictConfig, meta: dict) -> str:
    """Hash of everything that changes what training computes (not where it logs or how often it prints)."""
    trainer = {
        k: v
        for k, v in config.to_container(cfg.trainer).items()
        if k not in ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")
    }
    shaping = {
        "seed": cfg.seed,
        "model": config.to_container(cfg.model),
        "optimizer": config.to_container(cfg.optimizer),
        "pretrain": {k: v for k, v in config.to_container(cfg.pretrain).items() if k not in _REPORTING_ONLY},
        "trainer": trainer,
        "tokens": meta.get("tokenizer_sha256"),
        "counts": meta.get("splits"),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_checkpoint(ckpt_dir: Path, fp: str, may_reset: bool = True) -> str | None:
    """The checkpoint to resume from if its fingerprint matches; otherwise (main process only) clear the folder.

    DDP worker processes start after the main process has prepared the folder, so they only look.
    """
    stamp = ckpt_dir / "fingerprint.json"
    last = ckpt_dir / "last.ckpt"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fp and last.exists():
        return str(last)
    if may_reset:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
        atomic.write_json(stamp, {"fingerprint": fp})
    return None


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
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

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
    callbacks = [
        history,
        throughput,
        *progress,
        ModelCheckpoint(
            dirpath=ckpt_dir,
            filename="step{step}",
            every_n_train_steps=pcfg.checkpoint_every_n_steps,
            save_top_k=1,
            save_last=True,
            auto_insert_metric_name=False,
        ),
    ]
    if pcfg.early_stopping_patience > 0:
        callbacks.append(EarlyStopping("val_loss", patience=pcfg.early_stopping_patience, mode="min"))
    trainer_cfg = OmegaConf.merge(
        cfg.trainer, {"enable_progress_bar": cfg.trainer.enable_progress_bar and show_bar}
    )
    # The budget is in steps, not epochs: count an integer val_check_interval in training batches across
    # epochs. Lightning's default counts within each epoch and refuses an interval longer than one epoch,
    # which a small corpus (or the same corpus split over more DDP processes) runs into.
    step_validation = {}
    if "check_val_every_n_epoch" not in cfg.trainer and isinstance(
        cfg.trainer.get("val_check_interval"), int
    ):
        step_validation["check_val_every_n_epoch"] = None
    trainer: L.Trainer = config.build(
        trainer_cfg,
        callbacks=callbacks,
        logger=lightning_logger(run, cfg),
        default_root_dir=str(ckpt_dir),
        **step_validation,
    )
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    # The periodic checkpoint is taken before the validation of the same step; save once more at the very end
    # so a re-run of a finished stage restores the complete loss history too.
    trainer.save_checkpoint(ckpt_dir / "last.ckpt")
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
        "train_seconds": time.perf_counter() - started,
        "resumed": resume is not None,
        "fit": diagnose_fit(history.train, history.val),
    }
    return PretrainResult(model, metrics, history.train, history.val, samples)
