import json

import pytest
from test_evaluation_alignment import results

from lmpipe.errors import LmpipeError
from lmpipe.training.replay_compare import compare, main, report

RUNS = {"0": "models/sft-replay0", "0.125": "models/sft-replay0.125", "0.25": "models/sft-replay0.25"}


def evaluation(**replays) -> dict:
    """Pretrained ppl 30; replay share -> (test ppl, book accuracy: book macro-F1 is half of it)."""
    rows = {"pretrained": ("models/pretrain", 30.0, 0.01, 0.26)}
    for i, (share, (ppl, book)) in enumerate(replays.items()):
        rows[f"sft-full ({i})"] = (f"models/sft-replay{share}", ppl, book, 0.6)
    return results(**rows)


def test_the_target_and_the_recommended_share():
    # 0.125: ppl 1.2x pretrained, book F1 -1.5 points (meets it); 0.25: 1.1x, -2.5 points (does not).
    result = compare(
        evaluation(**{"0": (66.0, 0.20), "0.125": (36.0, 0.17), "0.25": (33.0, 0.15)}),
        "models/pretrain",
        RUNS,
        {"0": 600.0},
    )
    rows = result["replay"]
    assert list(rows) == ["0", "0.125", "0.25"]
    assert rows["0.125"]["ppl_ratio_vs_pretrained"] == pytest.approx(1.2)
    assert rows["0.125"]["book_f1_macro_change_points"] == pytest.approx(-1.5)
    assert rows["0.25"]["testament_accuracy_change_points"] == 0
    assert [r["meets_target"] for r in rows.values()] == [False, True, False]
    assert result["recommended"] == 0.125 and rows["0"]["train_seconds"] == 600.0
    assert rows["0.25"]["train_seconds"] is None
    text = report(result)
    assert "| replay 0.125 | 36.000 | 1.200 | 0.900 | 0.000 | 0.085 | -1.500 | — | True |" in text
    assert "Recommended default: sft.replay=0.125" in text


def test_no_share_meeting_the_target_says_so():
    runs = {"0": RUNS["0"], "0.25": RUNS["0.25"]}
    result = compare(evaluation(**{"0": (66.0, 0.2), "0.25": (50.0, 0.2)}), "models/pretrain", runs)
    assert result["recommended"] is None and "No share meets it" in report(result)


def test_errors_are_one_line():
    data = evaluation(**{"0.125": (36.0, 0.17)})
    with pytest.raises(LmpipeError, match=r"expected 0 among them"):
        compare(data, "models/pretrain", {"0.125": RUNS["0.125"]})
    with pytest.raises(LmpipeError, match=r"no row for models/sft-replay0 .*add it to evaluate.variants"):
        compare(data, "models/pretrain", RUNS)
    with pytest.raises(LmpipeError, match=r"replay share '1.5': expected a number in \[0, 1\)"):
        compare(data, "models/pretrain", {"1.5": "x"})
    no_tasks = results(
        pretrained=("models/pretrain", 30.0, None, None), s=("models/sft-replay0", 60.0, None, None)
    )
    with pytest.raises(
        LmpipeError, match=r"no testament_accuracy for models/pretrain: expected evaluate.tasks"
    ):
        compare(no_tasks, "models/pretrain", {"0": "models/sft-replay0"})


def test_main_reads_the_evaluate_run_and_writes_the_comparison(tmp_path, capsys):
    (tmp_path / "evaluate.json").write_text(json.dumps(evaluation(**{"0": (66.0, 0.2), "0.25": (36.0, 0.2)})))
    (tmp_path / "0.25").mkdir()
    (tmp_path / "0.25" / "sft.json").write_text(json.dumps({"train_seconds": 12.5}))
    args = [str(tmp_path), "models/pretrain", "0=models/sft-replay0", "0.25=models/sft-replay0.25"]
    assert main(args) == 0
    written = json.loads((tmp_path / "compare.json").read_text())
    assert written["recommended"] == 0.25 and written["replay"]["0.25"]["train_seconds"] == 12.5
    assert (tmp_path / "compare.md").read_text() in capsys.readouterr().out
    assert main([str(tmp_path / "nowhere"), "models/pretrain", "0=a"]) == 2
    assert "compare-replay: error: missing input" in capsys.readouterr().err
