"""Training callbacks: throughput, loss history (for plots and the over/underfitting verdict), plain progress.

Lightning's tqdm bar redraws one line with carriage returns, which a CI log shows as one endless line, so when
stderr is not a terminal the bar is replaced by `LogLines`: one short line per logging interval.
"""

from __future__ import annotations

import sys
import time

import lightning as L


def _new_step(callback: L.Callback, step: int, every: int) -> bool:
    """True once per optimizer step that is a multiple of `every` (micro-batches of one step count once)."""
    if step % every or step == getattr(callback, "_last_step", None):
        return False
    callback._last_step = step
    return True


class TokenThroughput(L.Callback):
    """Logs `tokens_per_sec` (all processes together) averaged over each logging interval."""

    def __init__(self, tokens_per_batch: int, every_n_steps: int):
        self.tokens_per_batch, self.every = tokens_per_batch, max(1, every_n_steps)
        self._t0: float | None = None
        self._batches = 0
        self.last: float = 0.0
        self.total_tokens = 0
        self.total_seconds = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._batches = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._batches += 1
        if self._t0 is None or not _new_step(self, trainer.global_step, self.every):
            return
        elapsed = time.perf_counter() - self._t0
        tokens = self._batches * self.tokens_per_batch * trainer.world_size
        self.total_tokens += tokens
        self.total_seconds += elapsed
        self.last = tokens / max(elapsed, 1e-9)
        pl_module.log("tokens_per_sec", self.last, rank_zero_only=True)
        self._t0 = None

    def on_validation_start(self, trainer, pl_module):
        self._t0 = None  # validation time is not training throughput

    @property
    def mean(self) -> float:
        return self.total_tokens / self.total_seconds if self.total_seconds else 0.0

    # Callback state rides in Lightning checkpoints, so a resumed run reports the whole run's throughput.
    def state_dict(self) -> dict:
        return {"total_tokens": self.total_tokens, "total_seconds": self.total_seconds}

    def load_state_dict(self, state: dict) -> None:
        self.total_tokens, self.total_seconds = state["total_tokens"], state["total_seconds"]


class LossHistory(L.Callback):
    """Keeps (step, value) of train_loss at each logging step and of val_loss at each validation."""

    def __init__(self, every_n_steps: int = 1):
        self.every = max(1, every_n_steps)
        self.train: list[tuple[int, float]] = []
        self.val: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = trainer.callback_metrics.get("train_loss")
        if loss is not None and _new_step(self, trainer.global_step, self.every):
            self.train.append((trainer.global_step, float(loss)))

    def on_validation_epoch_end(self, trainer, pl_module):
        loss = trainer.callback_metrics.get("val_loss")
        if loss is not None and not trainer.sanity_checking:
            self.val.append((trainer.global_step, float(loss)))

    def state_dict(self) -> dict:
        return {"train": self.train, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.train = [tuple(p) for p in state["train"]]
        self.val = [tuple(p) for p in state["val"]]


class LogLines(L.Callback):
    """A progress line per logging interval, for logs that are not a terminal."""

    def __init__(self, every_n_steps: int):
        self.every = max(1, every_n_steps)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if not trainer.is_global_zero or not _new_step(self, step, self.every):
            return
        m = trainer.callback_metrics
        parts = [f"step {step}/{trainer.max_steps}"]
        for key in ("train_loss", "val_loss", "lr", "tokens_per_sec"):
            if key in m:
                parts.append(f"{key} {float(m[key]):.4g}")
        parts.append(f"{time.perf_counter() - self._t0:.0f}s")
        print("  ".join(parts), file=sys.stderr, flush=True)


def progress_callbacks(every_n_steps: int) -> tuple[list[L.Callback], bool]:
    """(callbacks, enable Lightning's bar): the tqdm bar on a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        return [], True
    return [LogLines(every_n_steps)], False
