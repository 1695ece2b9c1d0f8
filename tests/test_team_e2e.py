"""End to end for a team: the tracking and registry on a real `mlflow server` backed by PostgreSQL with proxied
artifacts (tests/team_stack.py starts the stack as `make server` does)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from http_remote import refusing_remote
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


# --- What a clone needs, and the retraining job (scripts/retrain.py), on the same smoke run ----------------------

RETRAIN_ID = "team-retrain"
"""The pipeline id of the retraining job's run against the server."""
RETRAIN_POLICY = {
    "variants": ["teacher-int8", "student-int8"],
    "candidate": "student-int8",
    "metric": "variants.parameters",
    "higher_is_better": False,
}
"""The changed parameters of the retrain: a late stage's (register, then infer), so only those two run; the
smaller student beats the teacher champion on parameters, so the gate's decision is known: promoted."""


@dataclass
class Clone:
    """A fresh `git clone` of the smoke run after it was pushed to a folder remote, `dvc pull`ed."""

    path: Path
    env: dict
    remote: Path
    server: TeamStack


@pytest.fixture(scope="module")
def clone(smoke_run, tmp_path_factory) -> Clone:
    """The smoke run's results committed with a folder remote as the default (.dvc/config, as a team commits it)
    and pushed; then a fresh clone of that repository that ran `dvc pull`, as a teammate or CI starts."""
    path, env = smoke_run.path, smoke_run.env
    remote = tmp_path_factory.mktemp("dvc-remote")
    run(["dvc", "remote", "add", "-d", "storage", str(remote)], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "smoke results and the team's DVC remote"], path, env)
    run(["dvc", "push"], path, env)
    clone = tmp_path_factory.mktemp("clone") / "lmpipe"
    run(["git", "clone", "-q", str(path), str(clone)], path.parent, env)
    run(["dvc", "pull"], clone, env)
    return Clone(clone, env, remote, smoke_run.server)


def dvc_json(args: list[str], path: Path, env: dict) -> dict:
    proc = subprocess.run(["dvc", *args, "--json"], cwd=path, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    return json.loads(proc.stdout)


def test_a_fresh_clone_pulls_every_output_and_reproduces_nothing(clone, smoke_run):
    assert not (clone.path / "checkpoints").exists()  # no stage's out: a clone does without them
    output = run(["dvc", "repro"], clone.path, clone.env)
    assert ran_stages(output) == set(), output[-2000:]
    assert dvc_json(["status"], clone.path, clone.env) == {}
    assert dvc_json(["status", "-c"], clone.path, clone.env) == {}  # cache and remote in sync
    for out in (
        "models/pretrain/model.pt",
        "models/onnx/teacher-int8/model.onnx",
        "plots/pretrain/val_loss.csv",
    ):
        assert (clone.path / out).read_bytes() == (smoke_run.path / out).read_bytes(), out


def retrain_job(clone: Clone, summary: Path, **env: str) -> subprocess.CompletedProcess:
    """What `make retrain ARGS="--summary ..."` runs (make itself would set up a .venv in the clone)."""
    return subprocess.run(
        [sys.executable, "scripts/retrain.py", "--summary", str(summary)],
        cwd=clone.path,
        env=clone.env | env,
        capture_output=True,
        text=True,
        timeout=1200,
    )


def registry_state(registry) -> tuple[dict, set[str]]:
    """Every version of every registered model ((name, version) -> run id), and every run id, on the server."""
    from mlflow.entities import ViewType

    versions = {
        (v.name, v.version): v.run_id
        for model in registry.search_registered_models()
        for v in registry.search_model_versions(f"name = '{model.name}'")
    }
    experiments = [e.experiment_id for e in registry.search_experiments(view_type=ViewType.ALL)]
    runs = {
        r.info.run_id for r in registry.search_runs(experiments, run_view_type=ViewType.ALL, max_results=5000)
    }
    return versions, runs


def test_retrain_on_a_changed_parameter_registers_gates_pushes_and_keeps_history(clone):
    """`make retrain`'s script on the clone, against the folder remote and the server, after a change of the
    register stage's policy: register and infer run, new versions appear, the gate promotes the smaller student
    as the policy says, the summary says so with the params and metrics diffs, the push is complete, and every
    earlier version and run is still on the server."""
    registry = client(clone.server)
    versions_before, runs_before = registry_state(registry)
    champion_before = str(registry.get_model_version_by_alias("lmpipe", "champion").version)
    params_file = clone.path / "params.yaml"
    params = yaml.safe_load(params_file.read_text(encoding="utf-8"))
    params["register"].update(RETRAIN_POLICY)
    params_file.write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")

    summary = clone.path.parent / "retrain-summary.md"
    proc = retrain_job(clone, summary, LMPIPE_PIPELINE_ID=RETRAIN_ID)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr
    assert ran_stages(proc.stdout) == {"register", "infer"}
    assert f"retrain: done, pipeline {RETRAIN_ID}" in proc.stdout

    record = json.loads((clone.path / "metrics/register.json").read_text())
    new = record["versions"]
    assert set(new) == set(RETRAIN_POLICY["variants"])
    newest_before = max(int(v) for (name, v) in versions_before if name == "lmpipe")
    assert all(int(v) > newest_before for v in new.values())
    decision = record["decision"]
    assert decision["promoted"] is True and decision["champion_before"]["version"] == champion_before
    assert (decision["candidate"]["variant"], decision["candidate"]["version"]) == (
        "student-int8",
        new["student-int8"],
    )
    for alias in ("candidate", "champion"):
        assert str(registry.get_model_version_by_alias("lmpipe", alias).version) == new["student-int8"], alias

    versions_after, runs_after = registry_state(registry)
    assert versions_before.items() <= versions_after.items(), "an earlier version is gone or changed its run"
    assert runs_before <= runs_after, "an earlier run is gone"
    assert all(registry.get_run(r).info.lifecycle_stage == "active" for r in runs_before)

    text = summary.read_text(encoding="utf-8")
    assert "**Status:** succeeded." in text and "**Stages run:** register, infer." in text
    assert f"candidate v{new['student-int8']} (student-int8): promoted." in text
    assert f"`champion` v{new['student-int8']}" in text
    assert "pushed; every output is on the remote" in text
    params_diff = text.split("## Params vs HEAD")[1]
    for line in ("register.candidate", "register.higher_is_better", "register.metric", "variants.parameters"):
        assert line in params_diff, params_diff
    metrics_diff = text.split("## Metrics vs HEAD")[1].split("## Params vs HEAD")[0]
    assert "metrics/register.json" in metrics_diff and "decision.candidate.value" in metrics_diff, (
        metrics_diff
    )
    assert dvc_json(["status", "-c"], clone.path, clone.env) == {}

    pipeline = registry.search_runs(
        [e.experiment_id for e in registry.search_experiments()],
        f"tags.`lmpipe.pipeline_id` = '{RETRAIN_ID}' and tags.`lmpipe.kind` = 'pipeline'",
    )
    assert len(pipeline) == 1 and pipeline[0].info.status == "FINISHED"


def test_a_push_the_remote_refuses_is_reported_and_never_claimed(clone, tmp_path):
    """A remote that takes the job's write probe but refuses the outputs (a quota, a prefix it may not write):
    the job exits non-zero with one line, and its summary says the outputs were not pushed."""
    from retrain import PROBE

    oid = hashlib.md5(PROBE).hexdigest()
    probe = tmp_path / "files" / "md5" / oid[:2] / oid[2:]
    probe.parent.mkdir(parents=True)
    probe.write_bytes(PROBE)
    summary = tmp_path / "summary.md"
    with refusing_remote(tmp_path, accept={f"/files/md5/{oid[:2]}/{oid[2:]}"}) as url:
        proc = retrain_job(clone, summary, DVC_REMOTE_URL=url, LMPIPE_PIPELINE_ID=f"{RETRAIN_ID}-refused")
    assert proc.returncode == 1, proc.stdout[-4000:] + proc.stderr
    assert ran_stages(proc.stdout) == set()
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("retrain: dvc push to 'retrain' failed: "), proc.stderr
    text = summary.read_text(encoding="utf-8")
    assert "**Status:** **FAILED**: dvc push to 'retrain' failed" in text
    assert "**not pushed**" in text and "every output is on the remote" not in text
    assert not any(p for p in tmp_path.rglob("*") if p.is_file() and p not in (probe, summary))
