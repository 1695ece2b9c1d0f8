"""The report card of a run: one page, `<paths.metrics>/report.md`, that tells what a run produced.

It shows PNG figures (in `report/` beside it), then evaluate's tables (evaluate.md's markdown, one heading level
down). The figures:

- quality against size: test perplexity against parameters and against file size, one labelled point per
  variant, the n-gram baseline as a line;
- quality against speed: test perplexity against decode tokens/s at batch 1 (ONNX Runtime and PyTorch apart);
- the train and validation loss of every training stage, one panel per stage, from the curve CSVs the stages
  write under `<paths.plots>/<stage>/`; a stage without curves is said in a line, not drawn empty.

Nothing here measures anything: every number is in evaluate's results or a curve file already, so the card
costs seconds. The page and its figures are replaced together (`lmpipe.atomic`): a failure leaves the previous
card whole.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

from lmpipe import atomic

# The card's on-disk names live here, not in lmpipe.formats: nearly every stage reads formats.py, and the card is
# evaluate's alone, so its names there would re-run all 18 stages whenever they change.
REPORT_FILE = "report.md"
"""In paths.metrics: one page of what a run produced (evaluate's tables, links to REPORT_DIR's figures)."""
REPORT_DIR = "report"
"""Beside REPORT_FILE: its PNG figures, linked as `report/<name>.png` (so the pair keeps working when copied,
logged to MLflow or rendered by a git host)."""
LOSS_CURVES = ("train_loss", "val_loss")
"""The curve CSVs under `<paths.plots>/<stage>/` the report card draws: files named `<prefix>train_loss.csv` and
`<prefix>val_loss.csv` (step,loss), as training.outputs.write_curves names them."""

TRAINING_STAGES = (
    "pretrain",
    "sft",
    "distill",
    "encoder_mlm",
    "encoder_finetune",
    "encoder_distill",
    "reward",
    "dpo",
    "rl",
)
"""The folders under paths.plots whose loss curves the card draws, in training order (and no other: dvc.yaml
lists exactly these as evaluate's deps); one of these without any is named in a line."""

LOSS_FIGURE = "loss_curves.png"
SIZE_FIGURE = "quality_size.png"
SPEED_FIGURE = "quality_speed.png"
DPI = 100
COLOURS = 64
"""Each figure is saved with a palette of this many colours: a third of the bytes of matplotlib's RGBA PNG and
no visible difference. Small files (tens of KB each) matter: they travel in git with every experiment (the
card is a `cache: false` output)."""
RUNTIMES = {"onnx": ("ONNX Runtime", "o", "C0"), "torch": ("PyTorch", "s", "C1")}
"""Variant runtime (evaluate.json's `runtime`) -> legend label, marker and colour."""
OTHER_RUNTIME = ("other", "^", "C4")
"""A row without a known runtime (an evaluate.json from before it was recorded)."""

Curve = tuple[list[float], list[float]]


@dataclass(frozen=True)
class ReportCard:
    markdown: Path
    """The page (REPORT_FILE)."""
    figures: Path
    """The folder of its PNGs (REPORT_DIR, beside the page)."""
    drawn: tuple[str, ...]
    """The stages whose loss curves are drawn."""
    missing: tuple[str, ...]
    """The stages of TRAINING_STAGES without loss curves (said in the page)."""


def read_curve(path: Path) -> Curve:
    """(steps, losses) of one curve CSV (header `step,loss`); rows that are not two numbers are skipped."""
    steps, values = [], []
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.reader(f):
            try:
                step, value = float(row[0]), float(row[1])
            except (IndexError, ValueError):
                continue  # the header, or a blank line
            steps.append(step)
            values.append(value)
    return steps, values


def loss_curves(
    plots_dir: Path, stages: tuple[str, ...] = TRAINING_STAGES
) -> tuple[dict[str, dict[str, Curve]], list[str]]:
    """({stage: {curve label: curve}}, stages without loss curves). A label is the CSV's path under the stage's
    folder without `.csv` (`train_loss`, `student-nodistill_val_loss`, `scratch/val_loss`). Only `stages` are
    read: they are the evaluate stage's declared DVC deps, and a card drawn from other folders under plots/ (a
    `make compare-*` run's) would change without DVC seeing a reason to re-run it."""
    found, missing = {}, []
    for stage in stages:
        folder = plots_dir / stage
        files = sorted(folder.rglob("*.csv")) if folder.is_dir() else []
        curves = {
            str(f.relative_to(folder).with_suffix("")): read_curve(f)
            for f in files
            if f.stem.endswith(LOSS_CURVES)
        }
        curves = {label: curve for label, curve in curves.items() if curve[0]}
        if curves:
            found[stage] = curves
        else:
            missing.append(stage)
    return found, missing


def write_report_card(
    metrics_dir: Path,
    plots_dir: Path,
    results: dict,
    tables: str,
    stages: tuple[str, ...] = TRAINING_STAGES,
) -> ReportCard:
    """Write `metrics_dir/report.md` and `metrics_dir/report/*.png` from evaluate's `results` (evaluate.json),
    its `tables` (evaluate.md) and the loss curves under `plots_dir`; both replace the previous card at once."""
    markdown, figures = Path(metrics_dir) / REPORT_FILE, Path(metrics_dir) / REPORT_DIR
    curves, missing = loss_curves(Path(plots_dir), stages)
    variants = {
        name: row
        for name, row in results.get("variants", {}).items()
        if _number(row.get("test_ppl")) is not None
    }
    baselines = {
        name: row["test_ppl"]
        for name, row in results.get("lm", {}).items()
        if name not in results.get("variants", {}) and _number(row.get("test_ppl")) is not None
    }
    with atomic.atomic_path(figures) as tmp_figures, atomic.atomic_path(markdown) as tmp_markdown:
        tmp_figures.mkdir()
        drawn = []
        if variants:
            _quality_figure(
                tmp_figures / SIZE_FIGURE,
                variants,
                baselines,
                [("parameters", "parameters (millions)", 1e6), ("file_mb", "file size (MB)", 1.0)],
            )
            drawn.append(SIZE_FIGURE)
        if any(_number(row.get("decode_tok_s_b1")) for row in variants.values()):
            _quality_figure(
                tmp_figures / SPEED_FIGURE,
                variants,
                baselines,
                [("decode_tok_s_b1", "decode tokens/s, batch 1", 1.0)],
            )
            drawn.append(SPEED_FIGURE)
        if curves:
            _loss_figure(tmp_figures / LOSS_FIGURE, curves)
            drawn.append(LOSS_FIGURE)
        tmp_markdown.write_text(
            _page(variants, tables, drawn, list(curves), missing, Path(plots_dir)), encoding="utf-8"
        )
    return ReportCard(markdown, figures, tuple(curves), tuple(missing))


def _number(value) -> float | None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else None


def _page(
    variants: dict[str, dict],
    tables: str,
    drawn: list[str],
    stages: list[str],
    missing: list[str],
    plots_dir: Path,
) -> str:
    lines = ["# Report card", ""]
    if variants:
        best = min(variants, key=lambda name: variants[name]["test_ppl"])
        lines.append(
            f"{len(variants)} model variants evaluated; the lowest test perplexity is {best}'s "
            f"({variants[best]['test_ppl']:.4g}). The tables are evaluate.md's; the figures are in {REPORT_DIR}/."
        )
    else:
        lines.append("No model variant has a test perplexity: nothing to draw against size or speed.")
    lines += ["", "## Quality against size and speed", ""]
    if SIZE_FIGURE in drawn:
        lines += [f"![Test perplexity against parameters and file size]({REPORT_DIR}/{SIZE_FIGURE})", ""]
    if SPEED_FIGURE in drawn:
        lines += [f"![Test perplexity against decode tokens/s]({REPORT_DIR}/{SPEED_FIGURE})", ""]
    elif variants:
        lines += ["Decode speed was not measured (evaluate.speed=false): no speed figure.", ""]
    lines += ["## Training curves", ""]
    if LOSS_FIGURE in drawn:
        lines += [
            f"![Train and validation loss of every training stage]({REPORT_DIR}/{LOSS_FIGURE})",
            "",
            f"Stages drawn: {', '.join(stages)}.",
            "",
        ]
    names = " or ".join(f"`*{name}.csv`" for name in LOSS_CURVES)
    lines += [f"- {stage}: skipped, no {names} under {plots_dir / stage}." for stage in missing]
    if missing:
        lines.append("")
    # evaluate's own sections (`# Model variants`, ...) one level down, beside the card's own.
    demoted = "\n".join("#" + line if line.startswith("#") else line for line in tables.splitlines())
    lines += [demoted.strip(), ""]
    return "\n".join(lines)


def _quality_figure(
    path: Path,
    variants: dict[str, dict],
    baselines: dict[str, float],
    axes: list[tuple[str, str, float]],
) -> None:
    """Test perplexity (y) against each (key, label, unit) of `axes` (x = value / unit, one panel each), a
    named point per variant, markers by runtime, each baseline a dotted line."""
    from matplotlib.figure import Figure  # here, not at the top: the CLI imports evaluation and starts fast

    fig = Figure(figsize=(5.5 * len(axes), 4.2), dpi=DPI, layout="constrained")
    for ax, (key, label, unit) in zip(fig.subplots(1, len(axes), squeeze=False)[0], axes, strict=True):
        points = [
            (x / unit, row["test_ppl"], name, row.get("runtime"))
            for name, row in variants.items()
            if (x := _number(row.get(key))) is not None
        ]
        for runtime in dict.fromkeys(p[3] for p in points):  # one scatter per runtime: one legend entry each
            legend, marker, color = RUNTIMES.get(runtime, OTHER_RUNTIME)
            mine = [p for p in points if p[3] == runtime]
            ax.scatter([p[0] for p in mine], [p[1] for p in mine], marker=marker, color=color, label=legend)
        for i, (name, ppl) in enumerate(baselines.items()):
            ax.axhline(ppl, linestyle=":", color=f"C{i + 2}", label=name)
        _name_points(ax, [(x, y, name) for x, y, name, _ in points])
        ax.set_xlabel(label)
        ax.set_ylabel("test perplexity (lower is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    _save(fig, path)


def _name_points(ax, points: list[tuple[float, float, str]]) -> None:
    """Write each point's name beside it. Variants often sit on top of each other (a model and its ONNX export
    have the same size and perplexity), so points closer than a step share one label, and a label that would
    print over another (close in y, near in x) moves up, joined to its point by a thin line."""
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x_step = 0.01 * ((max(xs) - min(xs)) or abs(xs[0]) or 1.0)
    y_step = 0.045 * ((max(ys) - min(ys)) or abs(ys[0]) or 1.0)
    groups: list[tuple[float, float, list[str]]] = []
    for x, y, name in sorted(points):
        near = next((g for g in groups if abs(g[0] - x) <= x_step and abs(g[1] - y) <= y_step / 3), None)
        if near is None:
            groups.append((x, y, [name]))
        else:
            near[2].append(name)
    placed: list[tuple[float, float]] = []
    right = min(xs) + 0.65 * ((max(xs) - min(xs)) or 1.0)  # past here the label goes on the left
    for x, y, names in sorted(groups, key=lambda g: g[1]):
        label_y = y
        while any(abs(px - x) < 25 * x_step and abs(py - label_y) < y_step for px, py in placed):
            label_y += y_step
        placed.append((x, label_y))
        left = x > right and len(xs) > 1
        ax.annotate(
            ", ".join(names),
            (x, y),
            xytext=(x - x_step if left else x + x_step, label_y + y_step / 4),
            textcoords="data",
            ha="right" if left else "left",
            fontsize=7,
            arrowprops={"arrowstyle": "-", "lw": 0.4, "color": "0.6"} if label_y != y else None,
        )
    low, high = ax.get_ylim()
    ax.set_ylim(low, max(high, max(py for _, py in placed) + 2 * y_step))


def _loss_figure(path: Path, curves: dict[str, dict[str, Curve]]) -> None:
    """One panel per stage: its train (solid) and validation (dashed) losses, a colour per run of the stage."""
    from matplotlib.figure import Figure

    cols = min(3, len(curves))
    rows = math.ceil(len(curves) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.5 * rows), dpi=DPI, layout="constrained")
    panels = fig.subplots(rows, cols, squeeze=False).flat
    # curves first: zip stops at the last stage without taking the next panel, so the rest are the empty cells
    for (stage, stage_curves), ax in zip(curves.items(), panels, strict=False):
        runs = sorted({_run_of(label) for label in stage_curves})
        for label, (steps, values) in stage_curves.items():
            val = label.endswith(LOSS_CURVES[1])
            ax.plot(
                steps,
                values,
                color=f"C{runs.index(_run_of(label))}",
                linestyle="--" if val else "-",
                marker="." if val else None,
                linewidth=1.2,
                label=label,
            )
        ax.set_title(stage, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.set_ylabel("loss", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(panels):  # the grid's empty cells
        ax.set_visible(False)
    _save(fig, path)


def _save(fig, path: Path) -> None:
    from PIL import Image  # matplotlib's own image library

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    buffer.seek(0)
    with Image.open(buffer) as image:
        image.convert("RGB").quantize(colors=COLOURS).save(path, format="png", optimize=True)


def _run_of(label: str) -> str:
    """The run a curve belongs to (`student` of `student_val_loss`, `scratch/` of `scratch/train_loss`): its
    train and validation curves share a colour."""
    for suffix in LOSS_CURVES:
        if label.endswith(suffix):
            return label[: -len(suffix)]
    return label
