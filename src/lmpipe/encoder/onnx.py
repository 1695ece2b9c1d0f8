"""The fine-tuned encoder classifier as one self-contained ONNX graph, checked against PyTorch.

Inputs `input_ids` and `attention_mask` (batch x sequence, both dynamic); one output per task,
`probs_<task>` (batch x labels), the softmax over that task's label set. The tokenizer, label sets and
max_length travel beside the graph in the directory (`formats.ONNX_CONFIG_FILE`), so ONNX Runtime alone
classifies texts. The parity check runs both on real-length padded batches of sample texts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from lmpipe import atomic
from lmpipe.encoder.classifier import EncoderClassifier
from lmpipe.encoder.outputs import write_classifier_dir
from lmpipe.errors import LmpipeError
from lmpipe.export import _quiet_exporter, without_source_locations
from lmpipe.formats import ENCODER_ONNX_DIR, ONNX_CONFIG_FILE, ONNX_FILE, TOKENIZER_FILE
from lmpipe.training.sft_data import collate

PARITY_TEXTS = [
    "Jesus wept.",
    "In the beginning God created the heaven and the earth.",
    "And the LORD spake unto Moses, saying, Speak unto the children of Israel.",
]


class ClassifierGraph(nn.Module):
    """What the graph computes: pooled encoder output, then every task's head and softmax."""

    def __init__(self, classifier: EncoderClassifier):
        super().__init__()
        self.encoder, self.heads = classifier.encoder, classifier.heads

    def forward(self, input_ids, attention_mask):
        pooled = self.encoder.embed(input_ids, attention_mask)
        return tuple(F.softmax(self.heads.logits(task, pooled), dim=-1) for task in self.heads)


def _batch(classifier: EncoderClassifier, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = classifier.tokenizer.encode(texts, classifier.max_length, "truncate")
    input_ids = collate([{"input_ids": row} for row in ids], classifier.tokenizer.pad_id)["input_ids"]
    return input_ids, (input_ids != classifier.tokenizer.pad_id).long()


def export_classifier(
    classifier: EncoderClassifier, out_dir: str | os.PathLike, opset: int = 20, atol: float = 1e-4
) -> dict:
    """Write `out_dir` (model.onnx, config.json, tokenizer.json) and return the parity report; fails past atol."""
    import onnxruntime as ort
    from torch.export import Dim

    graph = ClassifierGraph(classifier).eval()
    tasks = list(classifier.heads)
    outputs = [f"probs_{task}" for task in tasks]
    example = _batch(classifier, PARITY_TEXTS[:2])
    b, t = Dim("batch"), Dim("sequence", max=classifier.encoder.config.block_size)
    out_dir = Path(out_dir)
    config = {
        "kind": "encoder-classifier",
        "input_names": ["input_ids", "attention_mask"],
        "output_names": outputs,
        "label_sets": classifier.label_sets,
        "max_length": classifier.max_length,
        "pad_id": classifier.tokenizer.pad_id,
        "pad_token": classifier.tokenizer.tokenizer.id_to_token(classifier.tokenizer.pad_id),
    }
    with atomic.atomic_path(out_dir) as tmp:
        tmp.mkdir()
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(
                graph,
                example,
                None,
                dynamo=True,
                dynamic_shapes={"input_ids": {0: b, 1: t}, "attention_mask": {0: b, 1: t}},
                input_names=config["input_names"],
                output_names=outputs,
                opset_version=opset,
                verbose=False,
            )
        onnx.save(without_source_locations(program.model_proto), tmp / ONNX_FILE)
        classifier.tokenizer.save(tmp / TOKENIZER_FILE)
        session = ort.InferenceSession(str(tmp / ONNX_FILE), providers=["CPUExecutionProvider"])
        input_ids, mask = _batch(classifier, PARITY_TEXTS)
        with torch.no_grad():
            expected = [p.numpy() for p in graph(input_ids, mask)]
        got = session.run(outputs, {"input_ids": input_ids.numpy(), "attention_mask": mask.numpy()})
        diff = max(float(np.abs(a - e).max()) for a, e in zip(got, expected, strict=True))
        config["parity"] = {"max_abs_prob_diff": diff, "atol": atol, "texts": len(PARITY_TEXTS)}
        if diff > atol:
            raise LmpipeError(
                f"ONNX classifier parity: max abs probability difference {diff:.2e} > atol {atol}"
            )
        (tmp / ONNX_CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", "utf-8")
    return config["parity"]


def write_classifier_dir_with_onnx(
    model_dir: str | os.PathLike, classifier: EncoderClassifier, extra: dict, samples: list[dict]
) -> dict:
    """`write_classifier_dir` with the ONNX export inside (`formats.ENCODER_ONNX_DIR`); returns its parity report."""
    parity = {}

    def export(tmp: Path) -> None:
        parity.update(export_classifier(classifier, tmp / ENCODER_ONNX_DIR))

    write_classifier_dir(model_dir, classifier, extra, samples, also=export)
    return parity
