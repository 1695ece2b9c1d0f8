"""A BERT-style bidirectional encoder in one file, exact enough to hold a real BERT checkpoint.

Embeddings: token + learned absolute position + token type, then LayerNorm and dropout. Post-LN blocks (BERT's
order, not the GPT's): x = ln_1(x + attn(x)); x = ln_2(x + mlp(x)). Attention sees every real token in both
directions; padding keys are masked out (a boolean mask; the ops written out, `lmpipe.model.attend`'s
`explicit` kernel, which on these short inputs beats SDPA's kernels, in bf16 and fp32). The MLP is
BERT's exact (erf) GELU. On top: a masked-LM head (dense + GELU + LayerNorm, then the token embedding matrix
itself as the output layer, plus a bias) and pooling (mean over real tokens, or the first token, [CLS]) into
one vector per text for classification heads.

Layer names follow `lmpipe.model` (c_attn, c_proj, c_fc), so LoRA and its target names apply unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.encoder.config import EncoderConfig
from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX
from lmpipe.model import attend, load_model


class SelfAttention(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # query, key, value stacked
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(C, 2)
        )
        # The explicit kernel: SDPA falls back to its slower math path whenever attention dropout is on.
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0, kernel="explicit")
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class MLP(nn.Module):
    def __init__(self, config: EncoderConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden)
        self.c_proj = nn.Linear(hidden, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Post-LN: each sublayer's output is added to its input, then normalised."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)

    def forward(self, x, mask):
        x = self.ln_1(x + self.attn(x, mask))
        return self.ln_2(x + self.mlp(x))


class Encoder(nn.Module):
    config_class = EncoderConfig
    checkpoint_kind = "encoder"
    """What `lmpipe.model.load_model` builds from a checkpoint's config, and calls the file in its errors."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        d = config.n_embd
        self.wte = nn.Embedding(config.vocab_size, d)
        self.wpe = nn.Embedding(config.block_size, d)
        self.wtt = nn.Embedding(config.type_vocab_size, d)
        self.ln_emb = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        # The masked-LM head: transform, then the token embedding matrix (tied) as the output layer.
        self.mlm_dense = nn.Linear(d, d)
        self.mlm_ln = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.mlm_bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        # BERT's initialisation: N(0, 0.02) matrices, zero biases, unit LayerNorms.
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, T, n_embd) hidden states of token ids (B, T); attention_mask (B, T) is nonzero on real tokens."""
        B, T = input_ids.shape
        if T > self.config.block_size:
            raise LmpipeError(
                f"input of {T} tokens exceeds the encoder's block_size {self.config.block_size}"
            )
        positions = torch.arange(T, device=input_ids.device)
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = self.drop(self.ln_emb(self.wte(input_ids) + self.wpe(positions) + self.wtt(types)))
        # Every query sees every real key; padding queries get outputs too, which pooling and losses ignore.
        if attention_mask is None:
            mask = torch.ones(1, 1, 1, T, dtype=torch.bool, device=input_ids.device)
        else:
            mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return x

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., vocab_size) masked-LM logits of hidden states (..., n_embd)."""
        h = self.mlm_ln(F.gelu(self.mlm_dense(hidden)))
        return F.linear(h, self.wte.weight, self.mlm_bias)

    def mlm_loss(self, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, accuracy) over the positions whose label is not -100."""
        hidden = self(input_ids, attention_mask)
        picked = labels != IGNORE_INDEX
        logits = self.mlm_logits(hidden[picked]).float()  # only the selected positions pay for the vocabulary
        target = labels[picked]
        return F.cross_entropy(logits, target), (logits.argmax(-1) == target).float().mean()

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, n_embd): the mean of the real tokens' states, or the first token's state (config.pooling)."""
        if self.config.pooling == "first":
            return hidden[:, 0]
        weights = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, n_embd) pooled sentence vectors."""
        return self.pool(self(input_ids, attention_mask), attention_mask)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count; non_embedding leaves out the token, position and type tables (which do no matmul
        in the encoder itself)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(t.weight.numel() for t in (self.wte, self.wpe, self.wtt))
        return n

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Decay for >=2-D matrices except the position and type tables; none for biases and LayerNorms."""
        decay, no_decay = {}, {}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            is_matrix = p.dim() >= 2 and not name.startswith(("wpe.", "wtt."))
            (decay if is_matrix else no_decay)[name] = p
        return [
            {"params": list(decay.values()), "param_names": list(decay), "weight_decay": weight_decay},
            {"params": list(no_decay.values()), "param_names": list(no_decay), "weight_decay": 0.0},
        ]


def flops_per_token(model: Encoder, length: int) -> int:
    """Training FLOPs per token at `length` (6 N for the non-embedding matmuls plus attention), as for the GPT."""
    c = model.config
    return 6 * model.num_parameters(non_embedding=True) + 12 * c.n_layer * c.n_embd * length


def load_encoder(path) -> tuple[Encoder, dict]:
    """The encoder saved by `lmpipe.model.save_checkpoint` (on CPU, in eval mode) and its `extra` dict."""
    return load_model(path, Encoder)
