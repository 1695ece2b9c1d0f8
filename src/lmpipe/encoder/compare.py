"""`make compare-encoder`'s table: the fine-tuning methods side by side from their metrics files.

python -m lmpipe.encoder.compare DIR: reads DIR/<method>/encoder_finetune.json for each method subfolder and
writes DIR/compare.md (and prints it).
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
    for path in sorted(directory.glob("*/encoder_finetune.json")):
        for init, metrics in json.loads(path.read_text(encoding="utf-8")).items():
            rows[f"{init}-{metrics['method']}"] = metrics
    table = "# Encoder fine-tuning methods\n\n" + variant_table(rows, COLUMNS)
    (directory / "compare.md").write_text(table, encoding="utf-8")
    return table


if __name__ == "__main__":
    print(compare(Path(sys.argv[1])))
