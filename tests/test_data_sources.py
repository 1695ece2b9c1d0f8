import json
import subprocess
import sys

import pytest

from lmpipe.data.sources import SOURCE_COLUMNS, load_kjv, load_pydoc, load_text, split_paragraphs
from lmpipe.errors import LmpipeError


@pytest.fixture(scope="module")
def kjv():
    return load_kjv()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


# --- KJV ---------------------------------------------------------------------------------------------------


def test_kjv_has_every_verse_as_a_row(kjv):
    assert tuple(kjv.columns) == SOURCE_COLUMNS
    assert len(kjv) == 31_102
    assert kjv["doc_id"].nunique() == 1_189  # chapters
    assert kjv["group"].nunique() == 66  # books
    first, last = kjv.iloc[0], kjv.iloc[-1]
    assert (first["doc_id"], first["book"], first["chapter"], first["verse"]) == (
        "Genesis 1",
        "Genesis",
        1,
        1,
    )
    assert first["text"] == "In the beginning God created the heaven and the earth."
    assert (last["doc_id"], last["verse"]) == ("Revelation 22", 21)
    assert (kjv["position"] == kjv["verse"] - 1).all()
    assert (kjv["group"] == kjv["book"]).all()
    assert str(kjv["chapter"].dtype) == "Int64" and str(kjv["verse"].dtype) == "Int64"


def test_kjv_coordinates_agree_with_pythonbible(kjv):
    import pythonbible

    # The loader decodes verse ids arithmetically; check it against the library's own (slow) decoder.
    for verse_id in (1001001, 9001001, 19119176, 65001025, 66022021):
        book, chapter, verse = pythonbible.get_book_chapter_verse(verse_id)
        row = kjv[(kjv["book"] == book.title) & (kjv["chapter"] == chapter) & (kjv["verse"] == verse)]
        assert len(row) == 1
        assert row["doc_id"].item() == f"{book.title} {chapter}"


def test_kjv_keeps_translator_brackets_for_cleaning_to_handle(kjv):
    assert kjv["text"].iloc[1].count("[was]") == 1


def test_kjv_books_filter_keeps_bible_order_and_matches_case_insensitively():
    df = load_kjv(books=["1 samuel", "Ruth"])
    assert df["group"].unique().tolist() == ["Ruth", "1 Samuel"]
    assert df["doc_id"].nunique() == 4 + 31


def test_kjv_unknown_book_suggests_a_title():
    with pytest.raises(
        LmpipeError, match=r"data\.books: unknown KJV book 'Genesys' \(did you mean 'Genesis'\?\)"
    ):
        load_kjv(books=["Genesys"])


def test_kjv_max_docs_keeps_the_first_chapters():
    df = load_kjv(max_docs=3)
    assert df["doc_id"].unique().tolist() == ["Genesis 1", "Genesis 2", "Genesis 3"]


# --- pydoc -------------------------------------------------------------------------------------------------


def test_pydoc_topics_become_paragraph_rows_as_written():
    from pydoc_data.topics import topics

    df = load_pydoc()
    assert df["doc_id"].nunique() == len(topics) == 79
    assert (df["group"] == "pydoc").all() and df["book"].isna().all() and df["verse"].isna().all()
    assert not (df["text"].str.strip() == "").any()
    assert_positions_count_from_zero(df)
    first = df[df["doc_id"] == "pydoc:assert"]["text"].tolist()
    assert first[:3] == [
        'The "assert" statement\n**********************\n',
        "Assert statements are a convenient way to insert debugging assertions\ninto a program:\n",
        '   assert_stmt ::= "assert" expression ["," expression]\n',
    ]
    # Every topic's paragraphs, joined as documents are, give back the topic's text exactly.
    for name, rows in df.groupby("doc_id", sort=False)["text"]:
        assert "\n".join(rows) == topics[name.removeprefix("pydoc:")], name


def test_pydoc_collapsed_paragraphs_are_single_lines():
    df = load_pydoc(max_docs=3, collapse_whitespace=True)
    assert not df["text"].str.contains("\n|  ").any()
    first = df[df["doc_id"] == "pydoc:assert"]["text"].tolist()
    assert first[1] == "Assert statements are a convenient way to insert debugging assertions into a program:"


def test_pydoc_max_docs():
    from pydoc_data.topics import topics

    df = load_pydoc(max_docs=2)
    assert df["doc_id"].unique().tolist() == [f"pydoc:{name}" for name in list(topics)[:2]]


# --- text files --------------------------------------------------------------------------------------------


def test_split_paragraphs_keeps_text_as_written():
    text = "one\n  two\tthree\n\n \t\n\n    four  five\n\n\n\nsix"
    # The empty line after a paragraph separates it from the next; extra empty lines stay with the paragraph.
    assert split_paragraphs(text) == ["one\n  two\tthree\n", "    four  five\n\n\n", "six"]
    poem = "Roses are red,\n  violets are blue.\n\nSugar is sweet.\n"
    assert "\n".join(split_paragraphs(poem)) == poem


def test_split_paragraphs_collapsing_whitespace():
    text = "one\n  two\tthree\n\n \t\n\nfour\n\n\n"
    assert split_paragraphs(text, collapse_whitespace=True) == ["one two three", "four"]


def test_txt_paragraphs_are_grouped_into_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text(
        "p0\n\np1\r\n\r\np2 line one\nline two\n\np3\n\np4\n", encoding="utf-8"
    )
    df = load_text(["notes.txt"], txt_paragraphs_per_doc=2)
    assert df["doc_id"].tolist() == [
        "notes.txt#0",
        "notes.txt#0",
        "notes.txt#1",
        "notes.txt#1",
        "notes.txt#2",
    ]
    assert df["position"].tolist() == [0, 1, 0, 1, 0]
    assert df["text"].tolist() == ["p0\n", "p1\n", "p2 line one\nline two\n", "p3\n", "p4\n"]
    assert (df["group"] == "notes.txt").all() and (df["source"] == "text").all()
    collapsed = load_text(["notes.txt"], txt_paragraphs_per_doc=2, collapse_whitespace=True)
    assert collapsed["text"].tolist() == ["p0", "p1", "p2 line one line two", "p3", "p4"]


def test_jsonl_records_are_documents(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"id": "x1", "body": "first"}, {"body": "second\nline"}])
    df = load_text(["a.jsonl"], text_field="body")
    assert df["doc_id"].tolist() == ["x1", "a.jsonl:2"]
    assert df["text"].tolist() == ["first", "second\nline"]
    assert df["position"].tolist() == [0, 0]


def test_globs_expand_in_sorted_order_without_repeats(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "corpus" / "a.txt").write_text("ay", encoding="utf-8")
    write_jsonl(tmp_path / "corpus" / "c.jsonl", [{"text": "sea"}])
    df = load_text(["corpus/*.txt", "corpus/a.txt", "corpus/*.jsonl"])
    assert df["group"].tolist() == ["a.txt", "b.txt", "c.jsonl"]


def test_max_docs_stops_before_reading_later_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("one\n\ntwo", encoding="utf-8")
    (tmp_path / "b.txt").write_bytes(b"")  # would be an error if it were read
    df = load_text(["a.txt", "b.txt"], txt_paragraphs_per_doc=1, max_docs=2)
    assert df["doc_id"].tolist() == ["a.txt#0", "a.txt#1"]


# --- bad input: one line naming the file -------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", b"", r"^empty\.txt: file is empty, expected UTF-8 text$"),
        ("blank.txt", b" \n\n\t\n", r"^blank\.txt: file holds only whitespace"),
        ("latin1.txt", b"caf\xe9 ok", r"^latin1\.txt: not valid UTF-8 at byte 3; expected UTF-8 text$"),
        ("bad.jsonl", b'{"text": "ok"}\n{"text": oops}\n', r"^bad\.jsonl:2: invalid JSON: "),
        ("list.jsonl", b'["text"]\n', r"^list\.jsonl:1: expected one JSON object per line"),
        (
            "nofield.jsonl",
            b'{"text": "ok"}\n\n{"body": "x", "id": 3}\n',
            r"^nofield\.jsonl:3: record has no 'text' field \(set data\.text_field\); keys: \['body', 'id'\]$",
        ),
        (
            "nonstr.jsonl",
            b'{"text": 42}\n',
            r"^nonstr\.jsonl:1: field 'text' must be non-empty text, got 42$",
        ),
        ("emptytext.jsonl", b'{"text": "  "}\n', r"^emptytext\.jsonl:1: field 'text' must be non-empty text"),
        ("blank.jsonl", b"\n\n", r"^blank\.jsonl: no JSON records"),
        ("badid.jsonl", b'{"text": "a", "id": [1]}\n', r"^badid\.jsonl:1: field 'id' must be"),
        ("dupid.jsonl", b'{"text": "a", "id": 1}\n{"text": "b", "id": "1"}\n', r"^dupid\.jsonl:2: duplicate"),
        ("table.csv", b"a,b\n", r"^table\.csv: unsupported extension '\.csv'; expected \.txt or \.jsonl$"),
    ],
)
def test_bad_files_raise_one_line_naming_the_file(tmp_path, monkeypatch, name, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LmpipeError, match=message) as info:
        load_text([name])
    assert "\n" not in str(info.value)


def test_glob_matching_nothing_names_the_pattern(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmpipeError, match=r"data\.paths: 'corpus/\*\.txt' matches no files"):
        load_text(["corpus/*.txt"])


def test_missing_plain_path_is_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LmpipeError, match=r"^missing\.txt: no such file"):
        load_text(["missing.txt"])


def test_same_file_name_in_two_folders_is_rejected(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text("x", encoding="utf-8")
    with pytest.raises(LmpipeError, match=r"^b/notes\.txt: same file name as a/notes\.txt"):
        load_text(["*/notes.txt"])


def assert_positions_count_from_zero(df):
    expected = df.groupby("doc_id", sort=False).cumcount()
    assert (df["position"] == expected).all()


def test_leaf_modules_do_not_import_the_orchestrator():
    code = (
        "import sys, lmpipe.data.cleaning, lmpipe.data.sources; sys.exit('lmpipe.data.corpus' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
