"""Stage `evaluate`: every model variant side by side.

1. Language modelling: test-split perplexity and bits per byte of each variant against an interpolated
   Kneser-Ney n-gram baseline on exactly the same tokens.
2. Tasks (on the held-out instruction examples): classification metrics for the label tasks from the model's
   probabilities over each label set, exact match of generated answers, word-overlap F1 on free text, and
   multiple-choice accuracy by log-likelihood, beside a TF-IDF + logistic regression baseline.

Outs: <paths.metrics>/evaluate.json (DVC metrics), evaluate.md (the tables), samples.txt, and
<paths.plots>/confusion/<task>.csv (confusion matrices of the last variant, a DVC plot).
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


def variant_name(extra: dict) -> str:
    """Table row of a model: pretrained, sft-<method>, ... (from what its stage saved beside the weights)."""
    if extra.get("stage") == "sft":
        return f"sft-{extra['method']}"
    if extra.get("stage") == "distill":
        return extra["variant"]
    return {"pretrain": "pretrained"}.get(extra.get("stage"), extra.get("stage", "model"))


def main(cfg):
    import mlflow

    from lmpipe.chat import load_chat_template
    from lmpipe.data.instructions import read_examples, read_label_sets, read_mc_jsonl
    from lmpipe.evaluation.benchmark import evaluate_tfidf, evaluate_variant, fitting
    from lmpipe.evaluation.report import markdown_table, model_row, ngram_baseline
    from lmpipe.evaluation.scoring import TorchScorer
    from lmpipe.evaluation.tasks import variant_table
    from lmpipe.model import load_model
    from lmpipe.text_samples import format_samples, generate_samples
    from lmpipe.tokenizer import EOT, TOKENIZER_FILE, load_tokenizer
    from lmpipe.training.heads import HEADS_FILE, load_head_classifier

    ecfg = config.build(cfg.evaluate)
    tokens = Path(cfg.paths.tokens)
    data = Path(cfg.paths.instructions)
    with tracking.stage_run("evaluate", cfg, SECTIONS):
        ngram = ngram_baseline(tokens, list(ecfg.ngram_orders))
        lm_rows, task_rows, confusion, variants = {}, {}, {}, {}
        for directory in map(Path, ecfg.variants):
            model, extra = load_model(directory / "model.pt")
            tokenizer = load_tokenizer(directory / TOKENIZER_FILE)
            variants[variant_name(extra)] = (
                model,
                directory,
                TorchScorer(model, tokenizer, load_chat_template(directory)),
            )
        for name, (model, _, _) in variants.items():
            lm_rows[name] = model_row(model, tokens, ecfg.batch_size, ecfg.stride)
        skipped = {}
        if ecfg.tasks:
            label_sets = read_label_sets(data)
            smallest = min((v[2] for v in variants.values()), key=lambda scorer: scorer.block_size)
            test, mc_items, skipped = fitting(
                read_examples(data, "test"),
                read_mc_jsonl(data / "mc_test.jsonl"),
                smallest,
                label_sets,
                ecfg.max_new_tokens,
            )
            for name, (_, directory, scorer) in variants.items():
                heads = load_head_classifier(directory) if (directory / HEADS_FILE).exists() else None
                print(f"evaluate: tasks on {name}", flush=True)
                task_rows[name], confusion[name] = evaluate_variant(
                    test, label_sets, mc_items, scorer, heads, ecfg.max_new_tokens
                )
        lm_rows[f"kneser-ney {ngram['order']}-gram"] = ngram
        if ecfg.tasks and ecfg.tfidf:
            task_rows["tf-idf + logistic regression"], confusion["tfidf"] = evaluate_tfidf(
                read_examples(data, "train"), test, label_sets, cfg.seed
            )

        first_model, first_dir, _ = next(iter(variants.values()))
        tokenizer = load_tokenizer(first_dir / TOKENIZER_FILE)
        prompts = [ecfg.sample_prompts[i % len(ecfg.sample_prompts)] for i in range(ecfg.num_samples)]
        samples = generate_samples(
            first_model,
            tokenizer,
            prompts,
            ecfg.sample_tokens,
            seed=cfg.seed,
            eot_id=tokenizer.token_to_id(EOT),
        )

        results = {
            "lm": lm_rows,
            "tasks": task_rows,
            "skipped_too_long": skipped,
            "ppl_ratio_vs_ngram": {k: v["test_ppl"] / ngram["test_ppl"] for k, v in lm_rows.items()},
        }
        report = "# Test-split language modelling\n\n" + markdown_table(lm_rows, LM_COLUMNS)
        if task_rows:
            mc = next((r["mc"] for r in task_rows.values() if "mc" in r), None)
            report += (
                "\n# Held-out instruction tasks\n\n"
                + variant_table(task_rows, TASK_COLUMNS)
                + "\nMacro averages and one-vs-rest ROC AUC are over the labels present in the test examples"
                + (
                    f" ({next(iter(task_rows.values()))['book']['labels_evaluated']} of 66 books)."
                    if "book" in next(iter(task_rows.values()))
                    else "."
                )
                + (
                    f" Multiple choice: chance {mc['chance']:.3f}, always-the-most-frequent-letter "
                    f"{mc['majority_baseline']:.3f}.\n"
                    if mc
                    else "\n"
                )
            )
        metrics_dir = Path(cfg.paths.metrics)
        atomic.write_json(metrics_dir / "evaluate.json", results)
        atomic.write_text(metrics_dir / "evaluate.md", report)
        atomic.write_text(metrics_dir / "samples.txt", format_samples(samples))
        with atomic.atomic_path(Path(cfg.paths.plots) / "confusion") as tmp:
            tmp.mkdir()
            last = confusion.get(list(variants)[-1], {})
            for task, rows in last.items():
                lines = "".join(f"{r['actual']},{r['predicted']}\n" for r in rows)
                (tmp / f"{task}.csv").write_text("actual,predicted\n" + lines, encoding="utf-8")
            mlflow.log_artifacts(str(tmp), "confusion")

        tracking.log_metrics(results)
        mlflow.log_text(report, "evaluate.md")
        mlflow.log_text(format_samples(samples), "samples.txt")
        print(report)


if __name__ == "__main__":
    raise SystemExit(run_stage("evaluate", SECTIONS, main))
