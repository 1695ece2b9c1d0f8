"""Tests for lmpipe.encoder.finetune (with classifier and outputs): the stage's runs on toy JSONL label data, a
random tiny encoder (init=scratch) and the real MiniLM with a frozen body (init=pretrained, method=head)."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from lmpipe.encoder.classifier import load_encoder_classifier
from lmpipe.encoder.finetune import finetune_encoder
from lmpipe.encoder.mlm import pretrain_encoder
from lmpipe.encoder.outputs import write_classifier_dir, write_encoder_dir
from lmpipe.encoder.pretrained import load_pretrained
from lmpipe.evaluation.benchmark import evaluate_encoder
from lmpipe.formats import SKIPPED_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Toy texts: each label's words use their own letters, so the tasks are separable from the text.
LETTERS = {"red": "abcde", "green": "fghij", "blue": "klmno"}


def toy_jsonl(path, n: int = 240) -> str:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        label = list(LETTERS)[i % 3]
        words = ["".join(rng.choice(list(LETTERS[label]), size=4)) for _ in range(4)]
        lines.append({"text": " ".join(words), "label": label, "task": "colour"})
        lines.append(
            {"text": " ".join(words), "label": "warm" if label == "red" else "cold", "task": "warmth"}
        )
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return str(path)


def overrides(tmp_path, *extra):
    return [
        f"encoder.jsonl=[{toy_jsonl(tmp_path / 'toy.jsonl')}]",
        "encoder.tasks=[colour,warmth]",
        "encoder.max_length=32",
        "encoder.batch_size=8",
        "encoder.warmup_steps=2",
        "encoder.val_check_interval=10",
        "encoder.limit_val_batches=2",
        "encoder.checkpoint_every_n_steps=10",
        *extra,
    ]


@pytest.fixture
def mlm_encoder(tiny_config):
    """A tiny masked-LM encoder where the encoder_mlm stage writes it (paths.encoder_mlm)."""
    from test_encoder_mlm import TINY

    cfg = tiny_config(*TINY)
    result = pretrain_encoder(cfg)
    write_encoder_dir(cfg.paths.encoder_mlm, result.encoder, result.tokenizer, {"stage": "test"})
    return cfg.paths.encoder_mlm


def test_scratch_full_learns_saves_and_resumes(tiny_config, tmp_path, mlm_encoder):
    cfg = tiny_config(*overrides(tmp_path, "encoder.init=scratch", "encoder.max_steps=30", "encoder.lr=3e-3"))
    result = finetune_encoder(cfg)
    m = result.metrics
    assert m["steps"] == 30 and m["resumed"] is False and m["method"] == "full"
    assert m["tasks"]["colour"]["accuracy"] > 0.6 and m["tasks"]["warmth"]["roc_auc"] > 0.7
    assert m["trainable_parameters"] == m["total_parameters"]
    model_dir = write_classifier_dir(tmp_path / "enc", result.classifier, {"stage": "test"}, result.samples)
    loaded = load_encoder_classifier(model_dir)
    texts = ["abcd abcd", "klmn onml"]
    np.testing.assert_allclose(
        loaded.predict_proba("colour", texts), result.classifier.predict_proba("colour", texts), atol=1e-6
    )
    # The evaluate stage's view: instruction-style rows scored through the same classifier.
    frame = pd.DataFrame({"task": ["colour", "colour"], "prompt": texts, "response": ["red", "blue"]})
    scored, confusion = evaluate_encoder(loaded, frame, {"colour": loaded.label_sets["colour"]})
    assert scored["colour"]["n"] == 2 and len(confusion["colour"]) == 2 and "warmth" not in scored
    again = finetune_encoder(cfg)  # its last checkpoint is the finished run
    assert again.metrics["resumed"] is True and again.metrics["tasks"] == m["tasks"]


def test_scratch_lora_merges_into_plain_layers(tiny_config, tmp_path, mlm_encoder):
    # Through the stage: init=scratch leaves no comparison, and its declared outputs say so.
    from test_encoder_distill import load_stage

    cfg = tiny_config(
        *overrides(tmp_path, "encoder.init=scratch", "encoder.method=lora", "encoder.max_steps=4"),
        "encoder.export_onnx=false",
    )
    load_stage("encoder_finetune").main(cfg)
    m = json.loads((Path(cfg.paths.metrics) / "encoder_finetune.json").read_text())["scratch"]
    assert m["trainable_parameters"] < m["total_parameters"] / 2
    names = set(load_encoder_classifier(cfg.paths.encoder).encoder.state_dict())
    assert not any("lora" in name for name in names) and "blocks.0.attn.c_attn.weight" in names
    skipped = json.loads((Path(f"{cfg.paths.encoder}-scratch") / SKIPPED_FILE).read_text())
    assert skipped == {
        "stage": "encoder_finetune",
        "reason": "encoder.also_scratch=True, encoder.init=scratch",
    }
    assert (Path(cfg.paths.checkpoints) / "encoder_finetune-scratch").is_dir()


def test_pretrained_head_keeps_the_encoder_frozen(tiny_config, tmp_path):
    cfg = tiny_config(*overrides(tmp_path, "encoder.method=head", "encoder.max_steps=3"))
    result = finetune_encoder(cfg)
    reference, _ = load_pretrained()
    for name, value in reference.state_dict().items():
        if name.startswith("mlm_"):  # MiniLM has no masked-LM head: each load draws a fresh one
            continue
        assert torch.equal(result.classifier.encoder.state_dict()[name], value), name
    heads = sum(p.numel() for p in result.classifier.heads.parameters())
    assert result.metrics["trainable_parameters"] == heads


def test_missing_classifier_file_is_one_line(tmp_path):
    from lmpipe.errors import LmpipeError

    with pytest.raises(LmpipeError, match="missing .*encoder.pt: expected an encoder classifier directory"):
        load_encoder_classifier(tmp_path)
