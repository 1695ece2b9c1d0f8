"""lmpipe.tracking against a real MLflow (sqlite store in a temporary folder, shared by this module)."""

import hashlib
import os

import numpy as np
import pytest
from omegaconf import OmegaConf

from lmpipe import tracking

EXPERIMENT = "lmpipe-test"
SECTIONS = ("seed", "model")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating the sqlite schema takes seconds)."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    yield root
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI; undo both so no later test inherits our store.
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def in_store(store, monkeypatch):
    """Run in the store's folder (not a git repository) with no tracking variables from outside."""
    monkeypatch.chdir(store)
    for var in ("MLFLOW_TRACKING_URI", tracking.PIPELINE_ID_ENV, "DVC_EXP_NAME", "GIT_DIR", "GIT_WORK_TREE"):
        monkeypatch.setenv(var, "")  # recorded as absent, so teardown removes whatever MLflow sets
        monkeypatch.delenv(var)
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    return store


def make_cfg(store):
    return OmegaConf.create(
        {
            "seed": 7,
            "model": {"_target_": "lmpipe.model_config.GPTConfig", "n_layer": 2, "betas": [0.9, 0.95]},
            "logger": {
                "_target_": "lmpipe.tracking.TrackingConfig",
                "tracking_uri": f"sqlite:///{store}/mlruns.db",
                "experiment_name": EXPERIMENT,
                "artifact_location": "mlartifacts",
            },
        }
    )


def client(store):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store}/mlruns.db")


def run_stage(store, stage, monkeypatch, pid=None, metrics=None):
    """One stage_run as a pipeline stage does it; returns the finished child run."""
    if pid is not None:
        monkeypatch.setenv(tracking.PIPELINE_ID_ENV, pid)
    with tracking.stage_run(stage, make_cfg(store), SECTIONS) as run:
        if metrics is not None:
            tracking.log_metrics(metrics, prefix="corpus")
    return client(store).get_run(run.info.run_id)


def test_stage_run_records_experiment_tags_params_and_metrics(in_store, monkeypatch):
    metrics = {
        "rows": 12,
        "splits": {"train": {"chars": np.int64(900)}, "val": {"share": np.float32(0.25)}},
        "resumed": True,
        "sources": ["kjv"],
        "name": "kjv",
    }
    run = run_stage(in_store, "prepare", monkeypatch, pid="pipe-a", metrics=metrics)
    mlflow_client = client(in_store)

    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    assert experiment.artifact_location == (in_store / "mlartifacts").as_uri()
    assert run.info.experiment_id == experiment.experiment_id
    assert run.info.artifact_uri.startswith((in_store / "mlartifacts").as_uri() + "/")
    assert run.info.run_name == "prepare"
    assert run.info.status == "FINISHED"

    tags = run.data.tags
    assert tags["lmpipe.kind"] == "stage"
    assert tags["lmpipe.stage"] == "prepare"
    assert tags["lmpipe.pipeline_id"] == "pipe-a"
    assert tags["mlflow.source.git.commit"] == "unknown"  # the store folder is not a git repository
    assert tags["lmpipe.git_dirty"] == "false"
    assert tags["mlflow.source.name"] == "pipelines/prepare.py"

    parent = mlflow_client.get_run(tags["mlflow.parentRunId"])
    assert parent.info.run_name == "pipeline pipe-a"
    assert parent.data.tags["lmpipe.kind"] == "pipeline"
    assert parent.data.tags["lmpipe.pipeline_id"] == "pipe-a"

    # Params of the sections the stage read, flattened, without Hydra's _target_; not the logger section.
    assert run.data.params == {"seed": "7", "model.n_layer": "2", "model.betas": "[0.9, 0.95]"}
    # Numeric leaves only (numpy scalars included), keys joined with dots under the prefix.
    assert run.data.metrics == {
        "corpus.rows": 12.0,
        "corpus.splits.train.chars": 900.0,
        "corpus.splits.val.share": 0.25,
    }


def test_stages_of_one_pipeline_share_a_parent_run(in_store, monkeypatch):
    first = run_stage(in_store, "prepare", monkeypatch, pid="pipe-b")
    second = run_stage(in_store, "tokenize", monkeypatch, pid="pipe-b")
    other = run_stage(in_store, "prepare", monkeypatch, pid="pipe-c")

    parent = first.data.tags["mlflow.parentRunId"]
    assert second.data.tags["mlflow.parentRunId"] == parent
    assert other.data.tags["mlflow.parentRunId"] != parent
    assert second.data.tags["lmpipe.stage"] == "tokenize"

    experiment = client(in_store).get_experiment_by_name(EXPERIMENT)
    parents = client(in_store).search_runs(
        [experiment.experiment_id], filter_string="tags.`lmpipe.kind` = 'pipeline'"
    )
    by_pid = sorted(r.data.tags["lmpipe.pipeline_id"] for r in parents)
    assert by_pid.count("pipe-b") == 1 and by_pid.count("pipe-c") == 1


def test_failed_stage_marks_its_run_failed(in_store, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "pipe-d")
    with pytest.raises(ValueError), tracking.stage_run("evaluate", make_cfg(in_store), SECTIONS) as run:
        raise ValueError("bad input")
    assert client(in_store).get_run(run.info.run_id).info.status == "FAILED"


def test_log_metrics_without_an_active_run_is_a_no_op(in_store, monkeypatch):
    import mlflow

    logged = []
    monkeypatch.setattr(mlflow, "log_metrics", lambda *args, **kwargs: logged.append(args))
    assert mlflow.active_run() is None
    tracking.log_metrics({"a": 1.0, "nested": {"b": 2}})
    assert logged == [] and mlflow.active_run() is None  # nothing logged, and no run started to log it in
    mlflow.set_tracking_uri(f"sqlite:///{in_store}/mlruns.db")
    with mlflow.start_run(experiment_id=client(in_store).create_experiment("no-op-control")):
        tracking.log_metrics({"a": 1.0, "nested": {"b": 2}})
    assert logged == [({"a": 1.0, "nested.b": 2.0},)]  # the same call logs once a run is active


@pytest.mark.parametrize("var", ["RANK", "LOCAL_RANK", "NODE_RANK"])
def test_worker_processes_do_not_track(tmp_path, monkeypatch, var):
    monkeypatch.chdir(tmp_path)
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert tracking.is_main_process()
    monkeypatch.setenv(var, "0")
    assert tracking.is_main_process()
    monkeypatch.setenv(var, "1")
    assert not tracking.is_main_process()
    cfg = make_cfg(tmp_path)
    with tracking.stage_run("pretrain", cfg, SECTIONS) as run:
        assert run is None
    assert list(tmp_path.iterdir()) == []  # no store, no artifacts


def test_pipeline_id_precedence(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "make-1")
    monkeypatch.setenv("DVC_EXP_NAME", "exp-2")
    assert tracking.pipeline_id() == "make-1"
    monkeypatch.delenv(tracking.PIPELINE_ID_ENV)
    assert tracking.pipeline_id() == "exp-2"
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "")  # empty counts as unset
    assert tracking.pipeline_id() == "exp-2"
    monkeypatch.delenv("DVC_EXP_NAME")

    # Fingerprint of the git commit ("unknown" here) and params.yaml: stable, and changes with the params.
    params = tmp_path / "params.yaml"
    params.write_text("seed: 1\n", encoding="utf-8")
    expected = "repro-" + hashlib.sha256(b"unknown" + b"seed: 1\n").hexdigest()[:12]
    assert tracking.pipeline_id() == expected
    assert tracking.pipeline_id(params) == expected
    params.write_text("seed: 2\n", encoding="utf-8")
    assert tracking.pipeline_id() != expected
    params.unlink()
    assert tracking.pipeline_id() == "repro-" + hashlib.sha256(b"unknown").hexdigest()[:12]


def test_git_commit_outside_and_inside_a_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.git_commit() == ("unknown", False)
    monkeypatch.chdir(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    commit, dirty = tracking.git_commit()
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert isinstance(dirty, bool)


def test_tracking_uri_environment_variable_wins(monkeypatch):
    cfg = tracking.TrackingConfig(tracking_uri="sqlite:///local.db")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert cfg.resolved_uri == "sqlite:///local.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    assert cfg.resolved_uri == "http://mlflow.internal:5000"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_tracking_server_is_one_line_naming_it(monkeypatch):
    import time

    from lmpipe.errors import LmpipeError

    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.perf_counter()
    with pytest.raises(
        LmpipeError, match=rf"^tracking server {uri} cannot be reached \(.*\): start it"
    ) as err:
        tracking.experiment_id(tracking.TrackingConfig())
    assert "\n" not in str(err.value) and time.perf_counter() - started < 10


@pytest.mark.parametrize("status", [200, 404])
def test_any_http_answer_counts_as_a_reachable_server(status):
    import http.server
    import threading

    class Answer(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Answer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        tracking.check_server(f"http://127.0.0.1:{server.server_port}")
    finally:
        server.shutdown()
        server.server_close()
    tracking.check_server("sqlite:///never/opened.db")  # embedded stores are not probed


def test_a_lost_server_is_one_line_saying_what_to_do_and_mlflow_gives_up_on_it(monkeypatch):
    for name in tracking.GIVE_UP:
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    lost = tracking.server_lost(uri, "pretrain")
    assert str(lost).startswith(f"tracking server {uri} stopped answering during stage pretrain (")
    assert "checkpoints are kept" in str(lost) and "re-run" in str(lost) and "\n" not in str(lost)
    assert all(os.environ[name] == value for name, value in tracking.GIVE_UP.items())
    assert tracking.server_lost("sqlite:///never/opened.db", "pretrain") is None  # no server to lose


def test_a_stage_whose_server_went_away_fails_with_that_line(in_store, monkeypatch):
    """The stage body fails (as MLflow's logging does when its server is gone) and the server no longer
    answers: stage_run raises the one line instead, and asks the lost server nothing more."""
    from lmpipe.errors import LmpipeError

    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "pipe-lost")
    uri = f"http://127.0.0.1:{free_port()}"
    asked = []
    monkeypatch.setattr(tracking, "server_lost", lambda u, stage: asked.append(u) or LmpipeError("lost"))
    monkeypatch.setattr(tracking, "close_pipeline_run", lambda *a: pytest.fail("asked the lost server"))
    cfg = make_cfg(in_store)
    with pytest.raises(LmpipeError, match="^lost$"), tracking.stage_run("pretrain", cfg, SECTIONS) as run:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # where the stage's logging went, as far as it knows
        raise ConnectionError("log_batch failed")
    assert asked == [uri]
    # The store itself was still there (mocked loss): the run was ended as FAILED on the way out.
    assert client(in_store).get_run(run.info.run_id).info.status == "FAILED"


def test_a_rerun_marks_the_stage_runs_its_dead_predecessors_left_running_failed(in_store, monkeypatch):
    first = run_stage(in_store, "sft", monkeypatch, pid="pipe-rerun")
    client(in_store).update_run(first.info.run_id, status="RUNNING")  # its process died without ending it
    other = run_stage(in_store, "pretrain", monkeypatch, pid="pipe-rerun")
    client(in_store).update_run(other.info.run_id, status="RUNNING")
    second = run_stage(in_store, "sft", monkeypatch, pid="pipe-rerun")
    assert client(in_store).get_run(first.info.run_id).info.status == "FAILED"
    assert client(in_store).get_run(other.info.run_id).info.status == "RUNNING"  # another stage: not ours
    assert second.info.status == "FINISHED"


def test_the_lightning_logger_leaves_the_stage_run_to_the_stage(in_store, monkeypatch):
    monkeypatch.setenv(tracking.PIPELINE_ID_ENV, "pipe-logger")
    cfg = make_cfg(in_store)
    with tracking.stage_run("pretrain", cfg, SECTIONS) as run:
        logger = tracking.lightning_logger(run, cfg)
        logger.log_metrics({"train_loss": 1.5}, step=1)
        logger.finalize("failed")  # what Lightning does when fit fails
        assert client(in_store).get_run(run.info.run_id).info.status == "RUNNING"
    assert client(in_store).get_run(run.info.run_id).data.metrics["train_loss"] == 1.5
