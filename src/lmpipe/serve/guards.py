"""What a request passes before any route sees it: the API key, and a body of bounded size in UTF-8.

A plain ASGI middleware rather than a route dependency: it covers every route, those mounted by other modules
too (`/v1/classify`), and it answers before FastAPI reads the body, so a client cannot make the server buffer
more than `max_body_bytes` of it. The body it has read is handed on to the app unchanged.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lmpipe.serve.errors import ApiError

PROTECTED_PREFIX = "/v1/"
"""Paths that need the API key (when one is set): the API itself; /health stays open for load balancers."""


class Guard:
    """ASGI middleware: 401 without the API key (when `api_key` is set), 413 for a body over `max_body_bytes`,
    400 for a body that is not UTF-8; all in the OpenAI error format."""

    def __init__(self, app: ASGIApp, api_key: str, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = self._refuse_key(scope["path"], headers.get(b"authorization"))
        if refusal is None:
            body, refusal = await self._read_body(headers.get(b"content-length"), receive)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if body is None:  # the client left before its body was in
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()  # from here on: only http.disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _refuse_key(self, path: str, authorization: bytes | None) -> ApiError | None:
        if not self.api_key or not path.startswith(PROTECTED_PREFIX):
            return None
        scheme, _, key = (authorization or b"").partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(key.strip(), self.api_key):
            return None
        challenge = {"WWW-Authenticate": "Bearer"}
        if authorization is None:
            message = "missing API key: expected the header 'Authorization: Bearer <key>'"
        else:
            message = "incorrect API key: expected 'Authorization: Bearer <key>' with this server's key"
        return ApiError(401, message, code="invalid_api_key", headers=challenge)

    async def _read_body(
        self, declared: bytes | None, receive: Receive
    ) -> tuple[bytes | None, ApiError | None]:
        """The whole body, or why it is refused (None, None: the client disconnected)."""
        limit = self.max_body_bytes
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return None, _too_large(f"request body of {int(declared)} bytes", limit)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None, None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None, _too_large(f"request body of more than {limit} bytes", limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            return None, ApiError(
                400,
                f"request body: invalid UTF-8 at byte {exc.start}: expected JSON in UTF-8",
                code="invalid_utf8",
            )
        return body, None


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, f"{what}: more than this server's limit of {limit} bytes", code="request_too_large")
