"""The official `openai` Python client against a real `lmpipe serve`, used exactly as its users use it with any
OpenAI-compatible server: `OpenAI(base_url=..., api_key=...)`. What the server answers is checked against the
engine run in this process on the same export (greedy, or sampled with the same seed)."""

import httpx
import openai
import pytest
from live_server import API_KEY_ENV, lmpipe_serve, needs_api_key

from lmpipe.inference.engine import OrtEngine
from lmpipe.inference.sampling import GenerationParams

PROMPT = "In the beginning"
QUESTION = "Who created the earth?"


@pytest.fixture(scope="module")
def engine(onnx_gpt):
    return OrtEngine(onnx_gpt, threads=1)


@pytest.fixture(scope="module")
def client(served_gpt):
    """A client as its README sets one up; lmpipe serve without --api-key takes whatever key is sent."""
    with openai.OpenAI(base_url=f"{served_gpt.base}/v1", api_key="sk-anything") as client:
        yield client


def expected(engine, prompt: str, chat: bool, **params):
    return engine.generate([prompt], GenerationParams(**params), chat=chat)[0]


def test_models_list_names_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_completion(client, engine):
    want = expected(engine, PROMPT, chat=False, max_new_tokens=12)
    out = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0)
    [choice] = out.choices
    assert (choice.text, choice.finish_reason) == (want.text, want.finish_reason)
    assert len(want.text) > 10
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (
        want.prompt_tokens,
        want.completion_tokens,
    )


def test_chat_completion(client, engine):
    want = expected(engine, QUESTION, chat=True, max_new_tokens=10)
    out = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, temperature=0
    )
    [choice] = out.choices
    assert (choice.message.role, choice.message.content) == ("assistant", want.text)
    assert choice.finish_reason == want.finish_reason and want.text
    assert out.usage.total_tokens == want.prompt_tokens + want.completion_tokens


def test_streamed_completion_adds_up_to_the_completion(client, engine):
    want = expected(engine, PROMPT, chat=False, max_new_tokens=12)
    with client.completions.create(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, stream=True
    ) as stream:
        chunks = list(stream)
    assert len(chunks) > 2  # streamed, not one piece
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks][-1] == want.finish_reason


def test_streamed_chat_opens_with_the_role_and_adds_up_to_the_reply(client, engine):
    want = expected(engine, QUESTION, chat=True, max_new_tokens=10)
    with client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=10,
        temperature=0,
        stream=True,
    ) as stream:
        chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks]
    assert deltas[0].role == "assistant" and len(chunks) > 3
    assert "".join(d.content or "" for d in deltas) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason


def test_sampling_options_reach_the_engine(client, engine):
    """temperature, top_p, seed, stop and lmpipe's top_k (through extra_body, as the client sends any
    server-specific field)."""
    sampling = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "stop": ["\n"]}
    want = expected(engine, PROMPT, chat=False, max_new_tokens=16, top_k=20, **sampling)
    outs = [
        client.completions.create(
            model="tiny", prompt=PROMPT, max_tokens=16, extra_body={"top_k": 20}, **sampling
        )
        for _ in range(2)
    ]
    assert [o.choices[0].text for o in outs] == [want.text, want.text]


def test_unknown_model_is_not_found(client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": QUESTION}])
    err = caught.value
    assert (err.status_code, err.code, err.param) == (404, "model_not_found", "model")
    assert "'gpt-4o' not found" in err.message and "'tiny'" in err.message


def test_too_many_tokens_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=1000)
    assert caught.value.param == "max_tokens" and "max_tokens=1000" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:  # within the limit, beyond the context of 64
        client.completions.create(model="tiny", prompt=PROMPT, max_tokens=62, stream=True)
    assert caught.value.code == "context_length_exceeded"


def test_any_key_is_accepted_without_api_key(served_gpt):
    for key in ("sk-one", "another key"):
        with openai.OpenAI(base_url=f"{served_gpt.base}/v1", api_key=key) as client:
            assert [m.id for m in client.models.list()] == ["tiny"]


@needs_api_key
@pytest.mark.parametrize("given", ["option", "env"])
def test_with_api_key_only_that_key_gets_in(onnx_gpt, tmp_path, engine, given):
    """The key given as --api-key, or in LMPIPE_API_KEY as a deployment would."""
    options, env = (["--api-key", "sk-right"], None) if given == "option" else ([], {API_KEY_ENV: "sk-right"})
    with lmpipe_serve(onnx_gpt, tmp_path / "serve.log", *options, env=env) as server:
        base = f"{server.base}/v1"
        with openai.OpenAI(base_url=base, api_key="sk-wrong") as wrong:
            with pytest.raises(openai.AuthenticationError) as caught:
                wrong.completions.create(model="tiny", prompt=PROMPT, max_tokens=4)
            assert caught.value.status_code == 401 and caught.value.message
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": QUESTION}], stream=True
                )
        with openai.OpenAI(base_url=base, api_key="sk-right") as right:
            want = expected(engine, PROMPT, chat=False, max_new_tokens=8)
            out = right.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0)
            assert out.choices[0].text == want.text
        # The chat page itself holds no secret: a browser must be able to load it to type the key in.
        assert httpx.get(f"{server.base}/", timeout=10).status_code == 200
