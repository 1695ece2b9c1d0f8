"""`POST /v1/classify` for the server: texts in, per task the label and probabilities out.

`classify_router(classifier)` is an APIRouter over an `OrtClassifier`; the server includes it beside its
generation routes when it is given a classifier (`lmpipe serve --classifier`), and its error handlers
(`lmpipe.serve.errors.HANDLERS`) turn a bad body (wrong types, unknown fields), an empty text, an unknown task
or too many texts into a 400 with a one-line message naming the field.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from lmpipe.encoder.serving import MAX_TEXTS, OrtClassifier
from lmpipe.serve.errors import ApiError


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    input: str | list[str]
    """One text or a list of texts."""
    task: str | None = None
    """Only this task's answer (default: every task of the classifier)."""


def classify_router(classifier: OrtClassifier) -> APIRouter:
    router = APIRouter()

    @router.post("/v1/classify")
    async def classify(request: ClassifyRequest) -> dict:
        texts = [request.input] if isinstance(request.input, str) else request.input
        if not texts or len(texts) > MAX_TEXTS:
            raise ApiError(400, f"input has {len(texts)} texts: expected 1 to {MAX_TEXTS}", "input")
        for i, text in enumerate(texts):
            if not text.strip():
                where = "input" if isinstance(request.input, str) else f"input[{i}]"
                raise ApiError(400, f"{where} is empty: expected text to classify", "input")
        if request.task is not None and request.task not in classifier.label_sets:
            tasks = ", ".join(classifier.label_sets)
            raise ApiError(400, f"task {request.task!r}: expected one of {tasks}", "task")
        results = await run_in_threadpool(classifier.classify, texts, request.task)
        return {
            "object": "list",
            "data": [
                {"index": i, "text": t, **r} for i, (t, r) in enumerate(zip(texts, results, strict=True))
            ],
        }

    return router
