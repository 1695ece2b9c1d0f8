import pytest
from pydantic import ValidationError

from lmpipe.inference.sampling import DEFAULTS
from lmpipe.serve.requests import (
    OPENAI_TEMPERATURE,
    ChatCompletionRequest,
    CompletionRequest,
)


def test_sampling_defaults_are_the_engines_except_openais_temperature():
    request = CompletionRequest(prompt="God")
    assert (request.top_p, request.top_k, request.seed) == (DEFAULTS.top_p, DEFAULTS.top_k, DEFAULTS.seed)
    assert request.temperature == OPENAI_TEMPERATURE == 1.0
    assert (request.max_tokens, request.stream, request.n) == (None, False, 1)


@pytest.mark.parametrize(("stop", "stops"), [(None, []), ("###", ["###"]), (["a", "b"], ["a", "b"])])
def test_stop_is_one_text_or_several(stop, stops):
    assert CompletionRequest(prompt="God", stop=stop).stops == stops


@pytest.mark.parametrize(
    "body",
    [
        {"prompt": 3},
        {"prompt": ["a", 3]},
        {"prompt": "God", "stop": [1]},
        {"prompt": "God", "logprobs": 1},  # unsupported OpenAI options are refused, not ignored
        {"prompt": "God", "temperature": "1"},
        {"prompt": "God", "max_tokens": 0},
        {"prompt": "God", "seed": -1},
    ],
)
def test_bad_completion_bodies_are_refused(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_chat_messages_take_the_three_roles_only():
    request = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_completion_tokens=4)
    assert request.messages[0].role == "user" and request.max_completion_tokens == 4
    with pytest.raises(ValidationError):
        ChatCompletionRequest(messages=[{"role": "tool", "content": "hi"}])
