"""Tiny GPTs (and a tiny encoder classifier) for the tests that need a real model directory or ONNX export but
not a trained model.

Not a test module: the export, compress, inference, evaluation, registry and serve tests import it
(`from tiny_models import ...`, found through `pythonpath = ["tests"]` in pyproject.toml) so that they all
build their tiny models one way. Nothing here is random without a seed.
"""

from pathlib import Path

import torch
from tokenizers import Tokenizer

from lmpipe.atomic import write_json
from lmpipe.chat import tokenizer_config
from lmpipe.export import ExportConfig, export_onnx
from lmpipe.model import GPT, GPTConfig, save_checkpoint
from lmpipe.tokenizer import TOKENIZER_CONFIG_FILE, TokenizerConfig, save_tokenizer, train_tokenizer

SENTENCES = [
    "In the beginning God created the heaven and the earth.",
    "And the earth was without form, and void; and darkness was upon the face of the deep.",
    "Now these are the names of the children of Israel, which came into Egypt.",
] * 3
"""Three KJV verses, the default text for a tiny tokenizer (tests that need other text pass their own)."""


def tiny_tokenizer(sentences: list[str] = SENTENCES) -> Tokenizer:
    """A byte-level BPE tokenizer (vocab 300) trained on `sentences`."""
    return train_tokenizer(sentences, TokenizerConfig(kind="bpe", vocab_size=300))


def tiny_config(vocab_size: int, pos_encoding: str = "learned", **shape) -> GPTConfig:
    """The tests' tiny GPT: block 64, 2 layers, 2 heads, width 32, no dropout.
    `shape` overrides any of these or sets another GPTConfig field."""
    fields = {"block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32, "dropout": 0.0} | shape
    return GPTConfig(vocab_size=vocab_size, pos_encoding=pos_encoding, **fields)


def make_model_dir(
    path: Path, tok: Tokenizer, pos_encoding: str = "learned", seed: int = 0, std: float = 0.3, **shape
) -> GPT:
    """A tiny GPT (tiny_config; vocab_size defaults to `tok`'s) saved to `path` with `tok` and the chat
    tokenizer_config, as the export stage expects a model directory. Returned in eval mode.

    Every matrix is redrawn at `std` from a generator seeded with `seed`: a freshly initialised model's
    predictions hardly depend on the context, so a wrong position, mask or cache would not show in them."""
    path.mkdir(parents=True)
    save_tokenizer(tok, path / "tokenizer.json")
    write_json(path / TOKENIZER_CONFIG_FILE, tokenizer_config())
    model = GPT(tiny_config(shape.pop("vocab_size", tok.get_vocab_size()), pos_encoding, **shape))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    save_checkpoint(path / "model.pt", model, {"stage": "test"})
    return model.eval()


def export_tiny_model(
    root: Path,
    onnx_dir: Path,
    export_cfg: ExportConfig,
    sentences: list[str] = SENTENCES,
    variant_name: str | None = None,
    **model,
) -> tuple[Tokenizer, GPT]:
    """Train a tiny tokenizer on `sentences`, save a tiny GPT with it to <root>/model (`model`: make_model_dir's
    pos_encoding, seed, std and shape) and export that to `onnx_dir` (export seed 0). Returns (tokenizer, GPT)."""
    tok = tiny_tokenizer(sentences)
    gpt = make_model_dir(root / "model", tok, **model)
    export_onnx(root / "model", onnx_dir, export_cfg, seed=0, variant_name=variant_name)
    return tok, gpt


def tiny_encoder_classifier(tokens_dir: Path):
    """A random two-layer encoder classifier with two tasks (testament: Old/New, book: Genesis/John/Mark) over
    the tokenizer of `tokens_dir` (the tiny char shards of conftest)."""
    from lmpipe.encoder.classifier import EncoderClassifier
    from lmpipe.encoder.config import EncoderConfig
    from lmpipe.encoder.model import Encoder
    from lmpipe.encoder.tokens import EncoderTokenizer
    from lmpipe.formats import PAD, TOKENIZER_FILE
    from lmpipe.training.heads import ClassificationHeads

    tokenizer = EncoderTokenizer.from_file(tokens_dir / TOKENIZER_FILE, PAD)
    torch.manual_seed(0)
    config = EncoderConfig(
        vocab_size=tokenizer.vocab_size,
        pad_id=tokenizer.pad_id,
        block_size=96,
        n_layer=2,
        n_head=2,
        n_embd=32,
    )
    heads = ClassificationHeads(32, {"testament": 2, "book": 3}, seed=0)
    labels = {"testament": ["Old", "New"], "book": ["Genesis", "John", "Mark"]}
    return EncoderClassifier(Encoder(config), heads, tokenizer, labels, max_length=96)


def write_label_examples(out_dir: Path, verses: int = 3) -> Path:
    """An instructions directory (`lmpipe.data.instructions.write_examples`) whose every split holds `verses`
    verses "Verse <i> (<split>)." as testament, book and continue examples."""
    import pandas as pd

    from lmpipe.data.instructions import BOOK_PROMPT, EXAMPLE_COLUMNS, TESTAMENT_PROMPT, write_examples

    prompts = {"testament": TESTAMENT_PROMPT, "book": BOOK_PROMPT, "continue": "Continue the verse: {verse}"}
    frame = pd.DataFrame(
        [
            (f"{task}{i}{split}", task, prompt.format(verse=f"Verse {i} ({split})."), "x", None, split, "d")
            for split in ("train", "val", "test")
            for i in range(verses)
            for task, prompt in prompts.items()
        ],
        columns=list(EXAMPLE_COLUMNS),
    )
    labels = {"testament": ["Old", "New"], "book": ["John", "Mark"]}
    frame.attrs["instructions"] = {"label_sets": labels, "dropped_ambiguous": {}, "skipped_short": 0}
    write_examples(frame, out_dir)
    return out_dir
