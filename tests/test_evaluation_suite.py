import shutil

import pytest
from tiny_models import make_model_dir

from lmpipe.evaluation.report import EvaluateConfig, model_row, ngram_baseline
from lmpipe.evaluation.suite import evaluate_all, trained_encoders
from lmpipe.evaluation.variants import load_variant
from lmpipe.formats import TOKENIZER_FILE
from lmpipe.tokenizer import load_tokenizer


@pytest.fixture
def model_dir(tmp_path, tiny_tokens):
    make_model_dir(tmp_path / "m", load_tokenizer(tiny_tokens / TOKENIZER_FILE))
    return tmp_path / "m"


def test_language_modelling_only_gives_the_rows_the_report_and_the_samples(model_dir, tiny_tokens, tmp_path):
    cfg = EvaluateConfig(
        variants=[str(model_dir)],
        ngram_orders=[2],
        tasks=False,
        speed=False,
        num_samples=2,
        sample_tokens=4,
        sample_prompts=["the"],
        workers=1,
    )
    heard = []
    ev = evaluate_all(cfg, tiny_tokens, tmp_path / "no-instructions", seed=0, log=heard.append)
    ngram = ngram_baseline(tiny_tokens, [2], 10**9)
    expected = model_row(load_variant(model_dir).lm, tiny_tokens, cfg.batch_size)
    assert ev.results["lm"] == {"test": expected, "kneser-ney 2-gram": ngram}
    assert ev.results["ppl_ratio_vs_ngram"]["test"] == pytest.approx(expected["test_ppl"] / ngram["test_ppl"])
    assert ev.results["tasks"] == {} and ev.results["skipped_too_long"] == {} and heard == []
    assert ev.results["variants"]["test"]["test_ppl"] == expected["test_ppl"]
    assert "decode_tok_s_b1" not in ev.results["variants"]["test"]
    assert ev.results["variants"]["test"]["runtime"] == "torch"  # the report card tells runtimes apart
    assert ev.report.startswith("# Model variants") and "# Test-split language modelling" in ev.report
    assert "# Held-out instruction tasks" not in ev.report
    assert len(ev.samples) == 2 and ev.confusion == {}


def test_scoring_in_worker_processes_gives_what_scoring_in_process_gives(model_dir, tiny_tokens, tmp_path):
    shutil.copytree(model_dir, tmp_path / "copy")
    common = dict(
        variants=[str(model_dir), str(tmp_path / "copy")], ngram_orders=[2], tasks=False, speed=False
    )
    inline = evaluate_all(EvaluateConfig(**common, workers=1), tiny_tokens, tmp_path, seed=0).results["lm"]
    pooled = evaluate_all(EvaluateConfig(**common, workers=2), tiny_tokens, tmp_path, seed=0).results["lm"]
    assert pooled.keys() == inline.keys()
    # A worker's torch runs on fewer threads, so sums round differently: 1.03e-9 apart in perplexity on an
    # AVX2-only EPYC (1e-9 held on the AVX-512 machines); a scoring mistake would move it by far more than 1e-6.
    for name, row in inline.items():
        assert pooled[name] == {k: pytest.approx(v, rel=1e-6) for k, v in row.items()}


def test_speed_is_measured_when_asked(model_dir, tiny_tokens, tmp_path):
    cfg = EvaluateConfig(
        variants=[str(model_dir)], ngram_orders=[1], tasks=False, speed=True, num_samples=0, workers=1
    )
    row = evaluate_all(cfg, tiny_tokens, tmp_path, seed=0).results["variants"]["test"]
    assert row["decode_tok_s_b1"] > 0 and row["prefill_ms_p50"] > 0


def test_encoder_folders_a_stage_skipped_are_left_out_with_a_line(tmp_path):
    from lmpipe.encoder.outputs import write_skipped_dir

    (tmp_path / "trained").mkdir()
    write_skipped_dir(tmp_path / "scratch", "encoder_mlm", "encoder.also_scratch=false")
    heard = []
    kept = trained_encoders([str(tmp_path / "trained"), str(tmp_path / "scratch")], heard.append)
    assert kept == [str(tmp_path / "trained")]
    assert len(heard) == 1 and "scratch left out" in heard[0]
