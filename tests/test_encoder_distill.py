"""Tests for lmpipe.encoder.distill: the half-depth student starts from the teacher's every other block, and
distils on the training core (soft labels, and the alpha=0 ablation without them)."""

import pytest
import torch
from test_encoder_finetune import toy_jsonl

from lmpipe.encoder.classifier import EncoderClassifier
from lmpipe.encoder.config import EncoderConfig, EncoderFinetuneConfig
from lmpipe.encoder.data import encode_rows, jsonl_label_data
from lmpipe.encoder.distill import LitEncoderDistill, half_depth_student
from lmpipe.encoder.finetune import EncoderDataModule
from lmpipe.encoder.model import Encoder
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.formats import PAD, TOKENIZER_FILE
from lmpipe.training import core
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.heads import ClassificationHeads

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


@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_distillation_runs_on_the_core(tiny_config, tiny_tokens, tmp_path, alpha):
    cfg = tiny_config()
    tokenizer = EncoderTokenizer.from_file(tiny_tokens / TOKENIZER_FILE, PAD)
    ecfg = EncoderFinetuneConfig(
        tasks=["colour", "warmth"],
        max_length=32,
        batch_size=8,
        max_steps=4,
        warmup_steps=1,
        val_check_interval=2,
        limit_val_batches=1,
    )
    data = jsonl_label_data([toy_jsonl(tmp_path / "toy.jsonl")], ecfg.tasks, ecfg, seed=0)
    rows = {s: encode_rows(f, data.label_sets, tokenizer, ecfg, s) for s, f in data.frames.items()}
    sizes = {task: len(labels) for task, labels in data.label_sets.items()}
    teacher = EncoderClassifier(
        tiny_encoder(tokenizer.vocab_size, tokenizer.pad_id).eval(),
        ClassificationHeads(16, sizes, seed=0),
        tokenizer,
        data.label_sets,
        32,
    )
    plan = core.FitPlan(
        name=f"distill-{alpha}",
        build_module=lambda: LitEncoderDistill(
            teacher, OptimizerConfig(lr=1e-3), ecfg, temperature=2.0, alpha=alpha
        ),
        datamodule=EncoderDataModule(rows["train"], rows["val"], 8, 0, tokenizer.pad_id),
        trainer=ecfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=2,
        shaping={"alpha": alpha},
    )
    fitted = core.fit(plan, cfg)
    assert fitted.trainer.global_step == 4
    student = fitted.module.classifier(teacher)
    probs = student.predict_proba("colour", ["abcd abcd", "klmn"])
    assert probs.shape == (2, 3) and student.encoder.config.n_layer == 2
    assert not any(p.requires_grad for p in teacher.encoder.parameters())
