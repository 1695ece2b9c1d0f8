"""Tests for bench/fixed_cache_probe.py: the rewritten graph generates what the export generates."""

import importlib.util
import json
import sys
from pathlib import Path

import onnx
from tiny_models import export_tiny_model

from lmpipe.export import ExportConfig

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "fixed_cache_probe.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_fixed_cache_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_fixed_cache_graph_generates_the_same_tokens_and_writes_json(tmp_path):
    probe = load_script()
    export_tiny_model(tmp_path, tmp_path / "onnx", ExportConfig(), pos_encoding="rotary")
    out = tmp_path / "probe.json"
    args = ["--onnx-dir", str(tmp_path / "onnx"), "--threads", "1", "--prompt-tokens", "5"]
    results = probe.main([*args, "--new-tokens", "20", "--repeats", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == {"results": json.loads(json.dumps(results))}
    (r,) = results
    assert r["same_tokens"] and r["threads"] == 1 and r["quantization"] == "none"
    assert len(r["runs"]["fixed_cache"]) == len(r["runs"]["concat_cache"]) == 2
    assert r["fixed_vs_concat"] == r["tokens_per_sec"]["fixed_cache"] / r["tokens_per_sec"]["concat_cache"]
    config = json.loads((tmp_path / "onnx" / "config.json").read_text())
    ops = [n.op_type for n in probe.fixed_cache_graph(tmp_path / "onnx" / "model.onnx", config).graph.node]
    assert "MultiHeadAttention" not in ops and ops.count("GroupQueryAttention") == config["n_layer"]
    assert "MultiHeadAttention" in {n.op_type for n in onnx.load(tmp_path / "onnx" / "model.onnx").graph.node}
