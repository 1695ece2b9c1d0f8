import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig
from lmpipe.training.configs import DistillConfig, OptimizerConfig, PretrainConfig, SFTConfig


def test_the_schemas_import_neither_torch_nor_lightning():
    code = "import sys, lmpipe.training.configs; print(sorted(m for m in ('torch', 'lightning') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_a_stage_section_keeps_its_flat_keys_and_shares_the_schedule():
    for cls in (PretrainConfig, SFTConfig, DistillConfig):
        assert {"warmup_steps", "min_lr_ratio", "checkpoint_every_n_steps", "num_samples"} <= set(
            config.schema_fields(f"lmpipe.training.configs.{cls.__name__}")
        )
    with pytest.raises(
        LmpipeError, match=r"^pretrain\.min_lr_ratio=1\.5: expected a value less than or equal"
    ):
        PretrainConfig(min_lr_ratio=1.5)
    with pytest.raises(LmpipeError, match=r"^pretrain\.sample_prompts is empty"):
        PretrainConfig(sample_prompts=[])


def test_a_fine_tuning_stage_replaces_the_optimizer_and_trainer_settings(tiny_config):
    cfg = tiny_config()
    sft = SFTConfig(lr=5e-4, weight_decay=0.2, max_steps=7, val_check_interval=3, limit_val_batches=2)
    optimizer = sft.optimizer(cfg.optimizer)
    assert (optimizer.lr, optimizer.weight_decay, optimizer.name) == (5e-4, 0.2, cfg.optimizer.name)
    trainer = sft.trainer(cfg.trainer)
    assert (trainer.max_steps, trainer.val_check_interval, trainer.limit_val_batches) == (7, 3, 2)
    assert trainer.precision == cfg.trainer.precision


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"method": "prefix"}, r"^sft\.method='prefix': expected 'full', 'lora' or 'head'$"),
        ({"batch_size": 0}, r"^sft\.batch_size=0: expected a value greater than or equal to 1$"),
        ({"max_length": -1}, r"^sft\.max_length=-1: expected a value greater than or equal to 0$"),
        ({"lr": 0.0}, r"^sft\.lr=0\.0: expected a value greater than 0$"),
        ({"lora_dropout": 1.0}, r"^sft\.lora_dropout=1\.0: expected a value less than 1$"),
        ({"lora_targets": ["lm_head"]}, r"^sft\.lora_targets\.0='lm_head': expected 'c_attn', 'c_proj' or"),
        ({"lora_targets": []}, r"^sft\.lora_targets=\[\]: expected List should have at least 1 item"),
        ({"method": "head", "head_tasks": []}, r"^sft\.head_tasks=\[\]: expected at least one label task"),
    ],
)
def test_sft_config_rejects_bad_fields_in_one_line(fields, message):
    with pytest.raises(LmpipeError, match=message):
        SFTConfig(**fields)


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"student": {"n_layers": 2}},
            r"^distill\.student\.n_layers: unknown field; expected any of block_size",
        ),
        ({"student": {"vocab_size": 9}}, r"^distill\.student\.vocab_size: unknown field"),
        (
            {"student": {"n_embd": 30, "n_head": 4}},
            r"^distill\.student\.n_embd=30 is not divisible by distill\.student\.n_head=4$",
        ),
        ({"teacher": ""}, r"^distill\.teacher='': expected a model directory name under paths\.models"),
        ({"teacher": "a/b"}, r"^distill\.teacher='a/b': expected a model directory name"),
        ({"temperature": 0.0}, r"^distill\.temperature=0\.0: expected a value greater than 0$"),
        ({"alpha": 1.5}, r"^distill\.alpha=1\.5: expected a value less than or equal to 1$"),
        (
            {"sft_fraction": -0.1},
            r"^distill\.sft_fraction=-0\.1: expected a value greater than or equal to 0$",
        ),
        (
            {"sft_fraction": 0.1, "batch_size": 4},
            r"^distill\.sft_fraction=0\.1: with distill\.batch_size=4 a batch would hold 0 examples and "
            r"4 windows; expected at least one of each \(or a fraction of 0 or 1\)$",
        ),
        ({"max_steps": 0}, r"^distill\.max_steps=0: expected a value greater than or equal to 1$"),
    ],
)
def test_distill_config_rejects_bad_fields_in_one_line(fields, message):
    with pytest.raises(LmpipeError, match=message):
        DistillConfig(**fields)


def test_distill_config_builds_through_hydra_with_a_nested_student(tiny_config):
    cfg = tiny_config()
    OmegaConf.set_struct(cfg, False)
    cfg.distill = {
        "_target_": "lmpipe.training.configs.DistillConfig",
        "student": {"n_layer": 3, "n_embd": 64, "block_size": 64},
        "teacher": "none",
        "alpha": 0.7,
        "batch_size": 10,
        "sft_fraction": 0.25,
    }
    config.check(cfg, ["distill"])
    built = config.build(cfg.distill)
    assert type(built.student) is dict and built.student == {"n_layer": 3, "n_embd": 64, "block_size": 64}
    assert built.alpha == 0.0  # no teacher: hard labels alone
    assert built.batch_split == (7, 3)  # 2.5 examples round half up
    student = built.student_config(vocab_size=100)
    assert (student.n_layer, student.n_embd, student.vocab_size, student.n_head) == (3, 64, 100, 4)


def test_the_default_student_is_at_most_a_third_of_the_default_teacher():
    teacher = GPT(GPTConfig(vocab_size=4096, block_size=128, n_layer=4, n_head=4, n_embd=256))
    student = GPT(DistillConfig().student_config(4096, teacher.config))
    assert student.num_parameters() <= teacher.num_parameters() / 3
    with pytest.raises(
        LmpipeError, match=r"^distill\.student\.block_size=256: exceeds the teacher's block_size 128;"
    ):
        DistillConfig(student={**DistillConfig().student, "block_size": 256}).student_config(
            4096, teacher.config
        )


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"name": "rmsprop"}, "optimizer.name='rmsprop'"),
        ({"lr": 0.0}, "optimizer.lr=0.0"),
        ({"lr": -1e-3}, "optimizer.lr=-0.001"),
        ({"lr": float("nan")}, "optimizer.lr=nan"),
        ({"weight_decay": -0.1}, "optimizer.weight_decay=-0.1"),
        ({"l1": -1.0}, "optimizer.l1=-1.0"),
        ({"betas": [0.9]}, "optimizer.betas=[0.9]"),
        ({"betas": [0.9, 1.0]}, "optimizer.betas.1=1.0"),
        ({"name": "momentum", "momentum": 0.0}, "optimizer.momentum=0.0"),
        ({"name": "momentum", "momentum": 1.0}, "optimizer.momentum=1.0"),
    ],
)
def test_invalid_optimizer_config_raises_one_line_naming_the_field(kwargs, names):
    with pytest.raises(LmpipeError) as err:
        OptimizerConfig(**kwargs)
    message = str(err.value)
    assert message.startswith(names) and "expected" in message and "\n" not in message


def test_build_passes_the_config_error_through():
    section = OmegaConf.create(
        {"_target_": "lmpipe.training.configs.OptimizerConfig", "name": "adamw", "lr": -1}
    )
    with pytest.raises(LmpipeError, match=r"optimizer\.lr=-1"):
        config.build(section)
