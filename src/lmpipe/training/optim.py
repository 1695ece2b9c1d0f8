"""Optimizers, the learning-rate schedule and the L1 penalty, chosen by the `optimizer/` config group (whose
schema, `OptimizerConfig`, lives in `lmpipe.training.configs`).

L2 regularisation comes in two flavours here on purpose: `adamw` decays weights directly (decoupled), while
`sgd`, `momentum`, `adam` and `adagrad` add `weight_decay * w` to the gradient (classic L2). Either way only
>=2-D weights decay; the model's `param_groups` keeps biases, LayerNorm and position tables out of it.
"""

from __future__ import annotations

import math

import torch

from lmpipe.training.configs import OptimizerConfig, OptimizerKernel


def build_optimizer(
    groups: list[dict], cfg: OptimizerConfig, kernel: OptimizerKernel = "loop"
) -> torch.optim.Optimizer:
    """The optimizer over parameter groups that already carry their own weight_decay, updating with `kernel`
    (`PerfConfig.optimizer_kernel`; "loop" is what torch picks on a CPU by itself)."""
    impl = {} if kernel == "loop" else {kernel: True}
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)
    if cfg.name == "adagrad":
        return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, **impl)
    if cfg.name == "momentum":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=True, **impl)
    return torch.optim.SGD(groups, lr=cfg.lr, **impl)


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
