"""MLflow tracking: one run per stage, grouped under one parent run per pipeline execution.

Every stage run carries the git commit, the stage name and the params it read, so two pipeline executions
can be picked in the MLflow UI and compared. Stages of one execution share the tag `lmpipe.pipeline_id` and
the parent run `pipeline <id>`; the id comes from, in order: `LMPIPE_PIPELINE_ID` (set by `make train`),
`DVC_EXP_NAME` (set by `dvc exp run`), else a fingerprint of the git commit and params.yaml, so that the
stages of a plain `dvc repro` still land together.

The parent run spans its stages: each stage's end moves the parent's end time to the latest stage end and marks
it FAILED while the latest run of some stage failed. Its params and headline metrics come afterwards from
`python -m lmpipe.pipeline_run` (which `make train` runs afterwards). The experiment is tagged as a model
training experiment (`EXPERIMENT_KIND`).

The default store is embedded: `sqlite:///mlruns.db` with artifacts under `mlartifacts/`. The environment
variable `MLFLOW_TRACKING_URI` points every stage at a real server instead. A server that does not answer fails
a stage in one line: at its start (`check_server`), or on the way (`server_lost`: MLflow's HTTP retries are
bounded by HTTP_LIMITS so that this comes within seconds, not minutes).
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from lmpipe import config
from lmpipe.errors import LmpipeError
from lmpipe.formats import DEFAULT_TRACKING_URI

if not sys.stderr.isatty():  # MLflow's per-file download bars would flood CI and DVC logs
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}
"""How long MLflow's HTTP client insists on a tracking server (a user's own environment wins). Its defaults, 7
retries with backoff factor 2 and 120 s per answer, keep a stage whose server went away waiting 4 minutes or
more per request; with these a stopped server fails a request within about 10 s, a silent one within about
2 minutes."""
for _name, _value in HTTP_LIMITS.items():
    os.environ.setdefault(_name, _value)
GIVE_UP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
"""Once the server is known to be gone: the calls that still follow (ending the stage's run) fail at once."""

if TYPE_CHECKING:
    import mlflow

PIPELINE_ID_ENV = "LMPIPE_PIPELINE_ID"
TAG_PIPELINE = "lmpipe.pipeline_id"
TAG_STAGE = "lmpipe.stage"
TAG_KIND = "lmpipe.kind"
TAG_DIRTY = "lmpipe.git_dirty"
TAG_DVC_EXP = "lmpipe.dvc_exp"
"""The DVC experiment name (DVC_EXP_NAME, set by `dvc exp run`) of a stage run and its pipeline run."""
TAG_STAGES_RUN = "lmpipe.stages_run"
"""On a pipeline run: the stages that ran in it (the others' results came from DVC's cache), or "none"."""
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
"""MLflow 3's kind for a model-training experiment ("Machine learning" in the UI, not "GenAI apps & agents"):
versions whose UI reads the experiment's kind open it on the runs table. MLflow 3.17's UI decides by its own
sidebar switch instead, which the URL `?workflowType=machine_learning` sets (see `runs_url`)."""
FAILED_STATUSES = ("FAILED", "KILLED")


@config.schema("logger")
class TrackingConfig:
    tracking_uri: str = DEFAULT_TRACKING_URI
    """MLflow tracking URI; the MLFLOW_TRACKING_URI environment variable takes precedence."""
    experiment_name: str = "lmpipe"
    """MLflow experiment that holds every run of this project."""
    artifact_location: str = "mlartifacts"
    """Artifact root for a new experiment: a local folder, or an object-store URI such as s3://bucket/lmpipe."""

    @property
    def resolved_uri(self) -> str:
        return os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri


def git_commit() -> tuple[str, bool]:
    """(HEAD commit, whether tracked files differ from it); ("unknown", False) outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False
    return commit, bool(dirty)


def pipeline_id(params_file: Path = config.PARAMS_FILE) -> str:
    """The id that groups the stage runs of one pipeline execution (see module docstring)."""
    for var in (PIPELINE_ID_ENV, "DVC_EXP_NAME"):
        if os.environ.get(var):
            return os.environ[var]
    digest = hashlib.sha256(git_commit()[0].encode())
    if params_file.exists():
        digest.update(params_file.read_bytes())
    return "repro-" + digest.hexdigest()[:12]


def dvc_exp_name() -> str | None:
    """The DVC experiment this process runs in (`dvc exp run` sets DVC_EXP_NAME), or None."""
    return os.environ.get("DVC_EXP_NAME") or None


def unreachable(uri: str, timeout: float = 10.0) -> str | None:
    """For an http(s) tracking URI, why no server answers there within `timeout` seconds (any HTTP answer
    counts as one); None when one does, or for an embedded store."""
    if not uri.startswith(("http://", "https://")):
        return None
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout).close()
    except urllib.error.HTTPError:  # a server (or a proxy in front of one) answered
        return None
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in one line within `timeout` seconds when no server answers at an http(s) tracking URI: MLflow's own
    client retries for minutes and then ends in a long traceback."""
    reason = unreachable(uri, timeout)
    if reason is not None:
        raise LmpipeError(
            f"tracking server {uri} cannot be reached ({reason}): start it, or point MLFLOW_TRACKING_URI "
            "(or logger.tracking_uri) at a server that runs"
        )


def server_lost(uri: str, stage: str) -> LmpipeError | None:
    """After stage `stage` failed: for an http(s) tracking URI that no longer answers, the one-line error that
    says so and what to do (the cause of the failure, or a consequence the user must fix first), after which
    MLflow's remaining calls in this process give up at once (GIVE_UP); else None."""
    reason = unreachable(uri, timeout=5)
    if reason is None:
        return None
    os.environ.update(GIVE_UP)
    return LmpipeError(
        f"tracking server {uri} stopped answering during stage {stage} ({reason}): its outputs were not "
        "written and its checkpoints are kept; start the server again (or point MLFLOW_TRACKING_URI at one "
        "that runs) and re-run it: training resumes from the last checkpoint"
    )


def experiment_id(cfg: TrackingConfig) -> str:
    """The id of the project's experiment (created if absent), tagged as a model-training experiment; also
    points MLflow's client at the configured store."""
    import mlflow

    uri = cfg.resolved_uri
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(cfg.experiment_name)
    if experiment is not None:
        if (
            EXPERIMENT_KIND_TAG not in experiment.tags
        ):  # a store from before the tag (a kind set by hand stays)
            client = mlflow.MlflowClient()
            client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = cfg.artifact_location
    if "://" not in location:
        # A bare folder is only meaningful for an embedded store; a server picks its own artifact root.
        local_store = uri.startswith(("sqlite:", "file:")) or "://" not in uri
        location = Path(location).resolve().as_uri() if local_store else None
    tags = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
    return mlflow.create_experiment(cfg.experiment_name, artifact_location=location, tags=tags)


def runs_url(experiment: str, base: str = "http://127.0.0.1:5000") -> str:
    """The MLflow UI's runs table of an experiment, as a model-training experiment (see EXPERIMENT_KIND)."""
    return f"{base}/#/experiments/{experiment}/runs?workflowType=machine_learning"


def parent_run(experiment_id: str, pid: str, commit: str) -> str:
    """Find or create the parent run of this pipeline execution; returns its run id."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pid}' and tags.`{TAG_KIND}` = 'pipeline'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    tags = {TAG_KIND: "pipeline", TAG_PIPELINE: pid, "mlflow.source.git.commit": commit}
    if dvc_exp_name():
        tags[TAG_DVC_EXP] = dvc_exp_name()
    run = client.create_run(experiment_id, run_name=f"pipeline {pid}", tags=tags)
    if config.PARAMS_FILE.exists():
        client.log_artifact(run.info.run_id, str(config.PARAMS_FILE))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def stage_runs(client, experiment_id: str, pid: str) -> list:
    """Every stage run of pipeline `pid` (re-runs of a stage included), oldest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_PIPELINE}` = '{pid}' and tags.`{TAG_KIND}` = 'stage'",
        max_results=5000,
        order_by=["attributes.start_time ASC"],
    )


def end_stale_runs(experiment_id: str, pid: str, stage: str) -> None:
    """Mark FAILED the runs of this stage in this pipeline still RUNNING: their process died without ending them
    (killed, or its tracking server went away), and a re-run takes over."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    for run in stage_runs(client, experiment_id, pid):
        if run.data.tags.get(TAG_STAGE) == stage and run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, "FAILED")


def close_pipeline_run(client, parent_id: str, children: Sequence, failed: bool = False) -> str:
    """End the parent run where its latest stage ended, FAILED if `failed` or the latest run of some stage
    failed (a stage re-run that succeeded clears its earlier failure); returns the status."""
    latest = {run.data.tags.get(TAG_STAGE): run for run in children}  # oldest first: the last one wins
    failed = failed or any(run.info.status in FAILED_STATUSES for run in latest.values())
    ends = [run.info.end_time for run in children if run.info.end_time]
    status = "FAILED" if failed else "FINISHED"
    client.set_terminated(parent_id, status, end_time=max(ends) if ends else int(time.time() * 1000))
    return status


@contextlib.contextmanager
def stage_run(stage: str, cfg: DictConfig, sections: Sequence[str]) -> Iterator[mlflow.ActiveRun]:
    """An active MLflow run for one stage, nested under its pipeline's parent run, with its params logged."""
    import mlflow

    if not is_main_process():
        # DDP re-runs the stage script in each worker process; only the main one talks to MLflow.
        yield None
        return
    tracking: TrackingConfig = config.build(cfg.logger)
    experiment = experiment_id(tracking)
    pid = pipeline_id()
    commit, dirty = git_commit()
    parent = parent_run(experiment, pid, commit)
    end_stale_runs(experiment, pid, stage)
    tags = {
        TAG_KIND: "stage",
        TAG_STAGE: stage,
        TAG_PIPELINE: pid,
        "mlflow.parentRunId": parent,
        "mlflow.source.git.commit": commit,
        "mlflow.source.name": f"pipelines/{stage}.py",
        TAG_DIRTY: str(dirty).lower(),
    }
    if dvc_exp_name():
        tags[TAG_DVC_EXP] = dvc_exp_name()
    lost = None
    try:
        with mlflow.start_run(experiment_id=experiment, run_name=stage, tags=tags) as run:
            try:
                params = config.flatten({name: loggable(cfg[name]) for name in sections})
                mlflow.log_params({k: short(v) for k, v in params.items()})
                yield run
            except BaseException:
                # Asked before the run is ended as FAILED: that call would wait on the lost server again.
                lost = server_lost(tracking.resolved_uri, stage)
                raise
    except BaseException as exc:
        if lost is not None and not isinstance(exc, KeyboardInterrupt):
            raise lost from None  # MLflow's traceback (or the end_run that failed after it) says no more
        raise
    finally:  # the stage's run has its final status here, failed or not
        if lost is None:
            client = mlflow.MlflowClient()
            close_pipeline_run(client, parent, stage_runs(client, experiment, pid))


def loggable(section: Any) -> Any:
    """A config section as plain data for logging (without Hydra's `_target_`)."""
    return config.to_container(section) if isinstance(section, DictConfig) else section


def short(value: Any, limit: int = 6000) -> str:
    """A param value as MLflow stores it: text of at most `limit` characters (MLflow's own limit)."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_main_process() -> bool:
    """False in the extra processes a multi-process (DDP) launch starts; they must not log or write outputs."""
    return all(int(os.environ.get(var, 0)) == 0 for var in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def lightning_logger(run: mlflow.ActiveRun | None, cfg: DictConfig):
    """A Lightning MLFlowLogger writing into the stage's open run (Lightning only logs from rank zero)."""
    from lightning.pytorch.loggers import MLFlowLogger

    class StageRunLogger(MLFlowLogger):
        def finalize(self, status: str = "success") -> None:
            """Nothing for the stage's run: `stage_run` owns it and ends it with the stage. Lightning's own
            finalize would mark it FINISHED while the stage still writes to it, and after a failure ask a lost
            server twice more."""
            if run is None:
                super().finalize(status)

    tracking: TrackingConfig = config.build(cfg.logger)
    return StageRunLogger(
        experiment_name=tracking.experiment_name,
        tracking_uri=tracking.resolved_uri,
        run_id=run.info.run_id if run is not None else None,
        log_model=False,
    )


def log_metrics(metrics: dict, prefix: str = "") -> None:
    """Log the numeric leaves of a (nested) metrics dict to the active run, keys joined with dots."""
    import mlflow

    flat = config.flatten(metrics, prefix)
    numeric = {
        # numbers.Real also admits numpy scalars (np.int64, np.float32 are not int/float subclasses).
        metric_name(k): float(v)
        for k, v in flat.items()
        if isinstance(v, numbers.Real) and not isinstance(v, bool)
    }
    if mlflow.active_run() is not None and numeric:
        mlflow.log_metrics(numeric)


def metric_name(key: str) -> str:
    """`key` with what MLflow refuses in a metric name (all but alphanumerics and _-. :/) as "_":
    "tf-idf + logistic regression" has a +."""
    return re.sub(r"[^\w\-. :/]", "_", key)
