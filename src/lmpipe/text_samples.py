"""Generated text samples from a PyTorch GPT: a quick look at what the model learned, logged by each stage."""

from __future__ import annotations

import torch


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
