"""map_ordered on every engine: in this process, a local process pool, and a real multi-process Dask cluster
(a `dask scheduler` and two `dask worker` subprocesses on 127.0.0.1, see dask_cluster.py): the same results in
the same order, a bounded number of items in flight, and a worker that dies is a one-line error, never a hang.
Last, the prepare and tokenize stages on that cluster give byte for byte what they give locally."""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from dask_cluster import (
    ROOT,
    cluster_env,
    cluster_pids,
    dask_cluster,
    exit_on_negative,
    fail_on_negative,
    require_dask,
    slow_square,
    square,
    square_with_pid,
)

from lmpipe.data import engine as engine_module
from lmpipe.data.corpus import DataConfig
from lmpipe.data.engine import map_ordered, resolve_workers
from lmpipe.errors import LmpipeError

# How each engine is asked for: (engine, workers) plus, for "cluster", the test cluster's address.
ENGINES = {
    "in-process": ("local", 1),
    "local-pool": ("local", 2),
    "dask-local-cluster": ("dask", 2),
    "dask-scheduler": ("dask", 1),
}


@pytest.fixture(autouse=True)
def no_hang(request):
    """Fail a test that runs past its limit (a hung map would block forever): SIGALRM interrupts the wait."""

    def expired(signum, frame):
        raise TimeoutError(f"{request.node.name} ran past {limit} s: a hang")

    limit = 900 if request.node.get_closest_marker("slow") else 180
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(limit)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The scheduler address of a running 2-worker cluster, shared by the module (it takes ~3 s to start)."""
    with dask_cluster(tmp_path_factory.mktemp("dask")) as address:
        yield address


def engine_kwargs(name: str, request) -> dict:
    engine, workers = ENGINES[name]
    if engine == "dask":
        require_dask()
    address = request.getfixturevalue("cluster") if name == "dask-scheduler" else ""
    return {"engine": engine, "workers": workers, "address": address}


class Recorder:
    """An iterable of 0..n-1 that records how many items were taken from it."""

    def __init__(self, n: int):
        self.n, self.taken = n, 0

    def __iter__(self):
        for i in range(self.n):
            self.taken += 1
            yield i


@pytest.mark.parametrize("name", ENGINES)
def test_every_engine_gives_the_results_in_input_order_with_bounded_items_in_flight(name, request):
    kwargs = engine_kwargs(name, request)
    items = Recorder(40)
    max_in_flight = 3
    results = []
    for result in map_ordered(slow_square, items, max_in_flight=max_in_flight, **kwargs):
        # Taken from the iterable = yielded (this one included) + those still in flight.
        assert items.taken <= len(results) + 1 + max_in_flight
        results.append(result)
    assert results == [i * i for i in range(40)]


def test_in_process_map_is_lazy_and_takes_one_item_at_a_time():
    items = Recorder(1_000_000)
    results = map_ordered(square, items)
    assert items.taken == 0
    assert [next(results) for _ in range(3)] == [0, 1, 4]
    assert items.taken == 3


@pytest.mark.parametrize("name", ["local-pool", "dask-scheduler"])
def test_an_error_raised_by_fn_reaches_the_caller_unchanged(name, request):
    with pytest.raises(ValueError, match="^negative item -2$"):
        list(map_ordered(fail_on_negative, [1, -2, 3], **engine_kwargs(name, request)))


def test_a_pool_worker_that_exits_is_a_one_line_error_naming_the_items_in_flight():
    with pytest.raises(LmpipeError) as info:
        list(map_ordered(exit_on_negative, [1, 2, 3, -4, 5, 6], engine="local", workers=2))
    message = str(info.value)
    assert "\n" not in message
    # The pool cannot say which process ran which item: the message names those in flight, item 3 among them.
    found = re.match(
        r"data\.engine=local: a worker process died while items (\d+)-(\d+) were in flight", message
    )
    assert found and int(found[1]) <= 3 <= int(found[2]), message


def test_a_pool_worker_killed_from_outside_is_a_one_line_error():
    seen = []
    with pytest.raises(LmpipeError, match=r"^data\.engine=local: a worker process died while item") as info:
        for result, pid in map_ordered(square_with_pid, range(20), engine="local", workers=2):
            if not seen:
                os.kill(pid, signal.SIGKILL)
            seen.append(result)
    assert "\n" not in str(info.value)
    # Results the other process finished before the kill may still come back; never the whole map.
    assert seen[0] == 0 and len(seen) < 20, seen


@pytest.mark.parametrize("name", ["dask-local-cluster", "dask-scheduler"])
def test_an_item_that_kills_every_dask_worker_running_it_is_a_one_line_error_naming_it(name, request):
    with pytest.raises(LmpipeError) as info:
        list(map_ordered(exit_on_negative, [1, 2, 3, -4, 5, 6], **engine_kwargs(name, request)))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("data.engine=dask: item 3 was running on every worker that died under it on ")


def test_a_dask_worker_killed_mid_map_is_replaced_and_its_items_rerun(cluster):
    """On a cluster, one dead worker is routine: its nanny starts a new one and the scheduler reruns the lost
    tasks, so the map still completes, same results, same order."""
    results, pids = [], set()
    for result, pid in map_ordered(square_with_pid, range(20), engine="dask", address=cluster):
        if not results:
            os.kill(pid, signal.SIGKILL)
        results.append(result)
        pids.add(pid)
    assert results == [i * i for i in range(20)]
    assert len(pids) >= 2


def test_a_cluster_left_without_workers_is_a_one_line_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_module, "NO_WORKERS_TIMEOUT_S", 3)
    with dask_cluster(tmp_path) as address:
        _, workers = cluster_pids(address)
        with pytest.raises(LmpipeError) as info:
            for i, _ in enumerate(map_ordered(square_with_pid, range(50), engine="dask", address=address)):
                if i == 2:
                    for pid in workers:
                        os.kill(pid, signal.SIGKILL)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"data.engine=dask: the Dask scheduler at {address} has had no worker for 3 s")


def test_a_scheduler_that_dies_mid_map_is_a_one_line_error(tmp_path):
    with dask_cluster(tmp_path) as address:
        scheduler, _ = cluster_pids(address)
        with pytest.raises(LmpipeError) as info:
            for i, _ in enumerate(map_ordered(square_with_pid, range(50), engine="dask", address=address)):
                if i == 2:
                    os.kill(scheduler, signal.SIGKILL)
    message = str(info.value)
    assert "\n" not in message
    assert re.match(
        rf"data\.engine=dask: (item \d+ was cancelled on|lost) the Dask scheduler at {address}", message
    )


def test_a_connection_reset_between_polls_is_a_one_line_error(monkeypatch):
    """The race the kill above can hit: the client's gather finds the socket reset before its status changes."""
    require_dask()
    from distributed.comm import CommClosedError

    class ResetFuture:
        def result(self, timeout):
            raise CommClosedError("in <TCP (closed) ConnectionPool.gather>: ConnectionResetError")

    class RunningClient:
        status = "running"

        def submit(self, fn, item, pure):
            return ResetFuture()

        def cancel(self, futures):
            raise CommClosedError("closed")

        def close(self):
            pass

    monkeypatch.setattr(engine_module, "_dask_client", lambda address, workers: (RunningClient(), None))
    with pytest.raises(LmpipeError) as info:
        list(map_ordered(square, [1, 2], engine="dask", address="tcp://127.0.0.1:1", max_in_flight=2))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "data.engine=dask: lost the Dask scheduler at tcp://127.0.0.1:1 while item 0 was in flight"
    )


def test_no_scheduler_at_the_address_is_a_one_line_error(monkeypatch):
    require_dask()
    monkeypatch.setattr(engine_module, "CONNECT_TIMEOUT_S", 2)
    with pytest.raises(LmpipeError) as info:
        list(map_ordered(square, [1], engine="dask", address="tcp://127.0.0.1:9"))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "data.engine_address='tcp://127.0.0.1:9': no Dask scheduler answered within 2 s"
    )


def test_bad_engine_arguments_are_one_line_errors():
    with pytest.raises(LmpipeError, match=r"^data\.engine='spark': expected 'local' or 'dask'$"):
        map_ordered(square, [1], engine="spark")
    with pytest.raises(LmpipeError, match=r"^max_in_flight=0: expected at least 1$"):
        map_ordered(square, [1], workers=2, max_in_flight=0)
    with pytest.raises(
        LmpipeError, match=r"^data\.engine_address='tcp://h:8786' is set but data\.engine='local'"
    ):
        map_ordered(square, [1], address="tcp://h:8786")


def test_workers_zero_means_one_per_core():
    assert resolve_workers(0) == os.cpu_count()
    assert resolve_workers(3) == 3


def test_data_config_engine_fields_are_validated():
    assert (DataConfig().engine, DataConfig().workers, DataConfig().engine_address) == ("local", 0, "")
    with pytest.raises(LmpipeError, match=r"^data\.engine='spark': expected 'local' or 'dask'$"):
        DataConfig(engine="spark")
    with pytest.raises(LmpipeError, match=r"^data\.workers=-1: expected a value greater than or equal to 0$"):
        DataConfig(workers=-1)
    with pytest.raises(
        LmpipeError, match=r"^data\.engine_address='tcp://h:8786' is set but data\.engine='local'"
    ):
        DataConfig(engine_address="tcp://h:8786")


def test_engine_dask_without_the_extra_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(
        sys.modules, "distributed", None
    )  # what `import distributed` meets when not installed
    with pytest.raises(LmpipeError) as info:
        DataConfig(engine="dask")
    assert str(info.value) == (
        "data.engine=dask: the optional Dask extra is not installed; "
        "run make setup-dask (or: pip install -r requirements-dask.lock)"
    )


# The stages, end to end, as a user runs them: the local engine, then the test cluster.

CORPUS_LINES = [
    f"Paragraph {i} of document {i // 5}: the quick brown fox jumps over the lazy dog {i % 7} times."
    for i in range(400)
]


def stage_reads(script: str) -> tuple[tuple[str, ...], bool]:
    """A stage script's SECTIONS, and whether the code it runs uses map_ordered (imports or names it: then,
    told to, it must run something on the cluster)."""
    from dvc_graph import closure, module_file

    from lmpipe.stage import stage_scripts

    def uses(path: Path) -> bool:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.ImportFrom) else []
            if "map_ordered" in names or (isinstance(node, ast.Name) and node.id == "map_ordered"):
                return True
        return False

    found = {s.path.name: s for s in stage_scripts(ROOT / "pipelines").values()}[script]
    code = [found.path] + [
        module_file(m) for m in closure(found.path, found.sections) - {"lmpipe.data.engine"}
    ]
    return found.sections, any(uses(path) for path in code)


def run_stage(workdir: Path, script: str, out: Path, *overrides: str) -> None:
    env = cluster_env(GX_ANALYTICS_ENABLED="false", MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.run(
        [sys.executable, f"pipelines/{script}", *overrides, f"paths.prepared={out / 'prepared'}",
         f"paths.tokens={out / 'tokens'}", f"paths.metrics={out / 'metrics'}"],
        cwd=workdir, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def tasks_run(address: str) -> int:
    """How many tasks the cluster's scheduler has run so far."""
    from distributed import Client

    def count(dask_scheduler) -> int:
        return sum(p.state_counts["memory"] for p in dask_scheduler.task_prefixes.values())

    with Client(address, timeout=10) as client:
        return client.run_on_scheduler(count)


@pytest.mark.slow
def test_prepare_and_tokenize_on_a_dask_cluster_give_the_local_bytes(cluster, tmp_path):
    workdir = tmp_path / "repo"
    shutil.copytree(ROOT / "conf", workdir / "conf")
    shutil.copytree(ROOT / "pipelines", workdir / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    (workdir / "corpus").mkdir()
    (workdir / "corpus" / "a.txt").write_text("\n\n".join(CORPUS_LINES[:200]) + "\n", encoding="utf-8")
    (workdir / "corpus" / "b.txt").write_text("\n\n".join(CORPUS_LINES[200:]) + "\n", encoding="utf-8")
    common = [
        "data=text",
        "data.paths=[corpus/*.txt]",
        "data.txt_paragraphs_per_doc=2",
        "tokenizer.vocab_size=300",
    ]
    dask = ["data.engine=dask", f"data.engine_address={cluster}"]

    outputs = {}
    for name, engine in [("local", []), ("dask", dask)]:
        out = tmp_path / name
        before = tasks_run(cluster)
        run_stage(workdir, "prepare.py", out, *common[:3], *engine)
        sections, uses_engine = stage_reads("tokenize_corpus.py")
        run_stage(workdir, "tokenize_corpus.py", out, *(common if "data" in sections else common[3:]),
                  *(engine if "data" in sections else []))  # fmt: skip
        ran = tasks_run(cluster) - before
        if name == "local":
            assert ran == 0
        elif stage_reads("prepare.py")[1] or uses_engine:
            assert ran > 0, "a stage that runs lmpipe.data.engine ran nothing on the cluster it was given"
        outputs[name] = {
            str(p.relative_to(out)): p.read_bytes()
            for p in sorted(out.rglob("*"))
            if p.is_file() and p.parent.name in ("prepared", "tokens")
        }
    assert set(outputs["local"]) >= {"prepared/corpus.parquet", "tokens/train.bin", "tokens/meta.json"}
    assert outputs["dask"] == outputs["local"]
