"""Optimizers, the learning-rate schedule and the L1 penalty, chosen by the `optimizer/` config group.

L2 regularisation comes in two flavours here on purpose: `adamw` decays weights directly (decoupled), while
`sgd`, `momentum`, `adam` and `adagrad` add `weight_decay * w` to the gradient (classic L2). Either way only
>=2-D weights decay; the model's `param_groups` keeps biases, LayerNorm and position tables out of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lmpipe.errors import LmpipeError

OPTIMIZERS = ("sgd", "momentum", "adagrad", "adam", "adamw")


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    """Which optimizer: sgd, momentum (SGD with Nesterov momentum), adagrad, adam or adamw."""
    lr: float = 1e-3
    """Peak learning rate, reached after the warm-up and decayed by a cosine to min_lr_ratio * lr."""
    weight_decay: float = 0.1
    """L2 strength on >=2-D weights (decoupled for adamw, added to the gradient otherwise)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """Adam/AdamW moment decay rates (beta1, beta2)."""
    eps: float = 1e-8
    """Numerical floor added to denominators (Adam, AdamW, AdaGrad)."""
    momentum: float = 0.0
    """Momentum factor for name=momentum (0.9 is typical); ignored by the others."""
    l1: float = 0.0
    """L1 penalty strength: adds l1 * sum(|w|) over the decayed weights to the training loss (sparsity)."""

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise LmpipeError(f"optimizer.name={self.name!r}: expected one of {', '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise LmpipeError(f"optimizer.lr={self.lr}: expected a positive learning rate")
        for name in ("weight_decay", "l1"):
            if not getattr(self, name) >= 0:
                raise LmpipeError(f"optimizer.{name}={getattr(self, name)}: expected a value >= 0")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise LmpipeError(f"optimizer.betas={self.betas}: expected two values in [0, 1)")
        if self.name == "momentum" and not 0 < self.momentum < 1:
            raise LmpipeError(
                f"optimizer.momentum={self.momentum}: expected a value in (0, 1) for name=momentum"
            )


def build_optimizer(groups: list[dict], cfg: OptimizerConfig) -> torch.optim.Optimizer:
    """The optimizer over parameter groups that already carry their own weight_decay."""
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps)
    if cfg.name == "momentum":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True)
    return torch.optim.SGD(groups, lr=cfg.lr)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up from ~0 to 1, then cosine decay to `min_ratio` at `total_steps`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def l1_penalty(params: list[torch.Tensor]) -> torch.Tensor:
    """sum(|w|) over the given parameters (the decayed weights, so LayerNorm gains are not pushed to 0)."""
    return torch.stack([p.abs().sum() for p in params]).sum()
