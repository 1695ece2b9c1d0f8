"""Tests for lmpipe.encoder.compare: the methods' metrics files become one table."""

import json

from lmpipe.encoder.compare import compare


def test_one_row_per_method_and_init(tmp_path):
    for method, f1 in (("full", 0.3), ("head", 0.1)):
        (tmp_path / method).mkdir()
        metrics = {"method": method, "steps": 5, "tasks": {"book": {"f1_macro": f1}}}
        (tmp_path / method / "encoder_finetune.json").write_text(json.dumps({"pretrained": metrics}))
    table = compare(tmp_path)
    assert "| pretrained-full |" in table and "| pretrained-head |" in table and "0.300" in table
    assert (tmp_path / "compare.md").read_text() == table


def test_step_budgets_of_one_method_read_as_a_learning_curve(tmp_path):
    for run, steps, auc in (
        ("full-2000steps", 2000, 0.97),
        ("full", 500, 0.95),
        ("full-1000steps", 1000, 0.96),
    ):
        (tmp_path / run).mkdir()
        metrics = {"method": "full", "steps": steps, "tasks": {"testament": {"roc_auc": auc}}}
        (tmp_path / run / "encoder_finetune.json").write_text(json.dumps({"pretrained": metrics}))
    table = compare(tmp_path)
    rows = [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| pretrained")]
    assert rows == ["pretrained-full", "pretrained-full-1000steps", "pretrained-full-2000steps"]
