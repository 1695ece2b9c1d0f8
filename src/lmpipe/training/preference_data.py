"""Preference pairs as training batches, for the reward model and DPO, and the model loading they share.

A pair becomes two token sequences, prompt + chosen + `<|end|>` and prompt + rejected + `<|end|>`, encoded
like fine-tuning examples (the prompt through the chat template, the response separately, so the response
boundary is exact). A batch of B pairs is one right-padded (2B, T) tensor, the chosen sequences first, with
each sequence's length and prompt length, and each pair's task and kind of negative as indices into the data
module's `tasks` and `kinds`, so metrics can be split by them. Training batches are drawn at random,
reproducibly across a resume (`lmpipe.training.streams`), as in SFT.
"""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from lmpipe.chat import load_chat_template
from lmpipe.data.instructions import encode_prompt
from lmpipe.data.preferences import PAIR_SPLITS, read_pairs
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, MODEL_FILE, PAD, TOKENIZER_FILE
from lmpipe.model import GPT, load_model
from lmpipe.text_samples import answer_samples
from lmpipe.tokenizer import load_tokenizer, tokenizer_hash
from lmpipe.training.datamodules import ResumableBatches
from lmpipe.training.streams import BatchStream, StreamSpec


def load_policy_pair(models_dir: Path, policy: str, reference: str, section: str):
    """(policy GPT, frozen reference GPT, tokenizer, chat template, policy dir) after checking that the
    reference reads the policy's token ids and template (one-line error naming `<section>.reference`)."""
    policy_dir, reference_dir = models_dir / policy, models_dir / reference
    model, _ = load_model(policy_dir / MODEL_FILE)
    ref, _ = load_model(reference_dir / MODEL_FILE)
    if tokenizer_hash(reference_dir / TOKENIZER_FILE) != tokenizer_hash(policy_dir / TOKENIZER_FILE):
        raise LmpipeError(
            f"{section}.reference={reference!r}: its tokenizer ({reference_dir / TOKENIZER_FILE}) differs from "
            f"the policy's ({policy_dir / TOKENIZER_FILE}); expected the same tokenizer"
        )
    if load_chat_template(reference_dir) != load_chat_template(policy_dir) or (
        ref.config.vocab_size != model.config.vocab_size
    ):
        raise LmpipeError(
            f"{section}.reference={reference!r}: its chat template or vocabulary differs from the policy's "
            f"({policy_dir}); expected the same"
        )
    tokenizer = load_tokenizer(policy_dir / TOKENIZER_FILE)
    return model, ref.eval().requires_grad_(False), tokenizer, load_chat_template(policy_dir), policy_dir


def pad_id_of(tokenizer, where: Path) -> int:
    pad_id = tokenizer.token_to_id(PAD)
    if pad_id is None:
        raise LmpipeError(f"{where / TOKENIZER_FILE}: no {PAD} token; expected an lmpipe tokenizer")
    return pad_id


def encode_pairs(
    pairs: list[dict], tokenizer, template: str, tasks: list[str], kinds: list[str]
) -> list[dict]:
    """One row per pair: chosen and rejected id arrays, the prompt length, task and kind indices."""
    rows = []
    for pair in pairs:
        prompt = encode_prompt(tokenizer, template, pair["prompt"])
        rows.append(
            {
                "chosen": np.asarray(prompt + tokenizer.encode(pair["chosen"] + END).ids, dtype=np.int64),
                "rejected": np.asarray(prompt + tokenizer.encode(pair["rejected"] + END).ids, dtype=np.int64),
                "prompt_length": len(prompt),
                "task": tasks.index(pair["task"]),
                "kind": kinds.index(pair["kind"]),
            }
        )
    return rows


def load_pair_rows(directory, tokenizer, template: str) -> tuple[dict, dict, list[str], list[str]]:
    """(pairs per split, their encoded rows per split, task names, kind names) of a preferences directory."""
    pairs = {split: read_pairs(directory, split) for split in PAIR_SPLITS}
    tasks = sorted({p["task"] for part in pairs.values() for p in part})
    kinds = sorted({p["kind"] for part in pairs.values() for p in part})
    rows = {split: encode_pairs(part, tokenizer, template, tasks, kinds) for split, part in pairs.items()}
    return pairs, rows, tasks, kinds


def pair_samples(
    model: GPT, tokenizer, template: str, pairs: list[dict], n: int, tokens: int, seed: int
) -> list[dict]:
    """The model's answers to up to `n` of the pairs' prompts, with the chosen response as the reference."""
    examples = pd.DataFrame(
        {"prompt": [p["prompt"] for p in pairs], "response": [p["chosen"] for p in pairs]}
    )
    return answer_samples(model, tokenizer, template, examples, n, tokens, seed)


def collate_pairs(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """(2B, T) right-padded ids (chosen rows first), their lengths and prompt lengths, (B,) task and kind."""
    sequences = [row["chosen"] for row in rows] + [row["rejected"] for row in rows]
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.from_numpy(s)
    prompt_lengths = torch.tensor([row["prompt_length"] for row in rows] * 2)
    return {
        "input_ids": ids,
        "lengths": torch.tensor([len(s) for s in sequences]),
        "prompt_lengths": prompt_lengths,
        "task": torch.tensor([row["task"] for row in rows]),
        "kind": torch.tensor([row["kind"] for row in rows]),
    }


class RandomPairBatches(BatchStream):
    def __init__(self, rows: list[dict], batch_size: int, pad_id: int, spec: StreamSpec):
        super().__init__(spec)
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        picks = self.rng(index).integers(0, len(self.rows), size=self.batch_size)
        return collate_pairs([self.rows[i] for i in picks], self.pad_id)


def pair_batches(rows: list[dict], batch_size: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Every row once, in order, in batches of `batch_size` (for validation and test metrics)."""
    return [collate_pairs(rows[i : i + batch_size], pad_id) for i in range(0, len(rows), batch_size)]


class PairDataModule(ResumableBatches, L.LightningDataModule):
    """Random training batches of pairs and fixed validation batches (in one seeded order, so the first
    `limit_val_batches` cover every task); resumable."""

    def __init__(self, train: list[dict], val: list[dict], batch_size: int, seed: int, pad_id: int):
        super().__init__()
        if not train or not val:
            raise LmpipeError(
                f"post-training needs train and val pairs: got {len(train)} train, {len(val)} val"
            )
        self.train_rows = train
        self.val_rows = [val[i] for i in np.random.default_rng(seed).permutation(len(val))]
        self.batch_size, self.seed, self.pad_id = batch_size, seed, pad_id

    def train_dataloader(self) -> DataLoader:
        per_epoch = max(1, math.ceil(len(self.train_rows) / (self.batch_size * self.world_size)))
        spec = self.stream_spec(self.seed, per_epoch)
        return self.loader(RandomPairBatches(self.train_rows, self.batch_size, self.pad_id, spec))

    def val_dataloader(self) -> DataLoader:
        return self.loader(pair_batches(self.val_rows, self.batch_size, self.pad_id), batch_size=None)


def grouped_accuracy(
    correct: torch.Tensor, task: torch.Tensor, kind: torch.Tensor, tasks: list[str], kinds: list[str]
) -> dict:
    """Pairwise accuracy overall, per task, per kind and per (task, kind), with the pair counts."""

    def summary(mask: torch.Tensor) -> dict:
        n = int(mask.sum())
        return {"accuracy": float(correct[mask].float().mean()) if n else None, "pairs": n}

    everything = torch.ones_like(correct, dtype=torch.bool)
    result = {"overall": summary(everything), "per_task": {}, "per_kind": {}, "per_task_kind": {}}
    for k, name in enumerate(kinds):
        if (kind == k).any():
            result["per_kind"][name] = summary(kind == k)
    for t, task_name in enumerate(tasks):
        if not (task == t).any():
            continue
        result["per_task"][task_name] = summary(task == t)
        result["per_task_kind"][task_name] = {
            name: summary((task == t) & (kind == k))
            for k, name in enumerate(kinds)
            if ((task == t) & (kind == k)).any()
        }
    return result


class EagerLoss:
    """Mixin for a TrainingModule whose loss runs eagerly whatever `perf.compile` says: the post-training
    batches are padded to their longest pair or sample (a new shape nearly every step, so a compiled loss
    would keep recompiling), the stages run ~100 steps (less than compiling costs cold), and the RL loss
    samples from the model inside it."""

    fixed_shapes = False


class FrozenOutOfCheckpoints:
    """Mixin for a TrainingModule with frozen modules at the attributes `frozen_attributes` (a reference model,
    a reward model): they stay in eval mode, out of the checkpoints (their weights are pinned by the
    fingerprint and read from their model directories), and on resume their current weights stand in, so the
    strict state-dict load still matches."""

    frozen_attributes: tuple[str, ...]

    def frozen_part(self) -> torch.nn.Module:
        return torch.nn.ModuleList(getattr(self, name) for name in self.frozen_attributes)

    def _is_frozen(self, key: str) -> bool:
        return any(key.startswith(f"{name}.") for name in self.frozen_attributes)

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        checkpoint["state_dict"] = {
            k: v for k, v in checkpoint["state_dict"].items() if not self._is_frozen(k)
        }

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        own = {k: v for k, v in self.state_dict().items() if self._is_frozen(k)}
        checkpoint["state_dict"] = {**checkpoint["state_dict"], **own}
