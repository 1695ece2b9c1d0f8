"""Tests for bench/train_throughput.py: one tiny end-to-end run, and the precision check."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lmpipe.errors import LmpipeError
from lmpipe.model import GPT, GPTConfig

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "train_throughput.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_train_throughput", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


def test_tiny_run_writes_consistent_results(tmp_path):
    bench = load_script()
    out = tmp_path / "results" / "train_throughput.json"
    overrides = [
        "model=gpt-tiny",
        "model.block_size=64",
        "pretrain.batch_size=2",
        f"paths.tokens={tmp_path / 'no-tokens'}",  # no meta.json there: the tokenizer config's size applies
        "tokenizer.vocab_size=256",
    ]
    # 512 rather than a tinier matmul: small ones are dominated by thread wake-up, understating the peak.
    args = ["--out", str(out), "--steps", "2", "--warmup-steps", "1", "--matmul-sizes", "512"]
    result = bench.main([*args, "--matmul-repeats", "2", "--overrides", *overrides])

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {
        "machine",
        "matmul_peak_gflops",
        "model",
        "raw_loop",
        "lightning",
        "lightning_vs_raw",
        "config",
    } <= set(result)
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch_threads"] >= 1
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in result["matmul_peak_gflops"].values())

    expected = GPT(GPTConfig(vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=64, dropout=0.0))
    assert result["model"]["flops_per_token"] == expected.flops_per_token()
    assert result["model"]["parameters"] == expected.num_parameters()
    assert result["model"]["vocab_size_source"] == "tokenizer.vocab_size"
    assert result["precision"] == "bf16-mixed" and result["mfu_peak_dtype"] == "bf16"

    for name in ("raw_loop", "lightning"):
        run = result[name]
        assert run["steps"] == 2 and run["tokens"] == 2 * 2 * 64
        assert run["seconds"] > 0 and run["tokens_per_sec"] == pytest.approx(run["tokens"] / run["seconds"])
        assert run["achieved_gflops"] == pytest.approx(
            run["tokens_per_sec"] * result["model"]["flops_per_token"] / 1e9
        )
        assert run["mfu"] == run["mfu_vs_bf16"]
        for dtype in ("fp32", "bf16"):
            assert 0 < run[f"mfu_vs_{dtype}"] <= 1.5
    ratio = result["lightning"]["tokens_per_sec"] / result["raw_loop"]["tokens_per_sec"]
    assert result["lightning_vs_raw"] == pytest.approx(ratio) and ratio > 0


def test_unsupported_precision_is_one_line_error(tmp_path):
    bench = load_script()
    out = tmp_path / "t.json"
    with pytest.raises(LmpipeError, match="trainer.precision='16-mixed': expected one of 32-true"):
        bench.main(["--out", str(out), "--overrides", "trainer.precision=16-mixed"])
    assert not out.exists()
