"""Task metrics (classification, free text, multiple choice), the TF-IDF baseline, and the comparison table.

Every metric is scikit-learn's, so the numbers mean exactly what its documentation says. Results are plain
JSON values: an undefined metric is None, never NaN.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lmpipe.errors import LmpipeError

AVERAGES = ("micro", "macro", "weighted")


def predicted_labels(probs: np.ndarray, labels: Sequence[str]) -> list[str]:
    """The most probable label of each row of `probs` (N, L)."""
    return [labels[i] for i in np.asarray(probs).argmax(axis=1)]


def _check_classification(y_true: Sequence[str], probs: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape != (len(y_true), len(labels)):
        raise LmpipeError(
            f"probs has shape {probs.shape}: expected (len(y_true), len(labels)) = "
            f"({len(y_true)}, {len(labels)})"
        )
    if not len(y_true):
        raise LmpipeError("y_true is empty: expected at least one example to evaluate")
    unknown = sorted(set(y_true) - set(labels))
    if unknown:
        raise LmpipeError(
            f"y_true has labels {unknown[:5]} not in labels: expected one of the {len(labels)} labels"
        )
    return probs


def _roc_auc(
    y_true: Sequence[str], probs: np.ndarray, labels: Sequence[str], present: list[str]
) -> float | None:
    """ROC AUC over the labels present in y_true (None with fewer than two: there are no negatives to rank).

    scikit-learn's one-vs-rest AUC needs score rows that sum to 1 over exactly the classes it scores, so the
    columns of absent labels are dropped and each row renormalised over the present ones (a row with no mass
    on any present label becomes uniform). With two labels in all, that is the probability of labels[1].
    """
    from sklearn.metrics import roc_auc_score

    if len(present) < 2:
        return None
    sub = probs[:, [labels.index(label) for label in present]]
    totals = sub.sum(axis=1, keepdims=True)
    sub = np.where(totals > 0, sub / np.where(totals > 0, totals, 1.0), 1.0 / len(present))
    if len(present) == 2:
        positive = np.asarray(y_true) == present[1]
        return float(roc_auc_score(positive, sub[:, 1]))
    # sklearn wants the multiclass labels sorted, with score columns in that order.
    order = np.argsort(present)
    return float(
        roc_auc_score(
            y_true, sub[:, order], multi_class="ovr", average="macro", labels=[present[i] for i in order]
        )
    )


def classification_metrics(y_true: Sequence[str], probs: np.ndarray, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, precision/recall/F1 (micro, macro, weighted), Cohen's kappa, ROC AUC and the confusion matrix
    of argmax predictions from `probs` (N, L) over `labels`.

    Precision, recall, F1 and AUC are averaged over the labels present in y_true only (`labels_evaluated` of
    `labels_total`): a test split rarely holds all 66 books, and an absent label has no recall to average.
    Note that micro precision then ignores predictions of absent labels, so micro F1 can exceed accuracy.
    The confusion matrix covers the labels present in y_true or predicted (so each row sums to the label's
    count), in `labels` order.
    """
    from sklearn.metrics import (
        accuracy_score,
        cohen_kappa_score,
        confusion_matrix,
        precision_recall_fscore_support,
    )

    labels = list(labels)
    probs = _check_classification(y_true, probs, labels)
    y_true = list(y_true)
    y_pred = predicted_labels(probs, labels)
    present = [label for label in labels if label in set(y_true)]
    result: dict[str, Any] = {
        "n": len(y_true),
        "labels_evaluated": len(present),
        "labels_total": len(labels),
        "accuracy": float(accuracy_score(y_true, y_pred)),
    }
    for average in AVERAGES:
        precision, recall, f1, _ = precision_recall_fscore_support(
            y_true, y_pred, labels=present, average=average, zero_division=0
        )
        result |= {
            f"precision_{average}": float(precision),
            f"recall_{average}": float(recall),
            f"f1_{average}": float(f1),
        }
    seen = set(y_true) | set(y_pred)
    matrix_labels = [label for label in labels if label in seen]
    # Undefined when truth and predictions are one and the same label (chance agreement is then 1).
    kappa = cohen_kappa_score(y_true, y_pred) if len(matrix_labels) > 1 else None
    result["cohen_kappa"] = None if kappa is None else float(kappa)
    result["roc_auc"] = _roc_auc(y_true, probs, labels, present)
    with warnings.catch_warnings():
        # sklearn warns about any 1x1 matrix; here it is the intended shape (only one label was seen).
        warnings.filterwarnings("ignore", message="A single label was found", category=UserWarning)
        matrix = confusion_matrix(y_true, y_pred, labels=matrix_labels)
    result["confusion_matrix"] = {"labels": matrix_labels, "matrix": matrix.tolist()}
    return result


def confusion_rows(y_true: Sequence[str], y_pred: Sequence[str]) -> list[dict[str, str]]:
    """One {"actual", "predicted"} record per example: the input of a DVC confusion plot."""
    if len(y_true) != len(y_pred):
        raise LmpipeError(
            f"y_true has {len(y_true)} items but y_pred has {len(y_pred)}: expected equal lengths"
        )
    return [{"actual": a, "predicted": p} for a, p in zip(y_true, y_pred, strict=True)]


def _normalise(text: str) -> str:
    return " ".join(text.split())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise LmpipeError(
            f"{len(predictions)} predictions for {len(references)} references: expected one per reference"
        )
    if not references:
        raise LmpipeError("references is empty: expected at least one example to evaluate")


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions equal to their reference after collapsing whitespace.

    Case and punctuation count: the continue task asks for the verse's exact words, and KJV capitals
    ("LORD") are part of them.
    """
    from sklearn.metrics import accuracy_score

    _check_pairs(predictions, references)
    return float(accuracy_score([_normalise(r) for r in references], [_normalise(p) for p in predictions]))


def _token_f1(prediction: str, reference: str) -> float:
    # SQuAD's per-answer F1 over word multisets; sklearn scores label vectors, not bags of words, so only
    # this overlap count is written out here.
    pred, ref = prediction.split(), reference.split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)


def token_f1(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean SQuAD-style F1 of word overlap between each prediction and its reference.

    Words are whitespace-separated and compared exactly, as in `exact_match` (so an exact match scores 1).
    Two empty texts score 1; one empty text scores 0.
    """
    _check_pairs(predictions, references)
    return float(np.mean([_token_f1(p, r) for p, r in zip(predictions, references, strict=True)]))


def mc_accuracy(items: Sequence[Any], loglik_fn: Callable[[str, list[str]], np.ndarray]) -> dict[str, Any]:
    """Multiple-choice accuracy: the pick is the choice with the highest `loglik_fn(question, choices)`.

    Items have `question`, `choices` and `answer_index`. Two baselines come with it: `chance` (the mean of
    1/len(choices), a uniform guesser's expected accuracy) and `majority_baseline` (always answering the most
    frequent answer position *of these items*). The latter is a best-case constant guesser: it knows the
    answer-position distribution of the test items, which no real guesser does.
    """
    from sklearn.metrics import accuracy_score

    if not items:
        raise LmpipeError("items is empty: expected at least one multiple-choice item")
    answers, picks = [], []
    for i, item in enumerate(items):
        if not 0 <= item.answer_index < len(item.choices):
            raise LmpipeError(
                f"item {i}: answer_index={item.answer_index} for {len(item.choices)} choices: "
                "expected 0 <= answer_index < number of choices"
            )
        logliks = np.asarray(loglik_fn(item.question, list(item.choices)))
        answers.append(item.answer_index)
        picks.append(int(logliks.argmax()))
    most_frequent = Counter(answers).most_common(1)[0][0]
    return {
        "accuracy": float(accuracy_score(answers, picks)),
        "n": len(items),
        "chance": float(np.mean([1 / len(item.choices) for item in items])),
        "majority_baseline": float(accuracy_score(answers, [most_frequent] * len(answers))),
    }


def tfidf_baseline(
    train_texts: Sequence[str],
    train_labels: Sequence[str],
    test_texts: Sequence[str],
    labels: Sequence[str],
    seed: int,
    min_df: int = 2,
) -> np.ndarray:
    """(N, L) probabilities over `labels` for `test_texts` from TF-IDF + logistic regression (the classic
    text classifier a language model should beat); labels absent from training get probability 0.

    Word 1-2 grams with sublinear term frequency; n-grams seen in fewer than `min_df` training texts are
    dropped (on KJV verses that halves the features without changing accuracy). The multinomial logistic
    regression uses the saga solver with tol 1e-3: on ~27k verses x 66 books it stops after ~15 epochs
    (about 5 s on one core) with the same test accuracy and log-loss, to 3 decimals, as tol 1e-4 (24 epochs),
    where lbfgs took about 10x longer for the same model. max_iter is far above what it needs.
    """
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    labels = list(labels)
    if len(train_texts) != len(train_labels):
        raise LmpipeError(
            f"{len(train_texts)} train_texts but {len(train_labels)} train_labels: "
            "expected one label per text"
        )
    unknown = sorted(set(train_labels) - set(labels))
    if unknown:
        raise LmpipeError(
            f"train_labels has {unknown[:5]} not in labels: expected one of the {len(labels)} labels"
        )
    if len(set(train_labels)) < 2:
        raise LmpipeError(f"train_labels has {len(set(train_labels))} distinct label(s): expected at least 2")
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=min_df)
    try:
        features = vectorizer.fit_transform(train_texts)
    except ValueError as err:  # every n-gram below min_df: sklearn's message is clear, but not one of ours
        raise LmpipeError(f"tfidf baseline: no n-gram occurs in {min_df}+ training texts ({err})") from err
    classifier = LogisticRegression(solver="saga", tol=1e-3, max_iter=1000, random_state=seed)
    classifier.fit(features, list(train_labels))
    probs = np.zeros((len(test_texts), len(labels)), dtype=np.float64)
    probs[:, [labels.index(label) for label in classifier.classes_]] = classifier.predict_proba(
        vectorizer.transform(test_texts)
    )
    return probs


def _lookup(row: dict, path: str) -> Any:
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float | np.floating):
        return "—" if not math.isfinite(value) else f"{value:.3f}"
    return str(value)


def variant_table(rows: dict[str, dict], columns: list[tuple[str, str]], first: str = "variant") -> str:
    """A markdown table: one row per variant, one column per (key path such as "book.f1_macro", header);
    `first` heads the column of the row names.

    Missing values show as "—", floats with 3 decimals.
    """
    lines = [
        f"| {first} | " + " | ".join(header for _, header in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for name, row in rows.items():
        lines.append(f"| {name} | " + " | ".join(_cell(_lookup(row, path)) for path, _ in columns) + " |")
    return "\n".join(lines) + "\n"
