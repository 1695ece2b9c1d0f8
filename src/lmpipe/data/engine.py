"""Run one function over a stream of items, results in input order, memory bounded: in this process, on a
local process pool, or on a Dask cluster (`data.engine`, `data.workers`, `data.engine_address`).

The data stages hand their per-batch work (clean a record batch, encode a batch of documents) to `map_ordered`
and write what comes back in order, so every engine gives the same bytes. Dask is an optional extra
(`make setup-dask`): `dask.distributed` is imported only when `engine="dask"` runs.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import CancelledError
from typing import Any

from lmpipe.errors import LmpipeError

ENGINES = ("local", "dask")
"""The values of `data.engine`."""
DASK_SETUP = "make setup-dask (or: pip install -r requirements-dask.lock)"
"""How to install the Dask extra, for the error that says it is missing."""
CONNECT_TIMEOUT_S = 30
"""How long to wait for the Dask scheduler at `data.engine_address` to answer."""
NO_WORKERS_TIMEOUT_S = 60
"""How long a Dask map waits, with work pending, for a cluster that has no worker left, before it fails."""
POLL_S = 1.0
"""How often a Dask map waiting on a result checks that the scheduler and some worker are still there."""


def resolve_workers(workers: int) -> int:
    """`data.workers` as a process count: 0 means one per core (`os.cpu_count()`)."""
    return workers if workers > 0 else (os.cpu_count() or 1)


def require_dask(field: str = "data.engine") -> None:
    """Raise a one-line error saying how to install the extra when dask.distributed cannot be imported."""
    try:
        import distributed  # noqa: F401
    except ImportError:
        raise LmpipeError(
            f"{field}=dask: the optional Dask extra is not installed; run {DASK_SETUP}"
        ) from None


def map_ordered(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    engine: str = "local",
    workers: int = 1,
    address: str = "",
    max_in_flight: int | None = None,
) -> Iterator[Any]:
    """Apply `fn` (a picklable top-level function) to each item of the iterable `items`; yield the results in
    input order. At most `max_in_flight` items (default 2 * workers) are submitted and not yet yielded, so
    memory stays bounded whatever the iterable's length. engine="local", workers<=1: plain in-process map.
    engine="local", workers>1: a process pool of `workers`. engine="dask": dask.distributed, on the scheduler
    at `address`, or on a LocalCluster of `workers` processes it starts and stops when address is ''.
    A worker that dies raises LmpipeError naming the item index and what happened.

    An exception raised by `fn` itself reaches the caller unchanged (an LmpipeError stays one). On a scheduler
    at `address` the default `max_in_flight` is twice the cluster's threads (at least 2 * workers). `workers`
    is a count here; `resolve_workers` turns `data.workers=0` into one per core.
    """
    if engine not in ENGINES:
        raise LmpipeError(f"data.engine={engine!r}: expected 'local' or 'dask'")
    if max_in_flight is not None and max_in_flight < 1:
        raise LmpipeError(f"max_in_flight={max_in_flight}: expected at least 1")
    if engine == "dask":
        return _dask_map(fn, items, max(workers, 1), address, max_in_flight)
    if address:
        raise LmpipeError(f"data.engine_address={address!r} is set but data.engine='local': expected dask")
    if workers <= 1:
        return map(fn, items)
    return _pool_map(fn, items, workers, max_in_flight or 2 * workers)


def _ordered(
    submit: Callable[[int, Any], Any],
    result: Callable[[int, Any], Any],
    items: Iterable[Any],
    max_in_flight: int,
    pending: deque[tuple[int, Any]],
) -> Iterator[Any]:
    """The bounded, ordered loop of the parallel engines: submit items while fewer than `max_in_flight` are
    pending, and yield the oldest one's `result(index, future)` before taking the next. `pending` is the
    caller's, so that its cleanup can cancel what is left when the consumer stops early or an item fails."""
    for index, item in enumerate(items):
        pending.append((index, submit(index, item)))
        if len(pending) >= max_in_flight:
            yield result(*pending.popleft())
    while pending:
        yield result(*pending.popleft())


def _pool_map(fn, items, workers: int, max_in_flight: int) -> Iterator[Any]:
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    pending: deque[tuple[int, Any]] = deque()

    def broken(index: int) -> LmpipeError:
        # The pool cannot tell which task its dead process was running: name every item then in flight.
        # `index` is the newest item when submitting fails, the oldest (already taken off) when a result does.
        first = min(index, pending[0][0]) if pending else index
        last = max(index, pending[-1][0]) if pending else index
        items_ = f"item {first} was" if last == first else f"items {first}-{last} were"
        return LmpipeError(
            f"data.engine=local: a worker process died while {items_} in flight (killed by a "
            f"signal, out of memory, or exited); the pool of {workers} processes is broken"
        )

    def submit(index: int, item):
        try:
            return pool.submit(fn, item)
        except BrokenProcessPool:  # it broke while earlier items ran: submitting fails before their results
            raise broken(index) from None

    def result(index: int, future):
        try:
            return future.result()
        except BrokenProcessPool:
            raise broken(index) from None

    # spawn, not fork: the parent may hold threads (pyarrow, tokenizers) that a forked child would inherit locked.
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        yield from _ordered(submit, result, items, max_in_flight, pending)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _dask_client(address: str, workers: int):
    """A Client on the scheduler at `address`, or on a new LocalCluster of `workers` single-threaded processes
    (returned too, for closing; None with an address)."""
    require_dask()
    from distributed import Client, LocalCluster

    if not address:
        import dask

        # One task at a time per worker (the default queues more): a worker that dies was then running exactly
        # one item, the one Dask blames. A team's scheduler is configured where it runs (the same key).
        with dask.config.set({"distributed.scheduler.worker-saturation": 1.0}):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        return Client(cluster), cluster
    try:
        return Client(address, timeout=CONNECT_TIMEOUT_S), None
    except (OSError, TimeoutError, ValueError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise LmpipeError(
            f"data.engine_address={address!r}: no Dask scheduler answered within {CONNECT_TIMEOUT_S} s "
            f"({reason}); expected a running scheduler's address, e.g. tcp://host:8786"
        ) from None


def _dask_map(fn, items, workers: int, address: str, max_in_flight: int | None) -> Iterator[Any]:
    client, cluster = _dask_client(address, workers)
    from distributed import KilledWorker
    from distributed.comm import CommClosedError

    where = f"the Dask scheduler at {address}" if address else f"a local Dask cluster of {workers} processes"

    def result(index: int, future):
        workerless_s = 0.0
        while True:
            try:
                return future.result(timeout=POLL_S)
            except TimeoutError:
                pass
            except KilledWorker:
                raise LmpipeError(
                    f"data.engine=dask: item {index} was running on every worker that died under it on {where}, "
                    "until Dask gave up on it (allowed-failures; a worker process killed by a signal, out of "
                    "memory, or exited); see the workers' logs"
                ) from None
            except CommClosedError:
                raise LmpipeError(
                    f"data.engine=dask: lost {where} while item {index} was in flight (its connection closed)"
                ) from None
            except CancelledError:
                raise LmpipeError(
                    f"data.engine=dask: item {index} was cancelled on {where} (the scheduler restarted or "
                    "the connection to it was lost)"
                ) from None
            if client.status != "running":
                raise LmpipeError(f"data.engine=dask: lost {where} while item {index} was in flight")
            workerless_s = 0.0 if client.scheduler_info()["workers"] else workerless_s + POLL_S
            if workerless_s >= NO_WORKERS_TIMEOUT_S:
                raise LmpipeError(
                    f"data.engine=dask: {where} has had no worker for {NO_WORKERS_TIMEOUT_S} s while item "
                    f"{index} waited (every worker died or left)"
                )

    pending: deque[tuple[int, Any]] = deque()
    try:
        if max_in_flight is None:
            max_in_flight = 2 * max(workers, sum(client.nthreads().values()) if address else 0)
        # pure=False: equal items are still separate tasks (and their bytes are never hashed for a key).
        submit = lambda _, item: client.submit(fn, item, pure=False)  # noqa: E731
        yield from _ordered(submit, result, items, max_in_flight, pending)
    except CommClosedError:
        # The scheduler died between two polls: the client's next gather, submit or info call finds the socket
        # reset before its own status says so.
        raise LmpipeError(f"data.engine=dask: lost {where} (its connection closed)") from None
    finally:
        if pending and client.status == "running":
            with contextlib.suppress(OSError):  # CommClosedError too: nothing to cancel on a dead scheduler
                client.cancel([future for _, future in pending])
        client.close()
        if cluster is not None:
            cluster.close()
