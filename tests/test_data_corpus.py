import json

import pandas as pd
import pytest

from lmpipe.data.corpus import (
    CORPUS_COLUMNS,
    DataConfig,
    corpus_stats,
    prepare_corpus,
    read_corpus,
    write_corpus,
)
from lmpipe.data.sources import SOURCE_COLUMNS
from lmpipe.errors import LmpipeError


@pytest.fixture(scope="module")
def kjv_corpus():
    return prepare_corpus(DataConfig(source="kjv"), seed=0)


def test_corpus_columns_are_source_columns_plus_split():
    assert [c for c in CORPUS_COLUMNS if c != "split"] == list(SOURCE_COLUMNS)
    assert CORPUS_COLUMNS.index("split") == CORPUS_COLUMNS.index("text") + 1


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source": "bible"}, r"^data\.source='bible': expected one of kjv, pydoc, text$"),
        ({"unicode_form": "nfc"}, r"^data\.unicode_form='nfc': expected one of NFC, NFKC, NFD, NFKD$"),
        ({"dedup": "doc"}, r"^data\.dedup='doc': expected one of none, row, document$"),
        ({"val_fraction": 1.0}, r"^data\.val_fraction=1\.0: expected a fraction in \[0, 1\)$"),
        ({"test_fraction": -0.1}, r"^data\.test_fraction=-0\.1: expected a fraction"),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"^data\.val_fraction \+ data\.test_fraction = 1\.0"),
        ({"txt_paragraphs_per_doc": 0}, r"^data\.txt_paragraphs_per_doc=0: expected at least 1$"),
        ({"max_docs": -1}, r"^data\.max_docs=-1"),
        ({"source": "text"}, r"^data\.paths=\[\]: source 'text' needs at least one"),
    ],
)
def test_config_rejects_bad_values(fields, message):
    with pytest.raises(LmpipeError, match=message):
        DataConfig(**fields)


def test_config_fields_have_one_line_docstrings():
    import ast
    import dataclasses
    import inspect

    import lmpipe.data.corpus as corpus

    tree = ast.parse(inspect.getsource(corpus.DataConfig))
    body = tree.body[0].body
    fields = [n for n in body if isinstance(n, ast.AnnAssign)]
    for node in fields:
        doc = body[body.index(node) + 1]
        assert isinstance(doc, ast.Expr) and isinstance(doc.value.value, str), node.target.id
        assert "\n" not in doc.value.value, node.target.id
    assert [n.target.id for n in fields] == [f.name for f in dataclasses.fields(DataConfig)]


def test_kjv_corpus_schema_and_order(kjv_corpus):
    df = kjv_corpus
    assert tuple(df.columns) == CORPUS_COLUMNS
    assert {c: str(t) for c, t in df.dtypes.items()} == {
        "source": "str",
        "doc_id": "str",
        "group": "str",
        "position": "int64",
        "text": "str",
        "split": "str",
        "book": "str",
        "chapter": "Int64",
        "verse": "Int64",
    }
    assert len(df) == 31_102  # no duplicate chapters, so document dedup keeps every verse
    assert df["doc_id"].iloc[0] == "Genesis 1" and df["doc_id"].iloc[-1] == "Revelation 22"
    # Rows of a document are contiguous and in position order.
    assert (df.groupby("doc_id", sort=False).cumcount() == df["position"]).all()
    assert df["doc_id"].ne(df["doc_id"].shift()).sum() == df["doc_id"].nunique()
    assert not df["text"].str.contains(r"[\[\]]").any()  # strip_brackets defaults on
    assert df.index.tolist() == list(range(len(df)))


def test_prepare_is_deterministic_per_seed(kjv_corpus):
    cfg = DataConfig(source="kjv")
    assert prepare_corpus(cfg, seed=0).equals(kjv_corpus)
    assert not prepare_corpus(cfg, seed=1)["split"].equals(kjv_corpus["split"])


def test_kjv_row_dedup_removes_repeated_verses():
    df = prepare_corpus(DataConfig(source="kjv", dedup="row"), seed=0)
    assert not df["text"].duplicated().any()
    removed = df.attrs["prepare"]["duplicates_removed"]
    assert (
        removed == 31_102 - len(df) > 200
    )  # "And the LORD spake unto Moses, saying," alone repeats 72 times


def test_text_corpus_end_to_end(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paragraphs = [f"Paragraph number {i}." for i in range(60)]
    (tmp_path / "book.txt").write_text("\n\n".join(paragraphs + ["\u200b", paragraphs[0]]), encoding="utf-8")
    (tmp_path / "more.jsonl").write_text(
        "".join(json.dumps({"text": t}) + "\n" for t in ["x", "x", "  y  "]), encoding="utf-8"
    )
    cfg = DataConfig(source="text", paths=["*.txt", "*.jsonl"], txt_paragraphs_per_doc=10, dedup="document")
    df = prepare_corpus(cfg, seed=0)
    # book.txt: 7 documents (the last holds the zero-width paragraph, emptied, and a repeat); more.jsonl: x, x, y.
    assert df["doc_id"].unique().tolist() == [f"book.txt#{k}" for k in range(7)] + [
        "more.jsonl:1",
        "more.jsonl:3",
    ]
    assert df[df["doc_id"] == "book.txt#6"]["text"].tolist() == ["Paragraph number 0."]
    assert df["text"].iloc[-1] == "y"
    assert df.attrs["prepare"] == {
        "rows_loaded": 65,
        "empty_rows_removed": 1,
        "dedup": "document",
        "duplicates_removed": 1,
        "rows_removed_by_dedup": 1,
    }
    doc_split = df.drop_duplicates("doc_id").set_index("doc_id")["split"]
    assert set(doc_split[doc_split.index.str.startswith("book.txt")]) == {"train", "val", "test"}


def test_corpus_that_cleans_to_nothing_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ghost.jsonl").write_text('{"text": "\\u200b"}\n', encoding="utf-8")
    with pytest.raises(LmpipeError, match="every row is empty after cleaning"):
        prepare_corpus(DataConfig(source="text", paths=["ghost.jsonl"]), seed=0)


def test_corpus_stats_are_consistent_and_json_serialisable(kjv_corpus):
    stats = corpus_stats(kjv_corpus)
    assert json.loads(json.dumps(stats)) == stats
    assert stats["rows"] == 31_102 and stats["documents"] == 1_189 and stats["groups"] == 66
    assert stats["chars"] == int(kjv_corpus["text"].str.len().sum())
    for key in ("rows", "documents", "chars"):
        assert sum(part[key] for part in stats["splits"].values()) == stats[key]
    assert stats["splits"]["val"]["groups"] == stats["splits"]["test"]["groups"] >= 60
    assert stats["removed"]["rows_loaded"] == 31_102


def test_write_then_read_round_trips(tmp_path):
    df = prepare_corpus(DataConfig(source="pydoc", max_docs=5), seed=0)
    target = tmp_path / "data" / "corpus.parquet"
    write_corpus(df, target)
    write_corpus(df, target)  # overwriting leaves no temporary files behind
    assert sorted(p.name for p in target.parent.iterdir()) == ["corpus.parquet"]
    back = read_corpus(target)
    pd.testing.assert_frame_equal(back, df)
    assert back.attrs["prepare"] == df.attrs["prepare"]


def test_read_corpus_errors(tmp_path):
    with pytest.raises(LmpipeError, match=r"missing input .*nope\.parquet \(run the 'prepare' stage first"):
        read_corpus(tmp_path / "nope.parquet")
    pd.DataFrame({"text": ["a"]}).to_parquet(tmp_path / "old.parquet")
    with pytest.raises(LmpipeError, match=r"old\.parquet: corpus lacks columns \['source', 'doc_id'"):
        read_corpus(tmp_path / "old.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(LmpipeError, match=r"junk\.parquet: not a readable parquet corpus"):
        read_corpus(tmp_path / "junk.parquet")
