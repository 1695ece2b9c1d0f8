"""Encoder directories written atomically: the masked-LM encoder (encoder.pt + its tokenizer), the
fine-tuned classifier (the same plus heads.pt and samples), as `lmpipe.encoder.classifier` reads them, and
the placeholder of a classifier the config did not train (`formats.SKIPPED_FILE`)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmpipe import atomic
from lmpipe.encoder.classifier import EncoderClassifier
from lmpipe.encoder.model import Encoder
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.formats import ENCODER_FILE, HEADS_FILE, SAMPLES_FILE, SKIPPED_FILE, TOKENIZER_FILE
from lmpipe.model import save_checkpoint
from lmpipe.text_samples import format_samples
from lmpipe.training.heads import save_heads


def write_encoder_dir(
    model_dir: str | Path,
    encoder: Encoder,
    tokenizer: EncoderTokenizer,
    extra: dict,
    also: Callable[[Path], None] | None = None,
) -> Path:
    """Replace `model_dir` with the encoder and its tokenizer; `also(tmp)` may add more files."""
    model_dir = Path(model_dir)
    extra = {**extra, "pad_token": tokenizer.tokenizer.id_to_token(tokenizer.pad_id)}
    with atomic.atomic_path(model_dir) as tmp:
        tmp.mkdir()
        save_checkpoint(tmp / ENCODER_FILE, encoder, extra)
        tokenizer.save(tmp / TOKENIZER_FILE)
        if also is not None:
            also(tmp)
    return model_dir


def write_classifier_dir(
    model_dir: str | Path,
    classifier: EncoderClassifier,
    extra: dict,
    samples: list[dict],
    also: Callable[[Path], None] | None = None,
) -> Path:
    """Replace `model_dir` with the classifier's encoder, tokenizer, heads and samples; `also(tmp)` may add
    more (the encoder_finetune stage: the ONNX export in formats.ENCODER_ONNX_DIR)."""

    def add(tmp: Path) -> None:
        n_embd = classifier.encoder.config.n_embd
        save_heads(tmp / HEADS_FILE, classifier.heads.state_dict(), classifier.label_sets, n_embd)
        (tmp / SAMPLES_FILE).write_text(format_samples(samples), encoding="utf-8")
        if also is not None:
            also(tmp)

    extra = {**extra, "max_length": classifier.max_length, "too_long": classifier.too_long}
    return write_encoder_dir(model_dir, classifier.encoder, classifier.tokenizer, extra, also=add)


def write_skipped_dir(model_dir: str | Path, stage: str, reason: str) -> Path:
    """Replace `model_dir` with only `formats.SKIPPED_FILE`: the stage trained nothing there, and why."""
    model_dir = Path(model_dir)
    with atomic.atomic_path(model_dir) as tmp:
        tmp.mkdir()
        atomic.write_json(tmp / SKIPPED_FILE, {"stage": stage, "reason": reason})
    return model_dir
