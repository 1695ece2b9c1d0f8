"""End to end for a team: the tracking and registry on a real `mlflow server` backed by PostgreSQL with proxied
artifacts (tests/team_stack.py starts the stack as `make server` does)."""

from __future__ import annotations

import subprocess

import pytest

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
