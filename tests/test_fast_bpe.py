"""The tiktoken twin of a byte-level BPE gives Hugging Face's ids, text for text, and is refused where it could
not: the corpora lmpipe ships, adversarial Unicode, special tokens written in text, and a vocabulary built so
that merging by rank and merging by rule part ways."""

import random
from pydoc_data.topics import topics

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from lmpipe.data.sources import kjv_documents
from lmpipe.fast_bpe import _symbol_to_byte, fast_encoder
from lmpipe.formats import SPECIAL_TOKENS
from lmpipe.tokenizer import TokenizerConfig, encode_documents_batch, train_tokenizer

PYDOC = [topics[key] for key in sorted(topics)]
KJV = ["\n".join(doc.texts) for doc in kjv_documents()]


def hf_ids(tok, texts):
    return [enc.ids for enc in tok.encode_batch(texts)]


def fast_ids(enc, texts):
    return enc.encode_batch(texts, num_threads=1, allowed_special="all")


@pytest.fixture(scope="module", params=["kjv-4096", "pydoc-1024", "pydoc-300"])
def trained(request):
    corpus, vocab_size = request.param.split("-")
    texts = KJV if corpus == "kjv" else PYDOC
    return texts, train_tokenizer(texts, TokenizerConfig(kind="bpe", vocab_size=int(vocab_size)))


def test_same_ids_on_every_document_of_the_shipped_corpora(trained):
    texts, tok = trained
    enc = fast_encoder(tok)
    assert enc is not None
    assert fast_ids(enc, texts) == hf_ids(tok, texts)


def test_same_ids_on_adversarial_unicode_whitespace_and_special_tokens(trained):
    _, tok = trained
    enc = fast_encoder(tok)
    rng = random.Random(0)
    pieces = [
        *(chr(c) for c in range(0x20, 0x3000, 7)),
        *" \n\t\r\u00a0\u2028\u3000\u200b",
        *SPECIAL_TOKENS,
        "<|endoftext",
        "'s",
        "'ll",
        "'RE",
        " 12345",
        "ÿ",
        "\ufffd",
        "👍🏽",
        "日本語",
        "e\u0301",
        "\U0001d400",
    ]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(3000)]
    texts += [" " * n + "x" + "\n" * n for n in range(8)] + ["".join(SPECIAL_TOKENS), "a<|end|>b<|pad|>"]
    assert fast_ids(enc, texts) == hf_ids(tok, texts)


def test_shard_batches_are_the_same_with_or_without_the_twin(trained):
    texts, tok = trained
    batch = [("train", text) for text in texts[:200]]
    fast = encode_documents_batch(tok.to_str(), batch)["train"]
    slow = encode_documents_batch(tok.to_str(), batch, fast_bpe=False)["train"]
    assert (fast[0] == slow[0]).all() and fast[1:] == slow[1:]


def test_tokenizers_that_are_not_plain_byte_level_bpe_have_no_twin():
    assert fast_encoder(train_tokenizer(PYDOC, TokenizerConfig(kind="char"))) is None
    assert (
        fast_encoder(train_tokenizer(PYDOC, TokenizerConfig(kind="bpe", vocab_size=300, lowercase=True)))
        is None
    )


def rule_against_rank_tokenizer():
    """Every byte, then bc, ab, abc (from ab+c): by rule "abc" stays [a, bc]; by rank b+c, then a+bc = abc."""
    symbols = sorted(_symbol_to_byte())
    vocab = {s: i for i, s in enumerate(symbols)}
    for token in ("bc", "ab", "abc"):
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("b", "c"), ("a", "b"), ("ab", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return tok


def test_a_vocabulary_where_rank_and_rule_merging_disagree_has_no_twin():
    import tiktoken

    tok = rule_against_rank_tokenizer()
    ranks = {bytes(_symbol_to_byte()[s] for s in t): i for t, i in tok.get_vocab().items()}
    naive = tiktoken.Encoding("naive", pat_str=r"\S+|\s+", mergeable_ranks=ranks, special_tokens={})
    assert naive.encode("abc") != tok.encode("abc").ids  # the disagreement the check exists for
    assert fast_encoder(tok) is None
