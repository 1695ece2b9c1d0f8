"""Generation speed of a model variant, measured the same way for PyTorch and ONNX Runtime.

Decode throughput: a prompt of `prompt_tokens` random ids is prefilled, then `new_tokens` greedy steps run
with the KV cache at batch size 1 and 8 (no early stop, so every variant does the same work); tokens/s counts
generated tokens over the decode steps only. Prefill latency: `repeats` timed prefills of a batch-1 prompt,
reported as p50 and p95 in milliseconds. The machine is shared and noisy: compare variants measured in the
same run, not across runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import numpy as np

# step(ids (B,T), positions (B,T), past) -> (logits (B,T,V) numpy, past)
Step = Callable[[np.ndarray, np.ndarray, object], tuple[np.ndarray, object]]


def _prompt(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    # Ids above the 8 reserved special tokens, so every variant reads ordinary text tokens.
    return np.random.default_rng(seed).integers(8, vocab, size=(batch, length), dtype=np.int64)


def _decode_rate(step: Step, batch: int, prompt_tokens: int, new_tokens: int, vocab: int, seed: int) -> float:
    ids = _prompt(batch, prompt_tokens, vocab, seed)
    positions = np.broadcast_to(np.arange(prompt_tokens), ids.shape)
    logits, past = step(ids, positions, None)
    started = time.perf_counter()
    for i in range(new_tokens):
        nxt = logits[:, -1].argmax(axis=-1).astype(np.int64)[:, None]
        pos = np.full((batch, 1), prompt_tokens + i, dtype=np.int64)
        logits, past = step(nxt, pos, past)
    return batch * new_tokens / (time.perf_counter() - started)


def measure(
    step: Step,
    vocab: int,
    block_size: int,
    prompt_tokens: int = 32,
    new_tokens: int = 32,
    repeats: int = 10,
    seed: int = 0,
) -> dict:
    """decode tokens/s at batch 1 and 8, prefill latency p50/p95 (ms) for one variant's step function."""
    prompt_tokens = min(prompt_tokens, block_size - new_tokens)
    _decode_rate(step, 1, prompt_tokens, 2, vocab, seed)  # warm-up: first runs allocate
    result = {
        f"decode_tok_s_b{b}": _decode_rate(step, b, prompt_tokens, new_tokens, vocab, seed) for b in (1, 8)
    }
    ids = _prompt(1, prompt_tokens, vocab, seed)
    positions = np.arange(prompt_tokens)[None, :]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        step(ids, positions, None)
        times.append((time.perf_counter() - started) * 1000)
    result["prefill_ms_p50"] = float(np.percentile(times, 50))
    result["prefill_ms_p95"] = float(np.percentile(times, 95))
    result["prefill_tokens"] = prompt_tokens
    return result


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """PyTorch's intra-op threads set to `threads` (0 leaves them) for the duration, then restored."""
    import torch

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def ort_step(engine) -> Step:
    """An OrtEngine as a step function (attention mask all ones: no padding in these prompts)."""

    def step(ids, positions, past):
        past_len = 0 if past is None else past[0][0].shape[2]
        mask = np.ones((ids.shape[0], past_len + ids.shape[1]), dtype=np.int64)
        return engine.forward(ids, np.ascontiguousarray(positions), mask, past)

    return step


def torch_step(model) -> Step:
    """A PyTorch GPT as a step function, with its KV cache (the fair comparison to the ONNX graph)."""
    import torch

    model.eval()

    @torch.no_grad()
    def step(ids, positions, past):
        out = model(
            torch.from_numpy(ids),
            positions=torch.from_numpy(np.ascontiguousarray(positions)),
            past_kv=past,
            use_cache=True,
        )
        return out.logits.float().numpy(), out.past_kv

    return step
