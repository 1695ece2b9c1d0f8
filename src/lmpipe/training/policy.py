"""What post-training does with a GPT besides its own forward pass: sample responses to many prompts, score a
response by its summed log-probability, and read a scalar reward off the backbone.

Sampling left-pads a batch of prompts (per-row positions and an attention mask, which `GPT.forward` takes
with its KV cache), so a whole batch of prompts, each with several sampled copies, is one prefill and a few
cached decode steps. A sequence here is
prompt + response + `<|end|>`; the model reads all but its last token, the response tokens (and `<|end|>`) are
the targets, as in supervised fine-tuning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.data.instructions import encode_prompt
from lmpipe.formats import END
from lmpipe.model import GPT


@torch.no_grad()
def sample_ids(
    model: GPT,
    prompts: list[list[int]],
    copies: int,
    max_new_tokens: int,
    temperature: float,
    generator: torch.Generator,
    end_id: int,
    batch_size: int = 128,
) -> list[list[int]]:
    """`copies` sampled responses per prompt (token ids, ending with `end_id` when the model closed its turn
    within `max_new_tokens` and the context), prompt-major: response j of prompt i at i * copies + j.

    Prompts go `batch_size` at a time, left-padded into one batch (positions and an attention mask keep each
    row's computation its own), prefilled once in bf16 autocast as training runs, with the KV cache repeated
    for the copies; generation stops when every row has closed its turn. Deterministic given the generator."""
    was_training = model.training
    model.eval()
    out: list[list[int]] = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            steps = min(max_new_tokens, model.config.block_size - max(len(p) for p in chunk))
            rows = _sample_batch(model, chunk, copies, steps, temperature, generator, end_id)
            out.extend(row[: row.index(end_id) + 1] if end_id in row else row for row in rows.tolist())
    model.train(was_training)
    return out


def _sample_batch(model: GPT, prompts, copies, steps, temperature, generator, end_id) -> torch.Tensor:
    """(len(prompts) * copies, <= steps) sampled ids after left-padded prompts (rows that closed their turn
    keep sampling until all have; the caller cuts at `end_id`)."""
    if steps <= 0:
        return torch.zeros((len(prompts) * copies, 0), dtype=torch.long)
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(ids, positions=positions, attention_mask=mask, use_cache=True)
    past = tuple((k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)) for k, v in out.past_kv)
    logits = out.logits[:, -1].float().repeat_interleave(copies, 0)
    mask = mask.repeat_interleave(copies, 0)
    position = positions[:, -1:].repeat_interleave(copies, 0)
    finished = torch.zeros(len(logits), dtype=torch.bool)
    tokens = []
    for step in range(steps):
        nxt = torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)
        tokens.append(nxt)
        finished |= nxt[:, 0] == end_id
        if bool(finished.all()) or step + 1 == steps:
            break
        mask = torch.cat((mask, torch.ones_like(nxt)), dim=1)
        position = position + 1
        out = model(nxt, positions=position, past_kv=past, attention_mask=mask, use_cache=True)
        past, logits = out.past_kv, out.logits[:, -1].float()
    return torch.cat(tokens, dim=1)


def make_sampler(model: GPT, tokenizer, template: str, max_new_tokens: int, temperature: float, seed: int):
    """A `lmpipe.data.preferences.Sampler`: (prompts, copies) -> the model's answers as text (before
    `<|end|>`), prompt-major."""
    end_id = tokenizer.token_to_id(END)
    generator = torch.Generator().manual_seed(seed)

    def sample(prompts: list[str], copies: int) -> list[str]:
        ids = [encode_prompt(tokenizer, template, prompt) for prompt in prompts]
        responses = sample_ids(model, ids, copies, max_new_tokens, temperature, generator, end_id)
        return [tokenizer.decode([t for t in r if t != end_id]) for r in responses]

    return sample


def response_mask(lengths: torch.Tensor, prompt_lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width) bool: target position t (predicting token t+1) is a response token of a sequence of
    `lengths` tokens whose first `prompt_lengths` are the prompt."""
    target = torch.arange(1, width + 1)[None, :]
    return (target >= prompt_lengths[:, None]) & (target < lengths[:, None])


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(B, T-1) log-probability of each next token ids[:, 1:] under logits (B, T-1, V) in float32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, ids[:, 1:, None]).squeeze(2)


def sequence_logprobs(
    model: GPT, ids: torch.Tensor, lengths: torch.Tensor, prompt_lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed response log-probability (B,), per-token log-probabilities masked to the response (B, T-1))."""
    per_token = token_logprobs(model(ids[:, :-1]).logits, ids)
    mask = response_mask(lengths, prompt_lengths, per_token.shape[1])
    per_token = per_token * mask
    return per_token.sum(dim=1), per_token


def disable_dropout(model: nn.Module) -> nn.Module:
    """Dropout off in `model`: a policy whose log-probabilities are compared with a frozen reference's (or with
    those it sampled under) must compute them the same way (TRL does the same for DPO and PPO)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


class RewardModel(nn.Module):
    """A GPT backbone with a scalar head on the final hidden state of the last response token (the one that
    predicts `<|end|>`), which has read the whole prompt and response."""

    def __init__(self, backbone: GPT):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.config.n_embd, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) rewards of right-padded sequences `ids` (B, T) of `lengths` tokens each (the last is `<|end|>`)."""
        hidden = self.backbone(ids[:, :-1]).hidden
        last = (lengths - 2).clamp(min=0)
        return self.head(hidden[torch.arange(len(ids)), last].float()).squeeze(-1)
