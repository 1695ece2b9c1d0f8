"""The task benchmark: every held-out instruction task and the multiple-choice set, for one model variant.

A variant answers through a `Scorer` (any causal LM: PyTorch now, ONNX Runtime later) and, for transfer
learning, a `HeadClassifier` that gives label probabilities directly. For a label task the metrics come from
probabilities over the label set (so ROC AUC is defined) and, where the variant can generate, exact match of its
greedy answer too; free-text tasks get exact match and word-overlap F1; the multiple-choice set gets accuracy
by log-likelihood of each choice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from lmpipe.evaluation.scoring import Scorer, parse_answer
from lmpipe.evaluation.tasks import (
    classification_metrics,
    confusion_rows,
    exact_match,
    mc_accuracy,
    predicted_labels,
    tfidf_baseline,
    token_f1,
)


def _by_task(examples: pd.DataFrame) -> dict[str, pd.DataFrame]:
    return {task: rows for task, rows in examples.groupby("task", sort=False)}


def _answer_room(scorer: Scorer, labels: Sequence[str]) -> int:
    """Enough new tokens for the longest label plus the closing <|end|>."""
    return max(len(scorer.encode(label)) for label in labels) + 1


def answer_room(scorer: Scorer, task: str, label_sets: dict[str, list[str]], max_new_tokens: int) -> int:
    """Tokens a task's answer may take: the longest label plus <|end|>, or the free-text budget."""
    return _answer_room(scorer, label_sets[task]) if task in label_sets else max_new_tokens


def fitting(
    examples: pd.DataFrame,
    mc_items: Sequence[Any],
    scorer: Scorer,
    label_sets: dict[str, list[str]],
    max_new_tokens: int,
) -> tuple[pd.DataFrame, list[Any], dict[str, int]]:
    """The examples and MC items whose prompt plus answer fit `scorer`'s context (pass the variant with the
    smallest block_size, so every variant answers the same questions), and how many were left out per task.

    Long verses make some prompts longer than a small model's context; skipping them (and saying how many) is
    the same choice fine-tuning makes, where truncating would silently change the question.
    """
    keep = [
        scorer.fits(prompt, answer_room(scorer, task, label_sets, max_new_tokens))
        for task, prompt in zip(examples["task"], examples["prompt"], strict=True)
    ]
    kept = examples[keep]
    dropped = (examples["task"][[not k for k in keep]]).value_counts().to_dict()
    items = [
        i for i in mc_items if scorer.fits(i.question, max(len(scorer.encode(c)) for c in i.choices) + 1)
    ]
    if len(items) < len(mc_items):
        dropped["mc"] = len(mc_items) - len(items)
    return kept, items, {k: int(v) for k, v in dropped.items()}


def evaluate_variant(
    examples: pd.DataFrame,
    label_sets: dict[str, list[str]],
    mc_items: Sequence[Any],
    scorer: Scorer | None,
    classifier=None,
    max_new_tokens: int = 32,
) -> tuple[dict, dict[str, list[dict]]]:
    """(metrics per task plus "mc", confusion rows per label task) for one variant on test `examples`."""
    metrics: dict[str, Any] = {}
    confusion: dict[str, list[dict]] = {}
    for task, rows in _by_task(examples).items():
        prompts, references = list(rows["prompt"]), list(rows["response"])
        if task in label_sets:
            labels = label_sets[task]
            head = classifier is not None and task in classifier.heads
            probs = classifier.predict_proba(task, prompts) if head else scorer.label_probs(prompts, labels)
            result = classification_metrics(references, probs, labels)
            confusion[task] = confusion_rows(references, predicted_labels(probs, labels))
            if head:
                result["exact_match"] = None  # a classification head does not generate text
            else:
                answers = scorer.generate(prompts, _answer_room(scorer, labels))
                result["exact_match"] = exact_match([parse_answer(a) for a in answers], references)
        else:
            answers = [parse_answer(a) for a in scorer.generate(prompts, max_new_tokens)]
            result = {
                "n": len(prompts),
                "exact_match": exact_match(answers, references),
                "token_f1": token_f1(answers, references),
            }
        metrics[task] = result
    if mc_items and scorer is not None:
        metrics["mc"] = mc_accuracy(mc_items, scorer.choice_logliks)
    return metrics, confusion


def evaluate_tfidf(
    train: pd.DataFrame, test: pd.DataFrame, label_sets: dict[str, list[str]], seed: int
) -> tuple[dict, dict[str, list[dict]]]:
    """The classical baseline on the label tasks: TF-IDF features and logistic regression per task."""
    metrics: dict[str, Any] = {}
    confusion: dict[str, list[dict]] = {}
    train_by_task = _by_task(train)
    for task, rows in _by_task(test).items():
        if task not in label_sets or task not in train_by_task:
            continue
        labels = label_sets[task]
        fit = train_by_task[task]
        probs = tfidf_baseline(list(fit["prompt"]), list(fit["response"]), list(rows["prompt"]), labels, seed)
        references = list(rows["response"])
        metrics[task] = {**classification_metrics(references, probs, labels), "exact_match": None}
        confusion[task] = confusion_rows(references, predicted_labels(probs, labels))
    return metrics, confusion


def evaluate_encoder(
    classifier, test: pd.DataFrame, label_sets: dict[str, list[str]]
) -> tuple[dict, dict[str, list[dict]]]:
    """An encoder classifier (`lmpipe.encoder.classifier`) on the same held-out label-task examples: the verse
    text of each prompt, probabilities over the task's label set from the task's head."""
    from lmpipe.encoder.data import verse_text

    metrics: dict[str, Any] = {}
    confusion: dict[str, list[dict]] = {}
    for task, rows in _by_task(test).items():
        if task not in label_sets or task not in classifier.heads:
            continue
        labels = classifier.label_sets[task]
        probs = classifier.predict_proba(task, [verse_text(task, p) for p in rows["prompt"]])
        references = list(rows["response"])
        metrics[task] = {**classification_metrics(references, probs, labels), "exact_match": None}
        confusion[task] = confusion_rows(references, predicted_labels(probs, labels))
    return metrics, confusion
