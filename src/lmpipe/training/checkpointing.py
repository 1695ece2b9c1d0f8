"""Resumable training runs, shared by every training stage.

A run keeps its checkpoints in one folder next to `fingerprint.json`, a hash of everything that shapes what
training computes. A re-run with the same fingerprint resumes from `last.ckpt`; any change clears the folder
and starts afresh, so a stale checkpoint never leaks into a different experiment. Exact resumption also needs
the global torch RNG (dropout) in the checkpoint (`RngStateInCheckpoints`) and a data stream that restarts
where it stopped (the data modules' own `state_dict`).

Checkpoints are written to a temporary file in their folder and renamed into place (`AtomicCheckpointIO`), so a
kill mid-write leaves the previous checkpoint whole. A checkpoint that still cannot be read (a disk fault, a
copy cut short) is reported in one line and resume falls back to the newest readable one, or starts afresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from lmpipe import atomic, config
from lmpipe.training.configs import Samples

# Trainer fields that change how a run prints, never what it computes.
_DISPLAY_ONLY = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def quiet_lightning() -> None:
    """Silence warnings that say nothing actionable about this setup (they would bury the progress lines)."""
    import warnings

    warnings.filterwarnings("ignore", message=".*IterableDataset. has .__len__. defined")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.")
    # The batch streams resume through their data module's checkpointed state, which this check does not see.
    warnings.filterwarnings(
        "ignore", message=".*resuming from a checkpoint that ended before the epoch ended"
    )
    # The folder always holds fingerprint.json (and last.ckpt when resuming) before training starts.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty")


def trainer_shaping(trainer: DictConfig) -> dict:
    """The Trainer section without the fields that only affect display (for fingerprints)."""
    return {k: v for k, v in config.to_container(trainer).items() if k not in _DISPLAY_ONLY}


def digest(shaping: dict) -> str:
    """A short, stable hash of plain data (the fingerprint of a run)."""
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes (a model's weights in the fingerprint of the stage that starts from it)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fingerprint(seed: int, trainer: DictConfig, **parts) -> str:
    """The fingerprint of a run: the seed, the trainer section without its display fields, and `parts`, the
    effective config sections (dataclasses; a stage section without its reporting-only fields) and the hashes
    of the data and weights the run starts from."""

    def plain(part):
        if isinstance(part, Samples):
            return part.shaping()
        return dataclasses.asdict(part) if dataclasses.is_dataclass(part) else part

    shaping = {"seed": seed, "trainer": trainer_shaping(trainer)}
    return digest(shaping | {name: plain(part) for name, part in parts.items()})


LAST = "last.ckpt"


def _step(path: Path) -> int:
    match = re.fullmatch(r"step(\d+)\.ckpt", path.name)
    return int(match.group(1)) if match else -1


def _unreadable(path: Path) -> str | None:
    """Why `path` cannot be loaded as a checkpoint, or None if it can (memory-mapped: no tensor is read)."""
    try:
        torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # a cut-short zip, a bad pickle: torch's many-line messages say the same
        return type(exc).__name__
    return None


def resume_checkpoint(ckpt_dir: Path, fp: str, may_reset: bool = True) -> str | None:
    """The checkpoint to resume from if the folder's fingerprint matches: `last.ckpt`, else the newest readable
    `step<N>.ckpt`; otherwise (main process only) clear the folder for a fresh start.

    Each unreadable checkpoint is reported in one line (by the main process). DDP worker processes start after
    the main process has prepared the folder, so they only look.
    """
    stamp = ckpt_dir / "fingerprint.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("fingerprint") == fp:
        steps = sorted(ckpt_dir.glob("step*.ckpt"), key=_step, reverse=True)
        for path in [p for p in (ckpt_dir / LAST, *steps) if p.is_file()]:
            reason = _unreadable(path)
            if reason is None:
                return str(path)
            if may_reset:
                print(f"{path}: unreadable checkpoint ({reason}), skipped", file=sys.stderr, flush=True)
    if may_reset:
        if ckpt_dir.exists():
            shutil.rmtree(ckpt_dir)
        ckpt_dir.mkdir(parents=True)
        atomic.write_json(stamp, {"fingerprint": fp})
    return None


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but into a temporary file in the same folder renamed over the target: a
    kill mid-write leaves the previous checkpoint whole instead of a truncated one."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(checkpoint, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class RngStateInCheckpoints:
    """LightningModule mixin: the global torch RNG (dropout masks) rides in checkpoints, so resume is exact."""

    def on_save_checkpoint(self, checkpoint):
        checkpoint["torch_rng_state"] = torch.get_rng_state()

    def on_load_checkpoint(self, checkpoint):
        if "torch_rng_state" in checkpoint:
            torch.set_rng_state(checkpoint["torch_rng_state"])


class TeacherOutOfCheckpoints:
    """LightningModule mixin of a distillation: its frozen `self.teacher` (a module, or None) stays out of
    checkpoints, since its weights are pinned by the fingerprint and re-read from its directory; on resume its
    current weights stand in, so the strict state-dict load still matches."""

    def on_save_checkpoint(self, checkpoint):
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        checkpoint["state_dict"] = {k: v for k, v in state.items() if not k.startswith("teacher.")}

    def on_load_checkpoint(self, checkpoint):
        super().on_load_checkpoint(checkpoint)
        if self.teacher is not None:
            own = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
            checkpoint["state_dict"] = {**checkpoint["state_dict"], **own}


def build_trainer(
    trainer_cfg: DictConfig,
    *,
    callbacks: list[L.Callback],
    show_bar: bool,
    ckpt_dir: Path,
    checkpoint_every_n_steps: int,
    logger,
    **overrides,
) -> L.Trainer:
    """The Trainer of `trainer_cfg` (with `overrides`), writing resumable checkpoints into `ckpt_dir`.

    Adds the periodic checkpoint (`last.ckpt` plus the latest `step<N>.ckpt`) to `callbacks`; Lightning's
    progress bar stays on only where `show_bar` says it may (a terminal).
    """
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(
        dirpath=ckpt_dir,
        filename="step{step}",
        every_n_train_steps=checkpoint_every_n_steps,
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    merged = OmegaConf.merge(trainer_cfg, overrides)
    merged.enable_progress_bar = bool(merged.enable_progress_bar and show_bar)
    # The budget is in steps, not epochs: count an integer val_check_interval in training batches across
    # epochs. Lightning's default counts within each epoch and refuses an interval longer than one epoch,
    # which a small data set (or the same data split over more DDP processes) runs into.
    step_validation = {}
    if "check_val_every_n_epoch" not in merged and isinstance(merged.get("val_check_interval"), int):
        step_validation["check_val_every_n_epoch"] = None
    return config.build(
        merged,
        callbacks=[*callbacks, checkpoint],
        logger=logger,
        default_root_dir=str(ckpt_dir),
        plugins=[AtomicCheckpointIO()],
        **step_validation,
    )


def fit_resumable(
    trainer: L.Trainer, module: L.LightningModule, datamodule, resume: str | None, ckpt_dir: Path
) -> float:
    """`trainer.fit` from the checkpoint `resume` (None: from scratch), then one more `last.ckpt`: the periodic
    checkpoint is taken before the same step's validation, so only this one carries the complete loss history
    that a re-run of a finished stage restores. Returns the seconds the fit took."""
    started = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume)
    seconds = time.perf_counter() - started
    trainer.save_checkpoint(ckpt_dir / LAST)
    return seconds
