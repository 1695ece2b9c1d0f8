import json
import unicodedata

import pandas as pd
import pytest

from lmpipe.data.corpus import (
    CORPUS_COLUMNS,
    DataConfig,
    corpus_stats,
    documents_by_split,
    load_source,
    prepare_corpus,
    read_corpus,
    write_corpus,
)
from lmpipe.data.sources import SOURCE_COLUMNS
from lmpipe.errors import LmpipeError
from lmpipe.formats import EOT
from lmpipe.tokenizer import TokenizerConfig, read_shard, train_tokenizer, write_shards


@pytest.fixture(scope="module")
def kjv_corpus():
    return prepare_corpus(DataConfig(source="kjv"), seed=0)


def test_corpus_columns_are_source_columns_plus_split():
    assert [c for c in CORPUS_COLUMNS if c != "split"] == list(SOURCE_COLUMNS)
    assert CORPUS_COLUMNS.index("split") == CORPUS_COLUMNS.index("text") + 1


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source": "bible"}, r"^data\.source='bible': expected 'kjv', 'pydoc' or 'text'$"),
        ({"unicode_form": "nfc"}, r"^data\.unicode_form='nfc': expected 'NFC', 'NFKC', 'NFD' or 'NFKD'$"),
        ({"dedup": "doc"}, r"^data\.dedup='doc': expected 'none', 'row' or 'document'$"),
        ({"val_fraction": 1.0}, r"^data\.val_fraction=1\.0: expected a value less than 1$"),
        (
            {"test_fraction": -0.1},
            r"^data\.test_fraction=-0\.1: expected a value greater than or equal to 0$",
        ),
        ({"val_fraction": 0.5, "test_fraction": 0.5}, r"^data\.val_fraction \+ data\.test_fraction = 1\.0"),
        ({"txt_paragraphs_per_doc": 0}, r"^data\.txt_paragraphs_per_doc=0: expected a value greater than or"),
        ({"max_docs": -1}, r"^data\.max_docs=-1: expected a value greater than or equal to 0$"),
        ({"collapse_whitespace": "yes"}, r"^data\.collapse_whitespace='yes': expected a valid boolean$"),
        ({"book": ["Ruth"]}, r"^data\.book: unknown field$"),
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


def test_load_source_dispatches_on_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("hello  you\n", encoding="utf-8")
    assert load_source(DataConfig(source="text", paths=["a.txt"]))["text"].tolist() == ["hello  you\n"]
    collapsed = DataConfig(source="text", paths=["a.txt"], collapse_whitespace=True)
    assert load_source(collapsed)["text"].tolist() == ["hello you"]
    assert load_source(DataConfig(source="kjv", books=["Jude"]))["doc_id"].unique().tolist() == ["Jude 1"]


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
    assert df[df["doc_id"] == "book.txt#0"]["text"].iloc[0] == "Paragraph number 0.\n"
    assert df["text"].iloc[-1] == "  y  "  # as written
    assert df.attrs["prepare"] == {
        "rows_loaded": 65,
        "empty_rows_removed": 1,
        "dedup": "document",
        "duplicates_removed": 1,
        "rows_removed_by_dedup": 1,
    }
    doc_split = df.drop_duplicates("doc_id").set_index("doc_id")["split"]
    assert set(doc_split[doc_split.index.str.startswith("book.txt")]) == {"train", "val", "test"}


# A Python file and a poem as an editor might save them: a BOM, CRLF line breaks, an invisible zero-width
# space, a decomposed accent; indentation, tabs, runs of spaces, trailing spaces and line breaks inside
# paragraphs, two empty lines between functions, a whitespace-only line inside a paragraph.
PYTHON_SOURCE = (
    "\ufeff# A module\u200b with code.\r\n"
    "import os\r\n\r\n\r\n"
    "def walk(root):\r\n"
    '    """Yield every file."""\r\n'
    "    for folder, _, names in os.walk(root):\r\n"
    "        for name in names:  # two spaces before the comment\r\n"
    "    \r\n"
    "\t\tyield os.path.join(folder, name)\r\n\r\n"
    "    return   None   \r\n"
)
POEM = (
    "The Rose\n\n"
    "Roses are red,\n"
    "    violets are blue;\n"
    "  sugar is   sweet,\n"
    "and so is the cafe\u0301.\n\n\n"
    "      (the end)\n"
)


def documented_normalisations(raw: str) -> str:
    """What cleaning may change by default: the BOM and invisible characters go, CRLF becomes LF, NFC."""
    text = raw.removeprefix("\ufeff").replace("\r\n", "\n").replace("\u200b", "")
    return unicodedata.normalize("NFC", text)


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_text_round_trips_through_prepare_and_tokenizers(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "walk.py.txt").write_bytes(PYTHON_SOURCE.encode("utf-8"))
    (tmp_path / "rose.txt").write_bytes(POEM.encode("utf-8"))
    expected = {documented_normalisations(raw) for raw in (PYTHON_SOURCE, POEM)}
    assert expected == {
        PYTHON_SOURCE[1:].replace("\r\n", "\n").replace("\u200b", ""),
        POEM.replace("e\u0301", "\u00e9"),
    }

    corpus = prepare_corpus(
        DataConfig(source="text", paths=["*.txt"], val_fraction=0, test_fraction=0), seed=0
    )
    docs = documents_by_split(corpus)
    assert set(docs["train"]) == expected  # one document per file, byte for byte the cleaned file

    tok = train_tokenizer(docs["train"], TokenizerConfig(kind=kind, vocab_size=400))
    write_shards(tmp_path / "tokens", docs, tok, show_progress=False)
    ids = read_shard(tmp_path / "tokens", "train").tolist()
    eot = tok.token_to_id(EOT)
    decoded, start = [], 0
    for end in [i for i, token in enumerate(ids) if token == eot]:
        decoded.append(tok.decode(ids[start:end]))
        start = end + 1
    assert set(decoded) == expected and len(decoded) == 2


def test_jsonl_and_txt_treat_whitespace_alike(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rose.txt").write_text(POEM, encoding="utf-8")
    (tmp_path / "rose.jsonl").write_text(json.dumps({"text": POEM}) + "\n", encoding="utf-8")
    cfg = DataConfig(source="text", paths=["rose.*"], dedup="none", val_fraction=0, test_fraction=0)
    as_written = documents_by_split(prepare_corpus(cfg, seed=0))["train"]
    assert as_written == [documented_normalisations(POEM)] * 2

    cfg = DataConfig(source="text", paths=["rose.*"], collapse_whitespace=True, dedup="none")
    corpus = prepare_corpus(cfg, seed=0)
    # Every text becomes one line; the .txt keeps its paragraphs apart as rows.
    assert corpus["text"].tolist() == [
        "The Rose Roses are red, violets are blue; sugar is sweet, and so is the caf\u00e9. (the end)",
        "The Rose",
        "Roses are red, violets are blue; sugar is sweet, and so is the caf\u00e9.",
        "(the end)",
    ]


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


def test_sample_corpus_is_bounded_and_seeded(tmp_path):
    from lmpipe.data.corpus import sample_corpus
    from lmpipe.data.streaming import prepare_to_file

    path = tmp_path / "corpus.parquet"
    prepare_to_file(DataConfig(source="kjv", books=["Genesis", "Ruth"], workers=1), 0, path)
    whole = read_corpus(path)
    chars = int(whole["text"].str.len().sum())
    pd.testing.assert_frame_equal(sample_corpus(path, chars, seed=0), whole)
    pd.testing.assert_frame_equal(sample_corpus(path, 0, seed=0), whole)
    sample = sample_corpus(path, chars // 4, seed=0)
    assert 0.15 < sample["text"].str.len().sum() / chars < 0.35
    assert list(sample.columns) == list(CORPUS_COLUMNS)
    # A subsequence of the corpus, in corpus order, the same for the same seed and different for another.
    keys = whole["doc_id"] + ":" + whole["position"].astype(str)
    picked = (sample["doc_id"] + ":" + sample["position"].astype(str)).tolist()
    assert picked == [k for k in keys if k in set(picked)]
    pd.testing.assert_frame_equal(sample_corpus(path, chars // 4, seed=0), sample)
    assert not sample_corpus(path, chars // 4, seed=1).equals(sample)
    assert list(sample_corpus(path, chars // 4, seed=0, columns=["text", "split"]).columns) == [
        "text",
        "split",
    ]
