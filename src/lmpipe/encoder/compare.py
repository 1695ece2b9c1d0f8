"""`make compare-encoder`'s table: the fine-tuning methods side by side from their metrics files.

python -m lmpipe.encoder.compare DIR: reads DIR/<run>/encoder_finetune.json for each run subfolder (a method,
or a method and a step budget: `full-2000steps`) and writes DIR/compare.md (and prints it), one row per
initialisation and run, in step order within a method (a learning curve).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lmpipe.evaluation.tasks import variant_table

COLUMNS = [
    ("trainable_parameters", "trained weights"),
    ("trainable_fraction", "trained share"),
    ("steps", "steps"),
    ("train_seconds", "train s"),
    ("tasks.testament.accuracy", "testament acc"),
    ("tasks.testament.roc_auc", "testament AUC"),
    ("tasks.book.accuracy", "book acc"),
    ("tasks.book.f1_macro", "book F1 macro"),
    ("tasks.book.roc_auc", "book AUC"),
    ("tasks.book.cohen_kappa", "book kappa"),
]


def compare(directory: Path) -> str:
    rows = {}
    runs = [(path, json.loads(path.read_text(encoding="utf-8"))) for path in directory.glob("*/encoder_finetune.json")]
    for path, by_init in sorted(runs, key=lambda run: _order(run[0].parent.name, run[1])):
        for init, metrics in by_init.items():
            rows[f"{init}-{path.parent.name}"] = metrics
    table = "# Encoder fine-tuning methods\n\n" + variant_table(rows, COLUMNS)
    (directory / "compare.md").write_text(table, encoding="utf-8")
    return table


def _order(run: str, by_init: dict) -> tuple[str, int]:
    """Runs of one method together, fewest steps first."""
    first = next(iter(by_init.values()), {})
    return first.get("method", run), first.get("steps", 0)


if __name__ == "__main__":
    print(compare(Path(sys.argv[1])))
