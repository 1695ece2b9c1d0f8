import json

import pytest
import torch

from lmpipe.training import checkpointing
from lmpipe.training.checkpointing import AtomicCheckpointIO, fingerprint, resume_checkpoint
from lmpipe.training.configs import DistillConfig, OptimizerConfig, SFTConfig
from lmpipe.training.pretrain import pretrain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def save(path, value) -> None:
    torch.save({"value": value}, path)


def test_resume_checkpoint_only_matches_its_own_fingerprint(tmp_path):
    ckpt_dir = tmp_path / "pretrain"
    assert resume_checkpoint(ckpt_dir, "aaa") is None
    assert json.loads((ckpt_dir / "fingerprint.json").read_text()) == {"fingerprint": "aaa"}
    save(ckpt_dir / "last.ckpt", 1)
    save(ckpt_dir / "step5.ckpt", 1)
    assert resume_checkpoint(ckpt_dir, "aaa") == str(ckpt_dir / "last.ckpt")
    # DDP worker processes only look; the main process clears a stale folder.
    assert resume_checkpoint(ckpt_dir, "bbb", may_reset=False) is None
    assert (ckpt_dir / "last.ckpt").exists()
    assert resume_checkpoint(ckpt_dir, "bbb") is None
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["fingerprint.json"]
    assert json.loads((ckpt_dir / "fingerprint.json").read_text()) == {"fingerprint": "bbb"}


def test_an_unreadable_checkpoint_falls_back_to_the_newest_readable_one(tmp_path, capsys):
    ckpt_dir = tmp_path / "run"
    resume_checkpoint(ckpt_dir, "fp")
    for name in ("step5.ckpt", "step10.ckpt", "step20.ckpt"):
        save(ckpt_dir / name, name)
    (ckpt_dir / "last.ckpt").write_bytes((ckpt_dir / "step10.ckpt").read_bytes()[:100])
    (ckpt_dir / "step20.ckpt").write_bytes(b"")
    assert resume_checkpoint(ckpt_dir, "fp") == str(ckpt_dir / "step10.ckpt")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        str(ckpt_dir / "last.ckpt"),
        str(ckpt_dir / "step20.ckpt"),
    ]
    assert all(line.endswith("unreadable checkpoint (RuntimeError), skipped") for line in lines), lines

    # Workers only look (and say nothing); with nothing readable the main process starts afresh.
    for name in ("step5.ckpt", "step10.ckpt"):
        (ckpt_dir / name).write_bytes(b"PK")
    assert resume_checkpoint(ckpt_dir, "fp", may_reset=False) is None
    assert capsys.readouterr().err == ""
    assert resume_checkpoint(ckpt_dir, "fp") is None
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["fingerprint.json"]


def test_a_checkpoint_write_that_fails_leaves_the_previous_one_whole(tmp_path, monkeypatch):
    path = tmp_path / "ckpts" / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"step": 1}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}

    def killed(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"step": 1}
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_truncated_last_checkpoint_of_a_finished_run_resumes_from_the_step_checkpoint(
    tiny_config, tmp_path, capsys
):
    overrides = ("trainer.max_steps=6", "trainer.val_check_interval=3", "pretrain.checkpoint_every_n_steps=3")
    first = pretrain(tiny_config(*overrides))
    ckpt_dir = tmp_path / "checkpoints" / "pretrain"
    last = ckpt_dir / "last.ckpt"
    last.write_bytes(
        last.read_bytes()[: last.stat().st_size // 2]
    )  # a kill during the write, before atomic ones
    capsys.readouterr()

    again = pretrain(tiny_config(*overrides))
    out = capsys.readouterr()
    assert [line for line in out.err.splitlines() if "unreadable" in line] == [
        f"{last}: unreadable checkpoint (RuntimeError), skipped"
    ]
    assert f"pretrain: resuming from {ckpt_dir / 'step6.ckpt'}" in out.out
    assert again.metrics["resumed"] is True and again.metrics["steps"] == 6
    assert torch.equal(again.model.wte.weight, first.model.wte.weight)
    assert torch.load(last, weights_only=False)["global_step"] == 6  # rewritten whole at the end

    for path in ckpt_dir.glob("*.ckpt"):
        path.write_bytes(b"")
    fresh = pretrain(tiny_config(*overrides))
    assert fresh.metrics["resumed"] is False and fresh.metrics["steps"] == 6
    assert torch.equal(fresh.model.wte.weight, first.model.wte.weight)


def test_the_fingerprint_drops_reporting_fields_and_display_settings(tiny_config):
    trainer = tiny_config().trainer
    parts = {"optimizer": OptimizerConfig(), "sft": SFTConfig(), "pretrained": "a", "data": "b"}
    fp = fingerprint(1, trainer, **parts)
    assert len(fp) == 16 and fp == fingerprint(1, trainer, **parts)
    assert fp == fingerprint(1, trainer, **{**parts, "sft": SFTConfig(num_samples=9, sample_tokens=5)})
    assert fp == fingerprint(1, tiny_config("trainer.log_every_n_steps=3").trainer, **parts)
    for change in (
        {"sft": SFTConfig(method="lora")},
        {"sft": SFTConfig(lr=1e-4)},
        {"optimizer": OptimizerConfig(name="sgd")},
        {"pretrained": "c"},
        {"data": "c"},
    ):
        assert fingerprint(1, trainer, **{**parts, **change}) != fp, change
    assert fingerprint(2, trainer, **parts) != fp
    assert fingerprint(1, tiny_config("trainer.max_steps=31").trainer, **parts) != fp
    base = fingerprint(1, trainer, distill=DistillConfig(), teacher=None)
    assert base == fingerprint(1, trainer, distill=DistillConfig(num_samples=9), teacher=None)
    assert base != fingerprint(1, trainer, distill=DistillConfig(alpha=0.2), teacher=None)
