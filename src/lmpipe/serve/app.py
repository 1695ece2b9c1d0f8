"""The FastAPI app: one `Server` (the engine, its limits, the scheduler) shared by routes that are plain functions.

Every generation goes through the `Scheduler` (`lmpipe.serve.scheduler`): requests join one running batch
whose decode loop runs in a worker thread, so the event loop stays free for other requests (health checks
answer while the batch runs) and concurrent users share decode steps instead of queueing for the engine. A
request waits at most `request_timeout` seconds to join (then a 503), and a client that disconnects, while
waiting or mid-stream, gives its rows up at the next step. `Guard` (`lmpipe.serve.guards`) checks the API key
and the body before any route runs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmpipe.chat import render
from lmpipe.errors import LmpipeError
from lmpipe.inference.sampling import GenerationParams
from lmpipe.serve.config import ServeConfig
from lmpipe.serve.errors import HANDLERS, ApiError
from lmpipe.serve.guards import Guard
from lmpipe.serve.page import page_router
from lmpipe.serve.requests import ChatCompletionRequest, CompletionRequest, SamplingRequest
from lmpipe.serve.scheduler import Scheduler, Ticket

if TYPE_CHECKING:
    from lmpipe.encoder.serving import OrtClassifier
    from lmpipe.inference.engine import Completion, OrtEngine

log = logging.getLogger(__name__)
T = TypeVar("T")

Chunk = Callable[[int, str | None, str | None], dict | None]
"""`chunk(index, delta, finish_reason)`: the JSON object streamed for a piece (delta None: the opening chunk)."""


class ClientGone(ApiError):
    """The client closed the connection before its answer was ready (nginx's 499: nobody reads it)."""

    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed")


class Server:
    """What every route shares: the engine (already loaded, so tests can pass a small one), the limits of
    `cfg` (its model, host and port are not used here) and the scheduler every generation goes through."""

    def __init__(self, engine: OrtEngine, cfg: ServeConfig):
        self.engine, self.cfg = engine, cfg
        self.block_size = engine.block_size
        self.max_prompt = cfg.max_prompt_tokens or self.block_size - 1
        if self.max_prompt > self.block_size - 1:
            raise LmpipeError(
                f"serve.max_prompt_tokens={cfg.max_prompt_tokens}: expected at most block_size - 1 = "
                f"{self.block_size - 1} for {engine.name} (a longer prompt leaves no room to generate)"
            )
        self.model_id, self.started = engine.name, int(time.time())
        self.scheduler = Scheduler(engine, cfg.max_running, cfg.max_queue)

    async def prepare(
        self, request: SamplingRequest, texts: list[str], max_tokens: int | None, param: str
    ) -> tuple[GenerationParams, list[list[int]]]:
        """Check the request against the served model and the limits; the sampling parameters to use and the
        texts' token ids."""
        cfg, block_size, max_prompt = self.cfg, self.block_size, self.max_prompt
        if request.model is not None and request.model != self.model_id:
            raise ApiError(
                404,
                f"model {request.model!r} not found: this server serves {self.model_id!r}",
                "model",
                "model_not_found",
            )
        if request.n != 1:
            raise ApiError(400, f"n={request.n}: only n=1 is supported", "n")
        if max_tokens is not None and max_tokens > cfg.max_tokens_limit:
            raise ApiError(
                400,
                f"max_tokens={max_tokens}: more than this server's limit of {cfg.max_tokens_limit}",
                "max_tokens",
            )
        # Tokenizing a long prompt takes a while: off the event loop.
        prompt_ids = await run_in_threadpool(
            lambda: [self.engine.encode_prompt(t, chat=False) for t in texts]
        )
        counts = [len(ids) for ids in prompt_ids]
        for i, n in enumerate(counts):
            what = param if len(texts) == 1 else f"{param}[{i}]"
            if n == 0:  # text the tokenizer drops entirely (a char tokenizer's unknown characters)
                raise ApiError(400, f"{what} has no tokens: expected text the model's tokenizer knows", param)
            if n > max_prompt:
                raise ApiError(
                    400,
                    f"{what} has {n} tokens: more than max_prompt_tokens={max_prompt}",
                    param,
                    "context_length_exceeded",
                )
            room = block_size - n
            if max_tokens is not None and max_tokens > room:
                raise ApiError(
                    400,
                    f"{what} of {n} tokens + max_tokens={max_tokens} = {n + max_tokens} tokens: more "
                    f"than the model's context of {block_size} tokens (at most max_tokens={room})",
                    "max_tokens",
                    "context_length_exceeded",
                )
        if max_tokens is None:  # as OpenAI's chat does: whatever room the context leaves, up to the limit
            max_tokens = min(cfg.max_tokens_limit, block_size - max(counts))
        params = GenerationParams(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            stop=request.stops,
            seed=request.seed,
        )
        return params, prompt_ids

    async def generate(
        self, prompt_ids: list[list[int]], params: GenerationParams, request: Request
    ) -> list[Completion]:
        """The prompts' completions, generated together in the running batch."""
        ticket = await self._join(prompt_ids, params, request, stream=False)
        try:
            return await self._unless_gone(ticket.result(), request)
        finally:
            ticket.cancel()

    async def event_stream(
        self, prompt_ids: list[list[int]], params: GenerationParams, chunk: Chunk, request: Request
    ) -> StreamingResponse:
        """SSE of the prompts' completions (generated together, pieces under their index as they come),
        closed by `data: [DONE]`. The response starts once the request has joined the batch, so a full queue
        or a timeout is still a 503."""
        ticket = await self._join(prompt_ids, params, request, stream=True)

        async def events() -> AsyncIterator[str]:
            for index in range(len(prompt_ids)):
                opening = chunk(index, None, None)
                if opening is not None:
                    yield _sse(opening)
            try:
                async for deltas in ticket.deltas():
                    for index, text, finish_reason in deltas:
                        if text:
                            yield _sse(chunk(index, text, None))
                        if finish_reason is not None:
                            yield _sse(chunk(index, "", finish_reason))
            except ApiError as exc:  # the status line has gone: the error travels as the last event
                yield _sse(exc.body())
                return
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return _TicketStream(ticket, events(), media_type="text/event-stream", headers=headers)

    async def _join(
        self, prompt_ids: list[list[int]], params: GenerationParams, request: Request, stream: bool
    ) -> Ticket:
        """Queue the request and wait until it runs: a 503 after request_timeout seconds."""
        ticket = self.scheduler.submit(prompt_ids, params, stream)
        try:
            await self._unless_gone(ticket.admitted(), request, self.cfg.request_timeout)
        except BaseException:
            ticket.cancel()
            raise
        return ticket

    async def _unless_gone(self, waiting: Awaitable[T], request: Request, timeout: float | None = None) -> T:
        """What `waiting` gives, unless the client disconnects first (`ClientGone`) or `timeout` seconds pass
        (a 503)."""
        task = asyncio.ensure_future(waiting)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            task.cancel()
        if task.done() and not task.cancelled():
            return task.result()
        if gone.done() and not gone.cancelled():
            raise ClientGone()
        raise ApiError(
            503,
            f"waited {timeout:g} s to be served (request_timeout={timeout:g}): the server is busy, retry later",
            code="timeout",
        )


class _TicketStream(StreamingResponse):
    """A streamed answer that gives its ticket up however the response ends (finished, client gone, cancelled
    at shutdown), so the rows of a client that left leave the batch at the next step."""

    def __init__(self, ticket: Ticket, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ticket = ticket

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.ticket.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client disconnects (the body has been read: all that can still come is the end)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _server(request: Request) -> Server:
    return request.app.state.server


ServerDep = Annotated[Server, Depends(_server)]
router = APIRouter()


@router.get("/health")
async def health(server: ServerDep):
    return {
        "status": "ok",
        "model": server.model_id,
        "block_size": server.block_size,
        "max_prompt_tokens": server.max_prompt,
        "max_tokens_limit": server.cfg.max_tokens_limit,
        "running": server.scheduler.running,
        "waiting": server.scheduler.waiting,
        "max_running": server.cfg.max_running,
        "max_queue": server.cfg.max_queue,
    }


@router.get("/v1/models")
async def models(server: ServerDep):
    return {
        "object": "list",
        "data": [{"id": server.model_id, "object": "model", "created": server.started, "owned_by": "lmpipe"}],
    }


@router.post("/v1/completions")
async def completions(request: CompletionRequest, server: ServerDep, http: Request):
    prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
    if not prompts:
        raise ApiError(400, "prompt is an empty list: expected at least one prompt", "prompt")
    if len(prompts) > server.cfg.max_batch:
        raise ApiError(
            400, f"{len(prompts)} prompts: at most max_batch={server.cfg.max_batch} per request", "prompt"
        )
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ApiError(400, f"prompt{'' if len(prompts) == 1 else f'[{i}]'} is empty", "prompt")
    params, prompt_ids = await server.prepare(request, prompts, request.max_tokens, "prompt")
    head = _head("cmpl", "text_completion", server.model_id)
    if request.stream:

        def chunk(index, delta, finish_reason):
            if delta is None:
                return None  # completions chunks have no opening role chunk
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "choices": [choice]}

        return await server.event_stream(prompt_ids, params, chunk, http)
    done = await server.generate(prompt_ids, params, http)
    choices = [
        {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        for i, c in enumerate(done)
    ]
    return {**head, "choices": choices, "usage": _usage(done)}


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, server: ServerDep, http: Request):
    if not request.messages:
        raise ApiError(400, "messages is empty: expected at least one message", "messages")
    if request.max_tokens is not None and request.max_completion_tokens not in (None, request.max_tokens):
        raise ApiError(
            400,
            f"max_tokens={request.max_tokens} and max_completion_tokens="
            f"{request.max_completion_tokens} disagree: give one",
            "max_completion_tokens",
        )
    max_tokens = request.max_completion_tokens or request.max_tokens
    messages = [m.model_dump() for m in request.messages]
    text = render(messages, add_generation_prompt=True, template=server.engine.template)
    params, prompt_ids = await server.prepare(request, [text], max_tokens, "messages")
    head = _head("chatcmpl", "chat.completion", server.model_id)
    if request.stream:

        def chunk(index, delta, finish_reason):
            if delta is None:
                message = {"role": "assistant", "content": ""}
            else:
                message = {"content": delta} if delta else {}
            choice = {"index": index, "delta": message, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        return await server.event_stream(prompt_ids, params, chunk, http)
    [done] = await server.generate(prompt_ids, params, http)
    message = {"role": "assistant", "content": done.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
    return {**head, "choices": [choice], "usage": _usage([done])}


def create_app(engine: OrtEngine, cfg: ServeConfig, classifier: OrtClassifier | None = None) -> FastAPI:
    """A FastAPI app serving `engine` under the limits of `cfg`, and `classifier` (if any) at /v1/classify."""
    from lmpipe import serve

    server = Server(engine, cfg)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.scheduler.start()
        try:
            yield
        finally:  # uvicorn has let running requests finish (shutdown_timeout): whatever is left gets a 503
            await run_in_threadpool(server.scheduler.close)

    app = FastAPI(title="lmpipe", description=serve.__doc__.splitlines()[0], lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.include_router(router)
    app.include_router(page_router)  # the chat page at /
    if classifier is not None:
        from lmpipe.encoder.http import classify_router

        app.include_router(classify_router(classifier))
    for exc_type, handler in HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    return app


def serve(cfg: ServeConfig) -> None:
    """Load the model of `cfg.model` (and the classifier of `cfg.classifier`) and serve until SIGTERM or Ctrl-C.

    On SIGTERM the server stops accepting connections, gives running requests `shutdown_timeout` seconds to
    finish, cancels the rest and returns (exit status 0: a requested stop is not a failure)."""
    import uvicorn

    from lmpipe.inference.engine import OrtEngine
    from lmpipe.inference.resolver import resolve_model

    engine = OrtEngine(resolve_model(cfg.model), cfg.threads)
    classifier = None
    if cfg.classifier:
        from lmpipe.encoder.resolve import resolve_classifier
        from lmpipe.encoder.serving import OrtClassifier

        classifier = OrtClassifier(resolve_classifier(cfg.classifier), cfg.threads)
    app = create_app(engine, cfg, classifier)
    with _sigterm_is_a_clean_stop():
        uvicorn.run(
            app,
            host=cfg.host,
            port=cfg.port,
            log_level="info",
            timeout_graceful_shutdown=cfg.shutdown_timeout,
        )


@contextmanager
def _sigterm_is_a_clean_stop() -> Iterator[None]:
    """Make `serve` return after uvicorn's graceful shutdown on SIGTERM, so that `lmpipe serve` exits 0.

    uvicorn catches SIGTERM, shuts down, then raises the signal again under the handler it found in place, so
    that the process dies of it (status -15). The handler found in place is this one, which does nothing:
    SIGTERM is how a service manager or an orchestrator stops a server, and 0 tells it that it stopped cleanly.
    """
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _head(prefix: str, kind: str, model_id: str) -> dict[str, Any]:
    """The fields every response and chunk of one request starts with."""
    return {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "object": kind,
        "created": int(time.time()),
        "model": model_id,
    }


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(done) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
