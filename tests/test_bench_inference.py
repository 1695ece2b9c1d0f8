"""Tests for bench/inference.py: a tiny run on random weights, a run reusing an existing export, and errors."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from lmpipe.atomic import write_json
from lmpipe.chat import tokenizer_config
from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig, export_onnx
from lmpipe.model import GPT, GPTConfig, save_checkpoint
from lmpipe.tokenizer import TOKENIZER_CONFIG_FILE, TokenizerConfig, save_tokenizer, train_tokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "inference.py"
TINY = ["--new-tokens", "4", "--repeats", "2", "--prefill-tokens", "8", "--prefill-runs", "3"]
TINY += ["--ppl-windows", "2", "--threads", "1"]


def load_script():
    spec = importlib.util.spec_from_file_location("bench_inference", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def tiny_model_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    tok = train_tokenizer(
        ["In the beginning God created the heaven and the earth."], TokenizerConfig(vocab_size=300)
    )
    save_tokenizer(tok, path / "tokenizer.json")
    write_json(path / TOKENIZER_CONFIG_FILE, tokenizer_config())
    torch.manual_seed(0)
    cfg = GPTConfig(
        vocab_size=300, block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0, pos_encoding="rotary"
    )
    save_checkpoint(path / "model.pt", GPT(cfg), {})
    return path


def test_random_run_writes_consistent_results(tmp_path):
    bench = load_script()
    out = tmp_path / "results" / "inference.json"
    # No token shards there: prompts and perplexity windows fall back to seeded random ids.
    overrides = [
        "model=gpt-tiny",
        "model.n_layer=1",
        "tokenizer.vocab_size=300",
        f"paths.tokens={tmp_path / 'none'}",
    ]
    result = bench.main(
        ["--random", "--out", str(out), *TINY, "--batch-sizes", "1", "2", "--overrides", *overrides]
    )

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert (
        result["model"]["random"]
        and result["model"]["fresh_fp32_export"]
        and result["model"]["fresh_int8_export"]
    )
    assert result["model"]["config"]["vocab_size"] == 300 and result["model"]["config"]["n_layer"] == 1
    assert result["model"]["fp32_parity_max_abs_diff"] < 1e-3
    assert result["settings"]["prompt_tokens_from"] == "random" and result["perplexity"]["tokens"] == "random"
    assert set(result["decode"]) == {"1", "2"}
    for batch, modes in result["decode"].items():
        assert set(modes) == set(bench.MODES)
        for stats in modes.values():
            assert len(stats["runs"]) == 2 and all(r > 0 for r in stats["runs"])
            assert (
                min(stats["runs"])
                <= stats["tokens_per_sec"]
                <= stats["best_tokens_per_sec"]
                == max(stats["runs"])
            )
        rate = {mode: modes[mode]["tokens_per_sec"] for mode in bench.MODES}
        ratios = result["ratios"][batch]
        assert ratios["ort_fp32_vs_torch_cache"] == pytest.approx(rate["ort_fp32"] / rate["torch_cache"])
        assert ratios["ort_fp32_vs_torch_nocache"] == pytest.approx(rate["ort_fp32"] / rate["torch_nocache"])
        assert ratios["int8_vs_fp32_speed"] == pytest.approx(rate["ort_int8"] / rate["ort_fp32"])
        # The same greedy loop over the same weights: cache or not, PyTorch or ONNX Runtime, the same tokens.
        assert result["greedy_agreement"][batch]["torch_cache_vs_nocache"] == 1.0
        assert result["greedy_agreement"][batch]["ort_fp32_vs_torch_cache"] == 1.0

    for mode in ("torch_cache", "ort_fp32", "ort_int8"):
        pre = result["prefill"][mode]
        assert 0 < pre["p50_ms"] <= pre["p95_ms"] and pre["tokens"] == 8 and pre["runs"] == 3
    for mode in ("ort_fp32", "ort_int8"):
        prof = result["profile"][mode]
        assert prof["steps"] == 3 and prof["run_us"] > 0  # 4 new tokens: the prefill and 3 decode steps
        assert prof["kernel_us"] == pytest.approx(sum(e["us_per_step"] for e in prof["ops"].values()))
        assert sum(e["share"] for e in prof["ops"].values()) == pytest.approx(1.0)
        assert prof["nodes"] == sum(e["nodes"] for e in prof["ops"].values())
    assert "MultiHeadAttention" in result["profile"]["ort_fp32"]["ops"]
    assert "DynamicQuantizeMatMul" in result["profile"]["ort_int8"]["ops"]
    ppl = result["perplexity"]
    assert ppl["scored_tokens"] == 2 * 128
    # Random weights predict nearly uniformly: perplexity close to the vocabulary size, fp32 alike in both runtimes.
    assert 200 < ppl["torch_fp32"] < 400 and ppl["ort_fp32"] == pytest.approx(ppl["torch_fp32"], rel=1e-4)
    assert ppl["int8_change_pct"] == pytest.approx((ppl["ort_int8"] / ppl["ort_fp32"] - 1) * 100)
    sizes = result["sizes"]
    assert sizes["int8_vs_fp32"] == pytest.approx(sizes["onnx_int8_bytes"] / sizes["onnx_fp32_bytes"])
    assert sizes["int8_vs_fp32"] < 0.5

    targets = result["targets"]
    assert result["targets_batch"] == 1 and set(targets) == set(bench.TARGETS)
    assert targets["ort_fp32_vs_torch_cache"]["value"] == result["ratios"]["1"]["ort_fp32_vs_torch_cache"]
    assert targets["int8_vs_fp32_size"]["value"] == sizes["int8_vs_fp32"]
    for name, t in targets.items():
        bound, kind = bench.TARGETS[name]
        value = abs(t["value"]) if kind == "max_abs" else t["value"]
        assert t["holds"] == (value >= bound if kind == "min" else value <= bound)


def test_existing_export_is_reused_and_the_int8_one_made_fresh(tmp_path):
    bench = load_script()
    model_dir = tiny_model_dir(tmp_path / "model")
    export_onnx(model_dir, tmp_path / "onnx", ExportConfig(parity_decode_steps=2), 0, "tiny")
    out = tmp_path / "inference.json"
    args = ["--model-dir", str(model_dir), "--onnx-dir", str(tmp_path / "onnx"), "--out", str(out), *TINY]
    result = bench.main([*args, "--batch-sizes", "1", "--overrides", f"paths.tokens={tmp_path / 'none'}"])
    model = result["model"]
    assert model["onnx_fp32"] == str(tmp_path / "onnx") and not model["fresh_fp32_export"]
    assert model["fresh_int8_export"] and model["int8_quantization"] == "dynamic-int8"
    assert not model["random"] and model["config"]["block_size"] == 32


def test_errors_are_one_line_and_write_nothing(tmp_path):
    bench = load_script()
    out = tmp_path / "inference.json"
    with pytest.raises(LmpipeError, match="missing .*model.pt: run `make train` first"):
        bench.main(["--model-dir", str(tmp_path / "nothing"), "--out", str(out)])
    model_dir = tiny_model_dir(tmp_path / "model")
    with pytest.raises(LmpipeError, match="missing .*model.onnx: expected an ONNX export directory"):
        bench.main(["--model-dir", str(model_dir), "--onnx-dir", str(tmp_path / "none"), "--out", str(out)])
    assert not out.exists()
