"""A shared MLflow stack on this machine: PostgreSQL as the tracking and registry store, `mlflow server` in front
of it with proxied artifacts in a local folder. `make server` / `make server-stop` run it for a user; the tests
(tests/team_stack.py) start the same stack in a temporary folder.

    python scripts/mlflow_server.py start [--dir .mlflow-server] [--port 5000] [--pg-port 5433]
    python scripts/mlflow_server.py stop  [--dir .mlflow-server]
    python scripts/mlflow_server.py status [--dir .mlflow-server]

`start` creates the PostgreSQL cluster under <dir>/pgdata on first use (kept across stops, like the artifacts
under <dir>/artifacts), starts it and `mlflow server`, each in its own process group, records their PIDs in
<dir>/server.json and prints the `export MLFLOW_TRACKING_URI=...` line. `stop` stops both by those PIDs.

PostgreSQL refuses to run as root: as root, the cluster belongs to the `postgres` user (Debian's package
creates it) and its programs run through `runuser -u postgres --`. The cluster listens on 127.0.0.1 only, without
a Unix socket, and trusts local connections: a stack for one machine. A team points `mlflow server` at a managed
database and an object store instead (README, "Shared MLflow").

Standard library only: it runs before anything else is imported, and the tests import it (pytest's pythonpath).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

PG_BIN_ENV = "LMPIPE_PG_BIN"
"""A folder holding PostgreSQL's server programs (initdb, postgres, createdb), if not Debian's."""
PG_USER = "postgres"
"""The system user that owns the cluster when we run as root (PostgreSQL refuses root), and the DB superuser."""
DATABASE = "mlflow"
"""The database that holds MLflow's tracking and registry tables."""
STATE_FILE = "server.json"
"""In the stack's folder: PIDs, ports and URIs of the running stack (what `stop` and `status` read)."""


class StackError(Exception):
    """A one-line reason the stack cannot start or stop."""


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: $LMPIPE_PG_BIN, else Debian's newest
    /usr/lib/postgresql/<version>/bin, else the folder of `postgres` on PATH; None when there is none."""
    if os.environ.get(PG_BIN_ENV):
        return Path(os.environ[PG_BIN_ENV])
    debian = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"), key=lambda p: int("0" + p.parent.parent.name)
    )
    if debian:
        return debian[-1].parent
    found = shutil.which("postgres")
    return Path(found).parent if found else None


def as_cluster_owner(command: list[str]) -> list[str]:
    """`command` run as the cluster's owner: through `runuser -u postgres --` as root, else as is."""
    return ["runuser", "-u", PG_USER, "--", *command] if os.geteuid() == 0 else command


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_free(port: int, option: str) -> None:
    """A one-line StackError when something already listens on 127.0.0.1:`port` (a server there would answer
    our health checks in place of the one we start)."""
    import socket

    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", port)) == 0:
            raise StackError(f"port {port} on 127.0.0.1 is taken: pick another with {option}")


def _run(command: list[str], what: str, timeout: float = 120) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise StackError(f"{what} failed ({proc.returncode}): {last[0]}")


def init_cluster(data: Path, bin_dir: Path, durable: bool = True) -> None:
    """Create a PostgreSQL cluster in `data` unless one is there (its PG_VERSION file), owned by the cluster's
    owner. `durable=False` skips fsync (throw-away test clusters)."""
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    data.chmod(0o700)  # PostgreSQL refuses a data folder others can read
    if os.geteuid() == 0:
        shutil.chown(data, PG_USER, PG_USER)
    command = [str(bin_dir / "initdb"), "-D", str(data), "-U", PG_USER, "-A", "trust", "--no-locale"]
    command += ["-E", "UTF8"] + ([] if durable else ["--no-sync"])
    _run(as_cluster_owner(command), f"initdb {data} (as {PG_USER} when root: it must be able to reach it)")


def start_detached(command: list[str], log: Path, env: dict[str, str] | None = None) -> int:
    """Start `command` in its own session (so its process group is stopped whole), output to `log`; its PID."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            start_new_session=True,
        )  # fmt: skip
    return proc.pid


def start_postgres(data: Path, port: int, bin_dir: Path, log: Path, durable: bool = True) -> int:
    """Start the cluster in `data` on 127.0.0.1:`port` (TCP only: no Unix socket to place); its PID."""
    command = [str(bin_dir / "postgres"), "-D", str(data), "-p", str(port)]
    command += ["-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories="]
    command += [] if durable else ["-c", "fsync=off", "-c", "synchronous_commit=off"]
    return start_detached(as_cluster_owner(command), log)


def wait_until(ready, pid: int, what: str, log: Path, timeout: float) -> None:
    """Poll `ready()` until it holds; a one-line StackError if process `pid` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive(pid):
            raise StackError(f"{what}: the process exited: {_last_line(log)}")
        if time.monotonic() > deadline:
            raise StackError(f"{what}: no answer within {timeout:g} s (log: {log})")
        time.sleep(0.2)


def wait_for_postgres(pid: int, port: int, bin_dir: Path, log: Path, timeout: float = 60) -> None:
    """Return once the cluster accepts connections on `port`."""
    command = [str(bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(port)]
    wait_until(
        lambda: subprocess.run(command, capture_output=True).returncode == 0,
        pid,
        f"postgres on port {port}",
        log,
        timeout,
    )


def create_database(port: int, bin_dir: Path, name: str = DATABASE) -> None:
    """Create database `name` unless it exists."""
    probe = subprocess.run(
        [
            str(bin_dir / "psql"),
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-U",
            PG_USER,
            "-d",
            name,
            "-c",
            "select 1",
        ],
        capture_output=True,
    )
    if probe.returncode != 0:
        _run([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", PG_USER, name], "createdb")


def backend_uri(port: int, name: str = DATABASE) -> str:
    """The SQLAlchemy URI of database `name` on the local cluster (psycopg2 driver)."""
    return f"postgresql://{PG_USER}@127.0.0.1:{port}/{name}"


def mlflow_command(backend: str, artifacts: str, port: int, host: str = "127.0.0.1") -> list[str]:
    """`mlflow server` on `backend` with artifacts proxied to `artifacts` (a folder or an object-store URI)."""
    mlflow = Path(sys.executable).with_name("mlflow")
    command = [str(mlflow if mlflow.exists() else "mlflow"), "server", "--backend-store-uri", backend]
    command += ["--artifacts-destination", artifacts, "--serve-artifacts", "--host", host]
    return command + ["--port", str(port), "--workers", "1"]


def mlflow_env() -> dict[str, str]:
    """The server's environment: without job execution, which would start several more worker processes."""
    return os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def wait_for_http(pid: int, url: str, log: Path, timeout: float = 180) -> None:
    """Return once `url`/health answers (any HTTP status counts)."""

    def ready() -> bool:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2).close()
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    wait_until(ready, pid, f"mlflow server at {url}", log, timeout)


def alive(pid: int) -> bool:
    """Whether process `pid` still runs (a zombie child of ours counts as gone)."""
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(pid: int, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Stop the process group led by `pid` with `sig`, then SIGKILL after `timeout` seconds; waits until the
    leader is gone. PostgreSQL takes SIGINT (fast shutdown: its SIGTERM waits for clients to disconnect)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):  # the leader is gone: its group goes with it
        os.killpg(pid, signal.SIGKILL)


def _last_line(log: Path) -> str:
    lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
    return lines[-1] if lines else f"no output in {log}"


@dataclass
class State:
    """What `start` records in <dir>/server.json."""

    uri: str
    """The tracking (and registry) URI to export as MLFLOW_TRACKING_URI."""
    backend_store_uri: str
    artifacts: str
    postgres_pid: int
    mlflow_pid: int


def start(folder: Path, port: int, pg_port: int) -> State:
    """Start (or find running) the stack kept in `folder`."""
    folder = folder.resolve()
    state_file = folder / STATE_FILE
    if state_file.is_file():
        state = State(**json.loads(state_file.read_text()))
        if alive(state.postgres_pid) and alive(state.mlflow_pid):
            return state
        stop(folder)  # half of it died: start both afresh
    bin_dir = postgres_bin()
    if bin_dir is None:
        raise StackError(f"no PostgreSQL server found: apt-get install postgresql, or set {PG_BIN_ENV}")
    require_free(port, "--port (make server SERVER_PORT=...)")
    require_free(pg_port, "--pg-port (make server SERVER_PG_PORT=...)")
    folder.mkdir(parents=True, exist_ok=True)
    logs = folder / "logs"
    logs.mkdir(exist_ok=True)
    init_cluster(folder / "pgdata", bin_dir)
    pg_pid = start_postgres(folder / "pgdata", pg_port, bin_dir, logs / "postgres.log")
    try:
        wait_for_postgres(pg_pid, pg_port, bin_dir, logs / "postgres.log")
        create_database(pg_port, bin_dir)
        backend, artifacts = backend_uri(pg_port), str(folder / "artifacts")
        log = logs / "mlflow.log"
        ml_pid = start_detached(mlflow_command(backend, artifacts, port), log, mlflow_env())
        uri = f"http://127.0.0.1:{port}"
        try:
            wait_for_http(ml_pid, uri, log)
        except BaseException:
            stop_group(ml_pid)
            raise
    except BaseException:
        stop_group(pg_pid, signal.SIGINT)
        raise
    state = State(uri, backend, artifacts, pg_pid, ml_pid)
    state_file.write_text(json.dumps(asdict(state), indent=2) + "\n")
    return state


def stop(folder: Path) -> State | None:
    """Stop the stack recorded in `folder` (mlflow first, then PostgreSQL); None when none was recorded."""
    state_file = folder.resolve() / STATE_FILE
    if not state_file.is_file():
        return None
    state = State(**json.loads(state_file.read_text()))
    stop_group(state.mlflow_pid)
    stop_group(state.postgres_pid, signal.SIGINT, timeout=60)
    state_file.unlink()
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mlflow_server.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "status"))
    parser.add_argument("--dir", type=Path, default=Path(".mlflow-server"), help="the stack's folder")
    parser.add_argument("--port", type=int, default=5000, help="mlflow server's port on 127.0.0.1")
    parser.add_argument("--pg-port", type=int, default=5433, help="PostgreSQL's port on 127.0.0.1")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            state = start(args.dir, args.port, args.pg_port)
            print(f"mlflow server on {state.backend_store_uri}, artifacts in {state.artifacts}")
            print(f"export MLFLOW_TRACKING_URI={state.uri}")
        elif args.action == "stop":
            state = stop(args.dir)
            print(f"stopped {state.uri}" if state else f"no server recorded in {args.dir / STATE_FILE}")
        else:
            state_file = args.dir / STATE_FILE
            state = State(**json.loads(state_file.read_text())) if state_file.is_file() else None
            running = state is not None and alive(state.mlflow_pid) and alive(state.postgres_pid)
            print(f"running: {state.uri}" if running else "not running")
            return 0 if running else 1
    except (StackError, OSError, subprocess.SubprocessError) as exc:
        print(f"mlflow_server: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
