"""Every refusal as an OpenAI-style error body `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lmpipe.errors import LmpipeError


class ApiError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers={**self.headers, **(headers or {})})


async def api_error(request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def bad_input(request: Request, exc: LmpipeError) -> JSONResponse:
    # The engine and GenerationParams raise LmpipeError only for input they cannot take.
    return ApiError(400, str(exc)).response()


async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
    return validation_error(exc.errors()).response()


async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    error = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
    return error.response(getattr(exc, "headers", None))


HANDLERS = {
    ApiError: api_error,
    LmpipeError: bad_input,
    RequestValidationError: invalid_body,
    HTTPException: http_error,
}
"""Exception type -> the handler that turns it into an error body."""


def validation_error(errors) -> ApiError:
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
