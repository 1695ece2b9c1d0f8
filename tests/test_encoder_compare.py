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
