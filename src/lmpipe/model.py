"""A decoder-only GPT in one file (in the spirit of nanoGPT), ready for ONNX export with a KV cache.

Pre-LN transformer blocks: x = x + attn(ln_1(x)); x = x + mlp(ln_2(x)). Positions are learned, sinusoidal
(a fixed table, added to the token embeddings) or rotary (applied to q and k in every head).

Export notes (torch.onnx.export(..., dynamo=True)): one graph serves prefill and cached decode, so the forward
pass has no Python branch on tensor sizes. Attention uses an explicit boolean mask built from indices (key j is
visible to query i iff j <= past_len + i); SDPA's `is_causal=True` aligns its mask top-left, which is wrong once
there is a past, so it is only a fast path when neither a past nor a padding mask is given (a static condition
on arguments, which export never takes because it always passes a past). The cache is one (k, v) pair per layer
rather than one stacked tensor: it ran 1.1-1.3x faster in ONNX Runtime.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.atomic import atomic_path
from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX
from lmpipe.model_config import GPTConfig

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]

ATTENTION_KERNELS = ("sdpa", "fp32", "explicit")
"""How attention is computed; the same function up to rounding (training chooses via perf.attention)."""


def attend(q, k, v, mask, dropout_p: float, kernel: str = "sdpa") -> torch.Tensor:
    """softmax(q k^T / sqrt(head_dim), masked) v for (B, H, T, hd) q and (B, H, S, hd) k, v.

    mask: boolean (T, S) or (B, 1, T, S), True where a key is visible; None means causal with no past.
    kernel: `sdpa` is torch's fused kernel in the input dtype; `fp32` runs it on fp32 copies, because on a CPU
    the flash kernel's bf16 backward is about 2x slower than its fp32 one (bench/README.md); `explicit` writes
    the ops out (scores, softmax in fp32, weighted sum), which autocast keeps in bf16 and torch.compile fuses.
    """
    if kernel == "fp32" and q.dtype != torch.float32:
        with torch.autocast(q.device.type, enabled=False):  # autocast would cast the copies back down
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None
            )
        return y.to(q.dtype)
    if kernel == "explicit":
        T, S = q.shape[-2], k.shape[-2]
        if mask is None:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        weights = scores.masked_fill(~mask, float("-inf")).float().softmax(dim=-1)
        return F.dropout(weights, dropout_p).to(v.dtype) @ v
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=mask is None
    )


class GPTOutput(NamedTuple):
    logits: torch.Tensor
    """(B, T, vocab_size) next-token logits."""
    loss: torch.Tensor | None
    """Mean cross-entropy over targets != -100, or None without targets."""
    past_kv: KVCache | None
    """Per layer (k, v), each (B, n_head, past + T, head_dim), when use_cache; else None."""
    hidden: torch.Tensor
    """(B, T, n_embd) final hidden states after ln_f (features for classification heads)."""


def sinusoidal_table(length: int, dim: int) -> torch.Tensor:
    """The fixed (length, dim) table of "Attention Is All You Need": sin on even, cos on odd channels."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (i, i + head_dim/2) of x (B, H, T, hd) by position-dependent angles (GPT-NeoX)."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head, self.head_dim, self.dropout = config.n_head, config.head_dim, config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.kernel = "sdpa"  # one of ATTENTION_KERNELS; not saved: a choice of how, not of what

    def forward(self, x, rope, mask, past):
        B, T, C = x.shape
        q, k, v = (
            t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in self.c_attn(x).split(C, 2)
        )
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=2), torch.cat((past[1], v), dim=2)
        # mask is None only without a past and without padding: then SDPA's top-left causal mask is right.
        y = attend(q, k, v, mask, self.dropout if self.training else 0.0, self.kernel)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.act = nn.GELU() if config.activation == "gelu" else nn.ReLU()
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, rope, mask, past):
        a, present = self.attn(self.ln_1(x), rope, mask, past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), present


class GPT(nn.Module):
    config_class = GPTConfig
    checkpoint_kind = "model"
    """What `load_model` builds from a checkpoint's config, and calls the file in its errors."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos_encoding == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos_encoding == "sinusoidal":
            # Derived from the config, so not saved in checkpoints.
            self.register_buffer(
                "pos_table", sinusoidal_table(config.block_size, config.n_embd), persistent=False
            )
        else:
            hd = config.head_dim
            inv_freq = 1.0 / (10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
            self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream so its variance stays ~constant
        # with depth (each block adds two of them).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        positions: torch.Tensor | None = None,
        past_kv: KVCache | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = False,
    ) -> GPTOutput:
        """Logits for token ids `idx` (B, T), continuing from `past_kv` when given.

        positions: (B, T) position ids, default past_len + arange(T); pass them for left-padded batches.
        attention_mask: (B, past_len + T), nonzero for real tokens and 0 for padding keys.
        """
        cfg = self.config
        B, T = idx.shape
        if past_kv is not None and len(past_kv) != cfg.n_layer:
            raise LmpipeError(f"past_kv has {len(past_kv)} layers: expected model.n_layer={cfg.n_layer}")
        past_len = 0 if past_kv is None else past_kv[0][0].shape[2]
        if cfg.pos_encoding != "rotary" and past_len + T > cfg.block_size:
            raise LmpipeError(
                f"sequence of {past_len + T} tokens (past {past_len} + new {T}) exceeds "
                f"model.block_size={cfg.block_size} ({cfg.pos_encoding} positions)"
            )
        if positions is None:
            positions = torch.arange(past_len, past_len + T, device=idx.device)  # (T,), broadcast over B

        x = self.wte(idx)
        rope = None
        if cfg.pos_encoding == "learned":
            x = x + self.wpe(positions)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + self.pos_table[positions]
        else:
            angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq  # (..., T, hd/2)
            angles = torch.cat((angles, angles), dim=-1)
            if angles.dim() == 3:  # per-sequence positions: (B, T, hd) -> (B, 1, T, hd) for the heads
                angles = angles.unsqueeze(1)
            rope = (angles.cos(), angles.sin())
        x = self.drop(x)

        mask = None
        if past_kv is not None or attention_mask is not None:
            key = torch.arange(past_len + T, device=idx.device)
            query = torch.arange(T, device=idx.device) + past_len
            mask = key[None, :] <= query[:, None]  # (T, S)
            if attention_mask is not None:
                # A query always sees its own key, so a padding query (left padding) never has an empty row:
                # SDPA and the exported graph treat empty rows differently (zeros vs. garbage), and real
                # queries are unaffected because their own key is a real token.
                visible = attention_mask.bool()[:, None, None, :] | (key[None, :] == query[:, None])
                mask = mask & visible  # (B, 1, T, S)

        presents = []
        for i, block in enumerate(self.blocks):
            x, present = block(x, rope, mask, None if past_kv is None else past_kv[i])
            presents.append(present)
        hidden = self.ln_f(x)
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return GPTOutput(logits, loss, tuple(presents) if use_cache else None, hidden)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (a tied matrix once). non_embedding drops lookup tables that do no matmul: the
        position table, and the token table unless it doubles as the LM head (as nanoGPT counts)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            if self.config.pos_encoding == "learned":
                n -= self.wpe.weight.numel()
            if not self.config.tie_weights:
                n -= self.wte.weight.numel()
        return n

    def flops_per_token(self) -> int:
        """Training FLOPs (forward + backward) per token at full context, as in PaLM appendix B / nanoGPT MFU.

        6 * N for the matmuls with the N non-embedding weights (2 forward, 4 backward), plus
        12 * n_layer * n_embd * block_size for attention scores and the weighted sum of values.
        """
        c = self.config
        return 6 * self.num_parameters(non_embedding=True) + 12 * c.n_layer * c.n_embd * c.block_size

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups: decay for matmul/embedding matrices, none for biases, LayerNorm weights and
        position tables. The tied embedding/head matrix appears once. Each group names its parameters in
        `param_names` (the key torch.optim itself uses)."""
        decay, no_decay = {}, {}
        for name, p in self.named_parameters():  # deduplicates the tied weight
            if not p.requires_grad:
                continue
            (decay if p.dim() >= 2 and not name.startswith("wpe.") else no_decay)[name] = p
        return [
            {"params": list(decay.values()), "param_names": list(decay), "weight_decay": weight_decay},
            {"params": list(no_decay.values()), "param_names": list(no_decay), "weight_decay": 0.0},
        ]

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        eos_id: int | None = None,
    ) -> torch.Tensor:
        """Append up to max_new_tokens sampled tokens to idx (B, T); call model.eval() first.

        temperature 0 is greedy. With use_cache, the prompt is prefilled once and each step feeds one token
        with the cache. When the context would exceed block_size, both modes recompute over the last
        block_size tokens every step (a sliding window): positions stay within the trained range and the two
        modes give identical tokens. With eos_id, a finished row keeps emitting eos_id and generation stops
        once every row has finished.
        """
        bs = self.config.block_size
        past = None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        for _ in range(max_new_tokens):
            if use_cache and past is not None and past[0][0].shape[2] < bs:
                out = self(idx[:, -1:], past_kv=past, use_cache=True)
            else:
                out = self(idx[:, -bs:], use_cache=use_cache and idx.shape[1] < bs)
            past = out.past_kv
            nxt = self._sample(out.logits[:, -1, :], temperature, top_k, generator)
            if eos_id is not None:
                nxt = torch.where(finished[:, None], torch.full_like(nxt, eos_id), nxt)
                finished |= nxt[:, 0] == eos_id
            idx = torch.cat((idx, nxt), dim=1)
            if eos_id is not None and bool(finished.all()):
                break
        return idx

    @staticmethod
    def _sample(logits, temperature, top_k, generator):
        if temperature == 0:
            return logits.argmax(dim=-1, keepdim=True)
        logits = logits / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits.float(), dim=-1), 1, generator=generator)


def save_checkpoint(path, model: nn.Module, extra: dict) -> None:
    """Atomically save a model's config (a plain dict), weights and `extra` (plain values: ints, strs, lists...):
    the GPT's model.pt and, in the same layout, the encoder's encoder.pt."""
    payload = {"config": asdict(model.config), "state_dict": model.state_dict(), "extra": dict(extra)}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_model(path, model_class: type[nn.Module] = GPT) -> tuple[nn.Module, dict]:
    """Rebuild the `model_class` (the GPT, or another model with a `config_class` and a `checkpoint_kind`, such as
    `lmpipe.encoder.model.Encoder`) saved by save_checkpoint, on CPU, in eval mode; returns it with its `extra`."""
    path, kind = Path(path), model_class.checkpoint_kind
    if not path.is_file():
        raise LmpipeError(f"missing {kind} checkpoint {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's messages here span many lines; the exception type says enough
        raise LmpipeError(f"{path}: not a readable torch checkpoint ({type(exc).__name__})") from exc
    try:
        model = model_class(model_class.config_class(**payload["config"]))
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # missing keys, unknown or invalid config fields, mismatched weights
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise LmpipeError(f"{path}: not a lmpipe {kind} checkpoint ({reason})") from exc
    return model.eval(), payload["extra"]
