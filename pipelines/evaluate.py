"""Stage `evaluate`: test-split perplexity and bits per byte of the pretrained GPT against an interpolated
Kneser-Ney n-gram baseline on the same tokens, plus generated samples.

Outs: <paths.metrics>/evaluate.json (DVC metrics), evaluate.md (the table), samples.txt.
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "evaluate", "logger")
COLUMNS = ["test_ppl", "test_bpb", "test_nll_per_token", "parameters", "order"]


def main(cfg):
    from lmpipe.evaluation.report import markdown_table, model_row, ngram_baseline
    from lmpipe.model import load_model
    from lmpipe.text_samples import format_samples, generate_samples
    from lmpipe.tokenizer import EOT, load_tokenizer

    ecfg = config.build(cfg.evaluate)
    tokens = Path(cfg.paths.tokens)
    metrics_dir = Path(cfg.paths.metrics)
    with tracking.stage_run("evaluate", cfg, SECTIONS):
        model, _ = load_model(Path(cfg.paths.models) / "pretrain" / "model.pt")
        ngram = ngram_baseline(tokens, list(ecfg.ngram_orders))
        rows = {
            "pretrained": model_row(model, tokens, ecfg.batch_size, ecfg.stride),
            f"kneser-ney {ngram['order']}-gram": ngram,
        }
        results = {
            "test": rows,
            "ppl_ratio_pretrained_vs_ngram": rows["pretrained"]["test_ppl"] / ngram["test_ppl"],
        }

        tokenizer = load_tokenizer(tokens / "tokenizer.json")
        prompts = [ecfg.sample_prompts[i % len(ecfg.sample_prompts)] for i in range(ecfg.num_samples)]
        samples = generate_samples(
            model, tokenizer, prompts, ecfg.sample_tokens, seed=cfg.seed, eot_id=tokenizer.token_to_id(EOT)
        )
        table = markdown_table(rows, COLUMNS)
        atomic.write_json(metrics_dir / "evaluate.json", results)
        atomic.write_text(metrics_dir / "evaluate.md", "# Test-split language modelling\n\n" + table)
        atomic.write_text(metrics_dir / "samples.txt", format_samples(samples))

        tracking.log_metrics(results)
        import mlflow

        mlflow.log_text(table, "evaluate.md")
        mlflow.log_text(format_samples(samples), "samples.txt")
        print(table)


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", SECTIONS, main))
