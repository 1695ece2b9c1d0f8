import pandas as pd
import pytest

from lmpipe.data.sources import load_kjv
from lmpipe.data.splits import assign_splits
from lmpipe.errors import LmpipeError


@pytest.fixture(scope="module")
def kjv():
    return load_kjv()


def synthetic(docs_per_group: dict[str, int], rows_per_doc: int = 3) -> pd.DataFrame:
    rows = [
        (group, f"{group}-{d}", r, f"{group} {d} {r}")
        for group, n_docs in docs_per_group.items()
        for d in range(n_docs)
        for r in range(rows_per_doc)
    ]
    return pd.DataFrame(rows, columns=["group", "doc_id", "position", "text"])


def doc_splits(df: pd.DataFrame) -> pd.Series:
    return df.groupby("doc_id")["split"].agg(lambda s: s.iloc[0])


def test_split_column_follows_text():
    out = assign_splits(synthetic({"a": 5}), 0.2, 0.2, seed=0)
    assert out.columns.tolist() == ["group", "doc_id", "position", "text", "split"]
    assert set(out["split"]) <= {"train", "val", "test"}


def test_same_seed_same_split_other_seed_differs(kjv):
    a = assign_splits(kjv, 0.05, 0.05, seed=1)
    b = assign_splits(kjv, 0.05, 0.05, seed=1)
    c = assign_splits(kjv, 0.05, 0.05, seed=2)
    assert a["split"].tolist() == b["split"].tolist()
    assert a["split"].tolist() != c["split"].tolist()


def test_split_does_not_depend_on_row_order_or_other_groups():
    df = synthetic({"a": 20, "b": 7, "c": 2})
    full = doc_splits(assign_splits(df, 0.1, 0.1, seed=3))
    shuffled = doc_splits(assign_splits(df.sample(frac=1, random_state=0), 0.1, 0.1, seed=3))
    only_b = doc_splits(assign_splits(df[df["group"] == "b"], 0.1, 0.1, seed=3))
    assert full.equals(shuffled)
    assert only_b.equals(full[only_b.index])


def test_whole_documents_never_span_splits(kjv):
    out = assign_splits(kjv, 0.05, 0.05, seed=0)
    assert (out.groupby("doc_id")["split"].nunique() == 1).all()


def test_every_kjv_book_with_three_chapters_has_val_and_test_chapters(kjv):
    out = assign_splits(kjv, 0.05, 0.05, seed=0)
    chapters = out.drop_duplicates("doc_id")
    per_book = chapters.groupby("group")["split"].agg(set)
    n_chapters = chapters.groupby("group").size()
    big_books = n_chapters[n_chapters >= 3].index
    assert len(big_books) == 60
    for book in big_books:
        assert {"train", "val", "test"} <= per_book[book], book


def test_stratified_counts_per_group():
    df = synthetic({"big": 40, "mid": 10, "three": 3})
    splits = doc_splits(assign_splits(df, 0.1, 0.2, seed=0))
    group = splits.index.str.split("-").str[0]
    counts = pd.crosstab(group, splits)
    # max(1, round(f * n)) documents each for val and test; the rest train.
    assert counts.loc["big"].to_dict() == {"test": 8, "train": 28, "val": 4}
    assert counts.loc["mid"].to_dict() == {"test": 2, "train": 7, "val": 1}
    assert counts.loc["three"].to_dict() == {"test": 1, "train": 1, "val": 1}


def test_large_fractions_leave_a_training_document():
    splits = doc_splits(assign_splits(synthetic({"g": 4}), 0.49, 0.49, seed=0))
    assert (splits == "train").sum() == 1


def test_zero_fraction_holds_nothing_out():
    splits = doc_splits(assign_splits(synthetic({"g": 30}), 0.0, 0.1, seed=0))
    assert set(splits) == {"train", "test"}


def test_small_groups_follow_the_fractions_by_hash():
    df = synthetic({f"g{i}": 1 for i in range(2000)}, rows_per_doc=1)
    shares = assign_splits(df, 0.1, 0.3, seed=0)["split"].value_counts(normalize=True)
    assert shares["val"] == pytest.approx(0.1, abs=0.03)
    assert shares["test"] == pytest.approx(0.3, abs=0.03)


def test_bad_fractions_are_rejected():
    with pytest.raises(LmpipeError, match=r"data\.val_fraction=0\.6, data\.test_fraction=0\.5"):
        assign_splits(synthetic({"g": 3}), 0.6, 0.5, seed=0)
