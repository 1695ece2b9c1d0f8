"""End to end: the real pipeline (DVC, Hydra, Great Expectations, Lightning, MLflow) on the smoke experiment,
in a throw-away git copy of this repository, exactly as a user would run it."""

from __future__ import annotations

import json
import math
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import dvc_graph
import pytest
from browser import serve_cdn_scripts
from live_server import mlflow_ui
from playwright.sync_api import expect
from readme_commands import readme_commands
from smoke_repo import STAGES, fill_pipeline_run, ran_stages, run, smoke_repo

from lmpipe import tracking

AFTER_PRETRAIN = set(STAGES[STAGES.index("pretrain") :])
REPRO_ID = "e2e-repro"
"""The pipeline id of the smoke run's `dvc repro` (what `make train` sets as LMPIPE_PIPELINE_ID)."""
EXP_NAME = "e2e-lr2"
"""The `dvc exp run` with optimizer.lr=0.002: its experiment name and pipeline id (as `make exp` names both)."""
pytestmark = pytest.mark.slow


def dvc_status(path: Path, env: dict) -> dict:
    proc = subprocess.run(["dvc", "status", "--json"], cwd=path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """A git repo holding this working tree's files (tracked and new, not ignored) with smoke params."""
    return smoke_repo(tmp_path_factory.mktemp("e2e"))


def test_repro_runs_every_stage_and_writes_metrics(repo):
    path, env = repo
    output = run(["dvc", "repro"], path, {**env, "LMPIPE_PIPELINE_ID": REPRO_ID})  # as `make train` runs it
    assert ran_stages(output) == set(STAGES)
    assert "pipeline-run: FINISHED" in fill_pipeline_run(REPRO_ID, path, env)

    report = json.loads((path / "metrics/evaluate.json").read_text())
    rows = report["lm"]
    variants = {
        "pretrained",
        "sft-full",
        "student",
        "onnx-teacher",
        "onnx-teacher-int8",
        "onnx-teacher-pruned",
        "onnx-student",
        "onnx-student-int8",
        "onnx-student-nodistill",
        "onnx-dpo",
        "onnx-rl",
    }
    assert set(rows) == variants | {next(k for k in rows if k.startswith("kneser-ney"))}
    vocab = json.loads((path / "data/tokens/meta.json").read_text())["vocab_size"]
    for row in rows.values():
        assert math.isfinite(row["test_ppl"]) and 1 < row["test_ppl"]
        assert row["test_bpb"] > 0
    kn = next(v for k, v in rows.items() if k.startswith("kneser-ney"))
    assert kn["test_ppl"] < vocab / 4, "the n-gram baseline should be far better than uniform"
    pretrain = json.loads((path / "metrics/pretrain.json").read_text())
    assert pretrain["steps"] == 30 and pretrain["world_size"] == 1
    tasks = report["tasks"]
    encoders = {"encoder-pretrained-full", "encoder-scratch-full", "encoder-pretrained-distill"}
    assert set(tasks) == variants | encoders | {"tf-idf + logistic regression"}
    assert set(report["encoders"]) == encoders
    for name in encoders:
        assert set(tasks[name]) == {"testament", "book"} and 0 <= tasks[name]["book"]["f1_macro"] <= 1
    for name in variants:
        assert set(tasks[name]) == {"testament", "book", "continue", "mc"}
        assert 0 <= tasks[name]["testament"]["accuracy"] <= 1
        assert tasks[name]["mc"]["n"] == 20 - report["skipped_too_long"].get("mc", 0) > 10
    assert (path / "plots/confusion/book.csv").read_text().startswith("actual,predicted\n")
    assert set(report["variants"]) == variants
    steps = report["post_training"]  # the alignment tax: sft, dpo and rl exports side by side
    # evaluate.json is written with sorted keys; the report keeps the steps' order (checked below).
    assert set(steps) == {"pretrained", "sft", "dpo", "rl"} and steps["rl"]["variant"] == "onnx-rl"
    assert steps["dpo"]["ppl_ratio_vs_sft"] == steps["dpo"]["test_ppl"] / steps["sft"]["test_ppl"]
    evaluate_md = (path / "metrics/evaluate.md").read_text()
    assert "# Post-training steps: the alignment tax" in evaluate_md
    tax = evaluate_md.split("# Post-training steps: the alignment tax")[1]
    assert tax.index("| sft |") < tax.index("| dpo |") < tax.index("| rl |")
    for row in report["variants"].values():
        assert row["decode_tok_s_b1"] > 0 and row["prefill_ms_p95"] >= row["prefill_ms_p50"] > 0
    card = (path / "metrics/report.md").read_text()  # the report card: every variant, every figure it links
    assert all(name in card for name in variants) and "Stages drawn: pretrain, sft, distill" in card
    figures = [line.split("](")[1].rstrip(")") for line in card.splitlines() if line.startswith("![")]
    assert len(figures) == 3
    assert all((path / "metrics" / f).read_bytes().startswith(b"\x89PNG") for f in figures)
    register = json.loads((path / "metrics/register.json").read_text())
    assert "champion" in register["aliases"] and register["decision"]["promoted"] is True
    generations = [json.loads(line) for line in (path / "data/generations.jsonl").read_text().splitlines()]
    assert len(generations) == 20 and all(g["finish_reason"] in ("stop", "length") for g in generations)
    validation = json.loads((path / "metrics/data_validation.json").read_text())
    assert validation["success"] is True
    assert (path / "plots/pretrain/val_loss.csv").read_text().startswith("step,loss\n")

    # One MLflow run per stage, all children of one pipeline run.
    with sqlite3.connect(path / "mlruns.db") as db:
        stages = dict(db.execute("select run_uuid, value from tags where key = 'lmpipe.stage'").fetchall())
        parents = {
            value
            for run_id, value in db.execute(
                "select run_uuid, value from tags where key = 'mlflow.parentRunId'"
            )
            if run_id in stages
        }
    assert sorted(stages.values()) == sorted(STAGES)
    assert len(parents) == 1


def test_second_repro_runs_nothing(repo):
    path, env = repo
    output = run(["dvc", "repro"], path, env)
    assert ran_stages(output) == set()
    assert "up to date" in run(["dvc", "status"], path, env).lower()


def test_exp_run_reruns_only_affected_stages(repo):
    path, env = repo
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "smoke results"], path, env)
    before = json.loads((path / "metrics/evaluate.json").read_text())["lm"]["pretrained"]["test_ppl"]
    exp_env = {**env, "LMPIPE_PIPELINE_ID": EXP_NAME}  # as `make exp EXP=e2e-lr2` runs it
    output = run(
        ["dvc", "exp", "run", "-n", EXP_NAME, "-S", "experiment=smoke", "-S", "optimizer.lr=0.002"],
        path,
        exp_env,
    )
    assert ran_stages(output) == AFTER_PRETRAIN
    assert "pipeline-run: FINISHED" in fill_pipeline_run(EXP_NAME, path, {**env, "DVC_EXP_NAME": EXP_NAME})
    # dvc exp run applies the experiment to the workspace: the new params and metrics are there.
    assert "lr: 0.002" in (path / "params.yaml").read_text()
    assert json.loads((path / "metrics/evaluate.json").read_text())["lm"]["pretrained"]["test_ppl"] != before
    diff = run(["dvc", "metrics", "diff", "--json"], path, env)
    assert "evaluate.json" in diff


def pipeline_runs(db: Path) -> dict[str, tuple[str, str]]:
    """The pipeline runs in the store `db`: pipeline id -> (run id, experiment id)."""
    with sqlite3.connect(db) as store:
        rows = store.execute(
            "select pid.value, runs.run_uuid, runs.experiment_id from runs"
            " join tags pid on pid.run_uuid = runs.run_uuid and pid.key = 'lmpipe.pipeline_id'"
            " join tags kind on kind.run_uuid = runs.run_uuid and kind.key = 'lmpipe.kind'"
            " where kind.value = 'pipeline'"
        ).fetchall()
    return {pid: (run_id, str(experiment)) for pid, run_id, experiment in rows}


def run_data(db: Path, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """(params, latest metrics) of a run in the store `db`."""
    with sqlite3.connect(db) as store:
        params = dict(store.execute("select key, value from params where run_uuid = ?", (run_id,)))
        metrics = dict(store.execute("select key, value from latest_metrics where run_uuid = ?", (run_id,)))
    return params, metrics


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Where the browser test leaves its screenshots: $LMPIPE_SCREENSHOTS, else a pytest temporary folder."""
    folder = Path(os.environ.get("LMPIPE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots of the browser test: {folder}")
    return folder


METRIC_ROW_PX = 45
"""The height of a row of the compare page's metrics table (MLflow 3.17: a virtualized grid, 300 px high)."""
METRIC_CELLS_JS = """key => {
    const row = key.closest('[style*="top"]');
    const grids = row.closest('.ReactVirtualized__Grid').parentElement.parentElement
        .querySelectorAll('.ReactVirtualized__Grid');
    return [...grids[grids.length - 1].querySelectorAll('.ReactVirtualized__Grid__innerScrollContainer > div')]
        .filter(cell => cell.style.top === row.style.top)
        .sort((a, b) => parseFloat(a.style.left) - parseFloat(b.style.left))
        .map(cell => cell.textContent.trim());
}"""
"""The values beside a metric's name in the compare page's metrics table, one per run, left to right: the names
and the values are two grids whose cells share their row's `top`."""


def shown_metric(page, name: str, keys: list[str]) -> list[str]:
    """The values the compare page's metrics table shows for the metric `name`, run by run: the table lists the
    runs' metric `keys` sorted and draws only the rows in view, so it is scrolled to that row first."""
    values = page.locator(".ReactVirtualized__Grid").last
    values.hover()  # wheel over the values: the names' grid follows only real scroll events, one event late
    distance, step = sorted(keys).index(name) * METRIC_ROW_PX - values.evaluate("g => g.scrollTop"), 135
    while distance:
        delta = max(-step, min(step, distance))
        page.mouse.wheel(0, delta)
        distance -= delta
        page.wait_for_timeout(50)
    for nudge in (-1, 1):  # brings the names to where the values were (also at the table's end)
        page.mouse.wheel(0, nudge)
        page.wait_for_timeout(50)
    key = page.get_by_role("link", name=name, exact=True)
    expect(key).to_be_visible()
    return key.evaluate(METRIC_CELLS_JS)


HEADLINES = ("evaluate.pretrained.test_ppl", "pretrain.val_loss")
"""Headline metrics of the pipeline run that the learning rate changes, checked on the compare page."""


def check_mlflow_compare_page(page, db: Path, env: dict, pids: tuple[str, str], screenshots: Path) -> None:
    """In the MLflow UI over the store `db`: the README's clicks from `make ui`'s runs table to the compare page
    of the pipeline runs `pids`, where the parameter table shows both learning rates and the metrics table the
    HEADLINES with the values the runs hold, different for the two."""
    runs = pipeline_runs(db)
    (first, experiment), (second, _) = runs[pids[0]], runs[pids[1]]
    (params_a, metrics_a), (params_b, metrics_b) = run_data(db, first), run_data(db, second)
    assert params_a["optimizer.lr"] != params_b["optimizer.lr"]
    assert all(metrics_a[name] != metrics_b[name] for name in HEADLINES)
    page.set_viewport_size({"width": 1400, "height": 1000})
    with mlflow_ui(db, screenshots / "mlflow-ui.log", env) as ui:
        # README, Tracking: open the runs table `make ui` prints, tick the two pipeline runs, press Compare.
        page.goto(tracking.runs_url(experiment, ui.base))
        for pid in pids:
            row = page.get_by_role("row").filter(has_text=f"pipeline {pid}")
            row.get_by_role("checkbox").first.check(timeout=120_000)
        page.screenshot(path=screenshots / "mlflow-runs-table.png")
        page.get_by_test_id("runs-compare-button").click()
        expect(page.get_by_text("Comparing 2 Runs from 1 Experiment")).to_be_visible(timeout=60_000)
        assert "compare-runs" in page.url

        page.get_by_role("switch", name="Parameters - Show diff only").click()
        lr_row = page.get_by_role("row").filter(
            has=page.get_by_role("rowheader", name="optimizer.lr", exact=True)
        )
        expect(lr_row.get_by_role("cell")).to_have_text([params_a["optimizer.lr"], params_b["optimizer.lr"]])
        lr_row.scroll_into_view_if_needed()
        page.screenshot(path=screenshots / "mlflow-compare-params.png")

        keys = sorted(set(metrics_a) | set(metrics_b))
        for name in HEADLINES:
            shown = shown_metric(page, name, keys)
            assert len(shown) == 2 and shown[0] != shown[1], f"{name}: {shown}"
            for text, value in zip(shown, (metrics_a[name], metrics_b[name]), strict=True):
                assert math.isclose(float(text), value, rel_tol=1e-3, abs_tol=1e-3), (
                    f"{name}: {text} != {value}"
                )
        # The README's picture: from the run details (the runs' names) to the metrics table's end.
        page.get_by_role("button", name="Run details", exact=True).evaluate(
            "e => e.scrollIntoView({block: 'start'})"
        )
        top = page.get_by_role("button", name="Run details", exact=True).bounding_box()
        bottom = page.locator(".ReactVirtualized__Grid").last.bounding_box()
        height = bottom["y"] + bottom["height"] + 8 - top["y"]
        page.screenshot(
            path=screenshots / "mlflow-compare-tables.png", clip={**top, "height": height, "width": 760}
        )
        page.screenshot(path=screenshots / "mlflow-compare.png", full_page=True)


def test_the_two_pipeline_runs_compare_in_a_browser(repo, chromium_page, screenshots, tmp_path):
    """The comparison a user is promised, in headless Chromium, of the two pipeline runs above (`dvc repro`, and
    `dvc exp run` with optimizer.lr=0.002, each filled by lmpipe.pipeline_run): the MLflow compare page shows
    both learning rates and the headline metrics' different values (`check_mlflow_compare_page`), and the HTML
    of `dvc plots diff` between them draws every plot."""
    path, env = repo
    page = chromium_page
    db = path / "mlruns.db"
    assert float(run_data(db, pipeline_runs(db)[EXP_NAME][0])[0]["optimizer.lr"]) == 0.002
    check_mlflow_compare_page(page, db, env, (REPRO_ID, EXP_NAME), screenshots)

    # DVC's side: `dvc plots diff` of the commit and the experiment draws every plot of dvc.yaml, both revisions.
    out = tmp_path / "plots-diff"
    run(["dvc", "plots", "diff", "HEAD", EXP_NAME, "-o", str(out)], path, env)
    html = (out / "index.html").read_text()
    for title in (
        "Pretraining loss",
        "Distillation loss (GPT students)",
        "Confusion (book, fine-tuned model)",
    ):
        assert title in html
    assert EXP_NAME in html  # the experiment's data beside the commit's
    assert serve_cdn_scripts(page, html, tmp_path), "dvc plots diff loads vega from jsdelivr"
    errors = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto((out / "index.html").as_uri())
    plots = html.count("vegaEmbed(")
    expect(page.locator(".vega-embed .marks")).to_have_count(plots, timeout=60_000)  # a canvas each
    page.screenshot(path=screenshots / "dvc-plots-diff.png", full_page=True)
    assert plots >= 10 and not errors, errors


@pytest.mark.parametrize("module", ["src/lmpipe/chat.py", "src/lmpipe/model.py", "src/lmpipe/tracking.py"])
def test_editing_a_module_changes_exactly_the_stages_that_run_it(repo, module):
    path, env = repo
    stages = dvc_graph.dvc_stages(path)
    runs_it = {name for name, s in stages.items() if module in dvc_graph.code_files(s.script, s.sections)}
    assert dvc_graph.stages_running(module, stages) == runs_it  # what dvc.yaml declares is what the code runs
    assert dvc_status(path, env) == {}  # the finished run is up to date
    source = path / module
    text = source.read_text(encoding="utf-8")
    try:
        source.write_text(text + "# edited\n", encoding="utf-8")
        status = dvc_status(path, env)
        assert set(status) == runs_it
        assert all({"changed deps": {module: "modified"}} in status[name] for name in runs_it)
    finally:
        source.write_text(text, encoding="utf-8")
    assert dvc_status(path, env) == {}


def test_readme_commands_run_on_the_smoke_run(repo):
    # Last: the README's pretraining command overwrites the smoke run's pretrained model.
    path, env = repo
    venv_bin = f"{Path(sys.executable).parent}/"
    for command in readme_commands():
        if command.skipped:
            continue
        if command.language == "python":
            run([sys.executable, "-c", command.text], path, env)
        else:
            run(["bash", "-c", command.text.replace(".venv/bin/", venv_bin)], path, env)
