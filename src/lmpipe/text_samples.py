"""Generated text samples from a PyTorch GPT: a quick look at what the model learned, logged by each stage."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from lmpipe.chat import prompt_text
from lmpipe.formats import END

if TYPE_CHECKING:
    import pandas as pd


def generate_samples(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    eot_id: int | None = None,
) -> list[dict]:
    """One seeded continuation per prompt: [{"prompt", "completion"}]. The model is left in eval mode."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt).ids
        idx = torch.tensor([ids], dtype=torch.long)
        out = model.generate(
            idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator, eos_id=eot_id
        )
        new = out[0, len(ids) :].tolist()
        if eot_id is not None and eot_id in new:
            new = new[: new.index(eot_id)]
        samples.append({"prompt": prompt, "completion": tokenizer.decode(new)})
    return samples


def format_samples(samples: list[dict]) -> str:
    return "\n\n".join(f"### {s['prompt']!r}\n{s['prompt']}{s['completion']}" for s in samples) + "\n"


def spread(frame: pd.DataFrame, n: int) -> pd.DataFrame:
    """Up to n rows evenly spread over `frame` (so samples cover its tasks, which come in blocks)."""
    if n == 0 or frame.empty:
        return frame.iloc[:0]
    return frame.iloc[np.unique(np.linspace(0, len(frame) - 1, n).round().astype(int))]


def answer_samples(
    model, tokenizer, template: str, examples: pd.DataFrame, n: int, max_new_tokens: int, seed: int
) -> list[dict]:
    """The model's answers to up to `n` prompts spread over `examples` (rendered with the chat template, ended
    at `<|end|>`): [{"prompt", "completion", "reference"}], the reference being the example's response."""
    chosen = spread(examples, n)
    texts = [prompt_text(prompt, template) for prompt in chosen["prompt"]]
    generated = generate_samples(
        model, tokenizer, texts, max_new_tokens, seed=seed, eot_id=tokenizer.token_to_id(END)
    )
    return [
        {"prompt": prompt, "completion": sample["completion"], "reference": reference}
        for prompt, reference, sample in zip(chosen["prompt"], chosen["response"], generated, strict=True)
    ]
