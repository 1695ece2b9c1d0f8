"""End to end: the real pipeline (DVC, Hydra, Great Expectations, Lightning, MLflow) on the smoke experiment,
in a throw-away git copy of this repository, exactly as a user would run it."""

from __future__ import annotations

import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import dvc_graph
import pytest
from readme_commands import readme_commands

ROOT = Path(__file__).resolve().parents[1]
STAGES = (
    "prepare",
    "tokenize",
    "instructions",
    "pretrain",
    "sft",
    "encoder_mlm",
    "encoder_finetune",
    "encoder_distill",
    "distill",
    "preferences",
    "reward",
    "dpo",
    "rl",
    "export",
    "quantize",
    "evaluate",
    "register",
    "infer",
)
AFTER_PRETRAIN = set(STAGES[STAGES.index("pretrain") :])
pytestmark = pytest.mark.slow


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def dvc_status(path: Path, env: dict) -> dict:
    proc = subprocess.run(["dvc", "status", "--json"], cwd=path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def ran_stages(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict]:
    """A git repo holding this working tree's files (tracked and new, not ignored) with smoke params."""
    repo = tmp_path_factory.mktemp("e2e") / "lmpipe"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, repo / name)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_", "DVC_EXP"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        DVC_NO_ANALYTICS="1",
        GIT_AUTHOR_NAME="e2e",
        GIT_AUTHOR_EMAIL="e2e@example.invalid",
        GIT_COMMITTER_NAME="e2e",
        GIT_COMMITTER_EMAIL="e2e@example.invalid",
    )
    run(["git", "init", "-q", "-b", "main"], repo, env)
    run(["lmpipe", "params", "experiment=smoke"], repo, env)
    run(["git", "add", "-A"], repo, env)
    run(["git", "commit", "-qm", "smoke"], repo, env)
    return repo, env


def test_repro_runs_every_stage_and_writes_metrics(repo):
    path, env = repo
    output = run(["dvc", "repro"], path, env)
    assert ran_stages(output) == set(STAGES)

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
    output = run(["dvc", "exp", "run", "-S", "experiment=smoke", "-S", "optimizer.lr=0.002"], path, env)
    assert ran_stages(output) == AFTER_PRETRAIN
    # dvc exp run applies the experiment to the workspace: the new params and metrics are there.
    assert "lr: 0.002" in (path / "params.yaml").read_text()
    assert json.loads((path / "metrics/evaluate.json").read_text())["lm"]["pretrained"]["test_ppl"] != before
    diff = run(["dvc", "metrics", "diff", "--json"], path, env)
    assert "evaluate.json" in diff


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
