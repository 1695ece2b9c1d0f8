"""Every model variant side by side: the work of the `evaluate` stage, without its files or tracking.

1. Language modelling: test-split perplexity and bits per byte of each variant against an interpolated
   Kneser-Ney n-gram baseline on exactly the same tokens.
2. Tasks (held-out instruction examples): classification metrics for the label tasks from the model's
   probabilities over each label set, exact match of generated answers, word-overlap F1 on free text, and
   multiple-choice accuracy by log-likelihood, beside a TF-IDF + logistic regression baseline.
3. Cost: parameters, file size, decode tokens/s at batch 1 and 8, prefill latency p50/p95.
4. The alignment tax: the steps of `evaluate.post_training` (pretrained, SFT, DPO, RL) side by side, test
   perplexity after each with its ratio to SFT's, beside book and multiple-choice accuracy (from the rows above).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lmpipe.data.instructions import read_examples, read_label_sets, read_mc_jsonl
from lmpipe.evaluation.alignment import alignment_report, post_training
from lmpipe.evaluation.benchmark import evaluate_encoder, evaluate_tfidf, evaluate_variant, fitting
from lmpipe.evaluation.report import EvaluateConfig, markdown_table, model_row, ngram_baseline
from lmpipe.evaluation.speed import measure, torch_threads
from lmpipe.evaluation.tasks import variant_table
from lmpipe.evaluation.variants import load_variant, unique_names
from lmpipe.formats import EOT, MC_FILE, SKIPPED_FILE
from lmpipe.text_samples import generate_samples

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


ENCODER_COLUMNS = [
    ("parameters", "parameters"),
    ("parameters_non_embedding", "non-embedding"),
    ("steps", "steps"),
    ("tokens_seen_estimate", "tokens"),
    ("train_seconds", "train s"),
    ("classify_ms_per_example", "classify ms/example"),
    ("book_f1_macro", "book F1 macro"),
    ("testament_roc_auc", "testament AUC"),
]


@dataclass
class Evaluation:
    results: dict
    """Everything measured (the stage's evaluate.json): lm, tasks, variants (with each one's directory and
    runtime), skipped_too_long, ppl ratios, and post_training (the alignment tax,
    `lmpipe.evaluation.alignment`)."""
    report: str
    """The tables in markdown (evaluate.md)."""
    samples: list
    """Generated samples of the first PyTorch variant."""
    confusion: dict[str, list[dict]]
    """Task -> confusion rows (actual, predicted) of the fine-tuned variant (else the last one)."""


def evaluate_all(
    ecfg: EvaluateConfig,
    tokens_dir: Path,
    instructions_dir: Path,
    seed: int,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> Evaluation:
    """Score every variant of `ecfg.variants` on the test split of `tokens_dir` and the held-out examples of
    `instructions_dir`; `log` hears one line per variant with its time, since the whole takes minutes."""
    variants = unique_names([load_variant(d, ecfg.threads) for d in ecfg.variants])
    tasks, skipped, label_sets = None, {}, {}
    if ecfg.tasks:
        label_sets = read_label_sets(instructions_dir)
        smallest = min(variants.values(), key=lambda v: v.scorer.block_size).scorer
        test, mc_items, skipped = fitting(
            read_examples(instructions_dir, "test"),
            read_mc_jsonl(instructions_dir / MC_FILE),
            smallest,
            label_sets,
            ecfg.max_new_tokens,
        )
        tasks = (test, label_sets, mc_items, ecfg.max_new_tokens)

    # Scoring is most of the stage's time and each variant's is independent of the others: it runs in
    # `workers` processes, and nothing timed (speed, encoder latency) runs until they are done.
    workers, threads = _worker_layout(ecfg.workers, ecfg.threads)
    with _pool(workers, threads) as pool:
        ngram_job = _submit(
            pool, ngram_baseline, tokens_dir, list(ecfg.ngram_orders), ecfg.ngram_train_tokens
        )
        tfidf_job = None
        if tasks is not None and ecfg.tfidf:
            train = read_examples(instructions_dir, "train")
            tfidf_job = _submit(pool, evaluate_tfidf, train, tasks[0], label_sets, seed)
        common = (threads, tokens_dir, ecfg.batch_size, ecfg.stride, tasks)
        jobs = {name: _submit(pool, score_variant, str(v.directory), *common) for name, v in variants.items()}
        scored = {}
        for name, job in jobs.items():
            scored[name] = job.result()
            if tasks is not None:
                log(f"evaluate: tasks on {name} ({scored[name]['seconds']:.0f} s)")
        ngram = ngram_job.result()
        tfidf = tfidf_job.result()[0] if tfidf_job is not None else None

    lm_rows = {name: row["lm"] for name, row in scored.items()}
    task_rows, confusion, encoder_rows = {}, {}, {}
    if tasks is not None:
        task_rows = {name: row["tasks"] for name, row in scored.items()}
        confusion = {name: row["confusion"] for name, row in scored.items()}
        if tfidf is not None:
            task_rows["tf-idf + logistic regression"] = tfidf
        for directory in trained_encoders(ecfg.encoders, log):
            name, encoder_rows[name], task_rows[name] = _encoder_rows(directory, tasks[0], label_sets, log)

    overview = {}
    for name, v in variants.items():
        tasks = task_rows.get(name, {})
        overview[name] = {
            "directory": str(v.directory),
            "runtime": v.kind,  # torch or onnx: the report card draws the two apart against speed
            "parameters": lm_rows[name]["parameters"],
            "file_mb": v.file_bytes / 2**20,
            "test_ppl": lm_rows[name]["test_ppl"],
            "book_f1_macro": tasks.get("book", {}).get("f1_macro"),
            "testament_roc_auc": tasks.get("testament", {}).get("roc_auc"),
            "mc_accuracy": tasks.get("mc", {}).get("accuracy"),
        }
        if ecfg.speed:
            with torch_threads(ecfg.threads):  # the same thread budget for PyTorch and ONNX Runtime
                overview[name].update(measure(v.step, v.vocab_size, v.scorer.block_size, seed=seed))
    lm_rows[f"kneser-ney {ngram['order']}-gram"] = ngram

    first = next(v for v in variants.values() if v.kind == "torch")
    tokenizer = first.scorer.tokenizer
    prompts = [ecfg.sample_prompts[i % len(ecfg.sample_prompts)] for i in range(ecfg.num_samples)]
    samples = generate_samples(
        first.lm, tokenizer, prompts, ecfg.sample_tokens, seed=seed, eot_id=tokenizer.token_to_id(EOT)
    )

    results = {
        "lm": lm_rows,
        "tasks": task_rows,
        "variants": overview,
        "skipped_too_long": skipped,
        "encoders": encoder_rows,
        "ppl_ratio_vs_ngram": {k: v["test_ppl"] / ngram["test_ppl"] for k, v in lm_rows.items()},
    }
    results["post_training"], missing_steps = post_training(results, ecfg.post_training)
    report = "# Model variants\n\n" + variant_table(overview, OVERVIEW_COLUMNS)
    report += "\n# Test-split language modelling\n\n" + markdown_table(lm_rows, LM_COLUMNS)
    if task_rows:
        report += (
            "\n# Held-out instruction tasks\n\n"
            + variant_table(task_rows, TASK_COLUMNS)
            + _task_notes(task_rows, skipped)
        )
    if results["post_training"]:
        report += alignment_report(results["post_training"], missing_steps, ecfg.post_training)
    if encoder_rows:
        report += "\n# Encoder classifiers (label tasks)\n\n" + variant_table(encoder_rows, ENCODER_COLUMNS)
    finetuned = next((n for n in variants if n.startswith("sft-")), next(reversed(variants)))
    return Evaluation(results, report, samples, confusion.get(finetuned, {}))


def score_variant(
    directory: str, threads: int, tokens_dir: Path, batch_size: int, stride: int, tasks: tuple | None
) -> dict:
    """Test perplexity ("lm") and, given `tasks` = (examples, label sets, MC items, max new tokens), the task
    metrics and confusion rows of the variant in `directory`, with the seconds it took: one worker's job."""
    started = time.perf_counter()
    variant = load_variant(directory, threads)
    scored = {"lm": model_row(variant.lm, tokens_dir, batch_size, stride)}
    if tasks is not None:
        test, label_sets, mc_items, max_new_tokens = tasks
        scored["tasks"], scored["confusion"] = evaluate_variant(
            test, label_sets, mc_items, variant.scorer, variant.heads, max_new_tokens
        )
    scored["seconds"] = time.perf_counter() - started
    return scored


def _worker_layout(workers: int, threads: int) -> tuple[int, int]:
    """(processes, threads per process): `workers` 0 means one per core; with several processes, `threads` 0
    (each runtime's default, every core) becomes a share of the cores, so they do not oversubscribe them."""
    cores = os.cpu_count() or 1
    workers = workers or cores
    if workers > 1 and threads == 0:
        threads = max(1, cores // workers)
    return workers, threads


class _Done:
    """A job run on the spot, for working without a pool: it answers `.result()` as a future does."""

    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


def _submit(pool: ProcessPoolExecutor | None, fn: Callable, *args):
    return pool.submit(fn, *args) if pool is not None else _Done(fn(*args))


def _pool(workers: int, threads: int):
    """A pool of `workers` processes, or (for one) a context that gives None: jobs then run on the spot."""
    if workers <= 1:
        return contextlib.nullcontext()
    # spawn, not fork: a forked copy of a process whose torch thread pool has run can hang.
    return ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_set_torch_threads,
        initargs=(threads,),
    )


def _set_torch_threads(threads: int) -> None:
    import torch

    if threads > 0:
        torch.set_num_threads(threads)


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


def trained_encoders(directories: list[str], log: Callable[[str], None]) -> list[str]:
    """The encoder directories that hold a classifier: a stage that trained nothing (encoder.also_scratch=false)
    leaves only `formats.SKIPPED_FILE` in its declared output, which is left out with a line saying so."""
    kept = []
    for directory in directories:
        if (Path(directory) / SKIPPED_FILE).is_file():
            log(f"evaluate: {directory} left out: its stage trained no classifier there ({SKIPPED_FILE})")
        else:
            kept.append(directory)
    return kept


def _encoder_rows(
    directory: str, test, label_sets: dict, log: Callable[[str], None]
) -> tuple[str, dict, dict]:
    """(row name, cost row, task metrics) of one encoder classifier directory."""
    from lmpipe.encoder.classifier import load_encoder_classifier
    from lmpipe.formats import ENCODER_FILE

    classifier, extra = load_encoder_classifier(directory, with_extra=True)
    trained = extra.get("metrics", {})
    name = f"encoder-{trained.get('init', 'unknown')}-{trained.get('method', 'unknown')}"
    started = time.perf_counter()
    tasks, _ = evaluate_encoder(classifier, test, label_sets)
    seconds = time.perf_counter() - started
    log(f"evaluate: tasks on {name} ({seconds:.0f} s)")
    n = sum(task["n"] for task in tasks.values())
    heads = sum(p.numel() for p in classifier.heads.parameters())
    row = {
        "parameters": classifier.encoder.num_parameters() + heads,
        "parameters_non_embedding": classifier.encoder.num_parameters(non_embedding=True) + heads,
        "file_mb": (Path(directory) / ENCODER_FILE).stat().st_size / 2**20,
        **{key: trained.get(key) for key in ("steps", "tokens_seen_estimate", "train_seconds")},
        "classify_ms_per_example": 1000 * seconds / max(1, n),
        "book_f1_macro": tasks.get("book", {}).get("f1_macro"),
        "testament_roc_auc": tasks.get("testament", {}).get("roc_auc"),
    }
    return name, row, tasks
