"""The training core every stage plugs into: one base LightningModule and one `fit`.

A stage (pretraining, fine-tuning, distillation, ...) supplies only
- its model, as a `TrainingModule` subclass: `param_groups` (what trains, decayed weights first),
  `training_loss` (the objective and what to log of it) and `validation_losses`;
- its data, as a Lightning data module whose training batches are one resumable stream
  (`lmpipe.training.datamodules`);
- a `FitPlan` naming its checkpoint folder, effective trainer section, extra callbacks and what shapes the run.

The base module owns the optimizer (`build_optimizer`), the warm-up + cosine schedule, the L1 penalty on the
decayed weights and the logging; `fit` owns seeding, the fingerprint and resume, the Trainer with its
callbacks and checkpoints, and the metrics every stage reports. Both follow the run's `perf` section
(`PerfConfig`: optimizer kernel, logging only on logging steps, attention kernel, torch.compile, threads), so every stage gains.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from omegaconf import DictConfig
from torch.nn.attention import SDPBackend, sdpa_kernel

from lmpipe import config
from lmpipe.model import ATTENTION_KERNELS, GPT, CausalSelfAttention
from lmpipe.training.callbacks import LossHistory, progress_callbacks
from lmpipe.training.checkpointing import (
    RngStateInCheckpoints,
    build_trainer,
    fingerprint,
    fit_resumable,
    quiet_lightning,
    resume_checkpoint,
)
from lmpipe.training.configs import OptimizerConfig, PerfConfig, Schedule
from lmpipe.training.fit_diagnosis import diagnose_fit
from lmpipe.training.optim import build_optimizer, l1_penalty, warmup_cosine

Curve = list[tuple[int, float]]


def use_attention(root: torch.nn.Module, choice: str) -> Callable[[], contextlib.AbstractContextManager]:
    """Give every attention layer under `root` the kernel perf.attention names; returns the context factory its
    training steps run in (SDPA's math backend for `math`, nothing otherwise)."""
    kernel = choice if choice in ATTENTION_KERNELS else "sdpa"
    for module in root.modules():
        if isinstance(module, CausalSelfAttention):
            module.kernel = kernel
    return functools.partial(sdpa_kernel, SDPBackend.MATH) if choice == "math" else contextlib.nullcontext


class TrainingModule(RngStateInCheckpoints, L.LightningModule):
    """Optimization and logging for a stage's model; the RNG state rides in checkpoints so resume is exact.

    `schedule` gives the warm-up and final learning-rate ratio, `total_steps` the length of the cosine; `perf`
    (set by `fit` before training) how the steps run.
    """

    perf: PerfConfig = PerfConfig()

    def __init__(self, optimizer: OptimizerConfig, schedule: Schedule, total_steps: int):
        super().__init__()
        self.optim_cfg, self.schedule, self.total_steps = optimizer, schedule, total_steps

    fixed_shapes: ClassVar[bool] = True
    """Whether every training batch has one shape: only then does perf.compile compile the loss. Batches padded
    to their longest row change shape nearly every step, and compiled SFT steps ran slower (0.83 s) than eager
    ones (0.62 s): each new length recompiles until dynamo compiles a dynamic-shape graph."""

    def frozen_part(self) -> torch.nn.Module | None:
        """A frozen part the stage keeps in eval mode (no dropout) whatever mode the module is in, if any."""
        return None

    def train(self, mode: bool = True):
        super().train(mode)
        frozen = self.frozen_part()
        if frozen is not None:
            frozen.eval()
        return self

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The optimizer's parameter groups, each with its weight_decay; the first holds the decayed weights."""
        raise NotImplementedError

    def training_loss(self, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the objective to minimise, the values to log: at least train_loss)."""
        raise NotImplementedError

    def validation_losses(self, batch) -> dict[str, tuple[torch.Tensor, int]]:
        """{metric: (value, rows it averages over)}: at least val_loss."""
        raise NotImplementedError

    def on_fit_start(self):
        # The loss rather than the model is compiled: validation and sampling stay eager, so their other
        # shapes never recompile, and the weights keep their state_dict names.
        compiled = self.perf.compile and self.fixed_shapes
        attention = use_attention(self, self.perf.attention)

        # The kernel choice is entered inside the compiled function: entered around a call of it, the compiled
        # graph kept SDPA's flash kernel (profiled: perf.attention=math had no effect once perf.compile was on).
        def step_loss(batch):
            with attention():
                return self.training_loss(batch)

        self._step_loss = torch.compile(step_loss) if compiled else step_loss

    def training_step(self, batch, batch_idx):
        objective, logged = self._step_loss(batch)
        # Lightning writes a step's logged values to the logger, the loss history and the progress lines only
        # on the steps its connector names; logging on the others is work whose result nobody reads.
        log = not self.perf.sparse_logging or self.trainer._logger_connector.should_update_logs
        for name, value in logged.items() if log else ():
            self.log(name, value, prog_bar=name == "train_loss")
        if self.optim_cfg.l1 > 0:
            penalty = self.optim_cfg.l1 * l1_penalty(self._decayed)
            if log:
                self.log("l1_penalty", penalty)
            objective = objective + penalty
        if log:
            self.log("lr", self.optimizers().param_groups[0]["lr"], prog_bar=True)
        return objective

    def validation_step(self, batch, batch_idx):
        for name, (value, rows) in self.validation_losses(batch).items():
            self.log(name, value, prog_bar=name == "val_loss", sync_dist=True, batch_size=rows)

    def configure_optimizers(self):
        groups = self.param_groups(self.optim_cfg.weight_decay)
        # L1 acts on the weights that decay (listed first) even when weight_decay is 0.
        self._decayed = groups[0]["params"]
        optimizer = build_optimizer(groups, self.optim_cfg, self.perf.optimizer_kernel)
        s, total = self.schedule, self.total_steps
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, s.warmup_steps, total, s.min_lr_ratio)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        plugin = self.trainer.precision_plugin
        fused = getattr(optimizer, "_step_supports_amp_scaling", False)
        if gradient_clip_val and fused and isinstance(plugin, MixedPrecision) and plugin.scaler is None:
            # The mixed-precision plugin refuses to clip for a fused optimizer, to guard fp16's loss scaler
            # (a fused step unscales by itself); bf16 has no scaler, so the plain clipping is exact.
            algorithm = gradient_clip_algorithm or GradClipAlgorithmType.NORM  # Lightning's default
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)


@dataclass
class FitPlan:
    """What one training run of a stage is: everything `fit` needs that the stage decides."""

    name: str
    """The run's name: its checkpoint folder under paths.checkpoints and the prefix of its messages."""
    build_module: Callable[[], TrainingModule]
    """Builds the module once the global RNG is seeded (initial weights draw from it)."""
    datamodule: L.LightningDataModule
    trainer: DictConfig
    """The effective trainer section (with the stage's replacements)."""
    checkpoint_every_n_steps: int
    shaping: dict
    """Everything besides the seed and the trainer that shapes the run (see `checkpointing.fingerprint`)."""
    callbacks: list[L.Callback] = field(default_factory=list)
    """The stage's own callbacks, beside the loss history, progress and checkpoints."""

    def fingerprint(self, seed: int, perf: PerfConfig) -> str:
        return fingerprint(seed, self.trainer, perf=perf.shaping(), **self.shaping)


@dataclass
class TrainResult:
    """What a training stage hands its pipeline script (main process only)."""

    model: GPT
    """The trained GPT (float32, eval mode)."""
    metrics: dict
    """The common metrics of `Fitted.metrics` plus the stage's own."""
    curves: dict[str, Curve]
    """(step, value) points of train_loss, val_loss and any other curve the stage keeps."""
    samples: list[dict]
    """{"prompt", "completion"} (and "reference" where there is one) generated at the end."""


@dataclass
class Fitted:
    """A finished fit on the main process."""

    module: TrainingModule
    trainer: L.Trainer
    history: LossHistory
    resumed: bool
    train_seconds: float

    @property
    def curves(self) -> dict[str, Curve]:
        return {"train_loss": self.history.train, "val_loss": self.history.val}

    def metrics(self) -> dict:
        """The metrics every stage reports: steps, last losses, seconds, whether it resumed, the fit verdict."""
        train, val = self.history.train, self.history.val
        return {
            "steps": self.trainer.global_step,
            "train_loss": train[-1][1] if train else None,
            "val_loss": val[-1][1] if val else None,
            "train_seconds": self.train_seconds,
            "resumed": self.resumed,
            "fit": diagnose_fit(train, val),
        }


def fit(plan: FitPlan, cfg: DictConfig, run=None) -> Fitted | None:
    """Train `plan` (seeded by cfg.seed, resuming from its checkpoints if its fingerprint matches), logging to
    `run`; returns None in DDP worker processes, which must not write outputs."""
    from lmpipe.tracking import is_main_process, lightning_logger

    quiet_lightning()
    perf: PerfConfig = config.build(cfg.perf)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_dir = Path(cfg.paths.checkpoints) / plan.name
    resume = resume_checkpoint(ckpt_dir, plan.fingerprint(cfg.seed, perf), may_reset=is_main_process())
    if resume and is_main_process():
        print(f"{plan.name}: resuming from {resume}", flush=True)
    module = plan.build_module()
    module.perf = perf
    if module.frozen_part() is not None:  # in eval mode on purpose
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode at the start of training")

    history = LossHistory(int(cfg.trainer.log_every_n_steps))
    progress, show_bar = progress_callbacks(int(cfg.trainer.log_every_n_steps))
    trainer = build_trainer(
        plan.trainer,
        callbacks=[history, *plan.callbacks, *progress],
        show_bar=show_bar,
        ckpt_dir=ckpt_dir,
        checkpoint_every_n_steps=plan.checkpoint_every_n_steps,
        logger=lightning_logger(run, cfg),
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(perf.threads or threads)
    try:
        seconds = fit_resumable(trainer, module, plan.datamodule, resume, ckpt_dir)
    finally:
        torch.set_num_threads(threads)
    if not trainer.is_global_zero:
        return None
    return Fitted(module, trainer, history, resume is not None, seconds)
