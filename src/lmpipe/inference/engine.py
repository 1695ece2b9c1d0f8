"""Generate text with an exported model (see `lmpipe.export`) on ONNX Runtime, without torch.

A batch of prompts is left-padded with PAD so every row's last prompt token sits in the last column; the
attention mask hides the padding and position ids count only a row's real tokens, so a row generates exactly
what it would alone. The prompts are prefilled in one call, then each step feeds one token per unfinished row
with the cache. A row that finishes is dropped from the batch (its cache rows too), so the others never pay
for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from lmpipe.chat import load_chat_template, prompt_text
from lmpipe.errors import LmpipeError
from lmpipe.formats import ONNX_FILE, TOKENIZER_FILE
from lmpipe.inference.onnx_dir import read_onnx_config
from lmpipe.inference.sampling import GenerationParams, sample_next
from lmpipe.tokenizer import load_tokenizer

_REPLACEMENT = "\ufffd"
"""What the byte-level decoder shows for the incomplete UTF-8 bytes of a character split across tokens."""

Past = list[tuple[np.ndarray, np.ndarray]]
"""Per layer (key, value), each (B, n_head, past_len, head_dim) float32."""


@dataclass
class Completion:
    text: str
    """The generated text, without special tokens and cut before a stop sequence."""
    token_ids: list[int]
    """Generated token ids (the closing <|end|> or EOT not included; tokens of a stop sequence are)."""
    finish_reason: str
    """"stop" (<|end|>, EOT or a stop sequence) or "length" (max_new_tokens reached)."""
    prompt_tokens: int
    """Tokens in the prompt as the model read it (after the chat template)."""
    completion_tokens: int
    """Tokens generated (len(token_ids))."""


class Delta(NamedTuple):
    """One piece of a streamed completion."""

    text: str
    """New text (may be empty: the last delta carries the finish reason, whatever is left to send)."""
    finish_reason: str | None
    """None until the last delta, then "stop" or "length" as in `Completion`."""


class OrtEngine:
    """An ONNX export directory loaded into an ONNX Runtime CPU session, with its tokenizer and chat template.

    threads: intra-op threads (0 = ONNX Runtime's default, one per core). Tiny models decode faster on one.
    """

    def __init__(self, model_dir: str | Path, threads: int = 0):
        import onnxruntime as ort

        model_dir = Path(model_dir)
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 0:
            raise LmpipeError(f"threads={threads!r}: expected an integer >= 0 (0 = ONNX Runtime's default)")
        onnx_path = model_dir / ONNX_FILE
        self._config = config = read_onnx_config(model_dir)
        self._tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE)
        self._template = load_chat_template(model_dir)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its warnings about pruned initializers are noise here
        try:
            self._session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # ORT raises its own types for unreadable or invalid graphs
            reason = " ".join(str(exc).split())[:300]
            raise LmpipeError(f"{onnx_path}: ONNX Runtime cannot load it ({reason})") from exc
        self._inputs, self._outputs = config["input_names"], config["output_names"]
        self._stop_ids = {config["end_id"], config["eot_id"]}

    @property
    def config(self) -> dict[str, Any]:
        """config.json of the export (model shape, io names, special-token ids, variant)."""
        return self._config

    @property
    def tokenizer(self):
        """The `tokenizers.Tokenizer` the model was trained with."""
        return self._tokenizer

    @property
    def template(self) -> str:
        """The chat template (Jinja) saved beside the tokenizer."""
        return self._template

    @property
    def block_size(self) -> int:
        return self._config["block_size"]

    @property
    def vocab_size(self) -> int:
        return self._config["vocab_size"]

    @property
    def name(self) -> str:
        """The variant name recorded at export."""
        return self._config["variant"]

    def forward(
        self,
        ids: np.ndarray,
        positions: np.ndarray,
        attention_mask: np.ndarray,
        past: Past | None = None,
    ) -> tuple[np.ndarray, Past]:
        """Logits (B, T, V) float32 for ids (B, T) at `positions` (B, T), reading after `past` (None: empty),
        with `attention_mask` (B, past_len + T) 1 for real tokens; and the past extended by these tokens."""
        cfg = self._config
        if past is None:
            empty = np.zeros((ids.shape[0], cfg["n_head"], 0, cfg["head_dim"]), dtype=np.float32)
            past = [(empty, empty)] * cfg["n_layer"]
        arrays = [ids, positions, attention_mask]
        feeds = {
            name: np.ascontiguousarray(a, dtype=np.int64)
            for name, a in zip(self._inputs[:3], arrays, strict=True)
        }
        for i, (k, v) in enumerate(past):
            feeds[self._inputs[3 + 2 * i]] = k
            feeds[self._inputs[4 + 2 * i]] = v
        out = self._session.run(self._outputs, feeds)
        return out[0], [(out[1 + 2 * i], out[2 + 2 * i]) for i in range(cfg["n_layer"])]

    def encode_prompt(self, prompt: str, chat: bool = True) -> list[int]:
        """Token ids the model reads for `prompt`: chat-formatted with the template, or the raw text."""
        if not isinstance(prompt, str) or not prompt:
            raise LmpipeError(f"prompt {prompt!r}: expected non-empty text")
        text = prompt_text(prompt, self._template) if chat else prompt
        return self._tokenizer.encode(text).ids

    def generate(self, prompts: list[str], params: GenerationParams, chat: bool = True) -> list[Completion]:
        """Complete each prompt (batched together); `chat` formats them with the chat template first."""
        sequences = self._run([self.encode_prompt(p, chat) for p in prompts], params, track_text=False)
        return [
            Completion(
                text=seq.text,
                token_ids=seq.token_ids,
                finish_reason=seq.finish_reason,
                prompt_tokens=len(seq.prompt_ids),
                completion_tokens=len(seq.token_ids),
            )
            for seq in sequences
        ]

    def generate_ids(self, prompt_ids: list[list[int]], params: GenerationParams) -> list[list[int]]:
        """Generated token ids for each prompt given as token ids (same stopping rules as `generate`)."""
        return [seq.token_ids for seq in self._run(prompt_ids, params, track_text=False)]

    def stream(self, prompt: str, params: GenerationParams, chat: bool = True) -> Iterator[Delta]:
        """Yield the completion of one prompt as text deltas, as tokens are generated; the last one carries
        the finish reason (and whatever text was held back, possibly none).

        Text is held back while it ends in an incomplete character or could be the start of a stop
        sequence; the deltas concatenate to `generate`'s text for the same prompt and params.
        """
        sequences = [self._sequence(self.encode_prompt(prompt, chat), params, track_text=True)]
        self._check_room(sequences, params)
        seq, sent = sequences[0], 0
        for _ in self._steps(sequences, params):
            if seq.finish_reason is None:
                stable = _stable_length(seq.text, params.stop)
                if stable > sent:
                    yield Delta(seq.text[sent:stable], None)
                    sent = stable
        yield Delta(seq.text[sent:], seq.finish_reason)

    def _run(
        self, prompt_ids: list[list[int]], params: GenerationParams, track_text: bool
    ) -> list[_Sequence]:
        sequences = [self._sequence(list(ids), params, track_text) for ids in prompt_ids]
        self._check_room(sequences, params)
        for _ in self._steps(sequences, params):
            pass
        return sequences

    def _sequence(self, prompt_ids: list[int], params: GenerationParams, track_text: bool) -> _Sequence:
        return _Sequence(prompt_ids, self._tokenizer, self._stop_ids, params, track_text)

    def _check_room(self, sequences: list[_Sequence], params: GenerationParams) -> None:
        for i, seq in enumerate(sequences):
            if not seq.prompt_ids:
                raise LmpipeError(f"prompt {i} has no tokens: expected at least one")
            if len(seq.prompt_ids) + params.max_new_tokens > self.block_size:
                raise LmpipeError(
                    f"prompt {i} of {len(seq.prompt_ids)} tokens + max_new_tokens={params.max_new_tokens} "
                    f"exceeds block_size={self.block_size}: shorten the prompt or lower max_new_tokens"
                )

    def _steps(self, sequences: list[_Sequence], params: GenerationParams) -> Iterator[None]:
        """Generate for all sequences together, yielding after each step's tokens have been pushed."""
        if not sequences:
            return
        rng = np.random.default_rng(params.seed)
        width = max(len(seq.prompt_ids) for seq in sequences)
        ids = np.full((len(sequences), width), self._config["pad_id"], dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq.prompt_ids) :] = seq.prompt_ids
            mask[row, width - len(seq.prompt_ids) :] = 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        logits, past = self.forward(ids, positions, mask, None)
        active = np.arange(len(sequences))  # batch row -> index into sequences
        next_pos = positions[:, -1:] + 1
        while True:
            tokens = sample_next(logits[:, -1], params, rng)
            for row, token in zip(active, tokens.tolist(), strict=True):
                sequences[row].push(token)
            yield
            keep = np.array([sequences[row].finish_reason is None for row in active])
            if not keep.any():
                return
            if not keep.all():
                active, tokens, mask, next_pos = active[keep], tokens[keep], mask[keep], next_pos[keep]
                past = [(k[keep], v[keep]) for k, v in past]
            mask = np.concatenate((mask, np.ones((len(active), 1), dtype=np.int64)), axis=1)
            logits, past = self.forward(tokens[:, None], next_pos, mask, past)
            next_pos = next_pos + 1


class _Sequence:
    """One prompt's generation: the tokens so far, their text, and why it ended (None while running).

    With track_text (streaming, or stop sequences given) the text is decoded after every token; otherwise
    only when asked for, once generation is over.
    """

    def __init__(
        self, prompt_ids: list[int], tokenizer, end_ids: set[int], params: GenerationParams, track_text: bool
    ):
        self.prompt_ids = prompt_ids
        self.token_ids: list[int] = []
        self.finish_reason: str | None = None
        self._tokenizer, self._end_ids = tokenizer, end_ids
        self._stop, self._max_new = params.stop, params.max_new_tokens
        self._track_text = track_text or bool(params.stop)
        self._text = ""

    @property
    def text(self) -> str:
        return self._text if self._track_text else self._decode()

    def _decode(self) -> str:
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=True)

    def push(self, token: int) -> None:
        if token in self._end_ids:
            self.finish_reason = "stop"
            return
        self.token_ids.append(token)
        if self._track_text:
            self._text = self._decode()
            cut = min((i for s in self._stop if (i := self._text.find(s)) >= 0), default=-1)
            if cut >= 0:
                self._text = self._text[:cut]
                self.finish_reason = "stop"
                return
        if len(self.token_ids) == self._max_new:
            self.finish_reason = "length"


def _stable_length(text: str, stops: list[str]) -> int:
    """How much of `text` can no longer change: all but a trailing incomplete character and the longest
    tail that could still grow into a stop sequence."""
    end = len(text.rstrip(_REPLACEMENT))
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, end), hold, -1):
            if text.endswith(stop[:k], 0, end):
                hold = k
                break
    return end - hold
