import json

import pandas as pd
import pytest

from lmpipe.chat import CHAT_TEMPLATE
from lmpipe.data.instructions import BOOK_PROMPT, EXAMPLE_COLUMNS, TESTAMENT_PROMPT
from lmpipe.data.preferences import (
    ON_POLICY,
    PAIR_FIELDS,
    RANDOM,
    PreferenceConfig,
    build_pairs,
    check_lengths,
    drop_too_long,
    load_user_pairs,
    pair_stats,
    read_pairs,
    write_pairs,
)
from lmpipe.errors import LmpipeError

BOOKS = ["Genesis", "Exodus", "Ruth", "Mark", "Jude"]
LABELS = {"testament": ["Old", "New"], "book": BOOKS}


def examples(docs: int = 60, verses: int = 5) -> pd.DataFrame:
    rows = []
    for d in range(docs):
        book = BOOKS[d % len(BOOKS)]
        testament = "New" if book in ("Mark", "Jude") else "Old"
        split = "train" if d < docs - 10 else ("val" if d % 2 else "test")
        for v in range(verses):
            verse = f"verse {d}:{v} of {book}"
            for task, prompt, label in (
                ("testament", TESTAMENT_PROMPT, testament),
                ("book", BOOK_PROMPT, book),
            ):
                rows.append(
                    (
                        f"{task}:{book} {d}:{v}",
                        task,
                        prompt.format(verse=verse),
                        label,
                        label,
                        split,
                        f"{book} {d}",
                    )
                )
    return pd.DataFrame(rows, columns=list(EXAMPLE_COLUMNS))


def config(**kw) -> PreferenceConfig:
    return PreferenceConfig(**({"train_pairs_per_task": 100, "eval_pairs_per_task": 20} | kw))


def always(answer):
    return lambda prompts, copies: [answer] * (len(prompts) * copies)


def test_pairs_come_from_training_chapters_in_disjoint_documents():
    frame = examples()
    pairs, _ = build_pairs(frame, LABELS, config(on_policy_fraction=0), seed=3, sampler=None)
    train_docs = set(frame.loc[frame["split"] == "train", "doc_id"])
    docs = {split: {p["doc_id"] for p in part} for split, part in pairs.items()}
    assert all(d <= train_docs for d in docs.values())
    assert (
        not docs["train"] & docs["val"]
        and not docs["train"] & docs["test"]
        and not docs["val"] & docs["test"]
    )
    for part in pairs.values():
        for pair in part:
            assert list(pair) == list(PAIR_FIELDS)
            assert pair["kind"] == RANDOM and pair["rejected"] != pair["chosen"]
            assert pair["rejected"] in LABELS[pair["task"]]
    assert len(pairs["train"]) == 200 and 0 < len(pairs["test"]) <= 40


def test_pairs_are_seeded():
    a, _ = build_pairs(examples(), LABELS, config(), seed=3, sampler=always("Exodus"))
    b, _ = build_pairs(examples(), LABELS, config(), seed=3, sampler=always("Exodus"))
    c, _ = build_pairs(examples(), LABELS, config(), seed=4, sampler=always("Exodus"))
    assert a == b and a != c


def test_on_policy_negatives_are_the_models_wrong_samples_and_fall_back_when_it_is_right():
    pairs, extra = build_pairs(
        examples(), LABELS, config(on_policy_fraction=1), seed=3, sampler=always("Old")
    )
    train = pairs["train"]
    # "Old" is wrong for New Testament verses and every book question; right (so a fallback) otherwise.
    on_policy = [p for p in train if p["kind"] == ON_POLICY]
    assert on_policy and all(p["rejected"] == "Old" for p in on_policy)
    fallen = [p for p in train if p["kind"] == RANDOM]
    assert fallen and all(p["task"] == "testament" and p["chosen"] == "Old" for p in fallen)
    assert extra["on_policy_fallback_to_random"] == sum(
        p["kind"] == RANDOM for part in pairs.values() for p in part
    )
    mixed, _ = build_pairs(examples(), LABELS, config(on_policy_fraction=0.5), seed=3, sampler=always("Jude"))
    share = sum(p["kind"] == ON_POLICY for p in mixed["train"]) / len(mixed["train"])
    assert 0.3 < share < 0.6
    with pytest.raises(LmpipeError, match="needs the SFT model"):
        build_pairs(examples(), LABELS, config(on_policy_fraction=0.5), seed=3, sampler=None)


def test_config_errors():
    with pytest.raises(LmpipeError, match="val_fraction \\+ preferences.test_fraction"):
        PreferenceConfig(val_fraction=0.5, test_fraction=0.5)
    with pytest.raises(LmpipeError, match="at most once"):
        PreferenceConfig(tasks=["book", "book"])


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "p", "rejected": "b"}, ":2: missing field 'chosen'"),
        ({"prompt": "p", "chosen": "a"}, ":2: missing field 'rejected'"),
        ({"prompt": "p", "chosen": "a", "rejected": "a"}, ":2: field 'rejected' equals 'chosen'"),
        ({"prompt": "  ", "chosen": "a", "rejected": "b"}, ":2: field 'prompt' is empty"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, ":2: field 'chosen' must be text"),
        ({"prompt": "p", "chosen": " ", "rejected": "b"}, ":2: field 'chosen' is empty"),
        ({"chosen": "a", "rejected": "b"}, ":2: missing field 'prompt'"),
    ],
)
def test_bad_user_records_are_one_line_errors_naming_record_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, record])
    with pytest.raises(LmpipeError, match=message) as err:
        load_user_pairs(path, seed=0, val_fraction=0.1, test_fraction=0.1)
    assert "\n" not in str(err.value) and "prefs.jsonl" in str(err.value)


def test_user_pairs_split_and_round_trip(tmp_path):
    records = [{"id": i, "prompt": f"q{i}", "chosen": "yes", "rejected": "no"} for i in range(200)]
    pairs, extra = load_user_pairs(write_jsonl(tmp_path / "u.jsonl", records), 0, 0.1, 0.1)
    assert sum(map(len, pairs.values())) == 200 and pairs["val"] and pairs["test"]
    assert {p["kind"] for p in pairs["train"]} == {"user"}
    stats = pair_stats(pairs, extra)
    write_pairs(pairs, stats, tmp_path / "out")
    assert read_pairs(tmp_path / "out", "test") == pairs["test"]
    assert stats["pairs"]["train"]["custom"]["user"] == len(pairs["train"])


def test_pairs_longer_than_the_context(tmp_path):
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    short = {"id": "s", "prompt": "In the beginning", "chosen": "Old", "rejected": "New"}
    long = {"id": "l", "prompt": "In the beginning " * 20, "chosen": "Old", "rejected": "New"}
    assert drop_too_long([short, long], tok, CHAT_TEMPLATE, 40) == [short]
    check_lengths([short], tok, CHAT_TEMPLATE, 40, "u.jsonl")
    with pytest.raises(
        LmpipeError, match="u.jsonl: pair 'l': prompt \\+ chosen is .* longer than the context"
    ):
        check_lengths([short, long], tok, CHAT_TEMPLATE, 40, "u.jsonl")
    long_rejected = dict(short, id="r", rejected="New " * 40)
    with pytest.raises(
        LmpipeError, match="u.jsonl: pair 'r': prompt \\+ rejected is .* longer than the context"
    ):
        check_lengths([long_rejected], tok, CHAT_TEMPLATE, 40, "u.jsonl")
