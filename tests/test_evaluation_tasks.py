import json
from typing import NamedTuple

import numpy as np
import pytest

from lmpipe.errors import LmpipeError
from lmpipe.evaluation.tasks import (
    classification_metrics,
    confusion_rows,
    exact_match,
    mc_accuracy,
    tfidf_baseline,
    token_f1,
    variant_table,
)

# 6 examples, 3 labels. Predictions (argmax) are a a b b c c against truth a a a b b c:
#   a: TP 2 FP 0 FN 1 -> P 1,   R 2/3, F1 0.8
#   b: TP 1 FP 1 FN 1 -> P 1/2, R 1/2, F1 0.5
#   c: TP 1 FP 1 FN 0 -> P 1/2, R 1,   F1 2/3
# micro: TP 4, FP 2, FN 2 -> P = R = F1 = 4/6; macro F1 = (0.8 + 0.5 + 2/3) / 3 = 0.655556;
# weighted F1 (supports 3, 2, 1) = (2.4 + 1 + 2/3) / 6 = 0.677778.
# kappa: p_o = 4/6; p_e = (3*2 + 2*2 + 1*2) / 36 = 1/3; kappa = (2/3 - 1/3) / (2/3) = 0.5.
# One-vs-rest AUC: a 9/9 pairs ranked right; b: positives 0.6 (beats all 4 negatives) and 0.4 (beats 0.2,
# 0.3, 0.2, not 0.5) -> 7/8; c 5/5. Macro = (1 + 0.875 + 1) / 3 = 0.958333.
LABELS = ["a", "b", "c"]
Y_TRUE = ["a", "a", "a", "b", "b", "c"]
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.6, 0.3, 0.1],
        [0.3, 0.5, 0.2],
        [0.2, 0.6, 0.2],
        [0.1, 0.4, 0.5],
        [0.2, 0.2, 0.6],
    ]
)


def check_hand_computed(m: dict) -> None:
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1_micro"] == pytest.approx(4 / 6)
    assert m["precision_macro"] == pytest.approx(2 / 3)
    assert m["recall_macro"] == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    assert m["f1_macro"] == pytest.approx(0.655556, abs=1e-6)
    assert m["f1_weighted"] == pytest.approx(0.677778, abs=1e-6)
    assert m["cohen_kappa"] == pytest.approx(0.5)
    assert m["roc_auc"] == pytest.approx(0.958333, abs=1e-6)


def test_classification_metrics_match_hand_computed_values():
    m = classification_metrics(Y_TRUE, PROBS, LABELS)
    check_hand_computed(m)
    assert (m["labels_evaluated"], m["labels_total"], m["n"]) == (3, 3, 6)
    assert m["confusion_matrix"] == {"labels": LABELS, "matrix": [[2, 1, 0], [0, 1, 1], [0, 0, 1]]}


def test_absent_labels_are_excluded_from_averages_and_auc():
    # A fourth label "d" nobody has: 0.2 of every row, so renormalising over a, b, c gives PROBS back.
    probs = np.hstack([0.8 * PROBS, np.full((6, 1), 0.2)])
    m = classification_metrics(Y_TRUE, probs, [*LABELS, "d"])
    check_hand_computed(m)  # with "d" in the macro average, F1 would be 0.491667
    assert (m["labels_evaluated"], m["labels_total"]) == (3, 4)


def test_label_order_does_not_matter():
    order = [2, 0, 1]  # labels c, a, b: not sorted, as book titles in canonical order are not
    m = classification_metrics(Y_TRUE, PROBS[:, order], [LABELS[i] for i in order])
    check_hand_computed(m)


def test_confusion_matrix_keeps_predictions_of_absent_labels():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.1, 0.7], [0.1, 0.8, 0.1]])
    m = classification_metrics(["a", "a", "b"], probs, LABELS)
    assert m["confusion_matrix"] == {"labels": LABELS, "matrix": [[1, 0, 1], [0, 1, 0], [0, 0, 0]]}
    assert m["labels_evaluated"] == 2
    # Binary AUC over a, b renormalised: b-scores 0.1, 0.125, 0.889 -> the b example outranks both a's.
    assert m["roc_auc"] == pytest.approx(1.0)


def test_binary_auc_by_hand():
    # p(New) = 0.1, 0.6 for Old; 0.4, 0.8, 0.7 for New: 0.4 beats 0.1 only, 0.8 and 0.7 beat both -> 5/6.
    p_new = np.array([0.1, 0.6, 0.4, 0.8, 0.7])
    y_true = ["Old", "Old", "New", "New", "New"]
    m = classification_metrics(y_true, np.column_stack([1 - p_new, p_new]), ["Old", "New"])
    assert m["roc_auc"] == pytest.approx(5 / 6)
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_one_label_present_gives_none_not_nan():
    probs = np.array([[0.9, 0.1], [0.8, 0.2]])
    m = classification_metrics(["Old", "Old"], probs, ["Old", "New"])
    assert m["roc_auc"] is None
    assert m["cohen_kappa"] is None  # truth and predictions all one label: kappa is undefined
    assert m["accuracy"] == 1.0
    json.dumps(m, allow_nan=False)


def test_classification_metrics_reject_unknown_labels_and_bad_shapes():
    with pytest.raises(LmpipeError, match="not in labels"):
        classification_metrics(["z"], np.array([[1.0, 0.0, 0.0]]), LABELS)
    with pytest.raises(LmpipeError, match="shape"):
        classification_metrics(["a"], np.array([[1.0, 0.0]]), LABELS)


def test_confusion_rows():
    assert confusion_rows(["a", "b"], ["a", "c"]) == [
        {"actual": "a", "predicted": "a"},
        {"actual": "b", "predicted": "c"},
    ]


def test_exact_match_normalises_whitespace_but_not_case():
    preds = ["the  LORD is\nmy shepherd", "The lord", "x"]
    refs = ["the LORD is my shepherd ", "the lord", "y"]
    assert exact_match(preds, refs) == pytest.approx(1 / 3)


def test_token_f1_by_hand():
    # "a b c d" vs "a b e": overlap 2, P 2/4, R 2/3, F1 = 2 * (1/2)(2/3) / (7/6) = 4/7; exact pair 1; empty 0.
    preds = ["a b c d", "same words", ""]
    refs = ["a b e", "same  words", "x"]
    assert token_f1(preds, refs) == pytest.approx((4 / 7 + 1 + 0) / 3)
    assert token_f1(["", "x"], [" ", "y"]) == pytest.approx(0.5)  # two empty texts agree
    assert token_f1(["a a b"], ["a b b"]) == pytest.approx(2 / 3)  # multisets: one "a" and one "b" overlap
    with pytest.raises(LmpipeError, match="2 predictions for 1 references"):
        token_f1(["a", "b"], ["a"])


class MCItem(NamedTuple):
    question: str
    choices: list[str]
    answer_index: int
    subject: str = "test"


def test_mc_accuracy_and_baselines():
    items = [
        MCItem("q1", ["right", "w", "w", "w"], 0),
        MCItem("q2", ["w", "w", "right", "w"], 2),
        MCItem("q3", ["w", "w", "right"], 2),
        MCItem("q4", ["w", "right", "w", "w"], 1),
    ]

    def loglik(question, choices):  # knows every answer except q4's
        if question == "q4":
            return np.array([0.0, -1.0, -2.0, -3.0])
        return np.array([0.0 if c == "right" else -5.0 for c in choices])

    result = mc_accuracy(items, loglik)
    assert result == {
        "accuracy": pytest.approx(0.75),
        "n": 4,
        "chance": pytest.approx((0.25 + 0.25 + 1 / 3 + 0.25) / 4),
        "majority_baseline": pytest.approx(0.5),  # position 2 answers 2 of 4
    }


def test_tfidf_baseline_beats_chance_on_separable_text():
    rng = np.random.default_rng(0)
    vocab = {
        "fruit": "apple pear plum cherry peach grape",
        "metal": "iron copper zinc tin lead gold",
        "bird": "crow robin finch swan heron owl",
    }

    def sample(label, n):
        words = vocab[label].split() + "the a of and".split()
        return [" ".join(rng.choice(words, 6)) for _ in range(n)]

    train_texts, train_labels = [], []
    for label in vocab:
        train_texts += sample(label, 20)
        train_labels += [label] * 20
    test_labels = [label for label in vocab for _ in range(10)]
    test_texts = [text for label in vocab for text in sample(label, 10)]
    labels = ["bird", "unused", "fruit", "metal"]
    probs = tfidf_baseline(train_texts, train_labels, test_texts, labels, seed=0)
    assert probs.shape == (30, 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (probs[:, 1] == 0).all()  # never seen in training
    accuracy = np.mean([labels[i] == t for i, t in zip(probs.argmax(axis=1), test_labels, strict=True)])
    assert accuracy >= 0.9  # chance is 1/3


def test_tfidf_baseline_rejects_labels_outside_the_set():
    with pytest.raises(LmpipeError, match="not in labels"):
        tfidf_baseline(["a b", "c d"], ["x", "y"], ["a"], ["x"], seed=0)


def test_variant_table_formatting():
    rows = {
        "pretrained": {"book": {"f1_macro": 0.12345, "n": 10}, "testament": {"accuracy": 0.9}},
        "sft": {"book": {"f1_macro": None}},
    }
    columns = [("book.f1_macro", "book F1"), ("book.n", "n"), ("testament.accuracy", "testament acc")]
    assert variant_table(rows, columns) == (
        "| variant | book F1 | n | testament acc |\n"
        "|---|---:|---:|---:|\n"
        "| pretrained | 0.123 | 10 | 0.900 |\n"
        "| sft | — | — | — |\n"
    )
