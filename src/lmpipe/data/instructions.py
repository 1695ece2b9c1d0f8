"""Instruction data for supervised fine-tuning, and the multiple-choice (MMLU-format) benchmark.

Examples are built from the prepared corpus, one per task per text row, and keep the row's own split: the
corpus holds out whole documents (KJV chapters), so no held-out chapter ever reaches fine-tuning. Tasks:

- `testament`: is a verse from the Old or the New Testament (KJV only);
- `book`: which of the 66 books a verse is from (KJV only);
- `continue`: the second half of a text given its first half (any corpus).

A user's own JSONL of prompt/response pairs or chat messages can replace the built tasks (task "custom").
An example becomes token ids through the chat template (`lmpipe.chat`): the prompt part is masked out of the
loss, the response and its closing `<|end|>` are learned, so the model learns when to stop.

The benchmark asks the `book` question as multiple choice, written in the MMLU JSONL format
(`{"question", "choices", "answer": "A"}`) so that any MMLU-style harness can read it, and vice versa.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import string
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args

import numpy as np
import pandas as pd
from pydantic import Field

from lmpipe.atomic import atomic_path
from lmpipe.chat import prompt_text
from lmpipe.config import schema
from lmpipe.data.sources import read_utf8
from lmpipe.data.splits import SPLITS
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, IGNORE_INDEX, INSTRUCTION_STATS_FILE, LABELS_FILE, split_file

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Task = Literal["testament", "book", "continue"]
TASKS = get_args(Task)
"""Tasks built from the corpus."""
LABEL_TASKS = ("testament", "book")
"""Tasks whose response is one of a fixed set of labels (classification)."""
TESTAMENTS = ("Old", "New")
"""Labels of the testament task."""
CUSTOM_TASK = "custom"
"""Task name of the examples read from `InstructionConfig.jsonl`."""

TESTAMENT_PROMPT = "Is this verse from the Old or the New Testament?\n{verse}"
BOOK_PROMPT = "Which book of the Bible is this verse from?\n{verse}"
CONTINUE_PROMPT = "Continue the verse: {first}"
MC_SUBJECT = "bible_book"
"""Subject of the generated multiple-choice questions."""

EXAMPLE_COLUMNS = ("id", "task", "prompt", "response", "label", "split", "doc_id")
"""Columns of an instruction-example DataFrame, in order."""
ROLES = ("system", "user", "assistant")

# A word boundary for the continue task: one space between two non-space characters, so that
# first + " " + second gives back the text exactly.
_WORD_BOUNDARY = re.compile(r"(?<=\S) (?=\S)")
_LAST_WORD_BOUNDARY = re.compile(r".*(?<=\S) (?=\S)", re.DOTALL)
_LETTERS = string.ascii_uppercase


Fraction = Annotated[float, Field(ge=0, lt=1)]
Count = Annotated[int, Field(ge=0)]


@schema("instructions")
class InstructionConfig:
    tasks: list[Task] = field(default_factory=lambda: list(TASKS))
    """Tasks built from the corpus: testament and book (KJV only), continue (any corpus)."""
    jsonl: str = ""
    """Optional JSONL of {prompt, response} or {messages} records that replaces the built tasks."""
    val_fraction: Fraction = 0.05
    """For jsonl: fraction of records held out for validation (by a seeded hash of id or line)."""
    test_fraction: Fraction = 0.05
    """For jsonl: fraction of records held out for testing (by a seeded hash of id or line)."""
    eval_per_task: Count = 300
    """At most this many val and this many test examples per task, sampled by seed; 0 keeps all."""
    mc_questions: Count = 300
    """Questions in the multiple-choice benchmark, sampled by seed; 0 asks about every test verse."""
    mc_choices: Annotated[int, Field(ge=2, le=len(_LETTERS))] = 4
    """Choices per multiple-choice question (the right book plus distinct random others), 2 to 26 (A-Z)."""
    min_continue_words: Annotated[int, Field(ge=2)] = 6
    """Texts with fewer words are skipped by the continue task (at least 2: both halves need a word)."""
    mc_jsonl: str = ""
    """Optional multiple-choice benchmark file in the MMLU JSONL format, used instead of the built one."""
    max_corpus_chars: Count = 20_000_000
    """Most corpus text read to build examples; a larger corpus is sampled by seeded row hash; 0 reads all."""

    def __post_init__(self) -> None:
        if not self.tasks and not self.jsonl:
            raise LmpipeError("instructions.tasks=[]: expected at least one task (or set instructions.jsonl)")
        if len(set(self.tasks)) != len(self.tasks):
            raise LmpipeError(f"instructions.tasks={self.tasks}: expected each task at most once")
        if self.val_fraction + self.test_fraction >= 1:
            raise LmpipeError(
                f"instructions.val_fraction + instructions.test_fraction = "
                f"{self.val_fraction + self.test_fraction}: expected below 1 so records remain for training"
            )


# --- Label sets -------------------------------------------------------------------------------------------


def _book_titles() -> tuple[list[str], list[str]]:
    """(Old Testament titles, New Testament titles) in canonical order."""
    import pythonbible

    return (
        [book.title for book in pythonbible.BookGroup.OLD_TESTAMENT.books],
        [book.title for book in pythonbible.BookGroup.NEW_TESTAMENT.books],
    )


def is_kjv(corpus: pd.DataFrame) -> bool:
    """Whether every row is a KJV verse with its book, i.e. the label tasks can be built."""
    return len(corpus) > 0 and bool((corpus["source"] == "kjv").all()) and bool(corpus["book"].notna().all())


def label_sets(corpus: pd.DataFrame) -> dict[str, list[str]]:
    """The labels of each label task: all 66 books (canonical order) and both testaments, whichever books the
    corpus holds, so label indices are the same in every run. Empty for a non-KJV corpus."""
    if not is_kjv(corpus):
        return {}
    old, new = _book_titles()
    return {"testament": list(TESTAMENTS), "book": old + new}


def _testament_of() -> dict[str, str]:
    old, new = _book_titles()
    return {**dict.fromkeys(old, "Old"), **dict.fromkeys(new, "New")}


# --- Building examples from the corpus ---------------------------------------------------------------------


def build_examples(corpus: pd.DataFrame | None, cfg: InstructionConfig, seed: int) -> pd.DataFrame:
    """Instruction examples (`EXAMPLE_COLUMNS`) of `cfg.tasks` from the corpus, or from `cfg.jsonl` if set.

    Train keeps one example per task per train row; val and test keep at most `cfg.eval_per_task` per task.
    `df.attrs["instructions"]` records the label sets and what was dropped, for `write_examples`.
    """
    if cfg.jsonl:
        return load_jsonl_examples(cfg.jsonl, seed, cfg.val_fraction, cfg.test_fraction, cfg.eval_per_task)
    if corpus is None:
        raise LmpipeError(
            "instructions: no corpus given and instructions.jsonl is empty; nothing to build from"
        )
    kjv = is_kjv(corpus)
    for task in cfg.tasks:
        if task in LABEL_TASKS and not kjv:
            source = ", ".join(sorted(corpus["source"].unique().tolist())) or "empty"
            raise LmpipeError(
                f"instructions.tasks: task {task!r} needs the kjv source (book labels), but the corpus source is "
                f"{source!r}; use instructions.tasks=[continue] or instructions.jsonl"
            )
    rows = corpus.reset_index(drop=True)
    parts: list[pd.DataFrame] = []
    dropped: dict[str, int] = {}
    skipped_short = 0
    for task in cfg.tasks:
        if task == "continue":
            part, skipped_short = _continue_examples(rows, cfg.min_continue_words)
        else:
            part, dropped[task] = _label_examples(rows, task)
        parts.append(_subsample_eval(part, cfg.eval_per_task, seed))
    df = _frame(pd.concat(parts, ignore_index=True))  # cfg.tasks is never empty without jsonl
    sets = label_sets(corpus)
    df.attrs["instructions"] = {
        "label_sets": {task: sets[task] for task in cfg.tasks if task in LABEL_TASKS},
        "dropped_ambiguous": dropped,
        "skipped_short": skipped_short,
    }
    return df


def _label_examples(rows: pd.DataFrame, task: str) -> tuple[pd.DataFrame, int]:
    """One example per verse whose text has a single label; returns (examples, verses dropped as ambiguous)."""
    labels = rows["book"].map(_testament_of()) if task == "testament" else rows["book"]
    # A text seen with two labels (a refrain shared by several books) has no right answer: drop every copy.
    n_labels = labels.groupby(rows["text"]).transform("nunique")
    keep = n_labels == 1
    kept, kept_labels = rows[keep], labels[keep]
    template = TESTAMENT_PROMPT if task == "testament" else BOOK_PROMPT
    part = pd.DataFrame(
        {
            "id": task + ":" + kept["doc_id"] + ":" + kept["position"].astype("str"),
            "task": task,
            "prompt": [template.format(verse=text) for text in kept["text"]],
            "response": kept_labels,
            "label": kept_labels,
            "split": kept["split"],
            "doc_id": kept["doc_id"],
        }
    )
    return part, int((~keep).sum())


def split_continuation(text: str, min_words: int = 2) -> tuple[str, str] | None:
    """`text` cut at the single space nearest its middle (in characters), or None if it has fewer than
    `min_words` words or no such space; first + " " + second == text."""
    if len(text.split()) < min_words:
        return None
    middle = len(text) / 2
    start = math.ceil(middle)
    # The nearest boundary is the last one before `start` or the first one from it; looking only at those
    # two keeps long texts cheap. endpos hides text[start + 1:], so the last match lies before `start`.
    before = _LAST_WORD_BOUNDARY.match(text, 0, start + 1)
    after = _WORD_BOUNDARY.search(text, start)
    candidates = [m.end() - 1 for m in (before, after) if m is not None]
    if not candidates:
        return None
    cut = min(candidates, key=lambda i: abs(i - middle))  # a tie keeps the earlier boundary
    return text[:cut], text[cut + 1 :]


def _continue_examples(rows: pd.DataFrame, min_words: int) -> tuple[pd.DataFrame, int]:
    """One example per text row long enough to split; returns (examples, rows skipped)."""
    records = []
    for doc_id, position, text, split in zip(
        rows["doc_id"], rows["position"], rows["text"], rows["split"], strict=True
    ):
        halves = split_continuation(text, min_words)
        if halves is None:
            continue
        first, second = halves
        records.append(
            (f"continue:{doc_id}:{position}", CONTINUE_PROMPT.format(first=first), second, split, doc_id)
        )
    part = pd.DataFrame(records, columns=["id", "prompt", "response", "split", "doc_id"])
    part.insert(1, "task", "continue")
    part.insert(4, "label", None)
    return part, len(rows) - len(records)


def _hash_rank(seed: int, key: str) -> int:
    # A keyed hash, not an RNG stream: an example's fate does not depend on which other examples exist.
    return int.from_bytes(hashlib.sha256(f"{seed}\x00{key}".encode()).digest()[:8], "big")


def _sample(frame: pd.DataFrame, n: int, seed: int, keys: Sequence[str]) -> pd.DataFrame:
    """At most `n` rows of `frame` (all when n is 0), chosen by seeded hash of `keys`, in their original order."""
    if not n or len(frame) <= n:
        return frame
    ranks = np.array([_hash_rank(seed, key) for key in keys], dtype=np.uint64)
    chosen = np.sort(np.argsort(ranks, kind="stable")[:n])
    return frame.iloc[chosen]


def _subsample_eval(part: pd.DataFrame, per_task: int, seed: int) -> pd.DataFrame:
    """All train rows of one task, and at most `per_task` of its val and of its test rows."""
    kept = [part[part["split"] == "train"]]
    for split in ("val", "test"):
        held_out = part[part["split"] == split]
        kept.append(_sample(held_out, per_task, seed, held_out["id"].tolist()))
    return pd.concat(kept)


def _frame(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with exactly `EXAMPLE_COLUMNS` as text columns (label NaN where a task has none), fresh index."""
    return df[list(EXAMPLE_COLUMNS)].astype(dict.fromkeys(EXAMPLE_COLUMNS, "str")).reset_index(drop=True)


# --- A user's own JSONL ------------------------------------------------------------------------------------


def _jsonl_records(path: Path, what: str) -> Iterator[tuple[str, int, dict]]:
    """(where, line number, object) for each non-blank line of a UTF-8 JSONL file."""
    text = read_utf8(path)
    # split("\n"), not splitlines(): U+2028 and friends may appear raw inside JSON strings.
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmpipeError(f"{where}: invalid JSON: {e.msg} at column {e.colno}") from None
        if not isinstance(record, dict):
            raise LmpipeError(f"{where}: expected one JSON object per line ({what}), got {_excerpt(record)}")
        yield where, line_number, record


def _excerpt(value: object, limit: int = 40) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def load_jsonl_examples(
    path: str | os.PathLike,
    seed: int,
    val_fraction: float = 0.0,
    test_fraction: float = 0.0,
    eval_per_task: int = 0,
) -> pd.DataFrame:
    """A user's examples (task "custom"), split by a seeded hash of each record's "id" (or line number).

    `val_fraction` and `test_fraction` of the records are held out, at most `eval_per_task` of each (0: all).

    A record is `{"prompt": str, "response": str}` or `{"messages": [{"role", "content"}, ...]}` whose last
    message, and only that one, is the assistant's response; the other messages' contents (system and user
    turns), joined by blank lines, are the prompt. An optional "id" (string or integer) names the record.
    """
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(f"instructions.jsonl={str(path)!r}: no such file (relative to {Path.cwd()})")
    what = '{"prompt", "response"} or {"messages": [...]}'
    records = []
    seen: dict[str, str] = {}
    for where, line_number, record in _jsonl_records(path, what):
        prompt, response = _prompt_and_response(record, where)
        record_id = record.get("id")
        if record_id is not None and (
            isinstance(record_id, bool) or not isinstance(record_id, str | int) or record_id == ""
        ):
            raise LmpipeError(
                f"{where}: field 'id' must be a non-empty string or an integer, got {_excerpt(record_id)}"
            )
        example_id = (
            f"{CUSTOM_TASK}:{record_id}"
            if record_id is not None
            else f"{CUSTOM_TASK}:{path.name}:{line_number}"
        )
        if example_id in seen:
            raise LmpipeError(f"{where}: duplicate example id {example_id!r} (first at {seen[example_id]})")
        seen[example_id] = where
        # Hash the id (or the line), not the file name, so moving the file keeps every record's split.
        u = _hash_rank(seed, f"id:{record_id}" if record_id is not None else f"line:{line_number}") / 2**64
        split = "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        records.append((example_id, CUSTOM_TASK, prompt, response, None, split, example_id))
    if not records:
        raise LmpipeError(f"{path}: no JSON records, only blank lines; expected one {what} object per line")
    df = _frame(_subsample_eval(pd.DataFrame(records, columns=list(EXAMPLE_COLUMNS)), eval_per_task, seed))
    df.attrs["instructions"] = {"label_sets": {}, "dropped_ambiguous": {}, "skipped_short": 0}
    return df


def _prompt_and_response(record: dict, where: str) -> tuple[str, str]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise LmpipeError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise LmpipeError(
                    f"{where}: message {i} must be a {{role, content}} object, got {_excerpt(message)}"
                )
            if message.get("role") not in ROLES:
                raise LmpipeError(
                    f"{where}: message {i} has role {_excerpt(message.get('role'))}; expected one of {', '.join(ROLES)}"
                )
            if not isinstance(message.get("content"), str):
                raise LmpipeError(
                    f"{where}: message {i} content must be text, got {_excerpt(message.get('content'))}"
                )
        roles = [message["role"] for message in messages]
        if roles[-1] != "assistant":
            raise LmpipeError(f"{where}: record has no response: the last message must be the assistant's")
        if "assistant" in roles[:-1]:
            raise LmpipeError(
                f"{where}: assistant message {roles.index('assistant')} before the last; expected a single "
                "assistant message, the final one"
            )
        prompt = "\n\n".join(message["content"] for message in messages[:-1])
        response = messages[-1]["content"]
    else:
        if "response" not in record:
            raise LmpipeError(
                f'{where}: record has no response; expected {{"prompt", "response"}} or {{"messages": [...]}}, '
                f"keys: {list(record)[:10]}"
            )
        prompt, response = record.get("prompt"), record["response"]
        for name, value in (("prompt", prompt), ("response", response)):
            if not isinstance(value, str):
                raise LmpipeError(f"{where}: field {name!r} must be text, got {_excerpt(value)}")
    if not prompt.strip():
        raise LmpipeError(f"{where}: empty prompt; expected text to respond to")
    if not response.strip():
        raise LmpipeError(f"{where}: empty response; expected the text the model should answer")
    return prompt, response


# --- Token ids ---------------------------------------------------------------------------------------------


def encode_prompt(tokenizer: Tokenizer, template: str, prompt: str) -> list[int]:
    """Ids of the single-turn prompt, ending with the opened assistant turn: what generation starts from."""
    return tokenizer.encode(prompt_text(prompt, template)).ids


def encode_example(
    tokenizer: Tokenizer,
    template: str,
    prompt: str,
    response: str,
    max_length: int,
    example_id: str = "example",
) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + response + `<|end|>`; labels are `IGNORE_INDEX` on the prompt tokens.

    The two parts are encoded separately and their ids concatenated, so the mask boundary is exact whatever
    the tokenizer would merge across it. `max_length` is the model's context (model.block_size).
    """
    prompt_ids = encode_prompt(tokenizer, template, prompt)
    response_ids = tokenizer.encode(response + END).ids
    ids = prompt_ids + response_ids
    if len(ids) > max_length:
        raise LmpipeError(
            f"instruction example {example_id!r} does not fit the context: {len(ids)} tokens > "
            f"model.block_size {max_length}"
        )
    return ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


# --- The multiple-choice benchmark -------------------------------------------------------------------------


@dataclass
class MCItem:
    question: str
    """The question text."""
    choices: list[str]
    """The possible answers, in the order their letters A, B, ... name them."""
    answer_index: int
    """Index of the right answer in `choices`."""
    subject: str = ""
    """Category of the question (MMLU's "subject"), empty if the file has none."""


def build_mc(corpus: pd.DataFrame, cfg: InstructionConfig, seed: int, split: str = "test") -> list[dict]:
    """MMLU-format questions "which book is this verse from?" about verses of `split` only.

    Each has `cfg.mc_choices` distinct book titles (the right one among random others, from all 66 books) and
    the right answer at a uniformly random letter. Verses whose text occurs in several books are left out.
    """
    if split not in SPLITS:
        raise LmpipeError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    if not is_kjv(corpus):
        source = ", ".join(sorted(corpus["source"].unique().tolist())) or "empty"
        raise LmpipeError(
            f"instructions: the multiple-choice benchmark asks for a verse's book, so it needs the kjv source, "
            f"but the corpus source is {source!r}"
        )
    books = label_sets(corpus)["book"]
    ambiguous = corpus.groupby("text")["book"].transform("nunique") > 1
    verses = corpus[(corpus["split"] == split) & ~ambiguous]
    if verses.empty:
        raise LmpipeError(f"instructions: no unambiguous verses in split {split!r} to ask about")
    keys = ("mc:" + verses["doc_id"] + ":" + verses["position"].astype("str")).tolist()
    verses = _sample(verses, cfg.mc_questions, seed, keys)
    rng = np.random.default_rng(seed)
    items = []
    for text, book in zip(verses["text"], verses["book"], strict=True):
        others = [title for title in books if title != book]
        choices = [others[i] for i in rng.choice(len(others), size=cfg.mc_choices - 1, replace=False)]
        answer = int(rng.integers(cfg.mc_choices))
        choices.insert(answer, book)
        items.append(
            {
                "question": BOOK_PROMPT.format(verse=text),
                "choices": choices,
                "answer": _LETTERS[answer],
                "subject": MC_SUBJECT,
            }
        )
    return items


def write_mc_jsonl(items: Sequence[dict], path: str | os.PathLike) -> None:
    """Write MMLU-format questions, one JSON object per line (UTF-8), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(item, ensure_ascii=False) + "\n")


def read_mc_jsonl(path: str | os.PathLike) -> list[MCItem]:
    """Read and check an MMLU-format JSONL file: `question`, `choices` (at least 2), `answer` (a letter or a
    0-based index), optional `subject`."""
    path = Path(path)
    if not path.is_file():
        raise LmpipeError(
            f"missing multiple-choice file {path}: run the instructions stage first (dvc repro instructions)"
        )
    what = '{"question", "choices", "answer"}'
    items = []
    for where, _, record in _jsonl_records(path, what):
        for key in ("question", "choices", "answer"):
            if key not in record:
                raise LmpipeError(f"{where}: missing key {key!r}; expected {what}")
        question, choices, answer = record["question"], record["choices"], record["answer"]
        subject = record.get("subject", "")
        if not isinstance(question, str) or not question.strip():
            raise LmpipeError(f"{where}: 'question' must be non-empty text, got {_excerpt(question)}")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise LmpipeError(f"{where}: 'choices' must be a list of texts, got {_excerpt(choices)}")
        if len(choices) < 2:
            raise LmpipeError(f"{where}: {len(choices)} choice(s); expected at least 2")
        if not isinstance(subject, str):
            raise LmpipeError(f"{where}: 'subject' must be text, got {_excerpt(subject)}")
        items.append(MCItem(question, choices, _answer_index(answer, len(choices), where), subject))
    if not items:
        raise LmpipeError(f"{path}: no questions, only blank lines; expected one {what} object per line")
    return items


def _answer_index(answer: object, n_choices: int, where: str) -> int:
    letters = _LETTERS[: min(n_choices, len(_LETTERS))]
    if isinstance(answer, str) and len(answer.strip()) == 1 and answer.strip().upper() in letters:
        return letters.index(answer.strip().upper())
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < n_choices:
        return answer
    raise LmpipeError(
        f"{where}: answer {_excerpt(answer)} is not among the {n_choices} choices; expected a letter "
        f"{letters[0]}-{letters[-1]} or an index 0-{n_choices - 1}"
    )


# --- Files -------------------------------------------------------------------------------------------------


def example_stats(df: pd.DataFrame) -> dict:
    """Counts of examples per split and task, plus what `build_examples` dropped (JSON-serialisable)."""
    info = df.attrs.get("instructions", {})
    tasks = list(dict.fromkeys(df["task"]))
    counts = df.groupby(["split", "task"]).size()
    return {
        "examples": {split: {task: int(counts.get((split, task), 0)) for task in tasks} for split in SPLITS},
        "total": {split: int((df["split"] == split).sum()) for split in SPLITS},
        "dropped_ambiguous": dict(info.get("dropped_ambiguous", {})),
        "skipped_short": int(info.get("skipped_short", 0)),
    }


def write_examples(df: pd.DataFrame, out_dir: str | os.PathLike) -> dict:
    """Write `{train,val,test}.jsonl`, `labels.json` and `stats.json` into `out_dir`, replacing it atomically;
    return the stats. The label sets come from `df.attrs` as set by `build_examples`."""
    stats = example_stats(df)
    label_sets_ = df.attrs.get("instructions", {}).get("label_sets", {})
    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for split in SPLITS:
            part = df.loc[df["split"] == split, list(EXAMPLE_COLUMNS)].astype(object)
            # A missing label (a task without classes) is written as JSON null, not NaN.
            records = part.where(part.notna(), None).to_dict("records")
            with open(tmp / split_file(split), "w", encoding="utf-8") as f:
                f.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
        (tmp / LABELS_FILE).write_text(json.dumps(label_sets_, indent=2, ensure_ascii=False) + "\n", "utf-8")
        (tmp / INSTRUCTION_STATS_FILE).write_text(json.dumps(stats, indent=2, sort_keys=True) + "\n", "utf-8")
    return stats


def read_examples(directory: str | os.PathLike, split: str) -> pd.DataFrame:
    """The examples of one split written by `write_examples`, with `EXAMPLE_COLUMNS`."""
    if split not in SPLITS:
        raise LmpipeError(f"split={split!r}: expected one of {', '.join(SPLITS)}")
    path = Path(directory) / split_file(split)
    if not path.is_file():
        raise LmpipeError(f"missing {path}: run the instructions stage first (dvc repro instructions)")
    if path.stat().st_size == 0:
        return _frame(pd.DataFrame(columns=EXAMPLE_COLUMNS))
    records = []
    for where, _, record in _jsonl_records(path, "an instruction example"):
        missing = [col for col in EXAMPLE_COLUMNS if col not in record]
        if missing:
            raise LmpipeError(f"{where}: example lacks {missing}; re-run the instructions stage")
        records.append(record)
    return _frame(pd.DataFrame(records, columns=list(EXAMPLE_COLUMNS)))


def read_label_sets(directory: str | os.PathLike) -> dict[str, list[str]]:
    """The label sets written by `write_examples` (task -> labels)."""
    path = Path(directory) / LABELS_FILE
    if not path.is_file():
        raise LmpipeError(f"missing {path}: run the instructions stage first (dvc repro instructions)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LmpipeError(f"{path}: invalid JSON ({e.msg}); re-run the instructions stage") from None
