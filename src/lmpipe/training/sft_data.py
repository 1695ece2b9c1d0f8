"""The supervised fine-tuning data pipeline: instruction examples to encoded rows to padded batches.

A row is one encoded example (`Row`): for language modelling the input ids and the next-token labels, -100
on the prompt so that only the response is learned; for the classification heads the prompt's ids, the
index of its last token (`<|assistant|>`), the head and the class. A batch stacks rows into tensors.

Batches are right-padded with the PAD id and label -100 on the padding. Under causal attention a real token
only attends to earlier positions, which are all real, so right padding cannot change any real token's logits
and needs no attention mask; its labels are -100, so it cannot change the loss either.

Training batches are drawn at random, batch `b` on rank `r` a pure function of (seed, b, r) as in
pretraining, so a resumed run that starts at the batch its checkpoint reached sees exactly the batches an
uninterrupted one would (`RandomExampleBatches`, a `lmpipe.training.streams.BatchStream`; the Lightning data
module in `lmpipe.training.sft` saves that count).

Nothing here imports Lightning: the classification heads collate prompts at evaluation time too.
"""

from __future__ import annotations

import hashlib
import sys
from typing import TYPE_CHECKING

import numpy as np
import torch

from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX
from lmpipe.training.streams import BatchStream, StreamSpec

if TYPE_CHECKING:
    import pandas as pd

Row = dict
"""One encoded example: int arrays ("input_ids", and "labels" for language modelling) and, for the head
method, ints "last" (index of the last prompt token), "task" (head index) and "label" (class index)."""


def encode_lm_examples(
    frame: pd.DataFrame, tokenizer, template: str, max_length: int
) -> tuple[list[Row], int]:
    """Rows for next-token training, (input_ids, labels) = (ids[:-1], labels[1:]) of each example, labels -100
    on the prompt; returns (rows, examples skipped because their input exceeds max_length)."""
    from lmpipe.data.instructions import encode_example

    rows, skipped = [], 0
    for example_id, prompt, response in zip(frame["id"], frame["prompt"], frame["response"], strict=True):
        # The length check is ours: the last id is only a target, so max_length + 1 ids fit the context.
        ids, labels = encode_example(tokenizer, template, prompt, response, sys.maxsize, example_id)
        if len(ids) - 1 > max_length:
            skipped += 1
            continue
        rows.append(
            {
                "input_ids": np.asarray(ids[:-1], dtype=np.int64),
                "labels": np.asarray(labels[1:], dtype=np.int64),
            }
        )
    return rows, skipped


def encode_head_examples(
    frame: pd.DataFrame, tokenizer, template: str, max_length: int, label_sets: dict[str, list[str]]
) -> tuple[list[Row], int]:
    """Rows for the classification heads from the examples of the tasks in `label_sets` (in its order, which
    numbers the heads); returns (rows, examples skipped because their prompt exceeds max_length)."""
    from lmpipe.data.instructions import encode_prompt

    task_index = {task: i for i, task in enumerate(label_sets)}
    label_index = {task: {label: i for i, label in enumerate(labels)} for task, labels in label_sets.items()}
    rows, skipped = [], 0
    for example_id, task, prompt, label in zip(
        frame["id"], frame["task"], frame["prompt"], frame["label"], strict=True
    ):
        if task not in task_index:
            continue
        if label not in label_index[task]:
            raise LmpipeError(
                f"instruction example {example_id!r}: label {label!r} is not in the {task} label set "
                f"({len(label_sets[task])} labels); re-run the instructions stage"
            )
        ids = encode_prompt(tokenizer, template, prompt)
        if len(ids) > max_length:
            skipped += 1
            continue
        rows.append(
            {
                "input_ids": np.asarray(ids, dtype=np.int64),
                "last": len(ids) - 1,
                "task": task_index[task],
                "label": label_index[task][label],
            }
        )
    return rows, skipped


def collate(rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
    """One batch: sequences right-padded (input ids with `pad_id`, labels with -100), scalars stacked."""
    length = max(len(row["input_ids"]) for row in rows)
    batch = {}
    for key in rows[0]:
        if key in ("input_ids", "labels"):
            fill = pad_id if key == "input_ids" else IGNORE_INDEX
            padded = torch.full((len(rows), length), fill, dtype=torch.long)
            for i, row in enumerate(rows):
                padded[i, : len(row[key])] = torch.from_numpy(row[key])
            batch[key] = padded
        else:
            batch[key] = torch.tensor([row[key] for row in rows], dtype=torch.long)
    return batch


class RandomExampleBatches(BatchStream):
    """Whole padded batches of random examples."""

    def __init__(self, rows: list[Row], batch_size: int, pad_id: int, spec: StreamSpec):
        super().__init__(spec)
        self.rows, self.batch_size, self.pad_id = rows, batch_size, pad_id

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        picks = self.rng(index).integers(0, len(self.rows), size=self.batch_size)
        return collate([self.rows[i] for i in picks], self.pad_id)


def rows_sha256(rows: dict[str, list[Row]]) -> str:
    """sha256 of encoded examples (which also pins the tokenizer, the template and the label numbering)."""
    h = hashlib.sha256()
    for split in sorted(rows):
        h.update(f"\x00{split}:{len(rows[split])}".encode())
        for row in rows[split]:
            for key in sorted(row):
                value = np.asarray(row[key], dtype=np.int64)
                h.update(f"{key}{value.size};".encode())
                h.update(value.tobytes())
    return h.hexdigest()
