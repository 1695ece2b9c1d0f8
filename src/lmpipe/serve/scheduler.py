"""Continuous batching: one decode loop, in a worker thread, shares every step between the running requests.

Why: one forward over B rows costs far less than B forwards of one row (the README's benchmark: a batch of 8
decodes 3-4x faster per token than a batch of 1), so concurrent users should share steps rather than queue
for the engine. Why a thread: ONNX Runtime releases the GIL while it runs, so the event loop keeps answering
(health checks, new requests, streamed chunks) during a step.

A request becomes a `Ticket` (one prompt, or the prompts of one completions request) and waits in a bounded
queue. Between two steps the loop admits the waiting tickets that fit in `max_running` rows, in arrival order,
prefills each one's prompts (left-padded, as `OrtEngine` batches a request) and joins them to the running
batch: into the slots of rows that have left, or appended, both caches left-padded with masked columns to a
common length. Every step samples each ticket's rows with that ticket's own parameters and random generator,
exactly as `OrtEngine.generate` samples the same prompts alone: the same draws in the same order, so a seeded
result does not depend on what else runs. The logits are those of the row alone up to the order in which
masked zeros are summed, so fp32 greedy decoding gives the same tokens (tested); dynamic int8 quantizes
activations over the whole batch, so near-ties can flip.
Rows that finish, and rows whose client went away, leave the batch before the next forward, their slots free
for the next request to join (`_Batch`); the cache is compacted when free slots or columns no running row
reads waste more than a copy costs, so it outgrows the longest running sequence by at most a third.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import numpy as np

from lmpipe.inference.engine import Completion, _stable_length
from lmpipe.inference.sampling import GenerationParams, sample_next
from lmpipe.serve.errors import ApiError

if TYPE_CHECKING:
    from lmpipe.inference.engine import OrtEngine, Past, _Sequence

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1
"""What a 503 for a full queue tells the client to wait (Retry-After, seconds): slots free every few steps."""

SWITCH_INTERVAL_S = 0.0005
"""Longest time a thread keeps the GIL while another waits for it, once a scheduler runs (sys.setswitchinterval;
Python's default is 0.005): the decode thread's wait after every forward."""
Delta = tuple[int, str, str | None]
"""(prompt index in its request, new text, finish reason or None), as `OrtEngine.stream` yields them."""


class Ticket:
    """One request in the scheduler: its sequences, sampling parameters and random generator, and the queue
    through which the worker thread reports to the request's coroutine (admitted, deltas, done or an error).

    Created by `Scheduler.submit` on the event loop; everything but `cancel` and the awaiting methods is the
    worker's."""

    def __init__(self, sequences: list[_Sequence], params: GenerationParams, stream: bool, scheduler):
        self.sequences, self.params, self.stream = sequences, params, stream
        self.rng = np.random.default_rng(params.seed)
        self.cancelled = False
        self._admitted = False
        self._scheduler = scheduler
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self._sent = [0] * len(sequences)
        self._pending: list[Delta] = []

    # --- the request's side (event loop) ---

    async def admitted(self) -> None:
        """Return once the request's rows are in the running batch (raises what the worker reported)."""
        if self._admitted:
            return
        kind, value = await self._events.get()
        if kind == "error":
            raise value
        assert kind == "admitted", kind
        self._admitted = True

    async def result(self) -> list[Completion]:
        """The completions, once every row has finished."""
        kind, value = await self._events.get()
        if kind == "error":
            raise value
        return value

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """The streamed pieces, a step's worth at a time, until every row has finished."""
        while True:
            kind, value = await self._events.get()
            if kind == "error":
                raise value
            if kind == "done":
                return
            yield value

    def cancel(self) -> None:
        """Give the request up (its client left, or it waited too long): it leaves the queue now, or the batch
        before the next step. Harmless once it has finished."""
        self._scheduler._withdraw(self)

    # --- the worker's side ---

    def _post(self, kind: str, value=None) -> None:
        """Queue an event for the request's coroutine; the scheduler delivers a step's events together."""
        self._scheduler._outbox.append((self, (kind, value)))

    def _pushed(self, index: int) -> None:
        """Note what row `index`'s new token lets a stream send (text held back as `OrtEngine.stream` does)."""
        if not self.stream:
            return
        seq, sent = self.sequences[index], self._sent[index]
        if seq.finish_reason is not None:
            self._pending.append((index, seq.text[sent:], seq.finish_reason))
            return
        stable = _stable_length(seq.text, self.params.stop)
        if stable > sent:
            self._pending.append((index, seq.text[sent:stable], None))
            self._sent[index] = stable

    def _flush(self) -> bool:
        """Post this step's deltas, and the end once every row has finished (then True)."""
        if self._pending:
            self._post("deltas", self._pending)
            self._pending = []
        if any(seq.finish_reason is None for seq in self.sequences):
            return False
        self._post("done", None if self.stream else [_completion(seq) for seq in self.sequences])
        return True


class Scheduler:
    """The waiting queue and the decode loop over one engine. `submit` and `cancel` are called on the event
    loop; the loop itself runs in a daemon thread, started by `start` (or the first `submit`)."""

    def __init__(self, engine: OrtEngine, max_running: int, max_queue: int):
        self.engine, self.max_running, self.max_queue = engine, max_running, max_queue
        self._cond = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._batch = _Batch(engine)
        self._prefilling = 0
        self._outbox: list[tuple[Ticket, tuple]] = []  # the worker's events not yet handed to the event loop

    @property
    def running(self) -> int:
        """Rows in the running batch, those being prefilled to join it included."""
        return self._batch.live + self._prefilling

    @property
    def waiting(self) -> int:
        """Requests waiting to join the running batch."""
        return len(self._waiting)

    def start(self) -> None:
        # The decode thread holds the GIL only between forwards; when a forward returns, it waits for the GIL
        # until the event loop thread yields it, by default up to 5 ms, as long as a batched step itself.
        # With 0.5 ms, 16 clients got 1.25x the tokens/s (median of 6 interleaved runs of bench/serve.py's
        # requests on a busy 2-core machine, the same CPU time per token), so the interpreter's switch
        # interval comes down for the whole server process.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        with self._cond:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._work, name="lmpipe-decode", daemon=True)
                self._thread.start()

    def submit(self, prompt_ids: list[list[int]], params: GenerationParams, stream: bool) -> Ticket:
        """Queue the prompts (token ids, already checked to fit the context) as one request; a full queue or
        a server shutting down is a 503."""
        track_text = stream or bool(params.stop)
        sequences = [self.engine._sequence(list(ids), params, track_text) for ids in prompt_ids]
        ticket = Ticket(sequences, params, stream, self)
        with self._cond:
            if self._closing:
                raise ApiError(503, "the server is shutting down: retry on another instance", code="shutdown")
            if len(self._waiting) >= self.max_queue:
                raise ApiError(
                    503,
                    f"{len(self._waiting)} requests already wait to be served (max_queue={self.max_queue}): "
                    f"retry in {RETRY_AFTER_S} s",
                    code="queue_full",
                    headers={"Retry-After": str(RETRY_AFTER_S)},
                )
            self._waiting.append(ticket)
            self._cond.notify()
        self.start()
        return ticket

    def close(self, timeout: float = 10) -> None:
        """Stop the loop: whatever still waits or runs gets a 503; wait up to `timeout` s for the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def _withdraw(self, ticket: Ticket) -> None:
        with self._cond:
            ticket.cancelled = True
            if ticket in self._waiting:
                self._waiting.remove(ticket)

    def _take(self, running: int) -> list[Ticket]:
        """The waiting tickets that join now (called holding the lock): in arrival order while their rows fit;
        a request with more prompts than max_running joins alone once the batch is empty."""
        taken, rows = [], running
        while self._waiting:
            n = len(self._waiting[0].sequences)
            if rows + n > self.max_running and rows > 0:
                break
            taken.append(self._waiting.popleft())
            rows += n
        return taken

    def _work(self) -> None:
        batch = self._batch
        while True:
            with self._cond:
                while not (self._waiting or batch.live or self._closing):
                    self._cond.wait()
                if self._closing:
                    leftover = [*self._waiting, *batch.tickets()]
                    self._waiting.clear()
                    break
                joining = self._take(batch.live)
            if joining:
                self._join(batch, joining)
            if batch.live:
                self._step(batch)
            self._deliver()
        batch.clear()
        for ticket in leftover:
            ticket._post(
                "error", ApiError(503, "the server shut down before this request finished", code="shutdown")
            )
        self._deliver()

    def _deliver(self) -> None:
        """Hand the events of this step to the event loop(s) in one call each: every call_soon_threadsafe is a
        socket write to wake the loop, after which the decode thread waits for the GIL again; one per step
        instead of one per request per step."""
        if not self._outbox:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, tuple]]] = {}
        for ticket, event in self._outbox:
            by_loop.setdefault(ticket._loop, []).append((ticket, event))
        self._outbox = []
        for loop, events in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_events, events)
            except RuntimeError:  # the event loop is closed: nobody is waiting any more
                pass

    def _join(self, batch: _Batch, tickets: list[Ticket]) -> None:
        """Prefill the joining tickets, one request at a time, and add their rows to the batch. Why not all
        together: prompts of other requests would be padded to the longest, and a batched prefill saved
        nothing on CPU (a prefill is already matrix work, unlike a decode step)."""
        self._prefilling = sum(len(t.sequences) for t in tickets)
        try:
            for ticket in tickets:
                if not ticket.cancelled:  # else its client left while the ones before it were prefilled
                    prompts = [seq.prompt_ids for seq in ticket.sequences]
                    batch.add([(ticket, i) for i in range(len(prompts))], prompts)
                self._prefilling -= len(ticket.sequences)  # now counted in the batch, or gone
        except Exception as exc:  # a broken engine must not take the loop down: these requests fail
            log.exception("prefill of %d requests failed", len(tickets))
            _fail(tickets, exc)
            return
        finally:
            self._prefilling = 0
        for ticket in tickets:
            ticket._post("admitted")

    def _step(self, batch: _Batch) -> None:
        """Sample every row's next token with its request's parameters, report it, let finished and
        cancelled rows go, and run the next forward."""
        tokens = np.full(len(batch.slots), self.engine.config["pad_id"], dtype=np.int64)
        groups: dict[Ticket, list[int]] = {}
        for slot, ticket, _ in batch.rows():
            groups.setdefault(ticket, []).append(slot)
        for ticket, slots in groups.items():
            if not ticket.cancelled:
                tokens[slots] = sample_next(batch.logits[slots], ticket.params, ticket.rng)
        leaving = []
        for slot, ticket, i in batch.rows():
            if ticket.cancelled:
                leaving.append(slot)
                continue
            seq = ticket.sequences[i]
            seq.push(int(tokens[slot]))
            ticket._pushed(i)
            if seq.finish_reason is not None:
                leaving.append(slot)
        for ticket in groups:
            if not ticket.cancelled:
                ticket._flush()
        tokens = batch.release(leaving, tokens)
        if batch.live:
            try:
                batch.advance(tokens)
            except Exception as exc:
                log.exception("decode step over %d rows failed", batch.live)
                _fail(batch.tickets(), exc)
                batch.clear()


class _Batch:
    """The running rows and what the next step needs: each row's last logits, the per-layer cache, the
    attention mask over the cache's columns and each row's next position.

    A row that leaves frees its slot instead of being cut out at once: copying the whole cache to drop one
    row cost about as much as a decode step (the benchmark's 16 clients spent 45 % of the decode thread on
    such copies), while a free slot costs one row of the forward. A joining prompt takes free slots in place
    (its cache written into those rows, right-aligned); the cache is compacted (free slots dropped, columns
    no running row reads cut off) only once free slots are at least as many as running rows, one has stayed
    free for `FREE_STEPS` steps, or the unread columns reach a quarter of the cache."""

    FREE_STEPS = 8
    """Steps a free slot may wait for a joining request before the cache is compacted without it."""

    def __init__(self, engine: OrtEngine):
        self.engine = engine
        self.clear()

    def clear(self) -> None:
        self.slots: list[tuple[Ticket, int] | None] = []  # (ticket, its prompt index), None = free
        self.logits = np.zeros((0, 0), dtype=np.float32)  # (slots, vocabulary) once a row has joined
        self.past: Past = []
        self.mask = np.zeros((0, 0), dtype=np.int64)
        self.next_pos = np.zeros((0, 1), dtype=np.int64)
        self.freed: dict[int, int] = {}  # free slot -> steps since it was freed

    @property
    def live(self) -> int:
        """Running rows (free slots not counted)."""
        return len(self.slots) - len(self.freed)

    def rows(self) -> list[tuple[int, Ticket, int]]:
        """(slot, ticket, prompt index) of every running row."""
        return [(slot, *row) for slot, row in enumerate(self.slots) if row is not None]

    def tickets(self) -> list[Ticket]:
        return list(dict.fromkeys(row[0] for row in self.slots if row is not None))

    def add(self, rows: list[tuple[Ticket, int]], prompts: list[list[int]]) -> None:
        """Prefill `prompts` (left-padded among themselves) and join their rows to the batch: into free slots
        when there are enough and the prompts fit the cache's width, else appended."""
        width = max(map(len, prompts))
        ids = np.full((len(prompts), width), self.engine.config["pad_id"], dtype=np.int64)
        mask = np.zeros_like(ids)
        for r, prompt in enumerate(prompts):
            ids[r, width - len(prompt) :] = prompt
            mask[r, width - len(prompt) :] = 1
        positions = np.maximum(mask.cumsum(axis=1) - 1, 0)
        logits, past = self.engine.forward(ids, positions, mask, None)
        logits, next_pos = logits[:, -1], positions[:, -1:] + 1
        if len(rows) <= len(self.freed) and width <= self.mask.shape[1]:
            slots = np.asarray(sorted(self.freed)[: len(rows)], dtype=np.int64)
            pad = self.mask.shape[1] - width
            for (k0, v0), (k1, v1) in zip(self.past, past, strict=True):
                for old, new in ((k0, k1), (v0, v1)):
                    old[slots, :, :pad] = 0
                    old[slots, :, pad:] = new
            self.mask[slots, :pad] = 0
            self.mask[slots, pad:] = mask
            self.logits[slots], self.next_pos[slots] = logits, next_pos
            for slot, row in zip(slots.tolist(), rows, strict=True):
                self.slots[slot] = row
                del self.freed[slot]
            return
        if self.freed:
            self._compact()
        if self.slots:
            past = [
                (_right_aligned(k0, k1, axis=2), _right_aligned(v0, v1, axis=2))
                for (k0, v0), (k1, v1) in zip(self.past, past, strict=True)
            ]
            mask = _right_aligned(self.mask, mask, axis=1)
            logits = np.concatenate((self.logits, logits))
            next_pos = np.concatenate((self.next_pos, next_pos))
        self.past, self.mask, self.logits, self.next_pos = past, mask, logits, next_pos
        self.slots = self.slots + rows

    def release(self, slots: list[int], tokens: np.ndarray) -> np.ndarray:
        """Free `slots`, compact the cache if that pays now, and return `tokens` (one per slot) for the
        slots that remain."""
        for slot in self.freed:
            self.freed[slot] += 1
        for slot in slots:
            self.slots[slot] = None
            self.freed[slot] = 0
            self.next_pos[slot] = 0  # a free slot still goes through the forward: at a valid position
        if not self.live:
            self.clear()
            return tokens[:0]
        if not self.freed:
            return tokens
        running = np.asarray([slot for slot, row in enumerate(self.slots) if row is not None])
        unread = int(self.mask[running].any(axis=0).argmax())
        if (
            len(self.freed) >= self.live
            or max(self.freed.values()) >= self.FREE_STEPS
            or unread * 4 >= self.mask.shape[1]
        ):
            self._compact()
            return tokens[running]
        return tokens

    def _compact(self) -> None:
        """Drop the free slots and cut the leading cache columns no running row reads."""
        index = np.asarray([slot for slot, row in enumerate(self.slots) if row is not None], dtype=np.int64)
        mask = self.mask[index]
        cut = int(mask.any(axis=0).argmax())
        self.slots = [self.slots[slot] for slot in index.tolist()]
        self.freed = {}
        self.mask = np.ascontiguousarray(mask[:, cut:])
        self.past = [
            (np.ascontiguousarray(k[index, :, cut:]), np.ascontiguousarray(v[index, :, cut:]))
            for k, v in self.past
        ]
        self.logits, self.next_pos = self.logits[index], self.next_pos[index]

    def advance(self, tokens: np.ndarray) -> None:
        """Feed each slot its new token (a free one the pad token): the logits of the next step."""
        self.mask = np.concatenate((self.mask, np.ones((len(self.slots), 1), dtype=np.int64)), axis=1)
        logits, self.past = self.engine.forward(tokens[:, None], self.next_pos, self.mask, self.past)
        self.logits = logits[:, -1]
        self.next_pos = self.next_pos + 1
        for slot in self.freed:
            self.next_pos[slot] = 0


def _right_aligned(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
    """a's rows then b's, each left-padded with zeros along `axis` to the longer of the two."""
    width = max(a.shape[axis], b.shape[axis])
    shape = list(a.shape)
    shape[0], shape[axis] = a.shape[0] + b.shape[0], width
    out = np.zeros(shape, dtype=a.dtype)
    for start, part in ((0, a), (a.shape[0], b)):
        where = [slice(None)] * a.ndim
        where[0] = slice(start, start + part.shape[0])
        where[axis] = slice(width - part.shape[axis], width)
        out[tuple(where)] = part
    return out


def _put_events(events: list[tuple[Ticket, tuple]]) -> None:
    """On the event loop: give each request its events, in the order the worker posted them."""
    for ticket, event in events:
        ticket._events.put_nowait(event)


def _completion(seq: _Sequence) -> Completion:
    return Completion(
        text=seq.text,
        token_ids=seq.token_ids,
        finish_reason=seq.finish_reason,
        prompt_tokens=len(seq.prompt_ids),
        completion_tokens=len(seq.token_ids),
    )


def _fail(tickets: list[Ticket], exc: Exception) -> None:
    error = ApiError(500, f"generation failed: {type(exc).__name__}: {exc}"[:300], code="generation_failed")
    for ticket in tickets:
        ticket.cancelled = True
        ticket._post("error", error)
