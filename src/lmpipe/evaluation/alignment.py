"""The models of one training chain side by side, picked from the `evaluate` results by directory: the
alignment tax of post-training (perplexity and task accuracy after SFT, DPO and RL, with the perplexity's ratio
to SFT's), and the summary row `make compare-replay` compares (`lmpipe.training.replay_compare`).

Nothing here measures anything: every number is a row `evaluate` already computed, so this adds no time.
"""

from __future__ import annotations

import os
from pathlib import Path

from lmpipe.evaluation.tasks import variant_table

SFT_STEP = "sft"
"""The step of `evaluate.post_training` the perplexity ratios and accuracy changes are taken against."""
PRETRAINED_STEP = "pretrained"
"""The step whose perplexity the second ratio is taken against, when `evaluate.post_training` names it."""

SUMMARY_COLUMNS = [
    ("test_ppl", "test ppl"),
    ("testament_accuracy", "testament acc"),
    ("book_accuracy", "book acc"),
    ("book_f1_macro", "book F1 macro"),
    ("mc_accuracy", "MC acc"),
]
"""What a summary row holds (key, header): the language-model and task metrics the trade-offs are about."""

ALIGNMENT_COLUMNS = [
    ("variant", "variant"),
    ("test_ppl", "test ppl"),
    ("ppl_ratio_vs_sft", "ppl / sft"),
    ("ppl_ratio_vs_pretrained", "ppl / pretrained"),
    *SUMMARY_COLUMNS[1:],
    ("book_accuracy_change_vs_sft", "book acc - sft"),
    ("mc_accuracy_change_vs_sft", "MC acc - sft"),
]


def same_directory(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return Path(os.path.normpath(a)).resolve() == Path(os.path.normpath(b)).resolve()


def row_of_directory(results: dict, directory: str | os.PathLike) -> str | None:
    """The row name `evaluate` gave the model directory `directory` (None when it was not evaluated)."""
    return next(
        (
            name
            for name, row in results["variants"].items()
            if row.get("directory") is not None and same_directory(row["directory"], directory)
        ),
        None,
    )


def summary(results: dict, row: str) -> dict:
    """The SUMMARY_COLUMNS of one evaluated row (a task metric is None when tasks were not run)."""
    tasks = results["tasks"].get(row, {})
    return {
        "test_ppl": results["lm"][row]["test_ppl"],
        "testament_accuracy": tasks.get("testament", {}).get("accuracy"),
        "book_accuracy": tasks.get("book", {}).get("accuracy"),
        "book_f1_macro": tasks.get("book", {}).get("f1_macro"),
        "mc_accuracy": tasks.get("mc", {}).get("accuracy"),
    }


def _change(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def post_training(results: dict, steps: dict[str, str]) -> tuple[dict, list[str]]:
    """(step -> its row with the ratios and changes against SFT, the steps whose directory was not evaluated).

    Empty when the `sft` step's directory was not evaluated or no other step was (nothing to compare)."""
    found, missing = {}, []
    for step, directory in steps.items():
        row = row_of_directory(results, directory)
        if row is None:
            missing.append(step)
        else:
            found[step] = {"variant": row, "directory": str(directory), **summary(results, row)}
    if SFT_STEP not in found or len(found) < 2:
        return {}, missing
    sft = found[SFT_STEP]
    pretrained = found.get(PRETRAINED_STEP)
    for row in found.values():
        row["ppl_ratio_vs_sft"] = row["test_ppl"] / sft["test_ppl"]
        if pretrained is not None:
            row["ppl_ratio_vs_pretrained"] = row["test_ppl"] / pretrained["test_ppl"]
        row["book_accuracy_change_vs_sft"] = _change(row["book_accuracy"], sft["book_accuracy"])
        row["mc_accuracy_change_vs_sft"] = _change(row["mc_accuracy"], sft["mc_accuracy"])
    return found, missing


def _signed(value: float | None) -> str:
    return "not measured" if value is None else f"{value:+.3f}"


def alignment_report(rows: dict, missing: list[str], steps: dict[str, str]) -> str:
    """The markdown section: the table, then the perplexity after every step and each step's changes, in words."""
    text = "\n# Post-training steps: the alignment tax\n\n" + variant_table(
        rows, ALIGNMENT_COLUMNS, first="step"
    )
    chain = [step for step in rows if step != PRETRAINED_STEP]
    text += "\nTest perplexity after each post-training step: " + " -> ".join(
        f"{step} {rows[step]['test_ppl']:.2f} ({rows[step]['ppl_ratio_vs_sft']:.3f}x sft)" for step in chain
    )
    if PRETRAINED_STEP in rows:
        text += (
            f"; the pretrained model's is {rows[PRETRAINED_STEP]['test_ppl']:.2f}, so sft costs "
            f"{rows[SFT_STEP]['ppl_ratio_vs_pretrained']:.3f}x"
        )
    text += ". Against sft:"
    for step in chain:
        if step != SFT_STEP:
            row = rows[step]
            change = row["ppl_ratio_vs_sft"] - 1
            text += (
                f" {step} ({row['variant']}) perplexity {change:+.1%}, book accuracy "
                f"{_signed(row['book_accuracy_change_vs_sft'])}, MC accuracy "
                f"{_signed(row['mc_accuracy_change_vs_sft'])};"
            )
    text = text.rstrip(";") + "."
    if missing:
        text += " Not evaluated, so left out: " + ", ".join(f"{s} ({steps[s]})" for s in missing) + "."
    return text + "\n"
