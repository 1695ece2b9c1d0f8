"""LoRA (Hu et al., 2021): low-rank adapters on frozen Linear layers, and merging them back for export.

An adapted layer computes base(x) + (alpha / r) * B A x with the pretrained weight W frozen; only A (r x in,
Kaiming-uniform like nn.Linear's own init) and B (out x r, zeros, so training starts from the pretrained
function exactly) learn. Merging folds the adapter into one plain nn.Linear with W + (alpha / r) * B A, so the
exported model has the pretrained architecture, state-dict keys and speed.

Written here rather than taken from `peft`: this needs only Linear adapters on a plain nn.Module, while peft
0.21 brings in transformers and accelerate (7 packages, ~140 MB) and adds ~3.5 s to a cold import.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.errors import LmpipeError


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update scaled by alpha / rank."""

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.scale = alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **factory))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5), generator=generator)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scale

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing the same function (in eval mode) with W + scale * B A."""
        base = self.base
        out = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        out.weight.copy_(base.weight + (self.lora_B @ self.lora_A) * self.scale)
        if base.bias is not None:
            out.bias.copy_(base.bias)
        return out


def apply_lora(
    model: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0, seed: int = 0
) -> list[str]:
    """Freeze every parameter of `model` and wrap each nn.Linear whose own name is in `targets` (e.g. "c_attn"
    matches blocks.0.attn.c_attn) in a LoRALinear, in place; returns the wrapped modules' full names.

    A is drawn from a generator seeded by `seed`, so the same seed gives the same adapters.
    """
    model.requires_grad_(False)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name.rpartition(".")[2] in targets and isinstance(module, nn.Linear)
    ]
    missing = sorted(set(targets) - {name.rpartition(".")[2] for name, _ in found})
    if missing:
        raise LmpipeError(
            f"sft.lora_targets: {missing[0]!r} names no nn.Linear layer of the model "
            f"(layers: {', '.join(sorted(_linear_names(model)))})"
        )
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(module, rank, alpha, dropout, generator))
    return [name for name, _ in found]


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear in `model` by its merged nn.Linear, in place; returns `model`."""
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in adapted:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    return model


def _linear_names(model: nn.Module) -> set[str]:
    return {name.rpartition(".")[2] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
