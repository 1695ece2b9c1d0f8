"""How a training stage's results land on disk: a self-contained model directory and loss-curve CSVs.

A model directory holds `model.pt` (config + weights), the tokenizer and its chat template, and samples, so any
later stage (evaluation, export, serving) needs nothing else. Both are written atomically.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from lmpipe import atomic
from lmpipe.formats import MODEL_FILE, SAMPLES_FILE
from lmpipe.model import save_checkpoint
from lmpipe.text_samples import format_samples
from lmpipe.tokenizer import copy_tokenizer


def write_model_dir(
    model_dir: str | Path,
    model,
    extra: dict,
    tokenizer_dir: str | Path,
    samples: list[dict],
    also: Callable[[Path], None] | None = None,
) -> Path:
    """Replace `model_dir` with the model, its tokenizer files and samples; `also(tmp)` may add more files."""
    model_dir = Path(model_dir)
    with atomic.atomic_path(model_dir) as tmp:
        tmp.mkdir()
        save_checkpoint(tmp / MODEL_FILE, model, extra)
        copy_tokenizer(tokenizer_dir, tmp)
        (tmp / SAMPLES_FILE).write_text(format_samples(samples), encoding="utf-8")
        if also is not None:
            also(tmp)
    return model_dir


def write_curves(plots_dir: str | Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    """One `<name>.csv` (step,loss) per curve, for DVC plots."""
    with atomic.atomic_path(Path(plots_dir)) as tmp:
        tmp.mkdir()
        for name, curve in curves.items():
            rows = "".join(f"{step},{loss:.6f}\n" for step, loss in curve)
            (tmp / f"{name}.csv").write_text("step,loss\n" + rows, encoding="utf-8")
