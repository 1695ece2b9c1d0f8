"""Tests for lmpipe.data.documents: the streamed documents are exactly `documents_by_split`'s."""

import pytest

from lmpipe.data.corpus import DataConfig, documents_by_split, prepare_corpus, write_corpus
from lmpipe.data.documents import iter_documents, sample_documents, split_chars, split_documents
from lmpipe.data.splits import SPLITS
from lmpipe.errors import LmpipeError


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    df = prepare_corpus(DataConfig(books=["Ruth", "Jonah", "Jude"]), seed=3)
    path = tmp_path_factory.mktemp("prepared") / "corpus.parquet"
    write_corpus(df, path)
    return df, path


@pytest.mark.parametrize("batch_rows", [7, 8192])  # 7: documents span record batches
def test_streamed_documents_are_documents_by_split(corpus, monkeypatch, batch_rows):
    df, path = corpus
    monkeypatch.setattr("lmpipe.data.documents.BATCH_ROWS", batch_rows)
    expected = documents_by_split(df)
    streamed = {split: [] for split in SPLITS}
    for split, text in iter_documents(path):
        streamed[split].append(text)
    assert streamed == expected
    assert all(expected.values())  # every split has documents, so the comparison means something
    assert list(split_documents(path, "val")) == expected["val"]
    for split in SPLITS:
        assert split_chars(path, split) == sum(len(doc) for doc in expected[split])


def test_sample_documents_spreads_about_the_asked_characters():
    docs = [f"{i:03d}" + "x" * (i % 7) for i in range(300)]
    total = sum(map(len, docs))
    assert list(sample_documents(iter(docs), total, 0)) == docs
    assert list(sample_documents(iter(docs), total, total)) == docs
    sample = list(sample_documents(iter(docs), total, total // 4))
    assert abs(sum(map(len, sample)) - total // 4) <= 10
    assert sample == list(sample_documents(iter(docs), total, total // 4))  # deterministic
    # Spread over the whole sequence, not its head: samples from every quarter.
    assert {int(doc[:3]) // 75 for doc in sample} == {0, 1, 2, 3}


def test_truncated_corpus_is_a_one_line_error(corpus, tmp_path):
    broken = tmp_path / "corpus.parquet"
    data = corpus[1].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    for read in (lambda: list(iter_documents(broken)), lambda: split_chars(broken, "train")):
        with pytest.raises(LmpipeError, match="not a readable parquet corpus") as err:
            read()
        assert str(broken) in str(err.value) and "\n" not in str(err.value)


def test_corpus_without_the_columns_is_an_error(tmp_path):
    import pandas as pd

    path = tmp_path / "corpus.parquet"
    pd.DataFrame({"text": ["a"]}).to_parquet(path)
    with pytest.raises(LmpipeError, match=r"lacks columns \['split', 'doc_id'\]"):
        list(iter_documents(path))
