"""Stage `evaluate`: every model variant side by side (PyTorch and ONNX, fp32 and int8, teacher and students).

1. Language modelling: test-split perplexity and bits per byte of each variant against an interpolated
   Kneser-Ney n-gram baseline on exactly the same tokens.
2. Tasks (held-out instruction examples): classification metrics for the label tasks from the model's
   probabilities over each label set, exact match of generated answers, word-overlap F1 on free text, and
   multiple-choice accuracy by log-likelihood, beside a TF-IDF + logistic regression baseline.
3. Cost: parameters, file size, decode tokens/s at batch 1 and 8, prefill latency p50/p95.

Outs: <paths.metrics>/evaluate.json (DVC metrics), evaluate.md (the tables), samples.txt, and
<paths.plots>/confusion/<task>.csv (confusion matrices of the fine-tuned model, a DVC plot).
"""

from pathlib import Path

from lmpipe import atomic, config, tracking
from lmpipe.stage import run_stage

SECTIONS = ("seed", "paths", "evaluate", "logger")
LM_COLUMNS = ["test_ppl", "test_bpb", "test_nll_per_token", "parameters", "order"]
TASK_COLUMNS = [
    ("testament.accuracy", "testament acc"),
    ("testament.roc_auc", "testament ROC AUC"),
    ("testament.f1_macro", "testament F1 macro"),
    ("testament.exact_match", "testament EM"),
    ("book.accuracy", "book acc"),
    ("book.f1_micro", "book F1 micro"),
    ("book.f1_macro", "book F1 macro"),
    ("book.f1_weighted", "book F1 weighted"),
    ("book.roc_auc", "book ROC AUC (OvR)"),
    ("book.cohen_kappa", "book kappa"),
    ("book.exact_match", "book EM"),
    ("continue.exact_match", "continue EM"),
    ("continue.token_f1", "continue F1"),
    ("mc.accuracy", "MC acc"),
]
OVERVIEW_COLUMNS = [
    ("parameters", "parameters"),
    ("file_mb", "file MB"),
    ("test_ppl", "test ppl"),
    ("book_f1_macro", "book F1 macro"),
    ("testament_roc_auc", "testament AUC"),
    ("mc_accuracy", "MC acc"),
    ("decode_tok_s_b1", "decode tok/s b1"),
    ("decode_tok_s_b8", "decode tok/s b8"),
    ("prefill_ms_p50", "prefill ms p50"),
    ("prefill_ms_p95", "prefill ms p95"),
]


def main(cfg):
    import mlflow

    from lmpipe.data.instructions import read_examples, read_label_sets, read_mc_jsonl
    from lmpipe.evaluation.benchmark import evaluate_tfidf, evaluate_variant, fitting
    from lmpipe.evaluation.report import markdown_table, model_row, ngram_baseline
    from lmpipe.evaluation.speed import measure, torch_threads
    from lmpipe.evaluation.tasks import variant_table
    from lmpipe.evaluation.variants import load_variant
    from lmpipe.text_samples import format_samples, generate_samples
    from lmpipe.tokenizer import EOT

    ecfg = config.build(cfg.evaluate)
    tokens, data = Path(cfg.paths.tokens), Path(cfg.paths.instructions)
    with tracking.stage_run("evaluate", cfg, SECTIONS):
        variants = {v.name: v for v in (load_variant(d, ecfg.threads) for d in ecfg.variants)}
        ngram = ngram_baseline(tokens, list(ecfg.ngram_orders))
        lm_rows = {
            name: model_row(v.lm, tokens, ecfg.batch_size, ecfg.stride) for name, v in variants.items()
        }

        task_rows, confusion, skipped = {}, {}, {}
        if ecfg.tasks:
            label_sets = read_label_sets(data)
            smallest = min(variants.values(), key=lambda v: v.scorer.block_size).scorer
            test, mc_items, skipped = fitting(
                read_examples(data, "test"),
                read_mc_jsonl(data / "mc_test.jsonl"),
                smallest,
                label_sets,
                ecfg.max_new_tokens,
            )
            for name, v in variants.items():
                print(f"evaluate: tasks on {name}", flush=True)
                task_rows[name], confusion[name] = evaluate_variant(
                    test, label_sets, mc_items, v.scorer, v.heads, ecfg.max_new_tokens
                )
            if ecfg.tfidf:
                task_rows["tf-idf + logistic regression"], _ = evaluate_tfidf(
                    read_examples(data, "train"), test, label_sets, cfg.seed
                )

        overview = {}
        for name, v in variants.items():
            tasks = task_rows.get(name, {})
            overview[name] = {
                "parameters": lm_rows[name]["parameters"],
                "file_mb": v.file_bytes / 2**20,
                "test_ppl": lm_rows[name]["test_ppl"],
                "book_f1_macro": tasks.get("book", {}).get("f1_macro"),
                "testament_roc_auc": tasks.get("testament", {}).get("roc_auc"),
                "mc_accuracy": tasks.get("mc", {}).get("accuracy"),
            }
            if ecfg.speed:
                with torch_threads(ecfg.threads):  # the same thread budget for PyTorch and ONNX Runtime
                    overview[name].update(measure(v.step, v.vocab_size, v.scorer.block_size, seed=cfg.seed))
        lm_rows[f"kneser-ney {ngram['order']}-gram"] = ngram

        first = next(v for v in variants.values() if v.kind == "torch")
        tokenizer = first.scorer.tokenizer
        prompts = [ecfg.sample_prompts[i % len(ecfg.sample_prompts)] for i in range(ecfg.num_samples)]
        samples = generate_samples(
            first.lm, tokenizer, prompts, ecfg.sample_tokens, seed=cfg.seed, eot_id=tokenizer.token_to_id(EOT)
        )

        results = {
            "lm": lm_rows,
            "tasks": task_rows,
            "variants": overview,
            "skipped_too_long": skipped,
            "ppl_ratio_vs_ngram": {k: v["test_ppl"] / ngram["test_ppl"] for k, v in lm_rows.items()},
        }
        report = "# Model variants\n\n" + variant_table(overview, OVERVIEW_COLUMNS)
        report += "\n# Test-split language modelling\n\n" + markdown_table(lm_rows, LM_COLUMNS)
        if task_rows:
            report += (
                "\n# Held-out instruction tasks\n\n"
                + variant_table(task_rows, TASK_COLUMNS)
                + _task_notes(task_rows, skipped)
            )
        metrics_dir = Path(cfg.paths.metrics)
        atomic.write_json(metrics_dir / "evaluate.json", results)
        atomic.write_text(metrics_dir / "evaluate.md", report)
        atomic.write_text(metrics_dir / "samples.txt", format_samples(samples))
        finetuned = next((n for n in variants if n.startswith("sft-")), next(reversed(variants)))
        with atomic.atomic_path(Path(cfg.paths.plots) / "confusion") as tmp:
            tmp.mkdir()
            for task, rows in confusion.get(finetuned, {}).items():
                lines = "".join(f"{r['actual']},{r['predicted']}\n" for r in rows)
                (tmp / f"{task}.csv").write_text("actual,predicted\n" + lines, encoding="utf-8")
            mlflow.log_artifacts(str(tmp), "confusion")

        tracking.log_metrics(results)
        mlflow.log_text(report, "evaluate.md")
        mlflow.log_text(format_samples(samples), "samples.txt")
        print(report)


def _task_notes(task_rows: dict, skipped: dict) -> str:
    first = next(iter(task_rows.values()))
    notes = "\nMacro averages and one-vs-rest ROC AUC are over the labels present in the test examples"
    notes += (
        f" ({first['book']['labels_evaluated']} of {first['book']['labels_total']} books)."
        if "book" in first
        else "."
    )
    mc = next((r["mc"] for r in task_rows.values() if "mc" in r), None)
    if mc:
        notes += (
            f" Multiple choice ({mc['n']} questions): chance {mc['chance']:.3f}, always the most frequent "
            f"answer letter {mc['majority_baseline']:.3f}."
        )
    if skipped:
        notes += f" Left out as longer than the smallest context: {skipped}."
    return notes + "\n"


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", SECTIONS, main))
