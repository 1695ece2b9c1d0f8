"""The server's settings (`lmpipe serve` options): what it loads, where it listens, the limits of a request."""

from __future__ import annotations

from dataclasses import field
from typing import Annotated

from pydantic import AfterValidator, Field

from lmpipe.config import schema


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("a non-empty string")
    return value


NonBlank = Annotated[str, AfterValidator(_not_blank)]


def _empty_or_not_blank(value: str) -> str:
    return _not_blank(value) if value else value


@schema("serve")
class ServeConfig:
    model: NonBlank = "models/onnx/teacher-int8"
    """ONNX export directory, or MLflow registry URI models:/<name>@<alias> or models:/<name>/<version>."""
    host: NonBlank = "127.0.0.1"
    """Interface to listen on (0.0.0.0 for every interface)."""
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    """TCP port to listen on."""
    threads: Annotated[int, Field(ge=0)] = 0
    """ONNX Runtime intra-op threads (0 = one per core)."""
    max_prompt_tokens: Annotated[int, Field(ge=0)] = 0
    """Longest prompt accepted, in tokens after the chat template; 0 = the model's block_size minus 1."""
    max_tokens_limit: Annotated[int, Field(ge=1)] = 256
    """Largest max_tokens a request may ask; without max_tokens it gets this or the room its prompt leaves."""
    max_batch: Annotated[int, Field(ge=1)] = 8
    """Most prompts in one completions request."""
    max_running: Annotated[int, Field(ge=1)] = 16
    """Most sequences decoded together, requests joining between steps; 1 = one at a time (batching off)."""
    max_queue: Annotated[int, Field(ge=1)] = 64
    """Most requests waiting to join the running batch; one more gets a 503 with Retry-After."""
    request_timeout: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 60.0
    """Seconds a request may wait to join the running batch before it gets a 503."""
    shutdown_timeout: Annotated[float, Field(ge=0, allow_inf_nan=False)] = 10.0
    """Seconds running requests get to finish after SIGTERM before they are cancelled."""
    max_body_bytes: Annotated[int, Field(ge=1)] = 1_000_000
    """Largest request body accepted; a larger one gets a 413."""
    api_key: str = field(default="", repr=False)  # kept out of logs and tracebacks
    """Key every /v1 request must send as 'Authorization: Bearer KEY' ('' = any or none; env LMPIPE_API_KEY)."""
    classifier: Annotated[str, AfterValidator(_empty_or_not_blank)] = ""
    """Encoder classifier of POST /v1/classify: ONNX classifier directory or models:/lmpipe-classifier@<alias>
    ('' = none: /v1/classify is a 404)."""
