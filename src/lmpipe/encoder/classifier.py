"""A fine-tuned encoder classifier on disk and in use: texts in, label probabilities out (no Lightning).

A classifier directory (`formats.ENCODER_FILE`, `formats.HEADS_FILE`, `formats.TOKENIZER_FILE`) holds the
encoder (config, weights and, in its extra dict, the max_length and too_long it was trained with), one linear
head per label task with the label sets (`lmpipe.training.heads.save_heads`), and the encoder's tokenizer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lmpipe.encoder.model import Encoder, load_encoder
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError
from lmpipe.formats import ENCODER_FILE, HEADS_FILE, SKIPPED_FILE, TOKENIZER_FILE
from lmpipe.training.heads import ClassificationHeads, _load_heads
from lmpipe.training.sft_data import collate


@torch.no_grad()
def pooled_features(encoder: Encoder, rows: list[dict], pad_id: int, batch_size: int = 64) -> torch.Tensor:
    """(N, n_embd) pooled sentence vectors of encoded rows, in eval mode, in batches of similar length."""
    was_training = encoder.training
    encoder.eval()
    device = next(encoder.parameters()).device
    order = np.argsort([len(row["input_ids"]) for row in rows], kind="stable")
    out = torch.zeros(len(rows), encoder.config.n_embd)
    for start in range(0, len(rows), batch_size):
        picks = order[start : start + batch_size]
        ids = collate([{"input_ids": rows[i]["input_ids"]} for i in picks], pad_id)["input_ids"].to(device)
        out[torch.from_numpy(picks)] = encoder.embed(ids, ids != pad_id).float().cpu()
    encoder.train(was_training)
    return out


class EncoderClassifier:
    """Label probabilities for texts: the encoder's pooled vector, then the task's head."""

    def __init__(
        self,
        encoder: Encoder,
        heads: ClassificationHeads,
        tokenizer: EncoderTokenizer,
        label_sets: dict[str, list[str]],
        max_length: int,
        too_long: str = "truncate",
    ):
        for task, head in heads.items():
            if len(label_sets.get(task, ())) != head.out_features:
                raise LmpipeError(
                    f"classification head {task!r} has {head.out_features} outputs but the label set has "
                    f"{len(label_sets.get(task, ()))} labels"
                )
        self.encoder, self.heads, self.tokenizer, self.label_sets = (
            encoder.eval(),
            heads.eval(),
            tokenizer,
            label_sets,
        )
        self.max_length, self.too_long = max_length, too_long

    @torch.no_grad()
    def predict_proba(self, task: str, texts: list[str]) -> np.ndarray:
        """(N, n_labels) softmax probabilities, columns in the order of `label_sets[task]`."""
        if task not in self.heads:
            raise LmpipeError(f"task {task!r}: no classification head (heads: {', '.join(self.heads)})")
        ids = self.tokenizer.encode(list(texts), self.max_length, self.too_long)
        features = pooled_features(self.encoder, [{"input_ids": row} for row in ids], self.tokenizer.pad_id)
        return F.softmax(self.heads.logits(task, features).float(), dim=-1).numpy()

    def predict(self, task: str, texts: list[str]) -> list[str]:
        labels = self.label_sets[task]
        return [labels[i] for i in self.predict_proba(task, texts).argmax(axis=1)]


def load_encoder_classifier(model_dir: str | os.PathLike, with_extra: bool = False):
    """The classifier of an encoder fine-tuning directory, on CPU, in eval mode (and the encoder's extra dict:
    stage, metrics, with_extra)."""
    model_dir = Path(model_dir)
    if (model_dir / SKIPPED_FILE).is_file():
        skipped = json.loads((model_dir / SKIPPED_FILE).read_text(encoding="utf-8"))
        raise LmpipeError(
            f"{model_dir}: no classifier here, stage {skipped.get('stage')} skipped it ({skipped.get('reason')}); "
            "turn that back on or stop reading this directory"
        )
    for name in (ENCODER_FILE, HEADS_FILE, TOKENIZER_FILE):
        if not (model_dir / name).is_file():
            raise LmpipeError(
                f"missing {model_dir / name}: expected an encoder classifier directory "
                f"({ENCODER_FILE}, {HEADS_FILE}, {TOKENIZER_FILE})"
            )
    encoder, extra = load_encoder(model_dir / ENCODER_FILE)
    heads, label_sets = _load_heads(model_dir / HEADS_FILE)
    if heads.feature_mean.numel() != encoder.config.n_embd:
        raise LmpipeError(
            f"{model_dir / HEADS_FILE}: the heads read {heads.feature_mean.numel()} features but the encoder "
            f"has n_embd {encoder.config.n_embd}; expected the heads trained on this encoder"
        )
    tokenizer = EncoderTokenizer.from_file(model_dir / TOKENIZER_FILE, extra["pad_token"])
    classifier = EncoderClassifier(
        encoder, heads, tokenizer, label_sets, extra["max_length"], extra["too_long"]
    )
    return (classifier, extra) if with_extra else classifier
