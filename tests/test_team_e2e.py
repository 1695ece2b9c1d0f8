"""End to end for a team: the tracking and registry on a real `mlflow server` backed by PostgreSQL with proxied
artifacts (tests/team_stack.py starts the stack as `make server` does)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from smoke_repo import STAGES, fill_pipeline_run, ran_stages, smoke_repo
from team_stack import TeamStack
from workspace import run

pytestmark = pytest.mark.slow


def psql(server, query: str) -> str:
    """`query`'s rows as psql prints them unaligned (`a|b` per line), read from the server's PostgreSQL store."""
    command = [str(server.postgres_bin / "psql"), "-At", server.backend_store_uri, "-c", query]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_server_keeps_runs_in_postgres_and_artifacts_in_its_folder(team_server, tmp_path):
    """A run, an artifact and a registered version with an alias through the server land in PostgreSQL (read
    back with psql, not through MLflow) and in the artifacts folder."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=team_server.uri, registry_uri=team_server.uri)
    experiment = client.create_experiment("stack-check")
    run = client.create_run(experiment, run_name="stack-check")
    client.log_metric(run.info.run_id, "loss", 0.5)
    (tmp_path / "note.txt").write_text("kept by the server\n")
    client.log_artifact(run.info.run_id, str(tmp_path / "note.txt"))
    client.set_terminated(run.info.run_id)
    client.create_registered_model("stack-check-model")
    source = f"runs:/{run.info.run_id}/note.txt"
    version = client.create_model_version("stack-check-model", source, run_id=run.info.run_id)
    client.set_registered_model_alias("stack-check-model", "champion", version.version)

    status = psql(team_server, f"select name, status from runs where run_uuid = '{run.info.run_id}'")
    assert status == "stack-check|FINISHED"
    aliases = "select alias, version from registered_model_aliases where name = 'stack-check-model'"
    assert psql(team_server, aliases) == "champion|1"
    stored = list(team_server.artifacts.rglob("note.txt"))
    assert len(stored) == 1 and stored[0].read_text() == "kept by the server\n"
    assert client.get_model_version_by_alias("stack-check-model", "champion").version == "1"


PIPELINE_ID = "team-smoke"
"""The pipeline id of the smoke run against the server (what `make train` sets as LMPIPE_PIPELINE_ID)."""


@dataclass
class SmokeRun:
    """The smoke pipeline run once against the team server: its repo, environment and `dvc repro` output."""

    path: Path
    env: dict
    output: str
    server: TeamStack


@pytest.fixture(scope="module")
def smoke_run(team_server, tmp_path_factory) -> SmokeRun:
    """`make train`'s two commands on the smoke experiment in a throw-away copy of the repo, with
    MLFLOW_TRACKING_URI at the team server (no embedded store anywhere)."""
    path, env = smoke_repo(tmp_path_factory.mktemp("team-e2e"))
    env["MLFLOW_TRACKING_URI"] = team_server.uri
    # A fresh model cache: `infer` downloads models:/lmpipe@champion through the server, not from a cache.
    env["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("team-cache"))
    output = run(["dvc", "repro"], path, {**env, "LMPIPE_PIPELINE_ID": PIPELINE_ID}, timeout=3600)
    assert ran_stages(output) == set(STAGES)
    assert "pipeline-run: FINISHED" in fill_pipeline_run(PIPELINE_ID, path, env)
    return SmokeRun(path, env, output, team_server)


def client(server: TeamStack):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=server.uri, registry_uri=server.uri)


def test_one_pipeline_run_with_a_child_per_stage_on_the_server(smoke_run):
    server = smoke_run.server
    mlflow = client(server)
    experiment = mlflow.get_experiment_by_name("lmpipe")
    runs = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`lmpipe.pipeline_id` = '{PIPELINE_ID}'"
    )
    parents = [r for r in runs if r.data.tags["lmpipe.kind"] == "pipeline"]
    children = [r for r in runs if r.data.tags["lmpipe.kind"] == "stage"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert sorted(r.data.tags["lmpipe.stage"] for r in children) == sorted(STAGES)
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parent.info.run_id}
    assert all(r.info.status == "FINISHED" for r in children)
    assert parent.data.params["optimizer.lr"] and "pretrain.val_loss" in parent.data.metrics
    # Stored in PostgreSQL and the server's artifact folder, nothing in an embedded store beside the repo.
    tagged = f"select count(*) from tags where key = 'lmpipe.pipeline_id' and value = '{PIPELINE_ID}'"
    assert psql(server, tagged) == str(len(runs))
    assert not (smoke_run.path / "mlruns.db").exists() and not (smoke_run.path / "mlartifacts").exists()
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    assert list(server.artifacts.rglob("report.md")), "the pipeline run's report card is on the server"


def test_registry_versions_aliases_and_the_gate_on_the_server(smoke_run):
    mlflow = client(smoke_run.server)
    register = json.loads((smoke_run.path / "metrics/register.json").read_text())
    params = yaml.safe_load((smoke_run.path / "params.yaml").read_text())["register"]
    versions = mlflow.search_model_versions("name = 'lmpipe'")
    by_variant = {v.tags["variant"]: v.version for v in versions}  # one version per variant, numbered from 1
    assert sorted(by_variant) == sorted(params["variants"]) and by_variant == register["versions"]
    assert sorted(int(v) for v in by_variant.values()) == list(range(1, len(params["variants"]) + 1))
    candidate = by_variant[params["candidate"]]
    model = mlflow.get_registered_model("lmpipe")
    assert model.aliases == {"candidate": candidate, "champion": candidate}
    # The gate: the first candidate becomes champion, and says why, in the version and the register run.
    decision = register["decision"]
    assert decision["promoted"] is True and decision["champion_before"] is None
    assert mlflow.get_model_version("lmpipe", candidate).tags["gate"] == "promoted"
    (register_run,) = mlflow.search_runs(
        [mlflow.get_experiment_by_name("lmpipe").experiment_id],
        filter_string=f"tags.`lmpipe.stage` = 'register' and tags.`lmpipe.pipeline_id` = '{PIPELINE_ID}'",
    )
    assert register_run.data.tags["lmpipe.gate.promoted"] == "true"
    assert register_run.data.tags["lmpipe.gate.reason"] == decision["reason"]
    classifier = mlflow.get_registered_model("lmpipe-classifier")
    assert classifier.aliases == {"champion": str(register["classifier"]["version"])}


def test_champion_loads_in_a_fresh_process_through_the_server(smoke_run, tmp_path):
    """Away from the repo (no store, no model files near), with an empty cache: `lmpipe generate` and MLflow's
    own pyfunc loader take models:/lmpipe@champion from the server."""
    env = smoke_run.env | {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    prompt = "Which book is this verse from?"
    run(
        [
            "lmpipe",
            "generate",
            "--model",
            "models:/lmpipe@champion",
            "--max-tokens",
            "5",
            "--seed",
            "1",
            prompt,
        ],
        tmp_path,
        env,
    )
    assert any((tmp_path / "cache" / "lmpipe" / "models" / "lmpipe").glob("*/MLmodel"))
    pyfunc = (
        "import mlflow, pandas as pd;"
        "m = mlflow.pyfunc.load_model('models:/lmpipe@champion');"
        f"out = m.predict(pd.DataFrame({{'prompt': [{prompt!r}]}}), params={{'max_tokens': 3}});"
        "print('completion tokens:', out['completion_tokens'].tolist())"
    )
    assert "completion tokens: [" in run([sys.executable, "-c", pyfunc], tmp_path, env)


def test_a_training_stage_whose_server_stops_fails_in_one_line_and_resumes_after(smoke_run, tmp_path):
    """The tracking server stopped in the middle of pretraining: the stage fails within 3 minutes with one line
    naming the server and what to do, leaves the previous good outputs as they were and keeps its checkpoints;
    run again once the server is back, it resumes from the checkpoint. Last in the module: it restarts the
    server (same port, database and artifacts)."""
    server = smoke_run.server
    out = tmp_path / "fault"
    previous = out / "models" / "pretrain"
    shutil.copytree(smoke_run.path / "models" / "pretrain", previous)  # a previous good output
    before = {f.name: f.read_bytes() for f in previous.iterdir()}
    command = [sys.executable, "pipelines/pretrain.py", "experiment=smoke", "trainer.max_steps=60"]
    command += [f"paths.{name}={out / name}" for name in ("models", "checkpoints", "metrics", "plots")]
    env = smoke_run.env | {"LMPIPE_PIPELINE_ID": "team-fault"}
    checkpoints = out / "checkpoints" / "pretrain"
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        proc = subprocess.Popen(
            command, cwd=smoke_run.path, env=env, stdout=subprocess.DEVNULL, stderr=stderr
        )
        while not list(checkpoints.glob("step*.ckpt")):  # the first checkpoint (every 10 steps in smoke)
            assert proc.poll() is None, f"pretrain ended before its first checkpoint:\n{stderr_text(stderr)}"
            time.sleep(0.1)
        server.stop_mlflow()
        stopped = time.monotonic()
        returncode = proc.wait(timeout=600)
        seconds = time.monotonic() - stopped
        errors = [line for line in stderr_text(stderr).splitlines() if "error" in line.lower()]
    print(f"\npretrain failed {seconds:.1f} s after its tracking server stopped")
    assert returncode == 2 and seconds < 180, (returncode, seconds)
    assert len(errors) == 1, errors  # one line, no traceback
    assert errors[0].startswith(f"pretrain: error: tracking server {server.uri} stopped answering")
    assert "start the server again" in errors[0] and "resumes from the last checkpoint" in errors[0]
    assert {f.name: f.read_bytes() for f in previous.iterdir()} == before
    assert not (out / "metrics" / "pretrain.json").exists()
    kept = sorted(checkpoints.glob("step*.ckpt"))
    assert kept

    server.start_mlflow()
    rerun = run(command, smoke_run.path, env)
    assert f"pretrain: resuming from {checkpoints}" in rerun
    metrics = json.loads((out / "metrics" / "pretrain.json").read_text())
    assert metrics["resumed"] is True and metrics["steps"] == 60
    runs = client(server).search_runs(
        [client(server).get_experiment_by_name("lmpipe").experiment_id],
        filter_string="tags.`lmpipe.pipeline_id` = 'team-fault' and tags.`lmpipe.kind` = 'stage'",
        order_by=["attributes.start_time ASC"],
    )
    # The run the lost server never heard end is marked FAILED by the re-run, which finished.
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]


def stderr_text(stderr) -> str:
    stderr.flush()
    stderr.seek(0)
    return stderr.read()
