"""lmpipe.exp_compare and pipeline_run.stale_stages against a real DVC repository with two experiments."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmpipe import exp_compare, pipeline_run

# One stage writing pretrain.json (a headline file) and a loss curve (a DVC plot), both scaled by the lr.
DVC_YAML = """\
stages:
  pretrain:
    cmd: python pretrain.py
    deps: [pretrain.py]
    params: [optimizer, seed]
    outs:
      - plots/pretrain
    metrics:
      - metrics/pretrain.json:
          cache: false
plots:
  - plots/pretrain/val_loss.csv:
      x: step
      y: loss
"""
SCRIPT = """\
import json, os, yaml
lr = yaml.safe_load(open("params.yaml"))["optimizer"]["lr"]
os.makedirs("plots/pretrain", exist_ok=True)
open("plots/pretrain/val_loss.csv", "w").write(f"step,loss\\n1,{4 - lr}\\n2,{3 - lr}\\n")
metrics = {"val_loss": 3 - lr, "tokens_per_sec": 2600.0, "fit": {"verdict": "underfitting"}}
json.dump(metrics, open("metrics/pretrain.json", "w"))
"""
PARAMS = "paths:\n  metrics: metrics\n  tokens: tokens\noptimizer:\n  lr: 0.001\nseed: 1\n"


def sh(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory):
    """A git + DVC repository: the baseline commit (lr 0.001) and experiments lr2 (0.002), then lr3."""
    repo = tmp_path_factory.mktemp("dvc") / "repo"
    repo.mkdir()
    mp = pytest.MonkeyPatch()
    mp.chdir(repo)
    mp.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    mp.setenv("DVC_NO_ANALYTICS", "1")
    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        mp.setenv(var, "test@example.invalid" if "EMAIL" in var else "test")
    (repo / "metrics").mkdir()
    (repo / "params.yaml").write_text(PARAMS, encoding="utf-8")
    (repo / "dvc.yaml").write_text(DVC_YAML, encoding="utf-8")
    (repo / "pretrain.py").write_text(SCRIPT, encoding="utf-8")
    sh("git", "init", "-q", "-b", "main")
    sh("dvc", "init", "-q")
    sh("dvc", "repro", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "baseline")
    sh("dvc", "exp", "run", "-q", "-n", "lr2", "-S", "optimizer.lr=0.002")
    sh("dvc", "exp", "run", "-q", "-n", "lr3", "-S", "optimizer.lr=0.003")
    yield repo
    mp.undo()


def test_columns_and_table_of_the_experiments(dvc_repo):
    cols = exp_compare.columns(exp_compare.exp_show(), {"metrics": "metrics", "tokens": "tokens"})
    assert [(c.name, c.experiment) for c in cols] == [("main", False), ("lr3", True), ("lr2", True)]
    assert [c.figures["pretrain.val_loss"] for c in cols] == pytest.approx([2.999, 2.997, 2.998])
    assert [c.params["optimizer.lr"] for c in cols] == [0.001, 0.003, 0.002]

    text = exp_compare.table(cols)
    lines = text.splitlines()
    assert lines[0] == "| | main | lr3 | lr2 |"
    assert "| **optimizer.lr** | 0.001 | 0.003 | 0.002 |" in lines
    assert "| pretrain.val_loss | 2.999 | 2.997 | 2.998 |" in lines
    assert "| pretrain.tokens_per_sec | 2600 | 2600 | 2600 |" in lines
    assert not any("seed" in line or "verdict" in line for line in lines)  # unchanged param, not a headline
    only = exp_compare.table(cols, only_changed=True)
    assert "pretrain.val_loss" in only and "tokens_per_sec" not in only
    assert exp_compare.newest_experiments(cols) == ["lr3", "lr2"]


def test_make_compare_prints_the_table_and_writes_the_plots_of_the_two_newest(dvc_repo, capsys):
    assert exp_compare.main(["--plots", "compare"]) == 0
    out = capsys.readouterr().out
    assert "| **optimizer.lr** | 0.001 | 0.003 | 0.002 |" in out
    assert "compare: compare/index.html (lr2 against lr3)" in out
    assert "failed to load" not in out  # the plots are cached outputs: each experiment keeps its own
    html = (dvc_repo / "compare/index.html").read_text(encoding="utf-8")
    assert "plots/pretrain/val_loss.csv" in html and "lr2" in html and "lr3" in html


def test_a_failing_dvc_is_one_line(dvc_repo, capsys):
    assert exp_compare.main(["--rev", "no-such-rev"]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err.startswith("compare: error: 'dvc exp show --json --rev no-such-rev' failed") and "\n" not in err
    )


def test_stale_stages_are_what_dvc_status_lists(dvc_repo):
    assert pipeline_run.stale_stages() == set()  # the workspace holds the last experiment, up to date
    params = dvc_repo / "params.yaml"
    text = params.read_text(encoding="utf-8")
    try:
        params.write_text(text.replace("lr: 0.003", "lr: 0.004"), encoding="utf-8")
        assert pipeline_run.stale_stages() == {"pretrain"}
    finally:
        params.write_text(text, encoding="utf-8")


def test_no_dvc_repository_is_no_stale_stages(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    assert pipeline_run.stale_stages() is None
