"""What post-training does with a GPT besides its own forward pass: sample responses to many prompts, score a
response by its summed log-probability, and read a scalar reward off the backbone.

Sampling groups prompts of equal token length so that each group is one `GPT.generate` call with its KV cache
and no padding (label-task prompts come in a few dozen lengths, so the groups are large). A sequence here is
prompt + response + `<|end|>`; the model reads all but its last token, the response tokens (and `<|end|>`) are
the targets, as in supervised fine-tuning.
"""

from __future__ import annotations

from collections import defaultdict

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

    Each group of equal-length prompts is prefilled once, in bf16 autocast as training runs, and its KV cache
    repeated for the copies; deterministic given the generator's state."""
    was_training = model.training
    model.eval()
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, ids in enumerate(prompts):
        by_length[len(ids)].append(i)
    out: list[list[int]] = [[] for _ in range(len(prompts) * copies)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for length in sorted(by_length):
            members = by_length[length]
            steps = min(max_new_tokens, model.config.block_size - length)
            for start in range(0, len(members), batch_size):
                chunk = members[start : start + batch_size]
                rows = _sample_group(
                    model, [prompts[i] for i in chunk], copies, steps, temperature, generator
                )
                for k, row in enumerate(rows.tolist()):
                    i, j = chunk[k // copies], k % copies
                    out[i * copies + j] = row[: row.index(end_id) + 1] if end_id in row else row
    model.train(was_training)
    return out


def _sample_group(model: GPT, prompts, copies, steps, temperature, generator) -> torch.Tensor:
    """(len(prompts) * copies, steps) sampled ids after equal-length prompts (no stopping: the caller cuts)."""
    tokens = []
    if steps <= 0:
        return torch.zeros((len(prompts) * copies, 0), dtype=torch.long)
    out = model(torch.tensor(prompts, dtype=torch.long), use_cache=True)
    past = tuple((k.repeat_interleave(copies, 0), v.repeat_interleave(copies, 0)) for k, v in out.past_kv)
    logits = out.logits[:, -1].float().repeat_interleave(copies, 0)
    for step in range(steps):
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator)
        tokens.append(nxt)
        if step + 1 < steps:
            out = model(nxt, past_kv=past, use_cache=True)
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
