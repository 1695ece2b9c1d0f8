from types import SimpleNamespace

import pytest
import torch

from lmpipe.training import callbacks
from lmpipe.training.callbacks import LogLines, LossHistory, TokenThroughput, progress_callbacks


def trainer(step: int, **metrics) -> SimpleNamespace:
    values = {k: torch.tensor(v) for k, v in metrics.items()}
    return SimpleNamespace(
        global_step=step,
        callback_metrics=values,
        sanity_checking=False,
        world_size=2,
        is_global_zero=True,
        max_steps=10,
    )


def test_loss_history_keeps_one_train_point_per_logging_step_and_every_validation():
    history = LossHistory(every_n_steps=2)
    for step, micro_batches in ((1, 1), (2, 2), (3, 1), (4, 1)):
        for _ in range(micro_batches):  # the micro-batches of one optimizer step count once
            history.on_train_batch_end(trainer(step, train_loss=float(step)), None, None, None, 0)
    history.on_validation_epoch_end(trainer(4, val_loss=0.5), None)
    history.on_validation_epoch_end(
        SimpleNamespace(**vars(trainer(4, val_loss=0.1)) | {"sanity_checking": True}), None
    )
    assert history.train == [(2, 2.0), (4, 4.0)] and history.val == [(4, 0.5)]

    restored = LossHistory(2)
    restored.load_state_dict(history.state_dict())  # the state rides in checkpoints
    assert (restored.train, restored.val) == (history.train, history.val)


def test_token_throughput_counts_every_process_and_survives_a_resume(monkeypatch):
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    module = SimpleNamespace(log=lambda *args, **kwargs: None)
    meter = TokenThroughput(tokens_per_batch=100, every_n_steps=2)
    for step in (1, 2):
        meter.on_train_batch_start(trainer(step), module, None, 0)
        meter.on_train_batch_end(trainer(step), module, None, None, 0)
    assert meter.last == pytest.approx(2 * 100 * 2 / 2.0) and meter.mean == meter.last
    resumed = TokenThroughput(100, 2)
    resumed.load_state_dict(meter.state_dict())
    assert resumed.mean == meter.mean


def test_without_a_terminal_progress_is_one_line_per_interval(monkeypatch, capsys):
    monkeypatch.setattr(callbacks.sys.stderr, "isatty", lambda: False)
    (lines,), show_bar = progress_callbacks(5)
    assert isinstance(lines, LogLines) and show_bar is False
    for step in range(1, 11):
        lines.on_train_batch_end(trainer(step, train_loss=1.5, lr=0.01), None, None, None, 0)
    printed = capsys.readouterr().err.splitlines()
    assert [line.split("  ")[:3] for line in printed] == [
        ["step 5/10", "train_loss 1.5", "lr 0.01"],
        ["step 10/10", "train_loss 1.5", "lr 0.01"],
    ]
