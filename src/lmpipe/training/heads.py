"""Transfer learning: linear classification heads on the frozen pretrained GPT (`sft.method=head`).

Each label task (testament, book, ...) gets one linear head over the GPT's final hidden state at the last
prompt token (`<|assistant|>`, where the answer would begin), standardised with training-set statistics.
`save_heads` writes the heads beside the unchanged GPT of an sft model directory (`heads.pt` next to
`model.pt`); `load_head_classifier` reads such a directory back as a `HeadClassifier`, which turns prompts into
label probabilities. Evaluation uses it, so this module does not import Lightning.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lmpipe.atomic import atomic_path
from lmpipe.chat import load_chat_template
from lmpipe.errors import LmpipeError
from lmpipe.formats import HEADS_FILE, MODEL_FILE, PAD, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from lmpipe.model import GPT, load_model
from lmpipe.tokenizer import load_tokenizer
from lmpipe.training.sft_data import Row, collate


def last_prompt_hidden(model: GPT, input_ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """(B, n_embd) final hidden states at index `last` of each row (the `<|assistant|>` token of a prompt)."""
    hidden = model(input_ids).hidden
    return hidden[torch.arange(len(last), device=hidden.device), last]


class ClassificationHeads(nn.ModuleDict):
    """One nn.Linear(n_embd, n_labels) per task, numbered in the order of `sizes`, over standardised features.

    The frozen GPT's states at `<|assistant|>` share a large common component (the token's own embedding) and
    differ from prompt to prompt only in a small remainder; a linear head trained on them raw spends its steps
    on that offset and learns slowly (the usual ill-conditioning of linear probes). So features are first
    standardised per channel with the mean and std of the training examples (`set_feature_stats`: fixed,
    since the GPT is frozen; saved with the heads).
    """

    def __init__(self, n_embd: int, sizes: dict[str, int], seed: int = 0):
        super().__init__({task: nn.Linear(n_embd, n) for task, n in sizes.items()})
        self.register_buffer("feature_mean", torch.zeros(n_embd))
        self.register_buffer("feature_std", torch.ones(n_embd))
        generator = torch.Generator().manual_seed(seed)
        for head in self.values():  # as the GPT initialises its own Linear layers, but seeded explicitly
            nn.init.normal_(head.weight, mean=0.0, std=0.02, generator=generator)
            nn.init.zeros_(head.bias)

    @torch.no_grad()
    def set_feature_stats(self, features: torch.Tensor) -> None:
        """Standardise with the per-channel mean and std of `features` (N, n_embd) from now on."""
        self.feature_mean.copy_(features.mean(dim=0))
        self.feature_std.copy_(features.std(dim=0).clamp_min(1e-5))

    def logits(self, task: str, features: torch.Tensor) -> torch.Tensor:
        """(N, n_labels) logits of `task`'s head for (N, n_embd) features."""
        return self[task]((features - self.feature_mean) / self.feature_std)

    def loss(
        self, features: torch.Tensor, task: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy, accuracy) over a batch mixing tasks: row i is scored by head task[i] over that
        task's labels only."""
        total = features.new_zeros((), dtype=torch.float32)
        correct = features.new_zeros((), dtype=torch.float32)
        for i, name in enumerate(self.keys()):
            rows = task == i
            logits = self.logits(name, features[rows]).float()
            total = total + F.cross_entropy(logits, label[rows], reduction="sum")
            correct = correct + (logits.argmax(dim=-1) == label[rows]).sum()
        return total / len(label), correct / len(label)


@torch.no_grad()
def prompt_features(model: GPT, rows: list[Row], pad_id: int, limit: int = 4096, batch_size: int = 64):
    """(N, n_embd) hidden states at the last prompt token of up to `limit` rows, evenly spread over `rows`."""
    picks = np.unique(np.linspace(0, len(rows) - 1, min(limit, len(rows))).round().astype(int))
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(picks), batch_size):
        batch = collate([rows[i] for i in picks[start : start + batch_size]], pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        out.append(last_prompt_hidden(model, batch["input_ids"], batch["last"]).float())
    model.train(was_training)
    return torch.cat(out)


class HeadClassifier:
    """Label probabilities for prompts: the frozen GPT's hidden state at `<|assistant|>`, then a task's head."""

    def __init__(
        self,
        model: GPT,
        heads: ClassificationHeads,
        tokenizer,
        template: str,
        label_sets: dict[str, list[str]],
        batch_size: int = 64,
    ):
        for task, head in heads.items():
            if len(label_sets.get(task, ())) != head.out_features:
                raise LmpipeError(
                    f"classification head {task!r} has {head.out_features} outputs but the label set has "
                    f"{len(label_sets.get(task, ()))} labels"
                )
        self.model, self.heads, self.tokenizer, self.template = model, heads, tokenizer, template
        self.label_sets, self.batch_size = label_sets, batch_size
        self.pad_id = tokenizer.token_to_id(PAD)

    @torch.no_grad()
    def predict_proba(self, task: str, prompts: list[str]) -> np.ndarray:
        """(N, n_labels) softmax probabilities, columns in the order of `label_sets[task]`.

        A prompt longer than the context keeps its last block_size tokens (the end, where the answer starts).
        """
        from lmpipe.data.instructions import encode_prompt

        if task not in self.heads:
            raise LmpipeError(f"task {task!r}: no classification head (heads: {', '.join(self.heads)})")
        self.model.eval()
        self.heads.eval()
        n_labels = self.heads[task].out_features
        device = next(self.model.parameters()).device
        block = self.model.config.block_size
        out = [np.zeros((0, n_labels), dtype=np.float32)]
        for start in range(0, len(prompts), self.batch_size):
            rows = []
            for prompt in prompts[start : start + self.batch_size]:
                ids = encode_prompt(self.tokenizer, self.template, prompt)[-block:]
                rows.append({"input_ids": np.asarray(ids, dtype=np.int64), "last": len(ids) - 1})
            batch = {k: v.to(device) for k, v in collate(rows, self.pad_id).items()}
            features = last_prompt_hidden(self.model, batch["input_ids"], batch["last"])
            out.append(F.softmax(self.heads.logits(task, features).float(), dim=-1).cpu().numpy())
        return np.concatenate(out)

    def predict(self, task: str, prompts: list[str]) -> list[str]:
        """The most probable label of each prompt."""
        labels = self.label_sets[task]
        return [labels[i] for i in self.predict_proba(task, prompts).argmax(axis=1)]


# --- On disk -----------------------------------------------------------------------------------------------


def save_heads(
    path: str | os.PathLike, heads_state: dict, label_sets: dict[str, list[str]], n_embd: int
) -> None:
    """Atomically save a ClassificationHeads state dict with the label set of each head (task -> labels, in
    the order of the heads' outputs) and the feature width they read."""
    payload = {
        "state": {name: tensor.detach().cpu() for name, tensor in heads_state.items()},
        "label_sets": {task: list(labels) for task, labels in label_sets.items()},
        "n_embd": int(n_embd),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_heads(path: Path) -> tuple[ClassificationHeads, dict[str, list[str]]]:
    """The heads saved by `save_heads` (on CPU, in eval mode) and their label sets."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's messages here span many lines; the exception type says enough
        raise LmpipeError(f"{path}: not a readable torch file ({type(exc).__name__})") from exc
    try:
        label_sets = {
            str(task): [str(label) for label in labels] for task, labels in payload["label_sets"].items()
        }
        heads = ClassificationHeads(
            int(payload["n_embd"]), {task: len(labels) for task, labels in label_sets.items()}
        )
        heads.load_state_dict(payload["state"])
    except Exception as exc:  # missing keys, mismatched shapes, a different kind of file
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        raise LmpipeError(f"{path}: not a lmpipe classification heads file ({reason})") from exc
    return heads.eval(), label_sets


def load_head_classifier(model_dir: str | os.PathLike) -> HeadClassifier:
    """The classifier of an sft model directory trained with sft.method=head: the frozen GPT (`model.pt`),
    its heads (`heads.pt`), the tokenizer and the chat template; on CPU, in eval mode."""
    model_dir = Path(model_dir)
    # Checked up front so that the message fits a model directory (the loaders' own hints name earlier stages).
    for name in (MODEL_FILE, HEADS_FILE, TOKENIZER_FILE, TOKENIZER_CONFIG_FILE):
        if not (model_dir / name).is_file():
            raise LmpipeError(
                f"missing {model_dir / name}: expected a model directory of the sft stage with sft.method=head "
                f"({MODEL_FILE}, {HEADS_FILE}, {TOKENIZER_FILE}, {TOKENIZER_CONFIG_FILE})"
            )
    model, _ = load_model(model_dir / MODEL_FILE)
    heads, label_sets = _load_heads(model_dir / HEADS_FILE)
    n_embd = heads.feature_mean.numel()
    if n_embd != model.config.n_embd:
        raise LmpipeError(
            f"{model_dir / HEADS_FILE}: the heads read {n_embd} features but {model_dir / MODEL_FILE} has "
            f"n_embd {model.config.n_embd}; expected the heads trained on this model"
        )
    tokenizer = load_tokenizer(model_dir / TOKENIZER_FILE)
    return HeadClassifier(model, heads, tokenizer, load_chat_template(model_dir), label_sets)
