"""Serve an ONNX export over HTTP with the OpenAI completions and chat completions API (a subset).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions` (raw text, no chat template) and
`POST /v1/chat/completions` (the conversation rendered with the model's chat template). Both generation
endpoints take max_tokens, temperature, top_p, top_k (an extension), stop, seed, stream and n=1, and stream
as OpenAI does: server-sent events `data: {chunk}`, the last chunk carrying the finish reason, then
`data: [DONE]`. Every bad request is a 4xx with an OpenAI-style body
`{"error": {"message", "type", "param", "code"}}`; the token budget is checked before generation starts.

One engine serves every request, one generation at a time (see `create_app`). fastapi is imported inside
`create_app`, so `lmpipe generate` can use `resolve_model` without loading the web stack.
"""

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from lmpipe.chat import render
from lmpipe.errors import LmpipeError
from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams

REGISTRY_SCHEME = "models:/"
"""Prefix of an MLflow model registry URI (models:/<name>@<alias> or models:/<name>/<version>)."""


@dataclass
class ServeConfig:
    model: str = "models/onnx/teacher-int8"
    """ONNX export directory, or MLflow registry URI models:/<name>@<alias> or models:/<name>/<version>."""
    host: str = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface)."""
    port: int = 8000
    """TCP port to listen on."""
    threads: int = 0
    """ONNX Runtime intra-op threads (0 = one per core)."""
    max_prompt_tokens: int = 0
    """Longest prompt accepted, in tokens after the chat template; 0 = the model's block_size minus 1."""
    max_tokens_limit: int = 256
    """Largest max_tokens a request may ask; without max_tokens it gets this or the room its prompt leaves."""
    max_batch: int = 8
    """Most prompts in one completions request."""

    def __post_init__(self):
        for name in ("model", "host"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise LmpipeError(f"serve.{name}={value!r}: expected a non-empty string")
        if _not_int(self.port) or not 1 <= self.port <= 65535:
            raise LmpipeError(f"serve.port={self.port!r}: expected an integer in 1..65535")
        for name, least in (
            ("threads", 0),
            ("max_prompt_tokens", 0),
            ("max_tokens_limit", 1),
            ("max_batch", 1),
        ):
            value = getattr(self, name)
            if _not_int(value) or value < least:
                raise LmpipeError(f"serve.{name}={value!r}: expected an integer >= {least}")


def _not_int(value) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def resolve_model(ref: str) -> Path:
    """The export directory that `ref` names: a local directory, or an MLflow registry URI resolved (and
    downloaded if need be) by `lmpipe.registry`."""
    if ref.startswith(REGISTRY_SCHEME):
        from lmpipe.registry import resolve_model_dir  # MLflow is heavy: only for registry URIs

        return Path(resolve_model_dir(ref))
    path = Path(ref)
    if not path.is_dir():
        raise LmpipeError(
            f"missing model directory {path}: build it with `dvc repro export` (and `dvc repro quantize` "
            f"for the int8 variants), or pass another export directory or models:/ URI"
        )
    return path


def serve(cfg: ServeConfig) -> None:
    """Load the model named by `cfg.model` and serve it until interrupted."""
    import uvicorn

    engine = OrtEngine(resolve_model(cfg.model), cfg.threads)
    uvicorn.run(create_app(engine, cfg), host=cfg.host, port=cfg.port, log_level="info")


# --- request bodies -----------------------------------------------------------------------------------------


class _Sampling(BaseModel):
    """What both generation endpoints accept besides their input. Unknown fields are rejected rather than
    ignored, so a client relying on an unsupported OpenAI option (logprobs, echo, ...) learns it does not
    apply."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False, strict=True)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False, strict=True)
    top_k: StrictInt = Field(0, ge=0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=0)  # numpy's generator takes non-negative seeds only
    stream: StrictBool = False
    n: StrictInt = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_text_or_texts(cls, value):
        if value is None or _is_text_or_texts(value):
            return value
        raise ValueError("expected a string or a list of strings")


class CompletionRequest(_Sampling):
    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_text_or_texts(cls, value):
        if _is_text_or_texts(value):
            return value
        raise ValueError("expected a string or a list of strings")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(strict=True)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """The newer OpenAI name of max_tokens for chat."""


def _is_text_or_texts(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


class ApiError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# --- the app ------------------------------------------------------------------------------------------------


def create_app(engine: OrtEngine, cfg: ServeConfig):
    """A FastAPI app serving `engine` (already loaded, so tests can pass a small one) under the limits of
    `cfg` (its model, host and port are not used here).

    Generation is blocking numpy and ONNX Runtime work, so it runs in the threadpool, leaving the event loop
    free for other requests (health checks answer while a long generation runs). An asyncio lock lets one
    generation use the engine at a time: OrtEngine keeps no per-call state of its own, but it was never
    designed or tested for concurrent calls, and one generation already keeps every core busy (ORT's
    intra-op threads), so running several at once would only make each slower. Waiting requests queue on the
    lock in arrival order; a client wanting throughput sends several prompts in one completions request,
    which the engine batches.
    """
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    block_size = engine.block_size
    max_prompt = cfg.max_prompt_tokens or block_size - 1
    if max_prompt > block_size - 1:
        raise LmpipeError(
            f"serve.max_prompt_tokens={cfg.max_prompt_tokens}: expected at most block_size - 1 = "
            f"{block_size - 1} for {engine.name} (a longer prompt leaves no room to generate)"
        )
    model_id, started = engine.name, int(time.time())
    lock = asyncio.Lock()
    app = FastAPI(title="lmpipe", description=__doc__.splitlines()[0])

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(LmpipeError)
    async def _bad_input(request: Request, exc: LmpipeError):
        # The engine and GenerationParams raise LmpipeError only for input they cannot take.
        return JSONResponse(ApiError(400, str(exc)).body(), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError):
        error = _validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": model_id,
            "block_size": block_size,
            "max_prompt_tokens": max_prompt,
            "max_tokens_limit": cfg.max_tokens_limit,
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": started, "owned_by": "lmpipe"}],
        }

    async def prepare(
        request: _Sampling, texts: list[str], max_tokens: int | None, param: str
    ) -> GenerationParams:
        """Check the request against the served model and the limits; the sampling parameters to use."""
        if request.model is not None and request.model != model_id:
            raise ApiError(
                404,
                f"model {request.model!r} not found: this server serves {model_id!r}",
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
        counts = await run_in_threadpool(lambda: [len(engine.encode_prompt(t, chat=False)) for t in texts])
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
        stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
        return GenerationParams(
            max_new_tokens=max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            stop=stop,
            seed=request.seed,
        )

    def event_stream(texts: list[str], params: GenerationParams, chunk) -> StreamingResponse:
        """SSE of the prompts' completions, one after the other; `chunk(index, delta, finish_reason)` is
        the JSON object sent for each piece (delta None: the opening chunk)."""

        async def events() -> AsyncIterator[str]:
            async with lock:
                for index, text in enumerate(texts):
                    opening = chunk(index, None, None)
                    if opening is not None:
                        yield _sse(opening)
                    pieces = stream_with_finish(engine, text, params)
                    try:
                        while (piece := await run_in_threadpool(next, pieces, None)) is not None:
                            delta, finish_reason = piece
                            if delta:
                                yield _sse(chunk(index, delta, None))
                            if finish_reason is not None:
                                yield _sse(chunk(index, "", finish_reason))
                    finally:
                        pieces.close()
            yield "data: [DONE]\n\n"

        headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers)

    @app.post("/v1/completions")
    async def completions(request: CompletionRequest):
        prompts = [request.prompt] if isinstance(request.prompt, str) else request.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list: expected at least one prompt", "prompt")
        if len(prompts) > cfg.max_batch:
            raise ApiError(
                400, f"{len(prompts)} prompts: at most max_batch={cfg.max_batch} per request", "prompt"
            )
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise ApiError(400, f"prompt{'' if len(prompts) == 1 else f'[{i}]'} is empty", "prompt")
        params = await prepare(request, prompts, request.max_tokens, "prompt")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_id}
        if request.stream:

            def chunk(index, delta, finish_reason):
                if delta is None:
                    return None  # completions chunks have no opening role chunk
                choice = {"index": index, "text": delta, "logprobs": None, "finish_reason": finish_reason}
                return {**head, "choices": [choice]}

            return event_stream(prompts, params, chunk)
        async with lock:
            done = await run_in_threadpool(engine.generate, prompts, params, chat=False)
        choices = [
            {"index": i, "text": c.text, "logprobs": None, "finish_reason": c.finish_reason}
            for i, c in enumerate(done)
        ]
        return {**head, "choices": choices, "usage": _usage(done)}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: ChatCompletionRequest):
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
        text = render(messages, add_generation_prompt=True, template=engine.template)
        params = await prepare(request, [text], max_tokens, "messages")
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "chat.completion", "created": created, "model": model_id}
        if request.stream:

            def chunk(index, delta, finish_reason):
                if delta is None:
                    message = {"role": "assistant", "content": ""}
                else:
                    message = {"content": delta} if delta else {}
                choice = {"index": index, "delta": message, "logprobs": None, "finish_reason": finish_reason}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            return event_stream([text], params, chunk)
        async with lock:
            [done] = await run_in_threadpool(engine.generate, [text], params, chat=False)
        message = {"role": "assistant", "content": done.text}
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": done.finish_reason}
        return {**head, "choices": [choice], "usage": _usage([done])}

    return app


def stream_with_finish(
    engine: OrtEngine, text: str, params: GenerationParams
) -> Iterator[tuple[str, str | None]]:
    """`engine.stream(text, params, chat=False)` as (delta, None) pairs, ending with (tail, finish_reason).

    The last SSE chunk must carry the finish reason, which `OrtEngine.stream` does not report, so this walks
    the engine's own generation steps, stopping rules and hold-back rule exactly as `stream` does. Were
    `stream` to return the reason (its generator's return value), this could wrap it instead.
    """
    from lmpipe.inference.engine import _stable_length

    sequences = [engine._sequence(engine.encode_prompt(text, chat=False), params, track_text=True)]
    engine._check_room(sequences, params)
    seq, sent = sequences[0], 0
    for _ in engine._steps(sequences, params):
        if seq.finish_reason is None:
            stable = _stable_length(seq.text, params.stop)
            if stable > sent:
                yield seq.text[sent:stable], None
                sent = stable
    yield seq.text[sent:], seq.finish_reason


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _usage(done) -> dict[str, int]:
    prompt = sum(c.prompt_tokens for c in done)
    completion = sum(c.completion_tokens for c in done)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _validation_error(errors) -> ApiError:
    """One 400 for pydantic's list of complaints about a request body: malformed JSON, or each bad field
    with its value and what was expected."""
    for error in errors:
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", error.get("msg", ""))
            position = error["loc"][-1] if len(error["loc"]) > 1 else None
            where = f" at character {position}" if isinstance(position, int) else ""
            return ApiError(400, f"invalid JSON: {reason}{where}", code="invalid_json")
    parts, param = [], None
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        if not loc:  # no body, or not an object: nothing else can be said
            return ApiError(400, "request body: expected a JSON object (Content-Type: application/json)")
        field = ".".join(loc)
        param = param or loc[0]
        if error.get("type") == "extra_forbidden":
            parts.append(f"{field}: unsupported parameter")
            continue
        message = error.get("msg", "invalid").removeprefix("Value error, ")
        shown = "" if error.get("type") == "missing" else f"={error.get('input')!r:.60}"
        parts.append(f"{field}{shown}: {message}")
    return ApiError(400, "; ".join(parts), param)
