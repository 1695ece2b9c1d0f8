"""`POST /v1/classify` for the server: texts in, per task the label and probabilities out.

`classify_router(classifier)` is an APIRouter over an `OrtClassifier`; the server includes it beside its
generation routes when it is given a classifier, and its error handlers (`lmpipe.serve.errors.HANDLERS`)
turn a bad body or an `LmpipeError` (empty text, unknown task, too many texts) into a 400.
"""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool

from lmpipe.encoder.serving import OrtClassifier


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
        results = await run_in_threadpool(classifier.classify, texts, request.task)
        return {
            "object": "list",
            "data": [
                {"index": i, "text": t, **r} for i, (t, r) in enumerate(zip(texts, results, strict=True))
            ],
        }

    return router
