import numpy as np
import pandas as pd
import pytest

from lmpipe.data.instructions import MCItem
from lmpipe.evaluation.benchmark import answer_room, evaluate_tfidf, evaluate_variant, fitting

LABELS = {"testament": ["old", "new"]}


class Oracle:
    """A scorer that knows the answers: one token per character, a context of `block_size` tokens."""

    block_size = 40

    def __init__(self, answers: dict[str, str]):
        self.answers = answers

    def encode(self, text):
        return list(text)

    def fits(self, prompt, room):
        return len(prompt) + room <= self.block_size

    def label_probs(self, prompts, labels):
        return np.array([[1.0 if label == self.answers[p] else 0.0 for label in labels] for p in prompts])

    def generate(self, prompts, max_new_tokens):
        return [self.answers[p][:max_new_tokens] for p in prompts]

    def choice_logliks(self, question, choices):
        return np.array([0.0 if c == self.answers[question] else -5.0 for c in choices])


def examples(rows):
    return pd.DataFrame(rows, columns=["task", "prompt", "response"])


def test_answer_room_is_the_longest_label_plus_end_or_the_free_text_budget():
    scorer = Oracle({})
    assert answer_room(scorer, "testament", LABELS, 32) == len("old") + 1
    assert answer_room(scorer, "continue", LABELS, 32) == 32


def test_fitting_leaves_out_what_does_not_fit_the_smallest_context_and_counts_it():
    test = examples(
        [
            ("testament", "a" * 10, "old"),
            ("testament", "b" * 37, "new"),
            ("continue", "c" * 21, "x"),
            ("continue", "d" * 9, "y"),
        ]
    )
    mc = [MCItem("q" * 10, ["yes", "no"], 0, "s"), MCItem("r" * 38, ["yes", "no"], 1, "s")]
    kept, items, dropped = fitting(test, mc, Oracle({}), LABELS, max_new_tokens=20)
    assert kept["prompt"].tolist() == ["a" * 10, "d" * 9]
    assert [i.question for i in items] == ["q" * 10]
    assert dropped == {"testament": 1, "continue": 1, "mc": 1}


def test_a_variant_that_knows_every_answer_scores_perfectly():
    test = examples([("testament", "p1", "old"), ("testament", "p2", "new"), ("continue", "p3", "and the")])
    mc = [MCItem("q1", ["yes", "no"], 1, "s"), MCItem("q2", ["yes", "no"], 0, "s")]
    answers = {"p1": "old", "p2": "new", "p3": "and the", "q1": "no", "q2": "yes"}
    metrics, confusion = evaluate_variant(test, LABELS, mc, Oracle(answers), max_new_tokens=8)
    assert metrics["testament"]["accuracy"] == 1.0 and metrics["testament"]["exact_match"] == 1.0
    assert metrics["continue"] == {"n": 1, "exact_match": 1.0, "token_f1": 1.0}
    assert metrics["mc"]["accuracy"] == 1.0
    assert confusion["testament"] == [
        {"actual": "old", "predicted": "old"},
        {"actual": "new", "predicted": "new"},
    ]


def test_a_classification_head_answers_label_tasks_without_generating():
    class Heads:
        heads = {"testament": None}

        def predict_proba(self, task, prompts):
            return np.array([[0.0, 1.0]] * len(prompts))  # always "new"

    test = examples([("testament", "p1", "old"), ("testament", "p2", "new")])
    metrics, _ = evaluate_variant(test, LABELS, [], None, Heads())
    assert metrics["testament"]["accuracy"] == 0.5 and metrics["testament"]["exact_match"] is None
    assert "mc" not in metrics


def test_tfidf_scores_only_the_label_tasks_it_has_training_examples_for():
    train = examples(
        [("testament", f"moses {i}", "old") for i in range(6)]
        + [("testament", f"jesus {i}", "new") for i in range(6)]
    )
    test = examples(
        [("testament", "moses said", "old"), ("testament", "jesus said", "new"), ("continue", "x", "y")]
    )
    metrics, confusion = evaluate_tfidf(train, test, LABELS, seed=0)
    assert set(metrics) == {"testament"} and metrics["testament"]["exact_match"] is None
    assert metrics["testament"]["accuracy"] == pytest.approx(1.0)
    assert len(confusion["testament"]) == 2
