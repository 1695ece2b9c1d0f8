import json
import os
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient
from workspace import run, workspace_copy

from lmpipe import sweep
from lmpipe.errors import LmpipeError


def test_the_grid_is_hydra_multirun_order_with_fixed_overrides_apart():
    fixed, points = sweep.grid(
        ["experiment=smoke", "optimizer.lr=0.001,0.003", "trainer.max_steps=range(10,30,10)"]
    )
    assert fixed == ["experiment=smoke"]
    assert points == [
        ["optimizer.lr=0.001", "trainer.max_steps=10"],
        ["optimizer.lr=0.001", "trainer.max_steps=20"],
        ["optimizer.lr=0.003", "trainer.max_steps=10"],
        ["optimizer.lr=0.003", "trainer.max_steps=20"],
    ]
    assert sweep.grid(["model.n_layer=choice(1,2)"])[1] == [["model.n_layer=1"], ["model.n_layer=2"]]
    assert sweep.grid(["seed=3"]) == (["seed=3"], [[]])  # no sweep: one trial


def test_bad_sweep_input_is_one_line(tmp_path):
    with pytest.raises(LmpipeError, match=r"^sweep overrides: .*optimizer\.lr=\(1"):
        sweep.grid(["optimizer.lr=(1,"])
    with pytest.raises(LmpipeError, match=r"stage 'pretrian': not a stage; expected one of .*pretrain"):
        sweep.run_sweep("pretrian", ["seed=1"], "s", tmp_path)
    (tmp_path / "taken").mkdir()
    with pytest.raises(LmpipeError, match=r"taken exists: name the sweep anew"):
        sweep.run_sweep("pretrain", ["seed=1"], "taken", tmp_path)


def test_metric_lookup_ranking_and_table(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"val_loss": 3.5, "fit": {"final_val_loss": 3.25, "verdict": "x"}}))
    assert sweep.metric_value(path, "val_loss") == 3.5
    assert sweep.metric_value(path, "fit.final_val_loss") == 3.25
    assert sweep.metric_value(path, "fit.verdict") is None and sweep.metric_value(path, "nope") is None
    assert sweep.metric_value(tmp_path / "missing.json", "val_loss") is None

    trials = [
        sweep.Trial(0, ["a=1"], 0, 3.0, 1.0),
        sweep.Trial(1, ["a=2"], 0, 2.0, 1.0),
        sweep.Trial(2, ["a=3"], 1, None, 1.0),
    ]
    assert sweep.best(trials, "min").number == 1 and sweep.best(trials, "max").number == 0
    rows = sweep.table(trials, "val_loss", "min").splitlines()
    assert rows[3] == "| 1 | a=2 | 2.0000 | 1 | best |"
    assert rows[4] == "| 2 | a=3 | failed | 1 |  |"


@pytest.mark.slow
def test_a_sweep_runs_every_trial_apart_and_groups_them_in_mlflow(tiny_overrides, tmp_path, conf_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LMPIPE_", "DVC_"))}
    env["OMP_NUM_THREADS"] = "1"
    overrides = [
        *tiny_overrides(),
        "model.block_size=64",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
    ]
    command = [
        sys.executable,
        "-m",
        "lmpipe.sweep",
        "pretrain",
        "--name",
        "lr-grid",
        "--out",
        str(tmp_path / "sw"),
    ]
    proc = subprocess.run(
        [*command, *overrides, "optimizer.lr=0.001,0.01"],
        cwd=conf_dir.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]

    summary = json.loads((tmp_path / "sw" / "lr-grid" / "summary.json").read_text())
    assert [t["overrides"] for t in summary["trials"]] == [["optimizer.lr=0.001"], ["optimizer.lr=0.01"]]
    losses = [t["metric"] for t in summary["trials"]]
    assert all(t["exit_code"] == 0 for t in summary["trials"]) and losses[0] != losses[1]
    assert summary["best"] == losses.index(min(losses))
    for n in (0, 1):  # each trial wrote its own outputs, none into the shared ones
        assert (tmp_path / "sw" / "lr-grid" / str(n) / "models" / "pretrain" / "model.pt").is_file()
    assert not (tmp_path / "models").exists()
    assert "| 0 | optimizer.lr=0.001 |" in proc.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
    (parent,) = [r for r in runs if r.info.run_name == "pipeline lr-grid"]
    children = sorted((r for r in runs if r is not parent), key=lambda r: r.info.run_name)
    assert [r.info.run_name for r in children] == [
        "pretrain [optimizer.lr=0.001]",
        "pretrain [optimizer.lr=0.01]",
    ]
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children)
    assert [r.data.params["optimizer.lr"] for r in children] == ["0.001", "0.01"]
    assert [r.data.tags["lmpipe.trial"] for r in children] == ["optimizer.lr=0.001", "optimizer.lr=0.01"]


def queue_finished(path, env) -> bool:
    """Whether `dvc queue status` lists no experiment still queued or running."""
    proc = subprocess.run(["dvc", "queue", "status"], cwd=path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return not any(word in proc.stdout for word in ("Queued", "Running"))


@pytest.mark.slow
def test_queued_dvc_experiments_run_two_at_a_time_into_the_workspace_store(tmp_path):
    path, env = workspace_copy(tmp_path / "lmpipe")
    run(["lmpipe", "params", "experiment=smoke"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "smoke"], path, env)
    # The store and its experiment exist before two workers start (as `make queue` sees to): two processes
    # creating one sqlite schema at once would collide.
    run(["python", "-m", "lmpipe.tracking"], path, env)

    sweep_args = ["-S", "experiment=smoke", "-S", "trainer.max_steps=4", "-S", "optimizer.lr=0.001,0.01"]
    run(["dvc", "exp", "run", "--queue", "pretrain", *sweep_args], path, env)
    try:
        run(["dvc", "queue", "start", "-j", "2"], path, env)
        deadline = time.monotonic() + 480
        while not queue_finished(path, env):
            assert time.monotonic() < deadline, run(["dvc", "queue", "status"], path, env)
            time.sleep(3)
    finally:
        subprocess.run(["dvc", "queue", "stop"], cwd=path, env=env, capture_output=True)
    status = run(["dvc", "queue", "status"], path, env)
    assert status.count("Success") == 2, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], path, env))
    exps = {
        exp["name"]: exp["revs"][0]["data"] for baseline in shown for exp in baseline.get("experiments") or []
    }
    assert len(exps) == 2, exps
    lrs = sorted(data["params"]["params.yaml"]["data"]["optimizer"]["lr"] for data in exps.values())
    assert lrs == [0.001, 0.01]

    # Both experiments' runs are in the workspace's store, none in a temporary copy's.
    client = MlflowClient(f"sqlite:///{path / 'mlruns.db'}")
    runs = client.search_runs([client.get_experiment_by_name("lmpipe").experiment_id])
    stages = [r for r in runs if r.data.tags.get("lmpipe.kind") == "stage"]
    pretrains = {
        r.data.tags["lmpipe.dvc_exp"]: r for r in stages if r.data.tags["lmpipe.stage"] == "pretrain"
    }
    assert set(pretrains) == set(exps)
    assert all(r.info.status == "FINISHED" for r in stages)
    assert sorted(float(r.data.params["optimizer.lr"]) for r in pretrains.values()) == lrs
    assert not list((path / ".dvc" / "tmp").rglob("mlruns.db"))
