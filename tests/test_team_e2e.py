"""End to end for a team: the tracking and registry on a real `mlflow server` backed by PostgreSQL with proxied
artifacts (tests/team_stack.py starts the stack as `make server` does)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from http_remote import refusing_remote
from team_stack import TeamStack
from worktree_copy import copy_worktree, git_env

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


# --- The smoke run against the team server, once for the module. Provisional: team-server's shared smoke_run
# fixture (tests/smoke_repo.py) replaces this section when it lands; the tests below use only .path, .env, .server.

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


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} failed ({proc.returncode}):\n{output[-4000:]}"
    return output


def ran_stages(output: str) -> set[str]:
    return {stage for stage in STAGES if f"Running stage '{stage}'" in output}


@dataclass
class SmokeRun:
    path: Path
    env: dict
    output: str
    server: TeamStack


@pytest.fixture(scope="module")
def smoke_run(team_server, tmp_path_factory) -> SmokeRun:
    path = copy_worktree(tmp_path_factory.mktemp("team-e2e") / "lmpipe")
    env = git_env() | {"MLFLOW_TRACKING_URI": team_server.uri}
    run(["git", "init", "-q", "-b", "main"], path, env)
    run(["lmpipe", "params", "experiment=smoke"], path, env)
    run(["git", "add", "-A"], path, env)
    run(["git", "commit", "-qm", "smoke"], path, env)
    output = run(["dvc", "repro"], path, {**env, "LMPIPE_PIPELINE_ID": "team-smoke"}, timeout=2400)
    assert ran_stages(output) == set(STAGES)
    return SmokeRun(path, env, output, team_server)


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


def registry_state(client) -> tuple[dict, set[str]]:
    """Every version of every registered model ((name, version) -> run id), and every run id, on the server."""
    from mlflow.entities import ViewType

    versions = {
        (v.name, v.version): v.run_id
        for model in client.search_registered_models()
        for v in client.search_model_versions(f"name = '{model.name}'")
    }
    experiments = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ALL)]
    runs = {
        r.info.run_id for r in client.search_runs(experiments, run_view_type=ViewType.ALL, max_results=5000)
    }
    return versions, runs


def test_retrain_on_a_changed_parameter_registers_gates_pushes_and_keeps_history(clone):
    """`make retrain`'s script on the clone, against the folder remote and the server, after a change of the
    register stage's policy: register and infer run, new versions appear, the gate promotes the smaller student
    as the policy says, the summary says so with the params and metrics diffs, the push is complete, and every
    earlier version and run is still on the server."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=clone.server.uri, registry_uri=clone.server.uri)
    versions_before, runs_before = registry_state(client)
    champion_before = str(client.get_model_version_by_alias("lmpipe", "champion").version)
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
        assert str(client.get_model_version_by_alias("lmpipe", alias).version) == new["student-int8"], alias

    versions_after, runs_after = registry_state(client)
    assert versions_before.items() <= versions_after.items(), "an earlier version is gone or changed its run"
    assert runs_before <= runs_after, "an earlier run is gone"
    assert all(client.get_run(r).info.lifecycle_stage == "active" for r in runs_before)

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

    pipeline = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
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
