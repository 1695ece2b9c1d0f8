"""The FastAPI app: one `Server` (the engine, its limits, the lock) shared by routes that are plain functions.

Generation is blocking numpy and ONNX Runtime work, so it runs in the threadpool, leaving the event loop free
for other requests (health checks answer while a long generation runs). An asyncio lock lets one generation
use the engine at a time: OrtEngine keeps no per-call state of its own, but it was never designed or tested
for concurrent calls, and one generation already keeps every core busy (ORT's intra-op threads), so running
several at once would only make each slower. Waiting requests queue on the lock in arrival order; a client
wanting throughput sends several prompts in one completions request, which the engine batches.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from lmpipe.chat import render
from lmpipe.errors import LmpipeError
from lmpipe.inference.sampling import GenerationParams
from lmpipe.serve.config import ServeConfig
from lmpipe.serve.errors import HANDLERS, ApiError
from lmpipe.serve.requests import ChatCompletionRequest, CompletionRequest, SamplingRequest

if TYPE_CHECKING:
    from lmpipe.encoder.serving import OrtClassifier
    from lmpipe.inference.engine import Completion, OrtEngine

Chunk = Callable[[int, str | None, str | None], dict | None]
"""`chunk(index, delta, finish_reason)`: the JSON object streamed for a piece (delta None: the opening chunk)."""


class Server:
    """What every route shares: the engine (already loaded, so tests can pass a small one), the limits of
    `cfg` (its model, host and port are not used here) and the lock that serialises generations."""

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
        self.lock = asyncio.Lock()

    async def prepare(
        self, request: SamplingRequest, texts: list[str], max_tokens: int | None, param: str
    ) -> GenerationParams:
        """Check the request against the served model and the limits; the sampling parameters to use."""
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
        counts = await run_in_threadpool(
            lambda: [len(self.engine.encode_prompt(t, chat=False)) for t in texts]
        )
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
        return GenerationParams(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            stop=request.stops,
            seed=request.seed,
        )

    async def generate(self, texts: list[str], params: GenerationParams) -> list[Completion]:
        """The raw texts' completions, once the engine is free."""
        async with self.lock:
            return await run_in_threadpool(self.engine.generate, texts, params, chat=False)

    def event_stream(self, texts: list[str], params: GenerationParams, chunk: Chunk) -> StreamingResponse:
        """SSE of the raw texts' completions, one after the other, closed by `data: [DONE]`."""

        async def events() -> AsyncIterator[str]:
            async with self.lock:
                for index, text in enumerate(texts):
                    opening = chunk(index, None, None)
                    if opening is not None:
                        yield _sse(opening)
                    deltas = self.engine.stream(text, params, chat=False)
                    try:
                        while (delta := await run_in_threadpool(next, deltas, None)) is not None:
                            if delta.text:
                                yield _sse(chunk(index, delta.text, None))
                            if delta.finish_reason is not None:
                                yield _sse(chunk(index, "", delta.finish_reason))
                    finally:
                        deltas.close()
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)


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
    }


@router.get("/v1/models")
async def models(server: ServerDep):
    return {
        "object": "list",
        "data": [{"id": server.model_id, "object": "model", "created": server.started, "owned_by": "lmpipe"}],
    }


@router.post("/v1/completions")
async def completions(request: CompletionRequest, server: ServerDep):
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
    params = await server.prepare(request, prompts, request.max_tokens, "prompt")
    head = _head("cmpl", "text_completion", server.model_id)
    if request.stream:

        def chunk(index, delta, finish_reason):
            if delta is None:
                return None  # completions chunks have no opening role chunk
            choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "choices": [choice]}

        return server.event_stream(prompts, params, chunk)
    done = await server.generate(prompts, params)
    choices = [
        {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
        for i, c in enumerate(done)
    ]
    return {**head, "choices": choices, "usage": _usage(done)}


@router.post("/v1/chat/completions")
async def chat_completions(request: ChatCompletionRequest, server: ServerDep):
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
    params = await server.prepare(request, [text], max_tokens, "messages")
    head = _head("chatcmpl", "chat.completion", server.model_id)
    if request.stream:

        def chunk(index, delta, finish_reason):
            if delta is None:
                message = {"role": "assistant", "content": ""}
            else:
                message = {"content": delta} if delta else {}
            choice = {"index": index, "delta": message, "logprobs": None, "finish_reason": finish_reason}
            return {**head, "object": "chat.completion.chunk", "choices": [choice]}

        return server.event_stream([text], params, chunk)
    [done] = await server.generate([text], params)
    message = {"role": "assistant", "content": done.text}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
    return {**head, "choices": [choice], "usage": _usage([done])}


def create_app(engine: OrtEngine, cfg: ServeConfig, classifier: OrtClassifier | None = None) -> FastAPI:
    """A FastAPI app serving `engine` under the limits of `cfg`, and `classifier` (if any) at /v1/classify."""
    from lmpipe import serve

    app = FastAPI(title="lmpipe", description=serve.__doc__.splitlines()[0])
    app.state.server = Server(engine, cfg)
    app.include_router(router)
    if classifier is not None:
        from lmpipe.encoder.http import classify_router

        app.include_router(classify_router(classifier))
    for exc_type, handler in HANDLERS.items():
        app.add_exception_handler(exc_type, handler)
    return app


def serve(cfg: ServeConfig) -> None:
    """Load the model of `cfg.model` (and the classifier of `cfg.classifier`) and serve until interrupted."""
    import uvicorn

    from lmpipe.inference.engine import OrtEngine
    from lmpipe.inference.resolver import resolve_model

    engine = OrtEngine(resolve_model(cfg.model), cfg.threads)
    classifier = None
    if cfg.classifier:
        from lmpipe.encoder.resolve import resolve_classifier
        from lmpipe.encoder.serving import OrtClassifier

        classifier = OrtClassifier(resolve_classifier(cfg.classifier), cfg.threads)
    uvicorn.run(create_app(engine, cfg, classifier), host=cfg.host, port=cfg.port, log_level="info")


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
