import json
from collections import Counter

import pandas as pd
import pytest

from lmpipe.chat import CHAT_TEMPLATE, prompt_text
from lmpipe.data.corpus import CORPUS_COLUMNS, CORPUS_DTYPES, DataConfig, documents_by_split, prepare_corpus
from lmpipe.data.instructions import (
    BOOK_PROMPT,
    EXAMPLE_COLUMNS,
    InstructionConfig,
    build_examples,
    build_mc,
    encode_example,
    encode_prompt,
    label_sets,
    load_jsonl_examples,
    read_examples,
    read_label_sets,
    read_mc_jsonl,
    split_continuation,
    write_examples,
    write_mc_jsonl,
)
from lmpipe.errors import LmpipeError
from lmpipe.formats import END, IGNORE_INDEX
from lmpipe.tokenizer import TokenizerConfig, train_tokenizer

BOOKS = ["Genesis", "Ruth", "Matthew", "Jude"]


@pytest.fixture(scope="module")
def corpus() -> pd.DataFrame:
    return prepare_corpus(DataConfig(source="kjv", books=BOOKS), seed=1)


@pytest.fixture(scope="module")
def examples(corpus) -> pd.DataFrame:
    return build_examples(corpus, InstructionConfig(), seed=1)


def make_corpus(rows: list[tuple[str, str, str]], source: str = "kjv") -> pd.DataFrame:
    """A corpus from (book, text, split) rows, one chapter per row (doc_id = "<book> <n>")."""
    records = [
        {
            "source": source,
            "doc_id": f"{book} {i + 1}",
            "group": book,
            "position": 0,
            "text": text,
            "split": split,
            "book": book if source == "kjv" else None,
            "chapter": i + 1 if source == "kjv" else None,
            "verse": 1 if source == "kjv" else None,
        }
        for i, (book, text, split) in enumerate(rows)
    ]
    return pd.DataFrame(records, columns=list(CORPUS_COLUMNS)).astype(CORPUS_DTYPES)


# --- Config and label sets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"tasks": ["books"]},
            r"^instructions\.tasks\.0='books': expected 'testament', 'book' or 'continue'$",
        ),
        ({"tasks": []}, r"^instructions\.tasks=\[\]: expected at least one task"),
        (
            {"tasks": ["book", "book"]},
            r"^instructions\.tasks=\['book', 'book'\]: expected each task at most once$",
        ),
        ({"val_fraction": 1.0}, r"^instructions\.val_fraction=1\.0: expected a value less than 1$"),
        (
            {"val_fraction": 0.6, "test_fraction": 0.4},
            r"^instructions\.val_fraction \+ instructions\.test_fraction",
        ),
        (
            {"eval_per_task": -1},
            r"^instructions\.eval_per_task=-1: expected a value greater than or equal to 0$",
        ),
        ({"mc_questions": 1.5}, r"^instructions\.mc_questions=1\.5: expected a valid integer$"),
        ({"mc_choices": 1}, r"^instructions\.mc_choices=1: expected a value greater than or equal to 2$"),
        ({"mc_choices": 27}, r"^instructions\.mc_choices=27: expected a value less than or equal to 26$"),
        (
            {"min_continue_words": 1},
            r"^instructions\.min_continue_words=1: expected a value greater than or equal to 2$",
        ),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(LmpipeError, match=message):
        InstructionConfig(**fields)


def test_config_fields_have_one_line_docstrings():
    import ast
    import dataclasses
    import inspect

    import lmpipe.data.instructions as instructions

    for cls in (instructions.InstructionConfig, instructions.MCItem):
        body = ast.parse(inspect.getsource(cls)).body[0].body
        documented = [
            node.target.id
            for node, doc in zip(body, body[1:], strict=False)
            if isinstance(node, ast.AnnAssign)
            and isinstance(doc, ast.Expr)
            and isinstance(doc.value.value, str)
            and "\n" not in doc.value.value
        ]
        assert documented == [f.name for f in dataclasses.fields(cls)]


def test_label_sets_hold_all_66_books_in_canonical_order(corpus):
    sets = label_sets(corpus)  # a 4-book corpus still gets every book, so label ids are stable across runs
    assert sets["testament"] == ["Old", "New"]
    books = sets["book"]
    assert len(books) == len(set(books)) == 66
    assert books[:2] == ["Genesis", "Exodus"] and books[-1] == "Revelation"
    assert books.index("Malachi") == 38 and books.index("Matthew") == 39
    assert label_sets(make_corpus([("x.txt", "some text here", "train")], source="text")) == {}


# --- Examples from the corpus -------------------------------------------------------------------------------


def test_examples_have_the_columns_and_stable_ids(examples):
    assert list(examples.columns) == list(EXAMPLE_COLUMNS)
    assert examples["id"].is_unique
    assert (examples["id"].str.split(":", n=1).str[0] == examples["task"]).all()
    assert examples["id"].str.fullmatch(r"\w+:.+ \d+:\d+").all()
    assert (examples["id"].str.split(":").str[1] == examples["doc_id"]).all()
    assert set(examples["task"]) == {"testament", "book", "continue"}


def test_held_out_chapters_never_reach_train(corpus, examples):
    split_of = corpus.drop_duplicates("doc_id").set_index("doc_id")["split"]
    # Every example keeps the split of its chapter ...
    assert (examples["doc_id"].map(split_of) == examples["split"]).all()
    # ... so the chapters of train and of val/test examples never overlap, for any task.
    for _, part in examples.groupby("task"):
        train_docs = set(part.loc[part["split"] == "train", "doc_id"])
        held_out_docs = set(part.loc[part["split"] != "train", "doc_id"])
        assert held_out_docs and train_docs
        assert not train_docs & held_out_docs


def test_train_keeps_every_verse_and_eval_is_capped(corpus):
    df = build_examples(corpus, InstructionConfig(tasks=["testament"], eval_per_task=20), seed=1)
    counts = df.groupby("split").size()
    assert counts["train"] == (corpus["split"] == "train").sum()  # no ambiguous verses across testaments here
    assert counts["val"] == counts["test"] == 20
    assert (corpus["split"] == "val").sum() > 20
    everything = build_examples(corpus, InstructionConfig(tasks=["testament"], eval_per_task=0), seed=1)
    assert (everything["split"] == "val").sum() == (corpus["split"] == "val").sum()


def test_examples_are_deterministic_per_seed(corpus):
    cfg = InstructionConfig(eval_per_task=10)
    first = build_examples(corpus, cfg, seed=3)
    pd.testing.assert_frame_equal(first, build_examples(corpus, cfg, seed=3))
    other = build_examples(corpus, cfg, seed=4)
    assert set(first.loc[first["split"] == "val", "id"]) != set(other.loc[other["split"] == "val", "id"])


def test_labels_are_right(corpus, examples):
    book_of = corpus.set_index(["doc_id", "position"])["book"]
    for task in ("testament", "book"):
        part = examples[examples["task"] == task]
        key = part["id"].str.split(":", n=1).str[1]
        books = [book_of[(doc, int(pos))] for doc, pos in (k.rsplit(":", 1) for k in key)]
        if task == "book":
            assert part["response"].tolist() == books
            assert set(books) == set(BOOKS)
        else:
            expected = ["New" if book in ("Matthew", "Jude") else "Old" for book in books]
            assert part["response"].tolist() == expected
        assert (part["label"] == part["response"]).all()
    text_of = corpus.set_index(corpus["doc_id"] + ":" + corpus["position"].astype("str"))["text"]
    testament = examples[examples["task"] == "testament"]
    verses = text_of[testament["id"].str.removeprefix("testament:")].tolist()
    assert testament["prompt"].tolist() == [
        f"Is this verse from the Old or the New Testament?\n{v}" for v in verses
    ]
    matthew = examples[(examples["task"] == "book") & examples["doc_id"].str.startswith("Matthew")]
    assert (matthew["response"] == "Matthew").all() and len(matthew) > 100
    assert matthew["prompt"].str.startswith("Which book of the Bible is this verse from?\n").all()
    assert examples.loc[examples["task"] == "continue", "label"].isna().all()


def test_ambiguous_verses_are_dropped_from_label_tasks_only():
    shared = "And the LORD spake unto Moses, saying, hear this well."
    same_book = "And it came to pass after these things, that God did tempt Abraham."
    corpus = make_corpus(
        [
            ("Genesis", shared, "train"),
            ("Matthew", shared, "train"),  # same text, other book and testament: no right answer
            ("Genesis", same_book, "train"),
            ("Genesis", same_book, "val"),  # repeated within one book: still one label, kept
            ("Ruth", "Intreat me not to leave thee, or to return from following after thee.", "test"),
        ]
    )
    df = build_examples(corpus, InstructionConfig(eval_per_task=0), seed=0)
    for task in ("testament", "book"):
        part = df[df["task"] == task]
        assert not part["prompt"].str.contains(shared, regex=False).any()
        assert part["prompt"].str.contains(same_book, regex=False).sum() == 2
        assert len(part) == 3
    assert df.attrs["instructions"]["dropped_ambiguous"] == {"testament": 2, "book": 2}
    continued = df[df["task"] == "continue"]
    assert len(continued) == 5


def test_label_checks_the_full_corpus(examples):
    for task in ("testament", "book"):
        part = examples[examples["task"] == task]
        assert (part.groupby("prompt")["label"].nunique() == 1).all()


def test_continue_splits_at_the_word_boundary_nearest_the_middle(corpus, examples):
    part = examples[examples["task"] == "continue"]
    texts = corpus.set_index(corpus["doc_id"] + ":" + corpus["position"].astype("str"))["text"]
    assert part["prompt"].str.startswith("Continue the verse: ").all()
    for example_id, prompt, response in zip(part["id"], part["prompt"], part["response"], strict=True):
        verse = texts[example_id.removeprefix("continue:")]
        first = prompt.removeprefix("Continue the verse: ")
        assert first and response and first + " " + response == verse
        middle = len(verse) / 2
        spaces = [i for i, ch in enumerate(verse) if ch == " "]
        assert abs(len(first) - middle) == min(abs(i - middle) for i in spaces)


def test_split_continuation_cases():
    assert split_continuation("one two three four", 2) == ("one two", "three four")
    assert split_continuation("ab c", 2) == ("ab", "c")
    assert split_continuation("a bc", 2) == ("a", "bc")
    assert split_continuation("a b", 2) == ("a", "b")
    assert split_continuation("aa b cc", 2) == ("aa b", "cc")
    assert split_continuation("ab cd e", 2) == ("ab", "cd e")  # equally near: the earlier boundary
    assert split_continuation("one two three", 4) is None  # too few words
    assert split_continuation("one\ntwo", 2) is None  # no single space to cut at
    assert split_continuation("aaaaaaaaaa b\nc", 2) == ("aaaaaaaaaa", "b\nc")


def test_continue_skips_short_verses(corpus):
    df = build_examples(
        corpus, InstructionConfig(tasks=["continue"], min_continue_words=30, eval_per_task=0), seed=1
    )
    n_long = (corpus["text"].str.split().str.len() >= 30).sum()
    assert 0 < len(df) == n_long < len(corpus)
    assert df.attrs["instructions"]["skipped_short"] == len(corpus) - n_long


def test_label_tasks_need_the_kjv_corpus():
    corpus = make_corpus([("notes.txt", "some words of a plain text file here", "train")], source="text")
    with pytest.raises(
        LmpipeError, match=r"task 'testament' needs the kjv source .* corpus source is 'text'"
    ):
        build_examples(corpus, InstructionConfig(), seed=0)
    df = build_examples(corpus, InstructionConfig(tasks=["continue"]), seed=0)
    assert df["response"].tolist() == ["plain text file here"]
    with pytest.raises(LmpipeError, match="needs the kjv source"):
        build_mc(corpus, InstructionConfig(), seed=0)


# --- Encoding -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["bpe", "char"])
def tokenizer(request, corpus):
    # Trained like the tokenize stage, on documents (verses joined by newlines), so "\n" is in the char vocab.
    documents = documents_by_split(corpus)["train"][:20]
    return train_tokenizer(documents, TokenizerConfig(kind=request.param, vocab_size=400))


def test_encode_example_masks_exactly_the_prompt(tokenizer):
    prompt, response = BOOK_PROMPT.format(verse="In the beginning God created the heaven."), "Genesis"
    ids, labels = encode_example(tokenizer, CHAT_TEMPLATE, prompt, response, max_length=256, example_id="x")
    prompt_ids = encode_prompt(tokenizer, CHAT_TEMPLATE, prompt)
    n = len(prompt_ids)
    assert len(ids) == len(labels) and ids[:n] == prompt_ids
    assert labels[:n] == [IGNORE_INDEX] * n
    assert labels[n:] == ids[n:] and IGNORE_INDEX not in labels[n:]
    assert labels[-1] == tokenizer.token_to_id(END)
    assert tokenizer.decode(ids[n:], skip_special_tokens=False) == response + END
    full = prompt_text(prompt, CHAT_TEMPLATE) + response + END
    assert tokenizer.decode(ids, skip_special_tokens=False) == full
    # The prompt ends in the <|assistant|> special token, so encoding the parts apart changes nothing.
    assert ids == tokenizer.encode(full).ids


def test_encode_example_rejects_an_example_longer_than_the_context(tokenizer):
    prompt = "Continue the verse: " + "and the earth " * 40
    ids, _ = encode_example(tokenizer, CHAT_TEMPLATE, prompt, "was void.", max_length=10_000)
    with pytest.raises(
        LmpipeError,
        match=rf"^instruction example 'continue:Genesis 1:0' does not fit the context: {len(ids)} tokens > "
        r"model\.block_size 64$",
    ):
        encode_example(
            tokenizer, CHAT_TEMPLATE, prompt, "was void.", max_length=64, example_id="continue:Genesis 1:0"
        )
    fitting, _ = encode_example(tokenizer, CHAT_TEMPLATE, prompt, "was void.", max_length=len(ids))
    assert fitting == ids  # exactly the context is fine, one token less is not
    with pytest.raises(LmpipeError, match=rf"{len(ids)} tokens > model\.block_size {len(ids) - 1}$"):
        encode_example(tokenizer, CHAT_TEMPLATE, prompt, "was void.", max_length=len(ids) - 1)


# --- A user's JSONL -----------------------------------------------------------------------------------------


def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_examples_prompt_response_and_messages(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            json.dumps({"prompt": "Say hi", "response": "Hi!"}),
            "",
            json.dumps(
                {
                    "id": "greet",
                    "messages": [
                        {"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "Greet me"},
                        {"role": "assistant", "content": "Hello."},
                    ],
                }
            ),
        ],
    )
    cfg = InstructionConfig(jsonl=str(path), val_fraction=0.0, test_fraction=0.0)
    df = build_examples(None, cfg, seed=0)
    assert list(df.columns) == list(EXAMPLE_COLUMNS)
    assert df[["id", "task", "prompt", "response", "split"]].values.tolist() == [
        ["custom:mine.jsonl:1", "custom", "Say hi", "Hi!", "train"],
        ["custom:greet", "custom", "Be brief.\n\nGreet me", "Hello.", "train"],
    ]
    assert df["label"].isna().all()


def test_jsonl_split_is_deterministic_and_follows_the_fractions(tmp_path):
    lines = [json.dumps({"id": i, "prompt": f"q{i}", "response": f"a{i}"}) for i in range(1000)]
    path = write_lines(tmp_path / "many.jsonl", lines)
    fractions = {"val_fraction": 0.2, "test_fraction": 0.1}
    df = load_jsonl_examples(path, seed=5, **fractions)
    counts = df["split"].value_counts()
    assert 150 < counts["val"] < 250 and 60 < counts["test"] < 140
    pd.testing.assert_frame_equal(df, load_jsonl_examples(path, seed=5, **fractions))
    # The split hashes each record's id, not its line: reordering the file keeps every record's split.
    shuffled = write_lines(tmp_path / "shuffled.jsonl", lines[::-1])
    again = load_jsonl_examples(shuffled, seed=5, **fractions).set_index("id")["split"]
    assert again.sort_index().equals(df.set_index("id")["split"].sort_index())
    assert not load_jsonl_examples(path, seed=6, **fractions)["split"].equals(df["split"])


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "q", "response": ', "invalid JSON"),
        ('["q", "a"]', "expected one JSON object per line"),
        ('{"prompt": "q"}', "record has no response"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "record has no response"),
        ('{"prompt": "  ", "response": "a"}', "empty prompt"),
        (
            '{"messages": [{"role": "system", "content": ""}, {"role": "assistant", "content": "a"}]}',
            "empty prompt",
        ),
        (
            '{"messages": [{"role": "bot", "content": "q"}, {"role": "assistant", "content": "a"}]}',
            'role "bot"',
        ),
        (
            '{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]}',
            "content must be text",
        ),
        ('{"prompt": "q", "response": ["a"]}', "'response' must be text"),
        (
            '{"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}, '
            '{"role": "assistant", "content": "b"}]}',
            "single assistant message",
        ),
    ],
)
def test_jsonl_errors_name_path_and_line(tmp_path, line, message):
    path = write_lines(tmp_path / "bad.jsonl", [json.dumps({"prompt": "fine", "response": "ok"}), "", line])
    with pytest.raises(LmpipeError, match=r"bad\.jsonl:3: ") as err:
        load_jsonl_examples(path, seed=0)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_jsonl_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(LmpipeError, match=r"instructions\.jsonl='.*nope\.jsonl': no such file"):
        load_jsonl_examples(tmp_path / "nope.jsonl", seed=0)
    path = write_lines(tmp_path / "dup.jsonl", [json.dumps({"id": 1, "prompt": "q", "response": "a"})] * 2)
    with pytest.raises(LmpipeError, match=r"dup\.jsonl:2: duplicate example id 'custom:1'"):
        load_jsonl_examples(path, seed=0)


# --- Multiple choice ----------------------------------------------------------------------------------------


def test_mc_questions_are_well_formed(corpus):
    cfg = InstructionConfig(mc_questions=0, mc_choices=5)
    items = build_mc(corpus, cfg, seed=2)
    one_book = corpus.groupby("text")["book"].transform("nunique") == 1
    test_verses = corpus[(corpus["split"] == "test") & one_book]
    book_of_text = test_verses.groupby("text")["book"].first()
    assert len(items) == len(test_verses) > 50
    for item in items:
        verse = item["question"].removeprefix("Which book of the Bible is this verse from?\n")
        assert verse in book_of_text.index  # only verses of the test split
        choices = item["choices"]
        assert len(choices) == 5 == len(set(choices))
        assert choices["ABCDE".index(item["answer"])] == book_of_text[verse]
        assert set(choices) <= set(label_sets(corpus)["book"])
    assert build_mc(corpus, cfg, seed=2) == items
    assert len(build_mc(corpus, InstructionConfig(mc_questions=7), seed=2)) == 7


def test_mc_answer_letters_are_uniform(corpus):
    items = build_mc(corpus, InstructionConfig(mc_questions=2000), seed=0, split="train")
    counts = Counter(item["answer"] for item in items)
    assert len(items) == 2000 and set(counts) == set("ABCD")
    assert all(400 < n < 600 for n in counts.values()), counts


def test_mc_jsonl_round_trip_and_index_answers(tmp_path, corpus):
    items = build_mc(corpus, InstructionConfig(mc_questions=20), seed=1)
    path = tmp_path / "mc" / "test.jsonl"
    write_mc_jsonl(items, path)
    read = read_mc_jsonl(path)
    assert [(r.question, r.choices, "ABCD"[r.answer_index], r.subject) for r in read] == [
        (i["question"], i["choices"], i["answer"], i["subject"]) for i in items
    ]
    other = write_lines(
        tmp_path / "mmlu.jsonl", [json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": 1})]
    )
    assert read_mc_jsonl(other)[0].answer_index == 1 and read_mc_jsonl(other)[0].subject == ""


@pytest.mark.parametrize(
    "record, message",
    [
        ({"choices": ["a", "b"], "answer": "A"}, "missing key 'question'"),
        ({"question": "q", "answer": "A"}, "missing key 'choices'"),
        ({"question": "q", "choices": ["a", "b"]}, "missing key 'answer'"),
        ({"question": "q", "choices": ["a"], "answer": "A"}, "1 choice(s); expected at least 2"),
        ({"question": "q", "choices": ["a", "b"], "answer": "C"}, 'answer "C" is not among the 2 choices'),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer 2 is not among the 2 choices"),
        ({"question": "q", "choices": ["a", "b"], "answer": -1}, "answer -1 is not among"),
        ({"question": "q", "choices": ["a", 2], "answer": 0}, "'choices' must be a list of texts"),
    ],
)
def test_mc_reader_rejects_bad_files(tmp_path, record, message):
    good = {"question": "q", "choices": ["a", "b"], "answer": "B"}
    path = write_lines(tmp_path / "mc.jsonl", [json.dumps(good), json.dumps(record)])
    with pytest.raises(LmpipeError, match=r"mc\.jsonl:2: ") as err:
        read_mc_jsonl(path)
    assert message in str(err.value)


# --- Files --------------------------------------------------------------------------------------------------


def test_write_and_read_examples(tmp_path, corpus, examples):
    out = tmp_path / "instructions"
    stats = write_examples(examples, out)
    for split in ("train", "val", "test"):
        expected = examples[examples["split"] == split].reset_index(drop=True)
        pd.testing.assert_frame_equal(read_examples(out, split), expected)
        assert stats["total"][split] == len(expected)
    assert read_label_sets(out) == label_sets(corpus)
    saved = json.loads((out / "stats.json").read_text())
    assert saved == stats
    counts = examples.groupby(["split", "task"]).size()
    assert saved["examples"] == {
        split: {task: int(counts[split, task]) for task in ("testament", "book", "continue")}
        for split in ("train", "val", "test")
    }
    assert saved["dropped_ambiguous"] == examples.attrs["instructions"]["dropped_ambiguous"]
    first = (out / "train.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert json.loads(first)["id"] == examples["id"].iloc[0]
    assert not list(tmp_path.glob(".instructions*"))  # no temporary left behind


def test_readers_say_which_stage_to_run(tmp_path):
    for read in (lambda: read_examples(tmp_path, "train"), lambda: read_label_sets(tmp_path)):
        with pytest.raises(LmpipeError, match="run the instructions stage"):
            read()
    with pytest.raises(LmpipeError, match=r"split='dev': expected one of train, val, test"):
        read_examples(tmp_path, "dev")
    with pytest.raises(LmpipeError, match="run the instructions stage"):
        read_mc_jsonl(tmp_path / "mc.jsonl")
