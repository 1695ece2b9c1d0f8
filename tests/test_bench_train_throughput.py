"""Tests for bench/train_throughput.py: one tiny end-to-end run of both models, and the precision check."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from lmpipe.errors import LmpipeError

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "train_throughput.py"
SWITCHES = ["optimizer_kernel", "sparse_logging"]  # compile is left out: compiling takes tens of seconds


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
        "model.n_layer=1",
        "model.n_embd=32",
        "model.block_size=32",
        "pretrain.batch_size=2",
        f"paths.tokens={tmp_path / 'no-tokens'}",  # no meta.json there: random ids below tokenizer.vocab_size
        f"paths.prepared={tmp_path / 'no-corpus'}",  # no corpus there: the char model reads the Python docs
        "tokenizer.vocab_size=256",
    ]
    # 512 rather than a tinier matmul: small ones are dominated by thread wake-up, understating the peak.
    args = ["--out", str(out), "--steps", "2", "--warmup-steps", "1", "--matmul-sizes", "512"]
    args += ["--matmul-repeats", "2", "--switches", *SWITCHES, "--overrides", *overrides]
    result = bench.main(args)

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {"machine", "matmul_peak_gflops", "settings", "models"} <= set(result)
    assert result["machine"]["cpu_count"] >= 1 and result["machine"]["torch_threads"] >= 1
    assert set(result["matmul_peak_gflops"]) == {"fp32", "bf16"}
    assert all(v > 0 for v in result["matmul_peak_gflops"].values())
    assert result["settings"]["switches"] == {
        "optimizer_kernel": ["loop", "fused"],
        "sparse_logging": [False, True],
    }

    assert set(result["models"]) == {"default", "small"}
    assert result["models"]["default"]["model"]["vocab_size"] == 256
    assert result["models"]["small"]["model"]["tokens"] == "char tokenizer of the corpus"
    assert result["models"]["small"]["model"]["vocab_size"] < 256
    for name, model in result["models"].items():
        assert model["config"]["precision"] == "bf16-mixed" and model["mfu_peak_dtype"] == "bf16"
        assert model["config"]["model"]["n_layer"] == 1 and model["config"]["tokens_per_step"] == 2 * 32
        runs = model["runs"]
        assert set(runs) == {"baseline", "all_on", "only_optimizer_kernel", "only_sparse_logging", "raw_loop"}
        for run in runs.values():
            assert run["steps"] == 2 and run["tokens"] == 2 * 2 * 32
            assert run["seconds"] > 0 and run["first_step_seconds"] > 0
            assert run["tokens_per_sec"] == pytest.approx(run["tokens"] / run["seconds"])
            assert run["achieved_gflops"] == pytest.approx(
                run["tokens_per_sec"] * model["model"]["flops_per_token"] / 1e9
            )
            assert run["mfu"] == run["mfu_vs_bf16"] and 0 < run["mfu_vs_fp32"] <= 1.5, name
        rate = {variant: run["tokens_per_sec"] for variant, run in runs.items()}
        assert model["speedup_vs_baseline"] == pytest.approx(rate["all_on"] / rate["baseline"])
        assert model["lightning_vs_raw"] == pytest.approx(rate["all_on"] / rate["raw_loop"])
        assert model["lightning_vs_raw_median_step"] == pytest.approx(
            runs["raw_loop"]["median_step_seconds"] / runs["all_on"]["median_step_seconds"]
        )
        for run in runs.values():  # --repeats 1: each variant's one run is its fastest
            assert run["repeats_tokens_per_sec"] == [run["tokens_per_sec"]]
        assert model["speedup_by_switch"] == pytest.approx(
            {s: rate[f"only_{s}"] / rate["baseline"] for s in SWITCHES}
        )


def test_the_variants_turn_each_switch_on_alone():
    bench = load_script()
    every = bench.variants(["optimizer_kernel", "compile"])
    assert every == {
        "baseline": {"perf.optimizer_kernel": "loop", "perf.compile": False},
        "all_on": {"perf.optimizer_kernel": "fused", "perf.compile": True},
        "only_optimizer_kernel": {"perf.optimizer_kernel": "fused", "perf.compile": False},
        "only_compile": {"perf.optimizer_kernel": "loop", "perf.compile": True},
    }


def test_unsupported_precision_is_one_line_error(tmp_path):
    bench = load_script()
    out = tmp_path / "t.json"
    with pytest.raises(LmpipeError, match="trainer.precision='16-mixed': expected one of 32-true"):
        bench.main(["--out", str(out), "--overrides", "trainer.precision=16-mixed"])
    assert not out.exists()
