"""The GPT's shape, apart from `lmpipe.model` so a config can be read and checked without importing torch.

`conf/model/*.yaml` names it as `_target_`; `lmpipe.model.GPT` is built from it.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from lmpipe import config
from lmpipe.errors import LmpipeError

POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
ACTIVATIONS = ("gelu", "relu")

Positive = Annotated[int, Field(ge=1)]


@config.schema("model")
class GPTConfig:
    vocab_size: Positive = 4096
    """Number of token ids (the tokenizer's vocabulary size)."""
    block_size: Positive = 256
    """Maximum context length in tokens."""
    n_layer: Positive = 4
    """Number of transformer blocks."""
    n_head: Positive = 4
    """Number of attention heads per block."""
    n_embd: Positive = 256
    """Width of the residual stream (must be divisible by n_head)."""
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    """Dropout probability for embeddings, attention weights and residual branches (training only)."""
    bias: bool = True
    """Use biases in Linear layers and LayerNorms."""
    pos_encoding: Literal[POS_ENCODINGS] = "learned"
    """Position encoding: learned, sinusoidal or rotary."""
    activation: Literal[ACTIVATIONS] = "gelu"
    """MLP activation: gelu or relu."""
    mlp_ratio: Positive = 4
    """MLP hidden width as a multiple of n_embd."""
    tie_weights: bool = True
    """Share the token embedding matrix with the LM head."""

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise LmpipeError(f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}")
        if self.pos_encoding == "rotary" and (self.n_embd // self.n_head) % 2:
            raise LmpipeError(
                f"model.pos_encoding='rotary' needs an even head size, but model.n_embd={self.n_embd} / "
                f"model.n_head={self.n_head} = {self.head_dim}"
            )

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head
