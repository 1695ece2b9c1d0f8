"""The team's tracking stack for tests: a real PostgreSQL cluster in a temporary folder and `mlflow server` on it
with proxied artifacts, both on free loopback ports, as `make server` starts them (scripts/mlflow_server.py, on
pytest's pythonpath, does the work for both).

`team_stack(artifacts_dir)` is the way in: it yields a `TeamStack` whose `uri` is the MLFLOW_TRACKING_URI to
use, stops both by PID (their process groups) on the way out and removes the cluster. `TeamStack.stop_mlflow()` /
`start_mlflow()` stop and restart the tracking server alone on the same port (the fault test); the database
and the artifacts survive. Without a PostgreSQL server binary the test skips, except under CI (env CI set),
where it fails: .ci/run installs Debian's `postgresql`, so a skip there would hide a broken install.

Not a test module (like tiny_models.py): tests import it by name through `pythonpath = ["tests", "scripts"]`.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import mlflow_server as stack
from browser import missing


@dataclass
class TeamStack:
    """A running PostgreSQL cluster and `mlflow server` on it."""

    uri: str
    """http://127.0.0.1:<port>: the tracking and registry URI (MLFLOW_TRACKING_URI)."""
    backend_store_uri: str
    """postgresql://postgres@127.0.0.1:<port>/mlflow: the server's backend store."""
    artifacts: Path
    """The folder the server proxies artifacts to (--artifacts-destination)."""
    log: Path
    """The mlflow server's log (appended to across restarts)."""
    postgres_log: Path
    postgres_pid: int
    postgres_bin: Path
    """The folder of PostgreSQL's programs (psql, to read the store without MLflow)."""
    mlflow_pid: int | None = None
    port: int = field(default=0)

    def start_mlflow(self, timeout: float = 240) -> None:
        """Start `mlflow server` on the backend store (again), on the same port; returns once it answers."""
        assert self.mlflow_pid is None, "mlflow server already runs"
        command = stack.mlflow_command(self.backend_store_uri, str(self.artifacts), self.port)
        self.mlflow_pid = stack.start_detached(command, self.log, stack.mlflow_env())
        try:
            stack.wait_for_http(self.mlflow_pid, self.uri, self.log, timeout)
        except stack.StackError as exc:
            self.stop_mlflow()
            raise AssertionError(f"{exc}\n{self.log.read_text()[-4000:]}") from None

    def stop_mlflow(self) -> None:
        """Stop `mlflow server` (its whole process group: uvicorn runs as its child); waits until it is gone."""
        if self.mlflow_pid is not None:
            stack.stop_group(self.mlflow_pid)
            self.mlflow_pid = None


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs; skips the test when there is none (fails under CI)."""
    found = stack.postgres_bin()
    if found is None or not (found / "postgres").exists():
        missing(
            f"no PostgreSQL server binary (apt-get install postgresql, or set {stack.PG_BIN_ENV})",
            "the PostgreSQL tests",
        )
    return found


@contextmanager
def team_stack(artifacts_dir: Path) -> Iterator[TeamStack]:
    """PostgreSQL (a throw-away cluster without fsync) and `mlflow server` on it, artifacts in `artifacts_dir`,
    logs beside it."""
    bin_dir = postgres_bin()
    # Not under pytest's temporary folder: that is root's alone (mode 700), and the cluster's owner must reach it.
    cluster = Path(tempfile.mkdtemp(prefix="lmpipe-pg-"))
    cluster.chmod(0o755)
    artifacts_dir.mkdir(parents=True, exist_ok=True)
    pg_log = artifacts_dir.parent / "postgres.log"
    try:
        stack.init_cluster(cluster / "data", bin_dir, durable=False)
        pg_port = stack.free_port()
        pg_pid = stack.start_postgres(cluster / "data", pg_port, bin_dir, pg_log, durable=False)
        try:
            stack.wait_for_postgres(pg_pid, pg_port, bin_dir, pg_log)
            stack.create_database(pg_port, bin_dir)
            port = stack.free_port()
            server = TeamStack(
                uri=f"http://127.0.0.1:{port}",
                backend_store_uri=stack.backend_uri(pg_port),
                artifacts=artifacts_dir,
                log=artifacts_dir.parent / "mlflow-server.log",
                postgres_log=pg_log,
                postgres_pid=pg_pid,
                postgres_bin=bin_dir,
                port=port,
            )
            server.start_mlflow()
            try:
                yield server
            finally:
                server.stop_mlflow()
        finally:
            stack.stop_group(pg_pid, signal.SIGINT, timeout=60)
    finally:
        shutil.rmtree(cluster, ignore_errors=True)
