"""The request bodies of the generation endpoints, as OpenAI defines them (the subset lmpipe serves).

Sampling defaults are `GenerationParams`' except temperature, which is OpenAI's 1.0: a client written for the
OpenAI API gets the sampling it asked for by leaving temperature out.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator

from lmpipe.inference.sampling import DEFAULTS

OPENAI_TEMPERATURE = 1.0
"""The temperature of a request that does not set one (OpenAI's default)."""
MAX_STOPS = 16
"""Most stop sequences per request: every generated token of the request is checked against each one, in the
decode loop that the whole running batch shares (OpenAI takes 4)."""
MAX_STOP_CHARS = 100
"""Longest stop sequence, in characters (a stream holds back text while it could still become one)."""


def _is_text_or_texts(value) -> bool:
    return isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _unicode(value):
    """Text that has a UTF-8 encoding: JSON's escapes can spell lone surrogates ("\\ud800"), which no
    tokenizer takes."""
    for text in [value] if isinstance(value, str) else value if isinstance(value, list) else []:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise ValueError(
                f"expected valid Unicode text (a lone surrogate at character {exc.start})"
            ) from None
    return value


class SamplingRequest(BaseModel):
    """What both generation endpoints accept besides their input. Unknown fields are rejected rather than
    ignored, so a client relying on an unsupported OpenAI option (logprobs, echo, ...) learns it does not
    apply."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(OPENAI_TEMPERATURE, ge=0, allow_inf_nan=False, strict=True)
    top_p: float = Field(DEFAULTS.top_p, gt=0, le=1, allow_inf_nan=False, strict=True)
    top_k: StrictInt = Field(DEFAULTS.top_k, ge=0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(DEFAULTS.seed, ge=0)  # numpy's generator takes non-negative seeds only
    stream: StrictBool = False
    n: StrictInt = 1

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_text_or_texts(cls, value):
        if value is None:
            return value
        if not _is_text_or_texts(value):
            raise ValueError("expected a string or a list of strings")
        stops = [value] if isinstance(value, str) else value
        if len(stops) > MAX_STOPS:
            raise ValueError(f"{len(stops)} stop sequences: expected at most {MAX_STOPS}")
        longest = max(stops, key=len, default="")
        if len(longest) > MAX_STOP_CHARS:
            raise ValueError(
                f"a stop sequence of {len(longest)} characters: expected at most {MAX_STOP_CHARS}"
            )
        return _unicode(value)

    @property
    def stops(self) -> list[str]:
        """`stop` as a list (OpenAI takes one string or several)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop or []


class CompletionRequest(SamplingRequest):
    prompt: str | list[str]

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_text_or_texts(cls, value):
        if _is_text_or_texts(value):
            return _unicode(value)
        raise ValueError("expected a string or a list of strings")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: Annotated[str, AfterValidator(_unicode)] = Field(strict=True)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    """The newer OpenAI name of max_tokens for chat."""
