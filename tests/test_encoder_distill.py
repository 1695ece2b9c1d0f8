"""Tests for lmpipe.encoder.distill and the encoder_distill stage: the half-depth student starts from the
teacher's every other block and distils on the training core (soft labels, and the alpha=0 ablation without
a teacher), scored beside the teacher on the same test examples."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from test_encoder_finetune import overrides

from lmpipe import config
from lmpipe.encoder.classifier import EncoderClassifier, load_encoder_classifier
from lmpipe.encoder.config import EncoderConfig, EncoderFinetuneConfig
from lmpipe.encoder.data import jsonl_label_data
from lmpipe.encoder.distill import LitEncoderDistill, half_depth_student
from lmpipe.encoder.model import Encoder
from lmpipe.encoder.outputs import write_classifier_dir
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError
from lmpipe.formats import PAD, SKIPPED_FILE, TOKENIZER_FILE
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.heads import ClassificationHeads

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_encoder(vocab_size: int = 50, pad_id: int = 0) -> Encoder:
    torch.manual_seed(0)
    return Encoder(
        EncoderConfig(vocab_size=vocab_size, pad_id=pad_id, block_size=32, n_layer=4, n_head=2, n_embd=16)
    )


def test_student_keeps_every_other_block():
    teacher = tiny_encoder()
    student = half_depth_student(teacher)
    assert student.config.n_layer == 2
    for new, old in ((0, 0), (1, 2)):
        assert torch.equal(student.blocks[new].attn.c_attn.weight, teacher.blocks[old].attn.c_attn.weight)
    assert torch.equal(student.wte.weight, teacher.wte.weight)
    assert student.num_parameters(non_embedding=True) < teacher.num_parameters(non_embedding=True)


def load_stage(name: str):
    """pipelines/<name>.py as a module (the pipelines are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"stage_{name}", ROOT / "pipelines" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stage_distils_a_tiny_teacher_with_its_ablation(tiny_config, tiny_tokens, tmp_path):
    cfg = tiny_config(
        *overrides(tmp_path, "encoder_distill.max_steps=3", "encoder_distill.val_check_interval=3")
    )
    tokenizer = EncoderTokenizer.from_file(tiny_tokens / TOKENIZER_FILE, PAD)
    data = jsonl_label_data(
        list(cfg.encoder.jsonl), list(cfg.encoder.tasks), config.build(cfg.encoder), cfg.seed
    )
    sizes = {task: len(labels) for task, labels in data.label_sets.items()}
    teacher = EncoderClassifier(
        tiny_encoder(tokenizer.vocab_size, tokenizer.pad_id).eval(),
        ClassificationHeads(16, sizes, seed=0),
        tokenizer,
        data.label_sets,
        32,
    )
    trained = {"init": "scratch", "method": "full", "steps": 7, "train_seconds": 1.5}
    write_classifier_dir(cfg.paths.encoder, teacher, {"stage": "test", "metrics": trained}, [])
    stage = load_stage("encoder_distill")

    stage.main(cfg)
    metrics = json.loads((Path(cfg.paths.metrics) / "encoder_distill.json").read_text())
    assert metrics["teacher"]["n_layer"] == 4 and metrics["teacher"]["steps"] == 7
    for name, alpha, method in (("student", 0.5, "distill"), ("student-nodistill", 0.0, "nodistill")):
        m = metrics[name]
        assert (m["steps"], m["alpha"], m["method"], m["n_layer"]) == (3, alpha, method, 2)
        assert m["encoder_parameters_non_embedding"] < metrics["teacher"]["encoder_parameters_non_embedding"]
        ratio = m["tasks"]["colour"]["f1_macro"] / metrics["teacher"]["tasks"]["colour"]["f1_macro"]
        assert metrics["f1_macro_retention"][name]["colour"] == pytest.approx(ratio)
        student = load_encoder_classifier(f"{cfg.paths.encoder}-{name}")
        assert student.encoder.config.n_layer == 2 and student.label_sets == data.label_sets
    # The teacher stays out of the student's checkpoints; it is re-read from its directory.
    saved = torch.load(Path(cfg.paths.checkpoints) / "encoder_distill" / "last.ckpt", weights_only=False)
    assert not any(key.startswith("teacher.") for key in saved["state_dict"])

    # Without the ablation its declared output says why it is empty, and readers are told so in one line.
    stage.main(OmegaConf.merge(cfg, {"encoder_distill": {"ablation": False}}))
    assert (Path(f"{cfg.paths.encoder}-student-nodistill") / SKIPPED_FILE).is_file()
    with pytest.raises(
        LmpipeError, match=r"no classifier here, stage encoder_distill skipped it \(encoder_distill"
    ):
        load_encoder_classifier(f"{cfg.paths.encoder}-student-nodistill")
    again = json.loads((Path(cfg.paths.metrics) / "encoder_distill.json").read_text())
    assert again["student"]["resumed"] is True and "student-nodistill" not in again


def test_distillation_alpha_zero_has_no_teacher(tiny_tokens):
    tokenizer = EncoderTokenizer.from_file(tiny_tokens / TOKENIZER_FILE, PAD)
    teacher = EncoderClassifier(
        tiny_encoder(tokenizer.vocab_size, tokenizer.pad_id).eval(),
        ClassificationHeads(16, {"colour": 3}, seed=0),
        tokenizer,
        {"colour": ["red", "green", "blue"]},
        32,
    )
    ecfg = EncoderFinetuneConfig(tasks=["colour"], max_steps=4)
    ablation = LitEncoderDistill(teacher, OptimizerConfig(lr=1e-3), ecfg, temperature=2.0, alpha=0.0)
    assert ablation.teacher is None and ablation.frozen_part() is None
    distilled = LitEncoderDistill(teacher, OptimizerConfig(lr=1e-3), ecfg, temperature=2.0, alpha=1.0)
    assert not any(p.requires_grad for p in distilled.teacher.parameters())
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 0], [5, 9, 0, 0]]),
        "task": torch.tensor([0, 0]),
        "label": torch.tensor([1, 2]),
    }
    loss, logged = distilled.training_loss(batch)
    assert set(logged) == {"train_loss", "train_objective", "train_soft"} and loss == logged["train_soft"]
    names = sum((g["param_names"] for g in distilled.param_groups(0.1)), [])
    assert sorted(names) == sorted(n for n, p in distilled.named_parameters() if p.requires_grad)
