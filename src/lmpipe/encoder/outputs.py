"""An encoder classifier directory written atomically (the format `lmpipe.encoder.classifier` reads)."""

from __future__ import annotations

from pathlib import Path

from lmpipe import atomic
from lmpipe.encoder.classifier import EncoderClassifier
from lmpipe.encoder.model import save_encoder
from lmpipe.formats import ENCODER_FILE, HEADS_FILE, SAMPLES_FILE, TOKENIZER_FILE
from lmpipe.text_samples import format_samples
from lmpipe.training.heads import save_heads


def write_classifier_dir(
    model_dir: str | Path, classifier: EncoderClassifier, extra: dict, samples: list[dict]
) -> Path:
    """Replace `model_dir` with the encoder, its heads, its tokenizer and samples."""
    model_dir = Path(model_dir)
    pad_token = classifier.tokenizer.tokenizer.id_to_token(classifier.tokenizer.pad_id)
    extra = {
        **extra,
        "max_length": classifier.max_length,
        "too_long": classifier.too_long,
        "pad_token": pad_token,
    }
    with atomic.atomic_path(model_dir) as tmp:
        tmp.mkdir()
        save_encoder(tmp / ENCODER_FILE, classifier.encoder, extra)
        save_heads(
            tmp / HEADS_FILE,
            classifier.heads.state_dict(),
            classifier.label_sets,
            classifier.encoder.config.n_embd,
        )
        classifier.tokenizer.save(tmp / TOKENIZER_FILE)
        (tmp / SAMPLES_FILE).write_text(format_samples(samples), encoding="utf-8")
    return model_dir
