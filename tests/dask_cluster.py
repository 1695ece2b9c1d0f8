"""A real multi-process Dask cluster on 127.0.0.1 for the engine tests, and the task functions they map.

`dask_cluster()` starts `dask scheduler` and two `dask worker --nworkers 1 --nthreads 1` as subprocesses (each
worker under its nanny, which restarts a worker process that dies, as on a team's cluster), on free ports, and
stops them all by PID. Without the Dask extra the tests that need it skip, except under CI (env CI set), where
they fail: .ci/run installs the extra (`make setup-dask`), and a skip would hide that it broke.

Not a test module: tests import it through `pythonpath = ["tests"]`, and the workers import the task functions
from it (the cluster's PYTHONPATH names tests/ and src/).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from browser import missing

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 60


def require_dask() -> None:
    """Skip the calling test without the Dask extra (fail it under CI)."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        missing("dask.distributed is not installed (make setup-dask)", tests="the Dask engine tests")


def cluster_env(**extra: str) -> dict[str, str]:
    """The environment of the cluster's processes: this one, with src/ and tests/ importable."""
    paths = [str(ROOT / "src"), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), **extra}


@contextmanager
def dask_cluster(tmp: Path, n_workers: int = 2, allowed_failures: int = 3) -> Iterator[str]:
    """Start a scheduler and `n_workers` single-threaded workers; yield the scheduler's address; stop them.

    `allowed_failures` is the scheduler's: how many worker deaths one task may cause before it is reported
    as a KilledWorker (Dask's default, 3)."""
    require_dask()
    dask = shutil.which("dask", path=str(Path(sys.executable).parent)) or "dask"
    # One task at a time per worker, as engine.py sets for its LocalCluster: a dying worker then takes down
    # only the item it runs, and Dask blames that one.
    env = cluster_env(
        DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=str(allowed_failures),
        DASK_DISTRIBUTED__SCHEDULER__WORKER_SATURATION="1.0",
    )
    scheduler_file = tmp / "scheduler.json"
    logs = []
    procs = []

    def start(name: str, *args: str) -> None:
        log = open(tmp / f"{name}.log", "wb")  # noqa: SIM115 (closed below)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [dask, *args], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )

    try:
        start(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-dashboard",
            "--scheduler-file",
            str(scheduler_file),
        )
        for i in range(n_workers):
            start(
                f"worker{i}",
                "worker",
                "--scheduler-file",
                str(scheduler_file),
                "--nworkers",
                "1",
                "--nthreads",
                "1",
                "--host",
                "127.0.0.1",
                "--no-dashboard",
                "--name",
                f"w{i}",
            )
        address = wait_for_workers(scheduler_file, n_workers)
        yield address
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in logs:
            log.close()


def wait_for_workers(scheduler_file: Path, n_workers: int) -> str:
    """The scheduler's address once `n_workers` workers have joined it."""
    from distributed import Client

    deadline = time.monotonic() + START_TIMEOUT_S
    while not scheduler_file.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"no dask scheduler file after {START_TIMEOUT_S} s")
        time.sleep(0.1)
    with Client(scheduler_file=str(scheduler_file), timeout=START_TIMEOUT_S) as client:
        client.wait_for_workers(n_workers, timeout=START_TIMEOUT_S)
        return client.scheduler.address


def cluster_pids(address: str) -> tuple[int, list[int]]:
    """PIDs of the scheduler, and of every worker process and its nanny (which would restart it)."""
    from distributed import Client

    with Client(address, timeout=10) as client:
        workers = list(client.run(os.getpid).values()) + list(client.run(os.getppid).values())
        return client.run_on_scheduler(os.getpid), workers


# The functions the tests map: top level, so that every engine can pickle them by reference.


def square(x: int) -> int:
    return x * x


def slow_square(x: int) -> int:
    """Later items finish first (input 0 sleeps longest), so ordered results prove the engine reorders."""
    time.sleep(0.02 * (10 - x % 10))
    return x * x


def square_with_pid(x: int) -> tuple[int, int]:
    time.sleep(0.1)
    return x * x, os.getpid()


def exit_on_negative(x: int) -> int:
    """A worker that dies: os._exit skips every handler, as a segfault or the OOM killer would."""
    if x < 0:
        os._exit(3)
    return x


def fail_on_negative(x: int) -> int:
    if x < 0:
        raise ValueError(f"negative item {x}")
    return x
