"""Continuous batching: requests that join and leave a running batch get what they would get alone."""

import asyncio

import numpy as np
import pytest
from paced import Paced
from tiny_models import export_tiny_model

from lmpipe.export import ExportConfig
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams
from lmpipe.serve.errors import ApiError
from lmpipe.serve.scheduler import Scheduler, _Batch

PROMPTS = ["God", "In the beginning God created", "And the earth was without form, and void", "Israel came"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny random GPT (block_size 64) exported to ONNX, fp32."""
    root = tmp_path_factory.mktemp("scheduler")
    export_tiny_model(root, root / "onnx", ExportConfig(parity_decode_steps=2), variant_name="tiny")
    return OrtEngine(root / "onnx", threads=1)


def ids(engine, text: str) -> list[int]:
    return engine.encode_prompt(text, chat=False)


def alone(engine, prompts: list[str], params: GenerationParams) -> list[str]:
    return [c.text for c in engine.generate(prompts, params, chat=False)]


def greedy(n: int, **more) -> GenerationParams:
    return GenerationParams(max_new_tokens=n, **more)


SAMPLED = GenerationParams(max_new_tokens=24, temperature=0.9, top_k=40, top_p=0.95, seed=3)


async def texts(ticket) -> list[str]:
    await ticket.admitted()
    return [c.text for c in await ticket.result()]


async def streamed(ticket, n: int) -> list[str]:
    await ticket.admitted()
    parts = [""] * n
    async for deltas in ticket.deltas():
        for index, text, _ in deltas:
            parts[index] += text
    return parts


def test_requests_joining_and_leaving_a_running_batch_get_their_results_alone(engine):
    """A runs; B (sampled, seeded, two prompts), C (streamed, with a stop) and D join it at different steps and
    finish at different steps; with max_running=4 D waits for a slot. Every result is the request's alone."""
    paced = Paced(engine)
    stop = alone(engine, [PROMPTS[2]], greedy(30))[0][5:8]
    requests = {
        "A": ([PROMPTS[0]], greedy(30), False),
        "B": ([PROMPTS[1], PROMPTS[3]], SAMPLED, False),
        "C": ([PROMPTS[2]], greedy(30, stop=[stop]), True),
        "D": ([PROMPTS[3]], greedy(10), False),
    }

    async def main():
        scheduler = Scheduler(paced, max_running=4, max_queue=8)
        try:

            def submit(name):
                prompts, params, stream = requests[name]
                ticket = scheduler.submit([ids(engine, p) for p in prompts], params, stream)
                return asyncio.ensure_future(streamed(ticket, len(prompts)) if stream else texts(ticket))

            a = submit("A")
            paced.allow(4)  # A's prefill and three steps
            await asyncio.to_thread(paced.wait_calls, 5)
            b = submit("B")
            paced.allow(3)
            await asyncio.to_thread(paced.wait_calls, 8)
            c, d = submit("C"), submit("D")  # C fits beside A and B; D waits for a row to leave
            paced.allow(1000)
            return dict(zip("ABCD", await asyncio.gather(a, b, c, d), strict=True))
        finally:
            scheduler.close()

    got = asyncio.run(main())
    for name, (prompts, params, _) in requests.items():
        assert got[name] == alone(engine, prompts, params), name
    assert got["C"][0] == alone(engine, [PROMPTS[2]], greedy(30))[0].split(stop)[0]
    prefills = [rows for rows, cached, _ in paced.calls if cached == 0]
    assert prefills == [1, 2, 1, 1]  # one prefill per request: each joined between two steps
    assert max(rows for rows, cached, _ in paced.calls if cached) == 4  # A, B's two rows and C shared steps
    # D joined after rows had left: the cache never grew past the longest running sequence.
    assert max(cached for _, cached, _ in paced.calls) < 64


@pytest.mark.parametrize("company", [[], ["God", "Israel came"], ["And the earth was without form"]])
def test_a_seeded_sampled_result_does_not_depend_on_the_rest_of_the_batch(engine, company):
    """The same seeded request, alone or among other sampled and greedy requests (which arrive first, so it
    joins them mid-run), always samples the same text: its own generator, its own rows."""
    paced = Paced(engine)
    paced.allow(10_000)

    async def main():
        scheduler = Scheduler(paced, max_running=8, max_queue=8)
        try:
            others = [
                scheduler.submit(
                    [ids(engine, p)], GenerationParams(max_new_tokens=30, temperature=1.0, seed=i), False
                )
                for i, p in enumerate(company)
            ]
            others.append(scheduler.submit([ids(engine, "God")], greedy(30), True))
            await others[-1].admitted()
            mine = scheduler.submit([ids(engine, PROMPTS[1])], SAMPLED, stream=True)
            result = await streamed(mine, 1)
            for other in others:
                other.cancel()
            return result
        finally:
            scheduler.close()

    assert asyncio.run(main()) == alone(engine, [PROMPTS[1]], SAMPLED)


def test_a_cancelled_request_leaves_the_batch_at_the_next_step(engine):
    paced = Paced(engine)

    async def main():
        scheduler = Scheduler(paced, max_running=2, max_queue=8)
        try:
            gone = scheduler.submit([ids(engine, "God")], greedy(30), stream=True)
            stays = scheduler.submit([ids(engine, PROMPTS[2])], greedy(30), stream=False)
            paced.allow(10)  # both prefilled (together or one after the other), then steps of two rows
            await asyncio.to_thread(paced.wait_calls, 11)
            assert scheduler.running == 2 and paced.calls[-1][0] == 2
            gone.cancel()
            paced.allow(1)  # the step under way ends; the next forward is the survivor's alone
            await asyncio.to_thread(paced.wait_calls, 12)
            assert scheduler.running == 1 and paced.calls[-1][0] == 1
            paced.allow(1000)
            return await texts(stays)
        finally:
            scheduler.close()

    assert asyncio.run(main()) == alone(engine, [PROMPTS[2]], greedy(30))


def test_the_queue_is_bounded_and_a_request_too_large_for_the_batch_runs_alone(engine):
    paced = Paced(engine)

    async def main():
        scheduler = Scheduler(paced, max_running=1, max_queue=2)
        try:
            running = scheduler.submit([ids(engine, "God")], greedy(5), False)
            await asyncio.to_thread(paced.wait_calls, 1)  # admitted: its prefill waits for a permit
            queued = [scheduler.submit([ids(engine, p)], greedy(5), False) for p in PROMPTS[:2]]
            with pytest.raises(ApiError) as full:
                scheduler.submit([ids(engine, "God")], greedy(5), False)
            assert scheduler.waiting == 2
            queued[0].cancel()  # leaves the queue at once: room for one more
            assert scheduler.waiting == 1
            wide = scheduler.submit([ids(engine, p) for p in PROMPTS[:3]], greedy(5), False)
            paced.allow(1000)
            return full.value, await texts(running), await texts(queued[1]), await texts(wide)
        finally:
            scheduler.close()

    full, *results = asyncio.run(main())
    assert (full.status, full.code, full.headers) == (503, "queue_full", {"Retry-After": "1"})
    assert "2 requests already wait to be served (max_queue=2)" in full.message
    assert results == [
        alone(engine, ["God"], greedy(5)),
        alone(engine, [PROMPTS[1]], greedy(5)),
        alone(engine, PROMPTS[:3], greedy(5)),
    ]
    wide = paced.calls.index(next(c for c in paced.calls if c[:2] == (3, 0)))
    assert {rows for rows, _, _ in paced.calls[:wide]} == {1}  # batching off, then the wide request alone


def test_a_failing_step_fails_its_requests_and_the_loop_goes_on(engine):
    class Failing(Paced):
        fail = True

        def forward(self, ids, positions, mask, past=None):
            if past is not None and self.fail:
                self.fail = False
                raise RuntimeError("boom")
            return self.engine.forward(ids, positions, mask, past)

    async def main():
        scheduler = Scheduler(Failing(engine), max_running=4, max_queue=4)
        try:
            with pytest.raises(ApiError) as failed:
                await texts(scheduler.submit([ids(engine, "God")], greedy(8), False))
            return failed.value, await texts(scheduler.submit([ids(engine, "God")], greedy(8), False))
        finally:
            scheduler.close()

    failed, after = asyncio.run(main())
    assert (failed.status, failed.message) == (500, "generation failed: RuntimeError: boom")
    assert after == alone(engine, ["God"], greedy(8))


def test_close_answers_what_waits_or_runs_with_a_503(engine):
    paced = Paced(engine)

    async def main():
        scheduler = Scheduler(paced, max_running=1, max_queue=4)
        running = scheduler.submit([ids(engine, "God")], greedy(30), False)
        waiting = scheduler.submit([ids(engine, "God")], greedy(30), False)
        await asyncio.to_thread(paced.wait_calls, 1)
        closing = asyncio.ensure_future(asyncio.to_thread(scheduler.close))
        await asyncio.sleep(0.05)
        paced.allow(1000)
        await closing
        errors = []
        for ticket in (running, waiting):
            with pytest.raises(ApiError) as err:
                await texts(ticket)
            errors.append((err.value.status, err.value.code))
        with pytest.raises(ApiError) as refused:
            scheduler.submit([ids(engine, "God")], greedy(3), False)
        return errors, refused.value

    errors, refused = asyncio.run(main())
    assert errors == [(503, "shutdown"), (503, "shutdown")]
    assert (refused.status, refused.code) == (503, "shutdown")


def test_rows_leaving_cut_the_cache_to_the_longest_running_sequence(engine):
    """A chain of overlapping requests, each outliving the one before: without cutting the columns nobody
    reads, the cache would grow past block_size; it stays within each running row's length."""
    paced = Paced(engine)
    paced.allow(100_000)

    async def main():
        scheduler = Scheduler(paced, max_running=2, max_queue=8)
        try:
            results, previous = [], None
            for i in range(6):
                ticket = scheduler.submit([ids(engine, "God")], greedy(40), stream=True)
                await ticket.admitted()
                results.append(asyncio.ensure_future(streamed(ticket, 1)))
                if previous is not None:
                    await previous
                previous = results[-1]
                await asyncio.sleep(0.001 * (i % 3))
            return await asyncio.gather(*results)
        finally:
            scheduler.close()

    out = asyncio.run(main())
    assert out == [alone(engine, ["God"], greedy(40))] * 6
    prompt = len(ids(engine, "God"))
    assert max(cached + new for _, cached, new in paced.calls) <= prompt + 40
    assert np.all([rows <= 2 for rows, _, _ in paced.calls])


THREE = ((PROMPTS[2], 30), ("God", 3), (PROMPTS[1], 30))
"""A, B, C: (prompt, greedy new tokens); B leaves long before the other two."""


def test_a_row_that_leaves_frees_its_slot_for_the_next_request(engine):
    """B leaves a batch of three: its slot stays in the forward (no copy of the cache to cut it out), and D,
    joining next, takes it in place, so no forward runs two rows. Every result is still the request's alone."""
    paced = Paced(engine)

    async def main():
        scheduler = Scheduler(paced, max_running=3, max_queue=8)
        try:
            a, b, c = (scheduler.submit([ids(engine, p)], greedy(n), stream=False) for p, n in THREE)
            b_done = asyncio.ensure_future(texts(b))
            while not b_done.done():  # one forward at a time until B has its answer
                paced.allow(1)
                await asyncio.sleep(0.02)
            left = len(paced.calls)  # the forward after B left, then the next one, waiting for its permit
            assert scheduler.running == 2 and paced.calls[-1][0] == paced.calls[-2][0] == 3
            d = scheduler.submit([ids(engine, PROMPTS[3])], greedy(20), stream=False)
            paced.allow(1000)
            return left, [await b_done, *[await texts(t) for t in (a, c, d)]]
        finally:
            scheduler.close()

    left, results = asyncio.run(main())
    assert results == [
        alone(engine, [p], greedy(n))
        for p, n in (("God", 3), (PROMPTS[2], 30), (PROMPTS[1], 30), (PROMPTS[3], 20))
    ]
    joined = next(
        i for i in range(left, len(paced.calls)) if paced.calls[i][1] == 0 and paced.calls[i][0] == 1
    )
    assert paced.calls[joined - 1][0] == paced.calls[joined + 1][0] == 3  # D's prefill, then three rows again
    assert all(rows != 2 for rows, cached, _ in paced.calls[left - 2 : joined] if cached)


def test_a_free_slot_nobody_takes_is_compacted_away(engine):
    """B leaves a batch of three and nobody joins: its slot runs along for at most FREE_STEPS forwards, then
    the cache is compacted and the two remaining rows run alone, with their results unchanged."""
    paced = Paced(engine)

    async def main():
        scheduler = Scheduler(paced, max_running=3, max_queue=8)
        try:
            tickets = [scheduler.submit([ids(engine, p)], greedy(n), stream=False) for p, n in THREE]
            await asyncio.to_thread(paced.wait_calls, 1)  # all three wait before a first step can run
            paced.allow(100_000)
            return [await texts(t) for t in tickets]
        finally:
            scheduler.close()

    results = asyncio.run(main())
    assert results == [alone(engine, [p], greedy(n)) for p, n in THREE]
    rows = [n for n, cached, _ in paced.calls if cached]
    three = rows[rows.index(3) :]  # from the first step of all three
    two = three.index(2)
    assert 3 <= two <= 3 + _Batch.FREE_STEPS and 3 not in three[two:]
