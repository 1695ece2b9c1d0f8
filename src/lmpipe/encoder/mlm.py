"""Masked-LM pretraining of a new encoder on the corpus (stage `encoder_mlm`), on the training core.

The data are windows of the tokenize stage's shards, the decoder's own token ids. The encoder's tokenizer is
the corpus tokenizer with one more token, `formats.MASK`, appended at the end of the vocabulary, so the
decoder's ids, shards and metrics stay as they are. BERT's recipe: `mlm.mask_prob` of the tokens are selected
(never a special token), and of those `mask_token_prob` become the mask token, `random_token_prob` a random
corpus token and the rest stay; the loss is the cross-entropy on the selected tokens only. Training windows
and their masks are a pure function of (seed, batch, rank), so a resumed run sees the same batches; validation
and test windows are contiguous, with fixed masks, so their loss and masked-token accuracy compare across
steps and runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader, Dataset

from lmpipe import config
from lmpipe.encoder.config import MLMConfig
from lmpipe.encoder.model import Encoder
from lmpipe.encoder.tokens import EncoderTokenizer
from lmpipe.errors import LmpipeError
from lmpipe.formats import IGNORE_INDEX, MASK, PAD, SPECIAL_TOKENS, TOKENIZER_FILE
from lmpipe.tokenizer import read_shard
from lmpipe.training.checkpointing import digest, file_sha256
from lmpipe.training.configs import OptimizerConfig
from lmpipe.training.core import FitPlan, TrainingModule, fit
from lmpipe.training.datamodules import ResumableBatches, check_shards
from lmpipe.training.streams import BatchStream, StreamSpec

FIRST_ORDINARY_ID = len(SPECIAL_TOKENS)
"""Ids below this are the reserved special tokens: never selected, never drawn as random replacements."""


def mask_tokens(
    ids: np.ndarray, rng: np.random.Generator, cfg: MLMConfig, mask_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of token ids: labels hold the selected tokens and -100 elsewhere."""
    selectable = ids >= FIRST_ORDINARY_ID
    chosen = selectable & (rng.random(ids.shape) < cfg.mask_prob)
    if not chosen.any() and selectable.any():  # a loss needs at least one target
        chosen.flat[rng.choice(np.flatnonzero(selectable))] = True
    roll = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (roll < cfg.mask_token_prob)] = mask_id
    randomised = chosen & (roll >= cfg.mask_token_prob) & (roll < cfg.mask_token_prob + cfg.random_token_prob)
    inputs[randomised] = rng.integers(FIRST_ORDINARY_ID, mask_id, size=int(randomised.sum()))
    return inputs, np.where(chosen, ids, IGNORE_INDEX)


def _pair(inputs: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(inputs.astype(np.int64)), torch.from_numpy(labels.astype(np.int64))


class MaskedWindows(BatchStream):
    """Training micro-batches (inputs, labels) of random windows, masked with the batch's own RNG."""

    def __init__(self, tokens_dir: Path, cfg: MLMConfig, mask_id: int, spec: StreamSpec):
        super().__init__(spec)
        self.tokens_dir, self.cfg, self.mask_id = tokens_dir, cfg, mask_id
        self._tokens: np.ndarray | None = None

    def batch(self, index: int):
        if self._tokens is None:  # opened lazily: each DDP process maps the file itself
            self._tokens = read_shard(self.tokens_dir, "train")
        rng = self.rng(index)
        window = self.cfg.window
        starts = rng.integers(0, len(self._tokens) - window, size=self.cfg.batch_size)
        ids = np.stack([self._tokens[s : s + window] for s in starts]).astype(np.int64)
        return _pair(*mask_tokens(ids, rng, self.cfg, self.mask_id))


class FixedMaskedWindows(Dataset):
    """Contiguous windows of a split, each with a mask drawn from (seed, window index): the same every time."""

    def __init__(self, tokens: np.ndarray, cfg: MLMConfig, mask_id: int, seed: int, limit: int | None = None):
        self.tokens, self.cfg, self.mask_id, self.seed = tokens, cfg, mask_id, seed
        self.count = len(tokens) // cfg.window if limit is None else min(limit, len(tokens) // cfg.window)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        ids = np.asarray(self.tokens[i * self.cfg.window : (i + 1) * self.cfg.window], dtype=np.int64)
        return _pair(*mask_tokens(ids, np.random.default_rng([self.seed, 1, i]), self.cfg, self.mask_id))


class MLMDataModule(ResumableBatches, L.LightningDataModule):
    def __init__(self, tokens_dir: Path, cfg: MLMConfig, mask_id: int, seed: int):
        super().__init__()
        self.tokens_dir, self.cfg, self.mask_id, self.seed = Path(tokens_dir), cfg, mask_id, seed
        check_shards(self.tokens_dir, cfg.window, "mlm.window")

    def batches_per_epoch(self) -> int:
        n_train = len(read_shard(self.tokens_dir, "train"))
        return max(1, math.ceil(n_train / (self.cfg.batch_size * self.cfg.window * self.world_size)))

    def train_dataloader(self) -> DataLoader:
        spec = self.stream_spec(self.seed, self.batches_per_epoch())
        return self.loader(MaskedWindows(self.tokens_dir, self.cfg, self.mask_id, spec))

    def val_dataloader(self) -> DataLoader:
        val = FixedMaskedWindows(read_shard(self.tokens_dir, "val"), self.cfg, self.mask_id, self.seed)
        return self.loader(val, batch_size=self.cfg.batch_size, shuffle=False)


class LitMLM(TrainingModule):
    """A new encoder and its masked-LM loss."""

    def __init__(self, encoder: Encoder, optimizer: OptimizerConfig, cfg: MLMConfig):
        super().__init__(optimizer, cfg, cfg.max_steps)
        self.encoder = encoder

    def param_groups(self, weight_decay: float) -> list[dict]:
        return self.encoder.param_groups(weight_decay)

    def training_loss(self, batch):
        loss, accuracy = self.encoder.mlm_loss(batch[0], None, batch[1])
        return loss, {"train_loss": loss, "train_masked_accuracy": accuracy}

    def validation_losses(self, batch):
        loss, accuracy = self.encoder.mlm_loss(batch[0], None, batch[1])
        n = int((batch[1] != IGNORE_INDEX).sum())  # averaged over selected tokens, not windows
        return {"val_loss": (loss, n), "val_masked_accuracy": (accuracy, n)}


def encoder_tokenizer(tokens_dir: Path) -> tuple[EncoderTokenizer, int]:
    """The corpus tokenizer with the mask token appended at the end of its vocabulary, and the mask's id."""
    tokenizer = EncoderTokenizer.from_file(tokens_dir / TOKENIZER_FILE, PAD)
    vocab = tokenizer.vocab_size
    tokenizer.tokenizer.add_special_tokens([MASK])
    mask_id = tokenizer.tokenizer.token_to_id(MASK)
    if mask_id != vocab or tokenizer.vocab_size != vocab + 1:
        raise LmpipeError(
            f"{tokens_dir / TOKENIZER_FILE}: {MASK} got id {mask_id}; expected a new last id {vocab} "
            "(a corpus tokenizer of the tokenize stage)"
        )
    return tokenizer, mask_id


@torch.no_grad()
def masked_lm_metrics(encoder: Encoder, windows: FixedMaskedWindows, batch_size: int = 64) -> dict:
    """Masked-LM loss (nats per selected token) and masked-token accuracy over fixed-mask windows."""
    encoder.eval()
    total_loss = correct = count = 0.0
    for start in range(0, len(windows), batch_size):
        pairs = [windows[i] for i in range(start, min(start + batch_size, len(windows)))]
        inputs, labels = torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])
        loss, accuracy = encoder.mlm_loss(inputs, None, labels)
        n = int((labels != IGNORE_INDEX).sum())
        total_loss, correct, count = total_loss + float(loss) * n, correct + float(accuracy) * n, count + n
    return {"mlm_loss": total_loss / count, "masked_accuracy": correct / count, "masked_tokens": int(count)}


@dataclass
class MLMResult:
    encoder: Encoder
    tokenizer: EncoderTokenizer
    metrics: dict
    curves: dict


def pretrain_encoder(cfg: DictConfig, run=None) -> MLMResult | None:
    """Masked-LM pretraining of a new encoder (resuming if possible); None in DDP worker processes."""
    mcfg: MLMConfig = config.build(cfg.mlm)
    optim_cfg = mcfg.optimizer(cfg.optimizer)
    tokens_dir = Path(cfg.paths.tokens)
    tokenizer, mask_id = encoder_tokenizer(tokens_dir)
    shape = mcfg.encoder_config(tokenizer.vocab_size, tokenizer.pad_id)
    plan = FitPlan(
        name="encoder_mlm",
        build_module=lambda: LitMLM(Encoder(shape), optim_cfg, mcfg),
        datamodule=MLMDataModule(tokens_dir, mcfg, mask_id, cfg.seed),
        trainer=mcfg.trainer(cfg.trainer),
        checkpoint_every_n_steps=mcfg.checkpoint_every_n_steps,
        shaping={
            "optimizer": optim_cfg,
            "mlm": mcfg,
            "data": digest({split: file_sha256(tokens_dir / f"{split}.bin") for split in ("train", "val")}),
        },
    )
    fitted = fit(plan, cfg, run)
    if fitted is None:
        return None
    encoder = fitted.module.encoder.float().eval()
    test = FixedMaskedWindows(read_shard(tokens_dir, "test"), mcfg, mask_id, cfg.seed, mcfg.test_windows)
    steps = fitted.trainer.global_step
    metrics = {
        **fitted.metrics(),
        "test": masked_lm_metrics(encoder, test),
        "parameters": encoder.num_parameters(),
        "parameters_non_embedding": encoder.num_parameters(non_embedding=True),
        "tokens_seen": steps
        * mcfg.batch_size
        * mcfg.window
        * fitted.trainer.world_size
        * fitted.trainer.accumulate_grad_batches,
        "vocab_size": tokenizer.vocab_size,
        "mask_id": mask_id,
    }
    return MLMResult(encoder, tokenizer, metrics, fitted.curves)
