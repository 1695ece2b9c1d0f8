"""Tests for lmpipe.encoder.data: the instruction tasks as verse texts, your JSONL label data, encoded rows and
length-bucketed batches."""

import json

import numpy as np
import pandas as pd
import pytest

from lmpipe.data.instructions import BOOK_PROMPT, EXAMPLE_COLUMNS, TESTAMENT_PROMPT, write_examples
from lmpipe.encoder.config import EncoderFinetuneConfig
from lmpipe.encoder.data import LengthBucketedBatches, instruction_label_data, jsonl_label_data
from lmpipe.errors import LmpipeError
from lmpipe.training.streams import StreamSpec


def test_instruction_tasks_become_verse_texts(tmp_path):
    records = []
    for split in ("train", "val", "test"):
        verse = f"Jesus wept ({split})."
        records += [
            (f"t:{split}", "testament", TESTAMENT_PROMPT.format(verse=verse), "New", "New", split, "John 11"),
            (f"b:{split}", "book", BOOK_PROMPT.format(verse=verse), "John", "John", split, "John 11"),
            (f"c:{split}", "continue", "Continue the verse: Jesus", "wept.", None, split, "John 11"),
        ]
    frame = pd.DataFrame(records, columns=list(EXAMPLE_COLUMNS))
    frame.attrs["instructions"] = {
        "label_sets": {"testament": ["Old", "New"], "book": ["John", "Mark"]},
        "dropped_ambiguous": {},
        "skipped_short": 0,
    }
    write_examples(frame, tmp_path)
    data = instruction_label_data(tmp_path, ["book", "testament"])
    assert list(data.label_sets) == ["book", "testament"]
    test = data.frames["test"]
    assert sorted(test["task"]) == ["book", "testament"] and set(test["text"]) == {"Jesus wept (test)."}
    with pytest.raises(LmpipeError, match="encoder.tasks: 'psalm' has no label set"):
        instruction_label_data(tmp_path, ["psalm"])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_jsonl_records_split_by_seeded_hash(tmp_path):
    records = [{"text": f"text {i}", "label": "ab"[i % 2], "task": "toy"} for i in range(300)]
    path = write_jsonl(tmp_path / "toy.jsonl", records)
    cfg = EncoderFinetuneConfig(tasks=["toy"], val_fraction=0.1, test_fraction=0.2)
    data = jsonl_label_data([path], ["toy"], cfg, seed=1)
    sizes = {split: len(frame) for split, frame in data.frames.items()}
    assert sum(sizes.values()) == 300 and 40 < sizes["test"] < 80 and 15 < sizes["val"] < 50
    assert data.label_sets == {"toy": ["a", "b"]}
    again = jsonl_label_data([path], ["toy"], cfg, seed=1)
    assert again.frames["test"].equals(data.frames["test"])
    assert not jsonl_label_data([path], ["toy"], cfg, seed=2).frames["test"].equals(data.frames["test"])


def test_jsonl_bad_records(tmp_path):
    cfg = EncoderFinetuneConfig(tasks=["toy"])
    one_class = write_jsonl(
        tmp_path / "one.jsonl", [{"text": f"t{i}", "label": "a", "task": "toy"} for i in range(9)]
    )
    with pytest.raises(LmpipeError, match=r"task 'toy' has 1 label\(s\) \['a'\]; expected at least 2"):
        jsonl_label_data([one_class], ["toy"], cfg, seed=0)
    no_text = write_jsonl(tmp_path / "bad.jsonl", [{"label": "a", "task": "toy"}])
    with pytest.raises(LmpipeError, match=r"bad.jsonl:1: field 'text' must be a non-empty string"):
        jsonl_label_data([no_text], ["toy"], cfg, seed=0)


def test_bucketed_batches_are_similar_in_length_and_reproducible():
    rng = np.random.default_rng(0)
    rows = [{"input_ids": np.arange(n) + 1, "task": 0, "label": 0} for n in rng.integers(2, 60, size=400)]
    spec = StreamSpec(seed=3, batches_per_epoch=10)
    stream = LengthBucketedBatches(rows, 8, pad_id=0, spec=spec)
    batch = stream.batch(5)
    lengths = (batch["input_ids"] != 0).sum(1)
    assert lengths.max() - lengths.min() <= 6  # a window of 32 of 400 rows in length order
    again = LengthBucketedBatches(rows, 8, pad_id=0, spec=spec).batch(5)
    assert (again["input_ids"] == batch["input_ids"]).all()
