"""How a language model answers evaluation questions: label probabilities, choice log-likelihoods, generation.

All the logic lives in `Scorer`, built on primitives that any runtime can provide: `_forward` (logits for a
batch of token ids, continuing a cache), `_expand_past` (repeat a batch-1 cache), and for batched generation
`_masked_forward` (the same with explicit positions and a padding mask) and `_select_past` (keep some rows of
a cache). `TorchScorer` implements them for `lmpipe.model.GPT`; an ONNX Runtime scorer only needs the same
methods, so both runtimes score identically by construction.

Every question is chat-formatted with the model's template, and an answer is its text followed by `END`
("<|end|>"), exactly as fine-tuned models learned to write it. Scoring the closing `END` is what keeps a
label that is a prefix of another ("Gen" / "Genesis") from collecting the longer label's probability.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from lmpipe.chat import CHAT_TEMPLATE, prompt_text
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, EOT, PAD


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 so that sums over many tokens lose nothing."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def parse_answer(text: str) -> str:
    """The answer in generated text: everything before the first "<|end|>", then its first non-blank line,
    stripped (a model that rambles past its answer is judged on the answer alone)."""
    lines = text.split(END, 1)[0].strip().splitlines()
    return lines[0].strip() if lines else ""


class Scorer(ABC):
    """Scores and generates answers with a causal LM; subclasses provide `_forward` and `_expand_past`.

    Subclasses set `block_size` (the longest sequence the model reads), `tokenizer` (a lmpipe tokenizer
    with its special tokens) and `template` (the chat template), by calling `Scorer.__init__`.
    """

    max_batch: int = 16
    """Most continuations fed in one batch; more are scored in chunks, each reusing the prompt's cache."""

    def __init__(self, tokenizer: Tokenizer, template: str, block_size: int):
        self.tokenizer, self.template, self.block_size = tokenizer, template, block_size
        ids = {token: tokenizer.token_to_id(token) for token in (END, EOT, PAD)}
        missing = [token for token, token_id in ids.items() if token_id is None]
        if missing:
            raise LmpipeError(
                f"tokenizer has no {', '.join(missing)} token: expected a tokenizer trained by lmpipe"
            )
        self.end_id, self.eot_id, self.pad_id = ids[END], ids[EOT], ids[PAD]

    @abstractmethod
    def _forward(self, ids: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        """Logits (B, T, V) float32 for ids (B, T) int64 read after `past` (None: empty), and the new past."""

    @abstractmethod
    def _expand_past(self, past: Any, n: int) -> Any:
        """A batch-1 past repeated n times along the batch axis."""

    @abstractmethod
    def _masked_forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        """`_forward` with explicit positions (B, T) and an attention mask (B, past + T), 0 on padding keys."""

    @abstractmethod
    def _select_past(self, past: Any, rows: np.ndarray) -> Any:
        """The past of the batch rows `rows` only."""

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it (e.g. "<|end|>") become their single ids."""
        return self.tokenizer.encode(text).ids

    def fits(self, prompt: str, answer_room: int) -> bool:
        """Whether the chat-formatted prompt leaves `answer_room` tokens within block_size."""
        return len(self.encode(prompt_text(prompt, self.template))) + answer_room <= self.block_size

    def _prompt_ids(self, prompt: str, answer_room: int) -> list[int]:
        """Token ids of the chat-formatted prompt, checked to leave `answer_room` tokens of context."""
        ids = self.encode(prompt_text(prompt, self.template))
        if len(ids) + answer_room > self.block_size:
            raise LmpipeError(
                f"prompt of {len(ids)} tokens + {answer_room} answer tokens exceeds "
                f"block_size={self.block_size}: shorten the prompt ({prompt[:60]!r}...)"
            )
        return ids

    def _answer_ids(self, texts: list[str]) -> list[list[int]]:
        """Each answer text as the model writes it: its tokens, then END."""
        if not texts:
            raise LmpipeError("no answers to score: expected at least one label or choice")
        return [self.encode(text) + [self.end_id] for text in texts]

    def continuation_logprobs(self, prompt_ids: list[int], continuations: list[list[int]]) -> np.ndarray:
        """Summed log-probability (nats, float64) of each continuation right after `prompt_ids`.

        The prompt is read once; its cache is then shared by all continuations, fed right-padded in batches
        of up to `max_batch`, shortest first. Padding after a row's real tokens cannot change them under
        causal attention, and only real positions are scored. A continuation's first token is predicted by
        the prompt's last logit.
        """
        if not prompt_ids:
            raise LmpipeError("prompt_ids is empty: expected at least one token to condition on")
        empty = [i for i, c in enumerate(continuations) if not c]
        if empty:
            raise LmpipeError(f"continuation {empty[0]} is empty: expected at least one token each")
        longest = max((len(c) for c in continuations), default=0)
        # The last token of a continuation is only predicted, never fed.
        if len(prompt_ids) + longest - 1 > self.block_size:
            raise LmpipeError(
                f"prompt of {len(prompt_ids)} tokens + continuation of {longest} tokens needs "
                f"{len(prompt_ids) + longest - 1} positions: exceeds block_size={self.block_size}"
            )
        logits, past = self._forward(np.asarray([prompt_ids], dtype=np.int64), None)
        first = log_softmax(logits[0, -1])  # (V,): predicts every continuation's first token
        scores = np.array([first[c[0]] for c in continuations], dtype=np.float64)
        # Shortest first, so each batch pads its rows to a similar length (66 book titles: 2-8 tokens).
        order = sorted(range(len(continuations)), key=lambda i: len(continuations[i]))
        for start in range(0, len(order), self.max_batch):
            rows = order[start : start + self.max_batch]
            width = len(continuations[rows[-1]]) - 1  # the last token is only predicted, never fed
            if width == 0:  # single-token continuations: the prompt's logit was all they needed
                continue
            ids = np.full((len(rows), width), self.pad_id, dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, : len(continuations[i]) - 1] = continuations[i][:-1]
            step_logits, _ = self._forward(ids, self._expand_past(past, len(rows)))
            logp = log_softmax(step_logits)  # (rows, width, V): position t predicts token t + 1
            for r, i in enumerate(rows):
                c = continuations[i]
                scores[i] += logp[r, np.arange(len(c) - 1), c[1:]].sum()
        return scores

    def choice_logliks(self, question: str, choices: list[str]) -> np.ndarray:
        """Log-likelihood of each choice (its text, then END) as the answer to the chat-formatted question,
        as lm-evaluation-harness scores multiple choice (the argmax is the model's pick)."""
        answers = self._answer_ids(choices)
        prompt_ids = self._prompt_ids(question, max(map(len, answers)) - 1)
        return self.continuation_logprobs(prompt_ids, answers)

    def label_probs(self, prompts: list[str], labels: list[str]) -> np.ndarray:
        """(N, L) probabilities over `labels` for each prompt: the log-likelihood of each label (then END) as
        the answer, softmax-normalised over the label set so every row sums to 1."""
        answers = self._answer_ids(labels)
        room = max(map(len, answers)) - 1
        probs = np.empty((len(prompts), len(labels)), dtype=np.float64)
        for i, prompt in enumerate(prompts):
            logliks = self.continuation_logprobs(self._prompt_ids(prompt, room), answers)
            weights = np.exp(logliks - logliks.max())
            probs[i] = weights / weights.sum()
        return probs

    def generate(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        """Greedy answers to chat-formatted prompts, each ending at END, EOT or max_new_tokens, decoded
        without special tokens. `max_batch` prompts of similar length decode together, left-padded and masked:
        one forward per new token for the batch, not for every prompt."""
        if max_new_tokens < 1:
            raise LmpipeError(f"max_new_tokens={max_new_tokens}: expected at least 1")
        ids = [self._prompt_ids(prompt, max_new_tokens - 1) for prompt in prompts]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        answers = [""] * len(ids)
        for start in range(0, len(order), self.max_batch):
            rows = order[start : start + self.max_batch]
            for i, tokens in zip(rows, self._greedy([ids[i] for i in rows], max_new_tokens), strict=True):
                answers[i] = self.tokenizer.decode(tokens, skip_special_tokens=True)
        return answers

    def _greedy(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """Greedy new tokens of each prompt (ids), decoded together; a row leaves the batch when it ends."""
        width = max(map(len, prompts))
        ids = np.full((len(prompts), width), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, prompt in enumerate(prompts):
            ids[row, width - len(prompt) :], mask[row, width - len(prompt) :] = prompt, 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        logits, past = self._masked_forward(ids, positions, mask, None)
        generated: list[list[int]] = [[] for _ in prompts]
        active, next_pos = np.arange(len(prompts)), positions[:, -1:] + 1
        while True:
            tokens = logits[:, -1].argmax(axis=-1).astype(np.int64)
            keep = []
            for r, (row, token) in enumerate(zip(active.tolist(), tokens.tolist(), strict=True)):
                if token in (self.end_id, self.eot_id):
                    continue
                generated[row].append(token)
                if len(generated[row]) < max_new_tokens:
                    keep.append(r)
            if not keep:
                return generated
            if len(keep) < len(active):
                kept = np.asarray(keep)
                active, tokens, mask, next_pos = active[kept], tokens[kept], mask[kept], next_pos[kept]
                past = self._select_past(past, kept)
            mask = np.concatenate((mask, np.ones((len(active), 1), dtype=np.int64)), axis=1)
            logits, past = self._masked_forward(tokens[:, None], next_pos, mask, past)
            next_pos = next_pos + 1


class TorchScorer(Scorer):
    """A `Scorer` over a `lmpipe.model.GPT`, which it puts in eval mode and float32 (in place)."""

    def __init__(self, model, tokenizer: Tokenizer, template: str = CHAT_TEMPLATE, device: str = "cpu"):
        super().__init__(tokenizer, template, model.config.block_size)
        if tokenizer.get_vocab_size() > model.config.vocab_size:
            raise LmpipeError(
                f"tokenizer has {tokenizer.get_vocab_size()} tokens but model.vocab_size="
                f"{model.config.vocab_size}: expected the tokenizer the model was trained with"
            )
        import torch

        self.model, self.device = model.to(device=device, dtype=torch.float32).eval(), device

    def _forward(self, ids: np.ndarray, past: Any) -> tuple[np.ndarray, Any]:
        import torch

        with torch.no_grad():
            out = self.model(torch.from_numpy(ids).to(self.device), past_kv=past, use_cache=True)
        return out.logits.float().cpu().numpy(), out.past_kv

    def _expand_past(self, past: Any, n: int) -> Any:
        # expand is a view: the shared prompt cache is not copied n times.
        return tuple((k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in past)

    def _masked_forward(
        self, ids: np.ndarray, positions: np.ndarray, mask: np.ndarray, past: Any
    ) -> tuple[np.ndarray, Any]:
        import torch

        with torch.no_grad():
            out = self.model(
                torch.from_numpy(ids).to(self.device),
                positions=torch.from_numpy(np.ascontiguousarray(positions)).to(self.device),
                past_kv=past,
                attention_mask=torch.from_numpy(mask).to(self.device),
                use_cache=True,
            )
        return out.logits.float().cpu().numpy(), out.past_kv

    def _select_past(self, past: Any, rows: np.ndarray) -> Any:
        index = np.ascontiguousarray(rows)
        return tuple((k[index], v[index]) for k, v in past)
