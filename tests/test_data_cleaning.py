import pandas as pd
import pytest

from lmpipe.data.cleaning import clean_corpus, clean_text, deduplicate
from lmpipe.errors import LmpipeError


@pytest.mark.parametrize(
    "raw, as_written, collapsed",
    [
        ("  plain text  ", "  plain text  ", "plain text"),
        ("tab\tand   spaces", "tab\tand   spaces", "tab and spaces"),
        ("zero\u200bwidth and \ufeffBOM", "zerowidth and BOM", "zerowidth and BOM"),
        ("bell\x07 and del\x7f and C1\x85", "bell and del and C1", "bell and del and C1"),
        ("no-break\u00a0space and\u2003em", "no-break\u00a0space and\u2003em", "no-break space and em"),
        ("windows\r\nlines\rold mac", "windows\nlines\nold mac", "windows lines old mac"),
        ("a  \n  b", "a  \n  b", "a b"),
        ("a\n\n\n\n\nb", "a\n\n\n\n\nb", "a b"),
        ("def f():\n    return 1\n", "def f():\n    return 1\n", "def f(): return 1"),
        ("\n\n  \t", "\n\n  \t", ""),
        ("cafe\u0301", "caf\u00e9", "caf\u00e9"),  # NFC composes e + combining acute
    ],
)
def test_clean_text(raw, as_written, collapsed):
    assert clean_text(raw) == as_written
    assert clean_text(raw, collapse_whitespace=True) == collapsed


def test_unicode_forms():
    assert clean_text("\ufb01ne \u216b", "NFC") == "\ufb01ne \u216b"  # ligature and roman numeral kept
    assert clean_text("\ufb01ne \u216b", "NFKC") == "fine XII"
    assert clean_text("caf\u00e9", "NFD") == "cafe\u0301"
    with pytest.raises(LmpipeError, match="data.unicode_form='NFX'"):
        clean_text("x", "NFX")


def test_strip_brackets_keeps_the_words():
    assert clean_text("that [it was] good", strip_brackets=True) == "that it was good"
    assert clean_text("that [it was] good", strip_brackets=False) == "that [it was] good"


def test_lowercase_result_is_still_normalised():
    assert clean_text("\u216b Caf\u00c9", "NFKC", lowercase=True) == "xii caf\u00e9"


def frame(rows):
    """Rows as (source, doc_id, text); positions numbered within each document."""
    df = pd.DataFrame(rows, columns=["source", "doc_id", "text"])
    df["group"] = "g"
    df["position"] = df.groupby("doc_id", sort=False).cumcount()
    return df


def test_clean_corpus_drops_empty_rows_and_renumbers_positions():
    df = frame(
        [("text", "d1", " a "), ("text", "d1", "\u200b \t"), ("text", "d1", "b"), ("text", "d2", "\n")]
    )
    out = clean_corpus(df)
    assert out["text"].tolist() == [" a ", "b"]
    assert out["position"].tolist() == [0, 1]
    assert out.index.tolist() == [0, 1]


def test_clean_corpus_strips_brackets_only_in_kjv_rows():
    df = frame([("kjv", "Genesis 1", "that [it was] good"), ("text", "code", "x[0] = y")])
    out = clean_corpus(df, strip_brackets=True, lowercase=True)
    assert out["text"].tolist() == ["that it was good", "x[0] = y"]


def test_deduplicate_rows_keeps_first_occurrence_anywhere():
    df = frame([("text", "d1", "a"), ("text", "d1", "b"), ("text", "d2", "a"), ("text", "d2", "c")])
    out, removed = deduplicate(df, "row")
    assert removed == 1
    assert list(zip(out["doc_id"], out["text"], out["position"], strict=True)) == [
        ("d1", "a", 0),
        ("d1", "b", 1),
        ("d2", "c", 0),
    ]


def test_deduplicate_documents_needs_the_whole_sequence_to_match():
    df = frame(
        [
            ("text", "d1", "a"),
            ("text", "d1", "b"),
            ("text", "d2", "a"),  # a prefix of d1, kept
            ("text", "d3", "a"),
            ("text", "d3", "b"),  # same as d1, dropped
            ("text", "d4", "ab"),  # same characters, different rows, kept
        ]
    )
    out, removed = deduplicate(df, "document")
    assert removed == 1
    assert out["doc_id"].unique().tolist() == ["d1", "d2", "d4"]


def test_deduplicate_none_changes_nothing():
    df = frame([("text", "d1", "a"), ("text", "d2", "a")])
    out, removed = deduplicate(df, "none")
    assert removed == 0 and out.equals(df)


def test_deduplicate_rejects_unknown_mode():
    with pytest.raises(LmpipeError, match="data.dedup='rows': expected one of none, row, document"):
        deduplicate(frame([("text", "d1", "a")]), "rows")
