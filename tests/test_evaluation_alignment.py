import pytest

from lmpipe.evaluation.alignment import alignment_report, post_training, row_of_directory, summary


def results(**rows) -> dict:
    """An evaluate.json with one row per name: (directory, test ppl, book acc, MC acc) or with tasks=None."""
    out = {"lm": {}, "tasks": {}, "variants": {}}
    for name, (directory, ppl, book, mc) in rows.items():
        out["lm"][name] = {"test_ppl": ppl}
        out["variants"][name] = {"directory": directory, "test_ppl": ppl}
        if book is not None:
            out["tasks"][name] = {
                "testament": {"accuracy": 0.9},
                "book": {"accuracy": book, "f1_macro": book / 2},
                "mc": {"accuracy": mc},
            }
    return out


STEPS = {
    "pretrained": "models/pretrain",
    "sft": "models/onnx/teacher",
    "dpo": "models/onnx/dpo",
    "rl": "models/onnx/rl",
}
EVALUATED = results(
    pretrained=("models/pretrain", 30.0, 0.01, 0.26),
    **{"sft-full": ("models/sft", 60.0, 0.20, 0.66)},
    **{"onnx-teacher": ("models/onnx/teacher", 60.0, 0.20, 0.66)},
    **{"onnx-dpo": ("./models/onnx/dpo", 66.0, 0.25, 0.64)},
    **{"onnx-rl": ("models/onnx/rl/", 75.0, 0.20, 0.70)},
)


def test_each_step_is_the_row_of_its_directory_with_ratios_and_changes_against_sft():
    rows, missing = post_training(EVALUATED, STEPS)
    assert list(rows) == ["pretrained", "sft", "dpo", "rl"] and missing == []
    assert [r["variant"] for r in rows.values()] == ["pretrained", "onnx-teacher", "onnx-dpo", "onnx-rl"]
    assert rows["dpo"]["ppl_ratio_vs_sft"] == pytest.approx(1.1) and rows["sft"]["ppl_ratio_vs_sft"] == 1
    assert rows["rl"]["ppl_ratio_vs_pretrained"] == pytest.approx(2.5)
    assert rows["dpo"]["book_accuracy_change_vs_sft"] == pytest.approx(0.05)
    assert rows["rl"]["mc_accuracy_change_vs_sft"] == pytest.approx(0.04)
    assert rows["dpo"]["book_f1_macro"] == 0.125 and rows["dpo"]["testament_accuracy"] == 0.9

    report = alignment_report(rows, missing, STEPS)
    assert report.startswith("\n# Post-training steps: the alignment tax\n")
    assert "| step | variant | test ppl | ppl / sft |" in report
    assert "| dpo | onnx-dpo | 66.000 | 1.100 | 2.200 |" in report
    assert "sft 60.00 (1.000x sft) -> dpo 66.00 (1.100x sft) -> rl 75.00 (1.250x sft)" in report
    assert "so sft costs 2.000x" in report
    assert "dpo (onnx-dpo) perplexity +10.0%, book accuracy +0.050, MC accuracy -0.020;" in report
    assert "rl (onnx-rl) perplexity +25.0%, book accuracy +0.000, MC accuracy +0.040." in report


def test_steps_not_evaluated_are_left_out_and_said_so():
    partial = dict(STEPS, rl="models/onnx/missing")
    rows, missing = post_training(EVALUATED, partial)
    assert list(rows) == ["pretrained", "sft", "dpo"] and missing == ["rl"]
    assert "Not evaluated, so left out: rl (models/onnx/missing)." in alignment_report(rows, missing, partial)
    # Without the sft step, or with nothing to compare it with, there is no section.
    assert post_training(EVALUATED, {"sft": "models/nowhere", "dpo": "models/onnx/dpo"})[0] == {}
    assert post_training(EVALUATED, {"sft": "models/onnx/teacher"})[0] == {}


def test_without_tasks_the_accuracies_are_not_measured_rather_than_zero():
    no_tasks = results(a=("m/sft", 50.0, None, None), b=("m/dpo", 55.0, None, None))
    rows, _ = post_training(no_tasks, {"sft": "m/sft", "dpo": "m/dpo"})
    assert rows["dpo"]["book_accuracy"] is None and rows["dpo"]["book_accuracy_change_vs_sft"] is None
    assert "ppl_ratio_vs_pretrained" not in rows["dpo"]
    assert "book accuracy not measured, MC accuracy not measured." in alignment_report(rows, [], {})
    assert summary(no_tasks, "a") == {
        "test_ppl": 50.0,
        "testament_accuracy": None,
        "book_accuracy": None,
        "book_f1_macro": None,
        "mc_accuracy": None,
    }
    assert row_of_directory({"variants": {"old": {"test_ppl": 1.0}}}, "m/sft") is None  # evaluate.json before
