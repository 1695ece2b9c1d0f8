"""Tests for bench/serve.py: its request mix, a tiny run of two real servers on random weights, and errors."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from tiny_models import make_model_dir, tiny_tokenizer

from lmpipe.chat import render
from lmpipe.errors import LmpipeError
from lmpipe.export import ExportConfig, export_onnx

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "serve.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is being built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def onnx_dir(tmp_path_factory) -> Path:
    """A tiny random GPT (block_size 64) exported to ONNX."""
    root = tmp_path_factory.mktemp("bench-serve")
    make_model_dir(root / "model", tiny_tokenizer(), pos_encoding="rotary")
    export_onnx(root / "model", root / "onnx", ExportConfig(parity_decode_steps=2), 0, "tiny")
    return root / "onnx"


def test_the_request_mix_is_seeded_mixed_and_fits_the_context(onnx_dir):
    bench = load_script()
    from lmpipe.inference.engine import OrtEngine

    engine = OrtEngine(onnx_dir, threads=1)
    specs = bench.workload(onnx_dir, 48, seed=3)
    assert specs == bench.workload(onnx_dir, 48, seed=3) and specs != bench.workload(onnx_dir, 48, seed=4)
    bodies = [json.loads(s.body) for s in specs]
    assert {s.path for s in specs} == {"/v1/completions", "/v1/chat/completions"}
    assert sum(s.stream for s in specs) == 24 and all(
        b["stream"] == s.stream for b, s in zip(bodies, specs, strict=True)
    )
    assert {b["temperature"] for b in bodies} == {0.0, 0.7} and any("top_p" in b for b in bodies)
    lengths = set()
    for spec, body in zip(specs, bodies, strict=True):
        text = render(body["messages"], True, engine.template) if "messages" in body else body["prompt"]
        n = len(engine.encode_prompt(text, chat=False))  # as the server counts the prompt
        assert spec.max_tokens == body["max_tokens"] >= 1 and n + spec.max_tokens <= engine.block_size
        lengths.add(n)
    assert len(lengths) >= 3  # short and long prompts


def test_a_tiny_run_against_two_servers_writes_consistent_results(tmp_path):
    bench = load_script()
    out = tmp_path / "results" / "serve.json"
    overrides = ["model=gpt-tiny", "model.n_layer=1", "tokenizer.vocab_size=300"]
    overrides += [f"paths.tokens={tmp_path / 'none'}"]
    sizes = ["--requests", "6", "--repeats", "2", "--rss-warmup", "4", "--rss-requests", "4"]
    sizes += ["--rss-every", "2"]
    result = bench.main(
        ["--random", "--clients", "1", "3", *sizes, "--out", str(out), "--overrides", *overrides]
    )

    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["model"]["random"] and result["model"]["config"]["n_layer"] == 1
    assert set(result["load"]) == {"1", "3"} and result["targets_clients"] == 3
    for level in result["load"].values():
        for mode in bench.MODES:
            x = level[mode]
            assert x["requests"] == 12 and x["errors"] == 0 and x["completion_tokens"] > 0
            assert x["tokens_per_sec"] == pytest.approx(x["completion_tokens"] / x["wall_s"])
            assert x["requests_per_sec"] == pytest.approx(12 / x["wall_s"])
            assert 0 < x["latency_p50_ms"] <= x["latency_p99_ms"]
            assert 0 < x["ttft_p50_ms"] <= x["ttft_p99_ms"] and x["streams"] == 6
            assert 0 < x["client_cpu_share"] < 1 and x["server_rss_mb"] > 0
            assert len(x["runs_tokens_per_sec"]) == 2
            assert x["server_cpu_ms_per_token"] == pytest.approx(
                x["server_cpu_s"] * 1000 / x["completion_tokens"]
            )
        ratio = level["on_vs_off"]
        assert ratio["tokens_per_sec"] == pytest.approx(
            level["on"]["tokens_per_sec"] / level["off"]["tokens_per_sec"]
        )
        assert ratio["latency_p99"] == pytest.approx(
            level["on"]["latency_p99_ms"] / level["off"]["latency_p99_ms"]
        )

    rss = result["rss"]
    assert rss["warmup_requests"] == 4 and rss["measured_requests"] == 4 and len(rss["samples_mb"]) == 2
    assert rss["errors"] == 0 and rss["growth_pct"] == pytest.approx(
        (max(rss["samples_mb"]) - rss["rss_after_warmup_mb"]) / rss["rss_after_warmup_mb"] * 100
    )
    targets = result["targets"]
    assert set(targets) == set(bench.TARGETS)
    assert targets["tokens_per_sec_on_vs_off"]["value"] == result["load"]["3"]["on_vs_off"]["tokens_per_sec"]
    for name, t in targets.items():
        bound, kind = bench.TARGETS[name]
        assert t["holds"] == (t["value"] >= bound if kind == "min" else t["value"] <= bound)


def test_errors_are_one_line_and_write_nothing(tmp_path):
    bench = load_script()
    out = tmp_path / "serve.json"
    with pytest.raises(LmpipeError, match="missing .*model.onnx: run `make train` first, pass --model"):
        bench.main(["--model", str(tmp_path / "nothing"), "--out", str(out)])
    assert not out.exists()
