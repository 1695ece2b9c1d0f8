"""int8 of the encoder classifier's ONNX directory (`lmpipe.encoder.onnx`), on the GPT's quantization code
(`lmpipe.compress`), checked against fp32 where it is served: both directories through `OrtClassifier` on
held-out texts, per task the share of texts given the same label.

Unlike the GPT's, the classifier's embedding tables are not tied to an output layer, so ONNX Runtime's Gather
quantization stores them once, in int8: MiniLM's file is 0.25x the fp32 one (0.65x with the MatMuls alone).
Measured on MiniLM with random standardised heads (a harsh case: 66 near-tied labels), the labels kept were
79 % (book) and 95 % (testament) with one weight scale per output channel against 57 % and 90 % with one per
matrix, at the same size; quantizing the embeddings changed neither.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lmpipe.compress import QuantizeConfig, fold_constant_transposes, write_quantized
from lmpipe.encoder.serving import MAX_TEXTS, OrtClassifier, read_classifier_config
from lmpipe.errors import LmpipeError
from lmpipe.formats import ONNX_CONFIG_FILE, ONNX_FILE

CLASSIFIER_QUANTIZED_OPS = ("MatMul", "Gather")
"""Op types quantized in an encoder classifier: its Linear layers and its embedding tables (not tied to an
output layer, unlike the GPT's, so ONNX Runtime's Gather quantization stores them once, in int8)."""


def quantize_classifier(
    src_dir: str | Path, dst_dir: str | Path, cfg: QuantizeConfig, texts: list[str]
) -> dict[str, Any]:
    """Dynamic int8 of the ONNX encoder classifier in `src_dir` (`lmpipe.encoder.onnx`) into `dst_dir`
    (replaced atomically), checked against fp32 on `texts`.

    The MatMuls and embedding Gathers are quantized dynamically whatever `cfg.method` (static calibration is
    the GPT's: prefill windows), per channel as `cfg.classifier_per_channel` says. The check runs both
    directories through `OrtClassifier`, the serving path, and reports per task the share of texts given the
    same label (`label_agreement`) and the largest difference of a probability (`max_abs_prob_diff`); it is
    written to dst_dir's config.json as "agreement". Returns {src_bytes, dst_bytes, ratio, agreement}.
    """
    import onnx

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    config = read_classifier_config(src_dir)
    if config.get("quantization", "none") != "none":
        raise LmpipeError(
            f"{src_dir / ONNX_CONFIG_FILE} says quantization={config['quantization']!r}: "
            "expected an fp32 classifier export"
        )
    if not texts:
        raise LmpipeError(f"quantize {src_dir}: no texts to check the int8 classifier on")
    config = {
        **config,
        "quantization": "dynamic-int8",
        "quantized_from": str(src_dir),
        "per_channel": cfg.classifier_per_channel,
    }
    fp32, agreement = OrtClassifier(src_dir), {}

    def check(tmp: Path) -> dict:
        agreement.update(classifier_agreement(fp32, OrtClassifier(tmp), texts))
        return {"agreement": agreement}

    model = onnx.load(src_dir / ONNX_FILE)
    fold_constant_transposes(model)
    sizes = write_quantized(
        src_dir, dst_dir, model, config, CLASSIFIER_QUANTIZED_OPS, cfg.classifier_per_channel, check=check
    )
    return {**sizes, "agreement": agreement}


def classifier_agreement(reference, other, texts: list[str]) -> dict[str, Any]:
    """How far two `OrtClassifier`s (say fp32 and int8) agree on `texts`: per task the share of texts given
    the same label and the largest absolute difference of a probability."""
    if set(reference.label_sets) != set(other.label_sets):
        raise LmpipeError(
            f"classifier tasks differ: {', '.join(reference.label_sets)} against "
            f"{', '.join(other.label_sets)}"
        )
    same = {task: 0 for task in reference.label_sets}
    diff = dict.fromkeys(reference.label_sets, 0.0)
    for start in range(0, len(texts), MAX_TEXTS):
        chunk = texts[start : start + MAX_TEXTS]
        expected, got = reference.probabilities(chunk), other.probabilities(chunk)
        for task in same:
            same[task] += int((expected[task].argmax(1) == got[task].argmax(1)).sum())
            diff[task] = max(diff[task], float(np.abs(expected[task] - got[task]).max()))
    tasks = {
        task: {"label_agreement": same[task] / len(texts), "max_abs_prob_diff": diff[task]} for task in same
    }
    return {"texts": len(texts), "tasks": tasks}


def held_out_texts(instructions_dir: str | Path, limit: int) -> list[str]:
    """Up to `limit` distinct verse texts of the instructions stage's test label-task examples (the text an
    encoder classifies: the prompt without its question), spread evenly over the split."""
    from lmpipe.data.instructions import read_examples, read_label_sets
    from lmpipe.encoder.data import verse_text

    test = read_examples(instructions_dir, "test")
    test = test[test["task"].isin(list(read_label_sets(instructions_dir)))]
    texts = list(dict.fromkeys(verse_text(t, p) for t, p in zip(test["task"], test["prompt"], strict=True)))
    if not texts:
        raise LmpipeError(
            f"{instructions_dir}: the test split has no label-task examples to check a classifier on"
        )
    picks = np.unique(np.linspace(0, len(texts) - 1, min(limit, len(texts))).round().astype(int))
    return [texts[i] for i in picks]
