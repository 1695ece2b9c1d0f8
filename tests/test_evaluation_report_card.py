import struct

import pytest

from lmpipe.evaluation import report_card
from lmpipe.evaluation.report_card import (
    REPORT_DIR,
    REPORT_FILE,
    TRAINING_STAGES,
    loss_curves,
    read_curve,
    write_report_card,
)
from lmpipe.evaluation.tasks import variant_table

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "variants": {
        "pretrained": {
            "runtime": "torch", "parameters": 4_000_000, "file_mb": 16.0, "test_ppl": 40.0,
            "decode_tok_s_b1": 150.0,
        },
        "onnx-teacher": {
            "runtime": "onnx", "parameters": 4_000_000, "file_mb": 16.0, "test_ppl": 38.0,
            "decode_tok_s_b1": 400.0,
        },
        "onnx-teacher-int8": {
            "runtime": "onnx", "parameters": 4_000_000, "file_mb": 4.0, "test_ppl": 39.0,
            "decode_tok_s_b1": 700.0,
        },
        "student": {"runtime": "torch", "parameters": 1_000_000, "file_mb": 4.0, "test_ppl": 55.0},
    },
    "lm": {
        "pretrained": {"test_ppl": 40.0},
        "onnx-teacher": {"test_ppl": 38.0},
        "onnx-teacher-int8": {"test_ppl": 39.0},
        "student": {"test_ppl": 55.0},
        "kneser-ney 4-gram": {"test_ppl": 60.0},
    },
}  # fmt: skip
# As evaluate renders its first table (evaluate.md), with fewer columns.
TABLES = "# Model variants\n\n" + variant_table(RESULTS["variants"], [("test_ppl", "test ppl")])


def write_curve(path, points):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in points), encoding="utf-8")


@pytest.fixture
def plots(tmp_path):
    """Curves of pretrain, distill (the student and its ablation), encoder_finetune (two inits, one folder each)
    and rl (losses beside a reward curve the card does not draw); the other training stages have none."""
    root = tmp_path / "plots"
    falling = [(s, 5.0 - s / 10) for s in range(0, 30, 5)]
    write_curve(root / "pretrain/train_loss.csv", falling)
    write_curve(root / "pretrain/val_loss.csv", falling[::2])
    for run in ("student", "student-nodistill"):
        write_curve(root / f"distill/{run}_train_loss.csv", falling)
        write_curve(root / f"distill/{run}_val_loss.csv", falling[::3])
    for init in ("pretrained", "scratch"):
        write_curve(root / f"encoder_finetune/{init}/train_loss.csv", falling)
    write_curve(root / "rl/train_loss.csv", falling)
    write_curve(root / "rl/train_reward.csv", [(0, 0.1), (5, 0.4)])
    (root / "sft").mkdir()  # a folder, but no loss curve in it
    write_curve(root / "sft/val_loss.csv", [])  # header only: nothing to draw
    write_curve(root / "confusion/book.csv", [])  # evaluate's own plot data: not a training curve
    return root


def test_loss_curves_of_every_stage_found_in_training_order(plots):
    curves, missing = loss_curves(plots)
    assert list(curves) == ["pretrain", "distill", "encoder_finetune", "rl"]
    assert set(curves["distill"]) == {
        "student_train_loss",
        "student_val_loss",
        "student-nodistill_train_loss",
        "student-nodistill_val_loss",
    }
    assert set(curves["encoder_finetune"]) == {"pretrained/train_loss", "scratch/train_loss"}
    assert set(curves["rl"]) == {"train_loss"}  # reward, KL and length are not losses
    assert curves["pretrain"]["val_loss"] == ([0.0, 10.0, 20.0], [5.0, 4.0, 3.0])
    assert missing == [s for s in TRAINING_STAGES if s not in curves]  # sft's only curve is empty


def test_only_the_listed_stage_folders_are_read(plots):
    """The card reads only its declared DVC deps: another folder under plots/ (a `make compare-*` run's) would
    change the card without DVC re-running evaluate."""
    write_curve(plots / "sft-compare/full/train_loss.csv", [(0, 1.0), (1, 0.5)])
    curves, _ = loss_curves(plots)
    assert "sft-compare" not in curves and list(curves) == ["pretrain", "distill", "encoder_finetune", "rl"]
    assert loss_curves(plots / "absent") == ({}, list(TRAINING_STAGES))


def test_read_curve_skips_the_header_and_blank_lines(tmp_path):
    (tmp_path / "c.csv").write_text("step,loss\n0,2.5\n\n10,1.25\n", encoding="utf-8")
    assert read_curve(tmp_path / "c.csv") == ([0.0, 10.0], [2.5, 1.25])


def png_size(path):
    """(width, height) from the IHDR chunk, after checking the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def test_the_card_lists_every_variant_and_links_its_figures(tmp_path, plots):
    metrics = tmp_path / "metrics"
    card = write_report_card(metrics, plots, RESULTS, TABLES)
    assert card.markdown == metrics / REPORT_FILE and card.figures == metrics / REPORT_DIR
    page = card.markdown.read_text(encoding="utf-8")
    assert page.startswith("# Report card\n")
    for name in RESULTS["variants"]:
        assert name in page
    assert "lowest test perplexity is onnx-teacher's (38)" in page
    assert "## Model variants\n\n| variant | test ppl |" in page  # evaluate's tables, one level down
    assert "| onnx-teacher-int8 | 39.000 |" in page

    links = [line.split("](")[1].rstrip(")") for line in page.splitlines() if line.startswith("![")]
    figures = ("quality_size.png", "quality_speed.png", "loss_curves.png")
    assert links == [f"{REPORT_DIR}/{name}" for name in figures]
    assert sorted(p.name for p in card.figures.iterdir()) == sorted(link.split("/")[1] for link in links)
    for link in links:
        path = metrics / link
        width, height = png_size(path)
        assert width >= 400 and height >= 250
        assert 2_000 < path.stat().st_size < 150_000  # something drawn, and small enough for git
    assert card.drawn == ("pretrain", "distill", "encoder_finetune", "rl")
    assert "Stages drawn: pretrain, distill, encoder_finetune, rl." in page


def test_a_stage_without_curves_is_skipped_with_a_line(tmp_path, plots):
    card = write_report_card(tmp_path / "metrics", plots, RESULTS, TABLES)
    assert card.missing == ("sft", "encoder_mlm", "encoder_distill", "reward", "dpo")
    page = card.markdown.read_text(encoding="utf-8")
    for stage in card.missing:
        assert f"- {stage}: skipped, no `*train_loss.csv` or `*val_loss.csv` under {plots / stage}." in page
    assert "- pretrain: skipped" not in page


def test_without_speed_or_curves_the_card_says_so_and_draws_the_rest(tmp_path):
    results = {"variants": {k: {**v, "decode_tok_s_b1": None} for k, v in RESULTS["variants"].items()}}
    card = write_report_card(tmp_path / "metrics", tmp_path / "no-plots", results, TABLES)
    page = card.markdown.read_text(encoding="utf-8")
    assert "Decode speed was not measured (evaluate.speed=false): no speed figure." in page
    assert [p.name for p in card.figures.iterdir()] == ["quality_size.png"]
    assert card.drawn == () and card.missing == TRAINING_STAGES


def test_a_failure_leaves_the_previous_card_whole(tmp_path, plots, monkeypatch):
    metrics = tmp_path / "metrics"
    write_report_card(metrics, plots, RESULTS, TABLES)
    before = {p.name: p.read_bytes() for p in (metrics / REPORT_DIR).iterdir()}
    page = (metrics / REPORT_FILE).read_text(encoding="utf-8")

    def broken(path, curves):
        path.write_bytes(b"half a PNG")
        raise RuntimeError("drawing failed")

    monkeypatch.setattr(report_card, "_loss_figure", broken)
    changed = {**RESULTS, "variants": {"other": {"test_ppl": 1.0, "parameters": 10, "file_mb": 1.0}}}
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_report_card(metrics, plots, changed, "# Other\n")
    assert (metrics / REPORT_FILE).read_text(encoding="utf-8") == page
    assert {p.name: p.read_bytes() for p in (metrics / REPORT_DIR).iterdir()} == before
    assert sorted(p.name for p in metrics.iterdir()) == [REPORT_DIR, REPORT_FILE]  # no temporary left behind


def test_points_that_coincide_share_a_label_and_close_labels_do_not_overprint():
    from matplotlib.figure import Figure

    ax = Figure().subplots()
    points = [
        (4.0, 36.70, "sft-full"),
        (4.0, 36.72, "onnx-teacher"),
        (4.0, 37.3, "onnx-rl"),
        (1.0, 48.0, "student"),
    ]
    report_card._name_points(ax, points)
    labels = {t.get_text(): t.get_position()[1] for t in ax.texts}
    assert set(labels) == {"sft-full, onnx-teacher", "onnx-rl", "student"}
    assert labels["onnx-rl"] - labels["sft-full, onnx-teacher"] >= 0.045 * (48.0 - 36.7) * 0.99
