"""Preference pairs for post-training (reward model, DPO): `{"prompt", "chosen", "rejected"}` records, the
format TRL and torchtune read, plus `id`, `task`, `kind` (what the negative is) and `doc_id`.

Pairs are built from the label tasks' examples of the *training* chapters only (the instructions stage's
train split), so no val or test chapter of the corpus ever reaches post-training either. Those chapters are
split once more, by a seeded hash of the document id, into the pairs' own train, val and test documents:
the reward model is tested on verses of chapters it never trained on.

`chosen` is the correct label. `rejected` is, by a seeded hash of the example's id, either
- `random`: a wrong label of the same task drawn uniformly (seeded per example), or
- `on_policy`: the SFT model's own wrong answer to the prompt (sampled, seeded; the first wrong one of
  `on_policy_draws` draws); a prompt the model answered right every time falls back to a random wrong label,
  recorded as `random` and counted in the stats,
in the share `on_policy_fraction`. A user's own preference JSONL (`preferences.jsonl`) replaces the built
pairs (kind `user` unless a record names its own).

Nothing here imports torch: the on-policy sampler is passed in (`lmpipe.training.policy.Sampler`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from lmpipe.atomic import atomic_path
from lmpipe.config import schema
from lmpipe.data.instructions import (
    LABEL_TASKS,
    _excerpt,
    _hash_rank,
    _jsonl_records,
    _sample,
    encode_prompt,
)
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, PREFERENCE_STATS_FILE, split_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

PAIR_SPLITS = ("train", "val", "test")
PAIR_FIELDS = ("id", "task", "prompt", "chosen", "rejected", "kind", "doc_id")
"""Fields of a written preference record, in order."""
RANDOM, ON_POLICY, USER = "random", "on_policy", "user"
"""Kinds of negative: a random wrong label, the SFT model's own wrong sample, a user's record."""
USER_TASK = "custom"
"""Task of a user's record that names none."""

Fraction = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=0)]
Sampler = Callable[[list[str], int], list[str]]
"""(prompts, copies) -> `copies` sampled responses per prompt (text before `<|end|>`), prompt-major."""


@schema("preferences")
class PreferenceConfig:
    tasks: Annotated[list[Literal[LABEL_TASKS]], Field(min_length=1)] = field(
        default_factory=lambda: list(LABEL_TASKS)
    )
    """Label tasks to build pairs from (their training-chapter examples)."""
    train_pairs_per_task: Annotated[int, Field(ge=1)] = 1500
    """Training pairs per task, sampled by seed from the pairs' train documents."""
    eval_pairs_per_task: Annotated[int, Field(ge=1)] = 300
    """Validation and test pairs per task (each), sampled by seed from their own documents."""
    val_fraction: Fraction = 0.1
    """Share of the training chapters whose verses become validation pairs (by a seeded hash of doc_id)."""
    test_fraction: Fraction = 0.1
    """Share of the training chapters whose verses become test pairs (by a seeded hash of doc_id)."""
    on_policy_fraction: Annotated[float, Field(ge=0, le=1)] = 0.5
    """Share of pairs whose rejected response is the SFT model's own wrong sample (the rest: a random wrong label)."""
    on_policy_draws: Annotated[int, Field(ge=1)] = 2
    """Samples drawn from the SFT model per on-policy prompt; the first wrong one is the rejected response."""
    sample_temperature: Annotated[float, Field(gt=0)] = 1.0
    """Softmax temperature of the on-policy samples."""
    sample_tokens: Annotated[int, Field(ge=1)] = 8
    """Most new tokens of an on-policy sample (label answers are a few tokens)."""
    jsonl: str = ""
    """Optional JSONL of {prompt, chosen, rejected} records (optional id, task, kind) used instead of built pairs."""

    def __post_init__(self) -> None:
        if len(set(self.tasks)) != len(self.tasks):
            raise LmpipeError(f"preferences.tasks={self.tasks}: expected each task at most once")
        if self.val_fraction + self.test_fraction >= 1:
            raise LmpipeError(
                f"preferences.val_fraction + preferences.test_fraction = "
                f"{self.val_fraction + self.test_fraction}: expected below 1 so documents remain for training"
            )


def _unit(seed: int, key: str) -> float:
    """A seeded uniform draw in [0, 1) that depends on `key` alone."""
    return _hash_rank(seed, key) / 2**64


def document_split(doc_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """The pairs' split of a training-chapter document (by seeded hash, so documents never straddle splits)."""
    u = _unit(seed, f"preferences:doc:{doc_id}")
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


def build_pairs(
    examples: pd.DataFrame,
    label_sets: dict[str, list[str]],
    cfg: PreferenceConfig,
    seed: int,
    sampler: Sampler | None,
) -> tuple[dict[str, list[dict]], dict]:
    """Pairs per split from the instruction examples of the training split, and what was built (stats).

    `sampler` draws the SFT model's answers; it is only called when some pairs are on-policy."""
    train = examples[(examples["split"] == "train") & examples["task"].isin(cfg.tasks)]
    for task in cfg.tasks:
        if task not in label_sets:
            raise LmpipeError(
                f"preferences.tasks: task {task!r} has no label set (label tasks of the instructions: "
                f"{', '.join(label_sets) or 'none'})"
            )
        if not (train["task"] == task).any():
            raise LmpipeError(f"preferences.tasks: no training examples of task {task!r} in the instructions")
    splits = train["doc_id"].map(lambda doc: document_split(doc, seed, cfg.val_fraction, cfg.test_fraction))
    chosen: list[pd.DataFrame] = []
    for split in PAIR_SPLITS:
        n = cfg.train_pairs_per_task if split == "train" else cfg.eval_pairs_per_task
        for task in cfg.tasks:
            part = train[(splits == split) & (train["task"] == task)]
            if part.empty:
                raise LmpipeError(
                    f"preferences: no {task} examples in the {split} documents; raise "
                    f"preferences.{split}_fraction or use more training chapters"
                )
            picked = _sample(part, n, seed, ("preferences:" + part["id"]).tolist()).copy()
            picked["pair_split"] = split
            chosen.append(picked)
    rows = pd.concat(chosen, ignore_index=True)
    on_policy = np.array([_unit(seed, f"preferences:kind:{i}") < cfg.on_policy_fraction for i in rows["id"]])
    rejected = [_random_wrong(label_sets[t], label, seed, i) for t, label, i in _triples(rows)]
    kinds = [RANDOM] * len(rows)
    fallbacks = 0
    if on_policy.any():
        if sampler is None:
            raise LmpipeError("preferences.on_policy_fraction > 0 needs the SFT model to sample from")
        indices = np.flatnonzero(on_policy)
        prompts = [rows["prompt"][i] for i in indices]
        draws = sampler(prompts, cfg.on_policy_draws)
        for j, i in enumerate(indices):
            mine = draws[j * cfg.on_policy_draws : (j + 1) * cfg.on_policy_draws]
            wrong = next((d for d in mine if d.strip() and d.strip() != rows["response"][i].strip()), None)
            if wrong is None:
                fallbacks += 1
                continue
            rejected[i], kinds[i] = wrong, ON_POLICY
    pairs: dict[str, list[dict]] = {split: [] for split in PAIR_SPLITS}
    for i, row in enumerate(rows.itertuples(index=False)):
        pairs[row.pair_split].append(
            {
                "id": row.id,
                "task": row.task,
                "prompt": row.prompt,
                "chosen": row.response,
                "rejected": rejected[i],
                "kind": kinds[i],
                "doc_id": row.doc_id,
            }
        )
    return pairs, {"on_policy_fallback_to_random": fallbacks}


def _triples(rows: pd.DataFrame):
    return zip(rows["task"], rows["response"], rows["id"], strict=True)


def _random_wrong(labels: list[str], correct: str, seed: int, example_id: str) -> str:
    others = [label for label in labels if label != correct]
    return others[_hash_rank(seed, f"preferences:wrong:{example_id}") % len(others)]


# --- A user's own preference JSONL --------------------------------------------------------------------------


def check_record(record: dict, where: str) -> None:
    """One-line errors for a record that cannot be a preference pair (names the record and the field)."""
    for name in ("prompt", "chosen", "rejected"):
        if name not in record:
            raise LmpipeError(f'{where}: missing field {name!r}; expected {{"prompt", "chosen", "rejected"}}')
        if not isinstance(record[name], str):
            raise LmpipeError(f"{where}: field {name!r} must be text, got {_excerpt(record[name])}")
    if not record["prompt"].strip():
        raise LmpipeError(f"{where}: field 'prompt' is empty; expected text to respond to")
    for name in ("chosen", "rejected"):
        if not record[name].strip():
            raise LmpipeError(f"{where}: field {name!r} is empty; expected a response")
    if record["chosen"] == record["rejected"]:
        raise LmpipeError(
            f"{where}: field 'rejected' equals 'chosen' ({_excerpt(record['chosen'])}); a pair needs two responses"
        )


def load_user_pairs(
    path: str | os.PathLike, seed: int, val_fraction: float, test_fraction: float
) -> tuple[dict[str, list[dict]], dict]:
    """A user's pairs, split by a seeded hash of each record's "doc_id", else "id", else its line number."""
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"preferences.jsonl={str(path)!r}: no such file (relative to {Path.cwd()})")
    pairs: dict[str, list[dict]] = {split: [] for split in PAIR_SPLITS}
    seen: dict[str, str] = {}
    for where, line_number, record in _jsonl_records(path, '{"prompt", "chosen", "rejected"}'):
        check_record(record, where)
        pair_id = str(record.get("id", f"{path.name}:{line_number}"))
        if pair_id in seen:
            raise LmpipeError(f"{where}: duplicate id {pair_id!r} (first at {seen[pair_id]})")
        seen[pair_id] = where
        doc_id = str(record.get("doc_id", pair_id))
        split = document_split(doc_id, seed, val_fraction, test_fraction)
        pair = {
            "id": pair_id,
            "task": str(record.get("task", USER_TASK)),
            "prompt": record["prompt"],
            "chosen": record["chosen"],
            "rejected": record["rejected"],
            "kind": str(record.get("kind", USER)),
            "doc_id": doc_id,
        }
        pairs[split].append(pair)
    if not seen:
        raise LmpipeError(f"{path}: no records, only blank lines; expected one preference object per line")
    for split in ("train", "test"):
        if not pairs[split]:
            raise LmpipeError(
                f"{path}: no {split} pairs among {len(seen)} records after the seeded split; add records "
                "or change preferences.val_fraction/test_fraction"
            )
    return pairs, {"on_policy_fallback_to_random": 0}


# --- Length against the context, files -----------------------------------------------------------------------


def pair_lengths(tokenizer: Tokenizer, template: str, pair: dict) -> tuple[int, int, int]:
    """(prompt tokens, chosen tokens, rejected tokens), each response with its closing `<|end|>`."""
    prompt = len(encode_prompt(tokenizer, template, pair["prompt"]))
    chosen = len(tokenizer.encode(pair["chosen"] + END).ids)
    return prompt, chosen, len(tokenizer.encode(pair["rejected"] + END).ids)


def check_lengths(pairs: list[dict], tokenizer: Tokenizer, template: str, context: int, where: str) -> None:
    """One-line error naming the first pair whose prompt plus a response exceeds the model's context (the last
    response token is only a target, so `context` + 1 tokens fit)."""
    for pair in pairs:
        prompt, chosen, rejected = pair_lengths(tokenizer, template, pair)
        for name, n in (("chosen", chosen), ("rejected", rejected)):
            if prompt + n - 1 > context:
                raise LmpipeError(
                    f"{where}: pair {pair['id']!r}: prompt + {name} is {prompt + n} tokens, longer than the "
                    f"context of {context} + 1; shorten it or drop the record"
                )


def drop_too_long(pairs: list[dict], tokenizer: Tokenizer, template: str, context: int) -> list[dict]:
    """Built pairs that fit the context (a verse too long for it is skipped, as fine-tuning skips it)."""
    kept = []
    for pair in pairs:
        prompt, chosen, rejected = pair_lengths(tokenizer, template, pair)
        if prompt + max(chosen, rejected) - 1 <= context:
            kept.append(pair)
    return kept


def pair_stats(pairs: dict[str, list[dict]], extra: dict) -> dict:
    """Counts per split, task and kind, plus `extra` (JSON-serialisable)."""
    counts: dict[str, dict[str, dict[str, int]]] = {}
    for split, part in pairs.items():
        by_task = counts.setdefault(split, {})
        for pair in part:
            kinds = by_task.setdefault(pair["task"], {})
            kinds[pair["kind"]] = kinds.get(pair["kind"], 0) + 1
    return {
        "pairs": counts,
        "total": {split: len(part) for split, part in pairs.items()},
        "documents": {split: len({p["doc_id"] for p in part}) for split, part in pairs.items()},
        **extra,
    }


def write_pairs(pairs: dict[str, list[dict]], stats: dict, out_dir: str | os.PathLike) -> None:
    """`{train,val,test}.jsonl` and `stats.json` into `out_dir`, replacing it atomically."""
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in PAIR_SPLITS:
            with open(tmp / split_file(split), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(pair, ensure_ascii=False) + "\n" for pair in pairs[split])
        (tmp / PREFERENCE_STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", "utf-8")


def read_pairs(directory: str | os.PathLike, split: str) -> list[dict]:
    """The pairs of one split written by `write_pairs`, each checked as a user's record would be."""
    path = Path(directory) / split_file(split)
    if not path.is_file():
        raise LmpipeError(f"missing {path}: run the preferences stage first (dvc repro preferences)")
    pairs = []
    for where, _, record in _jsonl_records(path, "a preference pair"):
        check_record(record, where)
        missing = [name for name in PAIR_FIELDS if name not in record]
        if missing:
            raise LmpipeError(f"{where}: pair lacks {missing}; re-run the preferences stage")
        pairs.append(record)
    return pairs
