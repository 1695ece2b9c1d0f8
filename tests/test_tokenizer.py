import json
import os
from pathlib import Path
from pydoc_data.topics import topics

import numpy as np
import pytest

from lmpipe.errors import LmpipeError
from lmpipe.formats import EOT, PAD, SPECIAL_TOKENS, UNK
from lmpipe.tokenizer import (
    TokenizerConfig,
    encode_documents,
    load_tokenizer,
    read_meta,
    read_shard,
    save_tokenizer,
    token_dtype,
    tokenizer_hash,
    train_tokenizer,
    write_shards,
)

# The Python docs topics: ~470k characters of varied English prose and code, no download needed.
TEXTS = [topics[key] for key in sorted(topics)]
UNICODE_TEXT = "Héllo  wörld!\n\n  café — naïve 👍🏽 日本語\ttab\r\nend   "


@pytest.fixture(scope="module")
def bpe():
    return train_tokenizer(TEXTS, TokenizerConfig(kind="bpe", vocab_size=1024))


@pytest.fixture(scope="module")
def char():
    return train_tokenizer(TEXTS, TokenizerConfig(kind="char"))


def test_bpe_round_trips_unicode_text_never_seen_in_training(bpe):
    ids = bpe.encode(UNICODE_TEXT).ids
    assert bpe.decode(ids) == UNICODE_TEXT
    # Byte-level: every id is a real vocabulary entry, no unknown fallback.
    assert all(0 <= i < bpe.get_vocab_size() for i in ids)


def test_bpe_merges_common_words(bpe):
    # Trained merges must compress: far fewer tokens than bytes on in-domain text.
    text = TEXTS[0]
    assert len(bpe.encode(text).ids) < 0.5 * len(text.encode("utf-8"))


def test_char_round_trips_seen_characters_including_whitespace(char):
    text = "def f(x):\n    return  x  # two spaces\n\n   done."
    assert set(text) <= set(char.get_vocab())
    encoding = char.encode(text)
    assert len(encoding.ids) == len(text)  # one token per character
    assert char.decode(encoding.ids) == text


def test_char_maps_unseen_character_to_unk(char):
    unk_id = char.token_to_id(UNK)
    assert unk_id == len(SPECIAL_TOKENS)
    ids = char.encode("a☃b").ids
    assert ids == [char.token_to_id("a"), unk_id, char.token_to_id("b")]


def test_char_vocab_is_sorted_seen_characters():
    tok = train_tokenizer(["cab", "b a\n"], TokenizerConfig(kind="char"))
    vocab = tok.get_vocab()
    chars = sorted(vocab, key=vocab.get)[len(SPECIAL_TOKENS) + 1 :]
    assert chars == ["\n", " ", "a", "b", "c"]


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_special_tokens_have_fixed_ids_and_encode_as_single_tokens(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    ids = tok.encode(f"hi{EOT}there{PAD}").ids
    assert ids.count(0) == 1 and ids.count(1) == 1
    assert ids[-1] == 1
    assert ids[ids.index(0) - 1] != 0 and tok.decode(ids[: ids.index(0)]) == "hi"


def test_bpe_vocab_size_is_a_maximum():
    cfg = TokenizerConfig(kind="bpe", vocab_size=300)
    tok = train_tokenizer(TEXTS, cfg)
    assert tok.get_vocab_size() == 300  # plenty of text: the trainer reaches the maximum exactly
    small = train_tokenizer(["tiny corpus tiny corpus"], TokenizerConfig(kind="bpe", vocab_size=4096))
    assert len(SPECIAL_TOKENS) + 256 <= small.get_vocab_size() < 4096


def test_char_vocab_too_small_raises():
    with pytest.raises(LmpipeError, match="vocab_size=10"):
        train_tokenizer(["abcdefghij"], TokenizerConfig(kind="char", vocab_size=10))


def test_lowercase_folds_case(tmp_path):
    tok = train_tokenizer(TEXTS[:5], TokenizerConfig(kind="char", lowercase=True))
    assert "A" not in tok.get_vocab()
    assert tok.decode(tok.encode("The End").ids) == "the end"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_training_is_deterministic(kind):
    cfg = TokenizerConfig(kind=kind, vocab_size=1024)
    first = train_tokenizer(TEXTS, cfg)
    second = train_tokenizer(iter(TEXTS), cfg)  # a one-shot iterator must give the same result as a list
    assert first.to_str() == second.to_str()
    assert tokenizer_hash(first) == tokenizer_hash(second)


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"kind": "wordpiece"}, "tokenizer.kind='wordpiece'"),
        ({"vocab_size": 100}, "tokenizer.vocab_size=100"),
        ({"kind": "char", "vocab_size": 7}, "tokenizer.vocab_size=7"),
        ({"min_frequency": 0}, "tokenizer.min_frequency=0"),
        ({"lowercase": "yes"}, "tokenizer.lowercase='yes'"),
    ],
)
def test_config_validation(fields, field):
    with pytest.raises(LmpipeError, match=field.replace("(", r"\(")) as err:
        TokenizerConfig(**fields)
    assert "\n" not in str(err.value)


def test_save_load_and_hash(bpe, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(bpe, path)
    loaded = load_tokenizer(path)
    assert loaded.encode(UNICODE_TEXT).ids == bpe.encode(UNICODE_TEXT).ids
    assert tokenizer_hash(path) == tokenizer_hash(bpe) == tokenizer_hash(loaded)
    assert len(tokenizer_hash(path)) == 64
    other = train_tokenizer(TEXTS[:10], TokenizerConfig(kind="bpe", vocab_size=512))
    assert tokenizer_hash(other) != tokenizer_hash(bpe)
    assert sorted(os.listdir(path.parent)) == ["tokenizer.json"]  # no temp files left behind


def test_load_missing_tokenizer_names_the_path(tmp_path):
    path = tmp_path / "nope.json"
    with pytest.raises(LmpipeError, match="nope.json.*tokenize stage"):
        load_tokenizer(path)


def test_load_corrupt_tokenizer_raises(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(LmpipeError, match="bad.json"):
        load_tokenizer(path)


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65_536) == np.uint16
    assert token_dtype(65_537) == np.uint32
    with pytest.raises(LmpipeError):
        token_dtype(0)


def test_encode_documents_separates_with_eot(bpe):
    docs = ["first doc", "", "third\ndoc"]
    ids = encode_documents(bpe, docs)
    expected = []
    for doc in docs:
        expected += bpe.encode(doc).ids + [0]
    assert ids.dtype == np.uint16
    assert ids.tolist() == expected
    assert encode_documents(bpe, []).tolist() == []


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_documents_keep_their_edge_whitespace_between_separators(kind, bpe, char):
    tok = bpe if kind == "bpe" else char
    docs = ["  indented first line\n", "\n\nafter empty lines  \n\n", "def f():\n    return  1\n"]
    ids = encode_documents(tok, docs).tolist()
    eot = tok.token_to_id(EOT)
    ends = [i for i, token in enumerate(ids) if token == eot]
    decoded = [tok.decode(ids[start + 1 : end]) for start, end in zip([-1, *ends], ends, strict=False)]
    assert decoded == docs


def test_encode_documents_spans_several_chunks(char, monkeypatch):
    monkeypatch.setattr("lmpipe.tokenizer.ENCODE_BATCH_CHARS", 1000)
    docs = [f"doc {i}" for i in range(2500)]  # more than one encoding batch
    ids = encode_documents(char, iter(docs))
    assert int((ids == 0).sum()) == 2500
    assert char.decode(ids[:5].tolist()) == "doc 0" and ids[5] == 0


@pytest.fixture
def saved_bpe(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    save_tokenizer(bpe, path)
    return path


def test_shards_round_trip(bpe, saved_bpe, tmp_path):
    train_docs, val_docs = TEXTS[:20], ["Ünïcode — ok 👍", "second"]
    out = tmp_path / "shards"
    write_shards(out, {"train": iter(train_docs), "val": val_docs}, bpe)
    assert sorted(os.listdir(out)) == [
        "meta.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "train.bin",
        "val.bin",
    ]
    meta = read_meta(out)
    assert meta == json.loads((out / "meta.json").read_text())
    for split, docs in [("train", train_docs), ("val", val_docs)]:
        shard = read_shard(out, split)
        expected = encode_documents(bpe, docs)
        assert isinstance(shard, np.memmap) and shard.dtype == np.uint16
        np.testing.assert_array_equal(shard, expected)
        counts = meta["splits"][split]
        assert counts["n_tokens"] == len(expected)
        assert counts["n_docs"] == len(docs)
        assert counts["n_bytes"] == sum(len(d.encode("utf-8")) for d in docs)
    assert meta["splits"]["val"]["n_bytes"] == len("Ünïcode — ok 👍".encode()) + len("second")
    assert meta["vocab_size"] == bpe.get_vocab_size()
    assert meta["dtype"] == "uint16"
    assert (meta["eot_id"], meta["pad_id"]) == (0, 1)
    assert meta["tokenizer_sha256"] == tokenizer_hash(saved_bpe) == tokenizer_hash(out / "tokenizer.json")
    assert meta["kind"] == "bpe"


def test_char_shards_record_kind(char, tmp_path):
    meta = write_shards(tmp_path / "shards", {"train": ["abc"]}, char)
    assert meta["kind"] == "char"
    assert read_shard(tmp_path / "shards", "train").tolist() == char.encode("abc").ids + [0]


def test_failing_write_leaves_previous_shards_intact(bpe, tmp_path):
    out = tmp_path / "shards"
    write_shards(out, {"train": ["old text"], "val": ["old val"]}, bpe)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def exploding_docs():
        yield "new text"
        raise RuntimeError("source broke mid-way")

    with pytest.raises(RuntimeError, match="mid-way"):
        write_shards(out, {"train": ["new train"], "val": exploding_docs()}, bpe)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["shards"]  # temp dir cleaned up


def test_read_missing_meta_and_shard(bpe, tmp_path):
    with pytest.raises(LmpipeError, match=r"meta\.json.*tokenize stage"):
        read_meta(tmp_path / "nowhere")
    write_shards(tmp_path / "shards", {"train": ["x"]}, bpe)
    with pytest.raises(LmpipeError, match=r"val\.bin.*train"):
        read_shard(tmp_path / "shards", "val")


def test_read_shard_detects_truncated_file(bpe, tmp_path):
    out = tmp_path / "shards"
    write_shards(out, {"train": ["some text here"]}, bpe)
    data = (out / "train.bin").read_bytes()
    Path(out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(LmpipeError, match="train.bin"):
        read_shard(out, "train")


def test_parallel_encoding_writes_the_same_shards(bpe, tmp_path, monkeypatch):
    from functools import partial

    from lmpipe.data.engine import map_ordered
    from lmpipe.tokenizer import write_token_shards

    monkeypatch.setattr("lmpipe.tokenizer.ENCODE_BATCH_CHARS", 20_000)  # several batches per split
    docs = [("train" if i % 5 else "val", text) for i, text in enumerate(TEXTS[:120])]
    write_token_shards(tmp_path / "one", ["train", "val", "test"], iter(docs), bpe)
    mapper = partial(map_ordered, workers=2)
    meta = write_token_shards(tmp_path / "two", ["train", "val", "test"], iter(docs), bpe, mapper, False)
    for name in ("meta.json", "tokenizer.json", "train.bin", "val.bin", "test.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    assert meta["splits"]["test"] == {"n_tokens": 0, "n_docs": 0, "n_bytes": 0}
    assert meta["splits"]["val"]["n_docs"] == sum(split == "val" for split, _ in docs) > 1


def test_a_failing_worker_leaves_no_shard_directory(bpe, tmp_path):
    from lmpipe.tokenizer import write_token_shards

    def dying(fn, items):
        yield fn(next(iter(items)))
        raise LmpipeError("worker died on item 1")

    with pytest.raises(LmpipeError, match="item 1"):
        write_token_shards(tmp_path / "shards", ["train"], [("train", t) for t in TEXTS], bpe, dying)
    assert os.listdir(tmp_path) == []  # neither the shards nor a temp dir that could pass for them


def test_document_of_an_unknown_split_is_an_error(bpe, tmp_path):
    from lmpipe.tokenizer import write_token_shards

    with pytest.raises(LmpipeError, match="split 'dev'.*train, val"):
        write_token_shards(tmp_path / "s", ["train", "val"], [("dev", "text")], bpe)
