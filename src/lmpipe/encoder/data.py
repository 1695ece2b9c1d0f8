"""Label-task data for the encoder: texts with labels, per task and split, and their encoded rows.

Two sources, one shape (`LabelData`: a frame of text / label / task per split and each task's label set):
- the instructions stage's testament and book examples (`<paths.instructions>/`): the held-out chapters stay
  held out, the label sets are the stage's, and the text is the verse (the task's question line removed);
- your JSONL files of {"text", "label", "task"} records (`encoder.jsonl`): each record goes to train, val or
  test by a seeded hash of its text, task and label; a task's labels are those its records use.

Rows are what `lmpipe.training.sft_data.collate` batches: "input_ids", "task" (head index), "label" (class).
Training batches draw rows of similar length together (`LengthBucketedBatches`): verses run from 5 to 64
tokens, and a batch padded to its longest row otherwise spends about half its work on padding.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from lmpipe.encoder.config import EncoderFinetuneConfig
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError
from lmpipe.formats import INSTRUCTION_SPLITS, LABELS_FILE
from lmpipe.training.sft_data import Row, collate
from lmpipe.training.streams import BatchStream, StreamSpec

LABEL_COLUMNS = ("text", "label", "task")


@dataclass
class LabelData:
    frames: dict[str, pd.DataFrame]
    """split -> rows with columns text, label, task (tasks in `label_sets` only)."""
    label_sets: dict[str, list[str]]
    """task -> its labels, in the order of its head's outputs; the tasks in head order."""
    source: str


def verse_text(task: str, prompt: str) -> str:
    """The text an encoder classifies in an instruction example: the prompt without its task's question."""
    from lmpipe.data.instructions import BOOK_PROMPT, TESTAMENT_PROMPT

    prefixes = {"testament": TESTAMENT_PROMPT.format(verse=""), "book": BOOK_PROMPT.format(verse="")}
    return prompt.removeprefix(prefixes.get(task, ""))


def instruction_label_data(directory: str | Path, tasks: list[str]) -> LabelData:
    """The label tasks of the instructions stage, as verse texts."""
    from lmpipe.data.instructions import read_examples, read_label_sets

    directory = Path(directory)
    label_sets = read_label_sets(directory)
    missing = [task for task in tasks if task not in label_sets]
    if missing:
        raise LmpipeError(
            f"encoder.tasks: {missing[0]!r} has no label set in {directory / LABELS_FILE} "
            f"(label tasks there: {', '.join(label_sets) or 'none'})"
        )
    frames = {}
    for split in INSTRUCTION_SPLITS:
        examples = read_examples(directory, split)
        examples = examples[examples["task"].isin(tasks)]
        text = [verse_text(t, p) for t, p in zip(examples["task"], examples["prompt"], strict=True)]
        frames[split] = pd.DataFrame(
            {"text": text, "label": examples["label"].to_numpy(), "task": examples["task"].to_numpy()}
        )
    return LabelData(frames, {task: list(label_sets[task]) for task in tasks}, str(directory))


def jsonl_label_data(paths: list[str], tasks: list[str], cfg: EncoderFinetuneConfig, seed: int) -> LabelData:
    """Your label data: {"text", "label", "task"} records split by a seeded hash into train/val/test."""
    from lmpipe.data.instructions import _jsonl_records

    records = []
    for path in paths:
        for where, _, record in _jsonl_records(Path(path), 'a {"text", "label", "task"} record'):
            for key in LABEL_COLUMNS:
                if not isinstance(record.get(key), str) or not record[key].strip():
                    raise LmpipeError(f"{where}: field {key!r} must be a non-empty string")
            if record["task"] in tasks:
                records.append({key: record[key] for key in LABEL_COLUMNS})
    frame = pd.DataFrame(records, columns=list(LABEL_COLUMNS))
    label_sets = {}
    for task in tasks:
        labels = sorted(set(frame.loc[frame["task"] == task, "label"]))
        if len(labels) < 2:
            raise LmpipeError(
                f"{', '.join(paths)}: task {task!r} has {len(labels)} label(s) "
                f"{labels}; expected at least 2 classes to learn"
            )
        label_sets[task] = labels
    # A keyed hash per record, so a record's split does not depend on which other records exist.
    keys = ("\x00".join([str(seed), *map(str, row)]) for row in frame.itertuples(index=False))
    fraction = np.array([int(hashlib.sha256(k.encode()).hexdigest()[:15], 16) / 16**15 for k in keys])
    split = np.where(
        fraction < cfg.test_fraction,
        "test",
        np.where(fraction < cfg.test_fraction + cfg.val_fraction, "val", "train"),
    )
    frames = {name: frame[split == name].reset_index(drop=True) for name in INSTRUCTION_SPLITS}
    for name, part in frames.items():
        if part.empty:
            raise LmpipeError(f"{', '.join(paths)}: no records fall in the {name} split; add more records")
    return LabelData(frames, label_sets, ", ".join(paths))


def encode_rows(
    frame: pd.DataFrame,
    label_sets: dict[str, list[str]],
    tokenizer: EncoderTokenizer,
    cfg: EncoderFinetuneConfig,
    where: str,
) -> list[Row]:
    """One row per example: token ids (at most cfg.max_length), head index and class index."""
    task_index = {task: i for i, task in enumerate(label_sets)}
    label_index = {task: {label: i for i, label in enumerate(labels)} for task, labels in label_sets.items()}
    ids = tokenizer.encode(list(frame["text"]), cfg.max_length, cfg.too_long, where)
    rows = []
    for row_ids, task, label in zip(ids, frame["task"], frame["label"], strict=True):
        if label not in label_index[task]:
            raise LmpipeError(
                f"{where}: label {label!r} is not in the {task} label set ({len(label_sets[task])} labels)"
            )
        rows.append({"input_ids": row_ids, "task": task_index[task], "label": label_index[task][label]})
    return rows


class LengthBucketedBatches(BatchStream):
    """Batches of random rows of similar length: a random window of `spread` x batch_size rows in length
    order (ties in a seeded random order), then batch_size rows drawn from it."""

    def __init__(self, rows: list[Row], batch_size: int, pad_id: int, spec: StreamSpec, spread: int = 4):
        super().__init__(spec)
        # Ties in length are broken at random: in file order, rows of one length come grouped by task and
        # chapter, and a window of them would be a batch of one book.
        lengths = [len(row["input_ids"]) for row in rows]
        order = np.lexsort((np.random.default_rng(spec.seed).random(len(rows)), lengths))
        self.rows = [rows[i] for i in order]
        self.batch_size, self.pad_id = batch_size, pad_id
        self.window = min(len(rows), spread * batch_size)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        rng = self.rng(index)
        start = rng.integers(0, len(self.rows) - self.window + 1)
        picks = start + rng.integers(0, self.window, size=self.batch_size)
        return collate([self.rows[i] for i in picks], self.pad_id)
